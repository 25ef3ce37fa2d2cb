"""One figure of every committed time-to-target ratio, seed by seed, against the paper's ≤ 0.5.

    python benchmarks/plot_ratios.py            # writes benchmarks/results/ratios_summary.png (and .md)

Reads the committed run logs (no training) and draws, for each setting, competitor and target,
SNOpt's time to the target ÷ the other optimizer's on each seed (same initialisation and
batches), on the clock its results file reports: CPU time on the CPU runs, wall-clock on the
GPU ones. A comparison the protocol left as a bound is settled by the longer runs of `--decide`
where the log holds them (`run_applications.seed_ratio`); what is still a bound is drawn as
one: an upper bound where the other optimizer never reached the target (◀: the ratio lies to
its left), a lower bound where SNOpt missed it (▶). A ratio of 0 means the other optimizer
diverged before the target. The black bar is the ratio of the means, drawn where every seed has
a measured ratio. The CNF (whose goal is < 1, not ≤ 0.5) is left out.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_applications import (  # noqa: E402  (a sibling script, not a package)
    CLOCKS,
    RESULTS,
    TARGET_RATIO,
    read_log,
    runs_from_log,
    seed_ratio,
)

from snopt.experiments._runner import summarize  # noqa: E402

TASK_NAMES = {"digits": "digits", "timeseries": "JapaneseVowels", "fashion": "Fashion-MNIST"}


@dataclass(frozen=True)
class Source:
    """A committed run log and the comparisons drawn from it."""

    label: str
    log: str
    preset: str
    tasks: tuple[str, ...]
    clock: str


SOURCES = (
    Source("tuned", "applications_cpu_runs.jsonl.gz", "fast", ("digits", "timeseries"), "cpu"),
    Source("paper's settings", "applications_paper_cpu_runs.jsonl.gz", "paper", ("digits", "timeseries"), "cpu"),
    Source("tuned, full data", "fashion_cpu_runs.jsonl.gz", "fast", ("fashion",), "cpu"),
    Source("tuned, full data, H100", "fashion_h100_runs.jsonl.gz", "fast", ("fashion",), "wall"),
)


@dataclass(frozen=True)
class Point:
    """One seed's ratio: ``bound`` is ``"="`` (measured), ``"<="`` or ``">="``; ``diverged``: the other optimizer
    diverged before the target (ratio 0); ``apart``: settled by a longer run on another trajectory; ``disputed``:
    such a run disagreed with the protocol run inside its budget, so the protocol's bound stands."""

    seed: int
    ratio: float
    bound: str
    diverged: bool = False
    apart: bool = False
    disputed: bool = False


@dataclass(frozen=True)
class Row:
    """SNOpt ÷ one competitor, to one target, in one setting."""

    setting: str
    other: str
    target: str
    clock: str
    points: tuple[Point, ...]
    mean: float | None  # the ratio of the means, where every seed has a measured ratio

    @property
    def label(self) -> str:
        return f"{self.setting} · ÷ {self.other} · {self.target}"


def _target_words(run: dict[str, Any], k: str) -> str:
    s = run["summary"]
    if k == "loss":
        return f"loss ≤ {s['target_loss']:g}"
    return f"accuracy ≥ {100 * s['target_metric']:g} %"


def comparison_rows(runs: list[dict[str, Any]], extended: list[dict[str, Any]], setting: str,
                    clock: str = "cpu") -> list[Row]:
    """Every SNOpt ÷ competitor ratio of one task's runs, per seed and target.

    Competitors: each protocol optimizer other than SNOpt, and each group of `--extra` runs (an optimizer at a
    learning rate outside the protocol, named with it).

    Args:
        runs: The task's runs of the seeds that finished, with summaries (protocol and `--extra`).
        extended: Its `--decide` runs, with summaries.
        setting: The rows' setting label.
        clock: A key of `CLOCKS`.

    Returns:
        One row per competitor and target with at least one seed known.
    """
    prefix, total, _, _ = CLOCKS[clock]
    snopt = {r["config"]["seed"]: r for r in runs if r["config"]["optimizer"] == "snopt" and not r.get("extra")}
    groups: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        name = r["config"]["optimizer"]
        if name == "snopt" and not r.get("extra"):
            continue
        label = {"adam": "Adam", "sgd": "SGD"}.get(name, name)
        if r.get("extra"):
            label += f" {r['resolved']['lr']:g} (outside the protocol)"
        groups.setdefault(label, {})[r["config"]["seed"]] = r
    rows = []
    for label, theirs in groups.items():
        for k in ("loss", "metric"):
            key = prefix + k
            points, times = [], []
            for sd in sorted(snopt):
                o = theirs.get(sd)
                if o is None:
                    continue
                sr = seed_ratio(snopt[sd], o, k, extended, clock)
                if sr is not None:
                    points.append(Point(sd, sr.ratio, sr.bound, sr.ratio == 0.0 and sr.times is None,
                                        sr.apart and not sr.disagrees, sr.disagrees))
                    if sr.times is not None:
                        times.append(sr.times)
                elif o["summary"][key]:  # SNOpt missed it, the other did not: SNOpt's whole run is a lower bound
                    points.append(Point(sd, snopt[sd]["summary"][total] / o["summary"][key], ">="))
            if not points:
                continue
            mean = (sum(t[0] for t in times) / sum(t[1] for t in times)
                    if len(times) == len(points) == len(snopt) else None)
            rows.append(Row(setting, label, _target_words(next(iter(snopt.values())), k), clock, tuple(points), mean))
    return rows


def source_rows(src: Source, results: Path = RESULTS) -> list[Row]:
    """The rows of one committed log (`SOURCES`)."""
    logged = read_log(results / src.log)
    out: list[Row] = []
    for task in src.tasks:
        mine = [r for r in logged if (r["config"]["task"], r["config"].get("preset", "fast")) == (task, src.preset)]
        runs, _, extended = runs_from_log(mine)
        runs = [{**r, "summary": summarize(r)} for r in runs]
        out += comparison_rows(runs, extended, f"{TASK_NAMES[task]}, {src.label}", src.clock)
    return out


MARKERS = {"=": "o", "<=": "<", ">=": ">"}


def plot(rows: list[Row], path: Path) -> None:
    """A dot chart of `rows` (one line each, seeds as dots) with the ≤ 0.5 goal and parity drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 2.2))
    ys = list(range(len(rows)))[::-1]
    right = max([2.0] + [p.ratio for r in rows for p in r.points]) * 1.05
    for y, row in zip(ys, rows):
        if y % 2:
            ax.axhspan(y - 0.5, y + 0.5, color="0.95", zorder=0)
        for p in row.points:
            if p.diverged:
                ax.scatter(p.ratio, y, marker="x", s=42, color="black", zorder=3)
                continue
            met = p.ratio <= TARGET_RATIO and p.bound != ">="
            ax.scatter(p.ratio, y, marker=MARKERS[p.bound], s=42, zorder=3,
                       facecolors="tab:green" if met else "none" if p.bound != "=" else "tab:orange",
                       edgecolors="tab:green" if met else "tab:orange")
        if row.mean is not None:
            ax.plot([row.mean, row.mean], [y - 0.35, y + 0.35], color="black", lw=2, zorder=4)
    ax.axvline(TARGET_RATIO, color="tab:red", ls="--", lw=1)
    ax.axvline(1.0, color="0.5", lw=1)
    ax.set_yticks(ys, [r.label + (" (wall)" if r.clock == "wall" else "") for r in rows], fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(-0.05, right)
    ax.set_xlabel("ratio (CPU time; wall-clock where marked)")
    ax.set_title("SNOpt's time to the target ÷ the other optimizer's, per seed", fontsize=10)
    from matplotlib.lines import Line2D

    def key(marker: str, face: str, edge: str, text: str) -> Line2D:
        return Line2D([], [], ls="none", marker=marker, markerfacecolor=face, markeredgecolor=edge, color=edge,
                      label=text)
    handles = [key("o", "tab:green", "tab:green", f"measured, goal ≤ {TARGET_RATIO} met"),
               key("o", "tab:orange", "tab:orange", "measured, missed"),
               key("<", "tab:green", "tab:green", "upper bound (the other never got there), met"),
               key("<", "none", "tab:orange", "upper bound above the goal: undetermined"),
               key(">", "none", "tab:orange", "lower bound (SNOpt missed it)"),
               key("x", "black", "black", "the other diverged first (ratio 0)"),
               Line2D([], [], color="black", lw=2, label="ratio of the means (every seed measured)"),
               Line2D([], [], color="tab:red", ls="--", lw=1, label=f"goal {TARGET_RATIO}"),
               Line2D([], [], color="0.5", lw=1, label="parity")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[Row]) -> str:
    """The plotted numbers as a table (so the figure can be checked)."""
    def cell(p: Point) -> str:
        return (f"s{p.seed} " + ("0 (diverged)" if p.diverged else f"{'' if p.bound == '=' else p.bound}{p.ratio:.2f}")
                + ("†" if p.apart else "‡" if p.disputed else ""))
    def met(p: Point) -> bool:
        return p.ratio <= TARGET_RATIO and p.bound != ">="
    points = [p for r in rows for p in r.points]
    apart, disputed = sum(p.apart for p in points), sum(p.disputed for p in points)
    lines = [f"Seed-level comparisons: {len(points)}; the goal ≤ {TARGET_RATIO} is met on {sum(map(met, points))}, "
             f"{sum(p.diverged for p in points)} of them because the other optimizer diverged before the target."
             + (f" † ({apart}): settled by a longer run on another trajectory (another host's rounding, or a GPU's "
                "kernels that do not repeat bit for bit; timed in its function evaluations at the protocol run's "
                "speed, as its results file explains)." if apart else "")
             + (f" ‡ ({disputed}): a longer run on another trajectory reached the target or diverged inside the "
                "protocol run's budget, where the protocol run did not, so the protocol's bound stands."
                if disputed else ""),
             "",
             "| setting | ÷ | target | clock | per seed | ratio of the means | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        n_met = sum(map(met, r.points))
        lines.append(f"| {r.setting} | {r.other} | {r.target} | {CLOCKS[r.clock][3]} | "
                     f"{', '.join(cell(p) for p in r.points)} | {'—' if r.mean is None else f'{r.mean:.2f}'} | "
                     f"{n_met} of {len(r.points)} seeds |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--results", type=Path, default=RESULTS, help="where the logs are (default: benchmarks/results)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write ratios_summary.png / .md")
    args = p.parse_args(argv)
    rows = [row for src in SOURCES if (args.results / src.log).exists() for row in source_rows(src, args.results)]
    if not rows:
        raise SystemExit(f"no run logs of {[s.log for s in SOURCES]} in {args.results}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out / "ratios_summary.png")
    text = "\n".join([
        "# Time-to-target ratios, every committed benchmark", "",
        "Regenerate: `python benchmarks/plot_ratios.py` (from the committed run logs, no training). "
        "SNOpt's time to each target ÷ the other optimizer's on the same seed, settled by `--decide`'s longer runs "
        "where the logs hold them; `<=`: the other never reached the target (upper bound), `>=`: SNOpt missed it "
        "(lower bound); 0: the other diverged before the target. A seed meets the goal when its ratio (or its upper "
        f"bound) is ≤ {TARGET_RATIO}. Each setting's tables and caveats are in its results file.", "",
        markdown(rows), "", "![ratios](ratios_summary.png)", ""])
    (args.out / "ratios_summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
