"""Ready-made terminal losses Φ whose Hessian roots are known (Φ_xx = RᵀR).

Any callable ``loss_fn(x) -> scalar tensor`` works with `snopt.second_order`, `hvp` and
`ggn_vp`. A loss may also define ``hessian_roots(x) -> R`` with R of shape (k, *x.shape)
(k roots r_k with Φ_xx = Σ_k r_k r_kᵀ, flattened): `ggn_vp` then applies Φ_xx through
R, and Gauss-Newton curvature (the SNOpt factors) can carry the k roots backward by the
first-order adjoint (DESIGN.md §2, "Gauss-Newton"). The classes here implement both.
"""

import math

import torch
from torch import Tensor


class MSELoss:
    """Φ(x) = scale · Σ (x − target)², with ``scale = 1 / numel`` for `reduction="mean"`.

    Args:
        target: Tensor shaped like the state x(t1).
        reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(self, target: Tensor, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"`reduction` must be 'mean' or 'sum'; got {reduction!r}.")
        self.target = target
        self.scale = 1.0 / target.numel() if reduction == "mean" else 1.0

    def __call__(self, x: Tensor) -> Tensor:
        """Φ(x)."""
        return self.scale * ((x - self.target) ** 2).sum()

    def hessian_roots(self, x: Tensor) -> Tensor:
        """R = sqrt(2·scale) · I, shape (n, *x.shape)."""
        n = x.numel()
        eye = torch.eye(n, dtype=x.dtype, device=x.device) * math.sqrt(2.0 * self.scale)
        return eye.reshape(n, *x.shape)


class LinearCrossEntropy:
    """Mean cross-entropy of a fixed linear readout: Φ(x) = mean_b CE(W x_b + c, y_b).

    x(t1) has shape (B, d); W (C, d) and c (C,) are held fixed (differentiate the readout
    separately if it is trained). With softmax p_b,
    ∇²_{x_b} Φ = (1/B) Wᵀ (diag p_b − p_b p_bᵀ) W = (1/B) Wᵀ M_bᵀ M_b W with
    M_b = diag(√p_b) − √p_b p_bᵀ, so there are B·C roots.

    Args:
        weight: Readout weight (C, d).
        bias: Readout bias (C,) or None.
        labels: Integer class labels (B,).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, labels: Tensor) -> None:
        if weight.ndim != 2:
            raise ValueError(f"`weight` must be (C, d); got shape {tuple(weight.shape)}.")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"`bias` must have shape ({weight.shape[0]},) to match `weight`; got {tuple(bias.shape)}.")
        if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"`labels` must be a 1-D integer tensor (B,); got shape {tuple(labels.shape)}, "
                             f"dtype {labels.dtype}.")
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.labels = labels

    def logits(self, x: Tensor) -> Tensor:
        """W x_b + c for every row of x (B, d)."""
        z = x @ self.weight.T
        return z if self.bias is None else z + self.bias

    def __call__(self, x: Tensor) -> Tensor:
        """Φ(x)."""
        return torch.nn.functional.cross_entropy(self.logits(x), self.labels)

    def hessian_roots(self, x: Tensor) -> Tensor:
        """R of shape (B·C, B, d) with Φ_xx = RᵀR (flattened over x)."""
        b, d = x.shape
        p = torch.softmax(self.logits(x), dim=-1)  # (B, C)
        s = p.sqrt()
        m = torch.diag_embed(s) - s.unsqueeze(-1) * p.unsqueeze(-2)  # (B, C, C)
        rb = (m @ self.weight) / math.sqrt(b)  # (B, C, d)
        c = p.shape[1]
        r = torch.zeros(b, c, b, d, dtype=x.dtype, device=x.device)
        idx = torch.arange(b, device=x.device)
        r[idx, :, idx, :] = rb
        return r.reshape(b * c, b, d)


def sampled_cross_entropy(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mean cross-entropy against labels drawn from the model's own softmax (not the data's).

    Its gradient's second moment over the draws is the true Fisher of the categorical
    likelihood, which equals the Gauss-Newton matrix of the cross-entropy: E_y[∇ℓ_y ∇ℓ_yᵀ]
    = Jᵀ(diag p − ppᵀ)J. Give it to `SNOpt.collect` on collection iterations for
    Monte-Carlo Fisher factors instead of the empirical ones.

    Args:
        logits: Logits (B, C) of this iteration's forward pass.
        generator: Random generator for the draws (None: torch's global one).

    Returns:
        The scalar loss (differentiable in `logits`; the labels are not).
    """
    if logits.ndim != 2:
        raise ValueError(f"`logits` must be (B, C); got shape {tuple(logits.shape)}.")
    with torch.no_grad():
        probs = torch.softmax(logits.detach().to(torch.float64), dim=-1).cpu()
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
    return torch.nn.functional.cross_entropy(logits, labels)
