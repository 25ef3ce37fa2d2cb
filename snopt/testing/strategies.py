"""Hypothesis strategies for small random Neural ODE problems (needs ``pip install snopt[testing]``).

A drawn value is a frozen spec from `snopt.testing` (plain numbers and a seed, so hypothesis
prints and shrinks it and a failure is reproducible from the printed spec); its ``build`` turns
it into tensors with a seeded `torch.Generator`.

* `time_grids`: 2–4 strictly monotone output times, increasing or decreasing, optionally on a
  dyadic lattice so that a fixed step size divides every interval exactly.
* `field_specs`: one-hidden-layer MLP vector fields, width 2–16, tanh/softplus/SiLU,
  autonomous or time-dependent (t concatenated to the input).
* `mlp_problems` / `linear_problems`: `OdeintProblem` values: a field, an initial batch (1–8), a time
  grid and a loss L(ys) = Σ w·ys + ½ c Σ ys² that weights every output time.
* `second_order_problems`: `SecondOrderProblem` values (MLP, Conv2d, affine or linear fields, MSE or
  cross-entropy at t1) on a span that a power-of-two step divides.

Example:
    >>> from hypothesis import given
    >>> from snopt.testing.strategies import second_order_problems
    >>> @given(second_order_problems("mlp"))
    ... def test_my_hessian(problem):
    ...     func, x0, t_span, loss_fn = problem.build()
"""

try:
    from hypothesis import strategies as st
except ImportError as err:
    raise ImportError("snopt.testing.strategies needs hypothesis, an optional dependency: "
                      "pip install snopt[testing]") from err

import torch

from snopt.testing._problems import (
    ACTIVATIONS,
    FIELD_KINDS,
    FieldSpec,
    LinearSpec,
    OdeintProblem,
    SecondOrderProblem,
)

DTYPES = (torch.float32, torch.float64)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
"""Seeds for the specs' generators."""


@st.composite
def time_grids(draw: st.DrawFn, *, min_points: int = 2, max_points: int = 4, lattice: float | None = None,
               max_units: int = 8, allow_decreasing: bool = True) -> tuple[float, ...]:
    """Strictly monotone output times, t0 ∈ [−1, 1], gaps in [0.1, 0.7] (or multiples of `lattice`).

    With `lattice` (a power of two such as 1/32) every time is a multiple of it, so a fixed
    step of that size (or of any finer power of two) divides each interval exactly and
    the times are exact in binary floating point.

    Args:
        draw: Supplied by hypothesis.
        min_points: Fewest output times.
        max_points: Most output times.
        lattice: If given, every time is a multiple of it and gaps are 1–`max_units` multiples.
        max_units: Largest gap in units of `lattice`.
        allow_decreasing: Also draw decreasing grids (backward-in-time solves).

    Returns:
        The times, as a tuple of floats.
    """
    n = draw(st.integers(min_value=min_points, max_value=max_points))
    decreasing = allow_decreasing and draw(st.booleans())
    if lattice is None:
        t0 = draw(st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, allow_infinity=False))
        gaps = draw(st.lists(st.floats(min_value=0.1, max_value=0.7), min_size=n - 1, max_size=n - 1))
    else:
        t0 = lattice * draw(st.integers(min_value=-round(1 / lattice), max_value=round(1 / lattice)))
        units = draw(st.lists(st.integers(min_value=1, max_value=max_units), min_size=n - 1, max_size=n - 1))
        gaps = [lattice * u for u in units]
    sign = -1.0 if decreasing else 1.0
    ts = [t0]
    for gap in gaps:
        ts.append(ts[-1] + sign * gap)
    return tuple(ts)


@st.composite
def field_specs(draw: st.DrawFn, *, dtypes: tuple[torch.dtype, ...] = DTYPES, max_dim: int = 4,
                max_scale: float = 1.5) -> FieldSpec:
    """Random MLP vector fields: width 2–16, dim 1–`max_dim`, any activation, ± time dependence.

    Args:
        draw: Supplied by hypothesis.
        dtypes: The dtypes to draw from.
        max_dim: Largest state dimension.
        max_scale: Largest weight scale factor (from 0.25).

    Returns:
        A `FieldSpec`.
    """
    return FieldSpec(
        dim=draw(st.integers(min_value=1, max_value=max_dim)),
        width=draw(st.integers(min_value=2, max_value=16)),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        time_dependent=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(seeds),
        scale=draw(st.floats(min_value=0.25, max_value=max_scale)),
    )


@st.composite
def mlp_problems(draw: st.DrawFn, *, dtypes: tuple[torch.dtype, ...] = DTYPES, lattice: float | None = None,
                 max_units: int = 8, max_points: int = 4) -> OdeintProblem:
    """A random MLP field with a batch of 1–8 initial states, a time grid and a loss.

    Args:
        draw: Supplied by hypothesis.
        dtypes: The dtypes to draw from.
        lattice: Passed to `time_grids`.
        max_units: Passed to `time_grids`.
        max_points: Passed to `time_grids`.

    Returns:
        An `OdeintProblem`.
    """
    return OdeintProblem(field=draw(field_specs(dtypes=dtypes)), batch=draw(st.integers(min_value=1, max_value=8)),
                         t=draw(time_grids(lattice=lattice, max_units=max_units, max_points=max_points)),
                         seed=draw(seeds))


@st.composite
def linear_problems(draw: st.DrawFn, *, dtypes: tuple[torch.dtype, ...] = (torch.float64,), max_dim: int = 4,
                    max_points: int = 4) -> OdeintProblem:
    """A random linear ODE (dim 1–`max_dim`, ‖A‖ ≲ 1.5), batch 1–8, a time grid and a loss.

    Args:
        draw: Supplied by hypothesis.
        dtypes: The dtypes to draw from.
        max_dim: Largest state dimension.
        max_points: Passed to `time_grids`.

    Returns:
        An `OdeintProblem` whose field is a `LinearSpec`.
    """
    spec = LinearSpec(dim=draw(st.integers(min_value=1, max_value=max_dim)), dtype=draw(st.sampled_from(dtypes)),
                      seed=draw(seeds), scale=draw(st.floats(min_value=0.1, max_value=1.5)))
    return OdeintProblem(field=spec, batch=draw(st.integers(min_value=1, max_value=8)),
                         t=draw(time_grids(max_points=max_points)), seed=draw(seeds))


@st.composite
def second_order_problems(draw: st.DrawFn, kind: str = "mlp", *, lattice: float = 1 / 8, min_units: int = 1,
                          max_units: int = 4, max_batch: int = 8, max_dim: int = 3, max_width: int = 8,
                          max_scale: float = 1.5) -> SecondOrderProblem:
    """Random `SecondOrderProblem` values on a span of `min_units`–`max_units` × `lattice`, either direction.

    t0 is a multiple of `lattice` in [−4, 4] × `lattice`; forward spans are drawn twice as often
    as backward ones. With a power-of-two `lattice`, any power-of-two step not above it divides
    the span exactly (`SecondOrderProblem.steps`).

    Args:
        draw: Supplied by hypothesis.
        kind: The field: one of ``"mlp"``, ``"conv"``, ``"affine"``, ``"linear"``.
        lattice: Unit of t0 and of the span.
        min_units: Shortest span in units of `lattice`.
        max_units: Longest span in units of `lattice`.
        max_batch: Largest batch.
        max_dim: Largest state dimension (channels for ``"conv"``).
        max_width: Largest hidden width.
        max_scale: Largest weight scale factor (from 0.25).

    Returns:
        A `SecondOrderProblem`.

    Raises:
        ValueError: For an unknown `kind`.
    """
    if kind not in FIELD_KINDS:
        raise ValueError(f"`kind` must be one of {FIELD_KINDS}; got {kind!r}.")
    t0 = lattice * draw(st.integers(min_value=-4, max_value=4))
    units = draw(st.integers(min_value=min_units, max_value=max_units))
    sign = draw(st.sampled_from((1.0, 1.0, -1.0)))
    return SecondOrderProblem(
        kind=kind, dim=draw(st.integers(min_value=1, max_value=max_dim)),
        width=draw(st.integers(min_value=1 if kind == "conv" else 2, max_value=max_width)),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))), time_dependent=draw(st.booleans()),
        batch=draw(st.integers(min_value=1, max_value=max_batch)), t0=t0, t1=t0 + sign * lattice * units,
        loss=draw(st.sampled_from(("mse", "ce"))), seed=draw(seeds),
        scale=draw(st.floats(min_value=0.25, max_value=max_scale)),
        classes=draw(st.integers(min_value=2, max_value=4)))


__all__ = ["DTYPES", "field_specs", "linear_problems", "mlp_problems", "second_order_problems", "seeds",
           "time_grids"]
