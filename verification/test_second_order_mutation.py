"""Claim: the reference checks of test_second_order.py can fail — each term of the adjoint ODEs is needed.

Each mutant is snopt's backward dynamics with one term removed, monkeypatched in for one test:

* `_SecondOrderDynamics.__call__` (state (x, V_x, V_θ, W); dW/dt = −(W K̄ + K̄ᵀ W + ∇²_zz(V_xᵀF)),
  dV_θ/dt = −F_θᵀ V_x): (a) without ∇²(V_xᵀF), (b) without W K̄, (c) without K̄ᵀ W,
  (d) without the V_θ accumulation;
* `_HvpBackward.__call__` (state (x, ẋ, a, ȧ, g, ġ), forward-over-adjoint): (e) without the ȧ
  tangent (the dynamics see ȧ = 0, so F_xᵀȧ and F_θᵀȧ vanish from (ȧ, ġ)').

The mutants wrap the library's own `__call__` and remove the term, recomputed independently
with `torch.func` from `prob.F` (for (a)–(c)), instead of copying the dynamics: the library's
implementation changes underneath (hvp moved from torch.func to double backward while these
checks were written), and a copy would silently go on mutating the old code. The wrappers rely
only on the documented state layouts. The mutant's error against the same-grid RK4 reference
and against the closed form must exceed the tolerance the real code meets by at least 100×, on
the quantity the term feeds.
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.func import hessian, jacrev

from snopt.adjoint import _hvp, _second_order
from snopt.testing import SecondOrderProblem, SnoptCheck
from verification.test_second_order import (
    TIGHT,
    TOL_CLOSED_FORM,
    TOL_GRID,
    closed_form_errors,
    grid_errors,
)

MLP = SecondOrderProblem("mlp", 2, 6, "softplus", True, 3, 0.0, 0.125, "ce", 21, 1.3)
LINEAR = SecondOrderProblem("linear", 2, 0, "", False, 3, 0.1, 1.1, "mse", 22, 1.2)
FACTOR = 100.0  # how far above the passing tolerance a mutant must land (measured: ≥ 1e6×)
Dynamics = Callable[[Any, Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]]


def _w_kbar(self: Any, t: Tensor, state: tuple[Tensor, ...]) -> Tensor:
    """W K̄ with K̄ = [[F_x, F_θ], [0, 0]], from an independent `jacrev` of F."""
    prob = self.prob
    x, w = state[0], state[3]
    with torch.enable_grad():
        jx, jp = jacrev(lambda x_, p_: prob.F(t, x_, p_), argnums=(0, 1))(x, prob.theta)
    out: Tensor = w[:, :prob.n] @ torch.cat([jx, jp], dim=1)
    return out


def _hess_vx_f(self: Any, t: Tensor, state: tuple[Tensor, ...]) -> Tensor:
    """∇²_zz (V_xᵀF) with z = (x, θ), from an independent `torch.func.hessian`."""
    prob, n = self.prob, self.prob.n
    x, a = state[0], state[1]
    with torch.enable_grad():
        out: Tensor = hessian(lambda z: torch.dot(a, prob.F(t, z[:n], z[n:])))(torch.cat([x, prob.theta]))
    return out


def second_order_mutant(original: Dynamics, drop: str) -> Dynamics:
    """`_SecondOrderDynamics.__call__` with one term removed (outputs are −d/dt of the state)."""

    def __call__(self: Any, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        out = list(original(self, t, state))
        if drop == "hessian_of_Vx_F":
            out[3] = out[3] + _hess_vx_f(self, t, state)
        elif drop == "W_K":
            out[3] = out[3] + _w_kbar(self, t, state)
        elif drop == "K_T_W":
            out[3] = out[3] + _w_kbar(self, t, state).T
        elif drop == "V_theta":
            out[2] = torch.zeros_like(out[2])
        else:
            raise ValueError(drop)
        return tuple(out)

    return __call__


def hvp_mutant(original: Dynamics, drop: str) -> Dynamics:
    """`_HvpBackward.__call__` evaluated with ȧ = 0 (the ȧ tangent dropped from the dynamics)."""
    assert drop == "a_dot"

    def __call__(self: Any, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return original(self, t, (*state[:3], torch.zeros_like(state[3]), *state[4:]))

    return __call__





HESSIAN_BLOCKS = ("hess_params", "hess_x0", "hess_x0_params")
# (target class, mutant factory, dropped term, front door to run, quantities the term feeds)
MUTANTS = [
    pytest.param(_second_order._SecondOrderDynamics, second_order_mutant, "hessian_of_Vx_F", "second_order",
                 HESSIAN_BLOCKS, id="drop-hessian-of-VxF"),
    pytest.param(_second_order._SecondOrderDynamics, second_order_mutant, "W_K", "second_order", HESSIAN_BLOCKS,
                 id="drop-W-K"),
    pytest.param(_second_order._SecondOrderDynamics, second_order_mutant, "K_T_W", "second_order", HESSIAN_BLOCKS,
                 id="drop-KT-W"),
    pytest.param(_second_order._SecondOrderDynamics, second_order_mutant, "V_theta", "second_order",
                 ("grad_params",), id="drop-V-theta"),
    pytest.param(_hvp._HvpBackward, hvp_mutant, "a_dot", "hvp", ("hvp",), id="hvp-drop-a-dot"),
]


@pytest.mark.parametrize(("target", "factory", "drop", "part", "keys"), MUTANTS)
@pytest.mark.parametrize("reference", ["grid", "closed-form"])
def test_mutant_fails_reference_check(monkeypatch: pytest.MonkeyPatch, target: type, factory: Any, drop: str,
                                      part: str, keys: tuple[str, ...], reference: str) -> None:
    monkeypatch.setattr(target, "__call__", factory(target.__call__, drop))
    if reference == "grid":
        errs, tol = grid_errors(MLP, (part,)), TOL_GRID
    else:
        errs, tol = closed_form_errors(LINEAR, TIGHT, (part,)), TOL_CLOSED_FORM
    worst = max(errs[k] for k in keys)
    assert worst >= FACTOR * tol, f"mutant {drop} not caught: {errs}"
    print(f"{drop} vs {reference}: worst relative error {worst:.1e} (tolerance {tol:g})")


@pytest.mark.parametrize("reference", ["grid", "closed-form"])
def test_unmutated_code_passes_the_same_checks(reference: str) -> None:
    """The control: on the mutants' problems the library itself is within tolerance."""
    if reference == "grid":
        errs, tol = grid_errors(MLP), TOL_GRID
    else:
        errs, tol = closed_form_errors(LINEAR, TIGHT), TOL_CLOSED_FORM
    assert max(v for k, v in errs.items() if not k.startswith(("grad_t1", "hess_t1"))) <= tol, errs


@pytest.mark.parametrize(("target", "factory", "drop", "part", "keys"), MUTANTS)
def test_mutant_fails_the_users_convergence_check(monkeypatch: pytest.MonkeyPatch, target: type, factory: Any,
                                                  drop: str, part: str, keys: tuple[str, ...]) -> None:
    """`SnoptCheck` (the plugin's ``snopt_check``) fails every mutant on the blocks the term feeds."""
    monkeypatch.setattr(target, "__call__", factory(target.__call__, drop))
    func, x0, t_span, loss_fn = MLP.build()
    check = SnoptCheck(raise_on_failure=False)
    if part == "second_order":
        report = check.second_order(func, x0, t_span, loss_fn, step_size=1 / 64)
    else:
        report = check.products(func, x0, t_span, loss_fn, step_size=1 / 64)
    assert set(keys) <= set(report.failed), str(report)
    monkeypatch.undo()
    assert (SnoptCheck().second_order if part == "second_order" else SnoptCheck().products)(
        func, x0, t_span, loss_fn, step_size=1 / 64).ok
