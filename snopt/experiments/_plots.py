"""PNG plots of a comparison: training loss and test metric against wall-clock and iteration, NFE, step time.

Drawn with matplotlib's object interface on an Agg canvas (no pyplot, no global backend
switch, no display needed).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _nan(values: Sequence[float | None]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


COLORS = {"snopt": "tab:red", "adam": "tab:blue", "sgd": "tab:green", "newton-cg": "tab:purple"}


def plot_comparison(runs: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None) -> list[Path]:
    """Six panels: train loss and test metric vs wall-clock (top) and vs iteration (bottom), NFE and step time.

    One colour per optimizer, one line per seed; dashed lines mark the targets.

    Args:
        runs: Records from `snopt.experiments._runner.train`.
        path: The PNG file to write.
        title: Figure title (default: task, data set and machine).

    Returns:
        The written file(s).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
        label = f"{name} (lr {r['resolved']['lr']:g})" if name not in seen else None
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


__all__ = ["COLORS", "plot_comparison"]
