"""SNOpt vs Adam vs SGD on the full Fashion-MNIST (60k train / 10k test, 28×28), on this machine's CPU.

    python benchmarks/run_fashion.py --extra adam=0.003   # the committed table (3 seeds, 2 runs at a time)
    python benchmarks/run_fashion.py --tune          # first rerun the tuning (about 3.5 hours on 2 cores)
    python benchmarks/run_fashion.py --pair-scopes   # only rerun the two scopes' picks side by side (10 min)
    python benchmarks/run_fashion.py --seeds 0 --jobs 1
    python benchmarks/run_fashion.py --device cuda --jobs 4 --extra adam=0.003 --log runs.jsonl   # on a GPU
    python benchmarks/run_fashion.py --from-log runs.jsonl --device cuda     # the GPU table again, from its runs

Needs the IDX files (Debian: ``apt-get install dataset-fashion-mnist``; see `snopt.data`).
Writes benchmarks/results/fashion_cpu.md and applications_fashion.png. The model is the digits
one (conv stem → ODE block of two time-concatenated 3×3 convs → pool → linear, width 16,
dopri5 rtol = atol = 1e-3, seminorm adjoint); 1,000 iterations of batch 128 (≈ 2.1 epochs).

Settings: the learning rates (and SNOpt's damping eps) come from the applications benchmark's
protocol (`run_applications.tune`: three tuning seeds, none reported; the CPU time to the
targets decides), run on the ``fast`` preset (a 10k/2k subset, 300 iterations, its targets).
SNOpt is also tuned with its trust region on the whole step (the task ``fashion_step``, SNOpt only);
the benchmark runs whichever of the two SNOpt picks scores lower (`snopt_pick`) when the two rerun side
by side on one host (`--pair-scopes`, part of `--tune`; rows in scope_pairs_cpu.json): the tuning's
batches of the two ran apart, and CPU seconds differ between hosts and with the run alongside.
The rows are kept with the other tasks' in benchmarks/results/applications_tuning_cpu.json.
Runs go `--jobs` at a time (each a fresh one-thread process), so wall-clock is shared between
two runs; the CPU-time ratios are the fair ones.

On a GPU (``--device cuda``) the table is ``fashion_<card>.md`` (e.g. ``fashion_h100.md``): the
runs share the one card `--jobs` at a time, every optimizer under the same sharing, and
wall-clock is the clock that counts (CPU time there includes spinning on the device).
``--extra NAME=LR`` adds runs of an optimizer at a learning rate outside the protocol, compared
with the same SNOpt runs in a table of their own. ``--log`` appends each finished run to a
JSON-lines file as it ends, so an interrupted benchmark loses only its unfinished runs, and
``--from-log`` writes the tables and plots from such a file without training.
"""

import argparse
import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from run_applications import (
    OPTIMIZERS,
    RESULTS,
    SCOPE_PAIRS_JSON,
    STEP_TASKS,
    TUNING_JSON,
    add_tuning_options,
    best_settings,
    cpu_log_machine_lines,
    decide_plan,
    decided_lines,
    left_out_lines,
    load_pairs,
    machine_lines,
    overhead_lines,
    pair_scopes,
    read_log,
    retune,
    run_longer,
    run_pool,
    runs_from_log,
    save_pairs,
    scope_paragraph,
    scope_picks,
    snopt_pick,
    stability_lines,
    tuning_section,
    tuning_seeds,
    verdicts,
)

from snopt.experiments import RunConfig, plot_comparison
from snopt.experiments._runner import aggregate, format_table, quiet_warnings, run, summarize, target_ratios

MD = RESULTS / "fashion_cpu.md"
# The tuning's tasks: Fashion-MNIST and SNOpt's whole-step trust-region twin (SNOpt only); the benchmark's SNOpt
# runs at the better-scoring of the two SNOpt picks (`snopt_pick`).
FASHION_TASKS = ("fashion", STEP_TASKS["fashion"])
HORIZON_NOTE = ("The settings were tuned on the fast preset (a 10k subset, 300 iterations; its 57 runs took an hour "
                "here, and on the full set over 1,000 iterations they would take about three). A learning rate stable "
                "over that short horizon can still diverge over 1,000 iterations of the full set (short-horizon "
                "bias, Wu et al. 2018): the lines above say where that happened, and a ratio against an optimizer "
                "whose runs diverged counts them as misses (an upper bound `<=`, not a speed-up: above the goal "
                "it leaves the verdict **undetermined**).")
BASE = RunConfig(task="fashion", threads=1, iterations=1000, eval_every=100, target_loss=0.4, target_metric=0.85,
                 options={"subset": None, "test_subset": None})


def snopt_setting(rows: list[dict[str, Any]],
                  pairs: list[dict[str, Any]] | None = None) -> tuple[float, float, float, str]:
    """SNOpt's (lr, eps, kl_clip, trust-region scope) that the tuning rows keep: the better of the two scopes (on
    their side-by-side rerun, `pairs`, where it holds the current picks)."""
    (_, lr, eps, clip), scope = snopt_pick(rows, "fashion", pairs)
    assert eps is not None
    return lr, eps, clip or 0.0, scope


def benchmark_configs(rows: list[dict[str, Any]], seeds: list[int],
                      pairs: list[dict[str, Any]] | None = None) -> list[RunConfig]:
    """The full-data runs: every optimizer with the setting its tuning rows keep, interleaved seed-major."""
    kept = best_settings([r for r in rows if r["task"] == "fashion"])
    lr, eps, clip, scope = snopt_setting(rows, pairs)
    kept["snopt"] = ("snopt", lr, eps, clip)
    base = replace(BASE, snopt_eps=eps, snopt_kl_clip=clip, snopt_kl_clip_scope=scope)
    return [replace(base, optimizer=name, lr=kept[name][1], seed=seed)  # type: ignore[arg-type]
            for seed in seeds for name in OPTIMIZERS]


def parse_extra(items: list[str]) -> list[tuple[str, float]]:
    """``["adam=0.003"]`` → ``[("adam", 0.003)]``; unknown optimizers and bad numbers fail clearly."""
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in OPTIMIZERS:
            raise SystemExit(f"--extra {item!r}: expected NAME=LR with NAME one of {', '.join(OPTIMIZERS)}")
        try:
            lr = float(value)
        except ValueError:
            raise SystemExit(f"--extra {item!r}: {value!r} is not a learning rate") from None
        if not lr > 0:
            raise SystemExit(f"--extra {item!r}: the learning rate must be positive")
        out.append((name, lr))
    return out


def card_slug(gpu: str) -> str:
    """A short file-name tag for a GPU name: 'NVIDIA H100 80GB HBM3' → 'h100'."""
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", gpu)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")).lower()


def split_runs(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Protocol runs (marked ``extra: false``) and the `--extra` ones."""
    return [r for r in runs if not r.get("extra")], [r for r in runs if r.get("extra")]


def gpu_machine_lines(runs: list[dict[str, Any]], jobs: int) -> list[str]:
    """The machine the runs recorded (not this one: a table can be written from a log elsewhere)."""
    m = runs[0]["machine"]
    return [f"- GPU: {m.get('gpu', '?')}; CPU: {m['cpu']} ({m['logical_cores']} logical cores), {m['platform']}",
            f"- torch {m['torch']}, Python {m['python']}, {m['torch_threads']} torch thread per run (each run a "
            f"fresh process), {jobs} runs at a time sharing the one GPU: every optimizer ran under that sharing, "
            "so the ratios compare like with like, and a run alone on the card would be faster"]


def output_names(runs: list[dict[str, Any]], gpu: bool) -> tuple[str, str]:
    """The results file and main plot: ``fashion_cpu.md`` on the CPU, ``fashion_<card>.md`` on a GPU."""
    if not gpu:
        return MD.name, "applications_fashion.png"
    tag = card_slug(runs[0]["machine"].get("gpu", "gpu"))
    return f"fashion_{tag}.md", f"applications_fashion_{tag}.png"


def fashion_tuning(rows: list[dict[str, Any]], pairs: list[dict[str, Any]] | None = None) -> str:
    """The tuning section of Fashion-MNIST's rows (and its SNOpt whole-step twin's), with the scope SNOpt keeps and
    the side-by-side rerun (`pairs`) that decided it."""
    section = tuning_section(rows, "python benchmarks/run_fashion.py --tune")
    paragraph = scope_paragraph(rows, pairs or [], "fashion", "python benchmarks/run_fashion.py")
    return section + ("\n\n" + paragraph if paragraph else "")


def evaluation_cost_line(runs: list[dict[str, Any]]) -> str:
    """Each run's wall-clock per vector-field evaluation (mean s/iteration ÷ mean NFE/iteration), by setting and seed.

    Runs that share a machine or a card do not all see the same load: a run that trained while
    fewer others did gets its evaluations cheaper. Where this number differs between optimizers,
    the wall-clock ratios carry that difference on top of the optimizers' own.
    """
    cost: dict[str, list[str]] = {}
    for r in sorted(runs, key=lambda r: r["config"]["seed"]):
        s = r["summary"]
        nfe = (s.get("mean_nfe_forward") or 0.0) + (s.get("mean_nfe_backward") or 0.0)
        key = f"{r['config']['optimizer']} {r['resolved']['lr']:g}"
        cost.setdefault(key, []).append(f"{1e3 * s['mean_step_time'] / nfe:.2f}" if nfe else "—")
    seeds = sorted({r["config"]["seed"] for r in runs})
    return ("- wall-clock per function evaluation (ms; s/iteration ÷ NFE/iteration), seeds "
            + " / ".join(map(str, seeds)) + ": " + "; ".join(f"{k} {' / '.join(v)}" for k, v in cost.items())
            + " (each optimizer's own step included) — runs sharing the machine see different loads: where "
            "this differs between optimizers, so do the wall-clock ratios")


def stale_lines(runs: list[dict[str, Any]], rows: list[dict[str, Any]],
                pairs: list[dict[str, Any]] | None = None) -> list[str]:
    """A warning when the SNOpt runs are not at the tuning rows' SNOpt pick (the tuning moved after they ran)."""
    res = next(r["resolved"] for r in runs if r["config"]["optimizer"] == "snopt")
    ran = (float(res["lr"]), float(res["snopt_eps"]), float(res["snopt_kl_clip"] or 0.0),
           str(res.get("snopt_kl_clip_scope", "increment")))
    lr, eps, clip, scope = snopt_setting(rows, pairs)
    if ran[3] == scope and all(math.isclose(a, b) for a, b in zip(ran[:3], (lr, eps, clip), strict=True)):
        return []
    return [f"**The SNOpt runs above are not at the tuning's current pick:** they ran at lr {ran[0]:g}, eps "
            f"{ran[1]:g}, kl_clip {ran[2]:g} on the {ran[3]}; the tuning (last section) now keeps lr {lr:g}, eps "
            f"{eps:g}, kl_clip {clip:g} on the {scope}. Rerun `python benchmarks/run_fashion.py` for the table at "
            "that pick.", ""]


def report(runs: list[dict[str, Any]], mine: list[dict[str, Any]], *, out: Path, seeds: list[int], jobs: int,
           elapsed: float | None, device: str, left_out: list[dict[str, Any]] | None = None,
           log: Path | None = None, extended: list[dict[str, Any]] | None = None,
           pairs: list[dict[str, Any]] | None = None) -> str:
    """The results file's text (and its plots, written into `out`) from finished runs (`extended`: longer runs that
    settle undetermined verdicts, `--decide`)."""
    main_runs, extra_runs = split_runs(runs)
    gpu = device != "cpu"
    _, png = output_names(main_runs, gpu)
    agg = aggregate(main_runs)
    ratios = target_ratios(agg)
    result = {"aggregate": agg, "ratios": ratios, "runs": main_runs}
    plot_comparison(main_runs, out / png)
    res = main_runs[0]["resolved"]
    command = "python benchmarks/run_fashion.py" + (f" --device {device} --jobs {jobs}" if gpu else "")
    extras = sorted({(r["config"]["optimizer"], r["resolved"]["lr"]) for r in extra_runs})
    command += "".join(f" --extra {n}={lr:g}" for n, lr in extras) + (" --decide" if extended else "")
    when = (f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            + (f" in {elapsed:.0f} s" if elapsed is not None else
               f" from the runs recorded in `{log.name if log else '?'}` (`python benchmarks/run_fashion.py "
               f"--from-log {log.as_posix() if log else '?'}{' --device ' + device if gpu else ''}`)")
            + f", {jobs} runs at a time.")
    lines = [
        f"# Fashion-MNIST (full 60k / 10k, 28×28): SNOpt vs Adam vs SGD ({'GPU' if gpu else 'CPU'})", "",
        f"Regenerate: `{command}`" + (" (add `--tune` to rerun the tuning first: last section). " if not gpu else
                                        " (the settings come from the CPU tuning: last section). ") + when, "",
        "Machine:", *(gpu_machine_lines(main_runs, jobs) if gpu else
                      machine_lines() if log is None else cpu_log_machine_lines(main_runs)), "",
        f"{res['iterations']} iterations, batch {res['batch_size']}, evaluation every {res['eval_every']} iterations "
        f"(not timed; test accuracy on all 10,000 test images, train loss on a fixed 1,000), "
        f"{main_runs[0]['task']['num_parameters']} parameters, options `{res['options']}`; SNOpt eps "
        f"{res['snopt_eps']}, update_freq {res['snopt_freq']}, kl_clip {res['snopt_kl_clip']} on the "
        f"{res.get('snopt_kl_clip_scope', 'increment')}; seeds {seeds}.", "",
        *stale_lines(main_runs, mine, pairs), *left_out_lines(left_out or [])]
    if gpu:
        peak: dict[str, float] = {}
        for r in runs:
            name = f"{r['config']['optimizer']} {r['resolved']['lr']:g}"
            peak[name] = max(peak.get(name, 0.0), r["memory"]["peak_cuda_mib"] or 0.0)
        longest = max(r["summary"]["train_time"] for r in runs)
        lines += ["On the GPU the wall-clock columns and ratios are the ones that count: CPU time there includes the "
                  "host spinning while it waits for the device. Peak CUDA memory per run (MiB, the most over seeds): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()) + f". The longest run trained for {longest:.0f} "
                  f"s of wall-clock (evaluations not counted); with {jobs} at a time, a seed takes about that long.",
                  ""]
    settled, settled_v = decided_lines(main_runs, extended or [], "wall" if gpu else "cpu")
    lines += [format_table(agg, ratios, main_runs[0]), "", *verdicts("fashion", result), *settled_v,
              *([""] + settled if settled else []), *overhead_lines(result),
              *stability_lines(result, cpu_clock=not gpu), evaluation_cost_line(runs), "", HORIZON_NOTE, "",
              f"![fashion]({png})", ""]
    snopt_runs = [r for r in main_runs if r["config"]["optimizer"] == "snopt"]
    for name, lr in extras:
        group = [r for r in extra_runs if (r["config"]["optimizer"], r["resolved"]["lr"]) == (name, lr)]
        agg2 = aggregate(snopt_runs + group)
        ratios2 = target_ratios(agg2)
        extra_png = png.replace(".png", f"_{name}{lr:g}.png")
        plot_comparison(snopt_runs + group, out / extra_png)
        lines += [f"## The same SNOpt runs vs {name} at lr {lr:g} (outside the protocol)", "",
                  f"{name} at {lr:g} is not the tuning's pick; it ran on the same seeds beside the protocol's runs, "
                  "as a reference for a rate picked over the short horizon that may not hold over the full one "
                  "(above).", "",
                  format_table(agg2, ratios2, main_runs[0]), "",
                  *[ln for ln in verdicts("fashion", {"aggregate": agg2, "ratios": ratios2, "runs": group})
                    if f"÷ {name}" in ln or ln.startswith("- final")],
                  *stability_lines({"runs": group}, cpu_clock=not gpu), "", f"![fashion {name} {lr:g}]({extra_png})",
                  ""]
    lines += [fashion_tuning(mine, pairs), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each one thread)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--device", default="cpu", help="cpu or cuda (a GPU's table is fashion_<card>.md)")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=LR",
                   help="also run optimizer NAME at learning rate LR (outside the protocol; a table of its own)")
    p.add_argument("--log", type=Path, default=None, help="append each finished run to this JSON-lines file")
    p.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                   help="checkpoint every run in DIR; the same command run again continues the interrupted runs "
                        "and, with the same --log, reuses the logged ones")
    p.add_argument("--from-log", type=Path, default=None, help="write the tables from this --log file; no training")
    p.add_argument("--decide", action="store_true",
                   help="settle undetermined ≤ 0.5 verdicts by longer runs of the seeds where Adam or SGD missed a "
                        "target SNOpt reached (appended to --log; runs the log already holds are reused)")
    p.add_argument("--iterations", type=int, default=None, help="fewer iterations (a check, not the table)")
    p.add_argument("--pair-scopes", action="store_true",
                   help="only rerun SNOpt's two trust-region scopes' picks side by side on this host (6 runs, about "
                        f"10 minutes on 2 cores) into {SCOPE_PAIRS_JSON.name} and stop; their scores decide the "
                        "scope. --tune does it too, after tuning")
    add_tuning_options(p, "about 3.5 hours")
    args = p.parse_args(argv)
    seeds_for_tuning = tuning_seeds(p, args)  # checked before anything runs
    extra = parse_extra(args.extra)
    quiet_warnings()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = json.loads(TUNING_JSON.read_text()) if TUNING_JSON.exists() else []
    if args.tune or (args.tune_only and not args.pair_scopes):
        rows = retune(list(FASHION_TASKS), rows, args.out, args.jobs, resume=args.resume, seeds=seeds_for_tuning)
    mine = [r for r in rows if r["task"] in FASHION_TASKS]
    pairs = load_pairs(args.out)
    if args.tune or args.tune_only or args.pair_scopes:
        if len(scope_picks(mine, "fashion")) == 2:
            pairs = save_pairs(pair_scopes("fashion", mine, seeds=seeds_for_tuning), args.out)
        elif args.pair_scopes:
            raise SystemExit(f"--pair-scopes: {TUNING_JSON.name} lacks the rows of both scopes: run with --tune")
    pairs = [p for p in pairs if p["task"] in FASHION_TASKS]
    if args.tune_only or args.pair_scopes:
        print(fashion_tuning(mine, pairs))
        return 0
    if not any(r["task"] == "fashion" for r in mine):
        raise SystemExit(f"no Fashion-MNIST tuning rows in {TUNING_JSON}: run with --tune first")
    if args.from_log is not None:
        runs, left_out, extended = runs_from_log(read_log(args.from_log))
        if not any(not r.get("extra") for r in runs):
            raise SystemExit(f"{args.from_log} holds no seed whose protocol runs all finished")
        runs = [{**r, "summary": summarize(r)} for r in runs]  # with this version's measures
        seeds = sorted({r["config"]["seed"] for r in runs})
        elapsed, args.jobs, source = None, int(runs[0].get("jobs", args.jobs)), args.from_log
    else:
        kept = benchmark_configs(mine, args.seeds, pairs)
        jobs = [(c, False) for c in kept] + [(replace(c, optimizer=name, lr=lr), True)  # type: ignore[arg-type]
                                              for c in kept if c.optimizer == "snopt" for name, lr in extra]
        jobs.sort(key=lambda j: j[0].seed)  # seed-major: an interrupted benchmark still leaves whole seeds
        jobs = [(replace(c, device=args.device, iterations=args.iterations or c.iterations), x) for c, x in jobs]
        source = None
        prior = args.log is not None and args.log.exists() and args.log.stat().st_size > 0  # runs logged before
        runs = run_pool([(cfg, {"extra": is_extra, "jobs": args.jobs}) for cfg, is_extra in jobs], args.jobs,
                        args.log, run_one=run, checkpoint_dir=args.checkpoint_dir)
        seeds, elapsed, left_out, extended = args.seeds, time.perf_counter() - start, [], []
        if prior or any(r.get("resumed_at") for r in runs):  # pieced together over processes: no one elapsed time
            elapsed, source = None, args.log
    if args.decide:
        plan = [replace(c, device=args.device) for c in decide_plan(split_runs(runs)[0],
                                                                    "cpu" if args.device == "cpu" else "wall")]
        extended += run_longer(plan, extended, args.jobs, args.log, run_one=run, checkpoint_dir=args.checkpoint_dir)
    device = args.device
    text = report(runs, mine, out=args.out, seeds=seeds, jobs=args.jobs, elapsed=elapsed, device=device,
                  left_out=left_out, log=source, extended=extended, pairs=pairs)
    name, _ = output_names(split_runs(runs)[0], device != "cpu")
    (args.out / name).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
