"""Time-integrated Kronecker factors A and G of one layer (DESIGN §2, "SNOpt's Kronecker factors").

For a layer h = W a (+ b) inside the vector field F, with ā = [a; 1] (bias) and g the
adjoint's cotangent at the layer output, SNOpt approximates the layer's block of V_θθ by A ⊗ G.

Scaling (both modes):

- A quadrature weight ``w`` multiplies every contribution. With the adjoint's accepted steps,
  ``w = dt`` (a left Riemann sum over [t0, t1]), so A and G are *time integrals*, not time
  averages: ``factors.weight`` = Σ w (= t1 − t0 once a solve is complete) and
  ``A / weight``, ``G / weight`` (see `time_average`) are the averages the authors' code uses
  for A.
- Over data points, both factors are *means* (per location): no batch size or number of
  locations is multiplied in. Any rescaling of g (e.g. by the batch size when the loss is a
  batch mean, so that g becomes the per-sample cotangent) is the caller's business.

`TimeSharing.EXPAND` (`accumulate_`): each (time sample × batch element × location) is a data point,

    A += w · āᵀā / N,   G += w · gᵀg / N      (N = rows of ā resp. g)

so after a solve A = ∫ E[ā āᵀ] dt and G = ∫ E[g gᵀ] dt (E: mean over batch × locations).
If ā and g are constant in time on [t0, t1] of length T, A ⊗ G = T² E[āāᵀ] ⊗ E[ggᵀ], which
for one datum and one location is exactly vec(∫ g āᵀ dt) vec(∫ g āᵀ dt)ᵀ.

`TimeSharing.REDUCE` (`ReduceAccumulator`): time is a shared dimension reduced *within each
sample* before the outer products (Eschenhagen et al. 2023, "reduce"), with ā averaged and g
integrated over time, per (batch element, location):

    ā_n = Σ_t w_t ā_{n,t} / Σ_t w_t,   ĝ_n = Σ_t w_t g_{n,t},   A = E_n[ā_n ā_nᵀ],   G = E_n[ĝ_n ĝ_nᵀ].

When ā does not vary in time, ĝ_n ā_nᵀ is exactly the per-sample gradient ∫ g āᵀ dt, so
A ⊗ G is exact for one datum with one location. Both modes carry the same overall scale (T²).
"""

from dataclasses import dataclass
from enum import StrEnum
from typing import final

import torch
from torch import Tensor

Weight = float | Tensor
"""A quadrature weight: a Python number or a tensor with one element (e.g. the solver's ``dt``)."""


class TimeSharing(StrEnum):
    """How the time dimension of the ODE is treated when forming Kronecker factors."""

    EXPAND = "expand"
    """Each (time sample × batch element × location) is one data point (`accumulate_`)."""
    REDUCE = "reduce"
    """Per sample, ā is averaged and g integrated over time before the outer products (`ReduceAccumulator`)."""


class VecOrder(StrEnum):
    """How a (d_out, d_in) matrix X is flattened into a vector for dense Kronecker blocks."""

    ROW = "row"
    """Row-major, torch's ``X.reshape(-1)``: vec(g āᵀ) = g ⊗ ā, block = G ⊗ A (``torch.kron(G, A)``)."""
    COLUMN = "column"
    """Column-major, the maths convention ``X.T.reshape(-1)``: vec(g āᵀ) = ā ⊗ g, block = A ⊗ G."""


@dataclass(eq=False)
class KronFactors:
    """The Kronecker factors of one layer and what has been folded into them.

    Attributes:
        A: Input factor, (d_in, d_in), d_in counting the bias column.
        G: Output-cotangent factor, (d_out, d_out).
        weight: 0-dim tensor, Σ of the quadrature weights folded in (kept as a tensor so that
            tensor weights such as the solver's ``dt`` never force a device synchronisation).
        steps: Number of evaluations folded in.
        rows_a: Total number of rows (data points) of ā folded into A.
        rows_g: Total number of rows of g folded into G.
    """

    A: Tensor
    G: Tensor
    weight: Tensor
    steps: int = 0
    rows_a: int = 0
    rows_g: int = 0

    @classmethod
    def zeros(cls, d_in: int, d_out: int, *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> "KronFactors":
        """Empty factors (all zero) to accumulate into.

        Args:
            d_in: Size of A (input features, +1 with a bias; see `layer_dims`).
            d_out: Size of G (output features).
            dtype: Floating dtype of the factors (default: torch's default dtype).
            device: Device of the factors.

        Returns:
            Factors with zero A, G, weight and counters.

        Raises:
            ValueError: If a size is not positive.
        """
        if d_in < 1 or d_out < 1:
            raise ValueError(f"`d_in` and `d_out` must be positive; got d_in={d_in}, d_out={d_out}.")
        return cls(A=torch.zeros(d_in, d_in, dtype=dtype, device=device),
                   G=torch.zeros(d_out, d_out, dtype=dtype, device=device),
                   weight=torch.zeros((), dtype=dtype, device=device))

    def reset_(self) -> None:
        """Zero the factors and counters in place (the tensors are kept)."""
        self.A.zero_()
        self.G.zero_()
        self.weight.zero_()
        self.steps = self.rows_a = self.rows_g = 0


def _as_weight(w: Weight, like: Tensor) -> Weight:
    if isinstance(w, Tensor):
        if w.numel() != 1:
            raise ValueError(f"`weight` must be a number or a one-element tensor; got shape {tuple(w.shape)}.")
        return w.reshape(()).to(dtype=like.dtype, device=like.device)
    return float(w)


def _rows(x: Tensor, d: int, name: str, ref: str) -> Tensor:
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"`{name}` must have shape (N, {d}) to match {ref}; got {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` has no rows; pass at least one location.")
    return x


def _add_gram_(out: Tensor, x: Tensor, scale: Weight) -> None:
    """Add scale · xᵀx to `out` in place."""
    x = x.to(dtype=out.dtype, device=out.device)
    if isinstance(scale, Tensor):
        out.add_(torch.mm(x.mT, x).mul_(scale))
    else:
        out.addmm_(x.mT, x, alpha=scale)


def accumulate_(factors: KronFactors, a_bar: Tensor, g: Tensor, weight: Weight = 1.0) -> KronFactors:
    """Fold one evaluation into the factors in place ("expand" mode).

    ``A += weight · āᵀā / N_a`` and ``G += weight · gᵀg / N_g`` with N the number of rows
    (batch × locations), i.e. a per-location mean weighted by the quadrature weight
    ``w(t)`` (``dt`` for a left Riemann sum over accepted steps). Memory: nothing is kept
    but the factors; cost O(N (d_in² + d_out²)).

    Args:
        factors: Factors to update (their dtype and device win: inputs are cast to them).
        a_bar: Layer inputs ā, (N_a, d_in), from `layer_inputs`.
        g: Output cotangents, (N_g, d_out), from `layer_output_grads`.
        weight: Quadrature weight w ≥ 0: a number or a one-element tensor.

    Returns:
        `factors`, updated.

    Raises:
        ValueError: If shapes do not match the factors or a numeric weight is negative.
    """
    d_in, d_out = factors.A.shape[0], factors.G.shape[0]
    _rows(a_bar, d_in, "a_bar", f"A of size {d_in}")
    _rows(g, d_out, "g", f"G of size {d_out}")
    w = _as_weight(weight, factors.A)
    if not isinstance(w, Tensor) and not w >= 0.0:
        raise ValueError(f"`weight` must be a non-negative quadrature weight; got {weight!r}.")
    _add_gram_(factors.A, a_bar, w / a_bar.shape[0])
    _add_gram_(factors.G, g, w / g.shape[0])
    factors.weight.add_(w)
    factors.steps += 1
    factors.rows_a += a_bar.shape[0]
    factors.rows_g += g.shape[0]
    return factors


def time_average(factors: KronFactors) -> KronFactors:
    """The factors divided by their total quadrature weight (time integrals → time averages).

    Args:
        factors: Accumulated factors with a positive total weight.

    Returns:
        New factors ``A / weight``, ``G / weight`` with the same counters.

    Raises:
        ValueError: If nothing with positive weight has been accumulated.
    """
    if not bool(factors.weight > 0):
        raise ValueError("`factors` have zero total weight; accumulate some evaluations first.")
    return KronFactors(A=factors.A / factors.weight, G=factors.G / factors.weight, weight=factors.weight.clone(),
                       steps=factors.steps, rows_a=factors.rows_a, rows_g=factors.rows_g)


def blend_factors(new: KronFactors, previous: tuple[Tensor, Tensor] | None, decay: float) -> KronFactors:
    """A running average over refreshes: ``A ← decay·A_prev + (1 − decay)·A_new`` (and G).

    KFAC keeps such a running average (Martens & Grosse 2015 §5); without one, a refresh that
    collects on a batch the model already fits (loss ≈ 0, so G ≈ 0) replaces the curvature by
    almost nothing, and the next preconditioned steps are 1/eps times the gradient.

    Args:
        new: The factors just collected.
        previous: The last average ``(A, G)``, or None (the first refresh: `new` as it is).
        decay: Weight of the previous average, in [0, 1); 0 returns copies of `new`'s A and G.

    Returns:
        New factors with the averaged A and G and `new`'s weight and counters (nothing aliased
        with `previous`).
    """
    if previous is None or decay == 0.0 or previous[0].shape != new.A.shape or previous[1].shape != new.G.shape:
        return KronFactors(A=new.A.clone(), G=new.G.clone(), weight=new.weight, steps=new.steps, rows_a=new.rows_a,
                           rows_g=new.rows_g)  # a collector zeroes its factors in place after a refresh
    return KronFactors(A=torch.lerp(new.A, previous[0].to(new.A), decay),
                       G=torch.lerp(new.G, previous[1].to(new.G), decay),
                       weight=new.weight, steps=new.steps, rows_a=new.rows_a, rows_g=new.rows_g)


def kron_block(factors: KronFactors, *, order: VecOrder | str = VecOrder.ROW) -> Tensor:
    """The dense (d_out·d_in)² matrix A ⊗ G in the vec order of the (d_out, d_in) [W, b] gradient matrix.

    Meant for tests and approximation reports (memory O(d_in² d_out²)). With ``VecOrder.ROW``
    (default; torch's ``X.reshape(-1)``) it is ``torch.kron(G, A)``; with ``VecOrder.COLUMN``
    (``X.T.reshape(-1)``, the maths vec) it is ``torch.kron(A, G)``. Either way, for one
    datum at one location it equals vec(g āᵀ) vec(g āᵀ)ᵀ in that order.

    Args:
        factors: The factors.
        order: Vec order of the (d_out, d_in) matrices the block acts on.

    Returns:
        The dense Kronecker product, shape (d_out·d_in, d_out·d_in).
    """
    if VecOrder(order) is VecOrder.ROW:
        return torch.kron(factors.G, factors.A)
    return torch.kron(factors.A, factors.G)


@final
class ReduceAccumulator:
    """Kronecker factors in "reduce" mode: per sample, ā averaged and g integrated over time.

    Keeps the running sums Σ_t w_t ā_{n,t} and Σ_t w_t g_{n,t} of shape (B, L, d) (B batch
    elements, L locations per element, L = 1 for plain vectors): memory O(B L (d_in + d_out)),
    constant in the number of steps. `finalize` then forms

        A = mean_{n,l}[ā_{n,l} ā_{n,l}ᵀ],   G = mean_{n,l}[ĝ_{n,l} ĝ_{n,l}ᵀ]

    with ā time-averaged and ĝ time-integrated (see the module docstring). Locations are thus
    kept as data points ("expand" over space, "reduce" over time); to reduce over locations
    too, pass ā averaged and g summed over them as (B, d) tensors.

    Example:
        Inside a collector, for a batch of B samples::

            acc = ReduceAccumulator(d_in, d_out, dtype=torch.float64)
            # at every accepted backward step (t, dt), with ā and g from `layer_inputs` / `layer_output_grads`:
            acc.add_(a_bar.reshape(B, -1, d_in), g.reshape(B, -1, d_out), dt)
            # after the solve:
            factors = acc.finalize()
    """

    def __init__(self, d_in: int, d_out: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """Create an empty accumulator.

        Args:
            d_in: Size of A (input features, +1 with a bias).
            d_out: Size of G.
            dtype: Floating dtype of the running sums and factors.
            device: Their device.

        Raises:
            ValueError: If a size is not positive.
        """
        if d_in < 1 or d_out < 1:
            raise ValueError(f"`d_in` and `d_out` must be positive; got d_in={d_in}, d_out={d_out}.")
        self.d_in, self.d_out = d_in, d_out
        self.weight = torch.zeros((), dtype=dtype, device=device)
        self.steps = 0
        self._sum_a: Tensor | None = None
        self._sum_g: Tensor | None = None

    def add_(self, a_bar_per_sample: Tensor, g_per_sample: Tensor, weight: Weight = 1.0) -> None:
        """Fold one evaluation: running sums += weight · ā and += weight · g, per sample.

        The first call fixes the shapes (B, L, ·); later calls until `reset_` must match them.

        Args:
            a_bar_per_sample: ā of shape (B, L, d_in) or (B, d_in).
            g_per_sample: g of shape (B, L, d_out) or (B, d_out), rows in the order of ā.
            weight: Quadrature weight w ≥ 0 (``dt``): a number or a one-element tensor.

        Raises:
            ValueError: On shapes that do not match the factors or earlier calls, or a negative weight.
        """
        a = a_bar_per_sample if a_bar_per_sample.ndim == 3 else a_bar_per_sample.unsqueeze(1)
        g = g_per_sample if g_per_sample.ndim == 3 else g_per_sample.unsqueeze(1)
        if a.ndim != 3 or a.shape[2] != self.d_in or g.ndim != 3 or g.shape[2] != self.d_out \
                or a.shape[:2] != g.shape[:2] or a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"`a_bar_per_sample` and `g_per_sample` must have shapes (B, L, {self.d_in}) and "
                             f"(B, L, {self.d_out}) (or (B, {self.d_in}) and (B, {self.d_out})) with B, L >= 1; "
                             f"got {tuple(a_bar_per_sample.shape)} and {tuple(g_per_sample.shape)}.")
        w = _as_weight(weight, self.weight)
        if not isinstance(w, Tensor) and not w >= 0.0:
            raise ValueError(f"`weight` must be a non-negative quadrature weight; got {weight!r}.")
        if self._sum_a is None or self._sum_g is None:
            self._sum_a = torch.zeros(a.shape, dtype=self.weight.dtype, device=self.weight.device)
            self._sum_g = torch.zeros(g.shape, dtype=self.weight.dtype, device=self.weight.device)
        elif self._sum_a.shape != a.shape:
            raise ValueError(f"Shapes must stay fixed between resets: the running sums have shape (B, L) = "
                             f"{tuple(self._sum_a.shape[:2])}; got {tuple(a.shape[:2])}.")
        a = a.to(self._sum_a)
        g = g.to(self._sum_g)
        if isinstance(w, Tensor):
            self._sum_a.add_(a * w)
            self._sum_g.add_(g * w)
        else:
            self._sum_a.add_(a, alpha=w)
            self._sum_g.add_(g, alpha=w)
        self.weight.add_(w)
        self.steps += 1

    def finalize(self) -> KronFactors:
        """The factors A (time-averaged ā) and G (time-integrated g), as new tensors.

        Returns:
            `KronFactors` with ``weight`` = Σ w, ``steps`` = number of `add_` calls and
            ``rows_a = rows_g = B·L``.

        Raises:
            ValueError: If nothing with positive weight has been added.
        """
        if self._sum_a is None or self._sum_g is None or not bool(self.weight > 0):
            raise ValueError("Nothing with positive weight has been added; call add_() first.")
        a = (self._sum_a / self.weight).reshape(-1, self.d_in)
        g = self._sum_g.reshape(-1, self.d_out)
        n = a.shape[0]
        return KronFactors(A=torch.mm(a.mT, a).div_(n), G=torch.mm(g.mT, g).div_(n), weight=self.weight.clone(),
                           steps=self.steps, rows_a=n, rows_g=n)

    def reset_(self) -> None:
        """Forget everything added; the running sums are freed so that the next `add_` may change shapes."""
        self._sum_a = self._sum_g = None
        self.weight.zero_()
        self.steps = 0
