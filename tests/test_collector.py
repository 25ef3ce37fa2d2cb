"""FactorCollector: closed-form factors, no effect on gradients, batch-permutation invariance, O(1) state."""

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import snopt
from snopt.curvature import FactorCollector, KronFactors, kron_block, weight_grad_matrix

DT = torch.float64




def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


class MLPField(nn.Module):
    def __init__(self, dim: int = 3, width: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin1 = nn.Linear(dim + 1, width, dtype=DT)
        self.lin2 = nn.Linear(width, dim, dtype=DT)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        z = torch.cat([x, t.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)
        out: Tensor = self.lin2(torch.tanh(self.lin1(z)))
        return out


class ConvField(nn.Module):
    def __init__(self, channels: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 3, 3, padding=1, dtype=DT)
        self.conv2 = nn.Conv2d(3, channels, 3, padding=1, dtype=DT)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.conv2(torch.tanh(self.conv1(x)))
        return out


class DecayField(nn.Module):
    """F(t, x) = W2 tanh(W1 c_b + b1) + b2 − λ x with a per-sample constant buffer c (B, c_dim).

    The layer inputs do not depend on x or t; the adjoint is a(t) = e^{−λ(t1−t)} a(t1), so the
    output cotangents decay in time and every factor has a closed form.
    """

    def __init__(self, c: Tensor, dim: int, width: int = 4, lam: float = 0.8) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.register_buffer("c", c)
        self.lin1 = nn.Linear(c.shape[1], width, dtype=DT)
        self.lin2 = nn.Linear(width, dim, dtype=DT)
        self.lam = lam

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.lin2(torch.tanh(self.lin1(self.c))) - self.lam * x
        return out


def half_mse(target: Tensor) -> Any:
    """Batch-mean loss mean_b ½‖y_b − target_b‖²."""
    return lambda y: 0.5 * (y - target).pow(2).reshape(y.shape[0], -1).sum(1).mean()


def run(block: snopt.ODEBlock, x0: Tensor, loss_fn: Any, collector: FactorCollector | None = None,
        ) -> tuple[dict[str, KronFactors], list[Tensor]]:
    """One forward/backward with `collector` as the block's (enabled) observer; returns factors and grads."""
    block.observer = collector
    if collector is not None:
        collector.enabled = True
    x = x0.clone().requires_grad_(True)
    loss_fn(block(x)).backward()
    grads = [p.grad.clone() for p in block.func.parameters() if p.grad is not None] + [x.grad.clone()]
    block.func.zero_grad(set_to_none=True)
    return ({} if collector is None else collector.kron_factors()), grads


# ----------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------

def _rk4_growth(z: float) -> float:
    """rk4's amplification of one step of dy/ds = z·y / h (any 4-stage order-4 method)."""
    return 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24


@pytest.mark.parametrize("time_sharing", ["expand", "reduce"])
def test_factors_match_closed_form_of_the_discrete_adjoint(time_sharing: str) -> None:
    # With F = W2 σ(W1 c_b + b1) + b2 − λx the layer inputs are constant and the rk4 backward solve
    # gives a_j = R(−λh)^j a(t1) at its j-th step start t1 − j·h (R the rk4 amplification factor),
    # exactly. So, for lin2 (g = a, scaled by B: B·a(t1)_b = y_b − target_b =: r_b):
    #   expand: A = T·mean_b āāᵀ,  G = h Σ_j R^{2j} · mean_b r_b r_bᵀ
    #   reduce: A = mean_b āāᵀ,    G = (h Σ_j R^j)² · mean_b r_b r_bᵀ
    batch, dim, lam, h, n = 3, 2, 0.8, 0.125, 6
    t1 = h * n
    field = DecayField(_randn(batch, 3, seed=1), dim, lam=lam)
    x0, target = _randn(batch, dim, seed=2), _randn(batch, dim, seed=3)
    block = snopt.ODEBlock(field, t1=t1, method="rk4", options={"step_size": h})
    collector = FactorCollector(field, mode="ode", time_sharing=time_sharing)
    factors, _ = run(block, x0, half_mse(target), collector)
    with torch.no_grad():
        y = block(x0)
        a_bar = torch.cat([torch.tanh(field.lin1(field.c)), torch.ones(batch, 1, dtype=DT)], dim=1)
    r = y - target
    growth = [_rk4_growth(-lam * h) ** j for j in range(n)]
    if time_sharing == "expand":
        a_ref = t1 * a_bar.T @ a_bar / batch
        g_ref = h * sum(q * q for q in growth) * r.T @ r / batch
    else:
        a_ref = a_bar.T @ a_bar / batch
        g_ref = (h * sum(growth)) ** 2 * r.T @ r / batch
    f = factors["lin2"]
    torch.testing.assert_close(f.A, a_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.G, g_ref, rtol=1e-12, atol=1e-14)
    assert f.steps == n and math.isclose(float(f.weight), t1, rel_tol=1e-12)


@pytest.mark.parametrize("time_sharing", ["expand", "reduce"])
def test_one_euler_step_one_datum_gives_the_gradient_outer_product(time_sharing: str) -> None:
    # One time sample, one datum, one location: A ⊗ G = vec(∇W) vec(∇W)ᵀ, the gradient of the loss.
    field = DecayField(_randn(1, 3, seed=1), 2)
    x0, target = _randn(1, 2, seed=2), _randn(1, 2, seed=3)
    block = snopt.ODEBlock(field, t1=0.5, method="euler", options={"step_size": 0.5})
    collector = FactorCollector(field, mode="ode", time_sharing=time_sharing)
    block.observer, collector.enabled = collector, True
    half_mse(target)(block(x0)).backward()
    for name in ("lin1", "lin2"):
        grad = weight_grad_matrix(field.get_submodule(name)).reshape(-1)
        torch.testing.assert_close(kron_block(collector.kron_factors()[name]), torch.outer(grad, grad),
                                   rtol=1e-12, atol=1e-15)


def test_static_mode_folds_each_call_with_weight_one() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, dtype=DT), nn.Tanh(), nn.Linear(4, 2, dtype=DT))
    x, target = _randn(5, 3, seed=1), _randn(5, 2, seed=2)
    collector = FactorCollector(net, mode="static")
    collector.enabled = True
    hidden = torch.tanh(net[0](x)).detach()
    out = net(x)
    half_mse(target)(out).backward()
    g_out = (out.detach() - target) / 5  # the cotangent of the batch-mean loss at the output
    f = collector.kron_factors()["2"]
    a_bar = torch.cat([hidden, torch.ones(5, 1, dtype=DT)], dim=1)
    torch.testing.assert_close(f.A, a_bar.T @ a_bar / 5, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(f.G, (5 * g_out).T @ (5 * g_out) / 5, rtol=1e-12, atol=1e-15)
    assert f.steps == 1 and float(f.weight) == 1.0 and collector.batch_size == 5


# ----------------------------------------------------------------------------------------------
# Collection must not change what the adjoint computes
# ----------------------------------------------------------------------------------------------

def test_collection_does_not_change_the_gradient_fixed_grid() -> None:
    field = MLPField()
    x0, target = _randn(4, 3, seed=1), _randn(4, 3, seed=2)
    block = snopt.ODEBlock(field, method="rk4", options={"step_size": 0.1})
    _, plain = run(block, x0, half_mse(target))
    factors, collected = run(block, x0, half_mse(target), FactorCollector(field))
    assert factors and all(f.steps == 10 for f in factors.values())
    assert all(torch.equal(a, b) for a, b in zip(plain, collected, strict=True))


def test_collection_does_not_change_the_gradient_adaptive() -> None:
    # Enabled vs disabled collection (the observer attached both times): bit-identical. Attaching an
    # observer at all pins the backward solve's last step to t0 (no overshoot and interpolation),
    # which moves the gradient within the solver tolerance (rtol 1e-6: measured 2e-6 relative).
    field = MLPField()
    x0, target = _randn(4, 3, seed=1), _randn(4, 3, seed=2)
    block = snopt.ODEBlock(field, method="dopri5", rtol=1e-6, atol=1e-8)
    _, plain = run(block, x0, half_mse(target))
    collector = FactorCollector(field)
    _, collected = run(block, x0, half_mse(target), collector)
    collector.enabled = False
    x = x0.clone().requires_grad_(True)
    half_mse(target)(block(x)).backward()
    disabled = [p.grad for p in field.parameters()] + [x.grad]
    assert all(torch.equal(a, b) for a, b in zip(disabled, collected, strict=True))
    for a, b in zip(plain, collected, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# Batch-permutation invariance
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "method"), [("mlp", "rk4"), ("mlp", "dopri5"), ("conv", "rk4")])
def test_factors_are_invariant_to_permuting_the_batch(kind: str, method: str) -> None:
    # Fixed grid: only the summation order changes (rounding, rtol 1e-12). dopri5: the error norm,
    # hence each step size, moves by rounding too and the quadrature with it (measured 8e-10): 1e-8.
    if kind == "mlp":
        field: nn.Module = MLPField()
        x0, target = _randn(5, 3, seed=1), _randn(5, 3, seed=2)
    else:
        field = ConvField()
        x0, target = _randn(3, 2, 4, 4, seed=1), _randn(3, 2, 4, 4, seed=2)
    opts: dict[str, Any] = {"options": {"step_size": 0.25}} if method == "rk4" else {"rtol": 1e-7, "atol": 1e-9}
    block = snopt.ODEBlock(field, method=method, **opts)
    ref, _ = run(block, x0, half_mse(target), FactorCollector(field))
    perm = torch.randperm(x0.shape[0], generator=torch.Generator().manual_seed(3))
    assert not torch.equal(perm, torch.arange(x0.shape[0]))
    got, _ = run(block, x0[perm], half_mse(target[perm]), FactorCollector(field))
    rtol = 1e-12 if method == "rk4" else 1e-8
    for name, f in ref.items():
        assert got[name].steps == f.steps
        torch.testing.assert_close(got[name].A, f.A, rtol=rtol, atol=1e-14)
        torch.testing.assert_close(got[name].G, f.G, rtol=rtol, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Costs: nothing per step, nothing when disabled
# ----------------------------------------------------------------------------------------------

def _state_tensors(obj: Any, seen: set[int] | None = None) -> list[Tensor]:
    """Every tensor reachable from the collector's attributes (modules and hook handles excluded)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, nn.Module):
        return []
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _state_tensors(v, seen)]
    if isinstance(obj, list | tuple | set):
        return [t for v in obj for t in _state_tensors(v, seen)]
    if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        return [t for v in vars(obj).values() for t in _state_tensors(v, seen)]
    return []


@pytest.mark.parametrize("time_sharing", ["expand", "reduce"])
def test_collector_state_does_not_grow_with_the_number_of_steps(time_sharing: str) -> None:
    field = MLPField()
    x0, target = _randn(4, 3, seed=1), _randn(4, 3, seed=2)
    sizes = {}
    for steps in (10, 1000):
        block = snopt.ODEBlock(field, method="rk4", options={"step_size": 1.0 / steps})
        collector = FactorCollector(field, time_sharing=time_sharing)
        factors, _ = run(block, x0, half_mse(target), collector)
        assert all(f.steps == steps for f in factors.values())
        tensors = _state_tensors(collector)
        sizes[steps] = (len(tensors), sum(t.numel() for t in tensors))
        collector.remove()
    assert sizes[10] == sizes[1000], sizes
    assert sizes[10][0] > 0


def test_disabled_collector_folds_nothing_and_removed_collector_has_no_hooks() -> None:
    field = MLPField()
    x0, target = _randn(4, 3, seed=1), _randn(4, 3, seed=2)
    block = snopt.ODEBlock(field, method="rk4", options={"step_size": 0.25})
    collector = FactorCollector(field)
    folds: list[str] = []
    real_fold = collector._fold
    collector._fold = lambda name, *a: (folds.append(name), real_fold(name, *a))[1]  # type: ignore[method-assign]
    block.observer = collector  # attached but not enabled
    half_mse(target)(block(x0)).backward()
    assert folds == [] and collector.factors == {} and collector._latest == {}
    run(block, x0, half_mse(target), collector)
    assert len(folds) == 2 * 4
    collector.reset()
    assert all(float(f.A.abs().sum()) == 0 and float(f.weight) == 0 and f.steps == 0
               for f in collector.factors.values())
    collector.remove()
    assert all(not m._forward_hooks for m in (field.lin1, field.lin2))
    assert not collector.enabled


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "dynamic"}, "`mode` must be 'ode' or 'static'"),
    ({"cotangent": "mean"}, "`cotangent` must be 'batch_mean' or 'sum'"),
    ({"mode": "static", "time_sharing": "reduce"}, "time_sharing='reduce' needs mode='ode'"),
    ({"time_sharing": "shared"}, "shared"),
])
def test_collector_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FactorCollector(MLPField(), **kwargs)


def test_batch_size_is_the_batch_not_a_broadcast_input() -> None:
    # A CNF's hyper-layers see a (1, 1) time input; the m2 scale must still be the batch size.
    from snopt.nn._cnf import CNFField, cnf_log_density

    torch.manual_seed(0)
    field = CNFField(2, hidden=8)
    block = snopt.ODEBlock(field)
    opt = snopt.SNOpt(block, torch.optim.SGD(block.parameters(), lr=0.01))
    logp = cnf_log_density(field, torch.randn(64, 2), 1.0, snopt.odeint, observer=block.observer,
                           stats=block.stats)
    (-logp.mean()).backward()
    opt.step()
    assert {opt.state[layer.weight]["batch_size"] for layer in opt.layers} == {64.0}
