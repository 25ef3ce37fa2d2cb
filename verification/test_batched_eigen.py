"""The batched curvature refresh (`eigenbases`) at realistic sizes, on the CPU and (where present) on CUDA.

tests/test_curvature_eigen.py checks the contract on small factors in float64; here the image
model's factor sizes in float32 are checked against a float64 eigh per matrix, and on CUDA
that the refresh agrees with the CPU and that its host synchronisations do not grow with
the number of layers (counted with ``torch.cuda.set_sync_debug_mode``).
"""

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from snopt.curvature import EigenBasis, KronFactors, eigenbases, init_second_moments

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# (d_in, d_out) of the image model with hidden 16 and its stem (benchmarks/bench_refresh.py)
IMAGE_FAST = [(9, 16), (256, 16), (154, 16), (154, 16), (65, 10)]


def _factors(sizes: list[tuple[int, int]], device: str = "cpu", seed: int = 0) -> list[KronFactors]:
    gen = torch.Generator().manual_seed(seed)

    def spd(d: int) -> Tensor:
        x = torch.randn(2 * d, d, generator=gen)
        return (x.T @ x / x.shape[0]).to(device)

    return [KronFactors(A=spd(a), G=spd(g), weight=torch.ones((), device=device)) for a, g in sizes]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _pairs(bases: list[EigenBasis | None], factors: list[KronFactors]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    for b, f in zip(bases, factors, strict=True):
        assert b is not None
        yield b.U_A, b.lam_A, f.A
        yield b.U_G, b.lam_G, f.G


def _check_against_float64(bases: list[EigenBasis | None], factors: list[KronFactors], damping: float) -> None:
    for u, lam, m in _pairs(bases, factors):
        u64, lam64, m64 = u.double().cpu(), lam.double().cpu(), m.double().cpu()
        eye = torch.eye(m.shape[0], dtype=torch.float64)
        ref = torch.linalg.eigvalsh(m64).clamp(min=0.0) + damping
        assert _rel(lam64, ref) < 1e-5
        assert float((u64.T @ u64 - eye).abs().max()) < 1e-4
        assert _rel(u64 @ torch.diag(lam64) @ u64.T, m64 + damping * eye) < 1e-5


def test_float32_image_factors_match_a_float64_eigh() -> None:
    factors = _factors(IMAGE_FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refresh = eigenbases(factors, damping=1e-3)
    assert refresh.eigh_groups == 6 and refresh.host_syncs == 1  # 9, 256, 154, 65, 16, 10
    _check_against_float64(refresh.bases, factors, 1e-3)


@cuda
def test_cuda_refresh_agrees_with_the_cpu() -> None:
    factors = _factors(IMAGE_FAST, "cuda")
    refresh = eigenbases(factors, damping=1e-3)
    assert all(b is not None and b.U_A.is_cuda for b in refresh.bases) and refresh.host_syncs == 1
    _check_against_float64(refresh.bases, factors, 1e-3)
    m2_gpu = init_second_moments(refresh.bases)
    m2_cpu = init_second_moments(eigenbases(_factors(IMAGE_FAST), damping=1e-3).bases)
    for g, c in zip(m2_gpu, m2_cpu, strict=True):
        assert g is not None and c is not None
        assert _rel(g.cpu().double(), c.double()) < 1e-4  # m2 is basis-invariant


def _sync_warnings(factors: list[KronFactors]) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            refresh = eigenbases(factors, damping=1e-3)
            init_second_moments(refresh.bases)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not (refresh.empty or refresh.nonfinite or refresh.identity or refresh.retried)
    return sum("synchroniz" in str(w.message) for w in record)


@cuda
def test_cuda_host_syncs_do_not_grow_with_the_number_of_layers() -> None:
    sizes = [(154, 16), (65, 10)]
    _sync_warnings(_factors(sizes, "cuda"))  # warm-up (cuSOLVER handles, workspaces)
    few = _sync_warnings(_factors(sizes, "cuda"))
    many = _sync_warnings(_factors(sizes * 4, "cuda"))
    assert 1 <= few == many, (few, many)
