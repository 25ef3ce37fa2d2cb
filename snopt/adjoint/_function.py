"""The first-order adjoint as a composable `torch.autograd.Function`.

Forward: a plain torchdiffeq solve under no-grad; only the outputs at the requested
times are kept. Backward: the augmented system (x, a, g_θ) of DESIGN.md §2 is
integrated from each output time to the previous one with x re-solved backward, so
memory is independent of the number of solver steps. The Function defines
`setup_context`, a forward-mode rule (`jvp`, the tangent-linear system) and a `vmap`
rule (one solve per batch member), so `torch.func.grad`, `jvp` and `vmap` work over it.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from snopt._checks import check_finite
from snopt.adjoint._field import Field
from snopt.adjoint._observer import AdjointObserver, SolveStats, StepGuard
from snopt.adjoint._solve import SolverError, rms, solve


@dataclass(frozen=True)
class SolveConfig:
    """Everything about one `odeint` call that is not a tensor."""

    field: Field
    method: str
    rtol: float
    atol: float
    options: dict[str, Any]
    adjoint_method: str
    adjoint_rtol: float
    adjoint_atol: float
    adjoint_options: dict[str, Any]
    adjoint_norm: str = "mixed"
    observer: AdjointObserver | None = None
    stats: SolveStats | None = None
    adaptive_backward: bool = True
    guard: StepGuard | None = None


def _seminorm(state: tuple[Tensor, ...]) -> Tensor:
    # Error control on the primal components (x, a) only: the parameter accumulators
    # are pure quadratures that never feed back into the dynamics.
    return torch.maximum(rms(state[0]), rms(state[1]))


def _mixed_norm(state: tuple[Tensor, ...]) -> Tensor:
    return torch.stack([rms(s) for s in state]).max()


class _BackwardDynamics:
    """(x, a, g_θ) ↦ (F, −aᵀF_x, −aᵀF_θ); reports accepted steps to an observer.

    The observer is called when the latest evaluation of these dynamics lies at a point of
    an accepted step: for fixed-grid methods right after the first stage of each step (its
    start, exactly); for adaptive methods on acceptance, when the latest evaluation is the
    step's last stage (its end, exactly, for the FSAL methods dopri5 and bosh3).
    """

    def __init__(self, cfg: SolveConfig, params: tuple[Tensor, ...]) -> None:
        self.field = cfg.field
        self.params = params
        self.observer = cfg.observer
        self.pending: Tensor | None = None
        self.direction = -1.0  # sign of the backward solve's time direction (set per interval)
        if self.observer is not None:
            if cfg.adaptive_backward:
                self.callback_accept_step = self._on_accept
            else:
                self.callback_step = self._on_step_start

    def _on_accept(self, t: Tensor, state: tuple[Tensor, ...], dt: Tensor) -> None:
        assert self.observer is not None
        # The latest evaluation is the step's last stage, at its end.
        self.observer.on_backward_step(t + self.direction * dt, dt)

    def _on_step_start(self, t: Tensor, state: tuple[Tensor, ...], dt: Tensor) -> None:
        self.pending = dt

    def __call__(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x, a = state[0], state[1]
        f, gx, gp, _ = self.field.vjp(t, x, a, self.params)
        if self.pending is not None and self.observer is not None:
            dt, self.pending = self.pending, None
            self.observer.on_backward_step(t, dt)
        return (f, -gx, *(-g for g in gp))


class _AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(y0: Tensor, t: Tensor, cfg: SolveConfig, *params: Tensor) -> Tensor:
        check_finite(y0, "y0")
        field = cfg.field
        before = field.nfe
        with torch.no_grad():
            ys: Tensor = solve(field.bind(params), y0, t, method=cfg.method, rtol=cfg.rtol, atol=cfg.atol,
                               options=cfg.options, where="forward", clock=lambda: field.last_t)
        if cfg.stats is not None:
            cfg.stats.nfe_forward += field.nfe - before
        return ys

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        y0, t, cfg, *params = inputs
        ctx.cfg = cfg
        ctx.save_for_backward(t, output, *params)
        ctx.save_for_forward(y0, t, output, *params)

    @staticmethod
    def backward(ctx: Any, grad_ys: Tensor) -> tuple[Tensor | None, ...]:
        cfg: SolveConfig = ctx.cfg
        t, ys, *params = ctx.saved_tensors
        need_t = bool(ctx.needs_input_grad[1])
        # The solve runs inside another Function's forward: torch.func transforms peel off there,
        # so torchdiffeq's (non-transformable) solvers never see wrapped tensors.
        a, t_grad, *gp = _AdjointBackward.apply(t, ys, grad_ys, cfg, need_t, *params)  # type: ignore[no-untyped-call]
        return (a, t_grad if need_t else None, None, *gp)

    @staticmethod
    def jvp(ctx: Any, y0_dot: Tensor | None, t_dot: Tensor | None, _cfg_dot: Any,
            *p_dots: Tensor | None) -> Tensor:
        cfg: SolveConfig = ctx.cfg
        y0, t, ys, *plist = ctx.saved_tensors
        params = tuple(plist)
        pd = tuple(torch.zeros_like(p) if d is None else d for p, d in zip(params, p_dots, strict=True))
        y0d = torch.zeros_like(y0) if y0_dot is None else y0_dot
        td = torch.zeros_like(t) if t_dot is None else t_dot
        out: Tensor = _TangentSolve.apply(cfg, y0, t, ys, y0d, td, *params, *pd)  # type: ignore[no-untyped-call]
        return out

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], y0: Tensor, t: Tensor, cfg: SolveConfig,
             *params: Tensor) -> tuple[Tensor, int]:
        # Adaptive solvers choose their steps per problem, so a batch of problems is a loop of solves.
        outs = []
        for b in range(info.batch_size):
            all_args: tuple[Any, ...] = (y0, t, cfg, *params)
            args = [x if d is None else x.select(d, b) for x, d in zip(all_args, in_dims, strict=True)]
            outs.append(_AdjointSolve.apply(*args))  # type: ignore[no-untyped-call]
        return torch.stack(outs, 0), 0


class _AdjointBackward(torch.autograd.Function):
    """The backward solve of `_AdjointSolve` as a Function of its own (first order only)."""

    @staticmethod
    def forward(t: Tensor, ys: Tensor, grad_ys: Tensor, cfg: SolveConfig, need_t: bool,
                *params: Tensor) -> tuple[Tensor, ...]:
        try:
            return adjoint_backward(cfg, t, ys, grad_ys, tuple(params), need_t=need_t)
        except SolverError as err:
            if cfg.guard is None or not cfg.guard.backward_failed(err):
                raise
            # Absorbed: the optimizer that made the step behind this solve sees NaN gradients and undoes it.
            nan = float("nan")
            return (torch.full_like(ys[0], nan), torch.full_like(t, nan), *(torch.full_like(p, nan) for p in params))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        raise NotImplementedError(
            "Differentiating snopt.odeint twice through its backward pass is not supported (the backward is a "
            "first-order adjoint solve). For second derivatives use snopt.hvp, snopt.ggn_vp or "
            "snopt.second_order, which integrate the second-order adjoint equations.")

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        outs = []
        for b in range(info.batch_size):
            sliced = [x if d is None else x.select(d, b) for x, d in zip(args, in_dims, strict=True)]
            outs.append(_AdjointBackward.apply(*sliced))  # type: ignore[no-untyped-call]
        stacked = tuple(torch.stack(o, 0) for o in zip(*outs, strict=True))
        return stacked, (0,) * len(stacked)


def adjoint_backward(cfg: SolveConfig, t: Tensor, ys: Tensor, grad_ys: Tensor, params: tuple[Tensor, ...], *,
                     need_t: bool) -> tuple[Tensor, ...]:
    """Integrate (x, a, g_θ) backward through every output time; return (dL/dy0, dL/dt, *dL/dθ).

    dL/dt is zeros when `need_t` is false.
    """
    field = cfg.field
    before = field.nfe
    dyn = _BackwardDynamics(cfg, params)
    opts = dict(cfg.adjoint_options)
    user_step_t = opts.get("step_t")
    if cfg.adaptive_backward and "norm" not in opts:
        opts["norm"] = _seminorm if cfg.adjoint_norm == "seminorm" else _mixed_norm
    with torch.no_grad():
        a = grad_ys[-1].clone()
        a_later = a
        gp = tuple(torch.zeros_like(p) for p in params)
        t_grad = torch.zeros_like(t)
        for i in range(len(t) - 1, 0, -1):
            if need_t:
                # Moving an output time t_i moves y(t_i) along F; later outputs do not depend on t_i.
                t_grad[i] = (field(t[i], ys[i], params) * grad_ys[i]).sum()
            dyn.direction = 1.0 if bool(t[i - 1] > t[i]) else -1.0
            if cfg.observer is not None and cfg.adaptive_backward:
                # Make the last step end exactly at t_{i-1} (no overshoot and interpolation), so that
                # every reported step lies inside the interval and the step lengths sum to it; keep
                # any step times the caller asked for inside the interval (e.g. a sampling grid).
                lo, hi = torch.minimum(t[i - 1], t[i]), torch.maximum(t[i - 1], t[i])
                extra = user_step_t[(user_step_t > lo) & (user_step_t < hi)] if user_step_t is not None else t[:0]
                opts["step_t"] = torch.unique(torch.cat([extra.to(t), t[i - 1:i]]))
            sol = solve(dyn, (ys[i], a, *gp), torch.stack([t[i], t[i - 1]]), method=cfg.adjoint_method,
                        rtol=cfg.adjoint_rtol, atol=cfg.adjoint_atol, options=opts, where="adjoint backward",
                        clock=lambda: field.last_t)
            a_later = sol[1][-1]
            a = a_later + grad_ys[i - 1]
            gp = tuple(s[-1] for s in sol[2:])
        if need_t:
            # The flow property: ∂y(t)/∂t0 = −∂y(t)/∂y0 · F(t0, y0); the output y(t0) = y0 itself
            # does not move with t0, so its own cotangent is left out.
            t_grad[0] = -(field(t[0], ys[0], params) * a_later).sum()
    if cfg.stats is not None:
        cfg.stats.nfe_backward += field.nfe - before
    return (a, t_grad, *gp)


class _TangentSolve(torch.autograd.Function):
    """The forward-mode rule of `_AdjointSolve` as a Function of its own (so transforms peel off)."""

    @staticmethod
    def forward(cfg: SolveConfig, y0: Tensor, t: Tensor, ys: Tensor, y0_dot: Tensor,
                t_dot: Tensor, *params_and_dots: Tensor) -> Tensor:
        k = len(params_and_dots) // 2
        return tangent_solve(cfg, y0, t, ys, tuple(params_and_dots[:k]), y0_dot, t_dot, tuple(params_and_dots[k:]))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        raise NotImplementedError("Reverse mode over the forward-mode rule of snopt.odeint is not supported; "
                                  "use snopt.hvp for second derivatives.")

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Tensor, int]:
        # jacfwd = vmap over jvp: one tangent solve per batch member.
        outs = []
        for b in range(info.batch_size):
            sliced = [x if d is None else x.select(d, b) for x, d in zip(args, in_dims, strict=True)]
            outs.append(_TangentSolve.apply(*sliced))  # type: ignore[no-untyped-call]
        return torch.stack(outs, 0), 0


def tangent_solve(cfg: SolveConfig, y0: Tensor, t: Tensor, ys: Tensor, params: tuple[Tensor, ...],
                  y0_dot: Tensor | None, t_dot: Tensor | None, p_dots: tuple[Tensor, ...]) -> Tensor:
    """Forward-mode derivative of the solution: the tangent-linear system dẋ/dt = F_x ẋ + F_θ θ̇.

    Output-time tangents add F(t_i, y_i) ṫ_i; the initial-time tangent enters as
    ẋ(t0) = ẏ0 − F(t0, y0) ṫ0 (flow property).
    """
    field = cfg.field
    with torch.no_grad():
        xd0 = torch.zeros_like(y0) if y0_dot is None else y0_dot.clone()
        if t_dot is not None:
            xd0 = xd0 - field(t[0], y0, params) * t_dot[0]

        def rhs(tt: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            x, xd = state
            f, fd = torch.func.jvp(lambda x_, *p_: field(tt, x_, p_), (x, *params), (xd, *p_dots))  # type: ignore[misc]
            return f, fd

        _, xds = solve(rhs, (y0, xd0), t, method=cfg.method, rtol=cfg.rtol, atol=cfg.atol,
                       options={k: v for k, v in cfg.options.items() if k != "norm"},
                       where="tangent (forward-mode)", clock=lambda: field.last_t)
        if t_dot is not None:
            fs = torch.stack([field(t[i], ys[i], params) for i in range(len(t))])
            xds = xds + fs * t_dot.reshape((-1,) + (1,) * (fs.ndim - 1))
    out: Tensor = xds
    return out
