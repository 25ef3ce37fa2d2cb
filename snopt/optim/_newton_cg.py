"""Newton-CG with Levenberg-Marquardt damping: the exact second-order baseline.

Each step solves (B + λI) d = −∇L by conjugate gradients, where B·v is an exact
`snopt.hvp` (``curvature="hessian"``) or `snopt.ggn_vp` (``curvature="ggn"``) — each
product is one forward and one backward ODE solve at O(n + p) memory — then rates the
step by the ratio ρ of actual to predicted decrease (a trust-region test): ρ < 1/4 makes
λ larger, ρ > 3/4 smaller, and a step that increases the loss is undone.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from snopt._types import LossFn
from snopt.adjoint._flat import flatten, unflatten
from snopt.adjoint._hvp import ggn_vp, hvp
from snopt.adjoint._odeint import odeint


@dataclass(frozen=True)
class CGResult:
    """Outcome of `conjugate_gradient`: solution, iterations, and ½xᵀAx + bᵀ... bookkeeping."""

    x: Tensor
    iterations: int
    negative_curvature: bool
    residual_norm: float


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, *, max_iters: int, tol: float) -> CGResult:
    """Solve A x = b for symmetric A given by `matvec`, stopping on negative curvature.

    Args:
        matvec: v ↦ A v.
        b: Right-hand side.
        max_iters: Iteration cap.
        tol: Stop when ||r|| ≤ tol · ||b||.

    Returns:
        A `CGResult`; on negative curvature at the first iteration x = b (steepest direction).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rr = torch.dot(r, r)
    bnorm = float(b.norm())
    if bnorm == 0.0:
        return CGResult(x, 0, False, 0.0)  # x = 0 solves A x = 0 exactly
    it = 0
    for it in range(1, max_iters + 1):
        ad = matvec(d)
        dad = torch.dot(d, ad)
        if float(dad) <= 0.0:
            return CGResult(b.clone() if it == 1 else x, it, True, float(r.norm()))
        alpha = rr / dad
        x = x + alpha * d
        r = r - alpha * ad
        rr_new = torch.dot(r, r)
        if float(rr_new.sqrt()) <= tol * bnorm:
            return CGResult(x, it, False, float(rr_new.sqrt()))
        d = r + (rr_new / rr) * d
        rr = rr_new
    return CGResult(x, it, False, float(rr.sqrt()))


class NewtonCG(torch.optim.Optimizer):
    """Damped Newton-CG on a Neural ODE loss L(θ) = loss_fn(x(t1)) with exact curvature products.

    Args:
        func: The vector field (an nn.Module); its trainable parameters are optimised.
        lr: Step length multiplier.
        damping: Initial Levenberg-Marquardt damping λ (> 0).
        curvature: ``"ggn"`` (positive semi-definite for convex Φ) or ``"hessian"``.
        max_cg_iters: CG iteration cap (each iteration is one curvature product).
        cg_tol: Relative CG residual tolerance.
        adapt_damping: Adjust λ from the actual/predicted decrease ratio and undo bad steps.
        solver: Keyword arguments for the ODE solves (method, rtol, atol, options).

    Example:
        >>> opt = NewtonCG(func, damping=1e-2)  # doctest: +SKIP
        >>> for _ in range(10):  # doctest: +SKIP
        ...     loss = opt.step(x0=x0, t_span=t, loss_fn=loss_fn)
    """

    def __init__(self, func: nn.Module, *, lr: float = 1.0, damping: float = 1e-2,
                 curvature: Literal["ggn", "hessian"] = "ggn", max_cg_iters: int = 20, cg_tol: float = 1e-4,
                 adapt_damping: bool = True, solver: dict[str, Any] | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not damping > 0:
            raise ValueError(f"Invalid damping: {damping} (must be > 0)")
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"`curvature` must be 'ggn' or 'hessian'; got {curvature!r}.")
        if max_cg_iters < 1:
            raise ValueError(f"Invalid max_cg_iters: {max_cg_iters}")
        if not cg_tol > 0:
            raise ValueError(f"Invalid cg_tol: {cg_tol} (must be > 0)")
        params = [p for p in func.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "damping": damping})
        self.func = func
        self.curvature = curvature
        self.max_cg_iters = max_cg_iters
        self.cg_tol = cg_tol
        self.adapt_damping = adapt_damping
        self.solver = dict(solver or {})
        self.last: dict[str, float] = {}

    def _loss(self, x0: Tensor, t_span: Tensor, loss_fn: LossFn) -> Tensor:
        with torch.no_grad():
            out: Tensor = loss_fn(odeint(self.func, x0, t_span, **self._odeint_kw())[-1])
        return out

    def _odeint_kw(self) -> dict[str, Any]:
        return {k: v for k, v in self.solver.items() if k in ("method", "rtol", "atol", "options")}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *, x0: Tensor | None = None,  # type: ignore[override]
             t_span: Tensor | None = None, loss_fn: LossFn | None = None) -> Tensor:
        """Take one damped Newton-CG step; returns the loss before the step.

        Args:
            closure: Not supported (the problem is passed explicitly); must be None.
            x0: Initial state of the ODE.
            t_span: (t0, t1).
            loss_fn: Terminal loss Φ.

        Returns:
            The loss at the parameters before the step.

        Raises:
            ValueError: If `closure` is given or a problem argument is missing.
        """
        if closure is not None:
            raise ValueError("NewtonCG.step takes the problem as x0=, t_span=, loss_fn=, not a closure.")
        if x0 is None or t_span is None or loss_fn is None:
            raise ValueError("NewtonCG.step needs x0=, t_span= and loss_fn=.")
        group = self.param_groups[0]
        params: list[Tensor] = group["params"]
        lam = float(group["damping"])
        with torch.enable_grad():
            loss = loss_fn(odeint(self.func, x0, t_span, **self._odeint_kw())[-1])
            grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        g = flatten(list(grads))
        product = hvp if self.curvature == "hessian" else ggn_vp

        def matvec(v: Tensor) -> Tensor:
            return product(self.func, x0, t_span, loss_fn, v, **self.solver) + lam * v

        cg = conjugate_gradient(matvec, -g, max_iters=self.max_cg_iters, tol=self.cg_tol)
        d = cg.x * float(group["lr"])
        bd = matvec(d) - lam * d
        predicted = float(torch.dot(g, d) + 0.5 * torch.dot(d, bd))
        old = [p.detach().clone() for p in params]
        for p, dp in zip(params, unflatten(d, params), strict=True):
            p.add_(dp)
        rho = float("nan")
        if self.adapt_damping:
            new_loss = self._loss(x0, t_span, loss_fn)
            actual = float(new_loss - loss.detach())
            rho = actual / predicted if predicted < 0 else -1.0
            if rho < 0.25:
                lam *= 1.5
            elif rho > 0.75:
                lam *= 2.0 / 3.0
            if actual > 0:
                for p, o in zip(params, old, strict=True):
                    p.copy_(o)
            group["damping"] = lam
        self.last = {"loss": float(loss), "cg_iterations": cg.iterations, "rho": rho, "damping": lam,
                     "predicted": predicted}
        return loss.detach()
