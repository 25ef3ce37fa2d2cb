"""snopt.optim NewtonCG and conjugate_gradient: linear algebra, trust-region logic, argument errors."""

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import snopt
from snopt.optim import _newton_cg
from snopt.optim._newton_cg import CGResult, NewtonCG, conjugate_gradient

SOLVER: dict[str, Any] = {"method": "rk4", "options": {"step_size": 0.125}}


def _spd(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    return q.T @ q / n + 0.5 * torch.eye(n, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# conjugate_gradient
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_cg_solves_spd_system(n: int) -> None:
    a = _spd(n, n)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + n))
    res = conjugate_gradient(lambda v: a @ v, b, max_iters=3 * n, tol=1e-13)
    expected = torch.linalg.solve(a, b)
    # cond(a) ≲ 10 here: CG reaches ||r|| ≤ 1e-13 ||b||, so the error is ≤ cond · 1e-13.
    assert torch.allclose(res.x, expected, rtol=0, atol=1e-11 * float(expected.abs().max()))
    assert not res.negative_curvature
    assert res.iterations <= 3 * n
    assert res.residual_norm <= 1e-13 * float(b.norm())


def test_cg_exact_in_n_iterations_for_few_distinct_eigenvalues() -> None:
    """CG's defining property: k distinct eigenvalues ⇒ convergence in ≤ k iterations."""
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    a = q @ torch.diag(torch.tensor([1.0] * 6 + [3.0] * 6, dtype=torch.float64)) @ q.T
    b = torch.ones(12, dtype=torch.float64)
    res = conjugate_gradient(lambda v: a @ v, b, max_iters=50, tol=1e-12)
    assert res.iterations <= 2
    assert torch.allclose(res.x, torch.linalg.solve(a, b), atol=1e-12)


def test_cg_negative_curvature_first_iteration_returns_rhs() -> None:
    a = torch.diag(torch.tensor([-1.0, 2.0], dtype=torch.float64))
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    res = conjugate_gradient(lambda v: a @ v, b, max_iters=10, tol=1e-12)
    assert res.negative_curvature
    assert res.iterations == 1
    assert torch.equal(res.x, b)


def test_cg_negative_curvature_later_keeps_previous_iterate() -> None:
    """A = diag(1, −0.1), b = (1, 1): dᵀAd = 0.9 > 0 at step 1, < 0 at step 2 → stop with x₁ = (2/0.9) b."""
    a = torch.diag(torch.tensor([1.0, -0.1], dtype=torch.float64))
    b = torch.ones(2, dtype=torch.float64)
    res = conjugate_gradient(lambda v: a @ v, b, max_iters=10, tol=1e-12)
    assert res.negative_curvature
    assert res.iterations == 2
    assert torch.allclose(res.x, (2.0 / 0.9) * b, rtol=1e-14)


def test_cg_respects_iteration_cap() -> None:
    a = _spd(20, 3)
    b = torch.ones(20, dtype=torch.float64)
    res = conjugate_gradient(lambda v: a @ v, b, max_iters=3, tol=1e-14)
    assert res.iterations == 3
    assert not res.negative_curvature
    assert res.residual_norm > 1e-14 * float(b.norm())


def test_cg_zero_rhs_is_converged_not_negative_curvature() -> None:
    """b = 0 (a stationary point): x = 0 with no iteration, not "negative curvature" (dᵀAd = 0 for d = 0)."""
    res = conjugate_gradient(lambda v: 2.0 * v, torch.zeros(3, dtype=torch.float64), max_iters=5, tol=1e-12)
    assert torch.equal(res.x, torch.zeros(3, dtype=torch.float64))
    assert not res.negative_curvature
    assert res.iterations == 0


# ----------------------------------------------------------------------------------------------
# NewtonCG
# ----------------------------------------------------------------------------------------------

class _Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


class _Affine(nn.Module):
    """F = A0 x + b: L(b) is quadratic for MSE, so an undamped Newton step is exact (ρ = 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a0", torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.3, -0.7], dtype=torch.float64))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = x @ self.a0.T + self.b
        return out


def _problem() -> tuple[Tensor, Tensor, snopt.losses.MSELoss]:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 2, generator=g, dtype=torch.float64)
    target = torch.randn(8, 2, generator=g, dtype=torch.float64)
    return x0, torch.tensor([0.0, 1.0], dtype=torch.float64), snopt.losses.MSELoss(target)


def _loss(func: nn.Module, x0: Tensor, t: Tensor, loss_fn: Any) -> float:
    with torch.no_grad():
        return float(loss_fn(snopt.odeint(func, x0, t, **SOLVER)[-1]))


@pytest.mark.parametrize(("curvature", "damping"), [("ggn", 0.1), ("hessian", 1.0), ("hessian", 0.1)])
def test_newton_cg_reduces_loss(curvature: str, damping: float) -> None:
    """Measured over 3 steps from 2.464: ggn λ=0.1 → 1.705; hessian λ=1 → 1.759; hessian λ=0.1 → 1.918.

    With λ = 0.1 the exact Hessian is indefinite along the CG path (CG stops on negative
    curvature) and the first three steps are rejected (ρ < 0, the loss is left unchanged) while
    λ grows ×1.5 each time; the fourth is accepted.
    """
    func = _Field()
    x0, t, loss_fn = _problem()
    opt = NewtonCG(func, damping=damping, curvature=curvature, max_cg_iters=6, solver=SOLVER)  # type: ignore[arg-type]
    start = _loss(func, x0, t, loss_fn)
    returned = []
    steps = 3 if damping == 1.0 or curvature == "ggn" else 4
    for _ in range(steps):
        returned.append(float(opt.step(x0=x0, t_span=t, loss_fn=loss_fn)))
    end = _loss(func, x0, t, loss_fn)
    assert returned[0] == pytest.approx(start, rel=1e-12)  # step returns the loss before the step
    assert all(b <= a for a, b in zip(returned, returned[1:]))  # never accepts an increase
    assert end < 0.8 * start, (start, end)
    assert set(opt.last) == {"loss", "cg_iterations", "rho", "damping", "predicted"}


def test_newton_step_exact_on_quadratic_and_damping_shrinks() -> None:
    func = _Affine()
    x0, t, loss_fn = _problem()
    opt = NewtonCG(func, damping=1e-8, curvature="ggn", max_cg_iters=10, cg_tol=1e-12, solver=SOLVER)
    opt.step(x0=x0, t_span=t, loss_fn=loss_fn)
    # Quadratic model == loss up to the O(h⁴) gap between the curvature product and the exact
    # Hessian of the rk4 discretisation: ρ = 1 to ~1e-6.
    assert opt.last["rho"] == pytest.approx(1.0, abs=1e-4)
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-8 * 2.0 / 3.0)
    before = _loss(func, x0, t, loss_fn)
    opt.step(x0=x0, t_span=t, loss_fn=loss_fn)  # at the minimum: nothing left to gain
    assert _loss(func, x0, t, loss_fn) == pytest.approx(before, rel=1e-8)


@pytest.mark.parametrize("adapt", [True, False])
def test_newton_cg_rejects_uphill_step(monkeypatch: pytest.MonkeyPatch, adapt: bool) -> None:
    """Force CG to return an uphill direction: with adapt_damping the step is undone and λ grows."""

    def uphill(matvec: Any, b: Tensor, *, max_iters: int, tol: float) -> CGResult:
        return CGResult(x=-b, iterations=1, negative_curvature=False, residual_norm=0.0)  # b = −∇L

    monkeypatch.setattr(_newton_cg, "conjugate_gradient", uphill)
    func = _Field()
    x0, t, loss_fn = _problem()
    before = [p.detach().clone() for p in func.parameters()]
    loss_before = _loss(func, x0, t, loss_fn)
    opt = NewtonCG(func, damping=0.2, adapt_damping=adapt, solver=SOLVER)
    opt.step(x0=x0, t_span=t, loss_fn=loss_fn)
    after = list(func.parameters())
    if adapt:
        assert all(torch.equal(a, b) for a, b in zip(after, before))
        assert opt.param_groups[0]["damping"] == pytest.approx(0.3)
        assert opt.last["rho"] < 0
        assert _loss(func, x0, t, loss_fn) == loss_before
    else:
        assert not all(torch.equal(a, b) for a, b in zip(after, before))
        assert _loss(func, x0, t, loss_fn) > loss_before
        assert opt.param_groups[0]["damping"] == 0.2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": 0.0}, "Invalid learning rate: 0.0"),
    ({"lr": -1.0}, "Invalid learning rate: -1.0"),
    ({"lr": float("nan")}, "Invalid learning rate: nan"),
    ({"damping": 0.0}, r"Invalid damping: 0.0 \(must be > 0\)"),
    ({"damping": -1e-3}, "Invalid damping: -0.001"),
    ({"curvature": "newton"}, "`curvature` must be 'ggn' or 'hessian'; got 'newton'"),
    ({"max_cg_iters": 0}, "Invalid max_cg_iters: 0"),
], ids=["lr-zero", "lr-negative", "lr-nan", "damping-zero", "damping-negative", "curvature", "cg-iters"])
def test_newton_cg_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NewtonCG(_Field(), **kwargs)


def test_newton_cg_step_needs_the_problem() -> None:
    x0, t, loss_fn = _problem()
    opt = NewtonCG(_Field(), solver=SOLVER)
    with pytest.raises(ValueError, match="not a closure"):
        opt.step(lambda: 0.0)
    with pytest.raises(ValueError, match="needs x0=, t_span= and loss_fn="):
        opt.step(x0=x0, t_span=t)


@pytest.mark.parametrize("cg_tol", [0.0, -1e-3, float("nan")])
def test_newton_cg_rejects_non_positive_cg_tol(cg_tol: float) -> None:
    with pytest.raises(ValueError, match="cg_tol"):
        snopt.optim.NewtonCG(torch.nn.Linear(2, 2), cg_tol=cg_tol)
