"""Eigenbasis and eigen-corrected update against dense formulas built explicitly."""

import warnings
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from snopt.curvature import (
    CurvatureWarning,
    EigenBasis,
    KronFactors,
    eigenbases,
    eigenbasis,
    init_second_moment,
    init_second_moments,
    precondition,
    precondition_,
    project_eigenvalues,
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


# ----------------------------------------------------------------------------------------------
# The batched refresh: eigenbases, init_second_moments, project_eigenvalues
# ----------------------------------------------------------------------------------------------

class _CountingEigh:
    """A stand-in for torch.linalg.eigh that records (shape, dtype) per call and can fail on chosen inputs.

    ``raise_if(m)`` → LinAlgError; ``nan_if(m)`` → the real result with the eigenvalues set to NaN.
    """

    def __init__(self, raise_if: Any = None, nan_if: Any = None) -> None:
        self.real = torch.linalg.eigh
        self.calls: list[tuple[tuple[int, ...], torch.dtype]] = []
        self.raise_if, self.nan_if = raise_if, nan_if

    def __call__(self, m: Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((tuple(m.shape), m.dtype))
        if self.raise_if is not None and self.raise_if(m):
            raise torch.linalg.LinAlgError("simulated non-convergence")  # type: ignore[attr-defined]
        lam, u = self.real(m, *args, **kwargs)
        if self.nan_if is not None and self.nan_if(m):
            lam = torch.full_like(lam, float("nan"))
        return lam, u


def _marked(value: float) -> Any:
    """A predicate: the stack holds a matrix whose [0, 0] entry is exactly `value` (float32 only)."""
    return lambda m: m.dtype == torch.float32 and bool((m[..., 0, 0] == value).any())


def _layers(sizes: list[tuple[int, int, bool]], gen: torch.Generator, dtype: torch.dtype = DT) -> list[KronFactors]:
    out = []
    for d_in, d_out, low_rank in sizes:
        rank = 1 if low_rank else None
        out.append(KronFactors(A=_psd(d_in, gen, rank).to(dtype), G=_psd(d_out, gen, rank).to(dtype),
                               weight=torch.ones((), dtype=dtype)))
    return out


def _assert_basis_of(b: EigenBasis, f: KronFactors, damping: float, tol: float = 1e-10) -> None:
    """b diagonalises f's factors (+ damping·I), against an independent per-matrix eigh in float64."""
    for u, lam, m in ((b.U_A, b.lam_A, f.A), (b.U_G, b.lam_G, f.G)):
        m64, eye = m.double(), torch.eye(m.shape[0], dtype=DT)
        assert u.dtype == lam.dtype == m.dtype
        ref = torch.linalg.eigvalsh(m64).clamp(min=0.0) + damping
        torch.testing.assert_close(lam.double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(u.double().T @ u.double(), eye, rtol=tol, atol=tol)
        torch.testing.assert_close(u.double() @ torch.diag(lam.double()) @ u.double().T, m64 + damping * eye,
                                   rtol=tol, atol=tol)


layer_sets = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4), st.booleans()), min_size=1, max_size=6)


@given(sizes=layer_sets, damping=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_batched_refresh_equals_the_per_layer_one(sizes: list[tuple[int, int, bool]], damping: float,
                                                  seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layers = _layers(sizes, gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refresh = eigenbases(layers, damping=damping)
    assert not (refresh.empty or refresh.nonfinite or refresh.identity or refresh.retried)
    assert refresh.host_syncs == 1
    assert refresh.eigh_groups == len({d for d_in, d_out, _ in sizes for d in (d_in, d_out)})
    m2s = init_second_moments(refresh.bases)
    for f, b, m2 in zip(layers, refresh.bases, m2s, strict=True):
        assert b is not None and m2 is not None
        _assert_basis_of(b, f, damping)
        single = eigenbasis(f, damping=damping)
        torch.testing.assert_close(b.lam_A, single.lam_A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.lam_G, single.lam_G, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m2, init_second_moment(single), rtol=1e-12, atol=1e-12)
        # the KFAC update (alpha = 1) is basis-invariant: it must agree even inside repeated eigenvalues
        grad = torch.randn(f.G.shape[0], f.A.shape[0], dtype=DT, generator=gen)
        update, _ = precondition(grad, b, m2, alpha=1.0, eps=0.1)
        ref, _ = precondition(grad, single, init_second_moment(single), alpha=1.0, eps=0.1)
        torch.testing.assert_close(update, ref, rtol=1e-9, atol=1e-10)


@given(sizes=layer_sets, seed=seeds)
def test_one_eigh_call_per_size_dtype_group(sizes: list[tuple[int, int, bool]], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtypes = [DT, torch.float32, torch.float16]
    layers = [KronFactors(A=f.A.to(dtypes[n % 3]), G=f.G.to(dtypes[n % 3]), weight=f.weight)
              for n, f in enumerate(_layers(sizes, gen))]
    counting = _CountingEigh()
    with mock.patch.object(torch.linalg, "eigh", counting):
        refresh = eigenbases(layers)
    groups: dict[tuple[int, torch.dtype], int] = {}
    for f in layers:
        for m in (f.A, f.G):
            groups[m.shape[0], m.dtype] = groups.get((m.shape[0], m.dtype), 0) + 1
    work = {DT: DT, torch.float32: torch.float32, torch.float16: DT}
    expected = [((k, d, d), work[dt]) for (d, dt), k in groups.items()]
    assert sorted(counting.calls, key=str) == sorted(expected, key=str), counting.calls
    assert refresh.eigh_groups == len(groups) and refresh.host_syncs == 1
    for f, b in zip(layers, refresh.bases, strict=True):
        assert b is not None
        _assert_basis_of(b, f, 0.0, tol={DT: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2}[f.A.dtype])


def _same_size_layers(n: int = 3, d_in: int = 3, d_out: int = 2, dtype: torch.dtype = DT) -> list[KronFactors]:
    return _layers([(d_in, d_out, False)] * n, torch.Generator().manual_seed(1), dtype)


def test_a_non_finite_factor_keeps_only_its_layers_previous_basis() -> None:
    layers = _same_size_layers()  # all A's in one stack, all G's in another
    layers[1].A[0, 1] = layers[1].A[1, 0] = float("nan")
    counting = _CountingEigh()
    with mock.patch.object(torch.linalg, "eigh", counting), \
            pytest.warns(CurvatureWarning, match="Non-finite Kronecker factors for layer 'b': keeping its previous "
                                                 "eigenbasis") as record:
        refresh = eigenbases(layers, damping=0.2, names=["a", "b", "c"])
    assert len(record) == 1 and len(counting.calls) == 2  # the NaN never reaches eigh, nor splits the batch
    assert refresh.bases[1] is None and refresh.nonfinite == [1] and not refresh.identity and not refresh.empty
    for i in (0, 2):
        b = refresh.bases[i]
        assert b is not None
        _assert_basis_of(b, layers[i], 0.2)


def test_a_non_finite_factor_gets_the_identity_with_on_nonfinite_identity() -> None:
    layers = _same_size_layers()
    layers[1].A[2, 2] = float("inf")
    with pytest.warns(CurvatureWarning, match=r"Kronecker factor A of layer 1 \(3×3, torch.float64\) was skipped "
                                              "because the factor holds NaN or inf") as record:
        refresh = eigenbases(layers, damping=0.2, on_nonfinite="identity")
    assert len(record) == 1 and refresh.nonfinite == [1] and refresh.identity == [(1, "A")]
    b = refresh.bases[1]
    assert b is not None
    torch.testing.assert_close(b.U_A, torch.eye(3, dtype=DT))
    torch.testing.assert_close(b.lam_A, torch.full((3,), 1.2, dtype=DT))
    torch.testing.assert_close(b.U_G @ torch.diag(b.lam_G) @ b.U_G.T, layers[1].G + 0.2 * torch.eye(2, dtype=DT),
                               rtol=1e-10, atol=1e-10)  # its finite G got its real basis
    for i in (0, 2):
        other = refresh.bases[i]
        assert other is not None
        _assert_basis_of(other, layers[i], 0.2)


def test_a_failing_batch_retries_only_its_failing_member_in_float64() -> None:
    layers = _same_size_layers(dtype=torch.float32)
    layers[1].A[0, 0] = 7.0  # the counting eigh raises on any float32 stack holding it
    counting = _CountingEigh(raise_if=_marked(7.0))
    with mock.patch.object(torch.linalg, "eigh", counting), warnings.catch_warnings():
        warnings.simplefilter("error")  # rescued in float64: silent
        refresh = eigenbases(layers)
    # A's: the batch (raises), each member alone in float32 (the marked one raises); G's: one batch;
    # after the one flag read: the marked A alone in float64
    assert counting.calls == [((3, 3, 3), torch.float32), ((1, 3, 3), torch.float32), ((1, 3, 3), torch.float32),
                              ((1, 3, 3), torch.float32), ((3, 2, 2), torch.float32), ((1, 3, 3), torch.float64)]
    assert refresh.retried == [(1, "A")] and not refresh.identity
    for f, b in zip(layers, refresh.bases, strict=True):
        assert b is not None
        _assert_basis_of(b, f, 0.0, tol=1e-4)


def test_a_non_finite_decomposition_retries_only_its_member_in_float64() -> None:
    layers = _same_size_layers(dtype=torch.float32)
    layers[2].G[0, 0] = 5.0
    counting = _CountingEigh(nan_if=_marked(5.0))  # NaN eigenvalues for the whole float32 stack holding it
    with mock.patch.object(torch.linalg, "eigh", counting), warnings.catch_warnings():
        warnings.simplefilter("error")
        refresh = eigenbases(layers)
    # the NaN stack marks every G as failed, so all three are retried in float64, batched
    assert counting.calls == [((3, 3, 3), torch.float32), ((3, 2, 2), torch.float32), ((3, 2, 2), torch.float64)]
    assert refresh.retried == [(0, "G"), (1, "G"), (2, "G")] and refresh.host_syncs == 2
    for f, b in zip(layers, refresh.bases, strict=True):
        assert b is not None
        _assert_basis_of(b, f, 0.0, tol=1e-4)


def test_a_member_failing_in_float64_too_gets_the_identity_alone() -> None:
    layers = _same_size_layers(dtype=torch.float32)
    layers[0].A[0, 0] = 7.0
    counting = _CountingEigh(raise_if=lambda m: bool((m[..., 0, 0] == 7.0).any()))  # float32 and float64
    with mock.patch.object(torch.linalg, "eigh", counting), \
            pytest.warns(CurvatureWarning, match=r"Kronecker factor A of layer 0 \(3×3, torch.float32\) did not "
                                                 "converge in torch.float32, then did not converge in torch.float64"
                         ) as record:
        refresh = eigenbases(layers, damping=0.5)
    assert len(record) == 1 and refresh.identity == [(0, "A")] and not refresh.retried
    b0 = refresh.bases[0]
    assert b0 is not None
    torch.testing.assert_close(b0.U_A, torch.eye(3))
    torch.testing.assert_close(b0.lam_A, torch.full((3,), 1.5))
    for i in (1, 2):
        b = refresh.bases[i]
        assert b is not None
        _assert_basis_of(b, layers[i], 0.5, tol=1e-4)


def test_empty_layers_get_none_silently() -> None:
    layers: list[KronFactors | None] = list(_same_size_layers())
    layers[0] = None
    assert layers[2] is not None
    layers[2].weight.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refresh = eigenbases(layers)
        kept = eigenbases(layers, skip_empty=False)
    assert refresh.bases[0] is None and refresh.bases[2] is None and refresh.bases[1] is not None
    assert refresh.empty == [0, 2] and not refresh.nonfinite
    assert kept.empty == [0] and kept.bases[2] is not None and kept.host_syncs == 1
    assert eigenbases([]).bases == [] and eigenbases([None]).empty == [0]


def test_half_precision_factors_are_decomposed_in_float64() -> None:
    f = _factors(3, 2, torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16):
        half = KronFactors(A=f.A.to(dtype), G=f.G.to(dtype), weight=torch.ones(()))
        counting = _CountingEigh()
        with mock.patch.object(torch.linalg, "eigh", counting):
            b = eigenbasis(half)
        assert {dt for _, dt in counting.calls} == {DT}
        _assert_basis_of(b, half, 0.0, tol=2e-2)


def test_the_bases_do_not_alias_the_factors() -> None:
    layers = _same_size_layers()
    before = [(f.A.clone(), f.G.clone()) for f in layers]
    refresh = eigenbases(layers)
    for (a, g), f, b in zip(before, layers, refresh.bases, strict=True):
        assert b is not None
        torch.testing.assert_close(f.A, a, rtol=0, atol=0)
        torch.testing.assert_close(f.G, g, rtol=0, atol=0)
        assert not any(t.untyped_storage().data_ptr() in (f.A.untyped_storage().data_ptr(),
                                                          f.G.untyped_storage().data_ptr())
                       for t in (b.U_A, b.U_G, b.lam_A, b.lam_G))


def test_init_second_moments_per_layer_and_in_place_updates_stay_per_layer() -> None:
    gen = torch.Generator().manual_seed(3)
    bases: list[EigenBasis | None] = list(eigenbases(_layers([(3, 2, False), (2, 3, False), (3, 2, True)],
                                                             gen)).bases)
    bases.insert(1, None)
    locs = [1.0, 2.0, 4.0, 1.0]
    m2s = init_second_moments(bases, locs)
    assert m2s[1] is None
    for b, m2, n in zip(bases, m2s, locs, strict=True):
        if b is not None:
            assert m2 is not None
            torch.testing.assert_close(m2, init_second_moment(b, n), rtol=1e-14, atol=0)
    m0, m3 = m2s[0], m2s[3]
    assert m0 is not None and m3 is not None and bases[0] is not None
    m3_before = m3.clone()
    precondition_(torch.randn(2, 3, dtype=DT, generator=gen), bases[0], m0, alpha=0.5, eps=0.1)
    torch.testing.assert_close(m3, m3_before, rtol=0, atol=0)  # same shape, same stack: untouched
    assert init_second_moments(bases, 3.0)[0] is not None


@given(d_in=dims, d_out=dims, damping=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_project_eigenvalues_is_the_diagonal_of_the_block_in_the_old_basis(d_in: int, d_out: int, damping: float,
                                                                           seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    old, new = _factors(d_in, d_out, gen), _factors(d_in, d_out, gen)
    b_old = eigenbasis(old)
    same = project_eigenvalues(old, b_old, damping=damping)  # its own basis: its eigenvalues
    torch.testing.assert_close(same.lam_A, eigenbasis(old, damping=damping).lam_A, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(same.lam_G, eigenbasis(old, damping=damping).lam_G, rtol=1e-10, atol=1e-10)
    p = project_eigenvalues(new, b_old)
    assert p.U_A is b_old.U_A and p.U_G is b_old.U_G
    q = torch.kron(b_old.U_A, b_old.U_G)  # column-major vec: the block is A ⊗ G
    dense = torch.diagonal(q.T @ torch.kron(new.A, new.G) @ q)
    torch.testing.assert_close(_vec(init_second_moment(p)), dense, rtol=1e-10, atol=1e-10)


BATCHED_ERROR_CASES = [
    ("on_nonfinite", lambda: eigenbases([], on_nonfinite="drop"), r"`on_nonfinite` must be 'keep' or 'identity'"),
    ("names", lambda: eigenbases([None], names=["a", "b"]), r"`names` must name every layer: got 2 names for 1"),
    ("damping", lambda: eigenbases([], damping=float("inf")), r"`damping` must be a non-negative finite number"),
    ("square", lambda: eigenbases([KronFactors(A=torch.zeros(2, 3), G=torch.eye(2), weight=torch.ones(()))]),
     r"Kronecker factor A of layer 0 must be a square floating matrix; got shape \(2, 3\)"),
    ("locations", lambda: init_second_moments([_basis()], [1.0, 2.0]), r"one entry per basis: got 2 for 1"),
    ("locations > 0", lambda: init_second_moments([_basis()], [0.0]), r"`num_locations` must be positive"),
    ("projection", lambda: project_eigenvalues(KronFactors.zeros(2, 2), _basis()), r"must match the basis"),
    ("projection damping", lambda: project_eigenvalues(KronFactors.zeros(3, 2, dtype=DT), _basis(), damping=-1.0),
     r"`damping` must be a non-negative finite number"),
]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in BATCHED_ERROR_CASES],
                         ids=[c[0] for c in BATCHED_ERROR_CASES])
def test_batched_errors(call: object, match: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=match):
        call()
