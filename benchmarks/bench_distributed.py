"""Data-parallel SNOpt on the digits task: communication volume and wall-clock per iteration.

Model (the paper's MNIST model scaled to 8×8 digits): conv stem 1→64 (3×3) → 64→64 (4×4, stride 2)
→ ODEBlock of two time-concatenated 3×3 convs on a 64×4×4 state (dopri5, rtol = atol = 1e-3)
→ global average pool → linear 64→10; float32, SGD(0.02, momentum 0.9) under SNOpt with
``update_freq=2`` (every other iteration collects factors and refreshes the eigenbases).
The global batch (128) is split over W ranks (strong scaling); every rank runs one thread.

Two ways to run:

* ``python benchmarks/bench_distributed.py [--procs 1 2 4] [--iters 6]``: launches W gloo
  ranks for each W (torchrun-style env rendezvous on a free port), times each iteration (the
  slowest rank's wall-clock between barriers), records what SNOpt's collectives carried, and
  writes benchmarks/results/distributed_cpu.md with a projection for N GPUs from the measured
  factor sizes. ``--eigh-times FILE`` adds eigendecomposition times measured elsewhere (JSON
  ``{"device": ..., "times": {"d": seconds}}``, e.g. on a GPU) to the projection.
* ``pytest benchmarks --benchmark-only -k distributed`` (nox -s bench): the refresh (factor
  packing, eigendecompositions, unpacking) on one rank, in-process.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import snopt
from benchmarks.apps._common import cpu_model
from snopt.curvature._eigen import eigenbasis
from snopt.curvature._kron import KronFactors
from snopt.data import load_digits
from snopt.optim import _distributed as D  # noqa: N812

RESULTS = Path(__file__).resolve().parent / "results" / "distributed_cpu.md"
GLOBAL_BATCH = 128
UPDATE_FREQ = 2
WIDTH = 64


class ConcatConv(nn.Module):
    """3×3 conv of [t, x] (time as an extra input channel)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c + 1, c, 3, padding=1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.conv(torch.cat([torch.ones_like(x[:, :1]) * t, x], 1))
        return out


class Field(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.c2 = ConcatConv(c), ConcatConv(c)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.c2(t, torch.relu(self.c1(t, x)))
        return out


def digits_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, WIDTH, 3, padding=1), nn.ReLU(), nn.Conv2d(WIDTH, WIDTH, 4, stride=2, padding=1),
                         nn.ReLU(), snopt.ODEBlock(Field(WIDTH), method="dopri5", rtol=1e-3, atol=1e-3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, 10))


# ----------------------------------------------------------------------------- one rank
def _timed(fn: Callable[..., Any], acc: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        acc.append(time.perf_counter() - t)
        return out
    return wrapper


def worker(out: Path, iters: int, warmup: int, cuda: bool) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    data = load_digits()
    model = digits_model().to(device)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = snopt.SNOpt(net, torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9), update_freq=UPDATE_FREQ,
                      distributed=True)
    sync = opt._dist
    assert sync is not None
    t_reduce: list[float] = []
    t_eigh: list[float] = []
    t_gather: list[float] = []
    sync.reduce_factors = _timed(sync.reduce_factors, t_reduce)  # type: ignore[method-assign]
    sync._gather_bases = _timed(sync._gather_bases, t_gather)  # type: ignore[method-assign]
    # patch the name _distributed looks up (it imports, but does not re-export, eigenbasis)
    D.eigenbasis = _timed(eigenbasis, t_eigh)  # type: ignore[attr-defined]
    block = model[4]
    assert isinstance(block, snopt.ODEBlock)
    local = GLOBAL_BATCH // world
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.x_train), generator=g)
    records = []
    for it in range(warmup + iters):
        idx = order[(it * GLOBAL_BATCH) % len(order):][:GLOBAL_BATCH][rank * local:(rank + 1) * local]
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        collecting = opt._k % UPDATE_FREQ == 0
        n_r, n_e, n_g = len(t_reduce), len(t_eigh), len(t_gather)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if it >= warmup:
            records.append({"collect": collecting, "fwd_bwd": t1 - t0, "step": t2 - t1, "total": t2 - t0,
                            "reduce": sum(t_reduce[n_r:]), "eigh": sum(t_eigh[n_e:]),
                            "gather_incl_eigh": sum(t_gather[n_g:]), "nfe_f": block.stats.nfe_forward,
                            "nfe_b": block.stats.nfe_backward, "loss": float(loss),
                            "stats": dict(vars(sync.stats)) if collecting else None})
    layers = [{"name": f"{s.collector}/{s.name}", "d_in": s.d_in, "d_out": s.d_out, "owner": sync.owners[i],
               "dtype_bytes": torch.empty((), dtype=s.dtype).element_size()} for i, s in enumerate(sync.specs)]
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, records)
    if rank == 0:
        out.write_text(json.dumps({"world": world, "records": everyone, "layers": layers,
                                   "grad_bytes": grad_bytes, "local_batch": local}))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int, out: Path, iters: int, warmup: int, cuda: bool, timeout: float = 900.0) -> dict[str, Any]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1")
    args = [sys.executable, __file__, "--worker", str(out), "--iters", str(iters), "--warmup", str(warmup)]
    if cuda:
        args.append("--cuda")
    procs = [subprocess.Popen(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    start = time.perf_counter()
    try:
        outs = [p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        if p.returncode != 0:
            raise RuntimeError(f"rank {r} failed (rc {p.returncode}):\n{outs[r][-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# ----------------------------------------------------------------------------- report
def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def eigh_times(dims: list[int], reps: int = 3) -> dict[int, float]:
    """Median seconds of `eigenbasis`'s eigh for a float32 SPD matrix of each size (1 thread)."""
    torch.set_num_threads(1)
    out = {}
    for d in sorted(set(dims)):
        x = torch.randn(4 * d, d)
        f = KronFactors(A=x.T @ x / (4 * d), G=torch.eye(1), weight=torch.ones(()))
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            eigenbasis(f)
            ts.append(time.perf_counter() - t)
        out[d] = _med(ts)
    return out




def _row(res: dict[str, Any]) -> str:
    w = res["world"]
    recs = res["records"]  # per rank: list of iteration records
    its = len(recs[0])
    slowest = [max(recs[r][i]["total"] for r in range(w)) for i in range(its)]
    coll = [i for i in range(its) if recs[0][i]["collect"]]
    plain = [i for i in range(its) if not recs[0][i]["collect"]]
    step_c = [max(recs[r][i]["step"] for r in range(w)) for i in coll]
    red = [max(recs[r][i]["reduce"] for r in range(w)) for i in coll]
    eig = [max(recs[r][i]["eigh"] for r in range(w)) for i in coll]
    gat = [max(recs[r][i]["gather_incl_eigh"] - recs[r][i]["eigh"] for r in range(w)) for i in coll]
    st = recs[0][coll[0]]["stats"]
    nfe = "/".join(str(recs[r][coll[0]]["nfe_b"]) for r in range(w))
    calls = f"{st['allreduce_calls']} + {st['bases_calls']} ({st['bases_method'] or '-'})"
    return (f"| {w} | {res['local_batch']} | {_med([slowest[i] for i in plain]):.3f} | "
            f"{_med([slowest[i] for i in coll]):.3f} | {_med(step_c):.3f} | {_med(red) * 1e3:.1f} | "
            f"{_med(eig):.3f} | {_med(gat) * 1e3:.1f} | {calls} | "
            f"{st['allreduce_bytes'] / 2**20:.2f} | {st['bases_bytes'] / 2**20:.2f} | "
            f"{res['grad_bytes'] / 2**20:.2f} | {nfe} |")


def _lpt_max_share(costs: list[float], n: int) -> float:
    owners = D.assign_layers(costs, n)
    load = [0.0] * n
    for c, o in zip(costs, owners, strict=True):
        load[o] += c
    return max(load) / sum(costs)


def projection(layers: list[dict[str, Any]], grad_bytes: int, eig: dict[int, float],
               gpu: dict[str, Any] | None) -> list[str]:
    def tri(d: int) -> int:
        return d * (d + 1) // 2

    b = layers[0]["dtype_bytes"]
    s_bytes = sum((tri(la["d_in"]) + tri(la["d_out"]) + 6) * b for la in layers)
    eig_numel = [la["d_in"] ** 2 + la["d_out"] ** 2 + la["d_in"] + la["d_out"] for la in layers]
    cpu_t = [eig[la["d_in"]] + eig[la["d_out"]] for la in layers]
    lines = ["", "## Projection for N GPUs (from the measured factor sizes)", "",
             "| layer | A | G | A+G lower triangles (KiB) | eigenbasis payload (KiB) | eigh A+G, CPU 1 thread (ms) |"
             + (" eigh A+G, GPU (ms) |" if gpu else ""),
             "|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    gpu_t: list[float] = []
    for la, n_eig, t in zip(layers, eig_numel, cpu_t, strict=True):
        kib = (tri(la["d_in"]) + tri(la["d_out"])) * b / 1024
        row = f"| {la['name']} | {la['d_in']}² | {la['d_out']}² | {kib:.1f} | {n_eig * b / 1024:.1f} | {t * 1e3:.2f} |"
        if gpu:
            tg = gpu["times"][str(la["d_in"])] + gpu["times"][str(la["d_out"])]
            gpu_t.append(tg)
            row += f" {tg * 1e3:.2f} |"
        lines.append(row)
    lines += ["", f"Per collection iteration: factor all-reduce payload S = {s_bytes / 2**20:.2f} MiB per rank "
              f"(lower triangles + counts), eigenbases {sum(eig_numel) * b / 2**20:.2f} MiB in all; "
              f"DDP's gradient all-reduce {grad_bytes / 2**20:.2f} MiB every iteration.", "",
              "Model (assumptions, not measurements): ring all-reduce moves 2(N−1)/N·S per rank; the eigenbases "
              "travel by all-gather, (N−1)·P_max (P_max = the largest rank's payload under the greedy "
              "assignment), or once ranks outnumber layers by the zero-filled all-reduce, 2(N−1)/N·total; bus "
              "bandwidth 100 GB/s within an NVLink node (N ≤ 8), 20 GB/s between nodes (N > 8), 20 µs per "
              "collective step. The eigendecomposition time per rank is the LPT maximum load "
              "(layer granularity: it stops falling once the largest layer is alone on its rank).", "",
              "| N | eigh share of the busiest rank | eigh per refresh, CPU (ms) |"
              + (" eigh per refresh, GPU (ms) |" if gpu else "")
              + " factor all-reduce (ms) | eigenbases (ms) | refresh comm ÷ update_freq=100 (ms/iteration) |",
              "|---|---|---|" + ("---|" if gpu else "") + "---|---|---|"]
    for n in (1, 2, 4, 8, 16, 32, 64):
        owners = D.assign_layers([float(la["d_in"]) ** 3 + float(la["d_out"]) ** 3 for la in layers], n)
        share = _lpt_max_share([float(la["d_in"]) ** 3 + float(la["d_out"]) ** 3 for la in layers], n)
        per_rank_cpu = max(sum(t for t, o in zip(cpu_t, owners, strict=True) if o == r) for r in range(n))
        p_max = max(sum(e for e, o in zip(eig_numel, owners, strict=True) if o == r) for r in range(n)) * b
        bw, lat = (100e9, 20e-6) if n <= 8 else (20e9, 20e-6)
        ar = 0.0 if n == 1 else 2 * (n - 1) / n * s_bytes / bw + 2 * (n - 1) * lat
        total = sum(eig_numel) * b  # the cheaper of the padded all-gather and the zero-filled all-reduce
        ag = 0.0 if n == 1 else min((n - 1) * p_max / bw + (n - 1) * lat,
                                    2 * (n - 1) / n * total / bw + 2 * (n - 1) * lat)
        row = f"| {n} | {share:.2f} | {per_rank_cpu * 1e3:.1f} |"
        if gpu:
            per_rank_gpu = max(sum(t for t, o in zip(gpu_t, owners, strict=True) if o == r) for r in range(n))
            row += f" {per_rank_gpu * 1e3:.2f} |"
        row += f" {ar * 1e3:.3f} | {ag * 1e3:.3f} | {(ar + ag) * 1e3 / 100:.4f} |"
        lines.append(row)
    if gpu:
        lines += ["", f"GPU eigh times measured on: {gpu['device']} (torch.linalg.eigh, float32, median)."]
    return lines


def _machine(cuda: bool) -> list[str]:
    rows = ["| machine | |", "|---|---|",
            f"| CPU (lscpu model name) | {cpu_model()} |", f"| logical CPUs | {os.cpu_count()} |",
            f"| platform | {platform.platform()} |",
            f"| python / torch | {platform.python_version()} / {torch.__version__} |",
            f"| load average (1 min) at the end | {os.getloadavg()[0]:.1f} |"]
    if cuda:
        rows.append(f"| GPU | {torch.cuda.get_device_name(0)} |")
    return rows


def _table(results: list[dict[str, Any]], cuda: bool) -> list[str]:
    lines = ["| W | local batch | plain iter | collect iter | collect step | factor all-reduce (ms) | eigh | "
             "share bases (ms) | SNOpt collectives | factors MiB | bases MiB | DDP grads MiB | backward NFE "
             "per rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in results]
    cores, top = os.cpu_count() or 1, max(r["world"] for r in results)
    nfe_differ = any(len({rec[i]["nfe_b"] for rec in r["records"]}) > 1
                     for r in results for i in range(len(r["records"][0])))
    last = next(rec["stats"] for rec in results[-1]["records"][0] if rec["collect"])
    notes = [f"SNOpt adds {last['allreduce_calls'] + last['bases_calls'] if top > 1 else 2} "
             "collectives per collection iteration, whatever the solver does, and none in between; the bytes are "
             "fixed by the layer sizes. With dopri5 each rank chooses its own steps on its shard (backward NFE "
             + ("differed between ranks here" if nfe_differ else "were equal between ranks here, but differ from "
                "the single process on the whole batch") + ")."]
    if cuda:
        notes.append("One rank on one GPU (nccl): the distributed code path on CUDA tensors; with one rank "
                     "nothing is communicated.")
    elif top > cores or cores <= 4:
        notes.append(f"**This machine has only {cores} logical CPUs, shared with other work (see the load "
                     "average)**: W ranks of one thread each compete for them (and oversubscribe them once "
                     "W > cores), so the wall-clock here cannot show the scaling W free cores or W GPUs would; "
                     "it shows the structure (collectives, bytes, the eigendecomposition work per rank).")
    else:
        notes.append(f"{cores} logical CPUs, one thread per rank, W ≤ cores. The speed-up stays below W because "
                     "the per-rank batch shrinks while the solver's per-step overhead does not, and the "
                     "eigendecomposition time per rank stops falling once the largest layer (A of 1025²) is "
                     "alone on its rank; ranks without it wait for it in the sharing collective.")
    return [*lines, "", *notes]


def render(results: list[dict[str, Any]], eig: dict[int, float], gpu: dict[str, Any] | None, iters: int,
           cuda: bool = False) -> str:
    lines = ["# Data-parallel SNOpt on the digits task", "",
             f"Generated by `python benchmarks/bench_distributed.py` on {datetime.date.today().isoformat()}.", "",
             *_machine(cuda), "",
             f"Model: conv stem 1→{WIDTH}→{WIDTH} (8×8 → 4×4), ODEBlock of two time-concatenated 3×3 convs on "
             f"{WIDTH}×4×4 (dopri5, rtol = atol = 1e-3), pool, linear → 10; float32; global batch "
             f"{GLOBAL_BATCH} split over W ranks; SNOpt(update_freq={UPDATE_FREQ}, full_precond) over SGD; one "
             f"thread per rank; {iters} timed iterations after one warm-up (half of them collection iterations); "
             f"{'nccl on the GPU' if cuda else 'gloo on the CPU'}.",
             "", "Times are medians over iterations of the slowest rank (seconds unless marked). "
             "\"plain\" = a non-collection iteration; \"collect\" = a collection iteration (factors folded "
             "during the backward solve, then the refresh in `step`). Refresh parts: factor all-reduce "
             "(packing + collective + unpacking), eigendecompositions on the busiest rank, sharing the "
             "eigenbases (collective + unpacking, including the wait for the busiest rank). Bytes are what "
             "each rank hands to SNOpt's collectives per collection iteration, "
             "and to DDP's gradient all-reduce per iteration.", "", *_table(results, cuda)]
    lines += projection(results[0]["layers"], results[0]["grad_bytes"], eig, gpu)
    return "\n".join(lines) + "\n"


def render_section(results: list[dict[str, Any]], iters: int, cuda: bool) -> str:
    """A table-only section to append to an existing report (``--append``)."""
    where = "one GPU, nccl" if cuda else "gloo, CPU"
    return "\n".join(["", f"## Also measured ({where}), {datetime.date.today().isoformat()}, {iters} timed "
                       "iterations", "", *_machine(cuda), "", *_table(results, cuda)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--eigh-times", type=Path, default=None)
    parser.add_argument("--cuda", action="store_true", help="nccl, one GPU per rank")
    parser.add_argument("--append", action="store_true", help="append a table-only section to --out")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.iters, args.warmup, args.cuda)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.procs:
            res = launch(w, Path(tmp) / f"w{w}.json", args.iters, args.warmup, args.cuda)
            results.append(res)
            print(_row(res), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append:
        text = render_section(results, args.iters, args.cuda)
        with args.out.open("a") as f:
            f.write(text)
    else:
        dims = [d for la in results[0]["layers"] for d in (la["d_in"], la["d_out"])]
        gpu = json.loads(args.eigh_times.read_text()) if args.eigh_times else None
        text = render(results, eigh_times(dims), gpu, args.iters, args.cuda)
        args.out.write_text(text)
    print(text)
    return 0


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture
def one_rank() -> Any:
    store = dist.HashStore()  # type: ignore[attr-defined]  # public, but torch's stubs do not re-export it
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_distributed_refresh_one_rank(benchmark: Any, one_rank: None) -> None:
    torch.set_num_threads(1)
    model = digits_model()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.02), update_freq=1, distributed=True)
    data = load_digits()
    F.cross_entropy(model(data.x_train[:32]), data.y_train[:32]).backward()  # type: ignore[no-untyped-call]
    sync = opt._dist
    assert sync is not None
    local = [{n: dataclasses.replace(f, A=f.A.clone(), G=f.G.clone(), weight=f.weight.clone())
              for n, f in c.kron_factors().items()} for c in opt.collectors]

    def refresh() -> None:
        for c, fs in zip(opt.collectors, local, strict=True):  # refill what the previous refresh reset
            for name, f in fs.items():
                c.factors[name] = dataclasses.replace(f, A=f.A.clone(), G=f.G.clone(), weight=f.weight.clone())
        sync.refresh(opt)
    benchmark.pedantic(refresh, rounds=3, iterations=1)
    assert sync.stats.eigh_layers == len(opt.layers)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown, which gloo's threads can abort (pytorch/pytorch#190489)
