"""Data-parallel SNOpt (DDP, gloo, CPU) equals single-process SNOpt on the concatenated batch.

For W = 2 and 3 processes (started by the test itself as subprocesses, torchrun-style env
rendezvous on a free port, every wait bounded), each rank trains a DDP-wrapped float64
Neural ODE (conv stem → ODEBlock with a conv vector field, rk4 → linear head; full_precond,
so both the ODE collector and the static collector are exercised; "expand" and "reduce"
time sharing) on its shard of a global batch. The reference is one process, no
torch.distributed, trained on the concatenated global batch. After k steps (two factor
refreshes, m2 updates in between):

- parameters equal the reference's to float64 round-off;
- the all-reduced factors (A, G, weight, rows, steps) equal the reference's collector factors;
- all ranks are bit-identical (parameters, eigenbases, m2).

Run one rank by hand: ``python verification/test_distributed_equivalence.py OUT_DIR``
under torchrun (it reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT).
"""

import datetime
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import snopt

B_LOCAL = 4
STEPS = 4
UPDATE_FREQ = 2
SEED = 0
TIMEOUT_S = 240.0
CASES = ("expand", "reduce")  # time_sharing settings, all run by one launch


class ConvField(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.c2(torch.tanh(self.c1(x)))
        return out


def build_model(time_sharing: str) -> nn.Module:
    del time_sharing  # same model for both settings
    torch.manual_seed(SEED)
    c = 3
    return nn.Sequential(
        nn.Conv2d(1, c, 3, stride=2, padding=1),  # (B, 1, 8, 8) → (B, c, 4, 4)
        nn.Tanh(),
        snopt.ODEBlock(ConvField(c), t1=1.0, method="rk4", options={"step_size": 0.25}),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, 5),
    ).double()


def global_batches(world: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1234)
    n = world * B_LOCAL
    return [(torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g))
            for _ in range(STEPS)]


def make_opt(model: nn.Module, params: Any, time_sharing: str, distributed: bool | None) -> snopt.SNOpt:
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return snopt.SNOpt(model, base, eps=0.05, update_freq=UPDATE_FREQ, alpha=0.75, full_precond=True,
                       time_sharing=time_sharing, distributed=distributed)


def _factors_dict(fs: dict[tuple[int, str], Any]) -> dict[str, dict[str, Any]]:
    # DDP's wrapper prefixes the static collector's layer names with "module."
    return {f"{ci}/{name.removeprefix('module.')}": {
        "A": f.A.clone(), "G": f.G.clone(), "weight": float(f.weight), "steps": f.steps, "rows_a": f.rows_a,
        "rows_g": f.rows_g} for (ci, name), f in fs.items()}


def train(world: int, rank: int | None, time_sharing: str) -> dict[str, Any]:
    """Train STEPS steps; rank None: single process on the whole global batch."""
    model = build_model(time_sharing)
    net: nn.Module = model
    if rank is not None:
        net = nn.parallel.DistributedDataParallel(model)
    opt = make_opt(net, net.parameters(), time_sharing, distributed=None if rank is not None else False)
    factors: list[dict[str, dict[str, Any]]] = []
    history: list[list[Tensor]] = []
    for it, (x, y) in enumerate(global_batches(world)):
        if rank is not None:
            x, y = x[rank * B_LOCAL:(rank + 1) * B_LOCAL], y[rank * B_LOCAL:(rank + 1) * B_LOCAL]
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()  # type: ignore[no-untyped-call]
        if rank is None and it % UPDATE_FREQ == 0:
            factors.append(_factors_dict({(ci, name): f for ci, c in enumerate(opt.collectors)
                                          for name, f in c.kron_factors().items()}))
        opt.step()
        if rank is not None and it % UPDATE_FREQ == 0:
            assert opt._dist is not None
            factors.append(_factors_dict(opt._dist.last_factors))
        history.append([p.detach().clone() for p in model.parameters()])
    state = {name: {k: v.clone() for k, v in opt.state[layer.weight].items() if isinstance(v, Tensor)}
             for layer, name in ((la, f"{i}") for i, la in enumerate(opt.layers))}
    batch = {str(i): float(opt.state[la.weight]["batch_size"]) for i, la in enumerate(opt.layers)}
    return {"params": [p.detach().clone() for p in model.parameters()], "factors": factors, "state": state,
            "batch_size": batch, "history": history}


def _worker(out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        for case in CASES:
            torch.save(train(world, rank, case), Path(out_dir) / f"{case}-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(script: str, world: int, args: list[str], timeout: float = TIMEOUT_S) -> float:
    """Start `world` ranks of `script` (torchrun's env rendezvous on a free port); wall seconds.

    Never hangs: every rank is killed when the deadline passes, and the test fails with their output.
    """
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::UserWarning:torch.nn.parallel.distributed")
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, script, *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs: list[str] = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"distributed run timed out after {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    bad = [(r, p.returncode, outputs[r][-3000:]) for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        pytest.fail("rank(s) failed:\n" + "\n".join(f"--- rank {r} (rc {rc}):\n{o}" for r, rc, o in bad))
    return time.perf_counter() - start


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def runs(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One launch of `world` ranks (both time-sharing cases) and the single-process references."""
    world = int(request.param)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        wall = launch(__file__, world, [tmp])
        ranks = {case: [torch.load(Path(tmp) / f"{case}-rank{r}.pt", weights_only=False) for r in range(world)]
                 for case in CASES}
    ref = {case: train(world, None, case) for case in CASES}
    return {"world": world, "ranks": ranks, "ref": ref, "wall": wall}


@pytest.mark.parametrize("case", CASES)
def test_all_ranks_bit_identical(runs: dict[str, Any], case: str) -> None:
    ranks = runs["ranks"][case]
    for r in range(1, runs["world"]):
        for it, (h0, hr) in enumerate(zip(ranks[0]["history"], ranks[r]["history"], strict=True)):
            for p0, pr in zip(h0, hr, strict=True):
                assert torch.equal(p0, pr), f"step {it}: rank {r} parameters differ from rank 0"
        for name, st in ranks[0]["state"].items():
            for k, v in st.items():
                assert torch.equal(v, ranks[r]["state"][name][k]), f"rank {r} state {name}.{k} differs"


@pytest.mark.parametrize("case", CASES)
def test_reduced_factors_equal_single_process_factors(runs: dict[str, Any], case: str) -> None:
    got_all, want_all = runs["ranks"][case][0]["factors"], runs["ref"][case]["factors"]
    assert len(got_all) == len(want_all) == -(-STEPS // UPDATE_FREQ)
    for got, want in zip(got_all, want_all, strict=True):
        assert sorted(got) == sorted(want)
        for key in want:
            g, w = got[key], want[key]
            assert _rel(g["A"], w["A"]) < 1e-13, key
            assert _rel(g["G"], w["G"]) < 1e-13, key
            assert abs(g["weight"] - w["weight"]) < 1e-14
            assert (g["steps"], g["rows_a"], g["rows_g"]) == (w["steps"], w["rows_a"], w["rows_g"]), key


@pytest.mark.parametrize("case", CASES)
def test_parameters_equal_single_process_on_global_batch(runs: dict[str, Any], case: str) -> None:
    rank0, ref = runs["ranks"][case][0], runs["ref"][case]
    # the m2 scale is the global batch size
    assert set(rank0["batch_size"].values()) == {float(runs["world"] * B_LOCAL)}
    assert rank0["batch_size"] == ref["batch_size"]
    for it, (h, hr) in enumerate(zip(rank0["history"], ref["history"], strict=True)):
        for p, q in zip(h, hr, strict=True):
            assert _rel(p, q) < 1e-12, f"step {it}"


if __name__ == "__main__":
    _worker(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, which gloo's threads can abort (pytorch/pytorch#190489)
