"""`snopt.second_order`: exact second-order adjoints (dense blocks, for small models).

Integrates DESIGN.md §2 backward in one pass. With z = (x, θ), K = [F_x F_θ] and
W = [[V_xx, V_xθ], [V_θx, V_θθ]], the three matrix equations are one:

    dW/dt = −(W K̄ + K̄ᵀ W + ∇²_zz (V_xᵀ F)),   K̄ = [[F_x, F_θ], [0, 0]],

with W(t1) = blockdiag(Φ_xx, 0). Gauss-Newton drops the ∇²(V_xᵀF) term. The state x is
re-solved backward, so memory is O((n + p)²), independent of the number of steps.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, hessian, vmap

from snopt._types import LossFn, VectorField
from snopt.adjoint._func import jvp, vjp
from snopt.adjoint._problem import Norm, Problem, make_problem


@dataclass(frozen=True)
class SecondOrderResult:
    """Loss, gradients and Hessian blocks of L = Φ(x(t1)) (θ flattened in `parameters()` order).

    Attributes:
        loss: L, a scalar.
        grad_params: ∇_θ L, shape (p,).
        grad_x0: ∇_x0 L, shaped like x0.
        hess_params: ∇²_θθ L, (p, p).
        hess_x0: ∇²_x0x0 L, (n, n) with n = x0.numel().
        hess_x0_params: ∇²_x0θ L, (n, p).
        grad_t1: ∂L/∂t1 (with ``wrt_t1=True``), else None.
        hess_t1: ∂²L/∂t1² (with ``wrt_t1=True``), else None.
        hess_t1_params: ∂²L/∂t1∂θ, shape (p,) (with ``wrt_t1=True``), else None.
        nfe_forward: Vector-field evaluations of the forward solve.
        nfe_backward: Evaluations of the backward dynamics (each a Jacobian and, unless
            Gauss-Newton, a Hessian of V_xᵀF).
    """

    loss: Tensor
    grad_params: Tensor
    grad_x0: Tensor
    hess_params: Tensor
    hess_x0: Tensor
    hess_x0_params: Tensor
    grad_t1: Tensor | None = None
    hess_t1: Tensor | None = None
    hess_t1_params: Tensor | None = None
    nfe_forward: int = 0
    nfe_backward: int = 0


class _SecondOrderDynamics:
    """Backward dynamics of (x, V_x, V_θ, W[, y, z])."""

    def __init__(self, prob: Problem, *, gauss_newton: bool, wrt_t1: bool) -> None:
        self.prob = prob
        self.gauss_newton = gauss_newton
        self.wrt_t1 = wrt_t1
        self.eye = torch.eye(prob.n, dtype=prob.x0.dtype, device=prob.x0.device)

    def __call__(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        prob, n = self.prob, self.prob.n
        x, a, _, w = state[:4]
        theta = prob.theta
        with torch.enable_grad():
            f, pull = vjp(lambda x_, p_: prob.F(t, x_, p_), x, theta)
            ax, ap = pull(a)
            jx, jp = vmap(pull)(self.eye)  # rows of F_x (n, n) and F_θ (n, p)
            wk = w[:, :n] @ torch.cat([jx, jp], dim=1)
            dw = wk + wk.T
            if not self.gauss_newton:
                z = torch.cat([x, theta])
                h = hessian(lambda z_: torch.dot(a, prob.F(t, z_[:n], z_[n:])))(z)
                dw = dw + h
        out: tuple[Tensor, ...] = (f.detach(), -ax.detach(), -ap.detach(), -dw.detach())
        if self.wrt_t1:
            with torch.enable_grad():
                yx, yp = pull(state[4])
            out = (*out, -yx.detach(), -yp.detach())
        return out


def second_order(func: VectorField, x0: Tensor, t_span: Tensor, loss_fn: LossFn, *, method: str | None = "dopri5",
                 rtol: float = 1e-7, atol: float = 1e-9, options: dict[str, Any] | None = None,
                 gauss_newton: bool = False, wrt_t1: bool = False, norm: Norm = "mixed") -> SecondOrderResult:
    """Exact loss, gradients and Hessian blocks of a Neural ODE loss by second-order adjoints.

    Solves x forward, then integrates (x, V_x, V_θ, V_xx, V_xθ, V_θθ) backward in one pass
    (DESIGN.md §2), including the Σ_i V_x,i ∇²F_i terms. Memory is O((n + p)²) and does not
    grow with the number of solver steps; each backward evaluation costs n vector-Jacobian
    products plus (unless `gauss_newton`) a dense (n + p)² Hessian of V_xᵀF, so this is for
    small models (p up to a few thousand). For large models use `hvp` / `ggn_vp`.

    Args:
        func: Vector field ``func(t, x)``, an nn.Module; θ are its parameters with requires_grad.
        x0: Initial state (any shape; the batch is part of the state, n = x0.numel()).
        t_span: Tensor (t0, t1).
        loss_fn: Φ, mapping x(t1) (shaped like x0) to a scalar tensor.
        method: torchdiffeq method for both solves.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        options: torchdiffeq solver options (e.g. ``{"step_size": 0.01}``).
        gauss_newton: Drop the second derivatives of F: then ``hess_params`` is exactly the
            generalised Gauss-Newton J_θᵀ Φ_xx J_θ of θ ↦ x(t1).
        wrt_t1: Also return ∂L/∂t1, ∂²L/∂t1² and ∂²L/∂t1∂θ.
        norm: Adaptive error control on all components (``"mixed"``) or on (x, V_x) only
            (``"seminorm"``).

    Returns:
        A `SecondOrderResult`.

    Raises:
        ValueError: For a `t_span` that is not two increasing or decreasing times, or a
            `loss_fn` that does not return a scalar.

    Example:
        >>> import torch, snopt
        >>> func = torch.nn.Sequential()  # doctest: +SKIP
    """
    prob = make_problem(func, x0, t_span, loss_fn, method=method, rtol=rtol, atol=atol, options=options)
    n, p = prob.n, prob.p
    dtype, device = prob.x0.dtype, prob.x0.device
    x1 = prob.forward()
    nfe_fwd = prob.field.nfe
    t1 = prob.t[-1]
    with torch.enable_grad():
        loss = prob.loss(x1).detach()
        phi_x = grad(prob.loss)(x1).detach()
        phi_xx = hessian(prob.loss)(x1).detach()
    w1 = torch.zeros(n + p, n + p, dtype=dtype, device=device)
    w1[:n, :n] = phi_xx
    state: tuple[Tensor, ...] = (x1, phi_x, torch.zeros(p, dtype=dtype, device=device), w1)
    extras: dict[str, Tensor] = {}
    if wrt_t1:
        with torch.enable_grad():
            f1, pull1 = vjp(lambda x_, p_: prob.F(t1, x_, p_), x1, prob.theta)
            fx_phi, fp_phi = pull1(phi_x)
            # d/dt F(t, x(t)) at t1 = F_t + F_x F.
            _, df1 = jvp(lambda t_, x_: prob.F(t_, x_, prob.theta), (t1, x1), (torch.ones_like(t1), f1))
        f1 = f1.detach()
        extras["grad_t1"] = torch.dot(phi_x, f1)
        extras["hess_t1"] = f1 @ phi_xx @ f1 + torch.dot(phi_x, df1.detach())
        extras["direct_t1_params"] = fp_phi.detach()
        state = (*state, phi_xx @ f1 + fx_phi.detach(), torch.zeros(p, dtype=dtype, device=device))
    dyn = _SecondOrderDynamics(prob, gauss_newton=gauss_newton, wrt_t1=wrt_t1)
    sol = prob.solve(dyn, state, prob.t.flip(0), where="second-order adjoint backward", norm=norm, primal=(0, 1))
    final = tuple(s[-1] for s in sol)
    w0 = final[3]
    return SecondOrderResult(
        loss=loss, grad_params=final[2], grad_x0=final[1].reshape(prob.x0.shape),
        hess_params=w0[n:, n:], hess_x0=w0[:n, :n], hess_x0_params=w0[:n, n:],
        grad_t1=extras.get("grad_t1"), hess_t1=extras.get("hess_t1"),
        hess_t1_params=(final[5] + extras["direct_t1_params"]) if wrt_t1 else None,
        nfe_forward=nfe_fwd, nfe_backward=prob.field.nfe - nfe_fwd)
