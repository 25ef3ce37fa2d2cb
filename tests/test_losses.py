"""snopt.losses: values, Hessian roots (Φ_xx = RᵀR) against torch.func.hessian, and argument errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import hessian

from snopt.losses import LinearCrossEntropy, MSELoss, sampled_cross_entropy

# RᵀR and torch.func.hessian are two float64 evaluations of the same closed form: they agree
# to a few ulps of the largest entry (≤ 1e-15 measured); 1e-12 leaves room for shape-dependent
# summation order. A wrong scale (e.g. 1/numel vs 2/numel) or a missing −ppᵀ is an O(1) error.
TOL = 1e-12


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gram(roots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    assert roots.shape[1:] == x.shape
    r = roots.reshape(roots.shape[0], -1)
    return r.T @ r


def _dense_hessian(loss: object, x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    return hessian(lambda flat: loss(flat.reshape(x.shape)))(x.reshape(-1)).reshape(n, n)  # type: ignore[operator]


@settings(max_examples=max(2, settings().max_examples))
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), reduction=st.sampled_from(["mean", "sum"]),
       seed=st.integers(0, 2**31 - 1))
def test_mse_value_and_hessian_roots(shape: list[int], reduction: str, seed: int) -> None:
    g = _gen(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    target = torch.randn(*shape, generator=g, dtype=torch.float64)
    loss = MSELoss(target, reduction=reduction)
    expected = torch.nn.functional.mse_loss(x, target, reduction=reduction)
    assert torch.allclose(loss(x), expected, rtol=1e-14, atol=0)
    roots = loss.hessian_roots(x)
    assert roots.shape == (x.numel(), *x.shape)
    h = _dense_hessian(loss, x)
    assert torch.allclose(_gram(roots, x), h, rtol=0, atol=TOL * float(h.abs().max()))


@settings(max_examples=max(2, settings().max_examples))
@given(batch=st.integers(1, 5), dim=st.integers(1, 4), classes=st.integers(2, 5), bias=st.booleans(),
       scale=st.floats(0.1, 5.0), seed=st.integers(0, 2**31 - 1))
def test_linear_cross_entropy_value_and_hessian_roots(batch: int, dim: int, classes: int, bias: bool, scale: float,
                                                      seed: int) -> None:
    g = _gen(seed)
    w = scale * torch.randn(classes, dim, generator=g, dtype=torch.float64)
    c = torch.randn(classes, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, classes, (batch,), generator=g)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    loss = LinearCrossEntropy(w, c, labels)
    expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w, c), labels)
    assert torch.allclose(loss(x), expected, rtol=1e-14, atol=1e-15)
    roots = loss.hessian_roots(x)
    assert roots.shape == (batch * classes, batch, dim)
    h = _dense_hessian(loss, x)
    assert torch.allclose(_gram(roots, x), h, rtol=0, atol=TOL * float(h.abs().max()))


def test_cross_entropy_roots_block_diagonal_over_batch() -> None:
    """Samples do not interact: the roots of sample b touch only x_b."""
    g = _gen(0)
    loss = LinearCrossEntropy(torch.randn(3, 2, generator=g, dtype=torch.float64), None, torch.tensor([0, 2, 1]))
    roots = loss.hessian_roots(torch.randn(3, 2, generator=g, dtype=torch.float64)).reshape(3, 3, 3, 2)
    for b in range(3):
        for other in range(3):
            if other != b:
                assert torch.all(roots[b, :, other] == 0)


def test_mse_roots_scale() -> None:
    """Φ = (1/N) Σ (x − y)² has Φ_xx = (2/N) I, i.e. R = sqrt(2/N) I."""
    x = torch.zeros(2, 3, dtype=torch.float64)
    roots = MSELoss(torch.ones(2, 3, dtype=torch.float64)).hessian_roots(x)
    assert torch.allclose(roots.reshape(6, 6), math.sqrt(2 / 6) * torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize(("make", "match"), [
    (lambda: MSELoss(torch.zeros(3), reduction="none"), "`reduction` must be 'mean' or 'sum'; got 'none'"),
    (lambda: MSELoss(torch.zeros(3), reduction="Mean"), "`reduction` must be 'mean' or 'sum'"),
    (lambda: LinearCrossEntropy(torch.zeros(4), None, torch.zeros(2, dtype=torch.long)),
     r"`weight` must be \(C, d\); got shape \(4,\)"),
    (lambda: LinearCrossEntropy(torch.zeros(1, 2, 3), None, torch.zeros(2, dtype=torch.long)),
     r"`weight` must be \(C, d\); got shape \(1, 2, 3\)"),
], ids=["mse-reduction-none", "mse-reduction-case", "ce-weight-1d", "ce-weight-3d"])
def test_bad_arguments(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


@pytest.mark.parametrize(("bias", "labels", "match"), [
    (torch.zeros(3), torch.zeros(4, dtype=torch.int64), "bias"),
    (None, torch.zeros(4, 2, dtype=torch.int64), "labels"),
    (None, torch.zeros(4), "labels"),
], ids=["bias-shape", "labels-2d", "labels-float"])
def test_linear_cross_entropy_rejects_bad_bias_and_labels(bias, labels, match) -> None:
    with pytest.raises(ValueError, match=match):
        LinearCrossEntropy(torch.zeros(5, 2), bias, labels)


def test_sampled_cross_entropy_draws_from_the_softmax_and_differentiates_the_logits() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]], dtype=torch.float64).repeat(20_000, 1).requires_grad_()
    gen = torch.Generator().manual_seed(0)
    loss = sampled_cross_entropy(logits, gen)
    (grad,) = torch.autograd.grad(loss, logits)
    p = torch.softmax(logits.detach()[0], dim=0)
    # ∂CE/∂logits = (p − e_y)/B per row, so each row's e_y is p − B·grad: a one-hot of the drawn label.
    e = p - grad * logits.shape[0]
    assert torch.allclose(e.sum(1), torch.ones(len(e), dtype=e.dtype), atol=1e-12)
    assert torch.allclose(e.max(1).values, torch.ones(len(e), dtype=e.dtype), atol=1e-12)
    freq = e.mean(0)
    # Label frequencies match the softmax: each within 5 standard errors sqrt(p(1−p)/N).
    se = (p * (1 - p) / len(e)).sqrt()
    assert torch.all((freq - p).abs() < 5 * se), (freq, p)
    with pytest.raises(ValueError, match="logits"):
        sampled_cross_entropy(torch.zeros(3))
