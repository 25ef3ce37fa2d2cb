"""benchmarks/run_fashion.py's bookkeeping: --extra runs, the run log and tables written from it.

Training is swapped for three-iteration digits runs (real records, a second each), so the
tables are built from the same structures a full benchmark produces.
"""

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from snopt.experiments import RunConfig
from snopt.experiments._runner import run as real_run

ROOT = Path(__file__).resolve().parents[1]


def test_parse_extra(fashion: ModuleType) -> None:
    assert fashion.parse_extra(["adam=0.003", "sgd=1"]) == [("adam", 0.003), ("sgd", 1.0)]
    for bad in ("adam", "lbfgs=0.1", "adam=fast", "adam=0", "adam=-1"):
        with pytest.raises(SystemExit, match="--extra"):
            fashion.parse_extra([bad])


@pytest.mark.parametrize(("name", "slug"), [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                            ("NVIDIA A100-SXM4-40GB", "a100"), ("Tesla V100-SXM2-16GB", "v100"),
                                            ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090")])
def test_card_slug(fashion: ModuleType, name: str, slug: str) -> None:
    assert fashion.card_slug(name) == slug


def test_read_log_skips_a_torn_last_line(fashion: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    log.write_text(json.dumps({"a": 1}) + "\n" + json.dumps({"a": 2}) + "\n" + '{"a": 3, "hist')
    assert fashion.read_log(log) == [{"a": 1}, {"a": 2}]


def test_extra_runs_log_and_tables_from_the_log(fashion: ModuleType, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[RunConfig] = []

    def tiny(cfg: RunConfig, isolate: bool = False) -> dict[str, Any]:
        asked.append(cfg)
        small = replace(cfg, task="digits", iterations=3, eval_every=3, options={}, target_loss=None,
                        target_metric=None)
        return real_run(small)

    monkeypatch.setattr(fashion, "run", tiny)
    log = tmp_path / "runs.jsonl"
    out = tmp_path / "out"
    out.mkdir()
    assert fashion.main(["--seeds", "0", "1", "--jobs", "1", "--extra", "adam=0.003", "--log", str(log),
                         "--out", str(out)]) == 0
    # the protocol's three optimizers plus the extra Adam, seed-major
    assert [(c.seed, c.optimizer, c.lr) for c in asked] == [
        (s, o, lr) for s in (0, 1) for o, lr in (("snopt", 1.0), ("adam", 0.01), ("sgd", 0.03), ("adam", 0.003))]
    assert {c.snopt_kl_clip_scope for c in asked if c.optimizer == "snopt"} == {"step"}  # the side-by-side pick
    runs = fashion.read_log(log)
    assert len(runs) == 8 and [r["extra"] for r in runs] == [False, False, False, True] * 2
    text = (out / "fashion_cpu.md").read_text()
    main_table, extra_part = text.split("## The same SNOpt runs vs adam at lr 0.003")
    assert "| adam | 0.01 |" in main_table and "| adam | 0.003 |" not in main_table
    assert "| adam | 0.003 |" in extra_part.split("## Tuning")[0] and "| snopt | 1 |" in extra_part
    assert "--extra adam=0.003" in text and (out / "applications_fashion_adam0.003.png").is_file()

    again = tmp_path / "again"
    again.mkdir()
    asked.clear()
    assert fashion.main(["--from-log", str(log), "--out", str(again)]) == 0
    assert not asked  # nothing trained
    redone = (again / "fashion_cpu.md").read_text()

    def without_stamp(t: str) -> list[str]:
        return [ln for ln in t.splitlines() if not ln.startswith(("Regenerate", "- load average"))]
    assert without_stamp(redone) == without_stamp(text)
    assert "- load average while the runs trained: not in the log" in redone  # this machine's is not the runs'

    # runs that finished out of order (two at a time) give the same table as the live benchmark's order
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in runs[::-1]))
    third = tmp_path / "third"
    third.mkdir()
    assert fashion.main(["--from-log", str(shuffled), "--out", str(third)]) == 0
    assert without_stamp((third / "fashion_cpu.md").read_text()) == without_stamp(text)

    # the same runs as if recorded on a GPU: the table is named after the card and reads the card's records
    gpu_log = tmp_path / "gpu.jsonl"
    gpu_log.write_text("".join(json.dumps({**r, "machine": {**r["machine"], "gpu": "NVIDIA H100 80GB HBM3"},
                                           "memory": {**r["memory"], "peak_cuda_mib": 100.0 + i}}) + "\n"
                               for i, r in enumerate(runs)))
    gpu_out = tmp_path / "gpu"
    gpu_out.mkdir()
    assert fashion.main(["--from-log", str(gpu_log), "--device", "cuda", "--out", str(gpu_out)]) == 0
    gpu_text = (gpu_out / "fashion_h100.md").read_text()
    assert gpu_text.startswith("# Fashion-MNIST (full 60k / 10k, 28×28): SNOpt vs Adam vs SGD (GPU)")
    assert "- GPU: NVIDIA H100 80GB HBM3;" in gpu_text and "--device cuda --jobs 1 --extra adam=0.003" in gpu_text
    # the most over the two seeds: runs 4..7 are seed 1's (snopt, adam 0.01, sgd, adam 0.003)
    assert "snopt 1 104, adam 0.01 105, sgd 0.03 106, adam 0.003 107." in gpu_text
    assert (gpu_out / "applications_fashion_h100.png").is_file()
    assert (gpu_out / "applications_fashion_h100_adam0.003.png").is_file()


def test_from_log_without_protocol_runs_fails(fashion: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    log.write_text(json.dumps({"extra": True, "config": {"optimizer": "adam", "seed": 0}, "resolved": {"lr": 0.1}})
                   + "\n")
    with pytest.raises(SystemExit, match="no seed whose protocol runs all finished"):
        fashion.main(["--from-log", str(log), "--out", str(tmp_path)])


def test_read_log_reads_gzip(fashion: ModuleType, tmp_path: Path) -> None:
    import gzip
    log = tmp_path / "runs.jsonl.gz"
    log.write_bytes(gzip.compress((json.dumps({"a": 1}) + "\n" + json.dumps({"a": 2}) + "\n").encode()))
    assert fashion.read_log(log) == [{"a": 1}, {"a": 2}]


def _rec(opt: str, lr: float, seed: int, extra: bool = False) -> dict[str, Any]:
    return {"config": {"optimizer": opt, "seed": seed}, "resolved": {"lr": lr}, "extra": extra}


def test_complete_seeds_leaves_out_a_seed_that_did_not_finish_every_setting(bench: ModuleType) -> None:
    runs = [_rec("snopt", 0.3, 0), _rec("adam", 0.01, 0), _rec("adam", 0.003, 0, True),
            _rec("adam", 0.01, 1), _rec("adam", 0.003, 1, True),  # seed 1: SNOpt never finished
            _rec("snopt", 0.3, 2), _rec("adam", 0.01, 2), _rec("adam", 0.003, 2, True)]
    kept, left = bench.complete_seeds(runs)
    assert {r["config"]["seed"] for r in kept} == {0, 2} and len(kept) == 6
    assert left == [runs[3], runs[4]]
    # the extra flag is part of the setting: the protocol's Adam at 0.003 is not the extra one
    kept, left = bench.complete_seeds([_rec("adam", 0.003, 0), _rec("adam", 0.003, 1, True), _rec("adam", 0.003, 1)])
    assert kept == [_rec("adam", 0.003, 1, True), _rec("adam", 0.003, 1)] and left == [_rec("adam", 0.003, 0)]


def test_evaluation_cost_line_divides_step_time_by_evaluations(fashion: ModuleType) -> None:
    def rec(name: str, lr: float, seed: int, step: float, fwd: float, bwd: float) -> dict[str, Any]:
        return {"config": {"optimizer": name, "seed": seed}, "resolved": {"lr": lr},
                "summary": {"mean_step_time": step, "mean_nfe_forward": fwd, "mean_nfe_backward": bwd}}

    runs = [rec("snopt", 0.3, 1, 0.2, 60.0, 40.0), rec("adam", 0.003, 0, 0.1, 20.0, 30.0),
            rec("snopt", 0.3, 0, 0.3, 50.0, 50.0), rec("adam", 0.003, 1, 0.15, 25.0, 25.0)]
    line = fashion.evaluation_cost_line(runs)
    assert "seeds 0 / 1:" in line
    assert "snopt 0.3 3.00 / 2.00" in line  # seed order, not record order
    assert "adam 0.003 2.00 / 3.00" in line


@pytest.mark.parametrize(("log_name", "device", "clock"), [("fashion_cpu_increment_runs.jsonl.gz", "cpu", "CPU"),
                                                           ("fashion_h100_runs.jsonl.gz", "cuda", "wall-clock")])
def test_decide_settles_the_committed_verdicts_on_the_runs_clock(
        fashion: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_name: str, device: str,
        clock: str, continue_run: Callable[[dict[str, Any], int], dict[str, Any]]) -> None:
    # the committed logs of the per-increment pick: Adam (0.01) and SGD missed targets SNOpt reached; on a GPU the
    # clock is the wall's
    protocol = [r for r in fashion.read_log(ROOT / "benchmarks" / "results" / log_name) if not r.get("extended")]
    asked: list[RunConfig] = []

    def longer(cfg: RunConfig, isolate: bool = False, stop_at_targets: bool = False) -> dict[str, Any]:
        assert stop_at_targets  # each longer run ends once it has reached both targets
        asked.append(cfg)
        t = next(r for r in protocol if (r["config"]["optimizer"], r["config"]["seed"], bool(r.get("extra")))
                 == (cfg.optimizer, cfg.seed, False))
        return continue_run(t, cfg.iterations)

    monkeypatch.setattr(fashion, "run", longer)
    source, log, out = tmp_path / "protocol.jsonl", tmp_path / "longer.jsonl", tmp_path / "out"
    source.write_text("".join(json.dumps(r) + "\n" for r in protocol))
    out.mkdir()
    assert fashion.main(["--from-log", str(source), "--device", device, "--decide", "--log", str(log),
                         "--out", str(out)]) == 0
    assert asked and {c.optimizer for c in asked} <= {"adam", "sgd"} and all(c.device == device for c in asked)
    assert all(c.iterations is not None and c.iterations > 1000 for c in asked)  # longer than the protocol's
    text = next(out.glob("fashion_*.md")).read_text()
    assert "settled per seed by longer runs" in text and f"({clock}), settled per seed" in text
    assert "Settled by longer runs (`--decide`)" in text and " --decide`" in text.splitlines()[2]
    # the merged log settles the same verdicts with nothing run
    merged = tmp_path / "merged.jsonl"
    merged.write_text(source.read_text() + log.read_text())
    asked.clear()
    again = tmp_path / "again"
    again.mkdir()
    assert fashion.main(["--from-log", str(merged), "--device", device, "--decide", "--out", str(again)]) == 0
    assert not asked
    assert next(again.glob("fashion_*.md")).read_text().splitlines()[3:] == text.splitlines()[3:]


def test_the_benchmark_run_again_with_its_log_reads_the_runs_back(fashion: ModuleType, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[RunConfig] = []

    def tiny(cfg: RunConfig, isolate: bool = False, checkpoint: Path | None = None) -> dict[str, Any]:
        asked.append(cfg)
        small = replace(cfg, task="digits", iterations=3, eval_every=3, options={}, target_loss=None,
                        target_metric=None)
        return {**real_run(small, checkpoint=checkpoint), "config": cfg.to_dict()}  # as if it were cfg's run

    monkeypatch.setattr(fashion, "run", tiny)
    log, ckdir = tmp_path / "runs.jsonl", tmp_path / "ck"
    args = ["--seeds", "0", "--jobs", "1", "--log", str(log), "--checkpoint-dir", str(ckdir)]
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    assert fashion.main([*args, "--out", str(first)]) == 0
    assert len(asked) == 3 and len(fashion.read_log(log)) == 3 and not list(ckdir.glob("*"))
    assert " in " in (first / "fashion_cpu.md").read_text().split("Generated ")[1].split(",")[0]
    asked.clear()
    assert fashion.main([*args, "--out", str(second)]) == 0
    assert not asked and len(fashion.read_log(log)) == 3  # nothing trained, nothing logged twice
    text = (second / "fashion_cpu.md").read_text()
    assert "from the runs recorded in `runs.jsonl`" in text  # no single elapsed time for a pieced-together run
    table = [ln for ln in text.splitlines() if ln.startswith("| snopt |")]
    assert table and table == [ln for ln in (first / "fashion_cpu.md").read_text().splitlines()
                               if ln.startswith("| snopt |")]


def test_the_committed_cpu_table_needs_no_longer_runs(bench: ModuleType) -> None:
    """At the whole-step pick every CPU bound is already below the goal, so `--decide` has nothing to settle."""
    logged = bench.read_log(ROOT / "benchmarks" / "results" / "fashion_cpu_runs.jsonl.gz")
    runs, left_out, extended = bench.runs_from_log(logged)
    assert not left_out and not extended
    protocol = [r for r in runs if not r.get("extra")]
    assert len(protocol) == 9 and bench.decide_plan(protocol) == []
    # and the plan is not empty for want of misses: Adam and SGD missed targets that SNOpt reached
    assert any(r["diverged"] for r in protocol if r["config"]["optimizer"] in ("adam", "sgd"))


def test_the_committed_longer_runs_on_another_host_are_timed_at_the_protocol_hosts_speed(bench: ModuleType) -> None:
    # The --decide runs of fashion_cpu_increment_runs.jsonl.gz (the per-increment pick's table) ran on another
    # host: they do not repeat the protocol runs, so each is timed by its own function evaluations at its protocol
    # run's CPU cost per evaluation, and the two that diverged (and the one that reached the loss target) inside
    # the protocol's 1000 iterations settle nothing.
    from snopt.experiments._runner import summarize

    logged = bench.read_log(ROOT / "benchmarks" / "results" / "fashion_cpu_increment_runs.jsonl.gz")
    runs, _, extended = bench.runs_from_log(logged)
    runs = [{**r, "summary": summarize(r)} for r in runs if not r.get("extra")]
    by = {(r["config"]["optimizer"], r["config"]["seed"]): r for r in runs}
    longer = {(e["config"]["optimizer"], e["config"]["seed"]): e for e in extended}
    assert set(longer) == {("adam", 0), ("sgd", 0), ("sgd", 1), ("sgd", 2)}
    assert not any(bench.reproduces(by[key], e) for key, e in longer.items())
    for seed in (0, 1):
        protocol, e = by[("sgd", seed)], longer[("sgd", seed)]["summary"]
        h = protocol["history"]
        per_nfe = h["cpu_time"][-1] / (sum(h["nfe_forward"]) + sum(h["nfe_backward"]))
        expected = by[("snopt", seed)]["summary"]["cpu_time_to_target_metric"] / (e["nfe_to_target_metric"] * per_nfe)
        sr = bench.seed_ratio(by[("snopt", seed)], protocol, "metric", extended)
        assert sr.apart and not sr.disagrees and sr.bound == "=" and sr.ratio == pytest.approx(expected)
        # its own clock, on the slower host, would have given a smaller ratio
        assert sr.ratio > by[("snopt", seed)]["summary"]["cpu_time_to_target_metric"] / e["cpu_time_to_target_metric"]
    for key, k in ((("adam", 0), "loss"), (("sgd", 2), "metric"), (("sgd", 1), "loss")):
        sr = bench.seed_ratio(by[("snopt", key[1])], by[key], k, extended)
        assert sr.disagrees and sr.bound == "<=" and sr.ratio == pytest.approx(
            by[("snopt", key[1])]["summary"][f"cpu_time_to_target_{k}"] / by[key]["summary"]["train_cpu_time"])
