"""Data-parallel SNOpt (`snopt.optim._distributed`): helpers in-process, collectives in 2 gloo ranks.

The multi-process checks run in one launch of 2 ranks (subprocesses of this file, torchrun-style
env rendezvous on a free port, every wait bounded), which runs every scenario and saves what it
saw; the tests then assert on it:

- collectives per collection iteration: counted by wrapping ``torch.distributed``'s Python
  collectives; the same number for 2 and 20 rk4 steps (and for dopri5), none in the backward pass;
- a rank with non-finite statistics makes every rank skip that refresh (ranks stay identical);
- ranks with different layer sets fail at construction, on every rank, with a clear message;
- `allreduce_mean_` averages mixed-dtype tensors over several buckets.
"""

import datetime
import os
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import snopt
from snopt.curvature._eigen import CurvatureWarning
from snopt.optim import _distributed as D  # noqa: N812

TIMEOUT_S = 240.0
B_LOCAL = 6


# ----------------------------------------------------------------------------- models
class Field(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(d, h)
        self.l2 = nn.Linear(h, d)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def make_model(*, hidden: int = 8, method: str = "rk4", step_size: float = 0.5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    options = {"step_size": step_size} if method == "rk4" else {}
    return nn.Sequential(nn.Linear(5, 4), snopt.ODEBlock(Field(4, hidden), method=method, options=options,
                                                         rtol=1e-4, atol=1e-4), nn.Linear(4, 3)).double()


def batch(seed: int, n: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------- in-process
def test_assign_layers_greedy_longest_first() -> None:
    costs = [1000.0, 8.0, 729.0, 64.0, 343.0, 1.0]
    owners = D.assign_layers(costs, 2)
    load = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(2)]
    assert owners[0] == 0 and owners[2] == 1  # the two largest go to different ranks
    assert max(load) == 1073.0  # LPT: 1000+64+8+1 vs 729+343 (total 2145: optimal)
    assert D.assign_layers(costs, 2) == owners  # deterministic
    assert D.assign_layers(costs, 1) == [0] * len(costs)
    assert sorted(set(D.assign_layers(costs, 10))) == list(range(6))  # more ranks than layers: one each
    with pytest.raises(ValueError):
        D.assign_layers(costs, 0)


def test_not_distributed_is_a_no_op() -> None:
    assert not D.is_distributed()
    t = torch.ones(3)
    assert D.allreduce_mean_([t]) == 0 and torch.equal(t, torch.ones(3))
    with pytest.raises(TypeError):
        D.allreduce_mean_([torch.ones(2, dtype=torch.int64)])
    m = make_model()
    assert snopt.SNOpt(m, torch.optim.SGD(m.parameters(), lr=0.1))._dist is None
    with pytest.raises(RuntimeError, match="init_process_group"):
        snopt.SNOpt(m, torch.optim.SGD(m.parameters(), lr=0.1), distributed=True)


def test_buckets_split_by_dtype_and_size() -> None:
    ts = [torch.zeros(10), torch.zeros(10, dtype=torch.float64), torch.zeros(10), torch.zeros(100)]
    assert D._buckets(ts, 80) == [[0, 2], [3], [1]]
    assert D._buckets(ts, 10**6) == [[0, 2, 3], [1]]


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _train(opt: snopt.SNOpt, model: nn.Module, steps: int) -> None:
    for it in range(steps):
        x, y = batch(it, 8)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("decay", [0.0, 0.7], ids=["latest-factors", "factor-average"])
def test_one_rank_distributed_path_matches_single_process(one_rank_group: None, decay: float) -> None:
    assert not D.is_distributed()  # one rank: the default (None) stays single-process
    m1, m2 = make_model(), make_model()
    # The paper's settings (eps 0.05, no trust region): the small default damping and the trust region's ν
    # amplify the factors' packing round-off (1e-16) to 1e-9 after 5 steps; the path itself is what this
    # test checks.
    kw: dict[str, Any] = {"update_freq": 2, "eps": 0.05, "kl_clip": None, "factor_decay": decay}
    o1 = snopt.SNOpt(m1, torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), **kw)
    o2 = snopt.SNOpt(m2, torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), distributed=True, **kw)
    assert o1._dist is None and o2._dist is not None
    _train(o1, m1, 5)
    _train(o2, m2, 5)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert o2._dist.stats.allreduce_calls == 0  # one rank: nothing to communicate
    assert o2._dist.stats.eigh_layers == len(o2.layers)
    for la, lb in zip(o1.layers, o2.layers, strict=True):  # the averages (if any) agree too
        assert ("A_avg" in o1.state[la.weight]) == (decay > 0) == ("A_avg" in o2.state[lb.weight])
        if decay > 0:
            torch.testing.assert_close(o1.state[la.weight]["A_avg"], o2.state[lb.weight]["A_avg"], rtol=1e-12,
                                       atol=1e-14)


# ----------------------------------------------------------------------------- 2 ranks
class _CountingCollectives:
    """Wraps torch.distributed's Python collectives and counts calls per phase."""

    NAMES = ("all_reduce", "all_gather", "broadcast", "all_gather_object", "broadcast_object_list",
             "reduce_scatter", "all_to_all", "all_gather_into_tensor", "reduce_scatter_tensor")

    def __init__(self) -> None:
        self.phase = "other"
        self.counts: Counter[tuple[str, str]] = Counter()
        for name in self.NAMES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[(self.phase, name)] += 1
            return fn(*args, **kwargs)
        return counted

    def take(self, phase: str) -> dict[str, int]:
        out = {name: n for (p, name), n in self.counts.items() if p == phase}
        for key in [k for k in self.counts if k[0] == phase]:
            del self.counts[key]
        return out


def _scenario_counts(rank: int, counter: _CountingCollectives) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, kw in {"rk4-2": {"step_size": 0.5}, "rk4-20": {"step_size": 0.05},
                      "dopri5": {"method": "dopri5"}, "rk4-2-reduce": {"step_size": 0.5}}.items():
        model = make_model(**kw)  # type: ignore[arg-type]
        net = nn.parallel.DistributedDataParallel(model)
        opt = snopt.SNOpt(net, torch.optim.SGD(net.parameters(), lr=0.1), update_freq=1)
        assert opt._dist is not None
        if label.endswith("reduce"):
            opt._dist.share = "all_reduce"  # eigenbases as a zero-filled all_reduce instead of all_gather
        per_iter = []
        for it in range(2):
            x, y = batch(100 + it, 2 * B_LOCAL)
            x, y = x[rank * B_LOCAL:(rank + 1) * B_LOCAL], y[rank * B_LOCAL:(rank + 1) * B_LOCAL]
            opt.zero_grad()
            counter.phase = "backward"
            F.cross_entropy(net(x), y).backward()
            counter.phase = "step"
            opt.step()
            counter.phase = "other"
            block = model[1]
            assert isinstance(block, snopt.ODEBlock) and opt._dist is not None
            per_iter.append({"backward": counter.take("backward"), "step": counter.take("step"),
                             "nfe_backward": block.stats.nfe_backward,
                             "stats": dict(vars(opt._dist.stats))})
        out[label] = {"iters": per_iter, "params": [p.detach().clone() for p in model.parameters()]}
    return out


def _scenario_nonfinite(rank: int) -> dict[str, Any]:
    model = make_model()
    net = nn.parallel.DistributedDataParallel(model)
    opt = snopt.SNOpt(net, torch.optim.SGD(net.parameters(), lr=0.1), update_freq=1)
    snapshots, caught = [], []
    for it in range(3):
        x, y = batch(200 + it, 2 * B_LOCAL)
        x, y = x[rank * B_LOCAL:(rank + 1) * B_LOCAL], y[rank * B_LOCAL:(rank + 1) * B_LOCAL]
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if it == 1 and rank == 1:  # rank 1 alone sees a NaN in one ODE-layer factor
            next(iter(opt.collectors[0].factors.values())).A[0, 0] = float("nan")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.step()
        caught.append([str(x.message) for x in w if issubclass(x.category, CurvatureWarning)])
        snapshots.append({i: {k: v.clone() for k, v in opt.state[la.weight].items() if isinstance(v, Tensor)}
                          for i, la in enumerate(opt.layers)})
    return {"warnings": caught, "snapshots": snapshots, "params": [p.detach().clone() for p in model.parameters()]}


class _TrapField(Field):
    """Blows up (inf) at the recorded parameter values, in the forward solve or only in the adjoint's."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__(d, h)
        self.bad: list[Tensor] = []
        self.backward_only = False

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out = super().forward(t, x)
        if any(torch.equal(self.l1.weight, b) for b in self.bad) and (
                not self.backward_only or torch.is_grad_enabled()):
            return out * float("inf")
        return out


def _scenario_recovery(rank: int) -> dict[str, Any]:
    # A step breaks rank 1's forward solve (iteration 2) and rank 0's backward solve (iteration 4) only:
    # every rank undoes the same steps and the ranks stay identical.
    torch.manual_seed(0)
    field = _TrapField(4, 8)
    model = nn.Sequential(nn.Linear(5, 4), snopt.ODEBlock(field, method="dopri5", rtol=1e-4, atol=1e-4),
                          nn.Linear(4, 3)).double()
    net = nn.parallel.DistributedDataParallel(model)
    opt = snopt.SNOpt(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), update_freq=2)
    assert opt.recovery is not None and opt.recovery.distributed
    for it in range(6):
        if (it, rank) in ((2, 1), (4, 0)):
            field.backward_only = it == 4
            field.bad.append(field.l1.weight.detach().clone())
        x, y = batch(400 + it, 2 * B_LOCAL)
        x, y = x[rank * B_LOCAL:(rank + 1) * B_LOCAL], y[rank * B_LOCAL:(rank + 1) * B_LOCAL]
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", snopt.optim.StepRejectedWarning)
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return {"stats": dict(vars(opt.recovery.stats)), "params": [p.detach().clone() for p in model.parameters()]}


def _scenario_mismatch(rank: int) -> dict[str, Any]:
    model = make_model(hidden=8 if rank == 0 else 9)
    # a plain (non-DDP) model stays local by default, even inside a process group
    local = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1))._dist is None
    try:
        snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), distributed=True)
    except ValueError as e:
        return {"error": str(e), "local": local}
    return {"error": None, "local": local}


def _scenario_collect(rank: int) -> dict[str, Any]:
    # Monte-Carlo Fisher under DDP: collect's extra backward (autograd.grad) must not disturb DDP's
    # gradient all-reduce of the training loss's backward that follows.
    model = make_model()
    net = nn.parallel.DistributedDataParallel(model)
    opt = snopt.SNOpt(net, torch.optim.SGD(net.parameters(), lr=0.1), update_freq=2)
    gen = torch.Generator().manual_seed(rank)  # each rank draws its own labels
    collected = []
    for it in range(4):
        x, y = batch(300 + it, 2 * B_LOCAL)
        x, y = x[rank * B_LOCAL:(rank + 1) * B_LOCAL], y[rank * B_LOCAL:(rank + 1) * B_LOCAL]
        opt.zero_grad()
        logits = net(x)
        collected.append(opt.collecting)
        if opt.collecting:
            opt.collect(snopt.losses.sampled_cross_entropy(logits, gen))
        F.cross_entropy(logits, y).backward()
        opt.step()
    return {"collected": collected, "params": [p.detach().clone() for p in model.parameters()]}


def _scenario_allreduce_mean(rank: int) -> dict[str, Any]:
    ts = [torch.full((3,), float(rank + 1)), torch.full((2, 2), 10.0 * (rank + 1), dtype=torch.float64),
          torch.arange(40, dtype=torch.float32) * (rank + 1)]
    calls = D.allreduce_mean_(ts, bucket_bytes=64)
    return {"tensors": ts, "calls": calls}


def _worker(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        counter = _CountingCollectives()
        results = {"counts": _scenario_counts(rank, counter), "nonfinite": _scenario_nonfinite(rank),
                   "mismatch": _scenario_mismatch(rank), "allreduce_mean": _scenario_allreduce_mean(rank),
                   "collect": _scenario_collect(rank), "recovery": _scenario_recovery(rank)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _launch(world: int, out_dir: str) -> None:
    # Imported here, in the pytest process only: each rank runs this file as a bare script.
    from verification.test_distributed_equivalence import launch

    launch(__file__, world, [out_dir], timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        _launch(2, tmp)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_collectives_per_collection_iteration_do_not_grow_with_solver_steps(two_ranks: list[dict[str, Any]]) -> None:
    for res in two_ranks:
        runs = res["counts"]
        few, many = runs["rk4-2"]["iters"], runs["rk4-20"]["iters"]
        assert many[0]["nfe_backward"] >= 8 * few[0]["nfe_backward"]  # 10× the solver steps ...
        for label, run in runs.items():
            for i, it in enumerate(run["iters"]):
                # nothing during the solves; once a step is pending, the forward pass adds the ranks' one
                # 1-element agreement on undoing it (snopt.optim._recovery), whatever the number of solver steps
                assert it["backward"] == ({"all_reduce": 1} if i > 0 else {}), label
                want = {"all_reduce": 2} if label.endswith("reduce") else {"all_reduce": 1, "all_gather": 1}
                assert it["step"] == want, label  # one factor bucket, one eigenbasis collective
                assert it["stats"]["allreduce_calls"] == 1 and it["stats"]["bases_calls"] == 1
        assert few[0]["stats"]["allreduce_bytes"] == many[0]["stats"]["allreduce_bytes"]


def test_ranks_identical_with_fixed_and_adaptive_solvers(two_ranks: list[dict[str, Any]]) -> None:
    for label in ("rk4-2", "rk4-20", "dopri5", "rk4-2-reduce"):
        for p, q in zip(two_ranks[0]["counts"][label]["params"], two_ranks[1]["counts"][label]["params"],
                        strict=True):
            assert torch.equal(p, q), label
    # both ways of sharing the eigenbases copy them exactly: the same training run
    for p, q in zip(two_ranks[0]["counts"]["rk4-2"]["params"], two_ranks[0]["counts"]["rk4-2-reduce"]["params"],
                    strict=True):
        assert torch.equal(p, q)


def test_share_plan_picks_the_cheaper_collective() -> None:
    def spec(i: int, d_in: int, d_out: int) -> Any:
        return D._LayerSpec(index=i, collector=0, name=str(i), d_in=d_in, d_out=d_out, dtype=torch.float32,
                            device=torch.device("cpu"), reduce_mode=False, tril_in=torch.empty(0),
                            tril_out=torch.empty(0))

    specs = [spec(0, 100, 10), spec(1, 50, 10), spec(2, 20, 5)]
    fake = SimpleNamespace(owners=D.assign_layers([s.cost for s in specs], 2), world_size=2, share="auto")
    method, offsets, length = D.DistributedCurvature._share_plan(fake, specs)  # type: ignore[arg-type]
    assert method == "all_gather" and length == max(specs[0].eig_numel, specs[1].eig_numel + specs[2].eig_numel)
    fake = SimpleNamespace(owners=D.assign_layers([s.cost for s in specs], 8), world_size=8, share="auto")
    method, offsets, length = D.DistributedCurvature._share_plan(fake, specs)  # type: ignore[arg-type]
    assert method == "all_reduce" and length == sum(s.eig_numel for s in specs)
    assert offsets == [0, specs[0].eig_numel, specs[0].eig_numel + specs[1].eig_numel]


def test_eigendecompositions_are_shared_out(two_ranks: list[dict[str, Any]]) -> None:
    # 4 layers (two in the ODE field, two outside): each rank decomposes only its own
    done = [res["counts"]["rk4-2"]["iters"][0]["stats"]["eigh_layers"] for res in two_ranks]
    assert sum(done) == 4 and min(done) >= 1


def test_nonfinite_on_one_rank_skips_refresh_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    for res in two_ranks:
        w = res["nonfinite"]["warnings"]
        assert w[0] == [] and w[2] == []
        assert len(w[1]) == 1 and "rank(s) [1]" in w[1][0] and "every rank skips" in w[1][0]
        snaps = res["nonfinite"]["snapshots"]
        for i, st in snaps[1].items():
            for k in ("U_A", "U_G", "lam_A", "lam_G"):
                assert torch.equal(st[k], snaps[0][i][k])  # refresh skipped: bases kept
            assert not torch.equal(snaps[2][i]["U_A"], st["U_A"])  # the next refresh happens
    for a, b in zip(two_ranks[0]["nonfinite"]["params"], two_ranks[1]["nonfinite"]["params"], strict=True):
        assert torch.equal(a, b) and bool(torch.isfinite(a).all())


def test_layer_set_mismatch_is_an_error_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    for res in two_ranks:
        assert res["mismatch"]["local"]
        err = res["mismatch"]["error"]
        assert err is not None and "differ between ranks" in err and "rank 1" in err and "9" in err


def test_allreduce_mean_across_ranks(two_ranks: list[dict[str, Any]]) -> None:
    for res in two_ranks:
        a, b, c = res["allreduce_mean"]["tensors"]
        assert torch.equal(a, torch.full((3,), 1.5)) and torch.equal(b, torch.full((2, 2), 15.0, dtype=torch.float64))
        assert torch.equal(c, torch.arange(40, dtype=torch.float32) * 1.5)
        assert res["allreduce_mean"]["calls"] == 3  # float32: 12 B, then 160 B alone; float64: one


def test_mc_fisher_collect_keeps_ranks_identical(two_ranks: list[dict[str, Any]]) -> None:
    r0, r1 = (r["collect"] for r in two_ranks)
    assert r0["collected"] == r1["collected"] == [True, False, True, False]
    for p, q in zip(r0["params"], r1["params"], strict=True):
        assert torch.isfinite(p).all() and torch.equal(p, q)


if __name__ == "__main__":
    _worker(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, which gloo's threads can abort (pytorch/pytorch#190489)


def test_ranks_undo_the_same_steps_together(two_ranks: list[dict[str, Any]]) -> None:
    counts = [tuple(res["recovery"]["stats"][k] for k in ("rejected", "forward_failures", "backward_failures",
                                                          "nonfinite_gradients")) for res in two_ranks]
    # rank 0's own backward solve failed; rank 1 sees the NaN gradients that DDP's all-reduce brings it
    assert counts == [(2, 1, 1, 0), (2, 1, 0, 1)]
    for p, q in zip(two_ranks[0]["recovery"]["params"], two_ranks[1]["recovery"]["params"], strict=True):
        assert torch.equal(p, q)
