"""The applications benchmark's protocol (benchmarks/run_applications.py): settings, worst seed, best baseline."""

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run_applications as ra

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(optimizer: str, lr: float | None, seed: int, metric_curve: list[float], *,
           loss_curve: list[float] | None = None,
           cpu_step: float = 1.0, diverged: str | None = None, rejected: int = 0,
           collecting: list[float] | None = None) -> dict[str, Any]:
    n = len(metric_curve)
    cpu = [cpu_step * i for i in range(n)]
    loss = loss_curve or [1.0 - m for m in metric_curve]
    hist_cpu = [cpu_step * (i + 1) for i in range(n - 1)]
    return {
        "config": {"task": "digits", "dataset": None, "optimizer": optimizer, "lr": lr, "seed": seed},
        "task": {"metric": "accuracy", "higher_is_better": True, "dataset": "digits"},
        "resolved": {"target_loss": 0.1, "target_metric": 0.9, "iterations": n - 1, "batch_size": 8, "eval_every": 1},
        "evals": {"iteration": list(range(n)), "cpu_time": cpu, "time": cpu, "train_loss": loss,
                  "test_metric": metric_curve},
        "history": {"iteration": list(range(1, n)), "cpu_time": hist_cpu, "nfe_backward": [10.0] * (n - 1),
                    **({"collecting": collecting} if collecting is not None else {})},
        "summary": {"final_test_metric": metric_curve[-1], "mean_nfe_forward": 8.0, "mean_nfe_backward": 10.0,
                    "train_cpu_time": hist_cpu[-1] if hist_cpu else 0.0},
        "diverged": diverged, "recovery": {"rejected": rejected} if optimizer == "snopt" else None,
        "machine": {"cpu": "test", "torch": "x", "device": "cpu"},
    }


def test_the_protocol_is_snopt_at_defaults_two_grids_and_two_peers() -> None:
    labels = [s.label for s in ra.protocol()]
    assert labels == ["snopt", "adam@0.003", "adam@0.01", "adam@0.03", "sgd@0.01", "sgd@0.1", "sgd@1", "soap", "kron"]
    cfgs = ra.configs("digits", [0, 1], ra.protocol())
    assert [(c.seed, c.optimizer) for c in cfgs[:2]] == [(0, "snopt"), (0, "adam")]  # seed-major
    assert cfgs[9].seed == 1 and all(c.threads == 1 for c in cfgs)
    snopt_cfg = cfgs[0]
    assert (snopt_cfg.lr, snopt_cfg.snopt_eps, snopt_cfg.snopt_kl_clip, snopt_cfg.snopt_freq) == (None,) * 4


def test_worst_seed_and_best_baseline() -> None:
    # SNOpt reaches 0.9 at t = 2 and 3 (worst 3); adam@0.01 at 1 and 4 (worst 4); sgd@0.1 at 1 and never.
    runs = [record("snopt", None, 0, [0.1, 0.5, 0.95, 0.96, 0.97]),
            record("snopt", None, 1, [0.1, 0.5, 0.8, 0.92, 0.95]),
            record("adam", 0.01, 0, [0.1, 0.91, 0.92, 0.93, 0.94]), record("adam", 0.01, 1, [0.1, 0.2, 0.3, 0.4, 0.95]),
            record("sgd", 0.1, 0, [0.1, 0.95, 0.95, 0.95, 0.95]), record("sgd", 0.1, 1, [0.1, 0.2, 0.3, 0.4, 0.5])]
    stats = {s.setting.label: s for s in ra.setting_stats(runs)}
    assert stats["snopt"].worst_metric == 3.0 and stats["adam@0.01"].worst_metric == 4.0
    assert math.isinf(stats["sgd@0.1"].worst_metric)  # one seed never got there: a miss is infinite
    v = ra.verdicts(list(stats.values()))[1]
    assert (v.best, v.snopt, v.baseline, v.ratio) == ("adam@0.01", 3.0, 4.0, 0.75)
    assert "0.75" in v.text() and "adam@0.01" in v.text()


def test_a_diverged_or_missing_snopt_seed_is_a_miss_and_says_so() -> None:
    runs = [record("snopt", None, 0, [0.1, 0.95]), record("snopt", None, 1, [0.1, 0.3], diverged="iteration 1"),
            record("adam", 0.01, 0, [0.1, 0.95]), record("adam", 0.01, 1, [0.1, 0.95])]
    stats = ra.setting_stats(runs)
    sn = stats[0]
    assert sn.diverged == 1 and math.isinf(sn.worst_metric) and sn.final_metric == [0.95, None]
    v = ra.verdicts(stats)[1]
    assert v.ratio is None or math.isinf(v.snopt)
    assert "missed" in v.text()


def test_no_baseline_on_every_seed_and_snopt_alone() -> None:
    runs = [record("snopt", None, 0, [0.1, 0.95]), record("adam", 0.01, 0, [0.1, 0.5])]
    v = ra.verdicts(ra.setting_stats(runs))[1]
    assert v.best is None and v.ratio == 0.0 and v.text() == "SNOpt alone reached it on every seed"


def test_plain_and_collection_iterations_are_timed_apart() -> None:
    r = record("snopt", None, 0, [0.1, 0.2, 0.3, 0.4, 0.5], collecting=[1.0, 0.0, 0.0, 1.0])
    r["history"]["cpu_time"] = [3.0, 4.0, 5.0, 8.0]  # steps: 3, 1, 1, 3
    s = ra.setting_stats([r])[0]
    assert (s.plain_cpu, s.collect_cpu) == (1.0, 3.0)


def test_train_missing_trains_only_what_the_log_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfgs = ra.configs("digits", [0], [ra.Setting("snopt"), ra.Setting("adam", 0.01)])
    log = tmp_path / "digits_runs.jsonl"
    done = record("snopt", None, 0, [0.1, 0.95])
    done["config"] = cfgs[0].to_dict()
    log.write_text(json.dumps(done) + "\n")
    trained: list[str] = []

    class FakePool:
        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def __enter__(self) -> "FakePool":
            return self

        def __exit__(self, *a: Any) -> None:
            pass

        def imap(self, fn: Any, items: list[dict[str, Any]]) -> Any:
            for c in items:
                trained.append(c["optimizer"])
                r = record(c["optimizer"], c["lr"], c["seed"], [0.1, 0.9])
                r["config"] = c
                yield r

    class FakeCtx:
        Pool = FakePool

    monkeypatch.setattr(ra.multiprocessing, "get_context", lambda _: FakeCtx)
    recs = ra.train_missing(cfgs, log, jobs=1, echo=False)
    assert trained == ["adam"]  # the logged SNOpt run is read back, not retrained
    assert [r["config"]["optimizer"] for r in recs] == ["snopt", "adam"]
    assert len(ra.read_log(log)) == 2
    # a fresh clone: no log yet, the committed copy holds both runs -> nothing is trained, the log starts from it
    committed = ra.compress_log(log, tmp_path / "results")
    fresh_log = tmp_path / "fresh" / "digits_runs.jsonl"
    trained.clear()
    recs = ra.train_missing(cfgs, fresh_log, jobs=1, echo=False, committed=committed)
    assert trained == [] and len(ra.read_log(fresh_log)) == 2
    assert [r["config"]["optimizer"] for r in recs] == ["snopt", "adam"]
    # an existing log is never overwritten by the committed copy
    trained.clear()
    other = tmp_path / "other" / "digits_runs.jsonl"
    other.parent.mkdir()
    other.write_text(json.dumps(done) + "\n")
    ra.train_missing(cfgs, other, jobs=1, echo=False, committed=committed)
    assert trained == ["adam"]


def test_a_tiny_benchmark_writes_its_table_plot_and_summary(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert ra.main(["--apps", "digits", "--seeds", "0", "--iterations", "2", "--settings", "snopt", "adam@0.01",
                    "--jobs", "1", "--log-dir", str(tmp_path / "logs"), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    text = (out / "digits.md").read_text()
    assert "| **snopt** |" in text and "| adam@0.01 |" in text and "worst seed" in text
    assert (out / "digits.png").read_bytes()[:8] == PNG_MAGIC
    assert "[digits](digits.md)" in (out / "applications.md").read_text()
    logged = ra.read_log(out / "digits_runs.jsonl.gz")
    assert len(logged) == 2
    by_opt = {r["config"]["optimizer"]: r for r in logged}
    assert by_opt["snopt"]["refused_refreshes"] == 0 and by_opt["adam"]["refused_refreshes"] is None
    # rewriting from the log trains nothing and gives the same table
    (out / "digits.md").unlink()
    assert ra.main(["--apps", "digits", "--seeds", "0", "--iterations", "2", "--settings", "snopt", "adam@0.01",
                    "--from-log", "--log-dir", str(tmp_path / "logs"), "--out", str(out)]) == 0
    assert (out / "digits.md").read_text() == text


def test_choose_defaults_counts_a_run_whose_train_loss_came_back_and_never_picks_it() -> None:
    from benchmarks import choose_defaults as cd

    held = record("snopt", None, 0, [0.1, 0.95, 0.97], loss_curve=[2.0, 0.05, 0.3])  # noisy, not lost
    lost = record("snopt", None, 1, [0.1, 0.95, 0.37], loss_curve=[2.0, 0.05, 16.4])  # digits seed 2's story
    never = record("snopt", None, 2, [0.1, 0.5, 0.6], loss_curve=[2.0, 1.5, 1.2])  # a miss, not a loss
    overfit = record("snopt", None, 3, [0.1, 0.95, 0.1], loss_curve=[2.0, 0.05, 0.01])  # test metric lost only
    diverged_after = record("snopt", None, 4, [0.1, 0.95, 0.95], loss_curve=[2.0, 0.05, 0.05],
                            diverged="iteration 2: stiff")
    assert cd.collapsed([held]) == 0 and cd.collapsed([never]) == 0 and cd.collapsed([overfit]) == 0
    assert cd.collapsed([held, lost, never, overfit, diverged_after]) == 2
    names = list(cd.CANDIDATES)
    fast, slow = ra.group_stats(ra.Setting("snopt"), [record("snopt", None, 0, [0.1, 0.95, 0.97])]), \
        ra.group_stats(ra.Setting("snopt"), [record("snopt", None, 0, [0.1, 0.5, 0.95], cpu_step=2.0)])
    per_app = {"digits": {n: (fast if n == names[0] else slow) for n in names}}
    _, pick = cd.table(per_app)
    assert pick == names[0]
    _, pick = cd.table(per_app, {"digits": {names[0]: 1}})  # the fastest lost a run: the next best is picked
    assert pick == names[1]


def test_choose_defaults_reruns_named_candidates_side_by_side() -> None:
    from benchmarks import choose_defaults as cd

    names = cd.select(["K", "F"])
    assert [n.split(":")[0] for n in names] == ["F", "K"]  # the table's order, not the command line's
    with pytest.raises(SystemExit, match="unknown candidate"):
        cd.select(["F", "Z"])
    assert cd.select(None) == list(cd.CANDIDATES)
    pairs = cd.candidate_configs(["digits"], (100, 101), names)
    # seed-major: the two candidates of one seed are adjacent, so two jobs train them at the same time
    assert [(n.split(":")[0], c.seed) for n, c in pairs] == [("F", 100), ("K", 100), ("F", 101), ("K", 101)]
    assert [c.snopt_refresh_guard for _, c in pairs] == [0.0, 0.1, 0.0, 0.1]
    fast = ra.group_stats(ra.Setting("snopt"), [record("snopt", None, 0, [0.1, 0.95, 0.97])])
    slow = ra.group_stats(ra.Setting("snopt"), [record("snopt", None, 0, [0.1, 0.5, 0.95], cpu_step=2.0)])
    text, pick = cd.table({"digits": {names[0]: slow, names[1]: fast}}, None, names)
    assert pick == names[1] and text.count("\n") == 3  # header, rule and the two named candidates only
