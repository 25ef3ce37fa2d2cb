"""Peak RSS of one curvature product in a fresh process (``python -m verification._second_order_refs MODE STEPS``).

For the memory flatness check (test_second_order_memory.py) and benchmarks/bench_second_order.py.
The module keeps its historical name (the committed benchmark tables cite the command); the exact
references that used to live here are public now: `snopt.testing.GridReference`,
`snopt.testing.ClosedFormReference`, and the problems of `snopt.testing.SecondOrderProblem`.
RSS is what the saved-tensor hooks of `snopt.testing.saved_tensor_bytes` cannot see: these
products run under torch.func and inside solver internals.
"""

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchdiffeq
from torch import Tensor, nn
from torch.func import functional_call

import snopt
from snopt.testing import flat_params

LossFn = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# Peak memory of one curvature product, in a fresh process
# ----------------------------------------------------------------------------------------------

MEMORY_MODES = ("hvp", "ggn_vp", "grad", "reverse_over_reverse", "forward_over_reverse")


class _MLP(nn.Module):
    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def memory_problem(dim: int = 16, width: int = 64, batch: int = 64, dtype: torch.dtype = torch.float64,
                   ) -> tuple[nn.Module, Tensor, Tensor, LossFn, Tensor]:
    """The memory benchmark's problem: MLP field (width 64), batch 64, MSE loss, t ∈ [0, 1]."""
    torch.manual_seed(0)
    func = _MLP(dim, width).to(dtype)
    x0 = torch.randn(batch, dim, dtype=dtype)
    loss_fn = snopt.losses.MSELoss(torch.randn(batch, dim, dtype=dtype))
    p = sum(q.numel() for q in func.parameters())
    v = torch.randn(p, dtype=dtype)
    return func, x0, torch.tensor([0.0, 1.0], dtype=dtype), loss_fn, v


def curvature_product(mode: str, steps: int, problem: tuple[nn.Module, Tensor, Tensor, LossFn, Tensor]) -> Tensor:
    """One product on `problem` with `steps` RK4 steps, by snopt or by backprop through the solver.

    Modes: ``hvp`` / ``ggn_vp`` (snopt), ``grad`` (`snopt.odeint` + backward), and the
    backprop-through-solver baselines through plain ``torchdiffeq.odeint``:
    ``reverse_over_reverse`` (double backward) and ``forward_over_reverse``
    (``torch.func.jvp`` of ``torch.func.grad``).
    """
    func, x0, t, loss_fn, v = problem
    opts = {"step_size": float(t[1] - t[0]) / steps}
    if mode in ("hvp", "ggn_vp"):
        fn = snopt.hvp if mode == "hvp" else snopt.ggn_vp
        return fn(func, x0, t, loss_fn, v, method="rk4", options=opts)
    if mode == "grad":
        params = [q for q in func.parameters() if q.requires_grad]
        loss = loss_fn(snopt.odeint(func, x0, t, method="rk4", options=opts)[-1])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    named = [(n, q) for n, q in func.named_parameters() if q.requires_grad]
    names, shapes, sizes = [n for n, _ in named], [q.shape for _, q in named], [q.numel() for _, q in named]
    theta = flat_params(func)

    def loss_of(th: Tensor) -> Tensor:
        ps = {n: q.reshape(s) for n, q, s in zip(names, torch.split(th, sizes), shapes, strict=True)}

        def f(tt: Tensor, x: Tensor) -> Tensor:
            out: Tensor = functional_call(func, ps, (tt, x))
            return out

        return loss_fn(torchdiffeq.odeint(f, x0, t, method="rk4", options=opts)[-1])

    if mode == "reverse_over_reverse":
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(th), th, create_graph=True)
        (hv,) = torch.autograd.grad(g, th, v)
        return hv
    if mode == "forward_over_reverse":
        out: Tensor = torch.func.jvp(torch.func.grad(loss_of), (theta,), (v,))[1]
        return out
    raise ValueError(f"`mode` must be one of {MEMORY_MODES}; got {mode!r}.")


def _peak_rss_mb() -> float:
    """Peak resident set size of this process's own address space, in MiB.

    Linux's ``VmHWM`` (/proc/self/status) belongs to the address space, which ``execve`` replaces,
    so it counts only this interpreter. ``ru_maxrss`` (the fallback elsewhere) is carried across
    ``fork``/``vfork`` + ``execve``: a child of a 500 MB parent starts at 500 MB.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(mode: str, steps: int) -> None:
    torch.set_num_threads(1)
    problem = memory_problem()
    curvature_product(mode, 2, problem)  # warm-up: imports, lazy initialisation
    start = time.perf_counter()
    out = curvature_product(mode, steps, problem)
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "steps": steps, "peak_rss_mb": _peak_rss_mb(), "seconds": seconds,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "norm": float(out.norm())}))


def peak_rss_mb(mode: str, steps: int, timeout: float = 600.0) -> dict[str, Any]:
    """Run one product in a fresh interpreter and return its peak RSS (MiB), time (s) and result norm."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "verification._second_order_refs", mode, str(steps)], cwd=root,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {mode} {steps} failed:\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
