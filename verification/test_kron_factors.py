"""Claim: SNOpt's Kronecker factors A, G are the time integrals of DESIGN.md §2; A ⊗ G is exact where KFAC is.

The factors are those gathered during the adjoint solve. Definition checked ("expand",
``cotangent="batch_mean"``; B batch size, L locations per sample):

    A = ∫_{t0}^{t1} mean_{b,l}[ā āᵀ] dt,    G = ∫_{t0}^{t1} mean_{b,l}[(B·√L·g)(B·√L·g)ᵀ] dt,

with ā the layer input (patches for Conv2d, a 1 appended for the bias) and g the cotangent at the
layer output when F is pulled back by the adjoint a(t) = ∂L/∂x(t).

**Dense reference** (`dense_factors`, independent of `snopt.curvature` and of snopt's adjoint):
x(t) and a(t) come from torchdiffeq's dopri5 at rtol = atol = 1e-11 on a dense time grid (x
forward, (x, a) backward with a `torch.func.vjp` of F); at every grid time the layer inputs are
read by forward hooks and the output cotangents by `torch.func.vjp` of F with respect to zero
perturbations added to every layer's output; Conv2d patches come from `F.unfold`. The integral is
Simpson's rule (fine grid, error O(h⁴)) or, for the same-quadrature checks, exactly the Riemann sum
the collector forms (rk4: one point per backward step, at its start t0 + k·h, k = 1..n; dopri5 with
a sampling grid: the grid points t0 + k·h, k = 0..n−1, each with weight h).

Three kinds of checks:

* same quadrature: collector == reference to the solver's error (O(h⁴) for rk4; ~rtol for dopri5);
* convergence: collector → Simpson reference at rate ~1 in h (a Riemann sum is first order);
* exact regime: one Euler step, one datum, MSE, layer inputs independent of x ⇒ A ⊗ G (GGN-root
  factors, `snopt.curvature.ggn_factors`) == the GGN block of `snopt.second_order(gauss_newton=True)`;
  outside it KFAC is not exact and EKFAC (exact diagonal in the KFAC eigenbasis) is closer.

Each check is shown to fail on a planted bug (dropping √L, weighting by 1 instead of dt, folding the
last rk4 stage instead of the first); the exact-regime check failed (error 2.0) on `ggn_factors` summing
A over the k root solves, fixed in the same change.
"""

import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import torchdiffeq
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import snopt
import snopt.curvature._collector as collector_module
from snopt.curvature import FactorCollector, KronFactors, ggn_factors, kron_block
from snopt.losses import MSELoss
from snopt.testing import rel_err

DT = torch.float64
LossFn = Callable[[Tensor], Tensor]
Factors = dict[str, tuple[Tensor, Tensor]]

# Same quadrature, rk4 with h = 1/16 on [0, 1]: the collector reads x and a from the backward rk4
# re-solve, whose global error is O(h⁴) (h⁴ = 1.5e-5, times an error constant ~1e-2 for these O(1)
# fields); measured ≤ 4.4e-7 (MLP, Conv2d, batch 1–3) and falling 17× when h halves; 2e-6 also covers
# the hypothesis draws (h = 1/32 on [0, 1/2], thorough profile). Planted bugs give errors ≥ 1e-3.
TOL_SAME_GRID_RK4 = 2e-6
# Same quadrature, dopri5 at rtol 1e-9 / atol 1e-11 (backward re-solve error ~10·rtol): measured ≤ 6e-10.
TOL_SAME_GRID_DOPRI5 = 1e-7
# KFAC exact regime: only rounding (measured ≤ 1.6e-15); the contract is 1e-7.
TOL_EXACT = 1e-7




# ----------------------------------------------------------------------------------------------
# Vector fields
# ----------------------------------------------------------------------------------------------

def _init_(module: nn.Module, seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=DT) / math.sqrt(fan_in))


class MLPField(nn.Module):
    """F(t, x) = W2 tanh(W1 [x; t] + b1) + b2 (t appended if `time_dependent`; biases optional)."""

    def __init__(self, dim: int, width: int, *, seed: int, time_dependent: bool = True, bias: bool = True,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.time_dependent = time_dependent
        self.lin1 = nn.Linear(dim + int(time_dependent), width, bias=bias, dtype=DT)
        self.lin2 = nn.Linear(width, dim, bias=bias, dtype=DT)
        _init_(self, seed, scale)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        if self.time_dependent:
            x = torch.cat([x, t.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)
        out: Tensor = self.lin2(torch.tanh(self.lin1(x)))
        return out


class ConvField(nn.Module):
    """F(t, x) = conv2(tanh(conv1(x) + t·w)) on images (B, C, H, W); conv1 k×k (odd k), conv2 3×3, "same" size."""

    def __init__(self, channels: int, hidden: int, *, seed: int, kernel: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, kernel, padding=kernel // 2, bias=bias, dtype=DT)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, dtype=DT)
        self.w_t = nn.Parameter(torch.zeros(hidden, dtype=DT))
        _init_(self, seed)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        h = self.conv1(x) + t.to(x.dtype) * self.w_t.reshape(1, -1, 1, 1)
        out: Tensor = self.conv2(torch.tanh(h))
        return out


class ConstInputField(nn.Module):
    """F(t, x) = W2 tanh(W1 c + b1) + b2 with a constant buffer c: no layer input depends on x or t."""

    def __init__(self, c_dim: int, width: int, dim: int, *, seed: int) -> None:
        super().__init__()
        self.register_buffer("c", torch.randn(c_dim, generator=torch.Generator().manual_seed(seed + 7), dtype=DT))
        self.lin1 = nn.Linear(c_dim, width, dtype=DT)
        self.lin2 = nn.Linear(width, dim, dtype=DT)
        _init_(self, seed)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.lin2(torch.tanh(self.lin1(self.c)))
        return out.expand_as(x)


def mse_loss(target: Tensor) -> LossFn:
    """Batch-mean loss L = mean_b ½‖y_b − target_b‖² (the batch is the leading dimension)."""
    def loss(y: Tensor) -> Tensor:
        return 0.5 * (y - target).pow(2).reshape(y.shape[0], -1).sum(1).mean()
    return loss


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ----------------------------------------------------------------------------------------------
# Dense reference (no snopt code involved)
# ----------------------------------------------------------------------------------------------

def _kron_layers(func: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in func.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def layer_io(func: nn.Module, t: Tensor, x: Tensor, a: Tensor) -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    """Per layer: (module, input, output cotangent) of F at (t, x) pulled back by the cotangent `a`."""
    layers = _kron_layers(func)
    inputs: dict[str, Tensor] = {}
    shapes: dict[str, torch.Size] = {}

    def record(name: str) -> Any:
        def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            inputs[name] = inp[0].detach()
            shapes[name] = out.shape
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in layers]
    try:
        with torch.no_grad():
            func(t, x)
    finally:
        for h in handles:
            h.remove()

    def perturbed(deltas: dict[str, Tensor]) -> Tensor:
        hs = [m.register_forward_hook(lambda mod, inp, out, n=n: out + deltas[n]) for n, m in layers]
        try:
            out: Tensor = func(t, x)
        finally:
            for h in hs:
                h.remove()
        return out

    zeros = {n: torch.zeros(s, dtype=x.dtype) for n, s in shapes.items()}
    with torch.no_grad():
        _, pull = cast(tuple[Any, Callable[[Tensor], tuple[Any, ...]]], torch.func.vjp(perturbed, zeros))
        (cot,) = pull(a)
    return {n: (m, inputs[n], cot[n].detach()) for n, m in layers}


def layer_rows(m: nn.Module, inp: Tensor, cot: Tensor) -> tuple[Tensor, Tensor]:
    """(ā, g) with one row per (batch element, location); written from the layer definitions."""
    if isinstance(m, nn.Linear):
        a_bar, g = inp.reshape(-1, m.in_features), cot.reshape(-1, m.out_features)
    else:
        assert isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        patches = F.unfold(inp, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        a_bar = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        g = cot.permute(0, 2, 3, 1).reshape(-1, m.out_channels)
    if m.bias is not None:
        a_bar = torch.cat([a_bar, torch.ones(a_bar.shape[0], 1, dtype=a_bar.dtype)], dim=1)
    return a_bar, g


def dense_path(func: nn.Module, x0: Tensor, loss_fn: LossFn, ts: Tensor, *, tol: float = 1e-11,
               ) -> tuple[Tensor, Tensor]:
    """x(t) and the adjoint a(t) = ∂L/∂x(t) at every time of the increasing grid `ts` (dopri5, tight)."""
    with torch.no_grad():
        xs = torchdiffeq.odeint(func, x0, ts, rtol=tol, atol=tol, method="dopri5")
        a1 = torch.func.grad(loss_fn)(xs[-1])

        def backward_rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            x, a = state
            f, pull = cast(tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]],
                           torch.func.vjp(lambda x_: func(t, x_), x))
            return f, -pull(a)[0]

        _, adj = torchdiffeq.odeint(backward_rhs, (xs[-1], a1), ts.flip(0), rtol=tol, atol=tol, method="dopri5")
    return xs, adj.flip(0)


def dense_factors(func: nn.Module, x0: Tensor, loss_fn: LossFn, ts: Tensor, weights: Sequence[float]) -> Factors:
    """Σ_k w_k · (mean ā āᵀ, mean (B√L g)(B√L g)ᵀ) at the times `ts` (the definition, as a quadrature)."""
    xs, adj = dense_path(func, x0, loss_fn, ts)
    batch = x0.shape[0]
    out: Factors = {}
    for k, w in enumerate(weights):
        if w == 0.0:
            continue
        for name, (m, inp, cot) in layer_io(func, ts[k], xs[k], adj[k]).items():
            a_bar, g = layer_rows(m, inp, cot)
            locations = g.shape[0] / batch
            g = g * batch * math.sqrt(locations)
            a_term, g_term = w * (a_bar.T @ a_bar) / a_bar.shape[0], w * (g.T @ g) / g.shape[0]
            if name in out:
                out[name] = (out[name][0] + a_term, out[name][1] + g_term)
            else:
                out[name] = (a_term, g_term)
    return out


def simpson(t0: float, t1: float, n: int) -> tuple[Tensor, list[float]]:
    """Simpson's rule on n (even) intervals: times and weights."""
    h = (t1 - t0) / n
    w = [1.0] + [4.0 if k % 2 else 2.0 for k in range(1, n)] + [1.0]
    return torch.linspace(t0, t1, n + 1, dtype=DT), [wk * h / 3 for wk in w]


def riemann(t0: float, t1: float, n: int, *, right: bool) -> tuple[Tensor, list[float]]:
    """Right (points t0+h..t1) or left (t0..t1−h) Riemann sum on n intervals."""
    h = (t1 - t0) / n
    w = [0.0] + [h] * n if right else [h] * n + [0.0]
    return torch.linspace(t0, t1, n + 1, dtype=DT), w


# ----------------------------------------------------------------------------------------------
# What snopt collects
# ----------------------------------------------------------------------------------------------

def collect(func: nn.Module, x0: Tensor, loss_fn: LossFn, *, method: str, h: float, t1: float = 1.0,
            **kw: Any) -> dict[str, KronFactors]:
    """The factors a `FactorCollector` gathers during one forward/backward of an ODEBlock.

    rk4: step size h, one fold per backward step. dopri5 (rtol 1e-9): sampling grid of spacing h,
    as `SNOpt(sampling="grid")` sets it up (grid times forced into the backward solve).
    """
    if method == "rk4":
        block = snopt.ODEBlock(func, t1=t1, method="rk4", options={"step_size": h})
    else:
        block = snopt.ODEBlock(func, t1=t1, method=method, rtol=1e-9, atol=1e-11)
    collector = FactorCollector(func, mode="ode", **kw)
    if method != "rk4":
        n = round(t1 / h)
        collector.grid_h, collector.grid_t0 = h, 0.0
        block.adjoint_options = {"step_t": torch.arange(1, n, dtype=DT) * h}
    block.observer = collector
    collector.enabled = True
    try:
        loss_fn(block(x0)).backward()  # type: ignore[no-untyped-call]
    finally:
        collector.remove()
        func.zero_grad(set_to_none=True)
    return collector.kron_factors()


def factor_errors(got: dict[str, KronFactors], ref: Factors) -> dict[str, float]:
    assert sorted(got) == sorted(ref)
    errs = {}
    for name, (a_ref, g_ref) in ref.items():
        errs[f"{name}.A"] = rel_err(got[name].A, a_ref)
        errs[f"{name}.G"] = rel_err(got[name].G, g_ref)
    return errs


def mlp_problem(batch: int = 3, seed: int = 0) -> tuple[nn.Module, Tensor, LossFn]:
    func = MLPField(3, 6, seed=seed)
    return func, _randn(batch, 3, seed=seed + 1), mse_loss(_randn(batch, 3, seed=seed + 2))


def conv_problem(batch: int = 2, seed: int = 0) -> tuple[nn.Module, Tensor, LossFn]:
    func = ConvField(2, 3, seed=seed)
    return func, _randn(batch, 2, 4, 4, seed=seed + 1), mse_loss(_randn(batch, 2, 4, 4, seed=seed + 2))


PROBLEMS = {"mlp-b1": lambda: mlp_problem(1), "mlp-b3": lambda: mlp_problem(3),
            "conv-b1": lambda: conv_problem(1), "conv-b2": lambda: conv_problem(2)}


def same_grid_errors(name: str, method: str, h: float = 1 / 16) -> dict[str, float]:
    func, x0, loss_fn = PROBLEMS[name]()
    got = collect(func, x0, loss_fn, method=method, h=h)
    n = round(1 / h)
    assert all(f.steps == n for f in got.values()), {k: f.steps for k, f in got.items()}
    ts, w = riemann(0.0, 1.0, n, right=(method == "rk4"))
    return factor_errors(got, dense_factors(func, x0, loss_fn, ts, w))


# ----------------------------------------------------------------------------------------------
# Same quadrature: the collector forms exactly the definition's Riemann sum
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_rk4_factors_equal_definition_on_the_same_grid(name: str) -> None:
    coarse, fine = max(same_grid_errors(name, "rk4", 1 / 8).values()), max(same_grid_errors(name, "rk4").values())
    assert fine < TOL_SAME_GRID_RK4, (coarse, fine)
    # What is left is the rk4 re-solve's O(h⁴) error, not a quadrature mismatch: it falls ~16× per halving.
    assert coarse / fine > 10, (coarse, fine)


@pytest.mark.parametrize("name", ["mlp-b3", "conv-b2"])
def test_dopri5_grid_sampling_equals_definition_on_the_same_grid(name: str) -> None:
    errs = same_grid_errors(name, "dopri5")
    assert max(errs.values()) < TOL_SAME_GRID_DOPRI5, errs


@given(dim=st.integers(1, 4), width=st.integers(1, 7), batch=st.integers(1, 6), bias=st.booleans(),
       time_dependent=st.booleans(), seed=st.integers(0, 2**20))
def test_factors_equal_definition_over_shapes_and_batches(dim: int, width: int, batch: int, bias: bool,
                                                         time_dependent: bool, seed: int) -> None:
    func = MLPField(dim, width, seed=seed, bias=bias, time_dependent=time_dependent)
    x0, target = _randn(batch, dim, seed=seed + 1), _randn(batch, dim, seed=seed + 2)
    loss_fn = mse_loss(target)
    # h = 1/32 (16 steps on [0, 1/2]): the draws include fields with unit-variance weights on 1-D
    # inputs, whose rk4 error at h = 1/16 reached 9e-6 (thorough profile); at 1/32 it is 16× smaller.
    got = collect(func, x0, loss_fn, method="rk4", h=1 / 32, t1=0.5)
    assert sorted(got) == ["lin1", "lin2"]
    for name, f in got.items():
        m = func.get_submodule(name)
        assert isinstance(m, nn.Linear)
        assert f.steps == 16 and f.rows_a == 16 * batch and f.A.shape[0] == m.in_features + int(bias)
    ts, w = riemann(0.0, 0.5, 16, right=True)
    errs = factor_errors(got, dense_factors(func, x0, loss_fn, ts, w))
    assert max(errs.values()) < TOL_SAME_GRID_RK4, errs


@given(channels=st.integers(1, 2), hidden=st.integers(1, 3), kernel=st.sampled_from([1, 3]), bias=st.booleans(),
       height=st.integers(2, 4), width=st.integers(2, 4), batch=st.integers(1, 3), seed=st.integers(0, 2**20))
def test_conv_factors_equal_definition_over_shapes_and_batches(channels: int, hidden: int, kernel: int, bias: bool,
                                                              height: int, width: int, batch: int,
                                                              seed: int) -> None:
    func = ConvField(channels, hidden, seed=seed, kernel=kernel, bias=bias)
    x0 = _randn(batch, channels, height, width, seed=seed + 1)
    loss_fn = mse_loss(_randn(batch, channels, height, width, seed=seed + 2))
    got = collect(func, x0, loss_fn, method="rk4", h=1 / 32, t1=0.5)
    assert got["conv1"].rows_a == 16 * batch * height * width
    assert got["conv1"].A.shape[0] == channels * kernel**2 + int(bias)
    ts, w = riemann(0.0, 0.5, 16, right=True)
    errs = factor_errors(got, dense_factors(func, x0, loss_fn, ts, w))
    assert max(errs.values()) < TOL_SAME_GRID_RK4, errs


# ----------------------------------------------------------------------------------------------
# Convergence to the integral: rate ~1 (left/right Riemann sums are first order)
# ----------------------------------------------------------------------------------------------

STEPS = (1 / 8, 1 / 16, 1 / 32, 1 / 64)


def convergence(name: str, method: str) -> tuple[dict[float, float], float]:
    """Max over layers/factors of the relative error vs Simpson (n = 128) per h, and the fitted rate."""
    func, x0, loss_fn = PROBLEMS[name]()
    ref = dense_factors(func, x0, loss_fn, *simpson(0.0, 1.0, 128))
    errs = {h: max(factor_errors(collect(func, x0, loss_fn, method=method, h=h), ref).values()) for h in STEPS}
    lx = torch.tensor([math.log(h) for h in STEPS], dtype=DT)
    ly = torch.tensor([math.log(errs[h]) for h in STEPS], dtype=DT)
    slope = float(((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).pow(2).sum())
    return errs, slope


@pytest.mark.parametrize(("name", "method"), [("mlp-b3", "rk4"), ("mlp-b3", "dopri5"), ("conv-b2", "rk4")])
def test_factors_converge_to_the_integral_at_first_order(name: str, method: str) -> None:
    # Simpson on 128 intervals is accurate to ~1e-9 relative, far below the collector's O(h) error
    # (8.5e-3 MLP, 1.2e-2 Conv2d at h = 1/64; halving exactly with h). Measured slopes 0.995–1.005.
    errs, slope = convergence(name, method)
    assert 0.9 < slope < 1.1, (errs, slope)
    assert errs[STEPS[-1]] < 2e-2, errs


# ----------------------------------------------------------------------------------------------
# Planted bugs: each check above fails on them
# ----------------------------------------------------------------------------------------------

def test_dropping_sqrt_locations_fails_the_conv_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collector_module, "math", SimpleNamespace(sqrt=lambda v: 1.0))
    errs = same_grid_errors("conv-b2", "rk4")
    # G loses its factor L = 16: relative error 1 − 1/16 on the conv layers' G; A is untouched.
    assert errs["conv1.G"] > 0.9 and errs["conv2.G"] > 0.9 and errs["conv1.A"] < TOL_SAME_GRID_RK4, errs
    assert errs["conv1.G"] > 1e3 * TOL_SAME_GRID_RK4


def test_weight_one_instead_of_dt_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # not re-exported by the module, so read from its namespace (the same binding the collector calls)
    real: Callable[..., None] = vars(collector_module)["accumulate_"]
    monkeypatch.setattr(collector_module, "accumulate_", lambda f, a, g, w: real(f, a, g, 1.0))
    errs = same_grid_errors("mlp-b3", "rk4")
    assert min(errs.values()) > 1.0, errs  # factors 8× too large


def test_folding_the_wrong_stage_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fold the latest evaluation at the *end* of each rk4 step (its 4th stage) instead of its start.
    import snopt.adjoint._function as fn

    def late(self: Any, t: Tensor, state: Any, dt: Tensor) -> None:
        self.pending = None
        self.count = 0
        self.late_dt = dt

    real_call = fn._BackwardDynamics.__call__

    def call(self: Any, t: Tensor, state: Any) -> Any:
        out = real_call(self, t, state)
        if getattr(self, "late_dt", None) is not None:
            self.count += 1
            if self.count == 4:
                dt, self.late_dt = self.late_dt, None
                self.observer.on_backward_step(t, dt)
        return out

    monkeypatch.setattr(fn._BackwardDynamics, "_on_step_start", late)
    monkeypatch.setattr(fn._BackwardDynamics, "__call__", call)
    errs = same_grid_errors("mlp-b3", "rk4")
    assert max(errs.values()) > 1e-3, errs


# ----------------------------------------------------------------------------------------------
# Exact regime: A ⊗ G == the GGN block
# ----------------------------------------------------------------------------------------------

def ggn_layer_block(hess: Tensor, func: nn.Module, layer: str) -> Tensor:
    """The block of a p×p matrix (`parameters()` order) of one layer, in the row-major [W, b] order."""
    offsets: dict[str, tuple[int, torch.Size]] = {}
    off = 0
    for n, p in func.named_parameters():
        offsets[n] = (off, p.shape)
        off += p.numel()
    w_off, w_shape = offsets[f"{layer}.weight"]
    d_out, k = w_shape[0], w_shape[1:].numel()
    b_off = offsets[f"{layer}.bias"][0] if f"{layer}.bias" in offsets else None
    idx: list[int] = []
    for i in range(d_out):
        idx += [w_off + i * k + j for j in range(k)]
        if b_off is not None:
            idx.append(b_off + i)
    perm = torch.tensor(idx)
    return hess[perm][:, perm]


def kfac_errors(func: nn.Module, x0: Tensor, target: Tensor, *, method: str, t1: float,
                options: dict[str, Any] | None = None) -> dict[str, tuple[float, float]]:
    """Per layer: (‖A⊗G − GGN‖/‖GGN‖, ‖EKFAC − GGN‖/‖GGN‖) with GGN-root factors and MSE."""
    loss = MSELoss(target)
    block = snopt.ODEBlock(func, t1=t1, method=method, options=options, rtol=1e-10, atol=1e-12)
    factors = ggn_factors(block, x0, loss)
    so = snopt.second_order(func, x0, torch.tensor([0.0, t1], dtype=DT), loss, gauss_newton=True,
                            rtol=1e-10, atol=1e-12)
    out = {}
    for name, f in factors.items():
        ggn = ggn_layer_block(so.hess_params, func, name)
        kfac = kron_block(f, order="row")
        q = torch.kron(torch.linalg.eigh(f.G)[1], torch.linalg.eigh(f.A)[1])  # eigenbasis in row order
        ekfac = q @ torch.diag(torch.diagonal(q.T @ ggn @ q)) @ q.T
        out[name] = (rel_err(kfac, ggn), rel_err(ekfac, ggn))
    return out


def test_kfac_is_the_exact_ggn_block_for_one_euler_step_one_datum_mse() -> None:
    # Why this regime is exact: F = W2 tanh(W1 c + b1) + b2 does not depend on x, so F_x = 0, every
    # adjoint root y_k(t) is constant, and so are the layer inputs ā and output cotangents g_k.
    # Then the GGN block is Σ_k vec(∫g_k āᵀdt) vec(∫g_k āᵀdt)ᵀ = T ā āᵀ ⊗ T Σ_k g_k g_kᵀ = A ⊗ G
    # for one datum at one location. It also sidesteps the one subtlety of a single Euler step:
    # the continuous adjoint's backward Euler step evaluates F at the backward step's start
    # (t1, x(t1)), not at (t0, x0) as the forward step did; with layer inputs independent of x
    # that makes no difference. The reference GGN comes from `second_order(gauss_newton=True)`
    # (dopri5, integrating polynomials in t exactly here).
    func = ConstInputField(2, 4, 3, seed=3)
    x0, target = _randn(1, 3, seed=4), _randn(1, 3, seed=5)
    errs = kfac_errors(func, x0, target, method="euler", t1=0.75, options={"step_size": 0.75})
    assert set(errs) == {"lin1", "lin2"}
    assert max(e for pair in errs.values() for e in pair) < TOL_EXACT, errs


def test_kfac_is_not_exact_outside_that_regime_and_ekfac_is_closer() -> None:
    # Layer inputs that depend on x(t) (and a batch of 3): ā and g vary in time and over the batch,
    # so A ⊗ G ≠ GGN; EKFAC (the GGN's own diagonal in the KFAC eigenbasis) is the Frobenius-best
    # matrix diagonal in that basis, KFAC is one such matrix: EKFAC must be closer. Measured: KFAC
    # 4.7e-2 (B = 1) .. 6.7e-1 (B = 3), EKFAC 2.6e-2 .. 5.9e-1.
    for batch in (1, 3):
        func = MLPField(3, 4, seed=11)
        x0, target = _randn(batch, 3, seed=12), _randn(batch, 3, seed=13)
        errs = kfac_errors(func, x0, target, method="dopri5", t1=0.75)
        for name, (kfac, ekfac) in errs.items():
            assert kfac > 1e-3, (batch, name, errs)
            assert ekfac < kfac, (batch, name, errs)
