"""PNG plots of a comparison: training loss and test metric against wall-clock and iteration, NFE, step time.

Drawn with matplotlib's object interface on an Agg canvas (no pyplot, no global backend
switch, no display needed).
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _nan(values: Sequence[float | None]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


COLORS = {"snopt": "tab:red", "adam": "tab:blue", "sgd": "tab:green", "newton-cg": "tab:purple"}
SPIKE_FACTOR = 3.0


def symlog_threshold(curves: Sequence[Sequence[float | None]]) -> float | None:
    """Where an NLL axis should turn logarithmic, or None for a linear axis.

    An NLL (the CNF's loss and metric) can be negative, so it gets no log axis; but one run's
    transient spike or blow-up (tens to millions of nats) flattens every other curve on a linear
    axis. So where the curves climb above their starting values by more than `SPIKE_FACTOR` times
    the distance training descended, the axis becomes symmetric-log, linear up to the starting
    values and logarithmic beyond them.

    Args:
        curves: One sequence of values per run, in evaluation order (None or non-finite: skipped).

    Returns:
        The linear threshold (the largest absolute starting or lowest value), or None.
    """
    finite = [[float(v) for v in c if v is not None and math.isfinite(v)] for c in curves]
    finite = [c for c in finite if c]
    if not finite:
        return None
    start = max(c[0] for c in finite)
    low = min(min(c) for c in finite)
    top = max(max(c) for c in finite)
    if top - start <= SPIKE_FACTOR * max(start - low, 1e-12):
        return None
    return max(abs(start), abs(low), 1e-3)


def plot_comparison(runs: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None) -> list[Path]:
    """Six panels: train loss and test metric vs wall-clock (top) and vs iteration (bottom), NFE and step time.

    One colour per optimizer, one line per seed; dashed lines mark the targets. Cross-entropy
    losses are on a log axis; NLL axes turn symmetric-log where one run's spike would flatten
    the other curves (`symlog_threshold`).

    Args:
        runs: Records from `benchmarks.apps._runner.train`.
        path: The PNG file to write.
        title: Figure title (default: task, data set and machine).

    Returns:
        The written file(s).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, SymmetricalLogLocator

    fig = Figure(figsize=(15, 8.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    first = runs[0]
    metric = first["task"]["metric"]
    label_metric = "test accuracy" if metric == "accuracy" else "test NLL (nats)"
    seen: set[str] = set()
    for r in runs:
        name = r["config"]["optimizer"]
        color = COLORS.get(name, "black")
        lr = r["resolved"]["lr"]  # None for the peers at their own defaults (SOAP, PSGD-Kron)
        label = (f"{name} (lr {lr:g})" if lr is not None else f"{name} (its defaults)") if name not in seen else None
        seen.add(name)
        ev, hist = r["evals"], r["history"]
        kw: dict[str, Any] = {"color": color, "alpha": 0.8, "lw": 1.3, "label": label}
        loss, met = _nan(ev["train_loss"]), _nan(ev["test_metric"])
        axes[0, 0].plot(ev["time"], loss, **kw)
        axes[0, 1].plot(ev["time"], met, **kw)
        axes[1, 0].plot(ev["iteration"], loss, **kw)
        axes[1, 1].plot(ev["iteration"], met, **kw)
        axes[0, 2].plot(hist["iteration"], hist["nfe_forward"], color=color, alpha=0.6, lw=1.0, label=label)
        axes[0, 2].plot(hist["iteration"], hist["nfe_backward"], color=color, alpha=0.6, lw=1.0, ls=":")
        axes[1, 2].plot(hist["iteration"], hist["step_time"], color=color, alpha=0.5, lw=0.8, label=label)
    if metric != "accuracy":  # NLL: a symmetric-log axis where a spike would flatten the other curves
        for key, pair in (("train_loss", (axes[0, 0], axes[1, 0])), ("test_metric", (axes[0, 1], axes[1, 1]))):
            threshold = symlog_threshold([r["evals"][key] for r in runs])
            for ax in pair:
                if threshold is not None:
                    ax.set_yscale("symlog", linthresh=threshold)
                    ax.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=threshold,
                                                                     subs=(1.0, 2.0, 5.0)))
                    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    s = first["summary"]
    for ax in (axes[0, 0], axes[1, 0]):
        ax.axhline(s["target_loss"], color="grey", ls="--", lw=0.8)
        ax.set_ylabel("train loss")
        if metric == "accuracy":  # cross-entropy is positive; an NLL need not be
            ax.set_yscale("log")
    for ax in (axes[0, 1], axes[1, 1]):
        if s["target_metric"] is not None:
            ax.axhline(s["target_metric"], color="grey", ls="--", lw=0.8)
        ax.set_ylabel(label_metric)
    for ax in axes[0, :2]:
        ax.set_xlabel("training wall-clock (s)")
    for ax in axes[1, :]:
        ax.set_xlabel("iteration")
    axes[0, 2].set_xlabel("iteration")
    axes[0, 2].set_ylabel("NFE per iteration (solid fwd, dotted bwd)")
    axes[1, 2].set_ylabel("step wall-clock (s)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    m = first["machine"]
    fig.suptitle(title or f"{first['task']['name']} / {first['task']['dataset']} — {m['cpu']}, torch {m['torch']}, "
                 f"{m['torch_threads']} thread(s), {m['device']}{' ' + m['gpu'] if 'gpu' in m else ''}")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return [out]


def plot_densities(runs: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None) -> list[Path]:
    """A 2-D CNF's learned densities beside its data: one panel per optimizer (its lowest seed's run).

    Every panel shares one colour scale (density, not log-density, so the panels compare mass
    where the data are); each names its final test NLL. Runs without a ``"density"`` in their
    record (other tasks, data of another dimension, diverged runs, older records) are left out.

    Args:
        runs: Records from `benchmarks.apps._runner.train`.
        path: The PNG file to write.
        title: Figure title (default: task, data set and seed).

    Returns:
        The written file, or ``[]`` when no run has a density (nothing is written).
    """
    chosen: dict[str, dict[str, Any]] = {}
    for r in sorted((r for r in runs if r.get("density")), key=lambda r: int(r["config"]["seed"])):
        chosen.setdefault(r["config"]["optimizer"], r)
    if not chosen:
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = next(iter(chosen.values()))
    dens = first["density"]
    fig = Figure(figsize=(3.6 * (len(chosen) + 1) + 1.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(chosen) + 1, squeeze=False)[0]
    pts = dens["points"]
    axes[0].scatter([p[0] for p in pts], [p[1] for p in pts], s=4, alpha=0.5, color="black")
    axes[0].set_title(f"data ({len(pts)} points)")
    grids = {name: [[math.exp(v) if v is not None else math.nan for v in row] for row in r["density"]["log_p"]]
             for name, r in chosen.items()}
    vmax = max((v for g in grids.values() for row in g for v in row if math.isfinite(v)), default=1.0)
    image = None
    for ax, (name, r) in zip(axes[1:], chosen.items(), strict=True):
        d = r["density"]
        x, y = d["x"], d["y"]
        image = ax.imshow(grids[name], origin="lower", extent=(x[0], x[-1], y[0], y[-1]), aspect="auto",
                          cmap="viridis", vmin=0.0, vmax=vmax)
        final = r["evals"]["test_metric"][-1]
        ax.set_title(f"{name} (lr {r['resolved']['lr']:g}): test NLL "
                     + ("n/a" if final is None else f"{final:.3f}"), color=COLORS.get(name, "black"))
    for ax in axes:
        ax.set_xlim(dens["x"][0], dens["x"][-1])
        ax.set_ylim(dens["y"][0], dens["y"][-1])
        ax.set_xlabel("x₁")
    axes[0].set_ylabel("x₂")
    if image is not None:
        fig.colorbar(image, ax=list(axes[1:]), label="learned density p(x)")
    fig.suptitle(title or f"{first['task']['name']} / {first['task']['dataset']}: learned density after "
                 f"{first['summary']['iterations_done']} iterations, seed {first['config']['seed']}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return [out]


__all__ = ["COLORS", "SPIKE_FACTOR", "plot_comparison", "plot_densities", "symlog_threshold"]
