"""Checkpoints of the experiments runner: an interrupted run continues exactly where it stopped.

The reference is the same configuration trained without interruption in this process: on the
CPU, training is deterministic, so the resumed run's losses, NFE and evaluations must equal it
bit for bit. Interruptions are raised from inside the loop (`KeyboardInterrupt` at a chosen
batch), as Ctrl-C would be.
"""

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.apps import RunConfig, train
from benchmarks.apps import _runner as runner
from benchmarks.apps.__main__ import main
from benchmarks.apps._cnf import CNFTask
from benchmarks.apps._common import EpochSampler, Task
from benchmarks.apps._digits import ImageTask
from benchmarks.apps._timeseries import TimeSeriesTask

pytest.importorskip("sklearn")  # the optional extras (`pip install snopt[experiments]`)

DIGITS = {"hidden": 4, "eval_train": 50}
CASES = [
    # SNOpt with the Monte-Carlo Fisher (its own label stream), a cosine schedule (the rates are
    # restored through new param_group dicts) and a refresh interval that does not divide 4.
    pytest.param(RunConfig(task="digits", optimizer="snopt", iterations=12, batch_size=32, eval_every=4, snopt_freq=3,
                           snopt_fisher="mc", schedule="cosine", options=DIGITS), ImageTask, id="digits-snopt-mc"),
    # A 13-D table: Hutchinson noise from torch's global stream, the epoch sampler, val evaluations.
    pytest.param(RunConfig(task="cnf", dataset="wine", optimizer="snopt", iterations=12, batch_size=32, eval_every=4,
                           snopt_freq=5, options={"hidden": 8}), CNFTask, id="cnf-wine-snopt"),
    # Fresh toy samples from the batch generator.
    pytest.param(RunConfig(task="cnf", dataset="circles", optimizer="adam", iterations=12, batch_size=64,
                           eval_every=4, options={"hidden": 8, "n_test": 200}), CNFTask, id="cnf-circles-adam"),
    # The GRU-ODE with --ode-only: two optimizers in one step.
    pytest.param(RunConfig(task="timeseries", optimizer="sgd", iterations=12, batch_size=32, eval_every=4,
                           ode_only=True, options={"hidden": 4, "stride": 4}), TimeSeriesTask,
                 id="timeseries-sgd-ode-only"),
]
TRAJECTORY = ("iteration", "loss", "nfe_forward", "nfe_backward")


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, cls: type[Task], at: int | None) -> list[int]:
    """Count the batches drawn by `cls` and raise KeyboardInterrupt on the `at`-th (None: never)."""
    drawn = [0]
    batch = cls.batch

    def counted(self: Task, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        drawn[0] += 1
        if drawn[0] == at:
            raise KeyboardInterrupt
        return batch(self, generator)

    monkeypatch.setattr(cls, "batch", counted)
    return drawn


def _same_trajectory(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in TRAJECTORY:
        assert a["history"][key] == b["history"][key], key
    assert a["history"].get("clip_scale") == b["history"].get("clip_scale")
    metrics = sorted(k for k in b["evals"] if k not in ("time", "cpu_time"))
    assert sorted(k for k in a["evals"] if k not in ("time", "cpu_time")) == metrics
    for key in metrics:
        assert a["evals"][key] == b["evals"][key], key


@pytest.mark.parametrize(("cfg", "cls"), CASES)
def test_an_interrupted_run_resumes_to_the_uninterrupted_trajectory(
        cfg: RunConfig, cls: type[Task], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = train(cfg)
    ckpt = tmp_path / "run.ckpt"
    _interrupt_at(monkeypatch, cls, 7)  # after the checkpoint at iteration 4, inside the second interval
    with pytest.raises(KeyboardInterrupt):
        train(cfg, checkpoint=ckpt)
    assert ckpt.exists() and not ckpt.with_name("run.ckpt.tmp").exists()
    drawn = _interrupt_at(monkeypatch, cls, None)
    resumed = train(cfg, checkpoint=ckpt)
    assert drawn[0] == 8  # iterations 5-12 only: it continued, it did not start over
    assert resumed["resumed_at"] == [4] and reference["resumed_at"] == []
    _same_trajectory(resumed, reference)
    clock = resumed["history"]["cpu_time"]
    assert all(b >= a for a, b in zip(clock, clock[1:], strict=False))  # the clock continues from the checkpoint
    assert resumed["summary"]["final_test_metric"] == reference["summary"]["final_test_metric"]


def test_newton_cg_resumes_with_its_outer_adam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # NewtonCG on the ODE block and Adam on the rest: both optimizers' states go through the checkpoint.
    cfg = RunConfig(task="digits", optimizer="newton-cg", iterations=4, batch_size=32, eval_every=2, options=DIGITS)
    reference = train(cfg)
    ckpt = tmp_path / "run.ckpt"
    _interrupt_at(monkeypatch, ImageTask, 4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, checkpoint=ckpt)
    _interrupt_at(monkeypatch, ImageTask, None)
    resumed = train(cfg, checkpoint=ckpt)
    assert resumed["resumed_at"] == [2]
    _same_trajectory(resumed, reference)


def test_a_run_interrupted_twice_lists_both_resumptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig(task="digits", optimizer="adam", iterations=9, batch_size=32, eval_every=3, options=DIGITS)
    reference = train(cfg)
    ckpt = tmp_path / "run.ckpt"
    _interrupt_at(monkeypatch, ImageTask, 5)  # a checkpoint every iteration; stopped in iteration 5
    with pytest.raises(KeyboardInterrupt):
        train(cfg, checkpoint=ckpt, checkpoint_every=1)
    _interrupt_at(monkeypatch, ImageTask, 3)  # continues after 4; stopped in iteration 7
    with pytest.raises(KeyboardInterrupt):
        train(cfg, checkpoint=ckpt, checkpoint_every=1)
    _interrupt_at(monkeypatch, ImageTask, None)
    resumed = train(cfg, checkpoint=ckpt, checkpoint_every=1)
    assert resumed["resumed_at"] == [4, 6]
    _same_trajectory(resumed, reference)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig(task="digits", optimizer="adam", iterations=6, batch_size=32, eval_every=2, options=DIGITS)
    ckpt = tmp_path / "run.ckpt"
    _interrupt_at(monkeypatch, ImageTask, 4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"another run \(lr None there vs 0.5 here\)"):
        train(replace(cfg, lr=0.5), checkpoint=ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read the checkpoint"):
        train(cfg, checkpoint=ckpt)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train(cfg, checkpoint=ckpt, checkpoint_every=0)


def test_compare_reads_finished_runs_back_and_resumes_the_interrupted_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = RunConfig(task="digits", iterations=6, batch_size=32, eval_every=2, options=DIGITS)
    ckdir = tmp_path / "ck"
    reference = runner.compare(base, ["adam", "sgd"], [0], echo=None)
    _interrupt_at(monkeypatch, ImageTask, 6 + 3)  # adam finishes; sgd stops in its iteration 3
    with pytest.raises(KeyboardInterrupt):
        runner.compare(base, ["adam", "sgd"], [0], echo=None, checkpoint_dir=ckdir)
    assert sorted(p.name for p in ckdir.iterdir()) == ["digits-digits_adam_seed0.json",
                                                       "digits-digits_sgd_seed0.ckpt"]
    drawn = _interrupt_at(monkeypatch, ImageTask, None)
    lines: list[str] = []
    finished: list[dict[str, Any]] = []
    result = runner.compare(base, ["adam", "sgd"], [0], echo=lines.append, checkpoint_dir=ckdir,
                            on_run=finished.append)
    assert drawn[0] == 6 - 2  # adam read back; sgd from its checkpoint at iteration 2
    assert result["trained"] == 1 and [r["config"]["optimizer"] for r in finished] == ["sgd"]  # no double logging
    assert any("adam_seed0] finished earlier" in line for line in lines)
    assert any("sgd_seed0] resuming from" in line for line in lines)
    assert sorted(p.name for p in ckdir.iterdir()) == ["digits-digits_adam_seed0.json",
                                                       "digits-digits_sgd_seed0.json"]  # checkpoint gone
    for got, want in zip(result["runs"], reference["runs"], strict=True):
        _same_trajectory(got, want)
    assert [r["resumed_at"] for r in result["runs"]] == [[], [2]]
    # A record left by another configuration under the same run name is refused, not reused.
    with pytest.raises(ValueError, match="record of another run"):
        runner.compare(replace(base, iterations=8), ["adam"], [0], echo=None, checkpoint_dir=ckdir)
    saved = json.loads((ckdir / "digits-digits_adam_seed0.json").read_text())
    assert saved["history"] == result["runs"][0]["history"]


def test_the_cli_resumes_from_its_checkpoint_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    args = ["digits", "--optimizer", "adam", "--iterations", "4", "--eval-every", "2", "--batch-size", "32",
            "--set", "hidden=4", "--set", "eval_train=50", "--no-isolate", "--no-plots", "--out",
            str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ck")]
    _interrupt_at(monkeypatch, ImageTask, 4)
    assert main(args) == 130
    assert f"the same command continues from the checkpoints in {tmp_path / 'ck'}/" in capsys.readouterr().err
    assert (tmp_path / "ck" / "digits-digits_adam_seed0.ckpt").exists()
    _interrupt_at(monkeypatch, ImageTask, None)
    assert main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert (tmp_path / "ck" / "digits-digits_adam_seed0.json").exists()
    drawn = _interrupt_at(monkeypatch, ImageTask, None)
    assert main(args) == 0
    assert drawn[0] == 0 and "finished earlier" in capsys.readouterr().out
    assert main([*args[:-2], "--checkpoint-dir", str(tmp_path / "ck2"), "--checkpoint-every", "0"]) == 2
    assert "--checkpoint-every must be at least 1" in capsys.readouterr().err
    assert main([*args[:4], "6", *args[5:]]) == 2  # another configuration, same run name
    assert "record of another run (iterations 4 there vs 6 here)" in capsys.readouterr().err


def test_the_epoch_sampler_continues_its_epoch_and_refuses_another_size() -> None:
    g, h = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = EpochSampler(10, 4)
    a.next(g)  # into the first epoch
    b = EpochSampler(10, 4)
    b.load_state_dict(a.state_dict())
    h.set_state(g.get_state())
    for _ in range(5):  # across two epoch boundaries
        assert torch.equal(a.next(g), b.next(h))
    with pytest.raises(ValueError, match="for 10 examples in batches of 4"):
        EpochSampler(12, 4).load_state_dict(a.state_dict())
