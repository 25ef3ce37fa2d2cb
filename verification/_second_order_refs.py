"""Exact references for `snopt.second_order`, `hvp` and `ggn_vp`, and a peak-memory probe.

Everything is independent of snopt's adjoint code (DESIGN.md §5):

* `GridReference`: the loss L(x0, θ, t1) = Φ(x(t1)) of a fixed-grid RK4 solve (our pure-torch
  `references.rk_solve`, torchdiffeq's 3/8 rule) with n steps of size (t1 − t0)/n, as one
  flat function of z = [x0; θ; t1]. `torch.func.hessian` of it gives every block that
  `second_order(..., wrt_t1=True)` returns, exactly for that discretisation. The GGN is
  J_θᵀ Φ_xx J_θ with J_θ = `torch.func.jacrev` of θ ↦ x(t1) through the same solve.
* `ClosedFormReference`: the same blocks for dx/dt = A x + b from the `matrix_exp` solution.
* Test vector fields: `ConvField` (Conv2d on small images, optionally time-dependent) and
  `AffineField` (F = A0 x + b + t c with A0 fixed: θ = (b, c) enters linearly and never
  multiplies x, so x(t1) is affine in (x0, θ) jointly and the Gauss-Newton matrix is the
  exact Hessian).
* `peak_rss_mb`: peak resident memory (``VmHWM``, else ``ru_maxrss``) of one curvature product in a
  fresh Python process (``python -m verification._second_order_refs MODE STEPS``), for the memory
  flatness check and benchmarks/bench_second_order.py.
"""

import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchdiffeq
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import snopt
from verification.references import LinearField, linear_solution, rel_err, rk_solve
from verification.strategies import FieldSpec

LossFn = Callable[[Tensor], Tensor]
BLOCKS = ("loss", "grad_params", "grad_x0", "hess_params", "hess_x0", "hess_x0_params")
T1_BLOCKS = ("grad_t1", "hess_t1", "hess_t1_params")


# ----------------------------------------------------------------------------------------------
# Vector fields
# ----------------------------------------------------------------------------------------------

class ConvField(nn.Module):
    """F(t, x) = conv2(σ(conv1(x) [+ t·w_t])) on images x (B, C, H, W); 3×3 kernels, padding 1.

    Args:
        channels: C, the state's channels.
        hidden: Channels of the hidden layer.
        activation: ``"tanh"``, ``"softplus"`` or ``"silu"``.
        time_dependent: Add t times a learned per-channel vector to the hidden pre-activation.
        seed: Seed of the weights (drawn at scale 1/sqrt(fan_in)).
        dtype: Parameter dtype.
    """

    def __init__(self, channels: int, hidden: int, activation: str, time_dependent: bool, seed: int,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        acts: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus, "silu": nn.SiLU}
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, dtype=dtype)
        self.act = acts[activation]()
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, dtype=dtype)
        self.time_weight = nn.Parameter(torch.zeros(hidden, dtype=dtype)) if time_dependent else None
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(max(fan_in, 1)))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        h = self.conv1(x)
        if self.time_weight is not None:
            h = h + t.to(x.dtype) * self.time_weight.reshape(1, -1, 1, 1)
        out: Tensor = self.conv2(self.act(h))
        return out


class AffineField(nn.Module):
    """F(t, x) = x A0ᵀ + b + t c with A0 a fixed buffer; the parameters θ = (b, c) enter linearly.

    Args:
        a0: (d, d) fixed matrix.
        b: (d,) initial value of the parameter b.
        c: (d,) initial value of the parameter c.
    """

    a0: Tensor  # a buffer (registered in __init__)

    def __init__(self, a0: Tensor, b: Tensor, c: Tensor) -> None:
        super().__init__()
        self.register_buffer("a0", a0.detach().clone())
        self.b = nn.Parameter(b.detach().clone())
        self.c = nn.Parameter(c.detach().clone())

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = x @ self.a0.T + self.b + t.to(x.dtype) * self.c
        return out


class ImageCrossEntropy:
    """`snopt.losses.LinearCrossEntropy` on flattened images x (B, C, H, W) → (B, C·H·W), roots included."""

    def __init__(self, ce: Any) -> None:
        self.ce = ce

    def __call__(self, x: Tensor) -> Tensor:
        out: Tensor = self.ce(x.reshape(x.shape[0], -1))
        return out

    def hessian_roots(self, x: Tensor) -> Tensor:
        """The roots of the flat loss, reshaped over x."""
        r: Tensor = self.ce.hessian_roots(x.reshape(x.shape[0], -1))
        return r.reshape(r.shape[0], *x.shape)


# ----------------------------------------------------------------------------------------------
# Random test problems (hypothesis draws a frozen `Case`; `build` makes tensors from its seed)
# ----------------------------------------------------------------------------------------------

ACTIVATIONS = ("silu", "softplus", "tanh")


@dataclass(frozen=True)
class Case:
    """A small Neural ODE loss problem, reproducible from its printed fields.

    kind: ``"mlp"`` (`verification.strategies.MLPField`, state (batch, dim)), ``"conv"``
    (`ConvField`, state (batch, dim, 4, 4)), ``"affine"`` (`AffineField`) or ``"linear"``
    (`references.LinearField`, F = A x + b with θ = (A, b)). `loss` is ``"mse"``
    (`snopt.losses.MSELoss` to a random target) or ``"ce"`` (`snopt.losses.LinearCrossEntropy`
    of a random fixed readout with `classes` classes).
    """

    kind: str
    dim: int
    width: int
    activation: str
    time_dependent: bool
    batch: int
    t0: float
    t1: float
    loss: str
    seed: int
    scale: float = 1.0
    classes: int = 3

    def build(self, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Tensor, Tensor, LossFn]:
        """(func, x0, t_span, loss_fn)."""
        g = torch.Generator().manual_seed(self.seed)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

        func: nn.Module
        if self.kind == "mlp":
            func = FieldSpec(self.dim, self.width, self.activation, self.time_dependent, dtype, self.seed,
                             self.scale).build()
            x0 = randn(self.batch, self.dim)
        elif self.kind == "conv":
            func = ConvField(self.dim, self.width, self.activation, self.time_dependent, self.seed, dtype)
            x0 = randn(self.batch, self.dim, 4, 4)
        elif self.kind == "affine":
            func = AffineField(randn(self.dim, self.dim) * self.scale / math.sqrt(self.dim), randn(self.dim),
                               randn(self.dim))
            x0 = randn(self.batch, self.dim)
        elif self.kind == "linear":
            func = LinearField(randn(self.dim, self.dim) * self.scale / math.sqrt(self.dim), randn(self.dim))
            x0 = randn(self.batch, self.dim)
        else:
            raise ValueError(f"unknown kind {self.kind!r}")
        loss_fn: LossFn
        if self.loss == "mse":
            loss_fn = snopt.losses.MSELoss(randn(*x0.shape))
        else:
            d = x0[0].numel()
            ce = snopt.losses.LinearCrossEntropy(randn(self.classes, d), randn(self.classes),
                                                 torch.randint(0, self.classes, (self.batch,), generator=g))
            loss_fn = ImageCrossEntropy(ce) if self.kind == "conv" else ce
        t_span = torch.tensor([self.t0, self.t1], dtype=dtype)
        return func, x0, t_span, loss_fn

    def steps(self, step: float) -> int:
        """Number of fixed steps of size `step` in the span (which must be a multiple of it)."""
        k = round(abs(self.t1 - self.t0) / step)
        assert abs(k * step - abs(self.t1 - self.t0)) < 1e-12, (self, step)
        return k


@st.composite
def cases(draw: st.DrawFn, kind: str = "mlp", *, lattice: float = 1 / 8, min_units: int = 1, max_units: int = 4,
          max_batch: int = 8, max_dim: int = 3, max_width: int = 8, max_scale: float = 1.5) -> Case:
    """Random `Case`s: span `min_units`–`max_units` × `lattice` (a power-of-two step divides it), ± direction."""
    t0 = lattice * draw(st.integers(min_value=-4, max_value=4))
    units = draw(st.integers(min_value=min_units, max_value=max_units))
    sign = draw(st.sampled_from((1.0, 1.0, -1.0)))
    return Case(kind=kind, dim=draw(st.integers(min_value=1, max_value=max_dim)),
                width=draw(st.integers(min_value=1 if kind == "conv" else 2, max_value=max_width)),
                activation=draw(st.sampled_from(ACTIVATIONS)), time_dependent=draw(st.booleans()),
                batch=draw(st.integers(min_value=1, max_value=max_batch)), t0=t0, t1=t0 + sign * lattice * units,
                loss=draw(st.sampled_from(("mse", "ce"))), seed=draw(st.integers(min_value=0, max_value=2**31 - 1)),
                scale=draw(st.floats(min_value=0.25, max_value=max_scale)),
                classes=draw(st.integers(min_value=2, max_value=4)))


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------

def _split(module: nn.Module) -> tuple[list[str], list[torch.Size], list[int], Tensor]:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    return names, shapes, sizes, theta


@dataclass
class GridReference:
    """L(z) = Φ(x(t1)), z = [x0; θ; t1], through `steps` RK4 steps of size (t1 − t0)/steps.

    With t_span = (t0, t1) and h = (t1 − t0)/steps this is, to rounding, the loss of
    ``torchdiffeq.odeint(..., method="rk4", options={"step_size": h})``, so snopt's
    differentiate-then-discretise result on that grid differs from these exact derivatives
    of the discretisation by O(h⁴).
    """

    module: nn.Module
    x0: Tensor
    t_span: Tensor
    loss_fn: LossFn
    steps: int

    def __post_init__(self) -> None:
        self.names, self.shapes, self.sizes, self.theta = _split(self.module)
        self.x0 = self.x0.detach()
        self.t_span = self.t_span.detach()
        self.n = self.x0.numel()
        self.p = self.theta.numel()

    def params(self, theta: Tensor) -> dict[str, Tensor]:
        """Unflatten θ into a name → tensor dict (for `functional_call`)."""
        parts = torch.split(theta, self.sizes)
        return {n: q.reshape(s) for n, q, s in zip(self.names, parts, self.shapes, strict=True)}

    def x1(self, x0: Tensor, theta: Tensor, t1: Tensor) -> Tensor:
        """x(t1) flat, as a function of flat x0, θ and t1."""
        t = torch.stack([self.t_span[0], t1])
        ys = rk_solve(self.module, self.params(theta), x0.reshape(self.x0.shape), t, steps=self.steps)
        return ys[-1].reshape(-1)

    def loss_flat(self, z: Tensor) -> Tensor:
        """L([x0; θ; t1])."""
        n, p = self.n, self.p
        return self.loss_fn(self.x1(z[:n], z[n:n + p], z[n + p]).reshape(self.x0.shape))

    def z(self) -> Tensor:
        """The point [x0; θ; t1] at which everything is evaluated."""
        return torch.cat([self.x0.detach().reshape(-1), self.theta, self.t_span[1:].detach()])

    def blocks(self) -> dict[str, Tensor]:
        """Loss, gradients and every Hessian block of `second_order(..., wrt_t1=True)`."""
        z = self.z()
        g = torch.func.grad(self.loss_flat)(z)
        h = hessian(self.loss_flat)(z)
        return _split_blocks(self.loss_flat(z), g, h, self.n, self.p, self.x0.shape)

    def ggn(self) -> Tensor:
        """J_θᵀ Φ_xx J_θ of θ ↦ x(t1) on the same grid (p × p)."""
        x0, t1 = self.x0.reshape(-1), self.t_span[1]
        jac = jacrev(lambda th: self.x1(x0, th, t1))(self.theta)
        x1 = self.x1(x0, self.theta, t1).detach()
        phi_xx = hessian(lambda x: self.loss_fn(x.reshape(self.x0.shape)))(x1)
        out: Tensor = jac.T @ phi_xx @ jac
        return out


def _split_blocks(loss: Tensor, g: Tensor, h: Tensor, n: int, p: int, x_shape: torch.Size) -> dict[str, Tensor]:
    return {
        "loss": loss.detach(), "grad_x0": g[:n].reshape(x_shape), "grad_params": g[n:n + p],
        "hess_x0": h[:n, :n], "hess_x0_params": h[:n, n:n + p], "hess_params": h[n:n + p, n:n + p],
        "grad_t1": g[n + p], "hess_t1": h[n + p, n + p], "hess_t1_params": h[n + p, n:n + p],
    }


@dataclass
class ClosedFormReference:
    """The same blocks for dx/dt = A x + b (θ = [vec A; b]) from the `matrix_exp` solution."""

    a: Tensor
    b: Tensor
    x0: Tensor
    t_span: Tensor
    loss_fn: LossFn

    def blocks(self) -> dict[str, Tensor]:
        """Loss, gradients and every Hessian block of `second_order(..., wrt_t1=True)`."""
        d = self.a.shape[0]
        n, p = self.x0.numel(), d * d + d

        def loss_flat(z: Tensor) -> Tensor:
            a = z[n:n + d * d].reshape(d, d)
            b = z[n + d * d:n + p]
            t = torch.stack([self.t_span[0], z[n + p]])
            return self.loss_fn(linear_solution(a, b, z[:n].reshape(self.x0.shape), t)[-1])

        z = torch.cat([self.x0.reshape(-1), self.a.reshape(-1), self.b, self.t_span[1:]]).detach()
        return _split_blocks(loss_flat(z), torch.func.grad(loss_flat)(z), hessian(loss_flat)(z), n, p,
                             self.x0.shape)

    def ggn(self) -> Tensor:
        """J_θᵀ Φ_xx J_θ of θ = [vec A; b] ↦ x(t1) (p × p)."""
        d = self.a.shape[0]

        def x1(theta: Tensor) -> Tensor:
            return linear_solution(theta[:d * d].reshape(d, d), theta[d * d:], self.x0, self.t_span)[-1].reshape(-1)

        theta = torch.cat([self.a.reshape(-1), self.b]).detach()
        jac = jacrev(x1)(theta)
        phi_xx = hessian(lambda x: self.loss_fn(x.reshape(self.x0.shape)))(x1(theta).detach())
        out: Tensor = jac.T @ phi_xx @ jac
        return out


def result_blocks(so: Any) -> dict[str, Tensor]:
    """The fields of a `SecondOrderResult` as a dict (t1 fields only when present)."""
    out = {k: getattr(so, k) for k in BLOCKS}
    out.update({k: getattr(so, k) for k in T1_BLOCKS if getattr(so, k) is not None})
    return out


def block_errors(got: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    """`rel_err` of every block present in `got` against `ref`."""
    return {k: rel_err(v.reshape(ref[k].shape), ref[k]) for k, v in got.items()}


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
    names, shapes, sizes, theta = _split(func)

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
