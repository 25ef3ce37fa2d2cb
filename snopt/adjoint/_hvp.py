"""Hessian- and Gauss-Newton-vector products of a Neural ODE loss at O(n + p) memory.

`hvp` is forward-over-adjoint: the first-order adjoint system (x, a, g) is
differentiated in a direction v of θ. A forward solve carries (x, ẋ) with
ẋ' = F_x ẋ + F_θ v, ẋ(t0) = 0; the backward solve carries (x, ẋ, a, ȧ, g, ġ) with
(ȧ, ġ)' = −d/dε (F_xᵀ a, F_θᵀ a) along (ẋ, v, ȧ), ȧ(t1) = Φ_xx ẋ(t1). Then
ġ(t0) = ∇²_θθ L · v. One `torch.func.jvp` of the vector-Jacobian map gives F, its
tangent, the vjp and the vjp's tangent at once.

`ggn_vp` is the tangent-linear forward solve followed by one first-order adjoint solve
with terminal cotangent Φ_xx ẋ(t1): Jᵀ Φ_xx J v.

Several directions are handled at once (v of shape (k, p)) by `torch.func.vmap` inside
the dynamics; the primal x and a are shared.
"""

from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from snopt._types import LossFn, VectorField
from snopt.adjoint._flat import flatten, unflatten
from snopt.adjoint._func import jvp, vjp
from snopt.adjoint._problem import Norm, Problem, make_problem


def _check_v(prob: Problem, v: Tensor) -> tuple[Tensor, bool]:
    p = prob.p
    if not isinstance(v, Tensor):
        raise TypeError(f"`v` must be a torch.Tensor of shape ({p},) or (k, {p}); got {type(v).__name__}.")
    if v.ndim == 1 and v.shape[0] == p:
        return v.reshape(1, p).to(prob.x0), False
    if v.ndim == 2 and v.shape[1] == p:
        return v.to(prob.x0), True
    raise ValueError(f"`v` must have shape ({p},) or (k, {p}) to match `func`'s {p} trainable parameters; "
                     f"got {tuple(v.shape)}.")


def _tangent_forward(prob: Problem, v: Tensor, norm: Norm) -> tuple[Tensor, Tensor]:
    """Solve (x, ẋ) forward for k directions; return x(t1) (n,) and ẋ(t1) (k, n)."""
    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, xd = state
        with torch.enable_grad():
            return _batched_jvp(prob, t, x, xd, v)

    x0 = prob.x0.reshape(-1)
    xd0 = torch.zeros(v.shape[0], prob.n, dtype=x0.dtype, device=x0.device)
    with torch.no_grad():
        xs, xds = prob.solve(rhs, (x0, xd0), prob.t, where="tangent forward", norm=norm, primal=(0,))
    return xs[-1], xds[-1]


def _batched_jvp(prob: Problem, t: Tensor, x: Tensor, xd: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """F and F_x ẋ_k + F_θ v_k for each direction k (the double-vjp trick on one graph)."""
    field = prob.field
    shape = prob.x0.shape
    ps = field.params
    vs = [unflatten(vk, prob.params) for vk in v]
    x_ = x.detach().reshape(shape).requires_grad_(True)
    f = field(t, x_, ps)
    u = torch.zeros_like(f, requires_grad=True)
    g = torch.autograd.grad(f, (x_, *ps), u, create_graph=True, allow_unused=True, materialize_grads=True)
    fds = [torch.autograd.grad(g, u, (xd[k].reshape(shape), *vs[k]), retain_graph=True)[0].reshape(-1)
           for k in range(v.shape[0])]
    return f.detach().reshape(-1), torch.stack(fds).detach()


class _HvpBackward:
    """(x, ẋ, a, ȧ, g, ġ) ↦ (F, Ḟ, −F_xᵀa, −(F_xᵀa)˙, −F_θᵀa, −(F_θᵀa)˙).

    Per evaluation: one forward of F with the module's own parameters, one vjp with
    cotangent a kept differentiable, then one double-backward along (ẋ, v) that returns at
    once the Hessian-vector products of aᵀF (the second-derivative terms of the tangent
    adjoint) and, through a, the jvp Ḟ = F_x ẋ + F_θ v (the double-vjp trick); plus one vjp
    with ȧ. Several directions reuse the same graphs.
    """

    def __init__(self, prob: Problem, v: Tensor) -> None:
        self.prob = prob
        self.vs = [unflatten(vk, prob.params) for vk in v]

    def __call__(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        prob = self.prob
        field = prob.field
        shape = prob.x0.shape
        x, xd, a, ad = state[0], state[1], state[2], state[3]
        ps = field.params
        with torch.enable_grad():
            x_ = x.detach().reshape(shape).requires_grad_(True)
            a_ = a.detach().reshape(shape).requires_grad_(True)
            f = field(t, x_, ps)
            g = torch.autograd.grad(f, (x_, *ps), a_, create_graph=True, allow_unused=True, materialize_grads=True)
            outs_fd, outs_gxd, outs_gpd = [], [], []
            for k, vk in enumerate(self.vs):
                h = torch.autograd.grad(g, (x_, *ps, a_), (xd[k].reshape(shape), *vk), retain_graph=True,
                                        allow_unused=True, materialize_grads=True)
                j = torch.autograd.grad(f, (x_, *ps), ad[k].reshape(shape), retain_graph=True, allow_unused=True,
                                        materialize_grads=True)
                outs_fd.append(h[-1].reshape(-1))
                outs_gxd.append((h[0] + j[0]).reshape(-1))
                outs_gpd.append(flatten([hi + ji for hi, ji in zip(h[1:-1], j[1:], strict=True)]))
        gp = flatten([gi.detach() for gi in g[1:]])
        return (f.detach().reshape(-1), torch.stack(outs_fd).detach(), -g[0].detach().reshape(-1),
                -torch.stack(outs_gxd).detach(), -gp, -torch.stack(outs_gpd).detach())


def hvp(func: VectorField, x0: Tensor, t_span: Tensor, loss_fn: LossFn, v: Tensor, *, method: str | None = "dopri5",
        rtol: float = 1e-7, atol: float = 1e-9, options: dict[str, Any] | None = None,
        norm: Norm = "seminorm") -> Tensor:
    """Hessian-vector product ∇²_θθ L · v by forward-over-adjoint, at O(n + p) memory.

    Exact up to solver tolerance, including the second derivatives of F. Costs one
    forward solve of (x, ẋ) and one backward solve of (x, ẋ, a, ȧ, g, ġ); nothing is kept
    per step. Several directions at once: pass `v` of shape (k, p).

    Args:
        func: Vector field ``func(t, x)``, an nn.Module; θ are its parameters with requires_grad.
        x0: Initial state (any shape; the batch is part of the state).
        t_span: Tensor (t0, t1).
        loss_fn: Φ, mapping x(t1) (shaped like x0) to a scalar tensor.
        v: Direction(s) in parameter space, flattened in `func.parameters()` order: (p,) or (k, p).
        method: torchdiffeq method for both solves.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        options: torchdiffeq solver options.
        norm: Adaptive error control on the primal components only (``"seminorm"``: x
            forward, x and a backward; the tangent systems are linear and as smooth as the
            primal) or on every component (``"mixed"``).

    Returns:
        ∇²_θθ L · v, same shape as `v`.

    Raises:
        ValueError: If `v` does not have shape (p,) or (k, p).
    """
    prob = make_problem(func, x0, t_span, loss_fn, method=method, rtol=rtol, atol=atol, options=options)
    vb, batched = _check_v(prob, v)
    x1, xd1 = _tangent_forward(prob, vb, norm)
    with torch.enable_grad():
        a1 = grad(prob.loss)(x1).detach()
        ad1 = vmap(lambda u: jvp(grad(prob.loss), (x1,), (u,))[1])(xd1).detach()
    k, p = vb.shape
    zeros = torch.zeros(p, dtype=x1.dtype, device=x1.device)
    state = (x1, xd1, a1, ad1, zeros, torch.zeros(k, p, dtype=x1.dtype, device=x1.device))
    sol = prob.solve(_HvpBackward(prob, vb), state, prob.t.flip(0), where="hvp adjoint backward", norm=norm,
                     primal=(0, 2))
    out: Tensor = sol[5][-1]
    return out if batched else out[0]


def phi_xx_product(prob: Problem, x1: Tensor, u: Tensor) -> Tensor:
    """Φ_xx u for a batch u (k, n): from the loss's `hessian_roots` if it has them, else by autodiff."""
    roots_fn = getattr(prob.loss_fn, "hessian_roots", None)
    if callable(roots_fn):
        r = roots_fn(x1.reshape(prob.x0.shape)).reshape(-1, prob.n)
        prod: Tensor = (u @ r.T) @ r
        return prod
    with torch.enable_grad():
        out: Tensor = vmap(lambda w: jvp(grad(prob.loss), (x1,), (w,))[1])(u)
    return out.detach()


class _AdjointBatch:
    """(x, a, g) ↦ (F, −F_xᵀa, −F_θᵀa) for a batch of cotangents a (k, n)."""

    def __init__(self, prob: Problem) -> None:
        self.prob = prob

    def __call__(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        prob = self.prob
        x, a = state[0], state[1]
        with torch.enable_grad():
            f, pull = vjp(lambda x_, p_: prob.F(t, x_, p_), x, prob.theta)
            gx, gp = vmap(pull)(a)
        return f.detach(), -gx.detach(), -gp.detach()


def ggn_vp(func: VectorField, x0: Tensor, t_span: Tensor, loss_fn: LossFn, v: Tensor, *,
           method: str | None = "dopri5", rtol: float = 1e-7, atol: float = 1e-9,
           options: dict[str, Any] | None = None, norm: Norm = "seminorm") -> Tensor:
    """Generalised Gauss-Newton-vector product J_θᵀ Φ_xx J_θ v of θ ↦ x(t1), at O(n + p) memory.

    A tangent-linear forward solve gives J_θ v = ẋ(t1); one first-order adjoint solve with
    terminal cotangent Φ_xx ẋ(t1) gives the product. If `loss_fn` has a
    ``hessian_roots(x) -> R`` method with Φ_xx = RᵀR (see `snopt.losses`), Φ_xx is applied
    through R.

    Args:
        func: Vector field ``func(t, x)``, an nn.Module.
        x0: Initial state.
        t_span: Tensor (t0, t1).
        loss_fn: Φ, mapping x(t1) to a scalar tensor.
        v: Direction(s) in parameter space: (p,) or (k, p).
        method: torchdiffeq method for both solves.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        options: torchdiffeq solver options.
        norm: ``"seminorm"`` (error control on x and a only) or ``"mixed"`` (every component).

    Returns:
        GGN · v, same shape as `v`.

    Raises:
        ValueError: If `v` does not have shape (p,) or (k, p).
    """
    prob = make_problem(func, x0, t_span, loss_fn, method=method, rtol=rtol, atol=atol, options=options)
    vb, batched = _check_v(prob, v)
    x1, xd1 = _tangent_forward(prob, vb, norm)
    u = phi_xx_product(prob, x1, xd1)
    k, p = vb.shape
    state = (x1, u, torch.zeros(k, p, dtype=x1.dtype, device=x1.device))
    # Error control on x alone: the cotangents u depend on v, and steps chosen from them would make the
    # product nonlinear in v. The cotangent system is linear and as smooth as the primal.
    sol = prob.solve(_AdjointBatch(prob), state, prob.t.flip(0), where="ggn adjoint backward", norm=norm,
                     primal=(0,))
    out: Tensor = sol[2][-1]
    return out if batched else out[0]
