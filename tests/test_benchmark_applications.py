"""benchmarks/run_applications.py's run log: a live benchmark appends every run, `--from-log` rewrites its tables.

Training is swapped for three-iteration runs of the same tasks (real records, about a second
each), so the tables come from the structures a full benchmark produces.
"""

import json
import re
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import snopt.experiments._runner as runner
from snopt.experiments import RunConfig

REAL_RUN = runner.run


def _stamp_free(text: str) -> list[str]:
    """The results file without what depends on when and where it was written."""
    return [re.sub(r" Wall-clock for this task: \d+ s\.", "", ln) for ln in text.splitlines()
            if not ln.startswith(("Regenerate", "- load average"))]


def _tiny_runs(monkeypatch: pytest.MonkeyPatch) -> list[RunConfig]:
    """Swap training for three-iteration real runs; the returned list collects every configuration asked for."""
    asked: list[RunConfig] = []

    def tiny(cfg: RunConfig, quiet: bool = True, isolate: bool = False) -> dict[str, Any]:
        asked.append(cfg)
        return REAL_RUN(replace(cfg, iterations=3, eval_every=3), quiet=True)

    monkeypatch.setattr(runner, "run", tiny)
    return asked


def test_from_log_rewrites_the_live_tables(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _tiny_runs(monkeypatch)
    log, live, again = tmp_path / "runs.jsonl", tmp_path / "live", tmp_path / "again"
    assert bench.main(["--tasks", "digits", "cnf", "--seeds", "0", "1", "--log", str(log), "--out", str(live)]) == 0
    assert [(c.task, c.seed, c.optimizer) for c in asked] == [
        (t, s, o) for t in ("digits", "cnf") for s in (0, 1) for o in ("snopt", "adam", "sgd")]
    runs = bench.read_log(log)
    assert [(r["config"]["task"], r["config"]["seed"], r["config"]["optimizer"]) for r in runs] == [
        (c.task, c.seed, c.optimizer) for c in asked]  # every run, in the order it finished
    text = (live / "applications_cpu.md").read_text()

    asked.clear()
    assert bench.main(["--tasks", "digits", "cnf", "--from-log", str(log), "--out", str(again)]) == 0
    assert not asked  # nothing trained
    redone = (again / "applications_cpu.md").read_text()
    assert _stamp_free(redone) == _stamp_free(text)
    # the CNF's target is Adam's mean final NLL, recomputed from the logged runs as the live benchmark did
    assert "time to Adam's final test NLL" in redone
    assert "- load average while the runs trained: not in the log" in redone
    assert "--from-log" in redone and "Wall-clock for this task" not in redone
    assert (again / "applications_digits.png").is_file() and (again / "applications_cnf.png").is_file()

    # runs that finished in another order give the same tables
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in runs[::-1]))
    third = tmp_path / "third"
    assert bench.main(["--tasks", "digits", "cnf", "--from-log", str(shuffled), "--out", str(third)]) == 0
    assert _stamp_free((third / "applications_cpu.md").read_text()) == _stamp_free(text)

    # an interrupted benchmark: seed 1 of the CNF lacks SGD, so that seed is named and left out of the CNF table
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(json.dumps(r) + "\n" for r in runs[:-1]))
    fourth = tmp_path / "fourth"
    assert bench.main(["--tasks", "digits", "cnf", "--from-log", str(cut), "--out", str(fourth)]) == 0
    partial = (fourth / "applications_cpu.md").read_text()
    digits_part, cnf_part = partial.split("## CNF density estimation")
    assert "seeds [0, 1]" in digits_part and "Left out" not in digits_part
    assert "seeds [0]" in cnf_part.split("## Tuning")[0]
    assert "Left out of the tables" in cnf_part and "snopt lr 0.01 seed 1 (final" in cnf_part


def test_from_log_without_a_finished_seed_fails(bench: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    log.write_text("")
    with pytest.raises(SystemExit, match="holds no finished seed"):
        bench.main(["--tasks", "digits", "--from-log", str(log), "--out", str(tmp_path)])


def test_paper_preset_runs_the_authors_settings_into_its_own_table(bench: ModuleType, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _tiny_runs(monkeypatch)
    log, live = tmp_path / "runs.jsonl", tmp_path / "live"
    assert bench.main(["--preset", "paper", "--tasks", "digits", "--seeds", "0", "--log", str(log),
                       "--out", str(live)]) == 0
    # every run at the paper preset, with its own learning rate (not the tuning record's)
    assert [(c.preset, c.lr, c.snopt_eps, c.snopt_kl_clip) for c in asked] == [("paper", None, None, None)] * 3
    runs = bench.read_log(log)
    assert {o: r["resolved"]["lr"] for r in runs for o in [r["config"]["optimizer"]]} == {
        "snopt": 0.02, "adam": 1e-3, "sgd": 0.02}
    snopt_run = next(r for r in runs if r["config"]["optimizer"] == "snopt")
    assert (snopt_run["resolved"]["snopt_eps"], snopt_run["resolved"]["snopt_freq"]) == (0.05, 100)
    assert not (live / "applications_cpu.md").exists()
    text = (live / "applications_paper_cpu.md").read_text()
    assert text.startswith("# Applications benchmark (CPU): SNOpt vs Adam vs SGD, at the paper's settings")
    assert "Nothing here was tuned" in text and "## Tuning" not in text
    assert "![digits](applications_paper_digits.png)" in text and (live / "applications_paper_digits.png").is_file()

    # the log rewrites the same table; the fast preset's tables do not take the paper runs
    again = tmp_path / "again"
    asked.clear()
    assert bench.main(["--preset", "paper", "--tasks", "digits", "--from-log", str(log), "--out", str(again)]) == 0
    assert not asked
    assert _stamp_free((again / "applications_paper_cpu.md").read_text()) == _stamp_free(text)
    with pytest.raises(SystemExit, match="holds no finished seed"):
        bench.main(["--tasks", "digits", "--from-log", str(log), "--out", str(again)])


def test_paper_preset_refuses_tuning(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--preset", "paper", "--tune", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--preset paper runs the authors' settings" in capsys.readouterr().err


@pytest.mark.parametrize(("ratio", "bound", "strict", "expected"), [
    (0.4, "=", False, "met"), (0.5, "=", False, "met"), (0.6, "=", False, "missed"),
    (0.5, "=", True, "missed"),  # the CNF's "sooner" is strict
    (0.4, "<=", False, "met"), (1.06, "<=", False, "undetermined"),
    (0.6, ">=", False, "missed"), (0.3, ">=", False, "undetermined"),
    (None, "n/a", False, "undetermined"),
])
def test_a_bound_settles_a_goal_only_on_its_own_side(bench: ModuleType, ratio: float | None, bound: str,
                                                      strict: bool, expected: str) -> None:
    assert bench.ratio_verdict({"ratio": ratio, "bound": bound}, 0.5, strict=strict) == expected


def test_an_undecided_bound_reports_the_seeds_that_decide(bench: ModuleType) -> None:
    # Adam missed on one seed; on the two where both reached the target SNOpt took 1.25-1.37x its time
    both_slower = {"ratio": 1.5, "bound": "<=", "per_seed": [1.25, 1.37], "seeds": 3}
    assert bench.ratio_verdict(both_slower, 0.5) == (
        "undetermined (missed on the 2 of 3 seeds where both reached the target)")
    one_faster = {"ratio": 1.5, "bound": "<=", "per_seed": [0.4, 1.37], "seeds": 3}
    assert bench.ratio_verdict(one_faster, 0.5) == "undetermined"


def test_verdicts_say_undetermined_where_the_other_optimizer_never_reached_the_target(bench: ModuleType) -> None:
    # SGD missed both targets on every seed: SNOpt's time ÷ SGD's whole training time is only an upper bound
    def r(x: float | None, bound: str) -> dict[str, Any]:
        return {"ratio": x, "bound": bound, "per_seed": [], "seeds": 3}

    ratios = {"snopt/adam": {k: r(0.76, "=") for k in ("loss", "loss_cpu", "metric", "metric_cpu")},
              "snopt/sgd": {k: r(1.06, "<=") for k in ("loss", "loss_cpu")}
              | {k: r(0.3, "<=") for k in ("metric", "metric_cpu")}}
    agg = {name: {"final_test_metric": {"mean": m}} for name, m in (("snopt", 0.98), ("adam", 0.97), ("sgd", 0.6))}
    lines = bench.verdicts("digits", {"aggregate": agg, "ratios": ratios})
    tail = [ln.rsplit("— ", 1)[1] for ln in lines]
    assert tail == ["**missed**"] * 4 + ["**undetermined**"] * 2 + ["**met**"] * 2 + ["**met**"]
    assert "SNOpt ÷ sgd, time to the train-loss target (wall): <=1.06" in lines[4]
