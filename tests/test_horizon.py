"""Unit tests of `snopt.optim._horizon` (HorizonController, HorizonDerivatives, horizon_derivatives)."""

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import snopt
from snopt.optim._horizon import HorizonController, HorizonDerivatives, horizon_derivatives


class Field(nn.Module):
    def __init__(self, dim: int = 3, width: int = 8) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim + 1, width)
        self.l2 = nn.Linear(width, dim)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.to(x.dtype).expand(*x.shape[:-1], 1)
        out: Tensor = self.l2(torch.tanh(self.l1(torch.cat([x, tt], dim=-1))))
        return out


class Net(nn.Module):
    def __init__(self, t1: float = 0.5, dim: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.block = snopt.ODEBlock(Field(dim), t1=t1, rtol=1e-4, atol=1e-4)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.block(self.inp(x)))
        return out


def data(seed: int = 0, n: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 4, (n,), generator=g)


def block(t1: float = 1.0, t0: float = 0.0) -> snopt.ODEBlock:
    torch.manual_seed(0)
    return snopt.ODEBlock(Field(), t1=t1, t0=t0)


def derivs(g: float, h: float, htp: float = 0.0, theta: Tensor | None = None, p: int = 0) -> HorizonDerivatives:
    return HorizonDerivatives(grad_t1=g, hess_t1=h, hess_t1_params=torch.full((p,), htp), theta=theta)


def t1_of(b: snopt.ODEBlock) -> float:
    return float(b.t1.detach())


# ------------------------------------------------------------------ construction errors
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": 0.0}, "lr"), ({"lr": -1.0}, "lr"), ({"lr": math.nan}, "lr"), ({"reg": -1e-3}, "reg"),
    ({"reg": math.inf}, "reg"), ({"update_freq": 0}, "update_freq"), ({"update_freq": 2.5}, "update_freq"),
    ({"update_freq": True}, "update_freq"), ({"policy": "newton"}, "policy"), ({"curvature": "hessian"}, "curvature"),
    ({"beta": 1.0}, "beta"), ({"beta": -0.1}, "beta"), ({"min_t1": 0.0}, "min_t1"), ({"min_t1": -1.0}, "min_t1"),
    ({"max_t1": 0.005}, "max_t1"), ({"max_rel_step": 0.0}, "max_rel_step"), ({"damping": 0.0}, "damping"),
    ({"min_t1": 2.0}, "below min_t1"),
])
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HorizonController(block(), **kwargs)


def test_not_a_block() -> None:
    with pytest.raises(TypeError, match="ODEBlock"):
        HorizonController(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_nonpositive_t1_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        HorizonController(snopt.ODEBlock(Field(), t1=0.0, t0=-1.0))
    with pytest.raises(ValueError, match="positive"):
        HorizonController(snopt.ODEBlock(Field(), t1=-0.5, t0=-1.0))
    with pytest.raises(ValueError, match="min_t1"):  # min_t1 must exceed t0
        HorizonController(snopt.ODEBlock(Field(), t1=2.0, t0=1.0), min_t1=0.5)


@pytest.mark.parametrize("bad", [-0.3, 0.0, math.nan, math.inf])
def test_t1_made_invalid_later_is_an_error(bad: float) -> None:
    b = block()
    ctrl = HorizonController(b, curvature="exact", update_freq=1)
    b.t1.fill_(bad)
    with pytest.raises(ValueError, match="t1"):
        ctrl.step(derivs(1.0, 1.0))


# ------------------------------------------------------------------ the update rules (exact mode)
@pytest.mark.parametrize(("policy", "lr", "expected"), [
    # t1 = 1, ρ = 1: Q_t = 2 + 1 = 3, Q_tt = 3 + 1 = 4, Q_tθ δθ = 0.5 · (0.2 + 0.2) = 0.2.
    ("feedback", 1.0, 1.0 - (3.0 + 0.2) / 4.0), ("open_loop", 1.0, 1.0 - 3.0 / 4.0),
    ("open_loop", 0.5, 1.0 - 0.5 * 3.0 / 4.0), ("gradient", 0.1, 1.0 - 0.1 * 3.0),
])
def test_update_rules(policy: str, lr: float, expected: float) -> None:
    b = block(t1=1.0)
    params = [p for p in b.func.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    ctrl = HorizonController(b, lr=lr, reg=1.0, update_freq=1, policy=policy, curvature="exact",  # type: ignore[arg-type]
                             beta=0.0, max_rel_step=10.0)
    d = derivs(2.0, 3.0, 0.5, theta=theta, p=theta.numel())
    with torch.no_grad():  # δθ: +0.2 on two entries
        params[0].view(-1)[0] += 0.2
        params[-1].view(-1)[-1] += 0.2
    assert ctrl.step(d) == pytest.approx(expected, rel=1e-6)
    assert t1_of(b) == pytest.approx(expected, rel=1e-6)
    assert ctrl.t1_history == [1.0, pytest.approx(expected, rel=1e-6)] and ctrl.num_updates == 1


def test_negative_curvature_gives_descent_and_trust_region_limits() -> None:
    b = block(t1=1.0)
    ctrl = HorizonController(b, lr=1.0, update_freq=1, policy="open_loop", curvature="exact", beta=0.0)
    ctrl.step(derivs(0.1, -0.5))  # |Q_tt| = 0.5 → δ = −0.2
    assert t1_of(b) == pytest.approx(0.8, rel=1e-6)
    ctrl.step(derivs(-100.0, 1.0))  # δ = +100, limited to 0.5·(t1 − t0) = 0.4
    assert t1_of(b) == pytest.approx(1.2, rel=1e-6)


def test_clamped_to_min_and_max() -> None:
    b = block(t1=0.1)
    ctrl = HorizonController(b, lr=1.0, update_freq=1, policy="gradient", curvature="exact", min_t1=0.08,
                             max_t1=0.12, max_rel_step=100.0)
    ctrl.step(derivs(1e6, 1.0))
    assert t1_of(b) == pytest.approx(0.08)
    ctrl.step(derivs(-1e6, 1.0))
    assert t1_of(b) == pytest.approx(0.12)


def test_running_average_and_schedule() -> None:
    b = block(t1=1.0)
    ctrl = HorizonController(b, lr=1.0, update_freq=3, policy="gradient", curvature="exact", beta=0.5,
                             max_rel_step=100.0)
    assert ctrl.step(derivs(0.01, 0.0)) is None and ctrl.step(derivs(0.02, 0.0)) is None
    # bias-corrected EMA of (0.01, 0.02): (0.25·0.01 + 0.5·0.02) / 0.75
    assert ctrl.statistics()["q_t"] == pytest.approx((0.0025 + 0.01) / 0.75)
    new = ctrl.step(derivs(0.03, 0.0))
    m = (0.125 * 0.01 + 0.25 * 0.02 + 0.5 * 0.03) / 0.875
    assert new == pytest.approx(1.0 - m, rel=1e-6)
    assert ctrl.statistics()["count"] == 0  # restarted after the update


def test_nonfinite_derivatives_skip_and_warn() -> None:
    b = block(t1=1.0)
    ctrl = HorizonController(b, update_freq=1, policy="open_loop", curvature="exact", beta=0.0)
    for bad in (derivs(math.nan, 1.0), derivs(1.0, math.inf)):
        with pytest.warns(RuntimeWarning, match="Non-finite"):
            assert ctrl.step(bad) is None
    assert t1_of(b) == 1.0 and ctrl.num_updates == 0 and ctrl.statistics()["count"] == 0
    assert ctrl.step(derivs(0.5, 1.0)) == pytest.approx(0.5)


def test_mode_mismatches() -> None:
    b = block()
    with pytest.raises(ValueError, match="needs `derivatives`"):
        HorizonController(b, curvature="exact").step()
    with pytest.raises(ValueError, match="only used"):
        HorizonController(b).step(derivs(1.0, 1.0))
    with pytest.raises(ValueError, match="theta"):
        HorizonController(b, curvature="exact").step(derivs(1.0, 1.0))
    with pytest.raises(ValueError, match="parameters"):
        HorizonController(b, curvature="exact").step(derivs(1.0, 1.0, theta=torch.zeros(3), p=3))
    with pytest.raises(RuntimeError, match="loss.backward"):
        HorizonController(b).step()
    with pytest.raises(ValueError, match="wrt_t1"):
        so = snopt.second_order(b.func, torch.zeros(1, 3), torch.tensor([0.0, 1.0]), lambda x: x.sum())
        HorizonDerivatives.from_second_order(so)


def test_horizon_derivatives_matches_second_order() -> None:
    b = block(t1=0.5).double()
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hd = horizon_derivatives(b, x, lambda y: (y**2).sum(), rtol=1e-9, atol=1e-9)
    so = snopt.second_order(b.func, x, torch.tensor([0.0, 0.5], dtype=torch.float64), lambda y: (y**2).sum(),
                            wrt_t1=True, rtol=1e-9, atol=1e-9)
    assert so.grad_t1 is not None and so.hess_t1_params is not None
    assert hd.grad_t1 == pytest.approx(float(so.grad_t1), rel=1e-12)
    assert torch.allclose(hd.hess_t1_params, so.hess_t1_params, rtol=1e-12)
    assert hd.theta is not None and torch.equal(hd.theta, torch.cat([p.reshape(-1) for p in b.func.parameters()]))


# ------------------------------------------------------------------ training loops (Gauss-Newton mode)
OPTIMIZERS: dict[str, Callable[[Net], Any]] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "snopt": lambda m: snopt.SNOpt(m, torch.optim.SGD(m.parameters(), lr=0.1), update_freq=2),
}


def train(model: Net, opt: Any, ctrl: HorizonController, steps: int, start: int = 0) -> list[float]:
    losses = []
    for k in range(start, start + steps):
        x, y = data(k)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        ctrl.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("policy", ["feedback", "open_loop", "gradient"])
def test_training_loop_moves_t1(name: str, policy: str) -> None:
    torch.manual_seed(0)
    model = Net(t1=0.5)
    opt = OPTIMIZERS[name](model)
    ctrl = HorizonController(model.block, lr=0.5 if policy != "gradient" else 0.2, reg=0.05, update_freq=2,
                             policy=policy, params=list(model.parameters()))  # type: ignore[arg-type]
    losses = train(model, opt, ctrl, 6)
    assert all(math.isfinite(v) for v in losses)
    assert ctrl.num_updates == 3 and len(ctrl.t1_history) == 4
    assert ctrl.t1_history[0] == 0.5 and ctrl.t1_history[-1] == t1_of(model.block) != 0.5
    assert all(t >= ctrl.min_t1 for t in ctrl.t1_history)
    assert not model.block.t1.requires_grad


def test_feedback_uses_raw_gradient_under_snopt() -> None:
    """Q_tθ δθ ≈ (∂L/∂t1)(∇_θL·δθ) uses ∇_θL as backward left it, not SNOpt's preconditioned .grad."""
    torch.manual_seed(0)
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), update_freq=1)
    params = list(model.parameters())
    ctrl = HorizonController(model.block, update_freq=100, beta=0.0, params=params)
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    raw = torch.cat([p.grad.reshape(-1).clone() for p in params if p.grad is not None])
    before = torch.cat([p.detach().reshape(-1).clone() for p in params])
    opt.step()
    after_grad = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
    assert not torch.allclose(after_grad, raw)  # SNOpt rewrote .grad
    ctrl.step()
    st = ctrl.statistics()
    dtheta = torch.cat([p.detach().reshape(-1) for p in params]) - before
    assert st["q_tdtheta"] == pytest.approx(st["q_t"] * float(raw @ dtheta), rel=1e-5)


def test_eval_pass_does_not_clobber_statistics() -> None:
    torch.manual_seed(0)
    model = Net()
    ctrl = HorizonController(model.block, update_freq=100, beta=0.0, policy="open_loop")
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model(data(1)[0])  # an evaluation in between
    ctrl.step()
    q1 = ctrl.statistics()["q_t"]
    model.zero_grad()
    ctrl2 = HorizonController(model.block, update_freq=100, beta=0.0, policy="open_loop")
    nn.functional.cross_entropy(model(x), y).backward()
    ctrl2.step()
    assert q1 == ctrl2.statistics()["q_t"]


def test_step_without_backward_and_remove() -> None:
    torch.manual_seed(0)
    model = Net()
    ctrl = HorizonController(model.block, update_freq=1)
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    ctrl.step()
    with pytest.raises(RuntimeError, match="loss.backward"):
        ctrl.step()  # nothing recorded since
    ctrl.remove()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="loss.backward"):
        ctrl.step()


def test_nonfinite_in_training_loop_warns_and_keeps_t1() -> None:
    torch.manual_seed(0)
    model = Net()
    ctrl = HorizonController(model.block, update_freq=1, policy="open_loop")
    x, y = data()
    model.block.method, model.block.options = "rk4", {"step_size": 0.125}
    # Finite gradients (the adjoint solve succeeds), but (∂ℓ_b/∂t1)² overflows float32.
    (1e25 * nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.warns(RuntimeWarning, match="Non-finite"):
        assert ctrl.step() is None
    assert t1_of(model.block) == 0.5


def test_block_dtype_change_and_grad_t1_buffer() -> None:
    torch.manual_seed(0)
    model = Net().double()
    ctrl = HorizonController(model.block, update_freq=1, reg=0.1, lr=0.5)
    model.block.t1.requires_grad_(True)  # a user's autograd t1 does not break the update
    x, y = data()
    nn.functional.cross_entropy(model(x.double()), y).backward()
    new = ctrl.step()
    assert new is not None and t1_of(model.block) == new and not model.block.t1.requires_grad
    assert model.block.t1.dtype == torch.float64


# ------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("policy", ["feedback", "open_loop", "gradient"])
def test_state_dict_round_trip(policy: str) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    kw: dict[str, Any] = {"lr": 0.5 if policy != "gradient" else 0.2, "reg": 0.05, "update_freq": 3,
                          "policy": policy, "beta": 0.7}
    ctrl = HorizonController(model.block, **kw)
    train(model, opt, ctrl, 4)  # mid-window: one update done, one sample averaged
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(ctrl.state_dict()))
    train(model, opt, ctrl, 5, start=4)
    torch.manual_seed(123)
    model2 = Net(t1=0.9)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    ctrl2 = HorizonController(model2.block, **kw)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    ctrl2.load_state_dict(saved[2])
    train(model2, opt2, ctrl2, 5, start=4)
    assert ctrl2.t1_history == ctrl.t1_history and ctrl2.num_updates == ctrl.num_updates == 3
    assert t1_of(model2.block) == t1_of(model.block)
    assert ctrl2.state_dict() == ctrl.state_dict()


def test_load_state_dict_errors() -> None:
    b = block()
    sd = HorizonController(b, policy="gradient").state_dict()
    with pytest.raises(ValueError, match="policy"):
        HorizonController(b).load_state_dict(sd)
    sd = HorizonController(b).state_dict()
    sd["t1"] = -1.0
    with pytest.raises(ValueError, match="t1"):
        HorizonController(b).load_state_dict(sd)


def test_repr() -> None:
    assert "policy='feedback'" in repr(HorizonController(block()))
