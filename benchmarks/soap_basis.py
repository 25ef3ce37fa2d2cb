"""SOAP's eigenbasis in SNOpt: does Shampoo's gradient-outer-product basis need fewer steps than K-FAC's?

    python benchmarks/soap_basis.py                       # 4 applications, tuning seeds 100 and 101
    python benchmarks/soap_basis.py --from-log            # rewrite the table, no training

SOAP (Vyas et al. 2024) runs Adam in the eigenbasis of Shampoo's factors L = Σ ∇W ∇Wᵀ and
R = Σ ∇Wᵀ ∇W, sums of *mini-batch weight gradients*; SNOpt's basis is that of K-FAC's factors
A = E[ā āᵀ], G = E[g gᵀ] of per-sample activations and cotangents integrated along the adjoint
solve. The other differences were measured by ``choose_defaults.py`` (refresh every 10 steps:
adopted; Adam's ½ power: worse; a running average of the factors: worse) or do not apply (bias
correction: every running average in SNOpt starts from its first sample, not from zero). This
script measures the last one with everything else held at SNOpt's defaults:

* ``kfac``: ``snopt.SNOpt(model)`` as it is;
* ``gradient``: the same, but each refresh takes its eigenbasis from L and R summed over the
  gradients since the previous refresh (SOAP's factors, over SNOpt's window of ``update_freq``
  steps), and initialises m2 as the diagonal of K-FAC's A ⊗ G *in that basis* — with K-FAC's own
  basis this is exactly SNOpt's m2 = λ_G λ_Aᵀ, so only the basis differs.

Reported: iterations and CPU seconds to each task's targets (worst of the seeds; runs stop at the
targets). Iterations answer "fewer steps?" independently of the machine's load.
"""

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import benchmarks.apps._runner as runner  # noqa: E402
from benchmarks.apps._common import RunConfig, continue_log, logged_runs  # noqa: E402
from snopt import SNOpt  # noqa: E402
from snopt.curvature import KronFactors, weight_grad_matrix  # noqa: E402

LOG = ROOT / "benchmarks" / "logs" / "soap_basis_runs.jsonl"
OUT = ROOT / "benchmarks" / "results" / "soap_basis.md"
RUNS = ROOT / "benchmarks" / "results" / "soap_basis_runs.jsonl.gz"  # the committed copy of the log
APPS: dict[str, RunConfig] = {
    "digits": RunConfig(task="digits"),
    "japanese_vowels": RunConfig(task="timeseries", dataset="JapaneseVowels"),
    "basic_motions": RunConfig(task="timeseries", dataset="BasicMotions"),
    "cnf_breast_cancer": RunConfig(task="cnf", dataset="breast_cancer"),
}


class GradientBasisSNOpt(SNOpt):
    """SNOpt whose eigenbasis comes from Shampoo's factors of the weight gradients (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outer: dict[int, tuple[Tensor, Tensor]] = {}
        self._kfac: list[KronFactors | None] = []

    @torch.no_grad()
    def step(self, closure: Any = None) -> float | None:  # type: ignore[override]
        """Add this step's ∇W∇Wᵀ and ∇Wᵀ∇W, then take SNOpt's step."""
        for layer in self.layers:
            if layer.weight.grad is None:
                continue
            g = weight_grad_matrix(layer.module).double()
            left, right = self._outer.get(id(layer.weight), (torch.zeros(()), torch.zeros(())))
            self._outer[id(layer.weight)] = (left + g @ g.T, right + g.T @ g)
        return super().step(closure)

    def blend(self, factors: list[KronFactors | None]) -> list[KronFactors | None]:
        """K-FAC's factors are kept for m2; the eigenbasis is computed from L (as G) and R (as A)."""
        self._kfac = factors
        out: list[KronFactors | None] = []
        for layer, f in zip(self.layers, factors, strict=True):
            lr = self._outer.get(id(layer.weight))
            out.append(None if f is None or lr is None else
                       replace(f, A=lr[1].to(f.A), G=lr[0].to(f.G)))
        return out

    def _refresh(self) -> None:
        super()._refresh()
        for layer, f in zip(self.layers, self._kfac, strict=True):
            st = self.state.get(layer.weight, {})
            if f is None or "U_A" not in st:
                continue
            diag_a = (st["U_A"] * (f.A.to(st["U_A"]) @ st["U_A"])).sum(0)  # diag(U_Aᵀ A U_A)
            diag_g = (st["U_G"] * (f.G.to(st["U_G"]) @ st["U_G"])).sum(0)
            st["m2"] = torch.outer(diag_g.clamp_min(0), diag_a.clamp_min(0))
        self._outer.clear()


@contextmanager
def snopt_class(cls: type[SNOpt]) -> Iterator[None]:
    """Let the applications' runner build `cls` wherever it builds `SNOpt` (this process only)."""
    names = vars(runner)
    saved = names["SNOpt"]
    names["SNOpt"] = cls
    try:
        yield
    finally:
        names["SNOpt"] = saved


def one_run(app: str, variant: str, seed: int) -> dict[str, Any]:
    """One run to the targets; the summary and the recovery counts."""
    torch.set_num_threads(1)
    cfg = replace(APPS[app], optimizer="snopt", seed=seed, threads=1)
    cls = GradientBasisSNOpt if variant == "gradient" else SNOpt
    with snopt_class(cls):
        result = runner.train(cfg, quiet=True, stop_at_targets=True)
    s = result["summary"]
    keys = ("iterations_to_target_loss", "iterations_to_target_metric", "cpu_time_to_target_loss",
            "cpu_time_to_target_metric", "iterations_done", "mean_nfe_forward", "mean_nfe_backward")
    return {"app": app, "variant": variant, "seed": seed, "diverged": result["diverged"],
            **{k: s.get(k) for k in keys}, "machine": result["machine"]}


def _worst(runs: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in runs]
    if not vals or any(v is None for v in vals):
        return "miss"
    return f"{max(vals):.0f}" if key.startswith("iter") else f"{max(vals):.1f}"


def table(runs: list[dict[str, Any]]) -> str:
    """The results file."""
    seeds = sorted({r["seed"] for r in runs})
    lines = ["# SOAP's gradient-outer-product eigenbasis vs SNOpt's K-FAC basis, at SNOpt's defaults", "",
             f"Regenerate: `python benchmarks/soap_basis.py` (protocol in its docstring). Seeds {seeds} (tuning "
             "seeds, not the benchmark's); worst seed; runs stop at the targets.", "",
             "| application | basis | iterations to loss / metric target | CPU s to them "
             "| NFE fwd / bwd per it (mean) | diverged |", "|---|---|---|---|---|---|"]
    for app in APPS:
        for variant in ("kfac", "gradient"):
            rs = [r for r in runs if r["app"] == app and r["variant"] == variant]
            if not rs:
                continue
            nfe = (f"{sum(r['mean_nfe_forward'] for r in rs) / len(rs):.1f} / "
                   f"{sum(r['mean_nfe_backward'] for r in rs) / len(rs):.1f}")
            lines.append(f"| {app} | {variant} | {_worst(rs, 'iterations_to_target_loss')} / "
                         f"{_worst(rs, 'iterations_to_target_metric')} | {_worst(rs, 'cpu_time_to_target_loss')} / "
                         f"{_worst(rs, 'cpu_time_to_target_metric')} | {nfe} | "
                         f"{sum(r['diverged'] is not None for r in rs)} |")
    hosts = sorted({r["machine"].get("cpu", "?") for r in runs})
    lines += ["", f"Machine: {', '.join(hosts)}; torch {torch.__version__}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--apps", nargs="+", default=list(APPS), choices=list(APPS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--from-log", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="retrain the runs the log (or the committed copy) holds")
    args = ap.parse_args(argv)
    runner.quiet_warnings()
    if not args.from_log:
        done = continue_log(LOG, RUNS, lambda r: (r["app"], r["variant"], r["seed"]), fresh=args.fresh)
        for app in args.apps:
            for seed in args.seeds:
                for variant in ("kfac", "gradient"):
                    if (app, variant, seed) in done:
                        continue
                    row = one_run(app, variant, seed)
                    print(json.dumps({k: v for k, v in row.items() if k != "machine"}), flush=True)
                    with LOG.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
    runs = logged_runs(LOG, RUNS, trained=not args.from_log)
    OUT.write_text(table(runs))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
