"""`snopt.odeint`: the O(1)-memory first-order adjoint, a drop-in for `torchdiffeq.odeint_adjoint`."""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from snopt._checks import (
    NonFiniteStateError,
    check_method,
    check_state,
    check_time_grid,
    check_tolerance,
    method_kind,
    params_of,
    reports_steps,
)
from snopt._types import VectorField
from snopt.adjoint._field import Field
from snopt.adjoint._function import SolveConfig, _AdjointSolve
from snopt.adjoint._observer import AdjointObserver, SolveStats, StepGuard
from snopt.adjoint._solve import SolverError, rms


class _TupleField(nn.Module):
    """Presents a vector field on a tuple of tensors as one on a flat vector."""

    def __init__(self, inner: VectorField, shapes: Sequence[torch.Size]) -> None:
        super().__init__()
        self.inner = inner
        self.shapes = list(shapes)
        self.sizes = [int(torch.Size(s).numel()) for s in shapes]

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        parts = torch.split(x, self.sizes, dim=-1)
        return tuple(p.reshape((*x.shape[:-1], *s)) for p, s in zip(parts, self.shapes, strict=True))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out = self.inner(t, self.split(x))  # type: ignore[arg-type]
        if not isinstance(out, tuple) or len(out) != len(self.shapes):
            raise ValueError(f"`func` must return a tuple of {len(self.shapes)} tensors for a tuple state.")
        return torch.cat([o.reshape(-1) for o in out])


Norm = Callable[[Any], Any]


def _solver_options(opts: dict[str, Any], adj_opts: dict[str, Any], *, method: str, adjoint_method: str,
                    adjoint_norm: str, split: Callable[[Tensor], tuple[Tensor, ...]] | None,
                    ) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Give `options` and `adjoint_options` torchdiffeq's ``norm`` semantics on snopt's flat state.

    As in `torchdiffeq.odeint_adjoint`: a forward ``norm`` sees the state as the caller shaped it (a
    tuple for a tuple `y0`; by default the largest RMS norm of its parts); unless `adjoint_options`
    names a norm, the backward one is built from it, max(norm(y), norm(a), max_i rms(g_θi)), and
    ``"seminorm"`` drops the g_θ part. A callable ``adjoint_options["norm"]`` receives
    ``(t, y, a, *g_θ)`` (y and a split into their parts for a tuple state); snopt's backward state has
    no time component (dL/dt comes from the flow property), so its ``t`` is a zero.

    Returns:
        The forward options, the backward options, and the `adjoint_norm` left for the backward
        solve's built-in norm (used when the backward options name none).

    Raises:
        ValueError: For a norm that the method's solver cannot use (the scipy wrapper has its own error
            control), or for two conflicting backward norms.
    """
    user = opts.get("norm")
    state_norm: Norm | None = user
    if split is not None:
        parts_norm: Norm = user if user is not None else (lambda parts: torch.stack([rms(q) for q in parts]).max())

        def tuple_state_norm(x: Tensor) -> Any:
            assert split is not None
            return parts_norm(split(x))

        state_norm = tuple_state_norm
        if method_kind(method) == "adaptive":
            opts["norm"] = state_norm
    if user is not None and method_kind(method) == "scipy":
        raise ValueError(f"`options['norm']` cannot be used with method={method!r}: scipy's solve_ivp controls "
                         "the error of every component itself (set rtol/atol instead), or pick an adaptive "
                         "torchdiffeq method such as 'dopri5'.")
    adj_norm = adj_opts.pop("norm", None)
    if adj_norm is not None and not callable(adj_norm) and adj_norm != "seminorm":
        raise ValueError(f"`adjoint_options['norm']` must be 'seminorm' or a callable; got {adj_norm!r}.")
    if callable(adj_norm) and adjoint_norm == "seminorm":
        raise ValueError("`adjoint_norm='seminorm'` and a callable `adjoint_options['norm']` ask for two "
                         "different backward norms; pass one of them.")
    semi = adjoint_norm == "seminorm" or adj_norm == "seminorm"
    kind = method_kind(adjoint_method)
    if kind == "scipy" and (semi or adj_norm is not None):
        what = "`adjoint_norm='seminorm'`" if adjoint_norm == "seminorm" else "`adjoint_options['norm']`"
        raise ValueError(f"{what} cannot be used with adjoint_method={adjoint_method!r}: scipy's solve_ivp "
                         "controls the error of every component itself and takes no norm. Leave the norm out, "
                         "or solve backward with an adaptive torchdiffeq method (e.g. adjoint_method='dopri5', "
                         "with adjoint_options).")
    if kind == "adaptive" and callable(adj_norm):
        custom: Norm = adj_norm

        def wrapped_norm(s: tuple[Tensor, ...]) -> Any:
            ys, adj = (split(s[0]), split(s[1])) if split is not None else ((s[0],), (s[1],))
            return custom((s[0].new_zeros(()), *ys, *adj, *s[2:]))

        adj_opts["norm"] = wrapped_norm
    elif kind == "adaptive" and state_norm is not None:
        sn: Norm = state_norm

        def adjoint_state_norm(s: tuple[Tensor, ...]) -> Any:
            return max([sn(s[0]), sn(s[1]), *(() if semi else (rms(g) for g in s[2:]))])

        adj_opts["norm"] = adjoint_state_norm
    return opts, adj_opts, "seminorm" if semi else "mixed"


def _placeholder(y0: Tensor, t: Tensor) -> Tensor:
    """Finite zeros in the place of a solution that a `StepGuard` absorbed (never reaches a loss)."""
    return y0.detach().new_zeros((len(t), *y0.shape))


def odeint(func: VectorField, y0: Tensor | tuple[Tensor, ...], t: Tensor, *, rtol: float = 1e-7, atol: float = 1e-9,
           method: str | None = None, options: dict[str, Any] | None = None,
           event_fn: Callable[..., Any] | None = None, adjoint_rtol: float | None = None,
           adjoint_atol: float | None = None, adjoint_method: str | None = None,
           adjoint_options: dict[str, Any] | None = None, adjoint_params: Sequence[Tensor] | None = None,
           adjoint_norm: Literal["mixed", "seminorm"] = "mixed", observer: AdjointObserver | None = None,
           stats: SolveStats | None = None, guard: StepGuard | None = None) -> Any:
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
        method: Any method of the installed torchdiffeq, read from its solver registry (default
            ``"dopri5"``; adaptive ``"dopri8"``, ``"bosh3"``, ``"adaptive_heun"``, ...; fixed-grid
            ``"rk4"``, ``"euler"``, ``"heun2"``, ``"implicit_adams"``, ...; ``"scipy_solver"``).
            ``"scipy_solver"`` makes no step callbacks and takes no ``norm``, so it cannot serve as
            the backward method with an `observer`, ``adjoint_norm="seminorm"`` or a backward norm.
        options: torchdiffeq solver options (e.g. ``{"step_size": 0.01}`` for fixed-grid methods,
            ``{"solver": "RK45"}`` for ``"scipy_solver"``); a ``norm`` sees the state shaped as `y0`.
        event_fn: Not supported (torchdiffeq's event handling): passing one raises NotImplementedError.
        adjoint_rtol: Relative tolerance of the backward solve (default `rtol`).
        adjoint_atol: Absolute tolerance of the backward solve (default `atol`).
        adjoint_method: Method of the backward solve (default `method`).
        adjoint_options: Options of the backward solve (default `options` without ``norm``). As in
            torchdiffeq, ``"norm"`` may be ``"seminorm"`` or a callable of ``(t, y, a, *g_θ)`` (t is
            always 0 here); without one, the backward norm is built from the forward ``norm``.
        adjoint_params: Tensors to differentiate (default: `func.parameters()`); those
            without ``requires_grad`` are skipped.
        adjoint_norm: Error control of an adaptive backward solve: ``"mixed"`` (every
            component, as torchdiffeq) or ``"seminorm"`` (state and adjoint only; fewer steps,
            the parameter accumulators are pure quadratures).
        observer: Receives every accepted backward step (see `AdjointObserver`).
        stats: Receives forward/backward NFE counts.
        guard: Decides whether a failed solve is absorbed instead of raised (see `StepGuard`;
            set by `snopt.SNOpt` on its model's `ODEBlock`s to undo a step that broke a solve).

    Returns:
        The solution at the times `t`.

    Raises:
        TypeError: For a non-tensor or non-floating `y0`/`t`, or `func` returning another dtype.
        NonFiniteStateError: (a ValueError) For a non-finite `y0`, unless a `guard` absorbs it (a
            pending `SNOpt` step broke the layers before the block: the step is undone).
        ValueError: For non-monotone or too-short `t`, an unknown method,
            bad tolerances, `func` returning another shape, or a feature the method cannot serve
            (an `observer` or a norm with a ``"scipy_solver"`` backward solve).
        NotImplementedError: For an `event_fn`.
        SolverError: When a solve fails (and no `guard` absorbs it); the message names the time.
    """
    method = check_method("method", method)
    adjoint_method = check_method("adjoint_method", adjoint_method if adjoint_method is not None else method)
    rtol_ = check_tolerance("rtol", rtol, 1e-7)
    atol_ = check_tolerance("atol", atol, 1e-9)
    t = check_time_grid(t)
    if adjoint_norm not in ("mixed", "seminorm"):
        raise ValueError(f"`adjoint_norm` must be 'mixed' or 'seminorm'; got {adjoint_norm!r}.")
    if event_fn is not None:
        raise NotImplementedError(
            "snopt.odeint does not support `event_fn` (a solve that ends at an event): its adjoint differentiates "
            "solves between fixed times. Use torchdiffeq.odeint_adjoint(..., event_fn=...) for event handling, or "
            "solve to a fixed end time.")
    if observer is not None and not reports_steps(adjoint_method):
        raise ValueError(
            f"`observer` needs the backward solver to report its accepted steps, which adjoint_method="
            f"{adjoint_method!r} never does (it makes no step callbacks). Solve backward with a torchdiffeq "
            "method instead (e.g. adjoint_method='dopri5' or 'rk4', with adjoint_options), or leave `observer` out.")
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError("`adjoint_method` differs from `method` while `options` is given: pass `adjoint_options` too.")
    opts = dict(options) if options is not None else {}
    adj_opts = dict(adjoint_options) if adjoint_options is not None else {k: v for k, v in opts.items() if k != "norm"}

    params = params_of(func, adjoint_params)
    tuple_shapes: list[torch.Size] | None = None
    nonfinite: NonFiniteStateError | None = None  # absorbed below like a failed solve if a pending step caused it
    try:
        if isinstance(y0, tuple):
            for i, y in enumerate(y0):
                check_state(y, f"y0[{i}]")
        else:
            check_state(y0)
    except NonFiniteStateError as err:
        nonfinite = err
    if isinstance(y0, tuple):
        tuple_shapes = [y.shape for y in y0]
        flat_y0 = torch.cat([y.reshape(-1) for y in y0])
        wrapped: VectorField = _TupleField(func, tuple_shapes)
    else:
        flat_y0 = y0
        wrapped = func
    for i, p in enumerate(params):
        if p.dtype != flat_y0.dtype:
            raise TypeError(f"Parameter {i} of `func` has dtype {p.dtype} but `y0` has {flat_y0.dtype}; "
                            "convert one of them (e.g. `func.to(y0.dtype)`).")
    if t.device != flat_y0.device:
        raise ValueError(f"`t` is on {t.device} but `y0` is on {flat_y0.device}; move them to one device.")

    split = wrapped.split if tuple_shapes is not None and isinstance(wrapped, _TupleField) else None
    opts, adj_opts, adjoint_norm_ = _solver_options(opts, adj_opts, method=method, adjoint_method=adjoint_method,
                                                    adjoint_norm=adjoint_norm, split=split)
    cfg = SolveConfig(
        field=Field(wrapped, params), method=method, rtol=rtol_, atol=atol_, options=opts,
        adjoint_method=adjoint_method, adjoint_rtol=check_tolerance("adjoint_rtol", adjoint_rtol, rtol_),
        adjoint_atol=check_tolerance("adjoint_atol", adjoint_atol, atol_), adjoint_options=adj_opts,
        adjoint_norm=adjoint_norm_, observer=observer, stats=stats,
        adaptive_backward=method_kind(adjoint_method) == "adaptive", guard=guard)
    if nonfinite is not None and (guard is None or not guard.forward_failed(SolverError(str(nonfinite)))):
        raise nonfinite
    if guard is not None and guard.tripped:
        ys = _placeholder(flat_y0, t)  # this forward pass is rerun once the step that broke it is undone
    else:
        try:
            ys = _AdjointSolve.apply(flat_y0, t, cfg, *params)  # type: ignore[no-untyped-call]
        except SolverError as err:
            if guard is None or not guard.forward_failed(err):
                raise
            ys = _placeholder(flat_y0, t)
    if tuple_shapes is None:
        return ys
    assert isinstance(wrapped, _TupleField)
    return wrapped.split(ys)
