"""Gauss-Newton-type Kronecker factors: one adjoint solve per root of Φ_xx.

The training-time factors (SNOpt) use the cotangent of the actual loss (an empirical
Fisher). For approximation reports and exact-regime checks, `ggn_factors` instead carries
each root r_k of Φ_xx = Σ_k r_k r_kᵀ backward by the first-order adjoint (DESIGN.md §2,
"Gauss-Newton") and sums the factors over k, so that in the exact regime (one datum, one
location, layer inputs constant in time) A ⊗ G equals the layer's block of the
generalised Gauss-Newton matrix J_θᵀ Φ_xx J_θ.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from snopt.curvature._collector import FactorCollector
from snopt.curvature._kron import KronFactors
from snopt.nn._ode_block import ODEBlock


def hessian_roots(loss_fn: Callable[[Tensor], Tensor], y: Tensor) -> Tensor:
    """Roots R (k, *y.shape) with Φ_xx = RᵀR: `loss_fn.hessian_roots` if present, else from eigh of Φ_xx.

    Args:
        loss_fn: Φ.
        y: Point at which Φ_xx is taken.

    Returns:
        The roots (negative eigenvalues of a non-convex Φ are dropped).
    """
    fn = getattr(loss_fn, "hessian_roots", None)
    if callable(fn):
        out: Tensor = fn(y)
        return out
    h = torch.func.hessian(lambda z: loss_fn(z.reshape(y.shape)))(y.reshape(-1).detach())
    lam, u = torch.linalg.eigh(h)
    keep = lam > 0
    roots: Tensor = (u[:, keep] * lam[keep].sqrt()).T.reshape(-1, *y.shape)
    return roots


def ggn_factors(block: ODEBlock, x: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> dict[str, KronFactors]:
    """Kronecker factors of every Linear/Conv2d in `block.func` with Gauss-Newton root cotangents.

    Runs the block forward once and its adjoint backward once per root of Φ_xx at y = block(x)
    (k solves; meant for small models and reports). Uses the block's own solver settings.

    Args:
        block: The ODE block.
        x: Input (the block's initial state).
        loss_fn: Φ on the block's output (optionally with ``hessian_roots``).

    Returns:
        Layer name (within `block.func`) → factors with A = ∫ E_{b,l}[ā āᵀ] dt (averaged over the
        k solves, which all visit the same trajectory; ``weight`` = t1 − t0 likewise) and
        G = ∫ Σ_k Σ_{b,l} g_k g_kᵀ dt.
    """
    collector = FactorCollector(block.func, mode="ode", cotangent="sum")
    old = block.observer
    block.observer = collector
    try:
        collector.enabled = True
        params = [p for p in block.func.parameters() if p.requires_grad]
        with torch.enable_grad():
            y = block(x)
            roots = hessian_roots(loss_fn, y.detach())
            for r in roots:
                torch.autograd.grad(y, params, r, retain_graph=True, allow_unused=True)
    finally:
        block.observer = old
        collector.remove()
    # Every root solve folds the same layer inputs into A (and its dt into the weight): G must sum
    # over the k roots, A must not, so A and the weight are averaged over the k solves.
    k = max(1, len(roots))
    for f in collector.factors.values():
        f.A.div_(k)
        f.weight.div_(k)
    return collector.factors
