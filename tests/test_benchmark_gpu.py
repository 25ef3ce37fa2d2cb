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

    def it() -> None:
        # what the iteration really was: whether its backward pass gathered factors
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        collected = any(f.steps > 0 for c in opt.collectors for f in c.factors.values())  # reset by each refresh
        seen.append(collected)
        opt.step()
        clock[0] += 2.0 if collected else 1.0  # a fake clock: a collection iteration "takes" 2 s, a plain one 1 s

    it(), it()  # the script's warm-up
    times = gpu_bench.iteration_times(opt, it, 6)
    assert seen[2:].count(True) == len(times["collection"]) == len([k for k in range(2, 8) if k % update_freq == 0])
    assert times == {"collection": [2.0] * len(times["collection"]), "plain": [1.0] * len(times["plain"])}
    assert times["collection"] and times["plain"]
