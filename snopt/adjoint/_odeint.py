"""`snopt.odeint`: the O(1)-memory first-order adjoint, a drop-in for `torchdiffeq.odeint_adjoint`."""

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from snopt._checks import ADAPTIVE_METHODS, check_method, check_state, check_time_grid, check_tolerance, params_of
from snopt._types import VectorField
from snopt.adjoint._field import Field
from snopt.adjoint._function import SolveConfig, _AdjointSolve
from snopt.adjoint._observer import AdjointObserver, SolveStats


class _TupleField(nn.Module):
    """Presents a vector field on a tuple of tensors as one on a flat vector."""

    def __init__(self, inner: VectorField, shapes: Sequence[torch.Size]) -> None:
        super().__init__()
        self.inner = inner
        self.shapes = list(shapes)
        self.sizes = [int(torch.Size(s).numel()) for s in shapes]

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        parts = torch.split(x, self.sizes, dim=-1)
        return tuple(p.reshape(*x.shape[:-1], *s) for p, s in zip(parts, self.shapes, strict=True))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out = self.inner(t, self.split(x))  # type: ignore[arg-type]
        if not isinstance(out, tuple) or len(out) != len(self.shapes):
            raise ValueError(f"`func` must return a tuple of {len(self.shapes)} tensors for a tuple state.")
        return torch.cat([o.reshape(-1) for o in out])


def odeint(func: VectorField, y0: Tensor | tuple[Tensor, ...], t: Tensor, *, rtol: float = 1e-7, atol: float = 1e-9,
           method: str | None = None, options: dict[str, Any] | None = None, adjoint_rtol: float | None = None,
           adjoint_atol: float | None = None, adjoint_method: str | None = None,
           adjoint_options: dict[str, Any] | None = None, adjoint_params: Sequence[Tensor] | None = None,
           adjoint_norm: Literal["mixed", "seminorm"] = "mixed", observer: AdjointObserver | None = None,
           stats: SolveStats | None = None) -> Any:
    """Solve dy/dt = func(t, y) and differentiate by the continuous adjoint, at O(1) memory.

    Same call and output as `torchdiffeq.odeint_adjoint`: returns y at every time in `t`,
    shaped ``(len(t), *y0.shape)`` (a tuple of such for a tuple `y0`). Only these outputs
    are kept for backward; the backward pass re-solves the state alongside the adjoint
    (x, a, g_θ) with a stock torchdiffeq solver, so memory does not grow with the number
    of solver steps. Gradients flow to `y0`, `t` (all output times) and the trainable
    parameters of `func`.

    Unlike torchdiffeq's adjoint it composes with `torch.func`: `grad` and `jvp` (a
    tangent-linear solve) work over it, and `vmap` runs one solve per batch member.

    Args:
        func: Vector field ``func(t, y) -> dy/dt``, an nn.Module unless `adjoint_params` is given.
        y0: Initial state at ``t[0]`` (a tensor or a tuple of tensors).
        t: Strictly monotone 1-D tensor of at least two output times.
        rtol: Relative tolerance of the forward solve.
        atol: Absolute tolerance of the forward solve.
        method: A torchdiffeq method (default ``"dopri5"``; ``"rk4"``, ``"euler"``, ``"bosh3"``, ...).
        options: torchdiffeq solver options (e.g. ``{"step_size": 0.01}`` for fixed-grid methods).
        adjoint_rtol: Relative tolerance of the backward solve (default `rtol`).
        adjoint_atol: Absolute tolerance of the backward solve (default `atol`).
        adjoint_method: Method of the backward solve (default `method`).
        adjoint_options: Options of the backward solve (default `options` without ``norm``).
        adjoint_params: Tensors to differentiate (default: `func.parameters()`); those
            without ``requires_grad`` are skipped.
        adjoint_norm: Error control of an adaptive backward solve: ``"mixed"`` (every
            component, as torchdiffeq) or ``"seminorm"`` (state and adjoint only; fewer steps,
            the parameter accumulators are pure quadratures).
        observer: Receives every accepted backward step (see `AdjointObserver`).
        stats: Receives forward/backward NFE counts.

    Returns:
        The solution at the times `t`.

    Raises:
        TypeError: For a non-tensor or non-floating `y0`/`t`, or `func` returning another dtype.
        ValueError: For non-monotone or too-short `t`, non-finite `y0`, an unknown method,
            bad tolerances, or `func` returning another shape.
        SolverError: When a solve fails; the message names the time.
    """
    method = check_method("method", method)
    adjoint_method = check_method("adjoint_method", adjoint_method if adjoint_method is not None else method)
    rtol_ = check_tolerance("rtol", rtol, 1e-7)
    atol_ = check_tolerance("atol", atol, 1e-9)
    t = check_time_grid(t)
    if adjoint_norm not in ("mixed", "seminorm"):
        raise ValueError(f"`adjoint_norm` must be 'mixed' or 'seminorm'; got {adjoint_norm!r}.")
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError("`adjoint_method` differs from `method` while `options` is given: pass `adjoint_options` too.")
    opts = dict(options) if options is not None else {}
    adj_opts = dict(adjoint_options) if adjoint_options is not None else {k: v for k, v in opts.items() if k != "norm"}

    params = params_of(func, adjoint_params)
    tuple_shapes: list[torch.Size] | None = None
    if isinstance(y0, tuple):
        for i, y in enumerate(y0):
            check_state(y, f"y0[{i}]")
        tuple_shapes = [y.shape for y in y0]
        flat_y0 = torch.cat([y.reshape(-1) for y in y0])
        wrapped: VectorField = _TupleField(func, tuple_shapes)
    else:
        flat_y0 = check_state(y0)
        wrapped = func
    for i, p in enumerate(params):
        if p.dtype != flat_y0.dtype:
            raise TypeError(f"Parameter {i} of `func` has dtype {p.dtype} but `y0` has {flat_y0.dtype}; "
                            "convert one of them (e.g. `func.to(y0.dtype)`).")
    if t.device != flat_y0.device:
        raise ValueError(f"`t` is on {t.device} but `y0` is on {flat_y0.device}; move them to one device.")

    cfg = SolveConfig(
        field=Field(wrapped, params), method=method, rtol=rtol_, atol=atol_, options=opts,
        adjoint_method=adjoint_method, adjoint_rtol=check_tolerance("adjoint_rtol", adjoint_rtol, rtol_),
        adjoint_atol=check_tolerance("adjoint_atol", adjoint_atol, atol_), adjoint_options=adj_opts,
        adjoint_norm=adjoint_norm, observer=observer, stats=stats,
        adaptive_backward=adjoint_method in ADAPTIVE_METHODS)
    ys: Tensor = _AdjointSolve.apply(flat_y0, t, cfg, *params)  # type: ignore[no-untyped-call]
    if tuple_shapes is None:
        return ys
    assert isinstance(wrapped, _TupleField)
    return wrapped.split(ys)
