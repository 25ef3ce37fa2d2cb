"""ODEBlock: the solution at t1, solver statistics, argument checks."""

from typing import Any

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn

import snopt

DT = torch.float64




class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(4, 6, dtype=DT)
        self.lin2 = nn.Linear(6, 3, dtype=DT)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        z = torch.cat([x, t.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)
        out: Tensor = self.lin2(torch.tanh(self.lin1(z)))
        return out


def _x0() -> Tensor:
    return torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=DT)


@pytest.mark.parametrize(("method", "kwargs"), [
    ("dopri5", {"rtol": 1e-8, "atol": 1e-10}),
    ("rk4", {"options": {"step_size": 0.05}}),
    ("euler", {"options": {"step_size": 0.1}}),
])
def test_forward_equals_torchdiffeq_at_t1(method: str, kwargs: dict[str, Any]) -> None:
    func = Field()
    block = snopt.ODEBlock(func, t1=0.75, t0=-0.25, method=method, **kwargs)
    y = block(_x0())
    with torch.no_grad():
        ref = torchdiffeq.odeint(func, _x0(), torch.tensor([-0.25, 0.75], dtype=DT), method=method, **kwargs)[-1]
    assert y.shape == ref.shape and y.dtype == DT
    # Same solver, same settings: only rounding can differ.
    torch.testing.assert_close(y.detach(), ref, rtol=1e-12, atol=1e-12)


def test_gradient_matches_backprop_through_torchdiffeq() -> None:
    func = Field()
    block = snopt.ODEBlock(func, t1=1.0, method="dopri5", rtol=1e-10, atol=1e-12)
    x = _x0().requires_grad_(True)
    block(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in func.parameters()] + [x.grad.clone()]
    func.zero_grad(set_to_none=True)
    x2 = _x0().requires_grad_(True)
    torchdiffeq.odeint(func, x2, torch.tensor([0.0, 1.0], dtype=DT), rtol=1e-10, atol=1e-12)[-1].pow(2).sum().backward()
    ref = [p.grad for p in func.parameters()] + [x2.grad]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_stats_count_evaluations_and_reset_per_forward() -> None:
    block = snopt.ODEBlock(Field(), method="rk4", options={"step_size": 0.25})
    y = block(_x0().requires_grad_(True))
    assert block.stats.nfe_forward == 16 and block.stats.nfe_backward == 0
    y.sum().backward()
    assert block.stats.nfe_forward == 16 and block.stats.nfe_backward == 16
    block(_x0())
    assert block.stats.nfe_forward == 16 and block.stats.nfe_backward == 0

    adaptive = snopt.ODEBlock(Field(), method="dopri5")
    adaptive(_x0().requires_grad_(True)).sum().backward()
    assert adaptive.stats.nfe_forward > 0 and adaptive.stats.nfe_backward > 0


def test_t0_t1_are_buffers_and_repr_names_them() -> None:
    block = snopt.ODEBlock(Field(), t1=2.0, t0=0.5)
    assert dict(block.named_buffers()).keys() == {"t0", "t1"}
    assert float(block.t1) == 2.0 and float(block.t0) == 0.5
    assert "t0=0.5, t1=2" in repr(block) and "dopri5" in repr(block)


@pytest.mark.parametrize(("t0", "t1"), [(0.0, 0.0), (1.0, 0.5), (0.0, -1.0)])
def test_t1_not_after_t0_is_rejected(t0: float, t1: float) -> None:
    with pytest.raises(ValueError, match="`t1` must be greater than `t0`"):
        snopt.ODEBlock(Field(), t1=t1, t0=t0)


@pytest.mark.parametrize("func", [lambda t, x: -x, "not a module", None])
def test_func_must_be_a_module(func: Any) -> None:
    with pytest.raises(TypeError, match="`func` must be an nn.Module"):
        snopt.ODEBlock(func)
