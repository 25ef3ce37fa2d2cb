"""Hypothesis strategies for small random ODE problems.

A drawn value is a frozen *spec* (plain numbers and a seed, so hypothesis prints and
shrinks it and a failure is reproducible from the printed spec); `.build()` turns a spec
into tensors with a seeded `torch.Generator`, never the global RNG.

* `field_specs`: one-hidden-layer MLP vector fields, width 2–16, tanh/softplus/SiLU,
  autonomous or time-dependent (t concatenated to the input).
* `time_grids`: 2–4 strictly monotone output times, increasing or decreasing, optionally
  on a dyadic lattice so that a fixed step size divides every interval exactly.
* `mlp_problems` / `linear_problems`: a field, an initial batch (1–8), a time grid and a
  loss L(ys) = Σ w·ys + ½ c Σ ys² that weights every output time.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from verification.references import LinearField

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus, "silu": nn.SiLU}
DTYPES = (torch.float32, torch.float64)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


class MLPField(nn.Module):
    """F(t, x) = W2 σ(W1 [x; t] + b1) + b2 (t appended only if `time_dependent`)."""

    def __init__(self, dim: int, width: int, activation: str, time_dependent: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.time_dependent = time_dependent
        self.lin1 = nn.Linear(dim + int(time_dependent), width, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.lin2 = nn.Linear(width, dim, dtype=dtype)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Evaluate the field at time `t` (0-d) and state `x` (..., dim)."""
        if self.time_dependent:
            x = torch.cat([x, t.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)
        out: Tensor = self.lin2(self.act(self.lin1(x)))
        return out


@dataclass(frozen=True)
class FieldSpec:
    """A random MLP vector field. `scale` multiplies the 1/sqrt(fan_in) weight scale."""

    dim: int
    width: int
    activation: str
    time_dependent: bool
    dtype: torch.dtype
    seed: int
    scale: float = 1.0

    def build(self) -> MLPField:
        """The field with weights drawn from a generator seeded by `seed`."""
        g = torch.Generator().manual_seed(self.seed)
        f = MLPField(self.dim, self.width, self.activation, self.time_dependent, self.dtype)
        with torch.no_grad():
            for lin in (f.lin1, f.lin2):
                fan_in = lin.weight.shape[1]
                w = torch.randn(lin.weight.shape, generator=g, dtype=torch.float64) * self.scale / math.sqrt(fan_in)
                lin.weight.copy_(w)
                lin.bias.copy_(0.5 * torch.randn(lin.bias.shape, generator=g, dtype=torch.float64))
        return f


@dataclass(frozen=True)
class LinearSpec:
    """dx/dt = A x + b with A = scale · randn / sqrt(dim), b ~ randn."""

    dim: int
    dtype: torch.dtype
    seed: int
    scale: float = 1.0

    def matrices(self) -> tuple[Tensor, Tensor]:
        """(A, b) drawn from a generator seeded by `seed`."""
        g = torch.Generator().manual_seed(self.seed)
        A = torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64) * self.scale / math.sqrt(self.dim)
        b = torch.randn(self.dim, generator=g, dtype=torch.float64)
        return A.to(self.dtype), b.to(self.dtype)

    def build(self) -> LinearField:
        """The field as a module whose parameters are A and b."""
        return LinearField(*self.matrices())


@dataclass(frozen=True)
class Problem:
    """A vector field, an initial batch y0 (batch, dim), output times and a loss over all outputs."""

    field: FieldSpec | LinearSpec
    batch: int
    t: tuple[float, ...]
    seed: int
    quad: float = 0.5

    @property
    def dtype(self) -> torch.dtype:
        """The problem's floating dtype."""
        return self.field.dtype

    def y0(self) -> Tensor:
        """The initial state (batch, dim)."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.batch, self.field.dim, generator=g, dtype=torch.float64).to(self.dtype)

    def times(self) -> Tensor:
        """The output times as a tensor of the problem's dtype."""
        return torch.tensor(self.t, dtype=torch.float64).to(self.dtype)

    def loss_fn(self) -> Callable[[Tensor], Tensor]:
        """L(ys) = Σ w·ys + ½ quad Σ ys², ys shaped (len(t), batch, dim), w drawn from the seed."""
        g = torch.Generator().manual_seed(self.seed + 1)
        w = torch.randn(len(self.t), self.batch, self.field.dim, generator=g, dtype=torch.float64).to(self.dtype)
        quad = self.quad

        def loss(ys: Tensor) -> Tensor:
            return (w * ys).sum() + 0.5 * quad * ys.pow(2).sum()

        return loss


@st.composite
def time_grids(draw: st.DrawFn, *, min_points: int = 2, max_points: int = 4, lattice: float | None = None,
               max_units: int = 8, allow_decreasing: bool = True) -> tuple[float, ...]:
    """Strictly monotone output times, t0 ∈ [−1, 1], gaps in [0.1, 0.7] (or multiples of `lattice`).

    With `lattice` (a power of two such as 1/32) every time is a multiple of it, so a fixed
    step of that size (or of any finer power of two) divides each interval exactly and
    the times are exact in binary floating point.
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
    """Random MLP vector fields: width 2–16, dim 1–`max_dim`, any activation, ± time dependence."""
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
                 max_units: int = 8, max_points: int = 4) -> Problem:
    """A random MLP field with a batch of 1–8 initial states, a time grid and a loss."""
    return Problem(field=draw(field_specs(dtypes=dtypes)), batch=draw(st.integers(min_value=1, max_value=8)),
                   t=draw(time_grids(lattice=lattice, max_units=max_units, max_points=max_points)),
                   seed=draw(seeds))


@st.composite
def linear_problems(draw: st.DrawFn, *, dtypes: tuple[torch.dtype, ...] = (torch.float64,), max_dim: int = 4,
                    max_points: int = 4) -> Problem:
    """A random linear ODE (dim 1–`max_dim`, ||A|| ≲ 1.5), batch 1–8, a time grid and a loss."""
    spec = LinearSpec(dim=draw(st.integers(min_value=1, max_value=max_dim)), dtype=draw(st.sampled_from(dtypes)),
                      seed=draw(seeds), scale=draw(st.floats(min_value=0.1, max_value=1.5)))
    return Problem(field=spec, batch=draw(st.integers(min_value=1, max_value=8)),
                   t=draw(time_grids(max_points=max_points)), seed=draw(seeds))
