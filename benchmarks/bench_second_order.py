"""Second-order products: cost relative to a gradient, memory against the number of steps, dense Hessians.

Three comparisons, each measured in one run on one machine (float64, one CPU thread):

1. **hvp ÷ gradient.** `snopt.hvp` and `snopt.ggn_vp` against a `snopt.odeint` gradient
   (forward + `autograd.grad`) on the same problem: MLP 16 → 64 → 16 (tanh), batch 64,
   p = 2,128, MSE, t ∈ [0, 1]; dopri5 at rtol 1e-7 / atol 1e-9 and rk4 with 100 steps. Also the
   backprop-through-solver baselines on plain ``torchdiffeq.odeint``: reverse-over-reverse
   (double backward; works with dopri5 too) and forward-over-reverse (``torch.func.jvp`` of
   ``torch.func.grad``; fixed-grid only, torchdiffeq's adaptive solvers are not transformable).
   All interleaved within each repetition; target hvp ≤ 3× a gradient.
2. **Time and peak memory against the number of rk4 steps** (10, 100, 1000) on the same problem,
   each product in a fresh interpreter (``python -m verification._second_order_refs MODE
   STEPS``) so that ``ru_maxrss`` is the peak of that product alone (plus the interpreter and
   torch, ~300 MB). Written to benchmarks/results/second_order_memory_cpu.md.
3. **Dense Hessian.** `snopt.second_order` (the second-order adjoint, O((n + p)²) memory) against
   ``torch.func.hessian`` through our pure-torch rk4 (`snopt.testing.rk_solve`) and
   ``torch.autograd.functional.hessian(vectorize=True)`` through plain ``torchdiffeq.odeint``
   rk4, for p ≈ 10 … 2,000 (MLP 2 → w → 2, batch 4, 10 rk4 steps).

Two ways to run:

* ``python benchmarks/bench_second_order.py [--only ratio memory dense] [--reps N]`` writes
  benchmarks/results/second_order_cpu.md (and, with the memory section,
  benchmarks/results/second_order_memory_cpu.md), naming the machine. The whole script takes
  ~3–5 minutes on one thread.
* ``pytest benchmarks --benchmark-only -k second_order`` (nox -s bench): pytest-benchmark timings
  of each product on the rk4 problem.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # script mode: make `verification` importable
    sys.path.insert(0, str(ROOT))

import snopt  # noqa: E402
from benchmarks.apps._common import cpu_model  # noqa: E402
from snopt.testing import rel_err, rk_solve  # noqa: E402
from verification._second_order_refs import (  # noqa: E402
    memory_problem,
    peak_rss_mb,
)

RESULTS = ROOT / "benchmarks" / "results" / "second_order_cpu.md"
MEMORY_RESULTS = ROOT / "benchmarks" / "results" / "second_order_memory_cpu.md"
SOLVERS: dict[str, dict[str, Any]] = {
    "dopri5 (rtol 1e-7, atol 1e-9)": {"method": "dopri5", "rtol": 1e-7, "atol": 1e-9},
    "rk4, 100 steps": {"method": "rk4", "options": {"step_size": 0.01}},
}
MEMORY_STEPS = (10, 100, 1000)
MEMORY_MODES = ("hvp", "ggn_vp", "grad", "forward_over_reverse", "reverse_over_reverse")
DENSE_CASES = ((2, 10), (20, 10), (100, 10), (400, 10), (100, 100))  # (width w, rk4 steps); p = 5w + 2
DENSE_AUTOGRAD_MAX_P = 600  # autograd.functional.hessian above this takes minutes on one thread
Problem = tuple[nn.Module, Tensor, Tensor, Any, Tensor]


# ----------------------------------------------------------------------------------------------
# The products being timed
# ----------------------------------------------------------------------------------------------

def grad_snopt(prob: Problem, solver: dict[str, Any]) -> Tensor:
    func, x0, t, loss_fn, _ = prob
    params = [q for q in func.parameters() if q.requires_grad]
    loss = loss_fn(snopt.odeint(func, x0, t, **solver)[-1])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def hvp_snopt(prob: Problem, solver: dict[str, Any]) -> Tensor:
    func, x0, t, loss_fn, v = prob
    return snopt.hvp(func, x0, t, loss_fn, v, **solver)


def ggn_snopt(prob: Problem, solver: dict[str, Any]) -> Tensor:
    func, x0, t, loss_fn, v = prob
    return snopt.ggn_vp(func, x0, t, loss_fn, v, **solver)


def _plain_loss(prob: Problem, solver: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    func, x0, t, loss_fn, _ = prob
    named = [(n, q) for n, q in func.named_parameters() if q.requires_grad]
    sizes = [q.numel() for _, q in named]

    def loss_of(theta: Tensor) -> Tensor:
        ps = {n: c.reshape(q.shape) for (n, q), c in zip(named, torch.split(theta, sizes), strict=True)}

        def f(tt: Tensor, x: Tensor) -> Tensor:
            out: Tensor = functional_call(func, ps, (tt, x))
            return out

        loss: Tensor = loss_fn(torchdiffeq.odeint(f, x0, t, **solver)[-1])
        return loss

    return loss_of


def _theta(prob: Problem) -> Tensor:
    return torch.cat([q.detach().reshape(-1) for q in prob[0].parameters() if q.requires_grad])


def reverse_over_reverse(prob: Problem, solver: dict[str, Any]) -> Tensor:
    th = _theta(prob).requires_grad_(True)
    (g,) = torch.autograd.grad(_plain_loss(prob, solver)(th), th, create_graph=True)
    (hv,) = torch.autograd.grad(g, th, prob[4])
    return hv


def forward_over_reverse(prob: Problem, solver: dict[str, Any]) -> Tensor:
    out: Tensor = torch.func.jvp(torch.func.grad(_plain_loss(prob, solver)), (_theta(prob),), (prob[4],))[1]
    return out


PRODUCTS: dict[str, Callable[[Problem, dict[str, Any]], Tensor]] = {
    "gradient (snopt.odeint)": grad_snopt,
    "hvp (snopt)": hvp_snopt,
    "ggn_vp (snopt)": ggn_snopt,
    "hvp, reverse-over-reverse through torchdiffeq.odeint": reverse_over_reverse,
    "hvp, forward-over-reverse through torchdiffeq.odeint": forward_over_reverse,
}


def _applicable(name: str, solver: dict[str, Any]) -> bool:
    return not (name.startswith("hvp, forward-over-reverse") and solver["method"] != "rk4")


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------

BENCH_SOLVER = SOLVERS["rk4, 100 steps"]


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_second_order_product(benchmark: Any, name: str) -> None:
    torch.set_num_threads(1)
    prob = memory_problem()
    out = benchmark.pedantic(PRODUCTS[name], args=(prob, BENCH_SOLVER), rounds=3, iterations=1, warmup_rounds=1)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("width", [20, 100])
def test_second_order_dense_hessian(benchmark: Any, width: int) -> None:
    torch.set_num_threads(1)
    func, x0, t, loss_fn = dense_problem(width)
    res = benchmark.pedantic(snopt.second_order, args=(func, x0, t, loss_fn),
                             kwargs={"method": "rk4", "options": {"step_size": 0.1}}, rounds=2, iterations=1)
    assert res.hess_params.shape == (5 * width + 2, 5 * width + 2)


# ----------------------------------------------------------------------------------------------
# Script mode
# ----------------------------------------------------------------------------------------------



def machine_table() -> list[str]:
    load = os.getloadavg()
    return [
        "| machine | |",
        "|---|---|",
        f"| CPU (lscpu model name) | {cpu_model()} |",
        f"| platform | {platform.platform()} |",
        f"| logical CPUs | {os.cpu_count()} |",
        f"| python / torch / torchdiffeq | {platform.python_version()} / {torch.__version__} / "
        f"{torchdiffeq.__version__} |",
        f"| torch threads | {torch.get_num_threads()} |",
        f"| load average at the end (1/5/15 min) | {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} |",
    ]


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def measure_ratios(reps: int) -> dict[str, dict[str, dict[str, Any]]]:
    prob = memory_problem()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for label, solver in SOLVERS.items():
        names = [n for n in PRODUCTS if _applicable(n, solver)]
        rows: dict[str, dict[str, Any]] = {n: {"times": []} for n in names}
        for n in names:  # warm-up and the values
            rows[n]["value"] = PRODUCTS[n](prob, solver)
        for _ in range(reps):
            for n in names:
                rows[n]["times"].append(_timed(PRODUCTS[n], prob, solver)[0])
        grad = rows["gradient (snopt.odeint)"]
        ref_hv = rows["hvp, reverse-over-reverse through torchdiffeq.odeint"]["value"]
        for n, row in rows.items():
            row["median"] = statistics.median(row["times"])
            row["ratio"] = row["median"] / statistics.median(grad["times"])
            row["ratio_min"] = min(row["times"]) / min(grad["times"])
            row["vs_ror"] = rel_err(row["value"], ref_hv) if n.startswith("hvp") else None
        results[label] = rows
    return results


def measure_memory() -> dict[tuple[str, int], dict[str, Any]]:
    return {(mode, steps): peak_rss_mb(mode, steps) for mode in MEMORY_MODES for steps in MEMORY_STEPS}


class DenseMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def dense_problem(width: int) -> tuple[nn.Module, Tensor, Tensor, Any]:
    torch.manual_seed(0)
    func = DenseMLP(width).double()
    x0 = torch.randn(4, 2, dtype=torch.float64)
    loss_fn = snopt.losses.MSELoss(torch.randn(4, 2, dtype=torch.float64))
    return func, x0, torch.tensor([0.0, 1.0], dtype=torch.float64), loss_fn


def dense_row(width: int, steps: int) -> dict[str, Any]:
    solver: dict[str, Any] = {"method": "rk4", "options": {"step_size": 1.0 / steps}}
    func, x0, t, loss_fn = dense_problem(width)
    prob: Problem = (func, x0, t, loss_fn, torch.zeros(0))
    named = list(func.named_parameters())
    sizes = [q.numel() for _, q in named]
    theta = _theta(prob)

    def rk_loss(th: Tensor) -> Tensor:
        ps = {n: c.reshape(q.shape) for (n, q), c in zip(named, torch.split(th, sizes), strict=True)}
        loss: Tensor = loss_fn(rk_solve(func, ps, x0, t, steps=steps)[-1])
        return loss

    row: dict[str, Any] = {"p": theta.numel(), "n": x0.numel(), "steps": steps}
    row["second_order"], so = _timed(snopt.second_order, func, x0, t, loss_fn, **solver)
    row["func_hessian"], h_func = _timed(torch.func.hessian(rk_loss), theta)
    row["err_func"] = rel_err(so.hess_params, h_func)
    if theta.numel() <= DENSE_AUTOGRAD_MAX_P:
        row["autograd_hessian"], h_ag = _timed(torch.autograd.functional.hessian, _plain_loss(prob, solver), theta,
                                               vectorize=True)
        row["err_autograd"] = rel_err(h_ag, h_func)
    return row


def measure_dense() -> list[dict[str, Any]]:
    dense_row(2, 10)  # warm-up
    return [dense_row(w, steps) for w, steps in DENSE_CASES]


def render_ratio(results: dict[str, dict[str, dict[str, Any]]], reps: int) -> list[str]:
    lines = [
        "## 1. hvp ÷ gradient on the same problem",
        "",
        f"MLP 16 → 64 → 16 (tanh), batch 64 (n = 1,024), p = 2,128, MSE, t ∈ [0, 1], float64. Median of {reps} "
        "repetitions after one warm-up, products interleaved within each repetition. \"vs r-o-r\": relative "
        "difference of each hvp to reverse-over-reverse through the same solver (different discretisations of "
        "the same derivative: O(h⁴) for rk4, ~rtol for dopri5).",
        "",
        "| solver | product | median (s) | min–max (s) | ÷ gradient (medians) | ÷ gradient (minima) | vs r-o-r |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, rows in results.items():
        for n, row in rows.items():
            vs = f"{row['vs_ror']:.1e}" if row["vs_ror"] is not None else ""
            lines.append(f"| {label} | {n} | {row['median']:.3f} | {min(row['times']):.3f}–{max(row['times']):.3f} "
                         f"| {row['ratio']:.2f} | {row['ratio_min']:.2f} | {vs} |")
    verdicts = []
    for label, rows in results.items():
        r = rows["hvp (snopt)"]["ratio"]
        verdicts.append(f"{label}: {r:.2f}× ({'met' if r <= 3.0 else 'not met'})")
    lines += ["", "Target: hvp ≤ 3× a gradient — " + "; ".join(verdicts) + ". Reverse-over-reverse through the "
              "solver is cheaper in time at this size but stores every step (section 2). Forward-over-reverse "
              "through dopri5 is not possible (torchdiffeq's adaptive solvers are not transformable by torch.func).",
              ""]
    return lines


def render_memory_rows(mem: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    lines = ["| product | " + " | ".join(f"{s} steps: peak RSS (MB)" for s in MEMORY_STEPS) + " | "
             + " | ".join(f"{s} steps: time (s)" for s in MEMORY_STEPS) + " | peak growth 10 → 1000 |",
             "|---|" + "---:|" * (2 * len(MEMORY_STEPS) + 1)]
    labels = {"hvp": "snopt.hvp", "ggn_vp": "snopt.ggn_vp", "grad": "gradient (snopt.odeint)",
              "forward_over_reverse": "hvp, forward-over-reverse (torch.func through torchdiffeq.odeint)",
              "reverse_over_reverse": "hvp, reverse-over-reverse (double backward through torchdiffeq.odeint)"}
    for mode in MEMORY_MODES:
        peaks = [mem[(mode, s)]["peak_rss_mb"] for s in MEMORY_STEPS]
        secs = [mem[(mode, s)]["seconds"] for s in MEMORY_STEPS]
        lines.append(f"| {labels[mode]} | " + " | ".join(f"{x:.0f}" for x in peaks) + " | "
                     + " | ".join(f"{x:.2f}" for x in secs) + f" | {peaks[-1] / peaks[0]:.2f}× |")
    return lines


MEMORY_TEXT = (
    "Problem: MLP 16 → 64 → 16 (tanh), batch 64, p = 2,128, MSE, t ∈ [0, 1], float64, rk4 with 10 / 100 / "
    "1000 steps. Each cell is one product in a fresh interpreter (`python -m verification._second_order_refs "
    "MODE STEPS`, one thread): a warm-up product with 2 steps, then the measured one; peak RSS is the process's "
    "`VmHWM` (/proc/self/status) at the end, so it includes the interpreter, torch and the warm-up (~300 MB). "
    "Not `ru_maxrss`: Linux carries that across fork/vfork + exec, so a child of this 500 MB script starts at "
    "500 MB (every cell read 523 MB in a first run of this table). Time is that one product's wall-clock (a "
    "shared machine: indicative)."
)


def render_dense(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## 3. Dense p × p Hessian: second-order adjoint vs Hessians through the solver",
        "",
        "MLP 2 → w → 2 (tanh), batch 4 (n = 8), MSE, t ∈ [0, 1], rk4 with 10 steps (h = 0.1; one row with "
        "100), float64, one call each. `snopt.second_order` integrates the (n + p)² matrix ODE backward (memory "
        "independent of the steps); `torch.func.hessian` goes through our pure-torch rk4 "
        "(`snopt.testing.rk_solve`); "
        "`torch.autograd.functional.hessian(vectorize=True)` through plain `torchdiffeq.odeint` (both keep the "
        "whole solver graph, and vmap it over p tangents). Errors: snopt vs torch.func is the O(h⁴) gap between "
        "differentiate-then-discretise and discretise-then-differentiate (falling 10⁴× from h = 0.1 to 0.01); "
        "the two through-solver Hessians agree to rounding.",
        "",
        "| p | rk4 steps | second_order (s) | torch.func.hessian (s) | autograd.functional.hessian (s) "
        "| second_order ÷ torch.func | rel. err second_order vs torch.func | rel. err autograd vs torch.func |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ag = f"{r['autograd_hessian']:.2f}" if "autograd_hessian" in r else f"not run (p > {DENSE_AUTOGRAD_MAX_P})"
        ag_err = f"{r['err_autograd']:.1e}" if "err_autograd" in r else ""
        lines.append(f"| {r['p']} | {r['steps']} | {r['second_order']:.2f} | {r['func_hessian']:.2f} | {ag} | "
                     f"{r['second_order'] / r['func_hessian']:.2f} | {r['err_func']:.1e} | {ag_err} |")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", nargs="*", choices=["ratio", "memory", "dense"], default=["ratio", "memory", "dense"])
    parser.add_argument("--reps", type=int, default=7, help="repetitions in the ratio section (median; ≥ 3)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-out", type=Path, default=MEMORY_RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reps = max(3, args.reps)
    started = time.perf_counter()
    ratio = measure_ratios(reps) if "ratio" in args.only else None
    mem = measure_memory() if "memory" in args.only else None
    dense = measure_dense() if "dense" in args.only else None
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/bench_second_order.py" + ("" if len(args.only) == 3 else " --only " + " ".join(args.only))
    head = [f"Written by `{cmd}` on {when} ({time.perf_counter() - started:.0f} s in all).", "", *machine_table(), ""]
    text = ["# Second-order products on the CPU: hvp ÷ gradient, memory vs steps, dense Hessians", "", *head]
    if ratio is not None:
        text += render_ratio(ratio, reps)
    if mem is not None:
        text += ["## 2. hvp vs backprop through the solver: time and peak memory against the number of steps", "",
                 MEMORY_TEXT, "", *render_memory_rows(mem), "",
                 "Also in benchmarks/results/second_order_memory_cpu.md.", ""]
        memory_text = ["# Peak memory of one curvature product against the number of rk4 steps (CPU)", "", *head,
                       MEMORY_TEXT, "", *render_memory_rows(mem), "",
                       "Checked by verification/test_second_order_memory.py (slow): hvp within 10% from 10 to 1000 "
                       "steps, reverse-over-reverse growing.", ""]
        args.memory_out.parent.mkdir(parents=True, exist_ok=True)
        args.memory_out.write_text("\n".join(memory_text))
    if dense is not None:
        text += render_dense(dense)
    text += ["The machine is shared with other work (see the load average): absolute times are inflated and noisy; "
             "ratios measured in the same run, interleaved, are the robust figures.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
