"""Exact references for `snopt.second_order`, `snopt.hvp` and `snopt.ggn_vp`.

Both references write the loss L = Φ(x(t1)) as one function of z = [x0; θ; t1] (x0 flattened,
θ the trainable parameters flattened in `parameters()` order, as snopt does) and differentiate
it with `torch.func`; nothing here calls snopt's adjoint code.

* `GridReference`: x(t1) from `rk_solve` (a pure-torch copy of torchdiffeq's fixed-grid
  methods) with n steps of size (t1 − t0)/n, so the derivatives are those of the
  discretisation that ``snopt.second_order(..., method=method, options={"step_size": h})``
  solves forward. snopt differentiates first and discretises the adjoint ODEs on the same grid,
  so the two agree up to the method's order (O(h⁴) for rk4), not to rounding.
* `ClosedFormReference`: dx/dt = A x + b solved by `torch.linalg.matrix_exp`: the exact
  derivatives of the ODE itself, for any snopt solver.

Each gives a `snopt.SecondOrderResult` (`second_order`), the products `hvp` / `ggn_vp` without
forming a matrix, and the dense GGN (`ggn`).
"""

import abc
from typing import final

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev, jvp, vjp

from snopt._types import LossFn
from snopt.adjoint import SecondOrderResult
from snopt.testing._references import LinearField, check_grid_method, linear_solution, rk_solve


def _check_span(t_span: Tensor) -> Tensor:
    if not isinstance(t_span, Tensor) or t_span.shape != (2,) or not t_span.is_floating_point():
        raise ValueError("`t_span` must be a floating tensor (t0, t1) of shape (2,); got "
                         f"{getattr(t_span, 'shape', type(t_span).__name__)}.")
    if float(t_span[0]) == float(t_span[1]):
        raise ValueError(f"`t_span` must hold two different times; got {t_span.tolist()}.")
    return t_span.detach()


class _FlatReference(abc.ABC):
    """L(z) = Φ(x(t1)) with z = [x0; θ; t1]; subclasses say how x(t1) is computed."""

    def __init__(self, x0: Tensor, t_span: Tensor, loss_fn: LossFn, theta: Tensor) -> None:
        if not callable(loss_fn):
            raise TypeError("`loss_fn` must be callable: x(t1) -> scalar tensor.")
        self.x0 = x0.detach()
        self.t_span = _check_span(t_span).to(self.x0.dtype)
        self.loss_fn = loss_fn
        self.theta = theta.detach()
        self.n = self.x0.numel()
        self.p = self.theta.numel()

    @abc.abstractmethod
    def x1(self, x0: Tensor, theta: Tensor, t1: Tensor) -> Tensor:
        """x(t1), flat (n,), as a differentiable function of flat x0 (n,), θ (p,) and t1 (0-d)."""

    def _phi(self, x1: Tensor) -> Tensor:
        out = self.loss_fn(x1.reshape(self.x0.shape))
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError("`loss_fn` must return a scalar tensor (one element).")
        return out.reshape(())

    def loss_of(self, z: Tensor) -> Tensor:
        """L at z = [x0; θ; t1] (flat, length n + p + 1)."""
        n, p = self.n, self.p
        return self._phi(self.x1(z[:n], z[n:n + p], z[n + p]))

    def z(self) -> Tensor:
        """The point [x0; θ; t1] at which every derivative is evaluated."""
        return torch.cat([self.x0.reshape(-1), self.theta, self.t_span[1:]])

    def second_order(self, *, gauss_newton: bool = False, wrt_t1: bool = True) -> SecondOrderResult:
        """Loss, gradients and Hessian blocks, laid out as `snopt.second_order` returns them.

        Costs one dense Hessian of size (n + p + 1)² through the solve: for small problems.

        Args:
            gauss_newton: Replace the θθ, x0x0 and x0θ blocks by the generalised Gauss-Newton
                J_zᵀ Φ_xx J_z of z = (x0, θ) ↦ x(t1), which is what
                ``snopt.second_order(..., gauss_newton=True)`` returns (its gradients and t1
                derivatives stay exact).
            wrt_t1: Also give ∂L/∂t1, ∂²L/∂t1² and ∂²L/∂t1∂θ (else those fields are None).

        Returns:
            A `snopt.SecondOrderResult` (its NFE counters are 0).
        """
        n, p = self.n, self.p
        z = self.z()
        if not wrt_t1:
            t1 = self.t_span[1]
            zz = z[:n + p]

            def loss_xp(w: Tensor) -> Tensor:
                return self._phi(self.x1(w[:n], w[n:], t1))

            g, h = grad(loss_xp)(zz), hessian(loss_xp)(zz)
            loss = loss_xp(zz)
        else:
            g, h = grad(self.loss_of)(z), hessian(self.loss_of)(z)
            loss = self.loss_of(z)
        hx, hxp, hp = h[:n, :n], h[:n, n:n + p], h[n:n + p, n:n + p]
        if gauss_newton:
            hx, hxp, hp = self._ggn_blocks()
        return SecondOrderResult(loss=loss.detach(), grad_params=g[n:n + p], grad_x0=g[:n].reshape(self.x0.shape),
                                 hess_params=hp, hess_x0=hx, hess_x0_params=hxp,
                                 grad_t1=g[n + p] if wrt_t1 else None, hess_t1=h[n + p, n + p] if wrt_t1 else None,
                                 hess_t1_params=h[n + p, n:n + p] if wrt_t1 else None)

    def _phi_xx(self, x1: Tensor) -> Tensor:
        out: Tensor = hessian(self._phi)(x1.detach())
        return out

    def _ggn_blocks(self) -> tuple[Tensor, Tensor, Tensor]:
        """(J_x0ᵀ Φ_xx J_x0, J_x0ᵀ Φ_xx J_θ, J_θᵀ Φ_xx J_θ) of the flow at t1."""
        x0, t1 = self.x0.reshape(-1), self.t_span[1]
        jx, jp = jacrev(lambda a, b: self.x1(a, b, t1), argnums=(0, 1))(x0, self.theta)
        phi_xx = self._phi_xx(self.x1(x0, self.theta, t1))
        return jx.T @ phi_xx @ jx, jx.T @ phi_xx @ jp, jp.T @ phi_xx @ jp

    def ggn(self) -> Tensor:
        """The generalised Gauss-Newton J_θᵀ Φ_xx J_θ of θ ↦ x(t1), dense (p, p)."""
        return self._ggn_blocks()[2]

    def _directions(self, v: Tensor) -> tuple[Tensor, bool]:
        p = self.p
        if not isinstance(v, Tensor) or not (v.shape == (p,) or (v.ndim == 2 and v.shape[1] == p)):
            raise ValueError(f"`v` must have shape ({p},) or (k, {p}) to match the {p} trainable parameters; "
                             f"got {getattr(v, 'shape', type(v).__name__)}.")
        return v.reshape(-1, p).to(self.theta), v.ndim == 1

    def _loss_theta(self, theta: Tensor) -> Tensor:
        return self._phi(self.x1(self.x0.reshape(-1), theta, self.t_span[1]))

    def hvp(self, v: Tensor) -> Tensor:
        """∇²_θθ L · v by forward-over-reverse through the solve (no matrix is formed).

        Args:
            v: Direction(s) in parameter space, flattened in `parameters()` order: (p,) or (k, p).

        Returns:
            ∇²_θθ L · v, same shape as `v`, as `snopt.hvp` returns it.

        Raises:
            ValueError: If `v` does not have shape (p,) or (k, p).
        """
        vs, single = self._directions(v)
        out = torch.stack([jvp(grad(self._loss_theta), (self.theta,), (vk,))[1] for vk in vs])
        return out[0] if single else out

    def ggn_vp(self, v: Tensor) -> Tensor:
        """J_θᵀ Φ_xx J_θ v: a jvp through the solve, Φ_xx by forward-over-reverse, then a vjp.

        Args:
            v: Direction(s) in parameter space: (p,) or (k, p).

        Returns:
            GGN · v, same shape as `v`, as `snopt.ggn_vp` returns it.

        Raises:
            ValueError: If `v` does not have shape (p,) or (k, p).
        """
        vs, single = self._directions(v)
        x0, t1 = self.x0.reshape(-1), self.t_span[1]

        def flow(theta: Tensor) -> Tensor:
            return self.x1(x0, theta, t1)

        x1, pull = vjp(flow, self.theta)[:2]
        outs = []
        for vk in vs:
            jv = jvp(flow, (self.theta,), (vk,))[1]
            u = jvp(grad(self._phi), (x1.detach(),), (jv,))[1]
            outs.append(pull(u)[0])
        out = torch.stack(outs)
        return out[0] if single else out


@final
class GridReference(_FlatReference):
    """Exact derivatives of a fixed-grid discretisation of L = Φ(x(t1)), for any vector field.

    x(t1) comes from `rk_solve` with `steps` equal steps of size h = (t1 − t0)/steps: the grid
    of ``torchdiffeq.odeint(func, x0, t_span, method=method, options={"step_size": h})``.
    The grid moves with t1, so the t1 derivatives include the change of h.

    Args:
        func: Vector field ``func(t, x)``, an nn.Module (fields evaluated through
            `torch.func.functional_call`: no in-place updates of parameters or buffers).
        x0: Initial state (any shape; the batch is part of the state).
        t_span: Tensor (t0, t1).
        loss_fn: Φ, mapping x(t1) (shaped like x0) to a scalar tensor.
        method: ``"euler"``, ``"midpoint"`` or ``"rk4"`` (torchdiffeq's 3/8 rule).
        steps: Number of steps over the span; give it or `step_size`.
        step_size: Step size, which must divide |t1 − t0| (to 1e-12 relative).

    Raises:
        ValueError: For an unknown `method`, neither or both of `steps` and `step_size`, a
            `step_size` that does not divide the span, or a malformed `t_span`.

    Example:
        >>> ref = GridReference(func, x0, t_span, loss_fn, step_size=1 / 64)  # doctest: +SKIP
        >>> so = snopt.second_order(func, x0, t_span, loss_fn, method="rk4",
        ...                         options={"step_size": 1 / 64}, wrt_t1=True)  # doctest: +SKIP
        >>> assert_second_order_close(so, ref.second_order(), rtol=1e-6)  # doctest: +SKIP
    """

    def __init__(self, func: nn.Module, x0: Tensor, t_span: Tensor, loss_fn: LossFn, *, method: str = "rk4",
                 steps: int | None = None, step_size: float | None = None) -> None:
        check_grid_method(method)
        named = [(k, q) for k, q in func.named_parameters() if q.requires_grad]
        super().__init__(x0, t_span, loss_fn, torch.cat([q.detach().reshape(-1) for _, q in named]).to(x0.dtype)
                         if named else x0.new_zeros(0))
        if (steps is None) == (step_size is None):
            raise ValueError("Give exactly one of `steps` (steps over the span) and `step_size`.")
        if step_size is not None:
            span = abs(float(self.t_span[1] - self.t_span[0]))
            steps = round(span / step_size)
            if steps < 1 or abs(steps * step_size - span) > 1e-12 * max(1.0, span):
                raise ValueError(f"`step_size` {step_size} does not divide the span |t1 − t0| = {span}: "
                                 "torchdiffeq's grid would then differ from the reference's.")
        assert steps is not None
        if steps < 1:
            raise ValueError(f"`steps` must be positive; got {steps}.")
        self.func = func
        self.method = method
        self.steps = steps
        self.names = [k for k, _ in named]
        self.shapes = [q.shape for _, q in named]
        self.sizes = [q.numel() for _, q in named]

    def params(self, theta: Tensor) -> dict[str, Tensor]:
        """Unflatten θ (p,) into a name → tensor dict, for `torch.func.functional_call`."""
        parts = torch.split(theta, self.sizes)
        return {k: q.reshape(s) for k, q, s in zip(self.names, parts, self.shapes, strict=True)}

    def x1(self, x0: Tensor, theta: Tensor, t1: Tensor) -> Tensor:
        """x(t1), flat, through `steps` steps of `method` from t0 to t1."""
        t = torch.stack([self.t_span[0], t1])
        ys = rk_solve(self.func, self.params(theta), x0.reshape(self.x0.shape), t, steps=self.steps,
                      method=self.method)
        return ys[-1].reshape(-1)


@final
class ClosedFormReference(_FlatReference):
    """Exact derivatives of L = Φ(x(t1)) for dx/dt = A x + b, from the `matrix_exp` solution.

    θ are `field`'s trainable parameters among (A, b), flattened in `parameters()` order, as
    snopt flattens them; a frozen one (requires_grad False) stays fixed.

    Args:
        field: The linear field (its current A and b are used).
        x0: Initial state shaped (..., n).
        t_span: Tensor (t0, t1).
        loss_fn: Φ, mapping x(t1) (shaped like x0) to a scalar tensor.

    Raises:
        ValueError: For a malformed `t_span`.
    """

    def __init__(self, field: LinearField, x0: Tensor, t_span: Tensor, loss_fn: LossFn) -> None:
        self.a, self.b = field.A.detach(), field.b.detach()
        self.train_a, self.train_b = field.A.requires_grad, field.b.requires_grad
        parts = [q.reshape(-1) for q, keep in ((self.a, self.train_a), (self.b, self.train_b)) if keep]
        super().__init__(x0, t_span, loss_fn, torch.cat(parts).to(x0.dtype) if parts else x0.new_zeros(0))

    def x1(self, x0: Tensor, theta: Tensor, t1: Tensor) -> Tensor:
        """x(t1), flat, from expm of the augmented matrix."""
        d = self.a.shape[0]
        offset = 0
        a, b = self.a, self.b
        if self.train_a:
            a, offset = theta[:d * d].reshape(d, d), d * d
        if self.train_b:
            b = theta[offset:offset + d]
        t = torch.stack([self.t_span[0], t1])
        return linear_solution(a, b, x0.reshape(self.x0.shape), t)[-1].reshape(-1)

