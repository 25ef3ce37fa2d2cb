"""CNF density estimation on real tabular data: SNOpt vs Adam vs SGD on wine, breast-cancer and Old Faithful.

    python benchmarks/run_cnf_tabular.py                  # the committed table (about 50 minutes on 2 cores)
    python benchmarks/run_cnf_tabular.py --tune           # first rerun the tuning (about 90 minutes on 2 cores)
    python benchmarks/run_cnf_tabular.py --from-log benchmarks/results/cnf_tabular_cpu_runs.jsonl.gz   # no training

The issue's CNF target (SNOpt reaches Adam's final test NLL in less time) is measured in
applications_cpu.md on a 2-D density with fresh samples every batch. Here the data are real and
small: scikit-learn's wine (178 rows, 13-D) and breast-cancer (569 rows, 30-D), and R's Old
Faithful (272 eruptions, 2-D: duration and waiting time, the waiting minutes dequantised; the CSV
inside the plotnine wheel), standardised, split into train / validation / test by the seed
(`snopt.data`). Every run has the ``fast`` CNF preset's model and budget (150 iterations of batch
128, width 64, dopri5 at 1e-3, evaluations every 10 iterations at 1e-5; the divergence by
Hutchinson's estimator on wine and breast-cancer, exact on the 2-D Old Faithful).

**Tuned.** Each table is tuned on its own by the protocol of the other applications
(`run_applications.tune` on three tuning seeds, none reported; the CNF's criterion is the mean
final test NLL): the tasks ``cnf_wine``, ``cnf_breast_cancer`` and ``cnf_old_faithful`` of
`TUNING_TASKS`, whose rows sit in applications_tuning_cpu.json beside the others'. SNOpt's trust
region starts its search at ``kl_clip = 1e-3`` there. The benchmark trains every optimizer at the
setting its rows keep, and the ``fast`` presets of these tables are those settings
(tests/test_benchmark_tuning.py).

**Untuned.** The same seeds at the settings the tables had before they were tuned (SNOpt lr 0.05, eps
0.05, no trust region and ``kl_clip = 1e-3``; Adam 0.01; SGD 0.05): the first measurement, kept
beside the tuned one.

The metric target of each table is its Adam's mean final test NLL (as everywhere for the CNF), and
each table also gives the test NLL at the evaluation with the best validation NLL (early stopping,
as FFJORD reports tabular NLL).

Writes benchmarks/results/cnf_tabular_cpu.md, one plot per data set and setting
(cnf_tabular_<data set>_<setting>.png) and the runs' log cnf_tabular_cpu_runs.jsonl.gz.
"""

import argparse
import gzip
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_applications import (  # noqa: E402
    CNF_TABLES,
    OPTIMIZERS,
    RESULTS,
    STEP_TASKS,
    TUNING_JSON,
    add_tuning_options,
    best_settings,
    cpu_log_machine_lines,
    read_log,
    retune,
    run_pool,
    scope_picks,
    snopt_pick,
    tuning_section,
    tuning_seeds,
)

from snopt.experiments import RunConfig, plot_comparison  # noqa: E402
from snopt.experiments._runner import config_key, quiet_warnings, run, tabulate  # noqa: E402

DATASETS = CNF_TABLES
SIZES = {"wine": "178 rows, 13 dimensions", "breast_cancer": "569 rows, 30 dimensions",
         "old_faithful": "272 rows, 2 dimensions, waiting times dequantised"}
TUNING_TASK = {ds: f"cnf_{ds}" for ds in DATASETS}  # keys of run_applications.TUNING_TASKS
ALL_TASKS = (*TUNING_TASK.values(), *(STEP_TASKS[t] for t in TUNING_TASK.values()))  # with SNOpt's whole-step twins
# The settings before tuning: lr per optimizer, SNOpt's eps, and SNOpt's trust regions (0.0: off).
UNTUNED_LR = {"snopt": 0.05, "adam": 0.01, "sgd": 0.05}
UNTUNED_EPS = 0.05
UNTUNED_CLIPS: dict[str, float] = {"no trust region": 0.0, "kl_clip 1e-3": 1e-3}
SEEDS = (0, 1, 2, 3, 4)
MD = "cnf_tabular_cpu.md"
LOG = "cnf_tabular_cpu_runs.jsonl.gz"
COMMAND = "python benchmarks/run_cnf_tabular.py"


def slug(setting: str) -> str:
    """A file-name form of a setting's name."""
    return setting.replace(" ", "_").replace("-", "m")


def tuned_configs(rows: list[dict[str, Any]], dataset: str, seed: int, scope: str | None = None) -> list[RunConfig]:
    """One seed's runs at the settings the tuning rows of `dataset` keep (SNOpt's eps and kl_clip on SNOpt only).

    SNOpt's setting: with `scope` None, the better of its two trust-region scopes (`snopt_pick`); with
    ``"increment"`` or ``"step"``, that scope's own pick (the other one, reported beside it).
    """
    kept = best_settings([r for r in rows if r["task"] == TUNING_TASK[dataset]])
    if scope is None:
        kept["snopt"], scope = snopt_pick(rows, TUNING_TASK[dataset])
    else:
        kept["snopt"] = scope_picks(rows, TUNING_TASK[dataset])[scope][0]
    base = RunConfig(task="cnf", dataset=dataset, threads=1, seed=seed)
    out = []
    for name in OPTIMIZERS:
        _, lr, eps, clip = kept[name]
        cfg = replace(base, optimizer=name, lr=lr)  # type: ignore[arg-type]
        if name == "snopt":
            cfg = replace(cfg, snopt_eps=eps, snopt_kl_clip=clip or 0.0, snopt_kl_clip_scope=scope)
        out.append(cfg)
    return out


def other_scope_configs(rows: list[dict[str, Any]], dataset: str, seed: int) -> list[RunConfig]:
    """SNOpt's run at the pick of the trust-region scope the table did not keep (none before the step was tuned)."""
    picks = scope_picks(rows, TUNING_TASK[dataset])
    if len(picks) < 2:
        return []
    other = "increment" if snopt_pick(rows, TUNING_TASK[dataset])[1] == "step" else "step"
    return [c for c in tuned_configs(rows, dataset, seed, other) if c.optimizer == "snopt"]


def untuned_configs(dataset: str, seed: int, clip: float) -> list[RunConfig]:
    """One seed's runs at the settings before tuning, SNOpt with trust region `clip` (0.0: off)."""
    base = RunConfig(task="cnf", dataset=dataset, threads=1, seed=seed)
    out = []
    for name in OPTIMIZERS:
        cfg = replace(base, optimizer=name, lr=UNTUNED_LR[name])  # type: ignore[arg-type]
        out.append(replace(cfg, snopt_eps=UNTUNED_EPS, snopt_kl_clip=clip, snopt_kl_clip_scope="increment")
                   if name == "snopt" else cfg)  # the scope explicit: a table's preset now keeps "step"
    return out


def configs(rows: list[dict[str, Any]], seeds: tuple[int, ...] | list[int]) -> list[RunConfig]:
    """Every run of the benchmark, data set by data set, seed-major: the tuned runs, then the untuned ones (a run
    both need, such as Adam where its tuned rate is the untuned one, once)."""
    out: dict[str, RunConfig] = {}
    for ds in DATASETS:
        for seed in seeds:
            for cfg in tuned_configs(rows, ds, seed) + other_scope_configs(rows, ds, seed) + [
                    c for clip in UNTUNED_CLIPS.values() for c in untuned_configs(ds, seed, clip)]:
                out.setdefault(config_key(cfg), cfg)
    return list(out.values())


def runs_of(runs: list[dict[str, Any]], wanted: list[RunConfig]) -> list[dict[str, Any]]:
    """The runs of the configurations `wanted`, in the benchmark's optimizer order, then by seed (copies:
    `tabulate` rewrites their summaries)."""
    keys = {config_key(c) for c in wanted}
    chosen = [r for r in runs if config_key(RunConfig.from_dict(r["config"])) in keys]
    return sorted(({**r} for r in chosen), key=lambda r: (OPTIMIZERS.index(r["config"]["optimizer"]),
                                                         r["config"]["seed"]))


def overfit_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Per optimizer: where its validation NLL was lowest, and its test NLL before training and at the end."""
    out = []
    for name in OPTIMIZERS:
        group = [r for r in runs if r["config"]["optimizer"] == name]
        if not group:
            continue
        best_at, first, final = [], [], []
        for r in group:
            ev = r["evals"]
            vals = [(v, i) for i, v in enumerate(ev["val_metric"]) if v is not None]
            best_at.append(ev["iteration"][min(vals)[1]])
            first.append(ev["test_metric"][0])
            final.append(ev["test_metric"][-1])
        spread = statistics.stdev(best_at) if len(best_at) > 1 else 0.0
        out.append(f"- {name}: validation NLL lowest at iteration {statistics.fmean(best_at):.0f} ± {spread:.0f} "
                   f"of {group[0]['resolved']['iterations']}; test NLL {statistics.fmean(first):.2f} before training, "
                   f"{statistics.fmean(final):.2f} at the end (per seed: "
                   + ", ".join(f"{v:.1f}" for v in final) + ")")
    return out


def _settings_words(runs: list[dict[str, Any]]) -> str:
    """The optimizers' settings as the runs resolved them: 'SNOpt lr 0.03 (eps 0.01, kl_clip 0.001), Adam lr ...'."""
    words = []
    for name in OPTIMIZERS:
        res = next((r["resolved"] for r in runs if r["config"]["optimizer"] == name), None)
        if res is None:
            continue
        whole = " on the whole step" if res.get("snopt_kl_clip_scope") == "step" and res["snopt_kl_clip"] else ""
        extra = (f" (eps {res['snopt_eps']:g}, kl_clip {res['snopt_kl_clip'] or 'off'}{whole}, update_freq "
                 f"{res['snopt_freq']})" if name == "snopt" else "")
        words.append(f"{name} lr {res['lr']:g}{extra}")
    return ", ".join(words)


def _table(runs: list[dict[str, Any]], heading: str, title: str, png: str, out: Path) -> list[str]:
    """One comparison: heading, the settings, the table, where each optimizer's validation NLL was lowest, the plot."""
    if not runs:
        return []
    tab = tabulate(runs)
    plot_comparison(tab["runs"], out / png, title=title)
    return [heading, "", f"Settings: {_settings_words(runs)}.", "", tab["table"], "", *overfit_lines(tab["runs"]), "",
            f"![{title}]({png})", ""]


def report(runs: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path, source: str | None) -> str:
    """The results file's text; writes the plots into `out`.

    Args:
        runs: The benchmark's runs.
        rows: The tuning rows (those of other tasks are ignored).
        out: Folder of the plots.
        source: The log the runs were read from, or None.
    """
    seeds = sorted({r["config"]["seed"] for r in runs})
    res = runs[0]["resolved"]
    mine = [r for r in rows if r["task"] in ALL_TASKS]
    lines = [
        "# CNF on real tabular data (scikit-learn's wine and breast-cancer, R's Old Faithful): SNOpt vs Adam vs SGD",
        "",
        f"Regenerate: `{COMMAND}`" + (f" (this file was written from `{source}`: `{COMMAND} --from-log {source}`)"
                                      if source else "") + "; add `--tune` to rerun the tuning first (last section).",
        "",
        "Machine:",
        *cpu_log_machine_lines(runs),
        "",
        f"Every run: the `fast` CNF preset's model and budget, {res['iterations']} iterations of batch "
        f"{res['batch_size']}, evaluation every {res['eval_every']} (validation and test NLL in nats, solved at "
        f"{res['options']['eval_rtol']:g}), options `{res['options']}`. Seeds " + ", ".join(map(str, seeds))
        + " (each seed also draws the train / validation / test split). **Tuned**: every optimizer at the setting "
        "the tuning (last section) keeps for that table, which the table's `fast` preset is. **Untuned**: the "
        "settings before that tuning, SNOpt without and with a trust region. The metric target of each table is "
        "its Adam's mean final test NLL; a target reached at iteration 0 (the untrained flow already beats it) "
        "gives a time of 0.",
        "",
    ]
    for ds in DATASETS:
        lines += [f"## {ds} ({SIZES[ds]})", ""]
        tuned = runs_of(runs, [c for s in seeds for c in tuned_configs(mine, ds, s)]) if mine else []
        lines += _table(tuned, "### Tuned", f"CNF, {ds}: tuned", f"cnf_tabular_{ds}_tuned.png", out)
        other = runs_of(runs, [c for s in seeds for c in other_scope_configs(mine, ds, s)]) if mine else []
        if other:  # SNOpt at the other scope's pick, beside the same Adam and SGD
            words = "each increment" if other[0]["resolved"].get("snopt_kl_clip_scope", "increment") == "increment" \
                else "the whole step"
            lines += _table(other + [r for r in tuned if r["config"]["optimizer"] != "snopt"],
                            f"### Tuned, SNOpt's trust region on {words} (the scope not kept)",
                            f"CNF, {ds}: tuned, SNOpt's trust region on {words}",
                            f"cnf_tabular_{ds}_tuned_other_scope.png", out)
        for setting, clip in UNTUNED_CLIPS.items():
            chosen = runs_of(runs, [c for s in seeds for c in untuned_configs(ds, s, clip)])
            lines += _table(chosen, f"### Untuned, SNOpt with {setting}", f"CNF, {ds}: untuned, SNOpt with {setting}",
                            f"cnf_tabular_{ds}_untuned_{slug(setting)}.png", out)
    if mine:
        lines += [tuning_section(mine, f"{COMMAND} --tune")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each one thread)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--log", type=Path, default=None, help="append each finished run to this JSON-lines file")
    p.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                   help="checkpoint every run in DIR; the same command run again continues the interrupted runs")
    p.add_argument("--from-log", type=Path, default=None, help="write the tables from this log; no training")
    add_tuning_options(p, "about 90 minutes")
    p.add_argument("--tasks", nargs="+", choices=ALL_TASKS, default=None, metavar="TASK",
                   help=f"with --tune: retune only these tuning tasks (default: all of {', '.join(ALL_TASKS)})")
    args = p.parse_args(argv)
    seeds_for_tuning = tuning_seeds(p, args)  # checked before anything runs
    quiet_warnings()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = json.loads(TUNING_JSON.read_text()) if TUNING_JSON.exists() else []
    if args.tune or args.tune_only:
        rows = retune(list(args.tasks or ALL_TASKS), rows, args.out, args.jobs,
                      resume=args.resume, seeds=seeds_for_tuning)
    if args.tune_only:
        print(tuning_section([r for r in rows if r["task"] in ALL_TASKS], f"{COMMAND} --tune"))
        return 0
    if not {r["task"] for r in rows} >= set(TUNING_TASK.values()):
        raise SystemExit(f"no tuning rows for {', '.join(TUNING_TASK.values())} in {TUNING_JSON}: run with --tune")
    if args.from_log is not None:
        if not args.from_log.exists():
            raise SystemExit(f"{args.from_log} does not exist")
        logged = read_log(args.from_log)
        wanted = {config_key(c) for c in configs(rows, sorted({r["config"]["seed"] for r in logged}))}
        runs = [r for r in logged if config_key(RunConfig.from_dict(r["config"])) in wanted]  # this benchmark's runs
        if not runs:
            raise SystemExit(f"{args.from_log} holds no run of this benchmark")
        source: str | None = str(args.from_log)
    else:
        runs = run_pool([(c, {}) for c in configs(rows, args.seeds)], args.jobs, args.log, run_one=run,
                        checkpoint_dir=args.checkpoint_dir)
        (args.out / LOG).write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in runs).encode(), mtime=0))
        source = None
    text = report(runs, rows, args.out, source)
    (args.out / MD).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
