"""benchmarks/run_applications.py's run log: a live benchmark appends every run, `--from-log` rewrites its tables.

Training is swapped for three-iteration runs of the same tasks (real records, about a second
each), so the tables come from the structures a full benchmark produces.
"""

import json
import re
from collections.abc import Callable
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


def test_a_log_from_several_hosts_names_each_with_its_tasks(bench: ModuleType) -> None:
    def run(task: str, cpu: str, plat: str) -> dict[str, Any]:
        machine = {"cpu": cpu, "platform": plat, "logical_cores": 2, "torch": "2.13.0+cpu", "python": "3.11.7",
                   "torch_threads": 1}
        return {"config": {"task": task}, "machine": machine}

    one = bench.cpu_log_machine_lines([run("digits", "Xeon", "host-a"), run("cnf", "Xeon", "host-a")])
    assert [ln for ln in one if ln.startswith("- CPU")] == ["- CPU: Xeon (2 logical cores), host-a"]
    two = bench.cpu_log_machine_lines([run("digits", "Xeon", "host-a"), run("timeseries", "EPYC", "host-b"),
                                       run("cnf", "EPYC", "host-b"), run("digits", "Xeon", "host-a")])
    assert [ln for ln in two if ln.startswith("- CPU")] == [
        "- CPU: Xeon (2 logical cores), host-a — digits", "- CPU: EPYC (2 logical cores), host-b — timeseries, cnf"]


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


def _rec(opt: str, seed: int, *, per_it: float, done: int, loss_at: float | None = None,
         metric_at: float | None = None, diverged: bool = False, iterations: int | None = None) -> dict[str, Any]:
    """A run record reduced to what --decide reads: `loss_at` / `metric_at` are CPU seconds to the targets."""
    def its(t: float | None) -> int | None:
        return None if t is None else round(t / per_it)
    return {"config": {"task": "digits", "preset": "paper", "optimizer": opt, "seed": seed, "lr": None,
                       "iterations": iterations},
            "resolved": {"eval_every": 10}, "diverged": f"iteration {done}: non-finite loss" if diverged else None,
            # the same computation whatever the run's length (same seed): evaluations agree on shared iterations
            "history": {"cpu_time": [per_it * (i + 1) for i in range(done)], "nfe_forward": [12] * done,
                        "nfe_backward": [8] * done},
            "evals": {"train_loss": [2.0 / (1 + i) for i in range(0, done + 1, 10)]},
            "summary": {"iterations_done": done, "train_cpu_time": per_it * done,
                        "cpu_time_to_target_loss": loss_at, "cpu_time_to_target_metric": metric_at,
                        "iterations_to_target_loss": its(loss_at), "iterations_to_target_metric": its(metric_at),
                        "nfe_to_target_loss": None if loss_at is None else 20 * round(loss_at / per_it),
                        "nfe_to_target_metric": None if metric_at is None else 20 * round(metric_at / per_it),
                        "total_nfe": 20 * done}}


def test_decide_plan_runs_long_enough_that_a_continued_miss_meets_the_goal(bench: ModuleType) -> None:
    runs = [_rec("snopt", 0, per_it=1.0, done=300, loss_at=100.0, metric_at=60.0),
            _rec("sgd", 0, per_it=0.5, done=300),  # missed both in 150 CPU s
            _rec("adam", 0, per_it=0.8, done=300, metric_at=90.0),  # missed only the loss target
            _rec("snopt", 1, per_it=1.0, done=300, loss_at=100.0),
            _rec("sgd", 1, per_it=0.5, done=200, diverged=True),  # will never reach it: nothing to settle
            _rec("adam", 1, per_it=1.0, done=300, loss_at=150.0, metric_at=150.0),  # SNOpt missed the metric
            ]
    plan = bench.decide_plan(runs)
    # sgd seed 0: 100 s / 0.5 goal x 1.25 headroom / 0.5 s per iteration = 500; adam seed 0: 312.5, rounded up to
    # whole evaluation intervals
    assert [(c.optimizer, c.seed, c.iterations, c.preset) for c in plan] == [("sgd", 0, 500, "paper"),
                                                                            ("adam", 0, 320, "paper")]
    # a budget already long enough needs no rerun
    assert bench.decide_plan([runs[0], _rec("sgd", 0, per_it=1.0, done=300)]) == []


def test_decided_lines_settle_each_seed_from_the_longer_runs(bench: ModuleType) -> None:
    runs = [
        _rec("snopt", 0, per_it=1.0, done=300, loss_at=100.0), _rec("sgd", 0, per_it=0.5, done=300),
        _rec("snopt", 1, per_it=1.0, done=300, loss_at=100.0), _rec("sgd", 1, per_it=0.5, done=300),
        _rec("snopt", 2, per_it=1.0, done=300, loss_at=100.0), _rec("sgd", 2, per_it=0.5, done=100, diverged=True),
        _rec("snopt", 3, per_it=1.0, done=300, loss_at=100.0), _rec("sgd", 3, per_it=0.5, done=300)]
    longer = [_rec("sgd", 0, per_it=0.5, done=500, loss_at=250.0, iterations=500),  # reached: 100 / 250 = 0.40
              _rec("sgd", 1, per_it=0.5, done=500, iterations=500),  # still missed after 250 s: <= 0.40
              _rec("sgd", 3, per_it=0.5, done=500, loss_at=150.0, iterations=500)]  # reached: 0.67
    assert not bench.decided_lines(runs, [])[0]  # no longer run: nothing settled
    # a protocol run already long enough settles its seed beside a longer run of another
    enough = [*runs[:2], _rec("snopt", 1, per_it=1.0, done=300, loss_at=100.0), _rec("sgd", 1, per_it=1.0, done=300)]
    cells = next(ln for ln in bench.decided_lines(enough, longer[:1])[0] if ln.startswith("| sgd")).split(" | ")
    assert cells[3] == "<=0.33 (missed in its 300 iterations, long enough to settle it)"
    table, lines = bench.decided_lines(runs, longer)
    row = next(ln for ln in table if ln.startswith("| sgd | train-loss target"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].startswith("0.40 (reached at iteration 500")
    assert cells[3].startswith("<=0.40 (missed in a longer run of 500 iterations")
    assert cells[4].startswith("0.00 (sgd diverged: iteration 100)")
    assert cells[5].startswith("0.67 (reached")
    assert cells[6] == "met on 3 of 4 seeds, missed on 1"
    assert lines == ["- SNOpt ÷ sgd, time to the train-loss target (CPU), settled per seed by longer runs: "
                     "**met on 3 of 4 seeds, missed on 1** (goal ≤ 0.5)"]
    # where every seed has a measured ratio, the verdict also gives the ratio of the means, as the tables do
    reached = [_rec("sgd", 1, per_it=0.5, done=500, loss_at=200.0, iterations=500)]
    table, lines = bench.decided_lines(runs[:4], [longer[0], *reached])
    assert lines == ["- SNOpt ÷ sgd, time to the train-loss target (CPU), settled per seed by longer runs: "
                     "**met on every seed; ratio of the means 0.44** (goal ≤ 0.5)"]  # 200 / (250 + 200)
    # a later process running slower: the iterations both ran are timed by the protocol run's clock
    slow = [_rec("sgd", 0, per_it=0.6, done=500, loss_at=300.0, iterations=500)]  # 180 s where the protocol took 150
    cells = next(ln for ln in bench.decided_lines(runs[:2], slow)[0] if ln.startswith("| sgd")).split(" | ")
    assert cells[2].startswith("0.37 (reached")  # 100 / (300 - 180 + 150)
    # ... unless their evaluations differ: then they were not the same computation, and its own clock stands
    # (another host's rounding): the table says so, and how fast each host computed.
    other = [{**slow[0], "evals": {"train_loss": [9.0] * 51}, "machine": {"platform": "host-b"}}]
    runs[1] = {**runs[1], "machine": {"platform": "host-a"}}
    assert not bench.reproduces(runs[1], other[0]) and bench.reproduces(runs[1], slow[0])
    table, lines = bench.decided_lines(runs[:2], other)
    cells = next(ln for ln in table if ln.startswith("| sgd")).split(" | ")
    # timed at the protocol host's speed: 500 iterations x 20 NFE x (0.5 s / 20 NFE) = 250 s, not its own 300 s
    assert cells[2] == "0.40 (reached at iteration 500 of a longer run on another trajectory)"  # 100 / 250
    assert lines == ["- SNOpt ÷ sgd, time to the train-loss target (CPU), settled per seed by longer runs: "
                     "**met on every seed; ratio of the means 0.40; 1 of 1 by a longer run on another trajectory** "
                     "(goal ≤ 0.5)"]
    missed = [{**other[0], "summary": {**other[0]["summary"], "cpu_time_to_target_loss": None,
                                       "iterations_to_target_loss": None, "nfe_to_target_loss": None}}]
    cells = next(ln for ln in bench.decided_lines(runs[:2], missed)[0] if ln.startswith("| sgd")).split(" | ")
    assert cells[2] == "<=0.40 (missed in 500 iterations of a longer run on another trajectory)"  # all 10,000 NFE
    assert any(ln.startswith("A longer run **on another trajectory** did not repeat the protocol run") for ln in table)
    # 0.5 s / 20 NFE on the protocol host, 0.6 s / 20 on the longer run's
    assert any(ln.endswith("protocol run → this longer run): sgd seed 0 25.000 → 30.000. Hosts: host-a, host-b.")
               for ln in table)
    # on a GPU the host names its card too: two cards can share one platform string
    on_gpu = [{**other[0], "machine": {"platform": "host-a", "device": "cuda", "gpu": "Card B"}}]
    assert any(ln.endswith("Hosts: host-a, host-a (Card B).") for ln in bench.decided_lines(runs[:2], on_gpu)[0])
    assert not any("another trajectory" in ln for ln in bench.decided_lines(runs[:2], slow)[0])
    # Another trajectory that diverged (or reached the target) within the protocol run's 300 iterations
    # contradicts it rather than continuing it: the protocol's bound stands.
    early = [{**other[0], "diverged": "iteration 200: non-finite loss",
              "summary": {**missed[0]["summary"], "iterations_done": 200}}]
    cells = next(ln for ln in bench.decided_lines(runs[:2], early)[0] if ln.startswith("| sgd")).split(" | ")
    assert cells[2] == ("<=0.67 (missed in its 300 iterations; a longer run on another trajectory diverged at "
                        "iteration 200, inside them: the two disagree, so it settles nothing)")  # 100 / 150
    # the iteration a run diverged in is the one its message names (a failed solve leaves it unrecorded)
    assert bench.diverged_at({"diverged": "iteration 201: The forward ODE solve failed", "summary": {
        "iterations_done": 200}}) == 201
    assert bench.diverged_at({"diverged": "evaluation after iteration 40: failed", "summary": {}}) == 40
    assert bench.diverged_at({"diverged": "stiff", "summary": {"iterations_done": 7}}) == 8
    late = [{**early[0], "diverged": "iteration 400: non-finite loss",
             "summary": {**missed[0]["summary"], "iterations_done": 400}}]
    cells = next(ln for ln in bench.decided_lines(runs[:2], late)[0] if ln.startswith("| sgd")).split(" | ")
    assert cells[2] == "0.00 (a longer run on another trajectory diverged before reaching it: iteration 400)"
    # a longer run shorter than the plan asks for does not stand for it
    short = [{**e, "config": {**e["config"], "iterations": 400}} for e in longer]
    assert not bench.decided_lines(runs, short)[0]


def test_decide_reruns_the_undetermined_seeds_longer_and_the_log_rewrites_the_table(
        bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        continue_run: Callable[[dict[str, Any], int], dict[str, Any]]) -> None:
    # the committed paper-preset log: SGD and Adam missed digits targets that SNOpt reached on some seeds
    committed = bench.RESULTS / "applications_paper_cpu_runs.jsonl.gz"
    protocol = [r for r in bench.read_log(committed) if r["config"]["task"] == "digits" and not r.get("extended")]
    committed = tmp_path / "protocol.jsonl"  # the protocol runs alone, as the benchmark first logged them
    committed.write_text("".join(json.dumps(r) + "\n" for r in protocol))
    asked: list[RunConfig] = []
    stops: list[bool] = []

    def longer(cfg: RunConfig, quiet: bool = True, isolate: bool = False,
               stop_at_targets: bool = False) -> dict[str, Any]:
        asked.append(cfg)
        stops.append(stop_at_targets)
        t = next(r for r in protocol if (r["config"]["optimizer"], r["config"]["seed"]) == (cfg.optimizer, cfg.seed))
        return continue_run(t, cfg.iterations)

    monkeypatch.setattr(bench, "run", longer)
    log, out = tmp_path / "longer.jsonl", tmp_path / "out"
    assert bench.main(["--preset", "paper", "--tasks", "digits", "--from-log", str(committed), "--decide",
                       "--log", str(log), "--out", str(out)]) == 0
    plan = bench.decide_plan([{**r, "summary": runner.summarize(r)} for r in protocol])
    assert plan and [(c.optimizer, c.seed, c.iterations) for c in asked] == [
        (c.optimizer, c.seed, c.iterations) for c in plan]
    assert stops == [True] * len(plan)  # a longer run ends once it has reached both targets
    new = bench.read_log(log)
    assert len(new) == len(plan) and all(r["extended"] for r in new)
    text = (out / "applications_paper_cpu.md").read_text()
    assert "Settled by longer runs (`--decide`)" in text
    assert "- SNOpt ÷ sgd, time to the train-loss target (CPU), settled per seed by longer runs: **met on every " \
           "seed** (goal ≤ 0.5)" in text
    # the protocol tables are unchanged by the longer runs
    plain = tmp_path / "plain"
    assert bench.main(["--preset", "paper", "--tasks", "digits", "--from-log", str(committed),
                       "--out", str(plain)]) == 0
    table = next(ln for ln in text.splitlines() if ln.startswith("| sgd | 0.02"))
    assert table in (plain / "applications_paper_cpu.md").read_text()
    # the regenerating command names --decide where longer runs are behind the table
    assert "Regenerate: `python benchmarks/run_applications.py --preset paper --decide`" in text
    assert "--decide" not in (plain / "applications_paper_cpu.md").read_text().splitlines()[2]

    # the whole log (protocol + longer runs) rewrites the same table without running anything
    both = tmp_path / "both.jsonl"
    both.write_text("".join(json.dumps(r) + "\n" for r in protocol + new))
    asked.clear()
    again = tmp_path / "again"
    assert bench.main(["--preset", "paper", "--tasks", "digits", "--from-log", str(both), "--decide",
                       "--out", str(again)]) == 0
    assert not asked
    assert _stamp_free((again / "applications_paper_cpu.md").read_text()) == _stamp_free(text)


def test_run_pool_reuses_logged_runs_and_continues_checkpointed_ones(bench: ModuleType, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Two jobs with one run name (the protocol's Adam and an extra Adam at another rate), real 6-iteration runs.
    from snopt.experiments._digits import ImageTask

    base = RunConfig(task="digits", optimizer="adam", iterations=6, batch_size=32, eval_every=2,
                     options={"hidden": 4, "eval_train": 50})
    jobs = [(base, {"extra": False}), (replace(base, lr=0.003), {"extra": True})]
    asked: list[tuple[RunConfig, Path | None]] = []

    def one(cfg: RunConfig, isolate: bool = False, checkpoint: Path | None = None) -> dict[str, Any]:
        asked.append((cfg, checkpoint))
        return REAL_RUN(cfg, checkpoint=checkpoint)

    drawn = [0]
    batch = ImageTask.batch

    def interrupted(self: ImageTask, generator: Any) -> Any:
        drawn[0] += 1
        if drawn[0] == 6 + 4:  # the first job finishes; the second stops in its iteration 4 (checkpoint at 2)
            raise KeyboardInterrupt
        return batch(self, generator)

    monkeypatch.setattr(ImageTask, "batch", interrupted)
    log, ckdir = tmp_path / "runs.jsonl", tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        bench.run_pool(jobs, 1, log, one, ckdir)
    assert len(bench.read_log(log)) == 1
    names = [c.name for _, c in asked if c is not None]
    assert len(set(names)) == 2 and all(n.startswith("digits-digits_adam_seed0-") for n in names)
    assert [p.name for p in ckdir.iterdir()] == [names[1]]  # the finished run's checkpoint is gone
    asked.clear()
    drawn[0] = -1000  # no more interruptions
    runs = bench.run_pool(jobs, 1, log, one, ckdir)
    assert [c for c, _ in asked] == [jobs[1][0]]  # the logged run was read back, the other one continued
    assert [r["resumed_at"] for r in runs] == [[], [2]] and [r["extra"] for r in runs] == [False, True]
    assert drawn[0] == -1000 + 4 and not list(ckdir.iterdir())
    assert len(bench.read_log(log)) == 2
    # A third call trains nothing; other marks are another job.
    asked.clear()
    again = bench.run_pool(jobs, 1, log, one, ckdir)
    assert not asked and [r["history"] for r in again] == [r["history"] for r in runs]
    bench.run_pool([(base, {"extra": True})], 1, log, one, ckdir)
    assert [c for c, _ in asked] == [base]


def test_digits_runs_snopt_at_the_scope_its_side_by_side_rerun_picks(bench: ModuleType, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Digits' SNOpt runs at the better of its two trust-region scopes' picks, as their side-by-side rerun scores
    them; Adam and SGD keep their own picks."""
    def row(task: str, opt: str, lr: float, eps: float | None, clip: float | None, seed: int, t: float,
            **extra: Any) -> dict[str, Any]:
        return {"task": task, "optimizer": opt, "lr": lr, "eps": eps, "kl_clip": clip, "seed": seed,
                "metric": "accuracy", "diverged": False, "final_test_metric": 0.97, "target_metric": 0.95,
                "cpu_time_to_target_loss": t, "cpu_time_to_target_metric": t, "train_cpu_time": 20.0, **extra}
    seeds = (100, 101)
    rows = [row("digits", "snopt", 0.3, 0.03, 0.003, s, 4.0) for s in seeds]
    rows += [row("digits", o, lr, None, None, s, 9.0) for o, lr in (("adam", 0.01), ("sgd", 0.03)) for s in seeds]
    rows += [row("digits_step", "snopt", 0.1, 0.001, 0.01, s, 5.0) for s in seeds]  # worse in the tuning
    tuning, pairs = tmp_path / "tuning.json", tmp_path / "pairs.json"
    tuning.write_text(json.dumps(rows))
    monkeypatch.setattr(bench, "TUNING_JSON", tuning)
    monkeypatch.setattr(bench, "SCOPE_PAIRS_JSON", pairs)
    asked = _tiny_runs(monkeypatch)
    out = tmp_path / "out"
    args = ["--tasks", "digits", "--seeds", "0", "--out", str(out)]
    for paired, expected in ((None, ("increment", 0.3, 0.03, 0.003)), ((8.0, 6.0), ("step", 0.1, 0.001, 0.01))):
        if paired is not None:  # the rerun on one clock reverses the tuning's order
            pairs.write_text(json.dumps(
                [row("digits", "snopt", 0.3, 0.03, 0.003, s, paired[0], paired=True, host="h") for s in seeds]
                + [row("digits_step", "snopt", 0.1, 0.001, 0.01, s, paired[1], paired=True, host="h")
                   for s in seeds]))
        asked.clear()
        assert bench.main(args) == 0
        snopt = [c for c in asked if c.optimizer == "snopt"]
        assert [(c.snopt_kl_clip_scope, c.lr["snopt"] if isinstance(c.lr, dict) else c.lr, c.snopt_eps,
                 c.snopt_kl_clip) for c in snopt] == [expected]
        text = (out / "applications_cpu.md").read_text()
        assert f"The benchmark runs the {expected[0]}'s" in text
