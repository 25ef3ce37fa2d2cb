"""The public behaviour of `snopt.odeint`: shapes, tuple states, time direction, stats, observer, dtypes."""

import math

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn

import snopt

F64 = torch.float64




class MLP(nn.Module):
    def __init__(self, dim: int = 3, width: int = 8, dtype: torch.dtype = F64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, dim)).to(dtype)
        self.calls = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        out: Tensor = self.net(torch.cat([x, t.expand(*x.shape[:-1], 1)], dim=-1))
        return out


class Oscillator(nn.Module):
    """A tuple state (q, p): q' = p, p' = −k q − c p (torchdiffeq-style tuple dynamics)."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.3, dtype=F64))
        self.c = nn.Parameter(torch.tensor(0.2, dtype=F64))

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        q, p = state
        return p, -self.k * q - self.c * p


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 2, 3)], ids=str)
@pytest.mark.parametrize("n_times", [2, 5])
def test_output_shape_is_len_t_by_y0_shape(shape: tuple[int, ...], n_times: int) -> None:
    y0 = torch.randn(shape, dtype=F64)
    t = torch.linspace(0.0, 1.0, n_times, dtype=F64)
    ys = snopt.odeint(MLP(), y0, t)
    assert ys.shape == (n_times, *shape)
    assert torch.equal(ys[0], y0)
    assert ys.dtype == F64


def test_forward_equals_torchdiffeq() -> None:
    f, y0, t = MLP(), torch.randn(4, 3, dtype=F64), torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    assert torch.equal(snopt.odeint(f, y0, t, rtol=1e-8, atol=1e-8),
                       torchdiffeq.odeint(f, y0, t, rtol=1e-8, atol=1e-8))


def test_tuple_state_matches_torchdiffeq_adjoint() -> None:
    t = torch.tensor([0.0, 0.7, 2.0], dtype=F64)
    grads = []
    for odeint in (snopt.odeint, torchdiffeq.odeint_adjoint):
        f = Oscillator()
        q0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
        p0 = torch.tensor([0.0, 0.3], dtype=F64, requires_grad=True)
        qs, ps = odeint(f, (q0, p0), t, rtol=1e-10, atol=1e-10)
        assert qs.shape == (3, 2) and ps.shape == (3, 2)
        (qs.pow(2).sum() + (ps * torch.arange(3.0, dtype=F64)[:, None]).sum()).backward()
        grads.append(torch.stack([q0.grad, p0.grad, torch.stack([f.k.grad, f.c.grad])]))
    # Two continuous adjoints at rtol = atol = 1e-10 (different error norms, hence steps):
    # each within ~1e-8 of the exact gradient.
    assert rel(grads[0], grads[1]) <= 1e-7


def test_decreasing_t_matches_torchdiffeq() -> None:
    t = torch.tensor([1.0, 0.4, -0.5], dtype=F64)
    out = []
    for odeint in (snopt.odeint, torchdiffeq.odeint_adjoint):
        f = MLP(seed=1)
        y0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        tt = t.clone().requires_grad_(True)
        ys = odeint(f, y0, tt, rtol=1e-10, atol=1e-10)
        ys.pow(2).sum().backward()
        out.append((ys.detach(), y0.grad, tt.grad, torch.cat([p.grad.reshape(-1) for p in f.parameters()])))
    (ys_a, gy_a, gt_a, gp_a), (ys_b, gy_b, gt_b, gp_b) = out
    assert rel(ys_a, ys_b) <= 1e-12          # same forward solver
    for a, b in ((gy_a, gy_b), (gt_a, gt_b), (gp_a, gp_b)):
        assert rel(a, b) <= 1e-7             # two adjoints at 1e-10, see above


def test_solve_stats_count_every_evaluation() -> None:
    f = MLP()
    stats = snopt.SolveStats()
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    ys = snopt.odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64), stats=stats)
    assert stats.nfe_forward == f.calls > 0
    assert stats.nfe_backward == 0
    f.calls = 0
    ys[-1].sum().backward()
    assert stats.nfe_backward == f.calls > 0
    stats.reset()
    assert (stats.nfe_forward, stats.nfe_backward) == (0, 0)


def test_seminorm_needs_no_more_backward_steps_than_mixed() -> None:
    nfe = {}
    for norm in ("mixed", "seminorm"):
        stats = snopt.SolveStats()
        f = MLP(width=32)
        y0 = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
        snopt.odeint(f, y0, torch.tensor([0.0, 2.0], dtype=F64), rtol=1e-6, atol=1e-6, adjoint_norm=norm,
                     stats=stats)[-1].pow(2).sum().backward()
        nfe[norm] = stats.nfe_backward
    assert nfe["seminorm"] <= nfe["mixed"], nfe


class Recorder:
    def __init__(self) -> None:
        self.steps: list[tuple[float, float, bool]] = []

    def on_backward_step(self, t: Tensor, dt: Tensor) -> None:
        self.steps.append((float(t), float(dt), torch.is_grad_enabled()))


@pytest.mark.parametrize("t", [(0.0, 1.0), (0.0, 0.3, 1.0), (1.0, -0.5)], ids=str)
def test_observer_sees_each_rk4_backward_step_once(t: tuple[float, ...]) -> None:
    rec = Recorder()
    assert isinstance(rec, snopt.AdjointObserver)
    tt = torch.tensor(t, dtype=F64)
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    h = 0.1
    ys = snopt.odeint(MLP(), y0, tt, method="rk4", options={"step_size": h}, observer=rec)
    assert rec.steps == []                   # nothing during the forward solve
    ys.sum().backward()
    span = abs(t[-1] - t[0])
    assert len(rec.steps) == sum(math.ceil(abs(b - a) / h - 1e-9) for a, b in zip(t, t[1:]))
    assert all(dt > 0 and not grad for _, dt, grad in rec.steps)
    assert sum(dt for _, dt, _ in rec.steps) == pytest.approx(span, rel=1e-12)
    # Fixed grid: each report is at its step's start, in real time from t[-1] back to t[0].
    times = [s[0] for s in rec.steps]
    assert times[0] == pytest.approx(t[-1])
    direction = 1.0 if t[-1] > t[0] else -1.0
    assert all(direction * (b - a) < 0 for a, b in zip(times, times[1:]))
    assert all(abs((a - b) - direction * dt) < 1e-12 for (a, dt, _), (b, _, _) in zip(rec.steps, rec.steps[1:])
               if abs(a - b) > 1e-12)


def test_observer_with_adaptive_solver_covers_the_span() -> None:
    rec = Recorder()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    ys = snopt.odeint(MLP(), y0, torch.tensor([0.0, 0.5, 1.5], dtype=F64), observer=rec)
    ys[-1].sum().backward()
    assert len(rec.steps) > 2
    assert all(dt > 0 and not grad for _, dt, grad in rec.steps)
    assert sum(dt for _, dt, _ in rec.steps) == pytest.approx(1.5, rel=1e-12)
    # Adaptive: each report is at its accepted step's end; the last one reaches t[0].
    assert rec.steps[-1][0] == pytest.approx(0.0, abs=1e-12)


def test_float32_works_and_agrees_with_float64() -> None:
    results = {}
    for dtype in (torch.float32, F64):
        f = MLP(dtype=dtype)
        y0 = torch.linspace(-1, 1, 6, dtype=dtype).reshape(2, 3).requires_grad_(True)
        ys = snopt.odeint(f, y0, torch.tensor([0.0, 1.0], dtype=dtype), rtol=1e-6, atol=1e-6)
        assert ys.dtype == dtype
        ys[-1].pow(2).sum().backward()
        assert y0.grad is not None and y0.grad.dtype == dtype
        assert all(p.grad is not None and p.grad.dtype == dtype for p in f.parameters())
        results[dtype] = torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()]).double()
    # float32 solve at rtol 1e-6: error ~ solver tolerance plus float32 roundoff (~1e-6).
    assert rel(results[torch.float32], results[F64]) <= 1e-4


def test_plain_function_with_empty_adjoint_params() -> None:
    x0 = torch.tensor([2.0, -1.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.5], dtype=F64, requires_grad=True)
    ys = snopt.odeint(lambda tt, x: -0.7 * x, x0, t, adjoint_params=(), rtol=1e-11, atol=1e-11)
    ys[-1].sum().backward()
    decay = math.exp(-0.7 * 1.5)
    assert x0.grad is not None and t.grad is not None
    assert torch.allclose(x0.grad, torch.full((2,), decay, dtype=F64), rtol=1e-8)
    # d/dt1 of sum(x0) e^{−0.7 (t1 − t0)} = −0.7·sum(x(t1)); d/dt0 is its negative.
    expected = -0.7 * float(x0.detach().sum()) * decay
    assert torch.allclose(t.grad, torch.tensor([-expected, expected], dtype=F64), rtol=1e-8)


def test_plain_function_with_explicit_adjoint_params() -> None:
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    x0 = torch.tensor([2.0], dtype=F64)
    ys = snopt.odeint(lambda tt, x: -k * x, x0, torch.tensor([0.0, 1.5], dtype=F64), adjoint_params=(k,),
                      rtol=1e-11, atol=1e-11)
    ys[-1].sum().backward()
    assert k.grad is not None
    assert float(k.grad) == pytest.approx(-1.5 * 2.0 * math.exp(-0.7 * 1.5), rel=1e-8)


def test_frozen_parameters_get_no_gradient() -> None:
    f = MLP()
    first = f.net[0]
    assert isinstance(first, nn.Linear)
    first.weight.requires_grad_(False)
    y0 = torch.randn(2, 3, dtype=F64)
    snopt.odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64))[-1].sum().backward()
    assert first.weight.grad is None
    assert first.bias.grad is not None


def test_no_gradient_requested_for_t_leaves_it_none() -> None:
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.randn(3, dtype=F64, requires_grad=True)
    snopt.odeint(MLP(), y0, t)[-1].sum().backward()
    assert t.grad is None and y0.grad is not None


def test_jacfwd_over_odeint_equals_jacrev() -> None:
    # jacfwd = vmap over the forward-mode rule (one tangent solve per column); jacrev goes through the adjoint.
    f = MLP()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.randn(3, dtype=F64)
    jf = torch.func.jacfwd(lambda y: snopt.odeint(f, y, t, rtol=1e-10, atol=1e-10)[-1])(y0)
    jr = torch.func.jacrev(lambda y: snopt.odeint(f, y, t, rtol=1e-10, atol=1e-10)[-1])(y0)
    assert jf.shape == (3, 3)
    assert torch.allclose(jf, jr, rtol=1e-7, atol=1e-9)
