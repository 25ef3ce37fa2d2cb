"""GPU numbers in one run (python benchmarks/gpu_bench.py [out.md]); every ratio is measured side by side.

1. backward time of snopt.odeint vs torchdiffeq.odeint_adjoint;
2. hvp time ÷ gradient time;
3. peak CUDA memory of a gradient at 10 vs 1000 rk4 steps: snopt.odeint vs backprop through torchdiffeq.odeint;
4. per-iteration time of a conv ODE classifier: Adam, SNOpt (collection and plain iterations).
"""

import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchdiffeq

import snopt

DEV = os.environ.get("SNOPT_BENCH_DEVICE", "cuda")
SMALL = os.environ.get("SNOPT_BENCH_SMALL") == "1"  # a quick CPU dry run of the script


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], reps: int = 7) -> float:
    fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


class MLPField(torch.nn.Module):
    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, d))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class ConvField(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(c + 1, c, 3, padding=1)
        self.c2 = torch.nn.Conv2d(c + 1, c, 3, padding=1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.expand(x.shape[0], 1, *x.shape[2:])
        out: torch.Tensor = self.c2(torch.cat([torch.relu(self.c1(torch.cat([x, tt], 1))), tt], 1))
        return out


def backward_ratio(lines: list[str]) -> None:
    torch.manual_seed(0)
    f = MLPField(64, 256).to(DEV)
    x0 = torch.randn(256 if SMALL else 4096, 64, device=DEV)
    t = torch.tensor([0.0, 1.0], device=DEV)
    res = {}
    for name, solve, kw in [("torchdiffeq.odeint_adjoint", torchdiffeq.odeint_adjoint, {}),
                            ("snopt.odeint", snopt.odeint, {}),
                            ("snopt.odeint (seminorm)", snopt.odeint, {"adjoint_norm": "seminorm"})]:
        def run(solve: Callable[..., torch.Tensor] = solve, kw: dict[str, str] = kw) -> None:
            x = x0.clone().requires_grad_(True)
            y = solve(f, x, t, rtol=1e-5, atol=1e-5, **kw)[-1]
            y.pow(2).mean().backward()  # type: ignore[no-untyped-call]
        res[name] = timed(run)
    base = res["torchdiffeq.odeint_adjoint"]
    lines += ["## Forward + backward of a first-order adjoint (MLP 64→256→64, batch 4096, dopri5 1e-5, float32)", "",
              "| solver | s (median of 7) | ÷ torchdiffeq |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {v / base:.2f} |" for k, v in res.items()] + [""]


def hvp_ratio(lines: list[str]) -> None:
    torch.manual_seed(0)
    f = MLPField(8, 64).to(DEV, torch.float64)
    x0 = torch.randn(256, 8, device=DEV, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], device=DEV, dtype=torch.float64)
    loss = snopt.losses.MSELoss(torch.zeros_like(x0))
    p = sum(q.numel() for q in f.parameters())
    v = torch.randn(p, device=DEV, dtype=torch.float64)

    def grad() -> None:
        y = snopt.odeint(f, x0, t, rtol=1e-7, atol=1e-7, adjoint_norm="seminorm")[-1]
        torch.autograd.grad(loss(y), list(f.parameters()))

    tg = timed(grad)
    th = timed(lambda: snopt.hvp(f, x0, t, loss, v, rtol=1e-7, atol=1e-7))
    lines += ["## hvp ÷ gradient (MLP 8→64→8, batch 256, dopri5 1e-7, float64)", "",
              "| gradient s | hvp s | ratio |", "|---|---|---|", f"| {tg:.4f} | {th:.4f} | {th / tg:.2f} |", ""]


def memory(lines: list[str]) -> None:
    torch.manual_seed(0)
    f = MLPField(64, 256).to(DEV)
    x0 = torch.randn(1024, 64, device=DEV)
    t = torch.tensor([0.0, 1.0], device=DEV)
    rows = []
    if DEV != "cuda":
        return
    for n in (10, 100, 1000):
        out = {}
        solvers = [("snopt.odeint", snopt.odeint), ("backprop through torchdiffeq.odeint", torchdiffeq.odeint)]
        for name, solve in solvers:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            x = x0.clone().requires_grad_(True)
            y = solve(f, x, t, method="rk4", options={"step_size": 1.0 / n})[-1]
            y.pow(2).mean().backward()
            torch.cuda.synchronize()
            out[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
            del x, y
        rows.append(f"| {n} | {out['snopt.odeint']:.1f} | {out['backprop through torchdiffeq.odeint']:.1f} |")
    lines += ["## Peak CUDA memory of one gradient (MiB above baseline; MLP 64→256→64, batch 1024, rk4)",
              "",
              "| rk4 steps | snopt.odeint | backprop through solver |", "|---|---|---|", *rows, ""]


def iteration_times(opt: torch.optim.Optimizer, forward_backward: Callable[[], object],
                    n: int) -> dict[str, list[tuple[float, float]]]:
    """`n` single iterations of `opt`, each timed alone as (forward + backward s, step s) and filed by what it
    was: a ``"collection"`` iteration (`opt.collecting` when it starts: the backward pass gathers the Kronecker
    factors and the step refreshes the eigenbases) or a ``"plain"`` one (every iteration of an optimizer that
    does not collect). Each is one call, with no warm-up call in between, which would shift which iterations
    are timed (`timed` runs its function once first: with update_freq 2 every timed iteration would be of one
    kind)."""
    out: dict[str, list[tuple[float, float]]] = {"collection": [], "plain": []}
    for _ in range(n):
        kind = "collection" if getattr(opt, "collecting", False) else "plain"
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        forward_backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        out[kind].append((t1 - t0, time.perf_counter() - t1))
    return out


def training(lines: list[str]) -> None:
    torch.manual_seed(0)
    x = torch.randn(8 if SMALL else 128, 1, 28, 28, device=DEV)
    y = torch.randint(0, 10, (x.shape[0],), device=DEV)
    res: dict[str, tuple[float, float, float]] = {}
    for name in ("adam", "snopt"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 4, 2, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 4, 2, 1), torch.nn.ReLU(),
            snopt.ODEBlock(ConvField(64), rtol=1e-3, atol=1e-3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(64, 10)).to(DEV)
        base = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), 1e-3) if name == "adam" else \
            snopt.SNOpt(model, base, update_freq=2)

        def forward_backward(model: torch.nn.Module = model) -> None:
            torch.nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]

        iteration_times(opt, forward_backward, 2)  # warm-up (SNOpt: one collection and one plain iteration)
        kinds = iteration_times(opt, forward_backward, 8 if name == "snopt" else 7)
        for kind, label in (("plain", "Adam" if name == "adam" else "SNOpt plain iteration"),
                            ("collection", "SNOpt collection iteration")):
            if kinds[kind]:
                fb = statistics.median(t[0] for t in kinds[kind])
                step = statistics.median(t[1] for t in kinds[kind])
                total = statistics.median(t[0] + t[1] for t in kinds[kind])
                res[label] = (total, fb, step)
    a = res["Adam"][0]
    lines += ["## Per-iteration time, the paper's MNIST model (28×28, batch 128, 64×7×7 ODE state, dopri5 1e-3)",
              "",
              "Medians of single iterations (SNOpt with update_freq 2: 4 of each kind). A collection iteration's "
              "backward pass gathers the Kronecker factors and its step refreshes the eigenbases.", "",
              "| optimizer | s | ÷ Adam | forward + backward s | step s |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {t:.4f} | {t / a:.2f} | {fb:.4f} | {st:.4f} |" for k, (t, fb, st) in res.items()]
    lines.append("")


def main() -> None:
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        card = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        card = "CPU dry run"
    lines = [f"# GPU benchmarks on {card}, torch {torch.__version__}", ""]
    for part in (backward_ratio, hvp_ratio, memory, training):
        part(lines)
        print("\n".join(lines[-12:]), flush=True)
    text = "\n".join(lines)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
