"""Curvature refresh: the per-layer loop of SNOpt._refresh against one batched `eigenbases` call.

A refresh turns every preconditioned layer's Kronecker factors into an eigenbasis and an
initial second moment m2 = λ_G λ_Aᵀ. Three ways, on the same float32 factors:

* ``legacy``: the loop as it was before issue #35: per layer ``bool(weight > 0)``, two
  finiteness syncs, then per factor a finiteness sync, one eigh, two more finiteness syncs
  (verbatim copy of the old ``_safe_eigh``), and ``init_second_moment``.
* ``per-layer``: the same loop over today's `eigenbasis` (one layer per call).
* ``batched``: one `eigenbases` call (one eigh per (size, dtype, device), one host sync)
  and one `init_second_moments` call.

Layer sets (d_in, d_out), from the image model of benchmarks/apps/_digits.py: ``image-fast``
(hidden 16: the ODE block's two ConcatConv2d, d_in = 9·(16+1)+1 = 154, d_out = 16, and the
Linear head 16·2·2+1 → 10; with ``full_precond`` the 8×8 stem (9 → 16, 256 → 16)) and
``image-paper`` (hidden 64: 2 × (586, 64), head (65, 10); with the 28×28 stem (9, 64),
2 × (1024, 64)).

Two ways to run:

* ``pytest benchmarks/bench_refresh.py --benchmark-only``: pytest-benchmark, CPU (one
  thread) and, where available, CUDA.
* ``python benchmarks/bench_refresh.py [--reps N] [--device cuda]``: all three interleaved
  per repetition, median of N, printed as a markdown table naming the machine.
"""

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # script mode: make `benchmarks` and `snopt` importable from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.apps._common import cpu_model  # noqa: E402
from snopt.curvature import (  # noqa: E402
    EigenBasis,
    KronFactors,
    eigenbases,
    eigenbasis,
    init_second_moment,
    init_second_moments,
)

LAYER_SETS: dict[str, list[tuple[int, int]]] = {
    "image-fast": [(154, 16), (154, 16), (65, 10)],
    "image-fast+stem": [(9, 16), (256, 16), (154, 16), (154, 16), (65, 10)],
    "image-paper": [(586, 64), (586, 64), (65, 10)],
    "image-paper+stem": [(9, 64), (1024, 64), (1024, 64), (586, 64), (586, 64), (65, 10)],
}
DAMPING = 1e-4


def make_factors(sizes: list[tuple[int, int]], device: str = "cpu", seed: int = 0) -> list[KronFactors]:
    """SPD float32 factors (Gram matrices of 4·d random rows) of the given sizes."""
    gen = torch.Generator().manual_seed(seed)

    def spd(d: int) -> Tensor:
        x = torch.randn(4 * d, d, generator=gen)
        return (x.T @ x / x.shape[0]).to(device)

    return [KronFactors(A=spd(d_in), G=spd(d_out), weight=torch.ones((), device=device)) for d_in, d_out in sizes]


# ---------------------------------------------------------------------------------------------- the three refreshes
_LinAlgError: type[RuntimeError] = torch.linalg.LinAlgError  # type: ignore[attr-defined]


def _legacy_safe_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """The pre-#35 ``_safe_eigh`` (warnings dropped: the benchmark's factors are all fine)."""
    def finite(*xs: Tensor) -> bool:
        return all(bool(torch.isfinite(x).all()) for x in xs)

    eye = (torch.ones(m.shape[0], dtype=m.dtype, device=m.device), torch.eye(m.shape[0], dtype=m.dtype,
                                                                             device=m.device))
    if not finite(m):
        return eye
    work = m if m.dtype in (torch.float32, torch.float64) else m.double()
    try:
        lam, u = torch.linalg.eigh(work)
    except _LinAlgError:
        if work.dtype == torch.float64:
            return eye
        try:
            lam, u = torch.linalg.eigh(work.double())
        except _LinAlgError:
            return eye
    if not finite(lam, u):
        return eye
    return lam.to(m.dtype).clamp_(min=0.0), u.to(m.dtype)


def _legacy_eigenbasis(f: KronFactors, damping: float) -> EigenBasis:
    lam_a, u_a = _legacy_safe_eigh(f.A)
    lam_g, u_g = _legacy_safe_eigh(f.G)
    if damping:
        lam_a.add_(damping)
        lam_g.add_(damping)
    return EigenBasis(U_A=u_a, U_G=u_g, lam_A=lam_a, lam_G=lam_g)


Refresh = Callable[[list[KronFactors]], list[tuple[EigenBasis, Tensor] | None]]


def _loop(decompose: Callable[[KronFactors, float], EigenBasis]) -> Refresh:
    def refresh(factors: list[KronFactors]) -> list[tuple[EigenBasis, Tensor] | None]:
        out: list[tuple[EigenBasis, Tensor] | None] = []
        for f in factors:  # SNOpt._refresh's loop
            if not bool(f.weight > 0) or not (bool(torch.isfinite(f.A).all()) and bool(torch.isfinite(f.G).all())):
                out.append(None)
                continue
            b = decompose(f, DAMPING)
            out.append((b, init_second_moment(b)))
        return out
    return refresh


def batched(factors: list[KronFactors]) -> list[tuple[EigenBasis, Tensor] | None]:
    """One `eigenbases` call and one `init_second_moments` call."""
    bases = eigenbases(factors, damping=DAMPING).bases
    return [None if b is None or m2 is None else (b, m2) for b, m2 in zip(bases, init_second_moments(bases),
                                                                           strict=True)]


REFRESHES: dict[str, Refresh] = {
    "legacy": _loop(_legacy_eigenbasis),
    "per-layer": _loop(lambda f, damping: eigenbasis(f, damping=damping)),
    "batched": batched,
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _check(out: list[tuple[EigenBasis, Tensor] | None], factors: list[KronFactors]) -> None:
    for r, f in zip(out, factors, strict=True):
        assert r is not None
        b, m2 = r
        assert m2.shape == (f.G.shape[0], f.A.shape[0]) and bool(torch.isfinite(m2).all())


# ---------------------------------------------------------------------------------------------- pytest-benchmark
def _bench(benchmark: Any, name: str, layer_set: str, device: str) -> None:
    torch.set_num_threads(1)
    factors = make_factors(LAYER_SETS[layer_set], device)
    refresh = REFRESHES[name]

    def run() -> list[tuple[EigenBasis, Tensor] | None]:
        out = refresh(factors)
        _sync(device)
        return out

    out = benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1)
    _check(out, factors)


@pytest.mark.parametrize("layer_set", list(LAYER_SETS))
@pytest.mark.parametrize("name", list(REFRESHES))
def test_refresh_cpu(benchmark: Any, name: str, layer_set: str) -> None:
    _bench(benchmark, name, layer_set, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layer_set", list(LAYER_SETS))
@pytest.mark.parametrize("name", list(REFRESHES))
def test_refresh_cuda(benchmark: Any, name: str, layer_set: str) -> None:
    _bench(benchmark, name, layer_set, "cuda")


# ---------------------------------------------------------------------------------------------- script mode
def measure(layer_set: str, device: str, reps: int) -> dict[str, list[float]]:
    """Seconds per refresh for each way, interleaved within each repetition (after one warm-up each)."""
    factors = make_factors(LAYER_SETS[layer_set], device)
    times: dict[str, list[float]] = {name: [] for name in REFRESHES}
    for refresh in REFRESHES.values():
        _check(refresh(factors), factors)
    for _ in range(reps):
        for name, refresh in REFRESHES.items():
            _sync(device)
            t = time.perf_counter()
            refresh(factors)
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=9, help="repetitions (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sets", nargs="*", default=list(LAYER_SETS), choices=list(LAYER_SETS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    print(f"Refresh time, float32 factors, damping {DAMPING:g}, {args.device} ({where}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU thread(s), {platform.platform()}; median (min) of {args.reps}.\n")
    names = list(REFRESHES)
    print("| layer set (d_in, d_out) | " + " | ".join(f"{n} (ms)" for n in names) + " | legacy ÷ batched |")
    print("|---|" + "---:|" * (len(names) + 1))
    for layer_set in args.sets:
        times = measure(layer_set, args.device, args.reps)
        med = {n: statistics.median(ts) for n, ts in times.items()}
        cells = " | ".join(f"{med[n] * 1e3:.2f} ({min(times[n]) * 1e3:.2f})" for n in names)
        print(f"| {layer_set} {LAYER_SETS[layer_set]} | {cells} | {med['legacy'] / med['batched']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
