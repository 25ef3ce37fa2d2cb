"""Why is an SNOpt-trained vector field stiffer? A measurement on the image classifiers.

    python benchmarks/stiffness.py                                   # digits, seeds 0 and 2
    python benchmarks/stiffness.py --task fashion --seeds 0 --optimizers snopt adam@0.01
    python benchmarks/stiffness.py --from-log                        # rewrite the table, no training

Each optimizer trains the benchmark's model on the benchmark's seed (same initialisation and
batch order as ``run_applications.py``). Every ``--probe-every`` iterations, on a fixed probe
batch of training images, the script measures

* **the field's Jacobian** J = ∂f/∂z, exactly (``torch.func.jacrev``, per sample) at the states
  z(t) of the forward solve at t = 0, ¼, ½, ¾, 1: the spectral radius ρ(J) (what bounds an
  explicit solver's step), the largest real part of its eigenvalues and ‖J‖²_F;
* **the step's direction against that spectrum**: with S(θ) = mean ‖J‖²_F at those states (held
  fixed) and L the probe batch's loss, the first-order stiffness bought per unit of loss removed
  by the step Δθ the optimizer just took, r = ⟨∇S, Δθ⟩ / −⟨∇L, Δθ⟩ (scale-free: the same for
  any learning rate), and the same ratio for the plain gradient direction −∇L;
* the NFE of the training step (forward / backward, the solver's own counters).

Only the field's parameters enter S and ∇L here (the stem and head do not change ∂f/∂z at fixed z).

The table compares the optimizers **at the same training loss** (the first probe whose evaluated
training loss is at or below each level), which separates "stiffer because the loss is lower"
from "stiffer because of the direction of the steps". Runs go to ``benchmarks/logs/stiffness_runs.jsonl``
(gzipped into ``results/stiffness_runs.jsonl.gz``) and the table to ``benchmarks/results/stiffness.md``;
a fresh clone continues from the committed runs (only missing ones train; ``--fresh`` retrains).
"""

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import functional_call, jacrev, vmap  # noqa: E402
from torchdiffeq import odeint  # noqa: E402

from benchmarks.apps._common import RunConfig, continue_log, logged_runs, machine_info, resolve  # noqa: E402
from benchmarks.apps._digits import ImageTask  # noqa: E402
from benchmarks.apps._runner import make_stepper, make_task, task_defaults  # noqa: E402
from snopt.nn import ODEBlock  # noqa: E402

LOG = ROOT / "benchmarks" / "logs" / "stiffness_runs.jsonl"
OUT = ROOT / "benchmarks" / "results" / "stiffness.md"
RUNS = ROOT / "benchmarks" / "results" / "stiffness_runs.jsonl.gz"  # the committed copy of the log
TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)
LEVELS = {"digits": (1.0, 0.3, 0.1), "fashion": (1.0, 0.7, 0.5)}


def parse_setting(text: str) -> tuple[str, float | None, dict[str, Any]]:
    """``snopt``, ``adam@0.01``, ``snopt+kinetic`` → (optimizer, lr, task options)."""
    name, _, extra = text.partition("+")
    opt, _, lr = name.partition("@")
    options: dict[str, Any] = {"kinetic": 0.01} if extra == "kinetic" else {}
    if extra not in ("", "kinetic"):
        raise ValueError(f"Unknown setting suffix {extra!r} in {text!r} (only '+kinetic').")
    return opt, float(lr) if lr else None, options


def block_of(model: nn.Module) -> ODEBlock:
    """The model's (single) ODE block."""
    blocks = [m for m in model.modules() if isinstance(m, ODEBlock)]
    assert len(blocks) == 1, f"expected one ODEBlock, found {len(blocks)}"
    return blocks[0]


def field_states(block: ODEBlock, z0: Tensor) -> Tensor:
    """z(t) at `TIMES` from the block's solver and tolerances; shape ``(len(TIMES) * B, *state)``."""
    t = torch.tensor(TIMES, dtype=z0.dtype)
    with torch.no_grad():
        zs = odeint(block.func, z0, t, method=block.method, rtol=block.rtol, atol=block.atol)
    out: Tensor = zs.reshape(-1, *z0.shape[1:])
    return out


def jacobians(func: nn.Module, params: Mapping[str, Tensor], t: Tensor, z: Tensor) -> Tensor:
    """Per-sample ∂f/∂z at (t, z): shape ``(N, d, d)`` with d the state's size (differentiable in `params`)."""
    shape = z.shape[1:]

    def f(p: dict[str, Tensor], zi: Tensor) -> Tensor:
        out: Tensor = functional_call(func, p, (t, zi.reshape(1, *shape)))
        return out.reshape(-1)

    jac: Tensor = vmap(jacrev(f, argnums=1), in_dims=(None, 0))(params, z.reshape(len(z), -1))
    return jac


def probe(task: Any, probe_x: Tensor, probe_y: Tensor) -> dict[str, Any]:
    """The spectrum and the gradients ∇S, ∇L at the current parameters (see the module docstring)."""
    model: nn.Module = task.model
    block = block_of(model)
    func = block.func
    stem = model.stem
    assert isinstance(stem, nn.Module)
    with torch.no_grad():
        z0 = stem(probe_x)
    states = field_states(block, z0)  # (5B, C, H, W), the times in blocks of B
    n = len(z0)
    params = {k: v.detach().requires_grad_(True) for k, v in func.named_parameters()}
    ts = [torch.tensor(t, dtype=z0.dtype) for t in TIMES]
    s_total = torch.zeros((), dtype=z0.dtype)
    rho, re_max, fro = [], [], []
    for i, t in enumerate(ts):
        jac = jacobians(func, params, t, states[i * n:(i + 1) * n])
        s_total = s_total + jac.square().sum((1, 2)).mean() / len(ts)
        eig = torch.linalg.eigvals(jac.detach().double())
        rho.append(eig.abs().amax(1))
        re_max.append(eig.real.amax(1))
        fro.append(jac.detach().square().sum((1, 2)))
    grad_s = [torch.zeros_like(p) if g is None else g  # an output bias does not enter ∂f/∂z
              for p, g in zip(params.values(), torch.autograd.grad(s_total, list(params.values()), allow_unused=True),
                              strict=True)]
    names = list(params)
    # ∇L of the probe loss through the block's own (adjoint) solve
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(probe_x), probe_y)
    grads_l = torch.autograd.grad(loss, [dict(func.named_parameters())[k] for k in names])
    return {"S": float(s_total), "loss": float(loss),
            "rho": float(torch.cat(rho).median()), "re_max": float(torch.cat(re_max).median()),
            "fro": float(torch.cat(fro).median()),
            "grad_s": [g.detach().clone() for g in grad_s], "grad_l": [g.detach().clone() for g in grads_l]}


@contextmanager
def no_collection(opt: torch.optim.Optimizer) -> Iterator[None]:
    """SNOpt's factor collection off while a probe runs a backward pass (the factors are the training batch's)."""
    collectors = list(getattr(opt, "collectors", []))
    saved = [c.enabled for c in collectors]
    for c in collectors:
        c.enabled = False
    try:
        yield
    finally:
        for c, on in zip(collectors, saved, strict=True):
            c.enabled = on


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Σ ⟨a_i, b_i⟩."""
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def train(task_name: str, setting: str, seed: int, probe_every: int, probe_size: int,
          iterations: int | None = None) -> dict[str, Any]:
    """One run: the benchmark's training loop with the probes of the module docstring."""
    torch.set_num_threads(1)
    opt_name, lr, options = parse_setting(setting)
    cfg = RunConfig(task=task_name, optimizer=opt_name, seed=seed, lr=lr, options=options,  # type: ignore[arg-type]
                    threads=1, iterations=iterations)
    res = resolve(cfg, task_defaults(cfg))
    task = make_task(cfg, res, torch.device("cpu"))
    assert isinstance(task, ImageTask)
    step, opt = make_stepper(cfg, res, task)
    generator = torch.Generator().manual_seed(cfg.seed)
    idx = task.eval_train_idx[:probe_size]
    px, py = task.data.x_train[idx], task.data.y_train[idx]
    func = block_of(task.model).func
    rows: list[dict[str, Any]] = []
    nfe_f: list[float] = []
    nfe_b: list[float] = []
    t0 = time.perf_counter()
    for it in range(1, res.iterations + 1):
        batch = task.batch(generator)
        probing = (it - 1) % probe_every == 0
        if probing:
            with no_collection(opt):
                before = probe(task, px, py)
            theta0 = [p.detach().clone() for p in func.parameters()]
        loss = step(batch)
        stats = task.solve_stats()
        nfe_f.append(float(sum(s.nfe_forward for s in stats)))
        nfe_b.append(float(sum(s.nfe_backward for s in stats)))
        if not math.isfinite(loss):
            break
        if probing:
            delta = [p.detach() - q for p, q in zip(func.parameters(), theta0, strict=True)]
            ds, dl = dot(before["grad_s"], delta), dot(before["grad_l"], delta)
            gs_gl = dot(before["grad_s"], before["grad_l"])
            gl_gl = dot(before["grad_l"], before["grad_l"])
            with no_collection(opt):
                train_loss = task.evaluate()["train_loss"]
            rows.append({"iteration": it, "train_loss": train_loss, "probe_loss": before["loss"],
                         "S": before["S"], "rho": before["rho"], "re_max": before["re_max"], "fro": before["fro"],
                         "r_step": ds / -dl if dl < 0 else None,  # None: the step did not descend the probe loss
                         "r_grad": -gs_gl / gl_gl if gl_gl > 0 else None,
                         "nfe_forward": nfe_f[-1], "nfe_backward": nfe_b[-1]})
            print(f"{task_name}/{setting}/seed{seed} it {it:4d} loss {train_loss:.3f} rho {before['rho']:.2f} "
                  f"S {before['S']:.1f} r_step {rows[-1]['r_step']} nfe {nfe_f[-1]:.0f}/{nfe_b[-1]:.0f}",
                  flush=True)
    return {"task": task_name, "setting": setting, "seed": seed, "probe_every": probe_every,
            "probe_size": probe_size, "rows": rows, "nfe_forward": nfe_f, "nfe_backward": nfe_b,
            "wall_s": time.perf_counter() - t0, "machine": machine_info(torch.device("cpu"))}


def at_level(run: dict[str, Any], level: float) -> dict[str, Any] | None:
    """The first probe whose evaluated training loss is ≤ `level` (None: never reached)."""
    return next((r for r in run["rows"] if r["train_loss"] <= level), None)


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(vals) if vals else None


def _f(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def table(runs: list[dict[str, Any]]) -> str:
    """The results file: per task, level and setting, the seed-median spectrum, NFE and direction ratios."""
    lines = ["# Why SNOpt-trained fields are stiffer: the spectrum at the same training loss", "",
             "Regenerate: `python benchmarks/stiffness.py` (protocol in its docstring). ρ: spectral radius of "
             "∂f/∂z, Re λ_max its largest real part, ‖J‖²_F, each the median over the probe batch and t ∈ "
             "{0, ¼, ½, ¾, 1}, at the first probe whose training loss is ≤ the level. NFE: that iteration's "
             "training step (forward / backward). r_step = ⟨∇S, Δθ⟩ / −⟨∇L, Δθ⟩ for the step taken, r_grad the "
             "same for −∇L: stiffness (S = mean ‖J‖²_F) bought per unit of loss removed, to first order; the "
             "median over all probes of the run up to that level. Values: median over seeds.", ""]
    tasks = sorted({r["task"] for r in runs})
    for task in tasks:
        trs = [r for r in runs if r["task"] == task]
        seeds = sorted({r["seed"] for r in trs})
        settings = list(dict.fromkeys(r["setting"] for r in trs))
        lines += [f"## {task} (seeds {', '.join(map(str, seeds))})", "",
                  "| train loss ≤ | setting | iteration | ρ(J) | Re λ_max | ‖J‖²_F | NFE fwd / bwd | r_step | r_grad |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for level in LEVELS.get(task, (1.0, 0.3, 0.1)):
            for s in settings:
                hits = []
                for run in (r for r in trs if r["setting"] == s):
                    hit = at_level(run, level)
                    if hit is None:
                        continue
                    upto = [r for r in run["rows"] if r["iteration"] <= hit["iteration"]]
                    hits.append((hit, _median([r["r_step"] for r in upto]), _median([r["r_grad"] for r in upto])))
                if not hits:
                    lines.append(f"| {level:g} | {s} | not reached | | | | | | |")
                    continue
                med = {k: statistics.median(h[0][k] for h in hits)
                       for k in ("iteration", "rho", "re_max", "fro", "nfe_forward", "nfe_backward")}
                r_step, r_grad = _median([h[1] for h in hits]), _median([h[2] for h in hits])
                lines.append(f"| {level:g} | {s} | {med['iteration']:.0f} | {med['rho']:.2f} | {med['re_max']:.2f} | "
                             f"{med['fro']:.1f} | {med['nfe_forward']:.0f} / {med['nfe_backward']:.0f} | "
                             f"{_f(r_step, '.3g')} | {_f(r_grad, '.3g')} |")
        lines.append("")
    hosts = sorted({r["machine"].get("cpu", "?") for r in runs})
    lines += [f"Machine: {', '.join(hosts)}; torch {torch.__version__}.", ""]
    return "\n".join(lines)


def _run_key(run: Mapping[str, Any]) -> tuple[Any, ...]:
    return run["task"], run["setting"], run["seed"], run["probe_every"], run["probe_size"]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits", choices=("digits", "fashion"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--optimizers", nargs="+", default=["snopt", "adam@0.01", "soap", "snopt+kinetic"],
                    help="settings: snopt, adam@LR, sgd@LR, soap, kron; '+kinetic' adds RNODE's kinetic 0.01")
    ap.add_argument("--probe-every", type=int, default=10)
    ap.add_argument("--probe-size", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=None, help="training iterations (default: the preset's)")
    ap.add_argument("--from-log", action="store_true", help="only rewrite the table from the log")
    ap.add_argument("--fresh", action="store_true", help="retrain the runs the log (or the committed copy) holds")
    args = ap.parse_args(argv)
    if not args.from_log:
        done = continue_log(LOG, RUNS, _run_key, fresh=args.fresh)
        for seed in args.seeds:
            for s in args.optimizers:
                if (args.task, s, seed, args.probe_every, args.probe_size) in done:
                    continue
                run = train(args.task, s, seed, args.probe_every, args.probe_size, args.iterations)
                with LOG.open("a") as fh:
                    fh.write(json.dumps(run) + "\n")
    runs = logged_runs(LOG, RUNS, trained=not args.from_log)
    OUT.write_text(table(runs))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
