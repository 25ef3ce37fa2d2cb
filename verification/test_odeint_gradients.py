"""Claim: `snopt.odeint`'s gradients (w.r.t. parameters, y0 and every output time) are right.

Compared against exact references (`snopt.testing`): the closed-form linear
ODE, discretise-then-differentiate through our own torch.func RK4 on the same grid, and
autograd through plain adaptive torchdiffeq. Also: convergence as the tolerance/step
shrinks, and that torch.func `grad`, `jvp` and `vmap` over it agree with autograd,
closed form and loops. The comparison helpers (`*_errors`) are reused by
test_odeint_mutation.py to show that each check fails on a planted bug.
"""

import math
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

import snopt
from snopt.testing import (
    LinearSpec,
    OdeintProblem,
    backprop_grads,
    backprop_hessian,
    linear_solution,
    param_dict,
    rel_err,
    rk_solve,
    steps_for,
)
from snopt.testing.strategies import linear_problems, mlp_problems

Grads = dict[str, Any]




TIGHT: dict[str, Any] = {"rtol": 1e-12, "atol": 1e-12}

# Tolerances, all relative (`rel_err`), float64 unless said otherwise.
# Closed form vs dopri5 at rtol = atol = 1e-12: the global error of the forward and of the
# backward solve is C·1e-12 with C = O(exp(||A|| T)) ≤ ~30 for these problems (||A|| ≲ 1.5,
# T ≤ 2.1); measured ≤ ~1e-11. 1e-8 is the contract (DESIGN.md §5) with a wide margin.
TOL_CLOSED_FORM = 1e-8
# snopt RK4 (continuous adjoint, RK4 backward) vs the exact derivative of the same RK4
# discretisation: both are O(h^4) approximations of the true gradient, so they differ by
# O(h^4); measured ≈ 0.5·h^4 relative for these fields (clean 16× drops per halving of h),
# i.e. ≤ 1.1e-10 over 60 drawn problems at h = 1/256 (h^4 = 2.3e-10). 1e-9 is the contract.
TOL_RK4_REF = 1e-9
RK4_STEP = 1.0 / 256
# float32 snopt vs the float64 reference on the same grid: unit roundoff u = 6e-8,
# accumulated over ≤ 192 steps forward and re-solved backward (≈ N·u ≈ 1e-5 worst case,
# random-walk ≈ sqrt(N)·u ≈ 1e-6), amplified by the flow's conditioning (exp(L T) ≲ 3) and
# by cancellation in small t-gradients; measured ≤ 3e-6 over 40 drawn problems. 1e-4
# keeps a 30× margin while still failing for any wrong term (errors ≥ 1e-2).
TOL_RK4_FLOAT32 = 1e-4


# ----------------------------------------------------------------------------------------------
# Comparison helpers (shared with test_odeint_mutation.py)
# ----------------------------------------------------------------------------------------------

def snopt_grads(problem: OdeintProblem, **kwargs: Any) -> Grads:
    """dL/dy0, dL/dt and dL/dθ (by name) through `snopt.odeint`, by `loss.backward()`."""
    module = problem.field.build()
    y0 = problem.y0().requires_grad_(True)
    t = problem.times().requires_grad_(True)
    ys = snopt.odeint(module, y0, t, **kwargs)
    assert ys.shape == (len(problem.t), *y0.shape)
    problem.loss_fn()(ys).backward()  # type: ignore[no-untyped-call]
    assert y0.grad is not None and t.grad is not None
    return {"y0": y0.grad, "t": t.grad, "params": {n: p.grad for n, p in module.named_parameters()}}


def closed_form_grads(problem: OdeintProblem) -> Grads:
    """The same gradients from the closed-form solution (a linear problem)."""
    assert isinstance(problem.field, LinearSpec)
    A, b = (m.requires_grad_(True) for m in problem.field.matrices())
    y0 = problem.y0().requires_grad_(True)
    t = problem.times().requires_grad_(True)
    problem.loss_fn()(linear_solution(A, b, y0, t)).backward()  # type: ignore[no-untyped-call]
    return {"y0": y0.grad, "t": t.grad, "params": {"A": A.grad, "b": b.grad}}


def rk_reference_grads(problem: OdeintProblem, step: float, method: str = "rk4",
                       dtype: torch.dtype | None = None) -> Grads:
    """Exact derivatives of our fixed-grid solve (`step` per unit time), by `torch.func.grad`."""
    module = problem.field.build()
    if dtype is not None:
        module = module.to(dtype)
    cast: Callable[[Tensor], Tensor] = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
    params, y0, t = param_dict(module), cast(problem.y0()), cast(problem.times())
    steps = steps_for(t, step)
    loss_fn = problem.loss_fn()

    def loss(p: dict[str, Tensor], y: Tensor, tt: Tensor) -> Tensor:
        return loss_fn(rk_solve(module, p, y, tt, steps=steps, method=method))

    gp, gy, gt = torch.func.grad(loss, argnums=(0, 1, 2))(params, y0, t)
    return {"y0": gy, "t": gt, "params": gp}


def grad_errors(got: Grads, ref: Grads) -> dict[str, float]:
    """Relative error per group: y0, t, params (all parameters together)."""
    return {k: rel_err(got[k], ref[k]) for k in ("y0", "t", "params")}


def linear_errors(problem: OdeintProblem, **kwargs: Any) -> dict[str, float]:
    """Compare snopt (dopri5 at TIGHT unless overridden) vs the closed form."""
    return grad_errors(snopt_grads(problem, **{**TIGHT, **kwargs}), closed_form_grads(problem))


def rk4_errors(problem: OdeintProblem, step: float = RK4_STEP) -> dict[str, float]:
    """Compare snopt RK4 with `step_size` vs torch.func through our RK4 on the same grid."""
    got = snopt_grads(problem, method="rk4", options={"step_size": step})
    return grad_errors(got, rk_reference_grads(problem, step))


def assert_below(errors: dict[str, float], tol: float) -> None:
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errors})"


# ----------------------------------------------------------------------------------------------
# (a) closed form
# ----------------------------------------------------------------------------------------------

@given(linear_problems())
def test_linear_ode_gradients_match_closed_form(problem: OdeintProblem) -> None:
    assert_below(linear_errors(problem), TOL_CLOSED_FORM)


@given(linear_problems())
def test_linear_ode_gradients_match_closed_form_with_seminorm(problem: OdeintProblem) -> None:
    # The seminorm only relaxes error control on the parameter quadratures, which are
    # integrated by the same high-order steps: the same tolerance holds.
    assert_below(linear_errors(problem, adjoint_norm="seminorm"), TOL_CLOSED_FORM)


RTOLS = (1e-4, 1e-7, 1e-10)


def rtol_errors(problem: OdeintProblem) -> list[float]:
    """Worst relative gradient error vs the closed form at each tolerance in RTOLS (atol = rtol)."""
    return [max(linear_errors(problem, rtol=tol, atol=tol).values()) for tol in RTOLS]


def drops_with_rtol(errs: list[float]) -> bool:
    """Whether the error falls ≥ 10× per 1000× tighter tolerance (until the 1e-12 floor)."""
    return all(fine <= max(coarse / 10, 1e-12) for coarse, fine in zip(errs, errs[1:]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_error_decreases_with_rtol(seed: int) -> None:
    # dopri5's global error scales ~linearly with the tolerance: 1000× tighter should give
    # ≳100× smaller error (measured 400–650×); we require 10× per step (robust to the error
    # estimator's slack) until the float64 floor (1e-12) is reached.
    problem = OdeintProblem(field=LinearSpec(dim=3, dtype=torch.float64, seed=seed, scale=1.5), batch=4,
                            t=(0.0, 0.6, 1.5), seed=seed)
    errs = rtol_errors(problem)
    assert errs[0] > 1e-9, f"problem too easy to show convergence: {errs}"
    assert drops_with_rtol(errs), f"error did not drop with rtol: {errs}"


def test_rk4_gradient_error_converges_at_fourth_order() -> None:
    # snopt's rk4 gradients vs the closed form as the step halves: error ∝ h^4. With
    # output times on the grid, the fitted order must be ≈ 4 (measured 3.98; [3.5, 4.5]
    # allows pre-asymptotic slack, while a first-order bug would give ≤ 1).
    problem = OdeintProblem(field=LinearSpec(dim=3, dtype=torch.float64, seed=5, scale=1.5), batch=3,
                            t=(0.0, 0.5, 1.0), seed=5)
    ref = closed_form_grads(problem)
    hs = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    errs = [max(grad_errors(snopt_grads(problem, method="rk4", options={"step_size": h}), ref).values())
            for h in hs]
    logs = [(math.log(h), math.log(e)) for h, e in zip(hs, errs)]
    mx = sum(x for x, _ in logs) / len(logs)
    my = sum(y for _, y in logs) / len(logs)
    order = sum((x - mx) * (y - my) for x, y in logs) / sum((x - mx) ** 2 for x, _ in logs)
    assert 3.5 <= order <= 4.5, f"fitted order {order:.2f} from errors {errs}"


# ----------------------------------------------------------------------------------------------
# (b) discretise-then-differentiate on the same grid
# ----------------------------------------------------------------------------------------------

@given(mlp_problems(dtypes=(torch.float64,), lattice=1 / 16, max_units=4, max_points=4))
def test_rk4_gradients_match_discrete_reference(problem: OdeintProblem) -> None:
    assert_below(rk4_errors(problem), TOL_RK4_REF)


@given(mlp_problems(dtypes=(torch.float32,), lattice=1 / 16, max_units=4, max_points=3))
def test_rk4_float32_gradients_match_float64_reference(problem: OdeintProblem) -> None:
    got = snopt_grads(problem, method="rk4", options={"step_size": RK4_STEP})
    assert all(g.dtype == torch.float32 for g in (got["y0"], got["t"], *got["params"].values()))
    ref = rk_reference_grads(problem, RK4_STEP, dtype=torch.float64)
    assert_below(grad_errors(got, ref), TOL_RK4_FLOAT32)


@pytest.mark.parametrize("method", ["euler", "rk4"])
@given(problem=mlp_problems(dtypes=(torch.float64,), lattice=1 / 16, max_units=4, max_points=3))
def test_reference_solver_reproduces_torchdiffeq(method: str, problem: OdeintProblem) -> None:
    # Validates the oracle itself: our RK4 (3/8 rule) / Euler equal torchdiffeq's forward
    # solution (which snopt's forward is) up to rounding: 1e-13 for ≤ 128 steps (measured
    # 0: the same operations in the same order).
    module = problem.field.build()
    y0, t = problem.y0(), problem.times()
    got = snopt.odeint(module, y0, t, method=method, options={"step_size": RK4_STEP})
    ref = rk_solve(module, param_dict(module), y0, t, steps=steps_for(t, RK4_STEP), method=method)
    assert rel_err(got, ref) <= 1e-13


@given(mlp_problems(dtypes=(torch.float64,), max_points=3))
def test_dopri5_gradients_match_backprop_through_torchdiffeq(problem: OdeintProblem) -> None:
    # Continuous adjoint vs the exact derivative of the adaptive discrete solution, both at
    # rtol = atol = 1e-10. For y0 and θ each is within ~100·1e-10 of the true gradient
    # (global vs local error for these O(1)-Lipschitz fields; measured ≤ 1.1e-7 apart over
    # 40 problems): 1e-6. The discrete t-gradient is a worse reference: dopri5 clips its
    # last step at each output time, so the discrete solution's dependence on t converges
    # slowly (measured: 1e-7 at tol 1e-10 and 2e-9 at 1e-12, while snopt's is 4e-10 and
    # 3e-12 from a 1e-13 solve): 1e-5 for t.
    kw: dict[str, Any] = {"method": "dopri5", "rtol": 1e-10, "atol": 1e-10}
    got = snopt_grads(problem, **kw)
    module = problem.field.build()
    ref = backprop_grads(module, problem.y0(), problem.times(), problem.loss_fn(), **kw)
    errs = grad_errors(got, ref)
    assert_below({k: errs[k] for k in ("y0", "params")}, 1e-6)
    assert_below({"t": errs["t"]}, 1e-5)


# ----------------------------------------------------------------------------------------------
# torch.func over snopt.odeint
# ----------------------------------------------------------------------------------------------

class Block(nn.Module):
    """A model whose forward calls snopt.odeint (as an ODE block inside a network would)."""

    def __init__(self, field: nn.Module, **solver: Any) -> None:
        super().__init__()
        self.field = field
        self.solver = solver

    def forward(self, y0: Tensor, t: Tensor) -> Tensor:
        out: Tensor = snopt.odeint(self.field, y0, t, **self.solver)
        return out


def func_grad_errors(problem: OdeintProblem) -> dict[str, float]:
    """torch.func.grad over a module calling snopt.odeint vs `.backward()` and vs the closed form."""
    block = Block(problem.field.build(), **TIGHT)
    loss_fn = problem.loss_fn()

    def loss(p: dict[str, Tensor], y: Tensor, tt: Tensor) -> Tensor:
        return loss_fn(functional_call(block, p, (y, tt)))

    gp, gy, gt = torch.func.grad(loss, argnums=(0, 1, 2))(param_dict(block), problem.y0(), problem.times())
    got = {"y0": gy, "t": gt, "params": {k.removeprefix("field."): v for k, v in gp.items()}}
    return {"autograd": max(grad_errors(got, snopt_grads(problem, **TIGHT)).values()),
            "closed": max(grad_errors(got, closed_form_grads(problem)).values())}


@given(linear_problems(max_points=3))
def test_func_grad_over_module_matches_autograd_and_closed_form(problem: OdeintProblem) -> None:
    errs = func_grad_errors(problem)
    # Same arithmetic on both paths (the Function's backward): agreement to rounding.
    assert errs["autograd"] <= 1e-12, errs
    assert errs["closed"] <= TOL_CLOSED_FORM, errs


JVP_FD_EPS = 1e-4


def jvp_errors(problem: OdeintProblem, seed: int) -> dict[str, float]:
    """torch.func.jvp of snopt.odeint (in A, b, y0, t) vs the closed form's jvp and central differences."""
    assert isinstance(problem.field, LinearSpec)
    A, b = problem.field.matrices()
    y0, t = problem.y0(), problem.times()
    g = torch.Generator().manual_seed(seed)
    primals = (A, b, y0, t)
    tangents = tuple(torch.randn(x.shape, generator=g, dtype=torch.float64) for x in primals)
    field = problem.field.build()

    def solve(A_: Tensor, b_: Tensor, y_: Tensor, t_: Tensor) -> Tensor:
        out: Tensor = functional_call(Block(field, **TIGHT), {"field.A": A_, "field.b": b_}, (y_, t_))
        return out

    _, jv = cast(tuple[Tensor, Tensor], torch.func.jvp(solve, primals, tangents))
    _, jv_exact = cast(tuple[Tensor, Tensor], torch.func.jvp(lambda *a: linear_solution(*a), primals, tangents))
    eps = JVP_FD_EPS
    plus = solve(*(p + eps * v for p, v in zip(primals, tangents)))
    minus = solve(*(p - eps * v for p, v in zip(primals, tangents)))
    fd = (plus - minus) / (2 * eps)
    return {"closed": rel_err(jv, jv_exact), "fd": rel_err(jv, fd), "fd_vs_closed": rel_err(fd, jv_exact)}


@given(linear_problems(max_points=3), st.integers(0, 2**31 - 1))
def test_jvp_matches_closed_form_and_finite_differences(problem: OdeintProblem, seed: int) -> None:
    errs = jvp_errors(problem, seed)
    assert errs["closed"] <= TOL_CLOSED_FORM, errs
    # Central differences of snopt's forward solution: truncation ε²·|x⁗|/6 ~ 1e-8 and
    # solver noise tol/ε ~ 1e-8 at ε = 1e-4, tol = 1e-12: 1e-6 is a safe bound. The FD
    # check (of the forward solve only) validates the jvp independently of the closed form.
    assert errs["fd"] <= 1e-6, errs
    assert errs["fd_vs_closed"] <= 1e-6, errs


def vmap_errors(problem: OdeintProblem) -> dict[str, float]:
    """Compare vmap over y0 of snopt.odeint and of torch.func.grad through it, vs a Python loop."""
    field = problem.field.build()
    t = problem.times()
    ys0 = torch.stack([problem.y0(), problem.y0().flip(0) * 0.5 + 0.1])
    loss_fn = problem.loss_fn()

    def run(y: Tensor) -> Tensor:
        out: Tensor = snopt.odeint(field, y, t, rtol=1e-9, atol=1e-9)
        return out

    batched = torch.func.vmap(run)(ys0)
    looped = torch.stack([run(y) for y in ys0])
    per_sample = torch.func.vmap(torch.func.grad(lambda y: loss_fn(run(y))))(ys0)
    grads = []
    for y in ys0:
        y_ = y.clone().requires_grad_(True)
        loss_fn(run(y_)).backward()  # type: ignore[no-untyped-call]
        assert y_.grad is not None
        grads.append(y_.grad)
    return {"values": rel_err(batched, looped), "grads": rel_err(per_sample, torch.stack(grads))}


@given(mlp_problems(dtypes=(torch.float64,), max_points=3))
def test_vmap_over_y0_matches_loop(problem: OdeintProblem) -> None:
    # The vmap rule runs one solve per member: identical arithmetic, so equal to rounding.
    errs = vmap_errors(problem)
    assert max(errs.values()) <= 1e-13, errs


def test_backprop_hessian_reference_matches_closed_form() -> None:
    # Validates the second-order oracle `backprop_hessian` (double backward through plain
    # dopri5) against torch.func.hessian of the closed form, in θ = (A, b) flattened in
    # parameters() order. dopri5 at 1e-9: the discrete solution's second derivatives are
    # within ~C·1e-9 of the exact ones (measured 1.3e-9); 1e-7 is the bound.
    problem = OdeintProblem(field=LinearSpec(dim=2, dtype=torch.float64, seed=7, scale=1.0), batch=1,
                            t=(0.0, 0.4, 0.8), seed=7)
    assert isinstance(problem.field, LinearSpec)
    A, b = problem.field.matrices()
    y0, t, loss_fn = problem.y0(), problem.times(), problem.loss_fn()
    got = backprop_hessian(problem.field.build(), y0, t, loss_fn, rtol=1e-9, atol=1e-9)

    def loss(flat: Tensor) -> Tensor:
        return loss_fn(linear_solution(flat[:4].reshape(2, 2), flat[4:], y0, t))

    exact = torch.func.hessian(loss)(torch.cat([A.reshape(-1), b]))
    assert got.shape == (6, 6)
    assert rel_err(got, exact) <= 1e-7


JACREV_PROBLEM = OdeintProblem(field=LinearSpec(dim=2, dtype=torch.float64, seed=11, scale=1.0), batch=1,
                               t=(0.0, 0.7, 1.3), seed=11)


def jacrev_errors(problem: OdeintProblem) -> dict[str, float]:
    """torch.func.jacrev of all outputs w.r.t. y0 and t vs the closed form's."""
    assert isinstance(problem.field, LinearSpec)
    A, b = problem.field.matrices()
    field, y0, t = problem.field.build(), problem.y0(), problem.times()

    def solve(y: Tensor, tt: Tensor) -> Tensor:
        out: Tensor = snopt.odeint(field, y, tt, **TIGHT)
        return out

    got = torch.func.jacrev(solve, argnums=(0, 1))(y0, t)
    exact = torch.func.jacrev(lambda y, tt: linear_solution(A, b, y, tt), argnums=(0, 1))(y0, t)
    return {"y0": rel_err(got[0], exact[0]), "t": rel_err(got[1], exact[1])}


def test_jacrev_over_odeint_matches_closed_form() -> None:
    # torch.func.jacrev = vmap over the vjp: exercises the backward's vmap rule (one
    # adjoint solve per cotangent).
    assert_below(jacrev_errors(JACREV_PROBLEM), TOL_CLOSED_FORM)
