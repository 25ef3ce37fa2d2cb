"""Backward time of `snopt.odeint` vs `torchdiffeq.odeint_adjoint` on the same problem.

Problem (DESIGN.md §6, REFERENCE.md §3): an autonomous MLP vector field 16 → 64 → 64 → 16
(tanh), batch 256, dopri5 with rtol = atol = 1e-5 forward and backward, float32, one CPU
thread, in two variants: PyTorch's default initialisation on t ∈ [0, 1] ("easy": dopri5
takes ~3 steps, so this mostly measures per-call overhead) and weights ×4 on t ∈ [0, 3]
("harder": ~20 steps, where the solver work dominates). Only the backward pass
(`loss.backward()`) is timed; the forward solve is identical (both call torchdiffeq's
dopri5) and done in the setup.

Two ways to run:

* ``pytest benchmarks --benchmark-only`` (nox -s bench): pytest-benchmark, one test each
  for snopt (mixed norm, like torchdiffeq), snopt with ``adjoint_norm="seminorm"`` and
  torchdiffeq.
* ``python benchmarks/bench_odeint.py [--reps N]``: measures all three interleaved in one
  process (median of N ≥ 5 repetitions) and writes benchmarks/results/odeint_backward_cpu.md
  with the machine named.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn

import snopt
from benchmarks.apps._common import cpu_model

DIM, HIDDEN, BATCH = 16, 64, 256
RTOL = ATOL = 1e-5
RESULTS = Path(__file__).resolve().parent / "results" / "odeint_backward_cpu.md"


class Field(nn.Module):
    """F(x) = W3 tanh(W2 tanh(W1 x + b1) + b2) + b3, counting its evaluations."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                                 nn.Linear(HIDDEN, DIM))
        self.calls = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        out: Tensor = self.net(x)
        return out


@dataclass
class Problem:
    field: Field
    y0: Tensor
    t: Tensor


# name -> (weight gain over PyTorch's default init, t1)
PROBLEMS: dict[str, tuple[float, float]] = {"easy": (1.0, 1.0), "harder": (4.0, 3.0)}


def make_problem(name: str = "easy", seed: int = 0) -> Problem:
    gain, t1 = PROBLEMS[name]
    torch.manual_seed(seed)
    field = Field()
    with torch.no_grad():
        for layer in field.net:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(gain)
    y0 = torch.randn(BATCH, DIM)
    return Problem(field, y0, torch.tensor([0.0, t1]))


Solver = Callable[[Problem, Tensor], Tensor]


def _snopt(norm: Literal["mixed", "seminorm"]) -> Solver:
    def run(p: Problem, y0: Tensor) -> Tensor:
        out: Tensor = snopt.odeint(p.field, y0, p.t, method="dopri5", rtol=RTOL, atol=ATOL, adjoint_norm=norm)
        return out
    return run


def _torchdiffeq(p: Problem, y0: Tensor) -> Tensor:
    out: Tensor = torchdiffeq.odeint_adjoint(p.field, y0, p.t, method="dopri5", rtol=RTOL, atol=ATOL)
    return out


SOLVERS: dict[str, Solver] = {
    "torchdiffeq.odeint_adjoint": _torchdiffeq,
    "snopt.odeint": _snopt("mixed"),
    'snopt.odeint (adjoint_norm="seminorm")': _snopt("seminorm"),
}


def forward(p: Problem, solver: Solver) -> tuple[Tensor, Tensor, int]:
    """Forward solve and loss; returns (loss, y0 leaf, forward NFE)."""
    p.field.zero_grad(set_to_none=True)
    y0 = p.y0.clone().requires_grad_(True)
    p.field.calls = 0
    loss = solver(p, y0)[-1].pow(2).mean()
    return loss, y0, p.field.calls


def timed_backward(p: Problem, solver: Solver) -> tuple[float, int, int, Tensor]:
    """(backward seconds, forward NFE, backward NFE, flat gradient)."""
    loss, y0, nfe_fwd = forward(p, solver)
    p.field.calls = 0
    start = time.perf_counter()
    loss.backward()  # type: ignore[no-untyped-call]
    elapsed = time.perf_counter() - start
    assert y0.grad is not None
    grad = torch.cat([y0.grad.reshape(-1)] + [q.grad.reshape(-1) for q in p.field.parameters() if q.grad is not None])
    return elapsed, nfe_fwd, p.field.calls, grad


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------

def _bench(benchmark: Any, name: str, problem: str) -> None:
    torch.set_num_threads(1)
    p = make_problem(problem)
    solver = SOLVERS[name]

    def setup() -> tuple[tuple[Tensor], dict[str, Any]]:
        loss, _, _ = forward(p, solver)
        return (loss,), {}

    benchmark.pedantic(lambda loss: loss.backward(), setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    grads = [q.grad for q in p.field.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_backward_torchdiffeq(benchmark: Any, problem: str) -> None:
    _bench(benchmark, "torchdiffeq.odeint_adjoint", problem)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_backward_snopt(benchmark: Any, problem: str) -> None:
    _bench(benchmark, "snopt.odeint", problem)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_backward_snopt_seminorm(benchmark: Any, problem: str) -> None:
    _bench(benchmark, 'snopt.odeint (adjoint_norm="seminorm")', problem)


# ----------------------------------------------------------------------------------------------
# Script mode: all solvers in one run, written to benchmarks/results/
# ----------------------------------------------------------------------------------------------



def measure(problem: str, reps: int) -> dict[str, dict[str, Any]]:
    torch.set_num_threads(1)
    p = make_problem(problem)
    rows: dict[str, dict[str, Any]] = {name: {"times": []} for name in SOLVERS}
    for name, solver in SOLVERS.items():                       # warm-up, and the NFE counts
        _, nfe_fwd, nfe_bwd, grad = timed_backward(p, solver)
        rows[name].update(nfe_forward=nfe_fwd, nfe_backward=nfe_bwd, grad=grad)
    for _ in range(reps):                                      # interleaved: drift hits all alike
        for name, solver in SOLVERS.items():
            rows[name]["times"].append(timed_backward(p, solver)[0])
    ref = rows["torchdiffeq.odeint_adjoint"]
    for row in rows.values():
        row["median"] = statistics.median(row["times"])
        row["ratio"] = row["median"] / statistics.median(ref["times"])
        row["ratio_min"] = min(row["times"]) / min(ref["times"])
        row["grad_rel_diff"] = float((row["grad"] - ref["grad"]).norm() / ref["grad"].norm())
    return rows


def render(results: dict[str, dict[str, dict[str, Any]]], reps: int) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        "# Backward time: snopt.odeint vs torchdiffeq.odeint_adjoint (CPU)",
        "",
        f"Written by `python benchmarks/bench_odeint.py --reps {reps}` on "
        f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU (lscpu model name) | {cpu_model()} |",
        f"| platform.processor() | {platform.processor() or 'n/a'} |",
        f"| platform | {platform.platform()} |",
        f"| logical CPUs | {os.cpu_count()} |",
        f"| python / torch / torchdiffeq | {platform.python_version()} / {torch.__version__} / "
        f"{torchdiffeq.__version__} |",
        f"| torch threads | {torch.get_num_threads()} |",
        f"| load average at the end (1/5/15 min) | {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} |",
        "",
        f"Field: MLP {DIM} → {HIDDEN} → {HIDDEN} → {DIM} (tanh), batch {BATCH}, dopri5, rtol = atol = {RTOL:g} "
        "(forward and backward), float32, loss = mean(y(t1)²). Only `loss.backward()` is timed; median of "
        f"{reps} repetitions, the solvers interleaved within each repetition.",
        "",
        "| problem | solver | backward median (ms) | min–max (ms) | NFE forward | NFE backward "
        "| ratio to torchdiffeq (medians) | ratio (minima) | rel. grad difference to torchdiffeq |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for problem, rows in results.items():
        gain, t1 = PROBLEMS[problem]
        label = f"{problem} (weights ×{gain:g}, t ∈ [0, {t1:g}])"
        for name, row in rows.items():
            lo, hi = min(row["times"]) * 1e3, max(row["times"]) * 1e3
            lines.append(f"| {label} | {name} | {row['median'] * 1e3:.1f} | {lo:.1f}–{hi:.1f} | "
                         f"{row['nfe_forward']} | {row['nfe_backward']} | {row['ratio']:.2f} | "
                         f"{row['ratio_min']:.2f} | {row['grad_rel_diff']:.1e} |")
    lines += [
        "",
        "Target: snopt.odeint (mixed norm, the same error control as torchdiffeq) at ratio ≤ 1.1. The "
        "machine is shared: with a load average above its CPU count, absolute times are inflated and "
        "noisy; the ratios (solvers interleaved) and the minima are the robust figures. "
        "NFE backward counts vector-field evaluations during `backward()` (each runs one "
        "vector-Jacobian product). Gradient differences are those of two adjoint solves at "
        "rtol 1e-5 with different error norms (or identical steps: 0), not errors of either.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=9, help="repetitions per solver (median; at least 5)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    reps = max(5, args.reps)
    results = {problem: measure(problem, reps) for problem in PROBLEMS}
    text = render(results, reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
