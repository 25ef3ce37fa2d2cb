"""SNOpt vs Adam vs SGD on the paper's three applications, multi-seed, on this machine's CPU.

    python benchmarks/run_applications.py                      # the committed table: 3 tasks x 3 optimizers x 3 seeds
    python benchmarks/run_applications.py --tune               # first re-tune the learning rates (seed 100 grid)
    python benchmarks/run_applications.py --tasks digits --seeds 0 1 --quick   # a smaller check

Writes benchmarks/results/applications_cpu.md (tables: mean ± std over seeds, SNOpt's
time-to-target ratios, the targets met or missed, the machine) and one PNG of curves per task
(benchmarks/results/applications_<task>.png). Every run is a fresh process (`spawn`), so peak
RSS is per run; runs are interleaved seed-major so that a change in machine load hits every
optimizer alike; torch uses one thread. Both wall-clock and process CPU time are recorded:
on a shared machine the CPU-time ratios are the steadier of the two.

Learning rates: each optimizer gets the same budget, a 3-point grid (x3 spacing) on a tuning
seed (100) that is not among the reported seeds, extended while the best point was at an end of
the grid (which gave Adam and SGD more points than SNOpt); the best point of each is kept (criterion:
classification — smallest CPU time to reach both targets, among runs still at the accuracy
target at the end; CNF — lowest final test NLL). With
``--tune`` the grid is rerun; otherwise the committed preset rates are used and the tuning
section already in the Markdown file is kept.
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from snopt.experiments import RunConfig, plot_comparison
from snopt.experiments._common import cpu_model
from snopt.experiments._runner import compare, format_ratio, quiet_warnings, run, task_defaults

RESULTS = Path(__file__).resolve().parent / "results"
MD = RESULTS / "applications_cpu.md"
OPTIMIZERS = ("snopt", "adam", "sgd")
TASKS: dict[str, RunConfig] = {
    "digits": RunConfig(task="digits", threads=1),
    "timeseries": RunConfig(task="timeseries", dataset="JapaneseVowels", threads=1),
    "cnf": RunConfig(task="cnf", dataset="circles", threads=1),
}
GRIDS: dict[str, dict[str, list[float]]] = {  # 3 points (x3 apart), extended while the best was at an end
    "digits": {"snopt": [0.03, 0.1, 0.3], "adam": [0.003, 0.01, 0.03], "sgd": [0.03, 0.1, 0.3]},
    "timeseries": {"snopt": [0.03, 0.1, 0.3], "adam": [0.003, 0.01, 0.03, 0.1], "sgd": [0.1, 0.3, 1.0, 3.0]},
    "cnf": {"snopt": [0.01, 0.03, 0.1], "adam": [0.01, 0.03, 0.1, 0.3], "sgd": [0.1, 0.3, 1.0]},
}
NOTES: dict[str, str] = {
    "timeseries": "Each optimizer trains the whole GRU-ODE (the authors' scripts instead train the GRU and the head "
                  "with Adam for every optimizer: `--preset paper`). SNOpt's factors for the ODE layers integrate "
                  "over all 28 per-interval adjoint solves of a backward pass (tested in tests/test_experiments.py). "
                  "Targets: train loss 0.05 and test accuracy 95 % (the earlier 0.2 / 90 % were reached by every "
                  "optimizer within 2–3 evaluations, so their ratios measured the evaluation grid, not the optimizer). "
                  "Every optimizer's NFE per iteration is pinned near 187 by the 28 observation intervals "
                  "(one or two dopri5 steps each), so time-to-target here is iterations-to-target.",
    "cnf": "600 iterations: at the earlier 150 every optimizer sat on the same early plateau (final NLL 3.787–3.790, "
           "spread 0.005), so \"Adam's final NLL\" was noise. SNOpt runs without the trust region here (`kl_clip` "
           "1e-3 at lr 0.1 reached 3.66 vs 3.41 without, on the tuning seed) and with damping eps 0.003 (last "
           "section). Adam's lr 0.03 (the two-seed pick) ends worse on these seeds than the one-seed pick 0.1 did "
           "(3.492 ± 0.043); against Adam at 0.1 (same seeds, rerun by hand, CPU time, 2 runs at a time) SNOpt "
           "reaches 3.492 nats in 17.8 ± 4.4 s (3/3 seeds) vs Adam's 38.4 s (2/3; ratio <= 0.48 counting the miss "
           "as Adam's whole run).",
}
TUNING_SEED = 100
TS_PROBE = "\n".join([
    "## Time series: SNOpt's damping on two tuning seeds", "",
    "After the CNF showed that SNOpt's damping eps mattered, the same by-hand probe on JapaneseVowels (tuning seeds "
    "100 and 101, preset otherwise: lr 0.3, kl_clip 3e-3, update_freq 25), with Adam's and SGD's grids rerun on "
    "seed 101 so every optimizer is chosen by the same two seeds (kept: the smallest sum of CPU times to both "
    "targets over both seeds; Adam stays at 0.03 — 0.01 slower, 0.1 diverged on both — and SGD at 0.3 — 1.0 "
    "reaches the loss target sooner but the accuracy target later, sum 19.7 vs 17.3 s). Kept for SNOpt: eps 0.02 "
    "(sum 12.1 s vs 15.1 s at 0.05). eps 0.01 (and update_freq 10) reach the loss target sooner still but end "
    "1.6–3.2 points lower in accuracy; eps 0.003 is slower and stiffer. SNOpt got 24 runs here, Adam and SGD 6 "
    "each.", "",
    "| SNOpt setting | CPU s → loss 0.05 (seed 100 / 101) | CPU s → 95 % | final accuracy |",
    "|---|---|---|---|",
    "| preset before (eps 0.05) | 4.8 / 4.8 | 2.5 / 2.9 | 95.7 / 97.0 |",
    "| **eps 0.02** | 4.3 / 3.6 | 2.2 / 2.0 | 97.3 / 97.3 |",
    "| eps 0.01 | 3.1 / 3.2 | 1.9 / 2.8 | 95.7 / 95.1 |",
    "| eps 0.01, lr 0.1 | 3.2 / 3.1 | 2.0 / 2.7 | 96.2 / 93.2 |",
    "| eps 0.01, update_freq 10 | 3.5 / 2.9 | 2.2 / 2.9 | 94.1 / 94.9 |",
    "| eps 0.01, kl_clip 1e-2 | 5.5 / 3.5 | 3.8 / 1.2 | 95.1 / 91.9 |",
    "| eps 0.01, kl_clip 1e-3 | 4.3 / 4.3 | 3.1 / 3.2 | 97.8 / 95.4 |",
    "| eps 0.01, no kl_clip | diverged | diverged | — |",
    "| eps 0.01, Monte-Carlo Fisher | 4.4 / 3.7 | 1.7 / 2.1 | 94.9 / 93.5 |",
    "| eps 0.003 | 7.6 / 7.4 | 3.5 / 3.4 | 91.6 / 96.5 |",
    "| eps 0.003, lr 0.03 | 7.2 / 5.1 | 3.4 / 3.4 | 89.5 / 94.3 |",
    "| eps 0.2, lr 1.0 | 5.9 / 5.6 | 3.2 / 3.6 | 96.8 / 97.6 |",
    "| (Adam, lr 0.03) | 5.4 / 5.3 | 5.4 / 3.3 | 97.6 / 97.0 |",
    "| (SGD, lr 0.3) | 5.5 / 5.3 | 2.5 / 3.9 | 96.5 / 96.0 |",
    "", "The same probe on digits (eps 0.02 at lr 0.1; eps 0.1 and 0.2 at lr 0.3, with kl_clip 1e-3 or 3e-3; "
    "tuning seeds 100 and 101) never beat the preset's sum of CPU times to both targets over both seeds (20.1 s; "
    "they took 20.7–26.7 s), so digits keeps eps 0.05."])
CNF_PROBE = "\n".join([
    "## CNF: SNOpt's damping and a second tuning seed", "",
    "On the CNF one tuning seed was not representative (SNOpt's lr 0.03 led Adam on seed 100, 3.41 vs 3.50, and "
    "trailed it on all three reported seeds in the previous run), so the CNF settings were chosen by the mean final "
    "test NLL over tuning seeds 100 and 101 (neither a reported seed), by hand with the same runner: SNOpt over "
    "(lr, eps), since its damping eps had never been tuned, and Adam over its lr grid's interior. Kept: SNOpt lr "
    "0.01 with eps 0.003, Adam lr 0.03 (Adam's one-seed pick 0.1 is worse on the mean: 3.562 vs 3.512). SNOpt got "
    "20 runs here, Adam 3 beyond its grid (seed 101).", "",
    "| optimizer | lr | eps | final test NLL seed 100 | seed 101 | mean |",
    "|---|---|---|---|---|---|",
    "| snopt | 0.03 | 0.05 | 3.409 | 3.652 | 3.531 |",
    "| snopt | 0.01 | 0.05 | 3.725 | 3.707 | 3.716 |",
    "| snopt | 0.03 | 0.2 | 3.744 | 3.712 | 3.728 |",
    "| snopt | 0.1 | 0.2 | 3.535 | 3.616 | 3.576 |",
    "| snopt | 0.03 (update_freq 10) | 0.05 | 3.669 | 3.444 | 3.557 |",
    "| snopt | 0.03 | 0.01 | 3.355 | 3.405 | 3.380 |",
    "| snopt | 0.1 | 0.01 | diverged | diverged | — |",
    "| snopt | 0.01 | 0.01 | 3.497 | 3.659 | 3.578 |",
    "| snopt | 0.03 | 0.003 | 3.445 | diverged | — |",
    "| snopt | **0.01** | **0.003** | 3.384 | 3.342 | **3.363** |",
    "| adam | **0.03** | — | 3.511 | 3.512 | **3.512** |",
    "| adam | 0.1 | — | 3.504 | 3.620 | 3.562 |",
    "| adam | 0.3 | — | 3.581 | 3.759 | 3.670 |",
    "", "The same damping probe on digits (tuning seeds 100, 101; lr 0.03 with eps 0.01, lr 0.01 with eps 0.003, "
    "with and without the trust region) was worse everywhere than the preset (final accuracy 10–97 %, "
    "several stiff runs), so the classification presets keep eps 0.05."])
TARGET_RATIO = 0.5


def _score(s: dict[str, Any], metric: str) -> tuple[float, ...]:
    """Sort key of a tuning run (smaller is better)."""
    if s.get("error") or s.get("diverged"):
        return (3.0, 0.0)
    if metric == "nll":
        final = s["final_test_metric"]
        return (0.0, final if final is not None else float("inf"))
    tl, tm = s["cpu_time_to_target_loss"], s["cpu_time_to_target_metric"]
    total = s["train_cpu_time"]
    final, target = s["final_test_metric"], s["target_metric"]
    if final is None or final < target:  # fast but not kept up: reached the target, then fell below it
        tl = tm = None
    if tl is not None and tm is not None:
        return (0.0, tl + tm)
    if tl is not None or tm is not None:
        return (1.0, (tl if tl is not None else total) + (tm if tm is not None else total))
    return (2.0, -(s["final_test_metric"] or 0.0))


def tune(task: str, iterations: int | None, echo: bool) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run the learning-rate grid of `task` on the tuning seed; return the best lr per optimizer and the rows."""
    rows: list[dict[str, Any]] = []
    base = TASKS[task]
    for name, grid in GRIDS[task].items():
        for lr in grid:
            cfg = replace(base, optimizer=name, lr=lr, seed=TUNING_SEED, iterations=iterations)  # type: ignore[arg-type]
            try:
                r = run(cfg, isolate=True)
                s = dict(r["summary"], diverged=r["diverged"] is not None, metric=r["task"]["metric"])
            except RuntimeError as exc:
                s = {"error": str(exc), "metric": "?"}
            rows.append({"task": task, "optimizer": name, "lr": lr, **s})
            if echo:
                print(f"  tune {task}/{name} lr={lr:g}: final {s.get('final_test_metric')} "
                      f"cpu→targets {s.get('cpu_time_to_target_loss')} / {s.get('cpu_time_to_target_metric')}",
                      flush=True)
    return best_lrs(rows), rows


def best_lrs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The best learning rate per optimizer among tuning rows (see the module docstring)."""
    out: dict[str, float] = {}
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        group = [r for r in rows if r["optimizer"] == name]
        metric = next((r["metric"] for r in group if r.get("metric") in ("nll", "accuracy")), "accuracy")
        out[name] = min(group, key=lambda r: _score(r, metric))["lr"]
    return out


def load_tuning_rows(path: Path) -> list[dict[str, Any]]:
    """Tuning rows from a JSON list of ``{"args": [task, dataset, optimizer, lr, seed], "summary": {...}}``."""
    rows = []
    for rec in json.loads(path.read_text()):
        task, _, name, lr, _ = rec["args"]
        s = rec.get("summary") or {}
        metric = "nll" if task == "cnf" else "accuracy"
        rows.append({"task": task, "optimizer": name, "lr": lr, "metric": metric, **s,
                     "diverged": bool(rec.get("diverged")), **({"error": rec["error"]} if rec.get("error") else {})})
    return rows


def tuning_section(rows: list[dict[str, Any]]) -> str:
    """Markdown section listing every grid point and the chosen rate per task and optimizer."""
    lines = ["## Learning-rate tuning (same budget per optimizer)", "",
             f"A 3-point grid per optimizer (×3 apart), extended by ×3 steps while an optimizer's best point "
             f"was at an end of its grid (so Adam and SGD got more points than SNOpt); one run each on tuning seed "
             f"{TUNING_SEED} (not a reported seed), the task's iterations and evaluation grid. Kept: the smallest "
             "CPU time to reach both targets among the runs still at the "
             "accuracy target at the end (classification), or the lowest final test NLL (CNF). Runs stopped as "
             "diverged (non-finite loss, failed solve, or NFE per iteration above 10× the first) are never kept. "
             "SNOpt's other settings were not grid-tuned (except on the time series and the CNF, next sections): "
             "eps 0.05, alpha 0.75 and update_freq 25 are the "
             "paper's kind of values; the trust region `kl_clip` was chosen by hand on the tuning seed of digits "
             "(lr 0.1, seminorm adjoint; CPU s to the loss / accuracy targets, final accuracy): none — diverged; "
             "3e-4: 7.2 / 5.2, 98.3 %; 1e-3: 5.6 / 4.2, 97.2 %; 2e-3: 4.9 / 3.5, 96.7 %; 4e-3: 6.1 / 4.0, 95.8 %; "
             "1e-2: 4.6 / 4.0, 94.2 % (stiff: backward NFE 66); with 1e-3, eps 0.01 diverged, eps 0.2 was slower "
             "(9.0 / 6.1) and update_freq 10 slower per step. For the time series 1e-3 and 3e-3 were tried at lr "
             "0.1 (iterations to the targets 28/16 vs 22/12: 3e-3 kept). These ~12 extra SNOpt runs are tuning "
             "budget Adam and SGD did not get. The CNF's **kept** marks below are superseded by the two-seed choice "
             "in the last section (the time series keeps its learning rates; only SNOpt's eps changed there).", "",
             "| task | optimizer | lr | final test metric | CPU s → loss target | CPU s → metric target | diverged "
             "| kept |",
             "|---|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        group = [r for r in rows if r["task"] == task]
        best = best_lrs(group)
        for r in group:
            def f(v: Any, d: int = 1) -> str:
                return "—" if v is None else f"{v:.{d}f}"
            lines.append(f"| {task} | {r['optimizer']} | {r['lr']:g} | {f(r.get('final_test_metric'), 4)} | "
                         f"{f(r.get('cpu_time_to_target_loss'))} | {f(r.get('cpu_time_to_target_metric'))} | "
                         f"{'yes' if r.get('diverged') or r.get('error') else ''} | "
                         f"{'**kept**' if best[r['optimizer']] == r['lr'] else ''} |")
    return "\n".join(lines)


def _kept_section(text: str, title: str) -> str | None:
    m = re.search(rf"(^## {re.escape(title)}.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    return m.group(1).rstrip() if m else None


def verdicts(task: str, result: dict[str, Any]) -> list[str]:
    """Plain statements of which targets were met."""
    agg, ratios = result["aggregate"], result["ratios"]
    out = []
    s, a = agg["snopt"], agg.get("adam")
    for other in ("adam",) if task == "cnf" else ("adam", "sgd"):
        r = ratios.get(f"snopt/{other}")
        if not r:
            continue
        keys = ("metric",) if task == "cnf" else ("loss", "metric")
        for k in keys:
            for clock in ("", "_cpu"):
                rr = r[k + clock]
                ok = rr["ratio"] is not None and rr["bound"] in ("=", "<=") and rr["ratio"] <= (
                    1.0 if task == "cnf" else TARGET_RATIO)
                what = ("time to Adam's final test NLL" if task == "cnf" else
                        ("time to the train-loss target" if k == "loss" else "time to the test-accuracy target"))
                goal = "< 1" if task == "cnf" else f"≤ {TARGET_RATIO}"
                out.append(f"- SNOpt ÷ {other}, {what} ({'CPU' if clock else 'wall'}): {format_ratio(rr)} "
                           f"(goal {goal}) — **{'met' if ok else 'missed'}**")
    if a is not None and task != "cnf":
        sm, am = s["final_test_metric"]["mean"], a["final_test_metric"]["mean"]
        if sm is not None and am is not None:
            out.append(f"- final test accuracy SNOpt {100 * sm:.2f} % vs Adam {100 * am:.2f} % (goal ≥ Adam's) — "
                       f"**{'met' if sm >= am else 'missed'}**")
    return out


def overhead_lines(result: dict[str, Any]) -> list[str]:
    """SNOpt's per-iteration cost: collection vs other iterations, and vs Adam's and SGD's mean step."""
    coll: list[float] = []
    rest: list[float] = []
    for r in result["runs"]:
        if r["config"]["optimizer"] != "snopt":
            continue
        freq = int(r["resolved"]["snopt_freq"])
        for it, st in zip(r["history"]["iteration"], r["history"]["step_time"]):
            (coll if (it - 1) % freq == 0 else rest).append(st)
    out = []
    if coll and rest:
        out.append(f"- SNOpt step wall-clock, median: {1e3 * statistics.median(coll):.0f} ms on factor-collection "
                   f"iterations (every {freq}th, eigendecomposition included) vs {1e3 * statistics.median(rest):.0f} "
                   f"ms on the others ({statistics.median(coll) / statistics.median(rest):.2f}×)")
    agg = result["aggregate"]
    for other in ("adam", "sgd"):
        a, b = agg["snopt"]["mean_step_time"]["mean"], agg.get(other, {}).get("mean_step_time", {}).get("mean")
        if a and b:
            out.append(f"- mean s/iteration SNOpt ÷ {other}: {a / b:.2f} (NFE per iteration differs between "
                       "optimizers as the learned dynamics differ)")
    return out


def stability_lines(result: dict[str, Any]) -> list[str]:
    """Runs that diverged, or reached the metric target and then fell back below it; runs slowed by the machine."""
    out = []
    for r in result["runs"]:
        name, seed, s = r["config"]["optimizer"], r["config"]["seed"], r["summary"]
        h = r["history"]
        nfe = [f + b for f, b in zip(h["nfe_forward"], h["nfe_backward"])]
        growth = f"NFE per iteration {nfe[0]} at the start, {max(nfe)} at most" if nfe else ""
        higher = r["task"]["higher_is_better"]
        final, target = s["final_test_metric"], s["target_metric"]
        if r["diverged"]:
            out.append(f"- {name} seed {seed} stopped as diverged ({r['diverged'].split(':', 1)[0]}; {growth})")
        elif (s["time_to_target_metric"] is not None and final is not None
              and (final < target if higher else final > target)):
            out.append(f"- {name} seed {seed} reached the test target, then fell back to {final:.4g} at the end "
                       f"({growth})")
        wall, cpu = s["train_time"], s["train_cpu_time"]
        if cpu and wall > 1.3 * cpu:
            out.append(f"- {name} seed {seed}: wall-clock {wall:.1f} s vs CPU {cpu:.1f} s — the shared machine "
                       "slowed this run; its CPU-time ratios are the fair ones")
    return out


def machine_lines() -> list[str]:
    """The machine, named."""
    load = os.getloadavg()
    return [f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores), {platform.platform()}",
            f"- torch {torch.__version__}, Python {platform.python_version()}, 1 torch thread per run (each run a "
            "fresh process)",
            f"- load average when the benchmark finished: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            "(the machine is shared: other jobs ran alongside, so wall-clock is noisier than CPU time)"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tune", action="store_true", help="rerun the learning-rate grids first")
    p.add_argument("--tuning-results", type=Path, default=None,
                   help="JSON list of tuning records to use instead of --tune")
    p.add_argument("--quick", action="store_true", help="a third of the iterations (a check, not the table)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--raw", type=Path, default=None, help="also keep every run's JSON record here")
    args = p.parse_args(argv)
    quiet_warnings()
    start = time.perf_counter()
    old = MD.read_text() if MD.exists() else ""
    rows: list[dict[str, Any]] = []
    if args.tuning_results is not None:
        rows = [r for r in load_tuning_rows(args.tuning_results) if r["task"] in args.tasks]
    sections: list[str] = []
    summary_lines: list[str] = []
    for task in args.tasks:
        base = TASKS[task]
        iters = None
        if args.quick:
            iters = max(10, task_defaults(base).iterations // 3)
            base = replace(base, iterations=iters)
        lrs: dict[str, float] = {}
        if args.tune:
            print(f"[{task}] tuning ...", flush=True)
            lrs, new_rows = tune(task, iters, echo=True)
            rows.extend(new_rows)
        elif rows:
            lrs = best_lrs([r for r in rows if r["task"] == task])
        print(f"[{task}] benchmark, seeds {args.seeds}, lrs {lrs or 'preset'} ...", flush=True)
        t0 = time.perf_counter()
        result = compare(base, OPTIMIZERS, args.seeds, out_dir=args.raw, lrs=lrs, isolate=True, plots=False,
                         echo=print)
        png = args.out / f"applications_{task}.png"
        plot_comparison(result["runs"], png)
        d = result["runs"][0]
        res = d["resolved"]
        title = {"digits": "Image classification — sklearn digits (8×8, real)",
                 "timeseries": f"Time-series classification — {d['task']['dataset']} (UEA, real)",
                 "cnf": f"CNF density estimation — {d['task']['dataset']} (2-D toy, fresh samples)"}[task]
        v = verdicts(task, result)
        sections.append("\n".join([
            f"## {title}", "",
            f"{res['iterations']} iterations, batch {res['batch_size']}, evaluation every {res['eval_every']} "
            f"iterations (not timed), {d['task']['num_parameters']} parameters, "
            f"options `{json.dumps(res['options'])}`; "
            f"SNOpt eps {res['snopt_eps']}, update_freq {res['snopt_freq']}, kl_clip {res.get('snopt_kl_clip')}; "
            f"seeds {args.seeds}. "
            f"Wall-clock for this task: {time.perf_counter() - t0:.0f} s.", "",
            result["table"], "", *v, *overhead_lines(result), *stability_lines(result), "",
            *([NOTES[task], ""] if task in NOTES else []), f"![{task}](applications_{task}.png)", ""]))
        summary_lines.extend([f"**{task}**:", "", *v, ""])
    tuning = tuning_section(rows) if rows else _kept_section(old, "Learning-rate tuning")
    head = [
        "# Applications benchmark (CPU): SNOpt vs Adam vs SGD", "",
        "Regenerate: `python benchmarks/run_applications.py` (add `--tune` to rerun the learning-rate grids). "
        f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} in {time.perf_counter() - start:.0f} s.", "",
        "Machine:", *machine_lines(), "",
        "Protocol: every optimizer runs the same loop (`snopt.experiments`), timed around zero_grad + loss + "
        "backward + step only (evaluations excluded). Time-to-target = training time until the first evaluation "
        "at which the full training loss (resp. test metric) reaches the target; mean ± std over seeds, "
        "`(k/n)` = only k of n seeds reached it (means over those). Ratios: SNOpt's mean time ÷ the other's; "
        "`<=` marks an upper bound where the other optimizer missed the target on some seeds (its misses counted "
        "as its whole training time). For the CNF the target is Adam's mean final test NLL (the paper's claim: "
        "SNOpt reaches Adam's NLL sooner). NFE = vector-field evaluations per iteration (forward / adjoint "
        "backward, summed over all solves of the iteration).", "",
        "## Targets", "", *summary_lines]
    probe = ([TS_PROBE] if "timeseries" in args.tasks else []) + ([CNF_PROBE] if "cnf" in args.tasks else [])
    text = "\n".join(head + sections + ([tuning] if tuning else []) + probe) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MD.name).write_text(text)
    print(text)
    print(f"wrote {args.out / MD.name} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
