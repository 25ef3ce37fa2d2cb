"""Eigenbasis and eigen-corrected update against dense formulas built explicitly."""

import warnings
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from snopt.curvature import (
    CurvatureWarning,
    EigenBasis,
    KronFactors,
    eigenbasis,
    init_second_moment,
    precondition,
    precondition_,
    rotate,
    unrotate,
)

torch.set_num_threads(1)
DT = torch.float64
seeds = st.integers(0, 2**31 - 1)
dims = st.integers(1, 4)


def _psd(d: int, gen: torch.Generator, rank: int | None = None) -> Tensor:
    x = torch.randn(rank or d + 1, d, dtype=DT, generator=gen)
    return x.T @ x / x.shape[0]


def _factors(d_in: int, d_out: int, gen: torch.Generator) -> KronFactors:
    return KronFactors(A=_psd(d_in, gen), G=_psd(d_out, gen), weight=torch.ones((), dtype=DT))


def _vec(x: Tensor) -> Tensor:
    """Column-major vec, the maths convention of DESIGN §2."""
    return x.T.reshape(-1)


def _unvec(v: Tensor, d_out: int, d_in: int) -> Tensor:
    return v.reshape(d_in, d_out).T


@given(d_in=dims, d_out=dims, damping=st.sampled_from([0.0, 0.3]), low_rank=st.booleans(), seed=seeds)
def test_eigenbasis_diagonalises_the_factors(d_in: int, d_out: int, damping: float, low_rank: bool,
                                             seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rank = 1 if low_rank else None
    f = KronFactors(A=_psd(d_in, gen, rank), G=_psd(d_out, gen, rank), weight=torch.ones((), dtype=DT))
    b = eigenbasis(f, damping=damping)
    for u, lam, m in ((b.U_A, b.lam_A, f.A), (b.U_G, b.lam_G, f.G)):
        torch.testing.assert_close(u.T @ u, torch.eye(m.shape[0], dtype=DT), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(u @ torch.diag(lam) @ u.T, m + damping * torch.eye(m.shape[0], dtype=DT),
                                   rtol=1e-10, atol=1e-10)
        assert bool((lam >= damping).all())


def test_negative_eigenvalues_are_clamped() -> None:
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(0)))
    a = q @ torch.diag(torch.tensor([-1e-3, 0.5, 2.0], dtype=DT)) @ q.T
    b = eigenbasis(KronFactors(A=a, G=torch.eye(2, dtype=DT), weight=torch.ones((), dtype=DT)), damping=0.1)
    torch.testing.assert_close(b.lam_A, torch.tensor([0.1, 0.6, 2.1], dtype=DT), rtol=1e-12, atol=1e-12)


@given(d_in=dims, d_out=dims, alpha=st.floats(0.0, 1.0), eps=st.floats(1e-3, 1.0), scale=st.floats(0.0, 10.0),
       num_locations=st.sampled_from([1.0, 4.0]), seed=seeds)
def test_precondition_equals_dense_eigenbasis_formula(d_in: int, d_out: int, alpha: float, eps: float, scale: float,
                                                      num_locations: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    b = eigenbasis(_factors(d_in, d_out, gen))
    m2 = init_second_moment(b, num_locations)
    grad = torch.randn(d_out, d_in, dtype=DT, generator=gen)
    update, new_m2 = precondition(grad, b, m2, alpha=alpha, eps=eps, scale=scale)
    # Dense: Q = U_A ⊗ U_G (column-major vec); rotated gradient Qᵀ vec(∇W); D = diag(vec(m2_new)).
    q = torch.kron(b.U_A, b.U_G)
    g_rot = q.T @ _vec(grad)
    m2_dense = alpha * num_locations * torch.kron(b.lam_A, b.lam_G) + (1 - alpha) * scale * g_rot**2
    torch.testing.assert_close(_vec(new_m2), m2_dense, rtol=1e-10, atol=1e-12)
    expected = q @ torch.linalg.solve(torch.diag(m2_dense) + eps * torch.eye(d_in * d_out, dtype=DT), g_rot)
    torch.testing.assert_close(_vec(update), expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(m2, init_second_moment(b, num_locations))  # the pure variant leaves m2 alone


@given(d_in=dims, d_out=dims, eps=st.floats(1e-2, 1.0), damping=st.sampled_from([0.0, 0.2]), seed=seeds)
def test_alpha_one_is_kfac_with_damping_eps(d_in: int, d_out: int, eps: float, damping: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    f = _factors(d_in, d_out, gen)
    b = eigenbasis(f, damping=damping)
    grad = torch.randn(d_out, d_in, dtype=DT, generator=gen)
    update, _ = precondition(grad, b, init_second_moment(b), alpha=1.0, eps=eps)
    eye_a, eye_g = torch.eye(d_in, dtype=DT), torch.eye(d_out, dtype=DT)
    block = torch.kron(f.A + damping * eye_a, f.G + damping * eye_g)  # A ⊗ G acting on column-major vec
    expected = torch.linalg.solve(block + eps * torch.eye(d_in * d_out, dtype=DT), _vec(grad))
    torch.testing.assert_close(update, _unvec(expected, d_out, d_in), rtol=1e-9, atol=1e-10)


@given(d_in=dims, d_out=dims, alpha=st.floats(0.0, 1.0), seed=seeds)
def test_in_place_variant_updates_m2_and_agrees(d_in: int, d_out: int, alpha: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    b = eigenbasis(_factors(d_in, d_out, gen))
    m2 = init_second_moment(b)
    grads = [torch.randn(d_out, d_in, dtype=DT, generator=gen) for _ in range(3)]
    pure_m2 = m2.clone()
    for grad in grads:
        pure_update, pure_m2 = precondition(grad, b, pure_m2, alpha=alpha, eps=0.05, scale=3.0)
        ptr = m2.data_ptr()
        update = precondition_(grad, b, m2, alpha=alpha, eps=0.05, scale=3.0)
        assert m2.data_ptr() == ptr
        torch.testing.assert_close(update, pure_update, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(m2, pure_m2, rtol=1e-13, atol=1e-13)


@given(d_in=dims, d_out=dims, seed=seeds)
def test_rotate_unrotate_are_inverse(d_in: int, d_out: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    b = eigenbasis(_factors(d_in, d_out, gen))
    x = torch.randn(d_out, d_in, dtype=DT, generator=gen)
    torch.testing.assert_close(unrotate(rotate(x, b), b), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rotate(x, b), b.U_G.T @ x @ b.U_A)


@given(batch=st.integers(2, 6), d_in=st.integers(2, 3), d_out=st.integers(2, 3), seed=seeds)
def test_ekfac_second_moment_is_closer_to_the_exact_block_than_kfac(batch: int, d_in: int, d_out: int,
                                                                   seed: int) -> None:
    # In the Kronecker eigenbasis, the mean of the rotated per-sample gradients squared (what m2 tracks) is
    # the best diagonal, so EKFAC is at least as close (Frobenius) to E[vec ∇ vec ∇ᵀ] as KFAC (George et al. 2018).
    gen = torch.Generator().manual_seed(seed)
    a, g = torch.randn(batch, d_in, dtype=DT, generator=gen), torch.randn(batch, d_out, dtype=DT, generator=gen)
    grads = [torch.outer(g[n], a[n]) for n in range(batch)]
    exact = sum((torch.outer(_vec(x), _vec(x)) for x in grads), torch.zeros(d_in * d_out, d_in * d_out, dtype=DT))
    exact = exact / batch
    f = KronFactors(A=a.T @ a / batch, G=g.T @ g / batch, weight=torch.ones((), dtype=DT))
    b = eigenbasis(f)
    m2 = torch.zeros(d_out, d_in, dtype=DT)
    for x in grads:
        _, sq = precondition(x, b, torch.zeros_like(m2), alpha=0.0, eps=1.0)  # alpha = 0: new m2 = G̃²
        m2 += sq / batch
    q = torch.kron(b.U_A, b.U_G)
    ekfac = q @ torch.diag(_vec(m2)) @ q.T
    kfac = torch.kron(f.A, f.G)
    assert float(torch.linalg.norm(exact - ekfac)) <= float(torch.linalg.norm(exact - kfac)) * (1 + 1e-12) + 1e-12


def _raising_eigh(fail_dtypes: tuple[torch.dtype, ...]) -> Any:
    real = torch.linalg.eigh

    def eigh(m: Tensor, *args: Any, **kwargs: Any) -> Any:
        if m.dtype in fail_dtypes:
            raise torch.linalg.LinAlgError("simulated non-convergence")  # type: ignore[attr-defined]
        return real(m, *args, **kwargs)

    return eigh


def test_eigh_failure_in_float32_falls_back_to_float64_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    f64 = _factors(3, 2, gen)
    f32 = KronFactors(A=f64.A.float(), G=f64.G.float(), weight=torch.ones(()))
    monkeypatch.setattr(torch.linalg, "eigh", _raising_eigh((torch.float32,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = eigenbasis(f32)
    assert b.U_A.dtype == b.lam_G.dtype == torch.float32
    torch.testing.assert_close(b.U_A @ torch.diag(b.lam_A) @ b.U_A.T, f32.A, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eigh_failure_everywhere_warns_and_stays_finite(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    f = _factors(3, 2, gen)
    f = KronFactors(A=f.A.to(dtype), G=f.G.to(dtype), weight=torch.ones((), dtype=dtype))
    monkeypatch.setattr(torch.linalg, "eigh", _raising_eigh((torch.float32, torch.float64)))
    with pytest.warns(CurvatureWarning, match="did not converge") as record:
        b = eigenbasis(f, damping=0.5)
    assert len(record) == 2  # one warning per factor
    torch.testing.assert_close(b.U_A, torch.eye(3, dtype=dtype))
    torch.testing.assert_close(b.lam_G, torch.full((2,), 1.5, dtype=dtype))
    update, m2 = precondition(torch.randn(2, 3, dtype=dtype, generator=gen), b, init_second_moment(b), alpha=0.75,
                              eps=0.1)
    assert bool(torch.isfinite(update).all()) and bool(torch.isfinite(m2).all())


def test_non_finite_factor_warns_and_stays_finite() -> None:
    a = torch.eye(2, dtype=DT)
    a[0, 1] = a[1, 0] = float("nan")
    with pytest.warns(CurvatureWarning, match="Kronecker factor A .* holds NaN or inf"):
        b = eigenbasis(KronFactors(A=a, G=torch.eye(3, dtype=DT), weight=torch.ones((), dtype=DT)))
    assert all(bool(torch.isfinite(t).all()) for t in (b.U_A, b.U_G, b.lam_A, b.lam_G))


def _basis() -> EigenBasis:
    return eigenbasis(KronFactors(A=torch.eye(3, dtype=DT), G=torch.eye(2, dtype=DT), weight=torch.ones((), dtype=DT)))


ERROR_CASES = [
    ("damping", lambda: eigenbasis(KronFactors.zeros(2, 2), damping=-1.0),
     r"`damping` must be a non-negative finite number; got -1.0"),
    ("num_locations", lambda: init_second_moment(_basis(), 0.0), r"`num_locations` must be positive; got 0.0"),
    ("grad shape", lambda: precondition(torch.zeros(3, 2, dtype=DT), _basis(), torch.zeros(2, 3, dtype=DT),
                                        alpha=0.5, eps=0.1),
     r"`grad_mat` must have shape \(d_out, d_in\) = \(2, 3\) to match the eigenbasis; got \(3, 2\)"),
    ("m2 shape", lambda: precondition(torch.zeros(2, 3, dtype=DT), _basis(), torch.zeros(3, 2, dtype=DT),
                                      alpha=0.5, eps=0.1),
     r"`m2` must have shape \(d_out, d_in\) = \(2, 3\); got \(3, 2\)"),
    ("m2 dtype", lambda: precondition_(torch.zeros(2, 3, dtype=DT), _basis(), torch.zeros(2, 3), alpha=0.5, eps=0.1),
     r"`m2` must have the eigenbasis' dtype torch.float64; got torch.float32"),
    ("alpha", lambda: precondition(torch.zeros(2, 3, dtype=DT), _basis(), torch.zeros(2, 3, dtype=DT),
                                   alpha=1.5, eps=0.1),
     r"`alpha` must be in \[0, 1\]; got 1.5"),
    ("eps", lambda: precondition(torch.zeros(2, 3, dtype=DT), _basis(), torch.zeros(2, 3, dtype=DT),
                                 alpha=0.5, eps=0.0),
     r"`eps` must be a positive finite damping; got 0.0"),
    ("scale", lambda: precondition(torch.zeros(2, 3, dtype=DT), _basis(), torch.zeros(2, 3, dtype=DT),
                                   alpha=0.5, eps=0.1, scale=-2.0),
     r"`scale` must be a non-negative finite number; got -2.0"),
    ("rotate shape", lambda: rotate(torch.zeros(3, 3, dtype=DT), _basis()), r"`grad_mat` must have shape"),
]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors(call: object, match: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=match):
        call()
