"""The applications benchmark: SNOpt at its defaults against what a user would pick instead.

    python benchmarks/run_applications.py                      # every application, 5 seeds, 2 runs at a time
    python benchmarks/run_applications.py --apps digits --seeds 0 1
    python benchmarks/run_applications.py --from-log           # rewrite the tables and plots, no training

Protocol (fixed before any SNOpt run was looked at; the same for every application):

* **SNOpt** exactly as ``snopt.SNOpt(model)`` — the library's defaults, nothing set per task.
* **Adam** at each of ``GRID["adam"]`` and **SGD** (momentum 0.9) at each of ``GRID["sgd"]``: a
  half-decade grid around Adam's usual rates and a decade grid for SGD, so that each baseline is
  "the best of a small grid", as a user who tunes a little would run it.
* **SOAP** and **PSGD-Kron** from pytorch-optimizer at their own defaults.
* 5 seeds (model initialisation, data split and batch order; the same for every optimizer), every
  setting trained on every seed, seed-major, each run in its own process with one torch thread.
* Targets: each task's training-loss and test-metric thresholds (`benchmarks/apps` presets; set from
  earlier Adam/SGD records, never from SNOpt runs). Time to target = process CPU seconds of the
  timed training steps up to the first evaluation that reaches it (evaluations are not timed).
* **Worst seed**: a setting's time to a target is its slowest seed's (a seed that never reaches it,
  or diverges, is a miss: infinite). The best baseline is the baseline setting with the smallest
  worst-seed time; the headline ratio is SNOpt's worst-seed time ÷ that.

Every finished run is appended to ``<log-dir>/<app>_runs.jsonl`` (gzipped into ``results/`` at the
end), so an interrupted benchmark keeps its runs and the same command continues it; a fresh clone,
which has no log yet, starts each log from the committed ``results/<app>_runs.jsonl.gz`` (``--fresh``
retrains everything instead, e.g. to measure on another machine). Each
application ends in ``results/<app>.md`` (its table) and ``results/<app>.png`` (its curves);
``results/applications.md`` is the summary the README shows.
"""

import argparse
import gzip
import json
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.apps._common import RunConfig, machine_info, upgrade_config  # noqa: E402
from benchmarks.apps._runner import run, task_defaults  # noqa: E402

APPS: dict[str, RunConfig] = {
    "digits": RunConfig(task="digits"),
    "fashion": RunConfig(task="fashion"),
    "japanese_vowels": RunConfig(task="timeseries", dataset="JapaneseVowels"),
    "basic_motions": RunConfig(task="timeseries", dataset="BasicMotions"),
    "cnf_circles": RunConfig(task="cnf", dataset="circles"),
    "cnf_wine": RunConfig(task="cnf", dataset="wine"),
    "cnf_breast_cancer": RunConfig(task="cnf", dataset="breast_cancer"),
    "cnf_old_faithful": RunConfig(task="cnf", dataset="old_faithful"),
}
GRID: dict[str, tuple[float, ...]] = {"adam": (3e-3, 1e-2, 3e-2), "sgd": (0.01, 0.1, 1.0)}
PEERS = ("soap", "kron")
SEEDS = (0, 1, 2, 3, 4)
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Setting:
    """One optimizer setting of the protocol: a name and a learning rate (None: the optimizer's default)."""

    optimizer: str
    lr: float | None = None

    @property
    def label(self) -> str:
        """``snopt``, ``adam@0.01``, ``soap``, ..."""
        return self.optimizer if self.lr is None else f"{self.optimizer}@{self.lr:g}"

    @property
    def is_baseline(self) -> bool:
        """Everything but SNOpt."""
        return self.optimizer != "snopt"


def protocol() -> list[Setting]:
    """SNOpt at defaults, the Adam and SGD grids, and the peers at their defaults, in table order."""
    return [Setting("snopt"), *(Setting(o, lr) for o, lrs in GRID.items() for lr in lrs),
            *(Setting(p) for p in PEERS)]


def setting_of(record: dict[str, Any]) -> Setting:
    """The protocol setting a run record belongs to."""
    c = record["config"]
    return Setting(c["optimizer"], c["lr"])


def configs(app: str, seeds: Sequence[int], settings: Sequence[Setting], **overrides: Any) -> list[RunConfig]:
    """The runs of one application, seed-major (every setting on seed 0, then on seed 1, ...).

    Args:
        app: A key of `APPS`.
        seeds: Seeds.
        settings: Protocol settings.
        **overrides: RunConfig fields to set on every run (e.g. ``iterations`` for a quick check).

    Returns:
        One configuration per (seed, setting), one torch thread each.
    """
    base = replace(APPS[app], threads=1, **overrides)
    return [replace(base, optimizer=s.optimizer, lr=s.lr, seed=k)  # type: ignore[arg-type]
            for k in seeds for s in settings]


def _key(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log (``.jsonl`` or ``.jsonl.gz``); [] if it does not exist."""
    if not path.exists():
        return []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for r in records:
        upgrade_config(r["config"])
    return records


def _train_one(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    return run(RunConfig.from_dict(cfg_dict), quiet=True)


def train_missing(cfgs: Sequence[RunConfig], log: Path, *, jobs: int, echo: bool = True,
                  committed: Path | None = None) -> list[dict[str, Any]]:
    """Train the configurations the log does not hold yet, `jobs` at a time; append each to the log as it ends.

    Args:
        cfgs: The runs wanted.
        log: The application's log (``.jsonl``).
        jobs: Runs at a time (each in its own process).
        echo: Print one line per finished run.
        committed: The committed copy of the log (``results/<name>.jsonl.gz``): where `log` does not exist
            yet (a fresh clone), it starts from these runs instead of retraining them.

    Returns:
        The records of `cfgs`, from the log and the new runs, in `cfgs`' order.
    """
    if committed is not None and committed.exists() and not log.exists():
        log.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(committed, "rb") as src:
            log.write_bytes(src.read())
        if echo:
            print(f"  {log.name}: continuing from the runs committed in {committed}", flush=True)
    have = {_key(r["config"]): r for r in read_log(log)}
    todo = [c for c in cfgs if _key(c.to_dict()) not in have]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if todo:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs) as pool, open(log, "a") as f:
            for i, rec in enumerate(pool.imap(_train_one, [c.to_dict() for c in todo])):
                rec.pop("density", None)  # the 2-D density grids are for interactive runs, not the tables
                f.write(json.dumps(rec) + "\n")
                f.flush()
                have[_key(rec["config"])] = rec
                if echo:
                    c, s = rec["config"], rec["summary"]
                    print(f"  [{i + 1}/{len(todo)}, {time.perf_counter() - start:.0f} s] {c['task']}/"
                          f"{c['dataset'] or ''} {setting_of(rec).label} seed {c['seed']}: "
                          f"{s['train_cpu_time']:.1f} CPU s, final {s['final_test_metric']}"
                          + (f", diverged: {rec['diverged'][:80]}" if rec["diverged"] else ""), flush=True)
    return [have[_key(c.to_dict())] for c in cfgs]


# ------------------------------------------------------------------------------------------- numbers
INF = math.inf


@dataclass
class SettingStats:
    """What the tables say about one setting of one application (over its seeds)."""

    setting: Setting
    seeds: int
    loss_times: list[float]  # CPU s to the train-loss target per seed (inf: missed)
    metric_times: list[float]
    final_metric: list[float | None]
    early_metric: list[float | None]  # test metric at the best validation evaluation (None: the task has none)
    diverged: int
    rejected: int  # SNOpt steps undone by its recovery (all seeds)
    nfe_forward: float  # per iteration, median over seeds of the run mean
    nfe_backward: float
    plain_cpu: float | None  # CPU s per iteration that gathers no curvature (median over seeds)
    collect_cpu: float | None  # CPU s per SNOpt collection iteration (gathers factors, refreshes bases)

    @property
    def worst_loss(self) -> float:
        """Worst seed's CPU seconds to the train-loss target."""
        return max(self.loss_times, default=INF)

    @property
    def worst_metric(self) -> float:
        """Worst seed's CPU seconds to the test-metric target."""
        return max(self.metric_times, default=INF)


def _time_to(record: dict[str, Any], key: str, target: float, lower: bool) -> float:
    ev = record["evals"]
    for t, v in zip(ev["cpu_time"], ev[key]):
        if v is not None and (v <= target if lower else v >= target):
            return float(t)
    return INF


def _per_iteration_cpu(record: dict[str, Any]) -> tuple[list[float], list[float]]:
    h = record["history"]
    cum = h["cpu_time"]
    steps = [b - a for a, b in zip([0.0, *cum[:-1]], cum)]
    flags = h.get("collecting") or [0.0] * len(steps)
    plain = [s for s, f in zip(steps, flags) if not f]
    collect = [s for s, f in zip(steps, flags) if f]
    return plain, collect


def setting_stats(records: Sequence[dict[str, Any]]) -> list[SettingStats]:
    """Per setting (protocol order), its worst-seed and per-seed numbers.

    Args:
        records: The runs of one application.

    Returns:
        One `SettingStats` per setting present.
    """
    return [group_stats(setting, [r for r in records if setting_of(r) == setting])
            for setting in protocol() if any(setting_of(r) == setting for r in records)]


def group_stats(setting: Setting, rs: Sequence[dict[str, Any]]) -> SettingStats:
    """The numbers of one setting's runs (one per seed) of one application."""
    lower_metric = not rs[0]["task"]["higher_is_better"]
    tl, tm = rs[0]["resolved"]["target_loss"], rs[0]["resolved"]["target_metric"]
    plain_m, collect_m = [], []
    for r in rs:
        plain, collect = _per_iteration_cpu(r)
        if plain:
            plain_m.append(statistics.median(plain))
        if collect:
            collect_m.append(statistics.median(collect))
    return SettingStats(
        setting=setting, seeds=len(rs),
        loss_times=[_time_to(r, "train_loss", tl, True) for r in rs],
        metric_times=[_time_to(r, "test_metric", tm, lower_metric) for r in rs],
        final_metric=[r["summary"]["final_test_metric"] if not r["diverged"] else None for r in rs],
        early_metric=[r["summary"].get("test_metric_at_best_val") for r in rs],
        diverged=sum(bool(r["diverged"]) for r in rs),
        rejected=sum((r.get("recovery") or {}).get("rejected", 0) for r in rs),
        nfe_forward=statistics.median(r["summary"]["mean_nfe_forward"] or 0.0 for r in rs),
        nfe_backward=statistics.median(r["summary"]["mean_nfe_backward"] or 0.0 for r in rs),
        plain_cpu=statistics.median(plain_m) if plain_m else None,
        collect_cpu=statistics.median(collect_m) if collect_m else None)


@dataclass
class Verdict:
    """SNOpt's worst-seed time to a target ÷ the best baseline's."""

    target: str  # "loss" or "metric"
    best: str | None  # the best baseline setting's label (None: no baseline reached it on every seed)
    snopt: float
    baseline: float

    @property
    def ratio(self) -> float | None:
        """The ratio; None when neither reached the target on every seed."""
        if math.isinf(self.baseline):
            return 0.0 if not math.isinf(self.snopt) else None
        return self.snopt / self.baseline

    def text(self) -> str:
        """``0.62 (vs adam@0.01)``, ``missed`` or ``no baseline reached it on every seed``."""
        if math.isinf(self.snopt) and math.isinf(self.baseline):
            return "n/a (no setting reached it on every seed)"
        if math.isinf(self.snopt):
            return f"∞: missed on some seed (best baseline {self.best}, {self.baseline:.1f} s)"
        if math.isinf(self.baseline):
            return "SNOpt alone reached it on every seed"
        return f"**{self.snopt / self.baseline:.2f}** ({self.snopt:.1f} s vs {self.best} {self.baseline:.1f} s)"


def verdicts(stats: Sequence[SettingStats]) -> list[Verdict]:
    """The loss and metric verdicts of one application (SNOpt must be among `stats`)."""
    sn = next(s for s in stats if s.setting.optimizer == "snopt")
    base = [s for s in stats if s.setting.is_baseline]
    out = []
    for target in ("loss", "metric"):
        def worst(s: SettingStats, target: str = target) -> float:
            return s.worst_loss if target == "loss" else s.worst_metric

        best = min(base, key=worst, default=None)
        b = worst(best) if best is not None else INF
        out.append(Verdict(target, best.setting.label if best is not None and not math.isinf(b) else None,
                           worst(sn), b))
    return out


# ------------------------------------------------------------------------------------------- writing
def _fmt_times(ts: Sequence[float]) -> str:
    reached = [t for t in ts if not math.isinf(t)]
    if not reached:
        return "missed"
    worst = max(ts)
    med = statistics.median(ts)
    w = "missed" if math.isinf(worst) else f"{worst:.1f}"
    m = "missed" if math.isinf(med) else f"{med:.1f}"
    return f"{w} / {m}" + (f" ({len(reached)}/{len(ts)})" if len(reached) < len(ts) else "")


def _fmt_final(values: Sequence[float | None], accuracy: bool) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "—"
    scale, d = (100.0, 1) if accuracy else (1.0, 2)
    return f"{statistics.median(got) * scale:.{d}f} [{min(got) * scale:.{d}f}, {max(got) * scale:.{d}f}]"


def app_table(app: str, records: Sequence[dict[str, Any]]) -> str:
    """The Markdown results file of one application."""
    stats = setting_stats(records)
    first = records[0]
    res, task = first["resolved"], first["task"]
    acc = task["metric"] == "accuracy"
    metric = "test accuracy %" if acc else "test NLL (nats)"
    cmp = "≥" if task["higher_is_better"] else "≤"
    tm = res["target_metric"] * (100 if acc else 1)
    seeds = sorted({r["config"]["seed"] for r in records})
    m = first["machine"]
    lines = [f"# {app}: SNOpt at its defaults vs the best of Adam, SGD, SOAP, PSGD-Kron", "",
             f"`python benchmarks/run_applications.py --apps {app}` · {len(records)} runs, seeds {seeds} · "
             f"{m['cpu']}, torch {m['torch']}, 1 thread per run, device {m['device']} · {task['dataset']}, "
             f"{res['iterations']} iterations of batch {res['batch_size']}, evaluation every "
             f"{res['eval_every']} · targets: train loss ≤ {res['target_loss']:g}, {metric} {cmp} {tm:g}.", ""]
    v = verdicts(stats)
    lines += [f"- **train loss** — SNOpt worst seed ÷ best baseline worst seed: {v[0].text()}",
              f"- **{metric.split(' (')[0]}** — {v[1].text()}", ""]
    early = any(v is not None for st in stats for v in st.early_metric)
    lines += [f"| setting | CPU s to train loss (worst / median) | CPU s to {metric.split(' (')[0]} (worst / median) | "
              f"final {metric} median [min, max] | " + ("at best validation | " if early else "")
              + "diverged | undone steps | NFE fwd / bwd per it | CPU s per it: plain / collection |",
              "|---|---|---|---|---|---|---|---|" + ("---|" if early else "")]
    for s in stats:
        cost = "—" if s.plain_cpu is None else f"{s.plain_cpu:.3f}" + (
            f" / {s.collect_cpu:.3f}" if s.collect_cpu is not None else "")
        name = f"**{s.setting.label}**" if s.setting.optimizer == "snopt" else s.setting.label
        lines.append(f"| {name} | {_fmt_times(s.loss_times)} | {_fmt_times(s.metric_times)} | "
                     f"{_fmt_final(s.final_metric, acc)} | "
                     + (f"{_fmt_final(s.early_metric, acc)} | " if early else "") + f"{s.diverged} | "
                     f"{s.rejected if s.setting.optimizer == 'snopt' else '—'} | "
                     f"{s.nfe_forward:.1f} / {s.nfe_backward:.1f} | {cost} |")
    lines += ["", "Times are process CPU seconds of the timed training steps (the machine's two cores ran two "
              "runs at a time; CPU time is the steadier clock there). `(k/n)`: only k of n seeds reached the "
              "target (a miss counts as infinite for the worst seed). *Diverged*: the run ended in a solver "
              "failure, a non-finite loss or NFE over 10× its first iteration's. *Undone steps*: SNOpt steps "
              "its recovery rolled back (the run went on). *Collection*: an SNOpt iteration that gathers "
              "Kronecker factors and refreshes the eigenbases (every `update_freq`-th)."
              + (" *At best validation*: the test metric at the evaluation with the best validation metric "
                 "(early stopping, as FFJORD reports tabular NLL)." if early else "")]
    return "\n".join(lines) + "\n"


COLORS = {"snopt": "tab:red", "adam": "tab:blue", "sgd": "tab:green", "soap": "tab:orange", "kron": "tab:purple"}


def plot_app(app: str, records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Curves of SNOpt and the best setting of each baseline family: test metric and train loss vs CPU time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = setting_stats(records)
    shown: list[Setting] = []
    for family in ("snopt", *GRID, *PEERS):
        fam = [s for s in stats if s.setting.optimizer == family]
        if fam:
            shown.append(min(fam, key=lambda s: (s.worst_metric, s.worst_loss)).setting)
    fig = Figure(figsize=(13, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    first = records[0]
    acc = first["task"]["metric"] == "accuracy"
    for setting in shown:
        color = COLORS[setting.optimizer]
        for i, r in enumerate(x for x in records if setting_of(x) == setting):
            ev, h = r["evals"], r["history"]
            kw: dict[str, Any] = {"color": color, "alpha": 0.75, "lw": 1.1, "label": setting.label if i == 0 else None}
            metric = [math.nan if v is None else v * (100 if acc else 1) for v in ev["test_metric"]]
            loss = [math.nan if v is None else v for v in ev["train_loss"]]
            axes[0].plot(ev["cpu_time"], metric, **kw)
            axes[1].plot(ev["cpu_time"], loss, **kw)
            axes[2].plot(h["iteration"], h["nfe_backward"], **{**kw, "lw": 0.8})
    res = first["resolved"]
    axes[0].axhline(res["target_metric"] * (100 if acc else 1), color="grey", ls="--", lw=0.8)
    axes[1].axhline(res["target_loss"], color="grey", ls="--", lw=0.8)
    axes[0].set_ylabel("test accuracy %" if acc else "test NLL (nats)")
    axes[1].set_ylabel("train loss")
    axes[2].set_ylabel("backward NFE per iteration")
    if acc:
        axes[1].set_yscale("log")
    else:
        for ax in axes[:2]:
            lo = min(min((v for v in r["evals"][k] if v is not None), default=0.0)
                     for r in records for k in ("train_loss", "test_metric"))
            ax.set_ylim(lo - 0.1 * abs(lo) - 0.1, res["target_metric"] + 3 * (abs(res["target_metric"] - lo) + 0.5))
    for ax, xl in zip(axes, ("CPU s (training steps)", "CPU s (training steps)", "iteration"), strict=True):
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{app}: one line per seed; SNOpt at defaults and each baseline family's best setting", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def summary_table(per_app: Mapping[str, Sequence[dict[str, Any]]]) -> str:
    """The cross-application summary (``results/applications.md``, shown in the README)."""
    lines = ["| application | train loss: SNOpt ÷ best baseline (worst seed) | test metric: SNOpt ÷ best baseline "
             "(worst seed) | final test metric, median: SNOpt / best baseline (early-stopped where the task "
             "has a validation split) | SNOpt diverged / undone steps | backward NFE per it, SNOpt / best baseline |",
             "|---|---|---|---|---|---|"]
    for app, records in per_app.items():
        stats = setting_stats(records)
        v = verdicts(stats)
        sn = next(s for s in stats if s.setting.optimizer == "snopt")
        best = next((s for s in stats if s.setting.label == v[1].best), None)
        nfe = f"{sn.nfe_backward:.1f} / {best.nfe_backward:.1f}" if best is not None else f"{sn.nfe_backward:.1f} / —"
        acc = records[0]["task"]["metric"] == "accuracy"

        def final(st: SettingStats | None, acc: bool = acc) -> str:
            if st is None:
                return "—"
            vals = st.early_metric if any(x is not None for x in st.early_metric) else st.final_metric
            got = [x for x in vals if x is not None]
            return "—" if not got else (f"{statistics.median(got) * 100:.1f} %" if acc else
                                        f"{statistics.median(got):.2f}")

        lines.append(f"| [{app}]({app}.md) | {v[0].text()} | {v[1].text()} | {final(sn)} / {final(best)} | "
                     f"{sn.diverged} / {sn.rejected} | {nfe} |")
    return "\n".join(lines) + "\n"


def write_results(per_app: Mapping[str, Sequence[dict[str, Any]]], out: Path) -> list[Path]:
    """Each application's table and plot, and the summary; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for app, records in per_app.items():
        p = out / f"{app}.md"
        p.write_text(app_table(app, records) + f"\n![{app}]({app}.png)\n")
        files += [p, plot_app(app, records, out / f"{app}.png")]
    m = machine_info()
    merged = _all_apps(per_app, out)
    seeds = sorted({r["config"]["seed"] for rs in merged.values() for r in rs})
    head = ["# Applications: SNOpt at its defaults vs what a user would pick instead", "",
            "Regenerate: `python benchmarks/run_applications.py` (training; `--from-log` rewrites from the logged "
            f"runs). Protocol in the script's docstring: SNOpt = `snopt.SNOpt(model)`; Adam at {GRID['adam']}, "
            f"SGD (momentum 0.9) at {GRID['sgd']}, SOAP and PSGD-Kron (pytorch-optimizer) at their defaults; "
            f"seeds {seeds}; a setting's time to a target is its **worst seed's** CPU time; the best baseline is the "
            f"baseline setting with the smallest worst-seed time. Machine: {m['cpu']}, torch {m['torch']}.", ""]
    p = out / "applications.md"
    p.write_text("\n".join(head) + summary_table(merged))
    return [*files, p]


def compress_log(log: Path, out: Path) -> Path:
    """Write `log`'s records to ``out/<name>.gz`` (deterministic gzip: no timestamp)."""
    out.mkdir(parents=True, exist_ok=True)
    dest = out / (log.name + ".gz")
    with open(log, "rb") as src, open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(src.read())
    return dest


def main(argv: Iterable[str] | None = None) -> int:
    """Run the protocol (or rewrite its results from the logs)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--apps", nargs="+", choices=sorted(APPS), default=list(APPS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--settings", nargs="+", default=None, help="subset of setting labels (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: this machine's cores)")
    p.add_argument("--log-dir", type=Path, default=ROOT / "benchmarks" / "logs",
                   help="where the growing logs live (default benchmarks/logs, not committed)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--from-log", action="store_true", help="no training: tables and plots from the logs")
    p.add_argument("--fresh", action="store_true",
                   help="where a log does not exist yet, retrain every run instead of continuing from the committed "
                        "ones in --out (a fresh clone continues from them by default)")
    p.add_argument("--iterations", type=int, default=None, help="override (quick checks only)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = [s for s in protocol() if args.settings is None or s.label in args.settings]
    per_app: dict[str, list[dict[str, Any]]] = {}
    for app in args.apps:
        log = args.log_dir / f"{app}_runs.jsonl"
        overrides: dict[str, Any] = {"device": args.device}
        if args.iterations is not None:
            overrides["iterations"] = args.iterations
        cfgs = configs(app, args.seeds, settings, **overrides)
        task_defaults(cfgs[0])  # an unknown data set fails here, before any run
        if args.from_log:
            logged = read_log(log) or read_log(args.out / f"{app}_runs.jsonl.gz")
            want = {_key(c.to_dict()) for c in cfgs}
            per_app[app] = [r for r in logged if _key(r["config"]) in want]
        else:
            print(f"== {app}: {len(cfgs)} runs", flush=True)
            per_app[app] = train_missing(cfgs, log, jobs=args.jobs,
                                         committed=None if args.fresh else args.out / f"{app}_runs.jsonl.gz")
            compress_log(log, args.out)
        if not per_app[app]:
            print(f"{app}: no runs logged", file=sys.stderr)
            del per_app[app]
    for f in write_results(per_app, args.out):
        print(f"wrote {f}")
    return 0


def _all_apps(per_app: Mapping[str, Sequence[dict[str, Any]]], out: Path) -> dict[str, Sequence[dict[str, Any]]]:
    """The summary's applications: this call's, and every other one whose log is in `out`."""
    merged: dict[str, Sequence[dict[str, Any]]] = {}
    for app in APPS:
        records = per_app.get(app) or read_log(out / f"{app}_runs.jsonl.gz")
        if records:
            merged[app] = records
    return merged


if __name__ == "__main__":
    raise SystemExit(main())
