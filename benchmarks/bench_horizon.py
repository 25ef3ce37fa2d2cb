"""The integration horizon t1 learned by `HorizonController` vs a fixed t1, on real images (digits).

Problem: scikit-learn's bundled digits (1,437 train / 360 test 8×8 images, 10 classes,
standardised), the paper's image model shrunk to 8×8: a 3×3 conv stem to C channels, an ODE
block whose field is two time-concatenated 3×3 convs (softplus), and a linear head on the
flattened state; dopri5 with rtol = atol = 1e-3 (the paper's), float32, Adam (lr 1e-3, batch 128),
a fixed number of epochs, one CPU thread. t1 starts at 1.0 and at 0.05 and is either kept fixed
or moved by `HorizonController` (Gauss-Newton curvature from the training backward pass,
penalty ρ t1²/2, one update per `update_freq` iterations). Reported per run: final t1, test
accuracy, final full-train loss, wall-clock of training, and the vector-field evaluations of
training (forward + adjoint backward solves, plus the controller's one extra evaluation per
iteration; the evaluation passes are not counted).

Two ways to run:

* ``python benchmarks/bench_horizon.py [--epochs N] [--seeds S ...]``: all configurations in one
  process (interleaved per seed), writes benchmarks/results/horizon_cpu.md with the machine named.
* ``pytest benchmarks/bench_horizon.py --benchmark-only``: the per-iteration cost of one training
  step with and without the controller (pytest-benchmark).
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import snopt
import snopt.data
from snopt.optim._horizon import HorizonController

RESULTS = Path(__file__).resolve().parent / "results" / "horizon_cpu.md"
CHANNELS = 8
BATCH = 128
LR = 1e-3
RTOL = ATOL = 1e-3


class ConcatConv(nn.Module):
    """3×3 conv of [x; t·1] (the time-concatenated conv of FFJORD / the paper)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in + 1, c_out, 3, padding=1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = torch.ones_like(x[:, :1]) * t.to(x.dtype)
        out: Tensor = self.conv(torch.cat([tt, x], dim=1))
        return out


class ConvField(nn.Module):
    """F(t, x) = conv2(t, softplus(conv1(t, x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConcatConv(channels, channels)
        self.conv2 = ConcatConv(channels, channels)
        self.act = nn.Softplus()

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.conv2(t, self.act(self.conv1(t, x)))
        return out


class Classifier(nn.Module):
    def __init__(self, t1: float, channels: int = CHANNELS) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Softplus())
        self.block = snopt.ODEBlock(ConvField(channels), t1=t1, rtol=RTOL, atol=ATOL)
        self.head = nn.Linear(channels * 64, 10)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.block(self.stem(x)).flatten(1))
        return out


@dataclass(frozen=True)
class Config:
    name: str
    t1: float
    policy: str | None  # None: fixed t1
    reg: float = 0.0


@dataclass
class Result:
    config: Config
    seed: int
    final_t1: float
    test_acc: float
    train_loss: float
    wall_s: float
    cpu_s: float
    nfe: int
    t1_trace: list[float] = field(default_factory=list)


def configs(policies: list[str], regs: list[float]) -> list[Config]:
    out = []
    for t1 in (1.0, 0.05):
        out.append(Config(f"fixed t1={t1:g}", t1, None))
        out.extend(Config(f"{p} from t1={t1:g}, ρ={reg:g}", t1, p, reg) for reg in regs for p in policies)
    return out


def evaluate(model: Classifier, x: Tensor, y: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train(cfg: Config, data: snopt.data.Split, *, epochs: int, seed: int, update_freq: int,
          lr_t: dict[str, float]) -> Result:
    torch.manual_seed(seed)
    model = Classifier(cfg.t1)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ctrl = None
    if cfg.policy is not None:
        ctrl = HorizonController(model.block, lr=lr_t[cfg.policy], reg=cfg.reg, update_freq=update_freq,
                                 policy=cfg.policy, beta=0.9, min_t1=0.01,  # type: ignore[arg-type]
                                 params=list(model.parameters()))
    g = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    nfe = 0
    wall = cpu = 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, BATCH):
            idx = perm[i:i + BATCH]
            start, start_cpu = time.perf_counter(), time.process_time()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if ctrl is not None:
                ctrl.step()
                nfe += 1
            wall += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            nfe += model.block.stats.nfe_forward + model.block.stats.nfe_backward
    train_loss, _ = evaluate(model, data.x_train, data.y_train)
    _, acc = evaluate(model, data.x_test, data.y_test)
    return Result(cfg, seed, float(model.block.t1), acc, train_loss, wall, cpu, nfe,
                  ctrl.t1_history if ctrl is not None else [cfg.t1])


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs (torch threads: {torch.get_num_threads()}), "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(results: list[Result], args: argparse.Namespace) -> str:
    names = list(dict.fromkeys(r.config.name for r in results))
    fixed = {t1: [r for r in results if r.config.policy is None and r.config.t1 == t1] for t1 in (1.0, 0.05)}
    lines = [
        "# HorizonController on digits (CPU)",
        "",
        f"Generated by `python benchmarks/bench_horizon.py {' '.join(sys.argv[1:])}` on "
        f"{datetime.date.today().isoformat()} at commit {git_rev()}.",
        f"Machine: {machine()}.",
        "",
        f"Setup: sklearn digits (1,437 train / 360 test, 8×8, standardised); stem conv 1→{CHANNELS} → ODE block "
        f"(two time-concatenated 3×3 convs, softplus; dopri5 rtol = atol = {RTOL:g}) → flatten → linear; "
        f"Adam lr {LR:g}, batch {BATCH}, {args.epochs} epochs ({args.epochs * 12} iterations), float32. "
        f"Controller: curvature='gauss_newton', penalty ρ t1²/2 (ρ as named), update_freq = {args.update_freq}, "
        f"beta = 0.9, min_t1 = 0.01, lr = {args.lr_newton:g} (feedback, open_loop) / {args.lr_gradient:g} (gradient). "
        f"Seeds: {', '.join(map(str, args.seeds))}; each cell is the mean over seeds (± half-range when > 1 seed). "
        "NFE = vector-field evaluations of all training solves (forward + adjoint backward) plus the "
        "controller's one per iteration; wall and CPU = training time only (no evaluation passes; CPU = "
        "process time, less sensitive than wall to other jobs on a shared machine). "
        f"Load average (1 min) at start / end: {args.load[0]:.1f} / {os.getloadavg()[0]:.1f}.",
        "",
        "| run | final t1 | test acc % | train loss | wall s | CPU s | NFE (×1000) | CPU ÷ fixed | NFE ÷ fixed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(values: list[float], fmt: str) -> str:
        m = statistics.fmean(values)
        if len(values) == 1:
            return format(m, fmt)
        return f"{format(m, fmt)} ± {format((max(values) - min(values)) / 2, fmt)}"

    for name in names:
        rs = [r for r in results if r.config.name == name]
        base = fixed[rs[0].config.t1]
        cpu_ratio = statistics.fmean(r.cpu_s for r in rs) / statistics.fmean(r.cpu_s for r in base)
        nfe_ratio = statistics.fmean(r.nfe for r in rs) / statistics.fmean(r.nfe for r in base)
        lines.append(f"| {name} | {cell([r.final_t1 for r in rs], '.3f')} | "
                     f"{cell([100 * r.test_acc for r in rs], '.1f')} | {cell([r.train_loss for r in rs], '.3f')} | "
                     f"{cell([r.wall_s for r in rs], '.1f')} | {cell([r.cpu_s for r in rs], '.1f')} | "
                     f"{cell([r.nfe / 1000 for r in rs], '.1f')} | {cpu_ratio:.2f} | {nfe_ratio:.2f} |")
    lines += ["", "t1 after each update (first seed):", ""]
    for name in names:
        r = next(r for r in results if r.config.name == name and r.config.policy is not None) \
            if any(r.config.name == name and r.config.policy is not None for r in results) else None
        if r is not None:
            trace = ", ".join(f"{v:.3g}" for v in r.t1_trace)
            lines.append(f"- {name}: {trace}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--regs", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--update-freq", type=int, default=12)
    parser.add_argument("--lr-newton", type=float, default=1.0)
    parser.add_argument("--lr-gradient", type=float, default=1.0)
    parser.add_argument("--policies", nargs="+", default=["feedback", "open_loop", "gradient"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.load = os.getloadavg()
    torch.set_num_threads(args.threads)
    data = snopt.data.load_digits(standardize=True)
    lr_t = {"feedback": args.lr_newton, "open_loop": args.lr_newton, "gradient": args.lr_gradient}
    results = []
    for seed in args.seeds:
        for cfg in configs(args.policies, args.regs):
            r = train(cfg, data, epochs=args.epochs, seed=seed, update_freq=args.update_freq, lr_t=lr_t)
            print(f"{cfg.name:32s} seed {seed}: t1 {r.final_t1:.3f} acc {100 * r.test_acc:.1f} loss {r.train_loss:.3f}"
                  f" wall {r.wall_s:.1f}s cpu {r.cpu_s:.1f}s nfe {r.nfe}", flush=True)
            results.append(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(results, args))
    print(f"wrote {args.out}")


# ---------------------------------------------------------------------- pytest-benchmark
def _step_fixture(with_controller: bool) -> Any:
    torch.manual_seed(0)
    data = snopt.data.load_digits(standardize=True)
    model = Classifier(1.0)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ctrl = HorizonController(model.block, reg=0.01, update_freq=12) if with_controller else None
    x, y = data.x_train[:BATCH], data.y_train[:BATCH]

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
        if ctrl is not None:
            ctrl.step()
    return step


@pytest.mark.parametrize("with_controller", [False, True], ids=["fixed", "controller"])
def test_training_step(benchmark: Any, with_controller: bool) -> None:
    pytest.importorskip("sklearn")
    step = _step_fixture(with_controller)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    main()
