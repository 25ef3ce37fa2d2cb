"""The eigen-corrected (EKFAC) update of SNOpt, as pure functions on one layer's tensors.

With A = U_A Λ_A U_Aᵀ and G = U_G Λ_G U_Gᵀ (`eigenbasis`, refreshed every ``update_freq``
optimizer steps), the (d_out, d_in) gradient matrix ∇W of [W, b] is rotated into the
Kronecker eigenbasis, divided elementwise by a running second moment m2 plus ``eps``, and
rotated back (`precondition`):

    G̃ = U_Gᵀ ∇W U_A
    m2 ← α m2 + (1 − α) · scale · G̃²                 (m2 initialised as num_locations · λ_G λ_Aᵀ)
    update = U_G (G̃ / (m2 + eps)) U_Aᵀ

In the column-major vec of DESIGN §2, vec(update) = Q (diag(vec m2) + eps I)⁻¹ Qᵀ vec(∇W)
with Q = U_A ⊗ U_G; with α = 1 and m2 = λ_G λ_Aᵀ this is (A ⊗ G + eps I)⁻¹ vec(∇W), i.e.
KFAC with damping eps. ``scale`` is the authors' batch-size factor (``bs``) on G̃² when ∇W
is the gradient of a batch-mean loss.
"""

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from snopt.curvature._kron import KronFactors

# torch re-exports `torch._C._LinAlgError` here without declaring it in its stubs.
_LinAlgError: type[RuntimeError] = torch.linalg.LinAlgError  # type: ignore[attr-defined]


class CurvatureWarning(UserWarning):
    """A curvature estimate could not be used as computed and was replaced by a safe fallback."""


@dataclass(eq=False)
class EigenBasis:
    """Eigendecompositions A = U_A diag(lam_A) U_Aᵀ and G = U_G diag(lam_G) U_Gᵀ of one layer's factors.

    Attributes:
        U_A: Orthogonal eigenvectors of A as columns, (d_in, d_in).
        U_G: Orthogonal eigenvectors of G as columns, (d_out, d_out).
        lam_A: Eigenvalues of A (ascending, clamped at 0, plus any damping), (d_in,).
        lam_G: Eigenvalues of G (ascending, clamped at 0, plus any damping), (d_out,).
    """

    U_A: Tensor
    U_G: Tensor
    lam_A: Tensor
    lam_G: Tensor


def _fallback(m: Tensor, name: str, why: str) -> tuple[Tensor, Tensor]:
    warnings.warn(f"The eigendecomposition of Kronecker factor {name} ({m.shape[0]}×{m.shape[0]}, {m.dtype}) "
                  f"{why}; using the identity basis with unit eigenvalues for it (an unpreconditioned "
                  "direction). Check the factor for NaN/inf or extreme scales.", CurvatureWarning, stacklevel=4)
    return (torch.ones(m.shape[0], dtype=m.dtype, device=m.device),
            torch.eye(m.shape[0], dtype=m.dtype, device=m.device))


def _finite(*xs: Tensor) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


def _safe_eigh(m: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Run eigh in the working dtype, then in float64, then the identity (with a CurvatureWarning)."""
    if not _finite(m):
        return _fallback(m, name, "was skipped because the factor holds NaN or inf")
    work = m if m.dtype in (torch.float32, torch.float64) else m.double()  # eigh has no half precision
    try:
        lam, u = torch.linalg.eigh(work)
    except _LinAlgError:
        if work.dtype == torch.float64:
            return _fallback(m, name, "did not converge in float64")
        try:
            lam, u = torch.linalg.eigh(work.double())
        except _LinAlgError:
            return _fallback(m, name, f"did not converge in {work.dtype} nor in float64")
    if not _finite(lam, u):
        return _fallback(m, name, "returned NaN or inf")
    return lam.to(m.dtype).clamp_(min=0.0), u.to(m.dtype)


def eigenbasis(factors: KronFactors, *, damping: float = 0.0) -> EigenBasis:
    """Eigendecompose A and G with `torch.linalg.eigh`, robustly.

    Each factor is decomposed in its own dtype; if that raises `torch.linalg.LinAlgError`
    it is retried in float64 (results cast back). If that fails too, or the factor or its
    decomposition is not finite, a `CurvatureWarning` is issued and that factor gets the
    identity basis with unit eigenvalues, so the result never holds NaN. Negative
    eigenvalues (round-off of a positive semi-definite factor) are clamped to 0, then
    ``damping`` is added to every eigenvalue (the eigenvalues of A + damping·I and
    G + damping·I). Cost O(d_in³ + d_out³).

    Args:
        factors: The layer's Kronecker factors.
        damping: Non-negative shift added to both factors' eigenvalues.

    Returns:
        The eigenbasis, in the factors' dtype and device.

    Raises:
        ValueError: If `damping` is negative or not finite.
    """
    if not damping >= 0.0 or damping == float("inf"):
        raise ValueError(f"`damping` must be a non-negative finite number; got {damping!r}.")
    lam_a, u_a = _safe_eigh(factors.A, "A")
    lam_g, u_g = _safe_eigh(factors.G, "G")
    if damping:
        lam_a.add_(damping)
        lam_g.add_(damping)
    return EigenBasis(U_A=u_a, U_G=u_g, lam_A=lam_a, lam_G=lam_g)


def init_second_moment(basis: EigenBasis, num_locations: float = 1.0) -> Tensor:
    """The initial second moment m2 = num_locations · λ_G λ_Aᵀ, the diagonal of A ⊗ G in its eigenbasis.

    Args:
        basis: The eigenbasis.
        num_locations: Factor for layers whose factors are per-location means (the number of
            spatial locations of a Conv2d, as in the authors' code; 1 for Linear).

    Returns:
        m2, shape (d_out, d_in).

    Raises:
        ValueError: If `num_locations` is not positive.
    """
    if not num_locations > 0:
        raise ValueError(f"`num_locations` must be positive; got {num_locations!r}.")
    return torch.outer(basis.lam_G, basis.lam_A).mul_(num_locations)


def _check_grad(grad_mat: Tensor, basis: EigenBasis) -> None:
    shape = (basis.U_G.shape[0], basis.U_A.shape[0])
    if grad_mat.shape != shape:
        raise ValueError(f"`grad_mat` must have shape (d_out, d_in) = {shape} to match the eigenbasis; "
                         f"got {tuple(grad_mat.shape)}.")


def rotate(grad_mat: Tensor, basis: EigenBasis) -> Tensor:
    """Rotate a (d_out, d_in) matrix into the Kronecker eigenbasis: U_Gᵀ X U_A.

    Args:
        grad_mat: Matrix X, (d_out, d_in).
        basis: The eigenbasis.

    Returns:
        U_Gᵀ X U_A, in the basis' dtype.

    Raises:
        ValueError: If `grad_mat` has the wrong shape.
    """
    _check_grad(grad_mat, basis)
    x = grad_mat.to(basis.U_A)
    return basis.U_G.mT @ x @ basis.U_A


def unrotate(x: Tensor, basis: EigenBasis) -> Tensor:
    """Rotate back from the Kronecker eigenbasis: U_G X U_Aᵀ (the inverse of `rotate`).

    Args:
        x: Matrix in the eigenbasis, (d_out, d_in).
        basis: The eigenbasis.

    Returns:
        U_G X U_Aᵀ, in the basis' dtype.

    Raises:
        ValueError: If `x` has the wrong shape.
    """
    _check_grad(x, basis)
    return basis.U_G @ x.to(basis.U_A) @ basis.U_A.mT


def _check_hyper(m2: Tensor, basis: EigenBasis, alpha: float, eps: float, scale: float) -> None:
    shape = (basis.U_G.shape[0], basis.U_A.shape[0])
    if m2.shape != shape:
        raise ValueError(f"`m2` must have shape (d_out, d_in) = {shape}; got {tuple(m2.shape)}.")
    if m2.dtype != basis.U_A.dtype:
        raise ValueError(f"`m2` must have the eigenbasis' dtype {basis.U_A.dtype}; got {m2.dtype}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]; got {alpha!r}.")
    if not 0.0 < eps < float("inf"):
        raise ValueError(f"`eps` must be a positive finite damping; got {eps!r}.")
    if not 0.0 <= scale < float("inf"):
        raise ValueError(f"`scale` must be a non-negative finite number; got {scale!r}.")


def precondition_(grad_mat: Tensor, basis: EigenBasis, m2: Tensor, *, alpha: float, eps: float,
                  scale: float = 1.0) -> Tensor:
    """The eigen-corrected update, updating the running second moment `m2` in place.

    G̃ = U_Gᵀ ∇W U_A;  m2 ← α m2 + (1 − α) · scale · G̃²;  update = U_G (G̃ / (m2 + eps)) U_Aᵀ.
    Cost O(d_out d_in (d_out + d_in)).

    Args:
        grad_mat: ∇W, the (d_out, d_in) [W, b] gradient (`weight_grad_matrix`).
        basis: The layer's eigenbasis.
        m2: Running second moment, (d_out, d_in), in the basis' dtype; overwritten.
        alpha: Decay α ∈ [0, 1] of m2 (1 keeps m2 fixed).
        eps: Damping eps > 0 added to m2 before dividing.
        scale: Non-negative factor on G̃² in the m2 update (the batch size, in the authors' code).

    Returns:
        The update, (d_out, d_in), in `grad_mat`'s dtype.

    Raises:
        ValueError: On wrong shapes, α outside [0, 1], eps ≤ 0 or a negative scale.
    """
    _check_grad(grad_mat, basis)
    _check_hyper(m2, basis, alpha, eps, scale)
    g_rot = rotate(grad_mat, basis)
    m2.mul_(alpha).addcmul_(g_rot, g_rot, value=(1.0 - alpha) * scale)
    return unrotate(g_rot / (m2 + eps), basis).to(grad_mat.dtype)


def precondition(grad_mat: Tensor, basis: EigenBasis, m2: Tensor, *, alpha: float, eps: float,
                 scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """The eigen-corrected update and the new second moment, leaving `m2` untouched (see `precondition_`).

    Args:
        grad_mat: ∇W, the (d_out, d_in) [W, b] gradient (`weight_grad_matrix`).
        basis: The layer's eigenbasis.
        m2: Running second moment, (d_out, d_in).
        alpha: Decay α ∈ [0, 1] of m2.
        eps: Damping eps > 0 added to m2 before dividing.
        scale: Non-negative factor on G̃² in the m2 update.

    Returns:
        ``(update, new_m2)``: the update in `grad_mat`'s dtype and α m2 + (1 − α) scale G̃².

    Raises:
        ValueError: On wrong shapes, α outside [0, 1], eps ≤ 0 or a negative scale.
    """
    new_m2 = m2.to(basis.U_A, copy=True)
    return precondition_(grad_mat, basis, new_m2, alpha=alpha, eps=eps, scale=scale), new_m2
