"""benchmarks/gpu_bench.py: what its per-iteration table files under "collection" and "plain" (run on the CPU)."""

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import snopt


@pytest.mark.parametrize("update_freq", [2, 3])
def test_each_timed_iteration_is_filed_by_what_it_was(gpu_bench: ModuleType, update_freq: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(snopt.ODEBlock(gpu_bench.MLPField(3, 8), method="rk4",
                                               options={"step_size": 0.5}), torch.nn.Linear(3, 2))
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.01), update_freq=update_freq)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    clock = [0.0]
    monkeypatch.setattr(gpu_bench, "DEV", "cpu")  # no device to synchronise
    monkeypatch.setattr(gpu_bench.time, "perf_counter", lambda: clock[0])
    seen: list[bool] = []
    step = opt.step

    def forward_backward() -> None:
        F.cross_entropy(model(x), y).backward()
        # what the iteration really was: whether its backward pass gathered factors (each refresh resets them)
        collected = any(f.steps > 0 for c in opt.collectors for f in c.factors.values())
        seen.append(collected)
        clock[0] += 2.0 if collected else 1.0  # a fake clock: the backward of a collection iteration "takes" 2 s

    def timed_step() -> None:
        clock[0] += 0.5 if seen[-1] else 0.25  # ... and its step (the eigenbases' refresh) 0.5 s, a plain one 0.25
        step()

    monkeypatch.setattr(opt, "step", timed_step)
    gpu_bench.iteration_times(opt, forward_backward, 2)  # the script's warm-up
    times = gpu_bench.iteration_times(opt, forward_backward, 6)
    assert seen[2:].count(True) == len(times["collection"]) == len([k for k in range(2, 8) if k % update_freq == 0])
    assert times == {"collection": [(2.0, 0.5)] * len(times["collection"]),
                     "plain": [(1.0, 0.25)] * len(times["plain"])}
    assert times["collection"] and times["plain"]


def test_an_optimizer_that_does_not_collect_has_only_plain_iterations(gpu_bench: ModuleType,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_bench, "DEV", "cpu")
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], 1e-3)
    times = gpu_bench.iteration_times(opt, lambda: w.pow(2).sum().backward(), 3)
    assert len(times["plain"]) == 3 and not times["collection"] and float(w[0].detach()) < 1.0  # it stepped
