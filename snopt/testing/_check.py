"""Does snopt give *your* vector field exact curvature? A convergence check against `GridReference`.

snopt differentiates first and then discretises the adjoint ODEs; `GridReference` differentiates
the discretisation itself (torch.func through the same fixed grid). On a grid of step h the two
differ by the method's truncation error, C·h^p (p = 4 for rk4), so no fixed tolerance separates
"correct" from "wrong" for every field. What does separate them is convergence: halving h must
shrink the gap by ≈ 2^p, while a wrong or missing term (an unsupported layer, a loss whose second
derivative is lost) leaves an error that does not shrink. `SnoptCheck` measures each block at h
and h/2 and passes a block when, on the finer grid, it is within `rtol` and either it shrank by at
least ½·2^p or it already sits at round-off (1e3·eps of the dtype).

Used directly or as the ``snopt_check`` fixture of snopt's pytest plugin.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import final

import torch
from torch import Tensor, nn

from snopt.adjoint import SecondOrderResult, ggn_vp, hvp, second_order
from snopt.testing._compare import SECOND_ORDER_BLOCKS, rel_err
from snopt.testing._references import check_grid_method
from snopt.testing._second_order import GridReference

LossFn = Callable[[Tensor], Tensor]
ORDER = {"euler": 1, "midpoint": 2, "rk4": 4}
"""Convergence order of snopt's adjoint against the discrete reference, per fixed-grid method."""
ROUNDOFF = 1e3
"""A block whose relative error on the finer grid is at most this × eps(dtype) counts as converged."""


@dataclass(frozen=True)
class BlockConvergence:
    """One block's relative errors on the two grids and whether it passed."""

    name: str
    coarse: float
    fine: float
    floor: float
    rtol: float
    min_ratio: float

    @property
    def ratio(self) -> float:
        """How much the error shrank when h was halved (inf when it vanished)."""
        return self.coarse / self.fine if self.fine > 0 else math.inf

    @property
    def ok(self) -> bool:
        """Within rtol on the finer grid, and converging at the method's order (or at round-off)."""
        return self.fine <= self.rtol and (self.fine <= self.floor or self.ratio >= self.min_ratio)

    def line(self) -> str:
        """A report line: ``hess_params: 3.1e-09 → 2.0e-10 (×15.5) ok``."""
        verdict = "ok" if self.ok else (
            f"FAILS: above rtol {self.rtol:.0e}" if self.fine > self.rtol
            else f"FAILS: shrank ×{self.ratio:.2f} < ×{self.min_ratio:g} (the method's order)")
        ratio = "round-off" if self.fine <= self.floor else f"×{self.ratio:.1f}"
        return f"{self.name}: {self.coarse:.2e} → {self.fine:.2e} ({ratio}) {verdict}"


@dataclass(frozen=True)
class ConvergenceReport:
    """The result of a `SnoptCheck` comparison: each block at step h and h/2."""

    what: str
    method: str
    step_size: float
    blocks: tuple[BlockConvergence, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """Every block passed."""
        return all(b.ok for b in self.blocks)

    @property
    def failed(self) -> list[str]:
        """The names of the blocks that did not pass."""
        return [b.name for b in self.blocks if not b.ok]

    def __str__(self) -> str:
        head = (f"{self.what} vs GridReference ({self.method}, relative error at h = {self.step_size:g} → "
                f"h/2): {len(self.failed)} of {len(self.blocks)} blocks fail")
        return "\n".join([head, *("  " + b.line() for b in self.blocks)])

    def raise_if_failed(self) -> "ConvergenceReport":
        """Raise AssertionError with the report if any block failed; else return self.

        Raises:
            AssertionError: If a block is above rtol or does not converge at the method's order.
        """
        if not self.ok:
            raise AssertionError(str(self))
        return self


def _span(t_span: Tensor, step_size: float) -> int:
    if t_span.shape != (2,):
        raise ValueError(f"`t_span` must hold two times (t0, t1); got shape {tuple(t_span.shape)}.")
    span = abs(float(t_span[1] - t_span[0]))
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"`step_size` must be positive and finite; got {step_size}.")
    steps = span / step_size
    if span == 0 or not steps.is_integer() or steps * step_size != span:
        raise ValueError(f"`step_size` {step_size!r} must divide the span |t1 − t0| = {span!r} exactly in floating "
                         "point (torchdiffeq's grid and the reference's must be the same); a power of two such as "
                         "1/32 with a dyadic span does.")
    return int(steps)


@final
class SnoptCheck:
    """Checks that snopt's second-order adjoints are exact for a given vector field and loss.

    Each method solves with snopt on a fixed grid of step h and of step h/2, compares with
    `GridReference` on the same grids and returns a `ConvergenceReport` (raising AssertionError
    with it unless ``raise_on_failure=False``). Costs two dense reference Hessians of size
    (n + p + 1)²: for small instances of your model (a few hundred parameters, a batch of 2).

    Args:
        rtol: Largest relative error allowed on the finer grid. The order test is the sharp one: an
            error that does not converge can be at most about the finer grid's error, and a dropped
            adjoint term gives 1e-1–1. The default 1e-4 leaves room for rk4's truncation at h/2 =
            1/32 (measured up to 2.7e-5 on ∂L/∂t1 of a conv field, 4e-6 on an affine one).
        raise_on_failure: Raise AssertionError on a failed block (default) or only return the report.

    Example:
        >>> import torch
        >>> from snopt.testing import MLPField, SnoptCheck
        >>> field = MLPField(2, 3, "tanh", True, torch.float64)  # or your own ``forward(t, x)`` module
        >>> x0, t_span = torch.randn(2, dtype=torch.float64), torch.tensor([0.0, 0.5], dtype=torch.float64)
        >>> report = SnoptCheck().second_order(field, x0, t_span, lambda x: (x ** 2).sum(), step_size=1 / 16)
        >>> report.ok
        True
    """

    def __init__(self, *, rtol: float = 1e-4, raise_on_failure: bool = True) -> None:
        if not (rtol > 0 and math.isfinite(rtol)):
            raise ValueError(f"`rtol` must be positive and finite; got {rtol}.")
        self.rtol = rtol
        self.raise_on_failure = raise_on_failure

    def _report(self, what: str, method: str, step_size: float, x0: Tensor,
                pairs: Callable[[int], Mapping[str, tuple[Tensor, Tensor]]]) -> ConvergenceReport:
        # pairs(k): (snopt, reference) per block on the grid of step step_size / k
        order = ORDER[method]
        coarse, fine = pairs(1), pairs(2)
        floor = ROUNDOFF * torch.finfo(x0.dtype).eps
        blocks = tuple(BlockConvergence(k, rel_err(*coarse[k]), rel_err(*fine[k]), floor, max(self.rtol, floor),
                                        0.5 * 2.0 ** order) for k in fine)
        report = ConvergenceReport(what, method, step_size, blocks)
        return report.raise_if_failed() if self.raise_on_failure else report

    def second_order(self, func: nn.Module, x0: Tensor, t_span: Tensor, loss_fn: LossFn, *, step_size: float,
                     method: str = "rk4", gauss_newton: bool = False, wrt_t1: bool = False) -> ConvergenceReport:
        """`snopt.second_order` against the exact Hessian of the grid, every block.

        Args:
            func: Your vector field ``func(t, x)`` (an nn.Module; θ = its parameters with requires_grad).
            x0: Initial state (small: the reference is dense in n = x0.numel()).
            t_span: (t0, t1).
            loss_fn: Φ, x(t1) ↦ scalar.
            step_size: The coarser grid's step h; must divide |t1 − t0| exactly (e.g. 1/32).
            method: A fixed-grid method: ``"rk4"`` (default), ``"midpoint"`` or ``"euler"``.
            gauss_newton: Check the Gauss-Newton blocks instead of the full Hessian.
            wrt_t1: Also check ∂L/∂t1, ∂²L/∂t1² and ∂²L/∂t1∂θ.

        Returns:
            The `ConvergenceReport` (blocks in `SECOND_ORDER_BLOCKS` order).

        Raises:
            AssertionError: If a block fails (unless ``raise_on_failure=False``).
            ValueError: For a method without a reference or a step that does not divide the span.
        """
        check_grid_method(method)
        steps = _span(t_span, step_size)

        def pairs(k: int) -> dict[str, tuple[Tensor, Tensor]]:
            got = second_order(func, x0, t_span, loss_fn, method=method, options={"step_size": step_size / k},
                               gauss_newton=gauss_newton, wrt_t1=wrt_t1)
            ref = GridReference(func, x0, t_span, loss_fn, method=method, steps=steps * k)
            return _block_pairs(got, ref.second_order(gauss_newton=gauss_newton, wrt_t1=wrt_t1))

        return self._report("snopt.second_order", method, step_size, x0, pairs)

    def products(self, func: nn.Module, x0: Tensor, t_span: Tensor, loss_fn: LossFn, v: Tensor | None = None, *,
                 step_size: float, method: str = "rk4") -> ConvergenceReport:
        """`snopt.hvp` and `snopt.ggn_vp` (the matrix-free products) against the grid's exact products.

        Args:
            func: Your vector field (as for `second_order`).
            x0: Initial state.
            t_span: (t0, t1).
            loss_fn: Φ.
            v: Direction in parameter space, (p,) in `parameters()` order; default a seeded normal draw.
            step_size: The coarser grid's step h (divides the span exactly).
            method: A fixed-grid method.

        Returns:
            The `ConvergenceReport` with blocks ``hvp`` and ``ggn_vp``.

        Raises:
            AssertionError: If a product fails (unless ``raise_on_failure=False``).
            ValueError: For a bad method or step, or a `v` of the wrong shape.
        """
        check_grid_method(method)
        steps = _span(t_span, step_size)
        p = sum(q.numel() for q in func.parameters() if q.requires_grad)
        if v is None:
            v = torch.randn(p, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x0)
        if v.shape != (p,):
            raise ValueError(f"`v` must have shape ({p},) (the trainable parameters, flattened); got {tuple(v.shape)}.")

        def pairs(k: int) -> dict[str, tuple[Tensor, Tensor]]:
            ref = GridReference(func, x0, t_span, loss_fn, method=method, steps=steps * k)
            grid = {"step_size": step_size / k}
            return {"hvp": (hvp(func, x0, t_span, loss_fn, v, method=method, options=grid), ref.hvp(v)),
                    "ggn_vp": (ggn_vp(func, x0, t_span, loss_fn, v, method=method, options=grid), ref.ggn_vp(v))}

        return self._report("snopt.hvp / snopt.ggn_vp", method, step_size, x0, pairs)


def _block_pairs(got: SecondOrderResult, ref: SecondOrderResult) -> dict[str, tuple[Tensor, Tensor]]:
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for k in SECOND_ORDER_BLOCKS:
        a, b = getattr(got, k), getattr(ref, k)
        if a is not None and b is not None and a.numel() > 0:
            out[k] = (a, b)
    return out
