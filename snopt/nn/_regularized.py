"""Stiffness regularisers that ride on the adjoint: kinetic energy and Jacobian Frobenius norm.

RNODE (Finlay et al. 2020, "How to train your neural ODE") penalises

    R = λ_K ∫ ‖f(t, x)‖² dt + λ_J ∫ ‖∂f/∂x (t, x)‖_F² dt,

which keeps the learned dynamics straight and non-stiff, so the adaptive solver needs fewer steps.
Both integrals are solved as one extra scalar per sample appended to the state, so the O(1)-memory
adjoint differentiates them like the rest of the solve (no stored trajectory). The Frobenius norm
uses Hutchinson's estimator ‖εᵀ ∂f/∂x‖² with ε ~ N(0, I) drawn once per solve (unbiased:
E‖εᵀJ‖² = ‖J‖_F²), at one vector-Jacobian product per evaluation.
"""

import torch
from torch import Tensor, nn

from snopt._types import VectorField


def _squares(v: Tensor) -> Tensor:
    """Σ v² over every dimension but the first (the batch)."""
    return v.pow(2).reshape(v.shape[0], -1).sum(dim=1)


class RegularizedField(nn.Module):
    """The field on ``(x, r)``: ``(f(t, x), λ_K ‖f‖² + λ_J ‖εᵀ ∂f/∂x‖²)`` per batch row.

    Args:
        func: The vector field ``func(t, x)``; x of shape ``(batch, ...)``.
        kinetic: λ_K ≥ 0.
        jacobian: λ_J ≥ 0 (needs `sample_noise` before each solve).

    Raises:
        ValueError: For a negative weight.
    """

    noise: Tensor | None

    def __init__(self, func: VectorField, kinetic: float = 0.0, jacobian: float = 0.0) -> None:
        super().__init__()
        check_weights(kinetic, jacobian)
        self.func = func
        self.kinetic = float(kinetic)
        self.jacobian = float(jacobian)
        self.noise = None

    def sample_noise(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ε ~ N(0, I) shaped like `x`, kept until the next call (the backward solve reuses it)."""
        self.noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.noise

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(dx/dt, dr/dt)``."""
        x = state[0]
        if self.jacobian == 0.0:
            f: Tensor = self.func(t, x)
            return f, self.kinetic * _squares(f)
        noise = self.noise
        if noise is None or noise.shape != x.shape:
            got = "none" if noise is None else tuple(noise.shape)
            raise RuntimeError(f"The Jacobian regulariser needs noise shaped like x {tuple(x.shape)} (got {got}): "
                               "call `sample_noise(x)` before the solve.")
        record = torch.is_grad_enabled()
        with torch.enable_grad():
            if not record or not x.requires_grad:  # a forward solve may hand in a no-grad view of a leaf,
                x = x.detach().requires_grad_(True)  # whose derivative autograd would report as zero
            f = self.func(t, x)
            if f.requires_grad:
                (vjp,) = torch.autograd.grad(f, x, noise, create_graph=record, allow_unused=True,
                                             materialize_grads=True)
            else:  # a field that ignores x and has nothing to train
                vjp = torch.zeros_like(x)
        r = self.kinetic * _squares(f) + self.jacobian * _squares(vjp)
        if not record:
            f, r = f.detach(), r.detach()
        return f, r


def check_weights(kinetic: float, jacobian: float) -> None:
    """Raise ValueError unless both weights are finite and ≥ 0."""
    for name, w in (("kinetic", kinetic), ("jacobian", jacobian)):
        if not (float(w) >= 0.0 and float(w) < float("inf")):
            raise ValueError(f"`{name}` must be a finite weight ≥ 0; got {w}.")


def regularization(model: nn.Module) -> Tensor:
    """The sum of every regularised `ODEBlock`'s penalty from its latest forward call.

    Add it to the training loss: ``loss = task_loss + snopt.nn.regularization(model)``.

    Args:
        model: A model holding `ODEBlock`s built with ``kinetic=`` or ``jacobian=`` weights.

    Returns:
        A scalar tensor (0 when no block is regularised or none has run yet).

    Raises:
        ValueError: When `model` holds no regularised `ODEBlock` (adding 0 to a loss is then
            almost certainly a mistake).
    """
    from snopt.nn._ode_block import ODEBlock

    blocks = [m for m in model.modules() if isinstance(m, ODEBlock) and m.regularized]
    if not blocks:
        raise ValueError("`model` has no ODEBlock with a `kinetic` or `jacobian` weight > 0: nothing to add.")
    terms = [b.regularization for b in blocks if b.regularization is not None]
    if not terms:
        return torch.zeros(())
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


__all__ = ["RegularizedField", "check_weights", "regularization"]
