"""The applications benchmark's tuning protocol (benchmarks/run_applications.py) and its record.

The protocol is tested on a synthetic landscape (no training); the committed tuning rows are
checked against the presets of `snopt.experiments`, so the README's commands train exactly the
settings the committed benchmark table measured.
"""

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from snopt.experiments import RunConfig
from snopt.experiments._common import resolve
from snopt.experiments._runner import task_defaults

ROOT = Path(__file__).resolve().parents[1]


def _row(opt: str, lr: float, eps: float | None, seed: int, *, tl: float | None, tm: float | None,
         final: float = 0.97, diverged: bool = False, clip: float | None = None) -> dict[str, Any]:
    return {"task": "digits", "optimizer": opt, "lr": lr, "eps": eps, "kl_clip": clip, "seed": seed,
            "metric": "accuracy",
            "diverged": diverged, "final_test_metric": final, "target_metric": 0.95,
            "cpu_time_to_target_loss": tl, "cpu_time_to_target_metric": tm, "train_cpu_time": 20.0}


def test_scores(bench: ModuleType) -> None:
    assert bench.seed_value(_row("adam", 0.01, None, 0, tl=3.0, tm=2.0)) == 5.0
    assert bench.seed_value(_row("adam", 0.01, None, 0, tl=None, tm=2.0)) == 22.0  # a miss costs the whole run
    assert bench.seed_value({"metric": "nll", "final_test_metric": 3.4}) == 3.4
    ok = [_row("adam", 0.01, None, 0, tl=3.0, tm=2.0), _row("adam", 0.01, None, 1, tl=4.0, tm=3.0, final=0.94)]
    assert bench.setting_score(ok) == (0, 0, 0.0, 6.0)  # mean final 95.5 % is at the target despite one seed at 94 %
    low = [_row("adam", 0.01, None, 0, tl=1.0, tm=1.0, final=0.5), _row("adam", 0.01, None, 1, tl=1.0, tm=1.0)]
    assert bench.setting_score(low) == (1, 0, 0.0, 2.0)  # reached both targets fast, then fell far below on average
    assert bench.setting_score(ok + [_row("adam", 0.01, None, 2, tl=1.0, tm=1.0, diverged=True)])[0] == 2
    # a short run missing its targets (each miss costs only its own short run) never beats one reaching them
    slow = [_row("sgd", 0.03, None, s, tl=8.0, tm=9.0) for s in (0, 1)]
    short = [{**_row("sgd", 0.01, None, s, tl=None, tm=None), "train_cpu_time": 5.0} for s in (0, 1)]
    assert bench.setting_score(short) == (0, 4, -0.97, 10.0) and bench.setting_score(slow) == (0, 0, 0.0, 17.0)
    assert bench.best_settings(slow + short)["sgd"] == ("sgd", 0.03, None, None)
    # among settings that miss every target, the one ending closer to it wins, not the one with cheaper runs
    cheap = [{**_row("sgd", 0.01, None, s, tl=None, tm=None, final=0.73), "train_cpu_time": 50.0} for s in (0, 1)]
    close = [{**_row("sgd", 0.03, None, s, tl=None, tm=None, final=0.77), "train_cpu_time": 60.0} for s in (0, 1)]
    assert bench.setting_score(cheap)[:2] == bench.setting_score(close)[:2] == (1, 4)
    assert bench.best_settings(cheap + close)["sgd"] == ("sgd", 0.03, None, None)
    nan = [{"metric": "nll", "final_test_metric": float("nan")}]
    assert bench.setting_score(nan)[0] == 2


def test_best_settings_uses_every_seed(bench: ModuleType) -> None:
    rows = [
        # fastest on seed 0 but diverged on seed 1: never kept
        _row("snopt", 0.3, 0.01, 0, tl=1.0, tm=1.0), _row("snopt", 0.3, 0.01, 1, tl=None, tm=None, diverged=True),
        # slower on seed 0, faster on seed 1: the mean decides (6 vs 7)
        _row("snopt", 0.1, 0.01, 0, tl=4.0, tm=4.0), _row("snopt", 0.1, 0.01, 1, tl=2.0, tm=2.0),
        _row("snopt", 0.1, 0.03, 0, tl=3.0, tm=3.0), _row("snopt", 0.1, 0.03, 1, tl=4.0, tm=4.0),
        _row("adam", 0.01, None, 0, tl=5.0, tm=5.0), _row("adam", 0.01, None, 1, tl=5.0, tm=5.0),
    ]
    assert bench.best_settings(rows) == {"snopt": ("snopt", 0.1, 0.01, None), "adam": ("adam", 0.01, None, None)}
    # fast on average but ending far below the accuracy target: loses to a slower setting that keeps it
    rows2 = rows + [_row("adam", 0.03, None, 0, tl=0.5, tm=0.5, final=0.6), _row("adam", 0.03, None, 1, tl=0.5,
                                                                                 tm=0.5, final=0.7)]
    assert bench.best_settings(rows2)["adam"] == ("adam", 0.01, None, None)


def test_ladder(bench: ModuleType) -> None:
    assert bench._rung(0.1, 1) == 0.3 and bench._rung(0.3, 1) == 1.0 and bench._rung(0.003, -1) == 0.001
    assert bench._rung(0.05, 1) is None  # off the ladder: no extension


def test_tune_extends_while_the_best_is_at_an_end(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adam's landscape improves without end as lr grows; SNOpt's optimum is inside in lr, below the eps grid,
    and three rungs above the trust region's start (one more than the extension budget reaches)."""
    calls: list[tuple[Any, ...]] = []

    def fake(task: str, setting: tuple[str, float, float | None, float | None], seed: int,
             iterations: int | None) -> dict[str, Any]:
        name, lr, eps, clip = setting
        calls.append((name, lr, eps, clip, seed))
        if name == "adam":
            t = 10.0 / lr ** 0.1
        elif name == "snopt":
            assert eps is not None and clip is not None
            t = 5.0 + abs(lr - 0.1) + eps + abs(math.log10(clip / 0.03))
        else:
            assert clip is None
            t = 9.0 + abs(lr - 0.1)
        return _row(name, lr, eps, seed, tl=t, tm=t, clip=clip)

    monkeypatch.setattr(bench, "_tuning_run", fake)
    rows = bench.tune("digits", None, 2, echo=False)
    keys = {(r["optimizer"], r["lr"], r["eps"], r["kl_clip"]) for r in rows}
    assert len(rows) == len(calls) == len(bench.TUNING_SEEDS) * len(keys)  # every setting on every tuning seed, once
    assert {r["seed"] for r in rows} == set(bench.TUNING_SEEDS)
    adam = sorted(lr for o, lr, *_ in keys if o == "adam")
    assert adam == [0.003, 0.01, 0.03, 0.1, 0.3]  # two rungs up, then the extension budget is spent
    snopt_eps = sorted({e for o, _, e, _ in keys if o == "snopt"})
    assert snopt_eps == [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1]  # eps extended down twice at the best lr
    assert bench.CLIP_START["digits"] == 0.001
    assert {c for o, _, _, c in keys if o == "snopt"} == {0.0003, 0.001, 0.003, 0.01}  # 1 rung down, 2 up
    # the trust region is searched after lr and eps, at their kept values; as it moved the kept setting,
    # (lr, eps) are probed again around the new one, within the budgets left: lr's two rungs each way went
    # to the first round's probes at eps 0.001 and 0.0003, eps's downward two to reaching 0.0003
    assert {(lr, e) for o, lr, e, c in keys if o == "snopt" and c not in (0.001, 0.01)} == {(0.1, 0.0003)}
    assert {(lr, e) for o, lr, e, c in keys if o == "snopt" and c == 0.01} == {(0.1, 0.0003), (0.1, 0.001)}
    assert sorted(lr for o, lr, *_ in keys if o == "sgd") == [0.03, 0.1, 0.3]  # best inside: no extension
    assert bench.best_settings(rows) == {"snopt": ("snopt", 0.1, 0.0003, 0.01), "adam": ("adam", 0.3, None, None),
                                         "sgd": ("sgd", 0.1, None, None)}
    text = bench.tuning_section(rows)
    assert text.count("**kept**") == 3 and "| digits | adam | 0.3 |  |  |" in text
    assert "| digits | snopt | 0.1 | 0.0003 | 0.01 |" in text and "digits 0.001" in text


def test_tune_searches_lr_again_where_the_trust_region_moved(bench: ModuleType,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the best lr depends on kl_clip (it scales the step), one sweep stops short; the rounds do not.

    SNOpt's landscape: the best lr is 100 × kl_clip, with a pull towards kl_clip 0.01. The first round keeps
    lr 0.1 (best at the starting kl_clip 0.001), then moves kl_clip to 0.01; the second moves lr to 1.0 and
    finds kl_clip still best at 0.01, so the search stops.
    """
    def fake(task: str, setting: tuple[str, float, float | None, float | None], seed: int,
             iterations: int | None) -> dict[str, Any]:
        name, lr, eps, clip = setting
        if name != "snopt":
            return _row(name, lr, eps, seed, tl=9.0, tm=9.0, clip=clip)
        assert eps is not None and clip is not None
        t = (5.0 + 0.5 * abs(math.log10(lr) - math.log10(clip) - 2) + abs(math.log10(clip / 0.01))
             + (0.0 if eps == 0.03 else 1.0))
        return _row(name, lr, eps, seed, tl=t, tm=t, clip=clip)

    monkeypatch.setattr(bench, "_tuning_run", fake)
    rows = [r for r in bench.tune("digits", None, 2, echo=False) if r["optimizer"] == "snopt"]
    assert bench.best_settings(rows)["snopt"] == ("snopt", 1.0, 0.03, 0.01)
    tried = {(r["lr"], r["eps"], r["kl_clip"]) for r in rows}
    assert {(lr, c) for lr, _, c in tried if c != 0.001} == {(0.1, 0.0003), (0.1, 0.003), (0.1, 0.01), (0.03, 0.01),
                                                            (0.3, 0.01), (1.0, 0.01), (1.0, 0.003)}
    assert (1.0, 0.03, 0.03) not in tried  # kl_clip's upward budget was spent in the first round


def test_committed_tuning_selects_the_presets(bench: ModuleType) -> None:
    """The benchmark table was measured with the tuned settings; the presets must be the same settings."""
    rows = json.loads(bench.TUNING_JSON.read_text())
    pairs = json.loads(bench.SCOPE_PAIRS_JSON.read_text())  # Fashion-MNIST's two picks rerun side by side
    tasks = dict.fromkeys(r["task"] for r in rows)
    assert set(tasks) == set(bench.TUNING_TASKS)  # the three tasks, Fashion-MNIST, the CNF tables and their twins
    for task in tasks:
        if task in bench.STEP_TASKS.values():  # SNOpt's whole-step twin of a table: checked with the table
            continue
        kept = bench.best_settings([r for r in rows if r["task"] == task])
        defaults = task_defaults(bench.TUNING_TASKS[task])
        scope = "increment"
        if task in bench.STEP_TASKS:  # SNOpt's pick is the better of its two trust-region scopes
            kept["snopt"], scope = bench.snopt_pick(rows, task, pairs)
        assert defaults.snopt_kl_clip_scope == scope, task
        for name, (_, lr, eps, clip) in kept.items():
            assert defaults.lr[name] == pytest.approx(lr), (task, name)
            if name == "snopt":
                assert defaults.snopt_eps == pytest.approx(eps), task
                assert defaults.snopt_kl_clip == pytest.approx(clip), task
        seeds = {int(r["seed"]) for r in rows if r["task"] == task}
        assert seeds == set(bench.TUNING_SEEDS) and not seeds & {0, 1, 2}  # tuning seeds are never reported


def _smooth_landscape(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Swap the tuning runs for a smooth synthetic score (best near lr 0.1, small eps and clip, low seeds); the
    returned list collects every (setting..., seed) run asked for."""
    calls: list[tuple[Any, ...]] = []

    def fake(task: str, setting: tuple[str, float, float | None, float | None], seed: int,
             iterations: int | None) -> dict[str, Any]:
        calls.append((*setting, seed))
        t = 5.0 + abs(setting[1] - 0.1) + (setting[2] or 0.0) + (setting[3] or 0.0) + 0.1 * seed
        return _row(setting[0], setting[1], setting[2], seed, tl=t, tm=t, clip=setting[3])

    monkeypatch.setattr(bench, "_tuning_run", fake)
    return calls


def test_tune_resumes_from_saved_rows(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted tuning reuses its saved runs and saves as it goes; the result equals an uninterrupted one."""
    calls = _smooth_landscape(bench, monkeypatch)
    saved: list[list[dict[str, Any]]] = []
    full = bench.tune("digits", None, 1, echo=False, save=lambda rows: saved.append(list(rows)))
    n = len(calls)
    assert saved and saved[-1] == full
    partial = saved[len(saved) // 2]
    calls.clear()
    again = bench.tune("digits", None, 1, echo=False, done=partial)
    assert again == full
    assert len(calls) == n - len(partial)  # only the runs not saved before are run


def test_fashion_benchmark_trains_the_kept_settings(bench: ModuleType) -> None:
    """run_fashion.py's full-data runs use the settings its tuning rows keep (the fast preset's, 10k subset)."""
    spec = importlib.util.spec_from_file_location("run_fashion", ROOT / "benchmarks" / "run_fashion.py")
    assert spec is not None and spec.loader is not None
    fashion = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fashion)
    rows = [{**_row(o, lr, eps, s, tl=t, tm=t, clip=0.003 if o == "snopt" else None), "task": "fashion"}
            for s in (100, 101)
            for o, lr, eps, t in (("snopt", 0.3, 0.03, 4.0), ("snopt", 0.3, 0.1, 5.0), ("snopt", 1.0, 0.03, 6.0),
                                  ("adam", 0.003, None, 7.0), ("adam", 0.01, None, 8.0), ("sgd", 0.03, None, 9.0))]
    cfgs = fashion.benchmark_configs(rows, [0, 1])
    assert [(c.seed, c.optimizer, c.lr) for c in cfgs] == [
        (0, "snopt", 0.3), (0, "adam", 0.003), (0, "sgd", 0.03), (1, "snopt", 0.3), (1, "adam", 0.003),
        (1, "sgd", 0.03)]
    assert all(c.snopt_eps == 0.03 and c.snopt_kl_clip == 0.003 and c.task == "fashion"
               and c.options["subset"] is None for c in cfgs)
    assert all(c.snopt_kl_clip_scope == "increment" for c in cfgs if c.optimizer == "snopt")

    # SNOpt's whole-step twin: its pick replaces the increment's only when its tuning score is better
    def twin(t: float) -> list[dict[str, Any]]:
        return [{**_row("snopt", 0.1, 0.01, s, tl=t, tm=t, clip=0.03), "task": "fashion_step"} for s in (100, 101)]
    for t, expected in ((3.0, ("step", 0.1, 0.01, 0.03)), (4.0, ("increment", 0.3, 0.03, 0.003))):
        cfgs = fashion.benchmark_configs(rows + twin(t), [0])
        snopt = [c for c in cfgs if c.optimizer == "snopt"]
        assert [(c.snopt_kl_clip_scope, c.lr, c.snopt_eps, c.snopt_kl_clip) for c in snopt] == [expected], t
        assert [(c.optimizer, c.lr) for c in cfgs if c.optimizer != "snopt"] == [("adam", 0.003), ("sgd", 0.03)]


def test_fashion_report_says_when_its_snopt_runs_are_not_at_the_tuning_pick(fashion: ModuleType) -> None:
    rows = [{**_row("snopt", 0.3, 0.03, s, tl=4.0, tm=4.0, clip=0.001), "task": "fashion"} for s in (100, 101)]
    old = {"config": {"optimizer": "snopt"}, "resolved": {"lr": 0.3, "snopt_eps": 0.03, "snopt_kl_clip": 0.001}}
    assert fashion.stale_lines([old], rows) == []  # a record from before the scope was logged: the increment
    rows += [{**_row("snopt", 0.1, 0.003, s, tl=3.0, tm=3.0, clip=0.01), "task": "fashion_step"} for s in (100, 101)]
    lines = fashion.stale_lines([old], rows)
    assert lines and "lr 0.3, eps 0.03, kl_clip 0.001 on the increment" in lines[0]
    assert "now keeps lr 0.1, eps 0.003, kl_clip 0.01 on the step" in lines[0]
    new = {"config": {"optimizer": "snopt"},
           "resolved": {"lr": 0.1, "snopt_eps": 0.003, "snopt_kl_clip": 0.01, "snopt_kl_clip_scope": "step"}}
    assert fashion.stale_lines([new], rows) == []


def test_each_tuning_task_tunes_its_own_scope(bench: ModuleType) -> None:
    """A task's tuning runs bound the increment, its twin's the whole step, whatever scope the preset now keeps (the
    CNF tables' presets keep the step's pick: an unpinned retune of `cnf_wine` would have tuned the step twice)."""
    for task, cfg in bench.TUNING_TASKS.items():
        scope = resolve(cfg, task_defaults(cfg)).snopt_kl_clip_scope
        assert scope == ("step" if task in bench.STEP_TASKS.values() else "increment"), task
    presets = {task_defaults(RunConfig(task="cnf", dataset=t)).snopt_kl_clip_scope for t in bench.CNF_TABLES}
    fashion = task_defaults(RunConfig(task="fashion")).snopt_kl_clip_scope
    assert presets == {"step"} == {fashion}  # the presets' scope, which the pin overrides


def _scope_rows(inc: float, step: float, *, seeds: tuple[int, ...] = (100, 101), lr: float = 0.3,
                paired: bool = False) -> list[dict[str, Any]]:
    """Fashion-MNIST rows of the increment's pick (lr, eps 0.03, clip 1e-3) and the step's (1.0, 1e-3, 1e-2) that
    take `inc` and `step` CPU seconds to each target."""
    rows = [{**_row("snopt", lr, 0.03, s, tl=inc, tm=inc, clip=0.001), "task": "fashion"} for s in seeds]
    rows += [{**_row("snopt", 1.0, 0.001, s, tl=step, tm=step, clip=0.01), "task": "fashion_step"} for s in seeds]
    return [{**r, "paired": True, "host": "host-a"} for r in rows] if paired else rows


def test_the_side_by_side_rerun_decides_the_scope(bench: ModuleType, fashion: ModuleType) -> None:
    """The tuning prefers the increment (4 s vs 5 s, batches run apart); the rerun of both on one host prefers the
    step (6 s vs 3 s): the rerun decides, but only while it holds the tuning's current picks on matching seeds."""
    rows = _scope_rows(4.0, 5.0)
    assert bench.snopt_pick(rows, "fashion")[1] == "increment"
    pairs = _scope_rows(6.0, 3.0, paired=True)
    assert bench.paired_scores(rows, pairs, "fashion") == {"increment": (0, 0, 0.0, 12.0), "step": (0, 0, 0.0, 6.0)}
    assert bench.snopt_pick(rows, "fashion", pairs) == (("snopt", 1.0, 0.001, 0.01), "step")
    assert fashion.snopt_setting(rows, pairs) == (1.0, 0.001, 0.01, "step")
    stale = _scope_rows(6.0, 3.0, lr=1.0, paired=True)  # a rerun of an increment pick the tuning no longer keeps
    assert bench.paired_scores(rows, stale, "fashion") is None
    assert bench.snopt_pick(rows, "fashion", stale)[1] == "increment"
    lopsided = [p for p in pairs if not (p["task"] == "fashion_step" and p["seed"] == 101)]
    assert bench.paired_scores(rows, lopsided, "fashion") is None  # the two picks must rerun on the same seeds
    assert bench.paired_scores([r for r in rows if r["task"] == "fashion"], pairs, "fashion") is None  # no twin
    # the rerun speaks for the two picks it ran, not for the tuning's other settings
    others = [{**_row(o, lr, None, s, tl=9.0, tm=9.0), "task": "fashion"}
              for o, lr in (("adam", 0.01), ("sgd", 0.03)) for s in (100, 101)]
    cfgs = fashion.benchmark_configs(rows + others, [0], pairs)
    assert [(c.optimizer, c.lr, c.snopt_kl_clip_scope, c.snopt_eps, c.snopt_kl_clip) for c in cfgs] == [
        ("snopt", 1.0, "step", 0.001, 0.01), ("adam", 0.01, "step", 0.001, 0.01), ("sgd", 0.03, "step", 0.001, 0.01)]


def test_pair_scopes_reruns_the_two_picks_seed_by_seed(bench: ModuleType, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _scope_rows(4.0, 5.0) + [{**_row("snopt", 0.1, 0.03, s, tl=8.0, tm=8.0, clip=0.001), "task": "fashion"}
                                    for s in (100, 101)]
    calls: list[tuple[Any, ...]] = []

    def fake(task: str, setting: tuple[str, float, float | None, float | None], seed: int,
             iterations: int | None) -> dict[str, Any]:
        calls.append((task, setting, seed, iterations))
        t = 6.0 if task == "fashion" else 3.0
        return {**_row(*setting[:3], seed, tl=t, tm=t, clip=setting[3]), "task": task, "host": "h"}

    pairs = bench.pair_scopes("fashion", rows, seeds=(100, 101), run_one=fake, echo=False)
    inc, step = ("snopt", 0.3, 0.03, 0.001), ("snopt", 1.0, 0.001, 0.01)
    assert sorted(calls, key=lambda c: (c[2], c[0])) == [  # the two picks only, alternating, at the task's iterations
        ("fashion", inc, 100, None), ("fashion_step", step, 100, None),
        ("fashion", inc, 101, None), ("fashion_step", step, 101, None)]
    assert [(p["task"], p["seed"]) for p in pairs] == [("fashion", 100), ("fashion_step", 100), ("fashion", 101),
                                                      ("fashion_step", 101)]
    assert all(p["paired"] for p in pairs)
    assert bench.snopt_pick(rows, "fashion", pairs)[1] == "step"
    with pytest.raises(ValueError, match="both scopes"):
        bench.pair_scopes("fashion", [r for r in rows if r["task"] == "fashion"], run_one=fake, echo=False)
    # saving replaces the rerun of the same tasks and keeps the others'
    committed = tmp_path / "committed.json"
    monkeypatch.setattr(bench, "SCOPE_PAIRS_JSON", committed)  # none yet
    other = [{**pairs[0], "task": "cnf_wine"}]
    bench.save_pairs(other + pairs, tmp_path)
    again = [{**p, "seed": p["seed"] + 1} for p in pairs]
    kept = bench.save_pairs(again, tmp_path)
    assert kept == other + again == json.loads((tmp_path / bench.SCOPE_PAIRS_JSON.name).read_text())
    # into a folder without a pairs file, the other tasks' rows come from the committed one
    committed.write_text(json.dumps(other + pairs))
    assert bench.save_pairs(again, tmp_path / "scratch") == other + again
    assert json.loads(committed.read_text()) == other + pairs  # the committed file is left as it was


def test_the_fashion_tuning_section_says_what_decided_the_scope(fashion: ModuleType) -> None:
    rows = _scope_rows(4.0, 5.0)
    text = fashion.fashion_tuning(rows)
    assert "The benchmark runs the increment's" in text and "no side-by-side rerun" in text
    text = fashion.fashion_tuning(rows, _scope_rows(6.0, 3.0, paired=True))
    assert "increment 12.0 s, step 6.0 s (step ÷ increment 0.50" in text
    assert "seed 100: 12.0 vs 6.0; seed 101: 12.0 vs 6.0" in text and "host host-a" in text
    assert "The benchmark runs the step's" in text


def test_the_committed_scope_rerun_holds_the_committed_picks(bench: ModuleType) -> None:
    """The committed rerun is of the tuning's current two Fashion-MNIST picks, on the tuning seeds, on one host."""
    rows = json.loads(bench.TUNING_JSON.read_text())
    pairs = json.loads(bench.SCOPE_PAIRS_JSON.read_text())
    assert bench.paired_scores(rows, pairs, "fashion") is not None
    mine = [p for p in pairs if p["task"] in ("fashion", "fashion_step")]
    assert sorted(p["seed"] for p in mine) == sorted(2 * bench.TUNING_SEEDS)
    assert len({p["host"] for p in mine}) == 1 and all(p["paired"] for p in mine)


def test_committed_rows_are_what_the_protocol_runs(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaying `tune` on the committed rows asks for exactly those runs: none missing, none extra.

    So the committed record follows the current grids, extension rule and score (a change to any of
    them that would run other settings fails here until the tuning is rerun).
    """
    rows = json.loads(bench.TUNING_JSON.read_text())

    def not_committed(task: str, setting: tuple[str, float, float | None, float | None], seed: int,
                      iterations: int | None) -> dict[str, Any]:
        raise AssertionError(f"the protocol runs {task} {setting} seed {seed}, which the record lacks")

    def runs(rs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((r["optimizer"], r["lr"], r["eps"] or 0.0, r["kl_clip"] or 0.0, r["seed"]) for r in rs)

    monkeypatch.setattr(bench, "_tuning_run", not_committed)
    for task in bench.TUNING_TASKS:
        mine = [r for r in rows if r["task"] == task]
        assert runs(bench.tune(task, None, 1, echo=False, done=mine)) == runs(mine), task


def test_retune_keeps_other_tasks_and_saves_as_it_goes(bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    """`retune` (both benchmark scripts' --tune) replaces only its tasks' rows, and its file equals what it returns."""
    calls: list[tuple[Any, ...]] = []

    def fake(task: str, setting: tuple[str, float, float | None, float | None], seed: int,
             iterations: int | None) -> dict[str, Any]:
        calls.append((task, *setting, seed))
        t = 5.0 + abs(setting[1] - 0.1) + (setting[2] or 0.0)
        return {**_row(setting[0], setting[1], setting[2], seed, tl=t, tm=t, clip=setting[3]), "task": task}

    monkeypatch.setattr(bench, "_tuning_run", fake)
    other = {**_row("adam", 0.01, None, 100, tl=1.0, tm=1.0), "task": "cnf"}
    stale = {**_row("adam", 9.0, None, 100, tl=1.0, tm=1.0), "task": "fashion"}
    rows = bench.retune(["fashion"], [other, stale], tmp_path, 1, resume=False)
    assert rows[0] == other and stale not in rows and all(r["task"] == "fashion" for r in rows[1:])
    assert json.loads((tmp_path / bench.TUNING_JSON.name).read_text()) == rows
    n = len(calls)
    calls.clear()
    assert bench.retune(["fashion"], [other], tmp_path, 1, resume=True) == rows and not calls  # all reused
    assert n == len(rows) - 1
    # a retuned task keeps its place in the record (tasks in TUNING_TASKS order), not moved to the end
    later = {**other, "task": "digits"}
    again = bench.retune(["cnf"], [later, other, *rows[1:]], tmp_path / "again", 1, resume=False)
    assert [r["task"] for r in again][:2] == ["digits", "cnf"] and again[-1]["task"] == "fashion"


def test_committed_tuning_sections_are_generated_from_the_record(bench: ModuleType) -> None:
    """Each committed results file's tuning section is what the code writes from the committed rows (no drift)."""
    spec = importlib.util.spec_from_file_location("run_fashion", ROOT / "benchmarks" / "run_fashion.py")
    assert spec is not None and spec.loader is not None
    fashion = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fashion)
    rows = json.loads(bench.TUNING_JSON.read_text())
    tables = ("cnf_wine", "cnf_breast_cancer", "cnf_old_faithful")
    tables += tuple(bench.STEP_TASKS[t] for t in tables)  # SNOpt's whole-step trust-region twins
    here = set(bench.TASKS) | {bench.STEP_TASKS[t] for t in bench.TASKS if t in bench.STEP_TASKS}
    pairs = json.loads(bench.SCOPE_PAIRS_JSON.read_text())
    expected = {"applications_cpu.md": bench.applications_tuning([r for r in rows if r["task"] in here], pairs),
                "fashion_cpu.md": fashion.fashion_tuning([r for r in rows if r["task"] in fashion.FASHION_TASKS],
                                                         json.loads(bench.SCOPE_PAIRS_JSON.read_text())),
                "cnf_tabular_cpu.md": bench.tuning_section([r for r in rows if r["task"] in tables],
                                                           "python benchmarks/run_cnf_tabular.py --tune")}
    for name, section in expected.items():
        text = (bench.RESULTS / name).read_text()
        assert text[text.index("## Tuning (tuning seeds, not reported)"):] == section + "\n", name


def test_overhead_lines_report_the_trust_region(bench: ModuleType) -> None:
    """The benchmark says how often SNOpt's trust region set its step, from the runs' records; silent without one."""
    def run_(opt: str, clip: float | None) -> dict[str, Any]:
        return {"config": {"optimizer": opt}, "resolved": {"snopt_freq": 2, "snopt_kl_clip": clip},
                "history": {"iteration": [1, 2, 3, 4], "step_time": [0.2, 0.1, 0.2, 0.1]}}

    def stat(mean: float | None, std: float | None, values: list[float | None] | None = None) -> dict[str, Any]:
        values = [mean, mean] if values is None else values
        return {"mean": mean, "std": std, "values": values, "n": sum(v is not None for v in values)}

    agg = {"snopt": {"trust_region_active": stat(0.75, 0.05), "median_clip_scale": stat(0.4, 0.1),
                     "mean_step_time": stat(0.15, 0.0)}, "adam": {"mean_step_time": stat(0.1, 0.0)}}
    lines = bench.overhead_lines({"runs": [run_("snopt", 0.003), run_("adam", None)], "aggregate": agg})
    assert any("kl_clip 0.003" in ln and "75 ± 5 % of iterations" in ln and "ν 0.40 ± 0.10" in ln for ln in lines)
    assert any("SNOpt ÷ adam: 1.50" in ln for ln in lines)
    assert not any("seeds:" in ln for ln in lines)
    # Records written before the runner kept ν (an older lease's seed) are named, not averaged in silently.
    agg["snopt"]["trust_region_active"] = stat(0.75, 0.05, [None, 0.7, 0.8])
    partial = bench.overhead_lines({"runs": [run_("snopt", 0.003), run_("adam", None)], "aggregate": agg})
    assert any("75 ± 5 % of iterations" in ln and "(2 of 3 seeds: the other records predate" in ln for ln in partial)
    agg["snopt"].update(trust_region_active=stat(None, None), median_clip_scale=stat(None, None))
    off = bench.overhead_lines({"runs": [run_("snopt", None), run_("adam", None)], "aggregate": agg})
    assert not any("trust region" in ln for ln in off) and len(off) == len(lines) - 1


def test_tabular_cnf_tuning_starts_from_its_own_eps_grid_and_the_trust_region(bench: ModuleType,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The tables' CNF: SNOpt's eps grid starts at 0.01 (extended down while 0.01 is best), its kl_clip at 1e-3,
    and the lowest mean final test NLL is kept."""
    def fake(task: str, setting: tuple[str, float, float | None, float | None], seed: int,
             iterations: int | None) -> dict[str, Any]:
        name, lr, eps, clip = setting
        nll = 20.0 + abs(math.log10(lr / 0.01)) + (abs(math.log10(eps / 0.003)) if eps else 0.0) + 0.1 * seed
        return {"task": task, "optimizer": name, "lr": lr, "eps": eps, "kl_clip": clip, "seed": seed,
                "metric": "nll", "diverged": False, "final_test_metric": nll}

    monkeypatch.setattr(bench, "_tuning_run", fake)
    rows = bench.tune("cnf_breast_cancer", None, 1, echo=False)
    snopt = [r for r in rows if r["optimizer"] == "snopt"]
    first = {(r["lr"], r["eps"]) for r in snopt[:27]}
    assert first == {(lr, e) for lr in (0.01, 0.03, 0.1) for e in (0.01, 0.03, 0.1)}
    assert {r["kl_clip"] for r in snopt[:27]} == {0.001}
    assert sorted({r["eps"] for r in snopt}) == [0.001, 0.003, 0.01, 0.03, 0.1]  # extended down twice
    assert bench.best_settings(rows)["snopt"][1:3] == (0.01, 0.003)
    assert bench.best_settings(rows)["adam"][1] == 0.01


def test_more_tuning_seeds_reuse_the_records_runs(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--tuning-seeds` with the record's rows resumed: only the new seeds' runs run, every setting on every seed."""
    calls = _smooth_landscape(bench, monkeypatch)
    record = bench.tune("digits", None, 1, echo=False)
    calls.clear()
    more = bench.tune("digits", None, 1, echo=False, done=record, seeds=(*bench.TUNING_SEEDS, 103))
    assert calls and {c[-1] for c in calls} == {103}  # the record's seeds are not run again
    settings = {(r["optimizer"], r["lr"], r["eps"], r["kl_clip"]) for r in more}
    assert len(more) == 4 * len(settings) and {r["seed"] for r in more} == {*bench.TUNING_SEEDS, 103}


@pytest.mark.parametrize("argv", [
    ["--tuning-seeds", "100", "101", "102", "103"],  # a diagnostic would set the benchmark's settings
    ["--tune-only", "--tuning-seeds", "100", "101", "102", "103"],  # ... or overwrite the record in results/
    ["--tune-only", "--out", "{tmp}", "--seeds", "0", "1", "--tuning-seeds", "1", "100"],  # a reported seed
])
def test_other_tuning_seeds_only_make_a_diagnostic(tabular: ModuleType, fashion: ModuleType, bench: ModuleType,
                                                   argv: list[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_tuning(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise AssertionError("tuned before the seeds were checked")

    for script in (tabular, fashion, bench):
        monkeypatch.setattr(script, "retune", no_tuning)
        with pytest.raises(SystemExit) as exc:
            script.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
        assert exc.value.code == 2  # argparse's usage error


def test_a_tuning_diagnostic_runs_on_its_seeds(tabular: ModuleType, fashion: ModuleType, bench: ModuleType,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[int, ...]] = []

    class Stop(Exception):
        pass

    def recording(*args: Any, seeds: tuple[int, ...], **kwargs: Any) -> list[dict[str, Any]]:
        asked.append(seeds)
        raise Stop

    for script in (tabular, fashion, bench):
        monkeypatch.setattr(script, "retune", recording)
        with pytest.raises(Stop):
            script.main(["--tune-only", "--out", str(tmp_path), "--tuning-seeds", "100", "101", "102", "103", "103"])
    assert asked == [(100, 101, 102, 103)] * 3


def test_a_diagnostic_tuning_section_says_so(bench: ModuleType) -> None:
    rows = [_row("adam", 0.01, None, s, tl=1.0, tm=1.0) for s in (*bench.TUNING_SEEDS, 103)]
    text = bench.tuning_section(rows, "python benchmarks/run_applications.py --tune")
    assert "**A diagnostic, not the record:**" in text
    assert "`python benchmarks/run_applications.py --tune-only --tuning-seeds 100 101 102 103`" in text
    assert "diagnostic" not in bench.tuning_section(rows[:-1])
