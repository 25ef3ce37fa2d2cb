"""Claim: `snopt.second_order` (and `hvp`, `ggn_vp`) return the exact derivatives of L = Φ(x(t1)).

References (`snopt.testing`, independent of snopt's adjoint code):

* **Same grid.** `GridReference`: `torch.func.hessian` of L(x0, θ, t1) through our pure-torch RK4
  (torchdiffeq's 3/8 rule) with n steps of size h = (t1 − t0)/n, i.e. the exact derivatives of the
  discretisation snopt's forward solve uses with ``method="rk4", options={"step_size": h}``.
  snopt differentiates first and discretises the adjoint ODEs on the same grid, so the two
  agree up to O(h⁴), not to rounding.
* **Closed form.** `ClosedFormReference`: dx/dt = A x + b solved by `matrix_exp`, differentiated by
  `torch.func.hessian`, against snopt's dopri5 at tight tolerance; and the error must fall as rtol falls.

The property tests assert with `assert_second_order_close` / `assert_close` (a failure names the
block and its worst entries); the error helpers (`grid_errors`, `closed_form_errors`) are reused by
test_second_order_mutation.py to show each check fails when a term of the adjoint ODEs is dropped.
"""

import functools
from typing import Any, cast

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import snopt
from snopt import SecondOrderResult
from snopt.testing import (
    SECOND_ORDER_BLOCKS,
    ClosedFormReference,
    GridReference,
    LinearField,
    SecondOrderProblem,
    assert_close,
    assert_second_order_close,
    rel_err,
    second_order_errors,
)
from snopt.testing.strategies import second_order_problems

# Step of the fixed grid: a power of two, so it divides the spans (multiples of 1/16) exactly.
# The affine field gets a finer one: its θθ block is small and nearly singular (F_θ = [I, t I]
# over short spans), so its *relative* O(h⁴) error has a large constant.
STEP = 1.0 / 256
STEPS = {"affine": 1.0 / 512}
# snopt (differentiate, then RK4 on the grid) vs the exact Hessian of the RK4 discretisation:
# both are O(h⁴) approximations of the true derivatives, so they differ by C·h⁴ with
# h⁴ = 2.3e-10 (h = 1/256) and C the 3/8 rule's error constant times field derivatives and,
# for a *relative* error, over ||block|| (which shrinks with the span: spans ≥ 1/8 here).
# Measured over 40 draws per field kind at h = 1/256: MLP hess_params ≤ 1.1e-9, conv ≤ 6.4e-10,
# affine 2.5e-9 (hence 1/512 for it: 16× less), hvp ≤ 7e-11, ggn_vp ≤ 2e-11; every error falls
# 16× per halving of h. The contract is 1e-8. Dropping any term of the adjoint ODEs
# gives errors of O(1e-1)–O(1) (test_second_order_mutation.py).
TOL_GRID = 1e-8
# ∂L/∂t1, ∂²L/∂t1², ∂²L/∂t1∂θ: snopt uses the continuous formulas (Φ_xᵀF at t1,
# Fᵀ Φ_xx F + Φ_xᵀ(F_t + F_x F), ...) while the reference differentiates a grid whose step
# h = (t1 − t0)/n moves with t1. The discretisation error C h⁴ = C (T/n)⁴ then contributes
# 4C h⁴/T to ∂/∂t1 and 12C h⁴/T² to ∂²/∂t1²: for short spans the t1 blocks sit far above the
# others (measured at h = 1/256: hess_t1 5.9e-8 on a conv field over 1/16; over spans ≥ 1/8:
# hess_t1 ≤ 4.5e-9, grad_t1 ≤ 1e-9, hess_t1_params ≤ 3e-10). 1e-6 is the contract.
TOL_GRID_T1 = 1e-6
# Closed form vs dopri5 at rtol 1e-11, atol 1e-13: the forward and backward global errors are
# ~C·rtol with C = O(exp(||A|| T)) ≲ 10 here. hvp's and ggn_vp's default error control
# ("seminorm") ignores the tangent and parameter accumulators, so their errors relative to a
# small ||Hv|| reach ~1000× rtol on short spans with small curvature (at rtol 1e-9: hvp 4e-7
# where norm="mixed" gives 5e-10). Measured over 40 draws at rtol 1e-11: hvp ≤ 9.0e-9, ggn_vp
# ≤ 9.6e-10, every second_order block ≤ 1.1e-10. The contract is 1e-7.
TOL_CLOSED_FORM = 1e-7
TIGHT: dict[str, Any] = {"method": "dopri5", "rtol": 1e-11, "atol": 1e-13}


PARTS = ("second_order", "hvp", "ggn_vp")
T1_BLOCKS = ("grad_t1", "hess_t1", "hess_t1_params")
Reference = tuple[SecondOrderResult, Tensor]
# What snopt returned and what it should have: "second_order" → (result, reference result),
# "hvp" / "ggn_vp" → (product, reference product).
Pairs = dict[str, tuple[Any, Any]]


@functools.cache
def grid_reference(case: SecondOrderProblem, step: float) -> Reference:
    """(second-order result, GGN) of the RK4 discretisation with `step` (cached: mutation tests reuse it)."""
    func, x0, t_span, loss_fn = case.build()
    ref = GridReference(func, x0, t_span, loss_fn, method="rk4", steps=case.steps(step))
    return ref.second_order(), ref.ggn()


@functools.cache
def closed_form_reference(case: SecondOrderProblem) -> Reference:
    """(second-order result, GGN) of the `matrix_exp` solution (cached)."""
    assert case.kind == "linear"
    func, x0, t_span, loss_fn = case.build()
    ref = ClosedFormReference(cast(LinearField, func), x0, t_span, loss_fn)
    return ref.second_order(), ref.ggn()


def snopt_pairs(case: SecondOrderProblem, solver: dict[str, Any], reference: Reference, parts: tuple[str, ...],
                v_seed: int) -> Pairs:
    func, x0, t_span, loss_fn = case.build()
    expected, ggn = reference
    pairs: Pairs = {}
    if "second_order" in parts:
        pairs["second_order"] = (snopt.second_order(func, x0, t_span, loss_fn, wrt_t1=True, **solver), expected)
    v = torch.randn(ggn.shape[0], generator=torch.Generator().manual_seed(v_seed), dtype=torch.float64)
    if "hvp" in parts:
        pairs["hvp"] = (snopt.hvp(func, x0, t_span, loss_fn, v, **solver), expected.hess_params @ v)
    if "ggn_vp" in parts:
        pairs["ggn_vp"] = (snopt.ggn_vp(func, x0, t_span, loss_fn, v, **solver), ggn @ v)
    return pairs


def errors(pairs: Pairs) -> dict[str, float]:
    """Relative error of every block and product."""
    errs: dict[str, float] = {}
    for part, (got, want) in pairs.items():
        errs.update(second_order_errors(got, want) if part == "second_order" else {part: rel_err(got, want)})
    return errs


def assert_pairs(pairs: Pairs, rtol: float, rtol_t1: float | None = None) -> None:
    """Every block and product within `rtol` (the t1 blocks within `rtol_t1`), with snopt.testing's report."""
    per_block = {k: rtol_t1 if rtol_t1 is not None and k in T1_BLOCKS else rtol for k in SECOND_ORDER_BLOCKS}
    for part, (got, want) in pairs.items():
        if part == "second_order":
            assert_second_order_close(got, want, rtol=per_block)
        else:
            assert_close(got, want, rtol=rtol, name=part)


def grid_step(case: SecondOrderProblem) -> float:
    return STEPS.get(case.kind, STEP)


def grid_pairs(case: SecondOrderProblem, parts: tuple[str, ...] = PARTS, *, v_seed: int = 0) -> Pairs:
    step = grid_step(case)
    return snopt_pairs(case, {"method": "rk4", "options": {"step_size": step}}, grid_reference(case, step), parts,
                       v_seed)


def closed_form_pairs(case: SecondOrderProblem, solver: dict[str, Any], parts: tuple[str, ...] = PARTS, *,
                      v_seed: int = 0) -> Pairs:
    return snopt_pairs(case, solver, closed_form_reference(case), parts, v_seed)


def grid_errors(case: SecondOrderProblem, parts: tuple[str, ...] = PARTS, *, v_seed: int = 0) -> dict[str, float]:
    """Relative errors of every `second_order(wrt_t1=True)` block, `hvp` and `ggn_vp` on the RK4 grid."""
    return errors(grid_pairs(case, parts, v_seed=v_seed))


def closed_form_errors(case: SecondOrderProblem, solver: dict[str, Any], parts: tuple[str, ...] = PARTS, *,
                       v_seed: int = 0) -> dict[str, float]:
    """Relative errors of every block, `hvp` and `ggn_vp` against the `matrix_exp` solution."""
    return errors(closed_form_pairs(case, solver, parts, v_seed=v_seed))


def assert_within(errs: dict[str, float], tol: float) -> None:
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errs})"


def _fraction(n: int) -> int:
    """`n` examples under the fast profile, scaled up with the profile (thorough: 60 → 7.5 n)."""
    return max(2, round(settings().max_examples * n / 8))




# ----------------------------------------------------------------------------------------------
# Same grid: torch.func.hessian through the RK4 discretisation
# ----------------------------------------------------------------------------------------------

@settings(max_examples=_fraction(6))
@given(second_order_problems("mlp", lattice=1 / 16, min_units=2, max_units=4))
def test_mlp_matches_hessian_of_rk4_discretisation(case: SecondOrderProblem) -> None:
    """Random MLP fields (tanh/softplus/SiLU, ± time-dependent), batch 1–8, MSE or cross-entropy."""
    assert_pairs(grid_pairs(case), TOL_GRID, TOL_GRID_T1)


@settings(max_examples=_fraction(3))
@given(second_order_problems("conv", lattice=1 / 16, min_units=2, max_units=3, max_batch=2, max_dim=2, max_width=2))
def test_conv_field_matches_hessian_of_rk4_discretisation(case: SecondOrderProblem) -> None:
    """A Conv2d field on 4×4 images with 1–2 channels, batch 1–2 (n ≤ 64, p ≤ 80)."""
    assert_pairs(grid_pairs(case), TOL_GRID, TOL_GRID_T1)


@settings(max_examples=_fraction(2))
@given(second_order_problems("affine", lattice=1 / 16, min_units=2, max_units=4))
def test_affine_field_matches_hessian_of_rk4_discretisation(case: SecondOrderProblem) -> None:
    """θ entering linearly (time-dependent forcing): the Hessian is pure Gauss-Newton here."""
    assert_pairs(grid_pairs(case), TOL_GRID, TOL_GRID_T1)


# ----------------------------------------------------------------------------------------------
# Closed form: linear ODE via matrix_exp, adaptive dopri5
# ----------------------------------------------------------------------------------------------

@st.composite
def linear_cases(draw: st.DrawFn) -> SecondOrderProblem:
    """dx/dt = A x + b, dim 1–3, batch 1–8, any t0 ∈ [−1, 1], span ±[0.1, 1.5]."""
    t0 = draw(st.floats(-1.0, 1.0))
    span = draw(st.floats(0.1, 1.5)) * draw(st.sampled_from((1.0, -1.0)))
    return SecondOrderProblem(kind="linear", dim=draw(st.integers(1, 3)), width=0, activation="", time_dependent=False,
                batch=draw(st.integers(1, 8)), t0=t0, t1=t0 + span, loss=draw(st.sampled_from(("mse", "ce"))),
                seed=draw(st.integers(0, 2**31 - 1)), scale=draw(st.floats(0.25, 1.5)),
                classes=draw(st.integers(2, 4)))


@settings(max_examples=_fraction(5))
@given(linear_cases())
def test_linear_ode_matches_closed_form(case: SecondOrderProblem) -> None:
    """Every block (θ = (A, b), x0 and t1), hvp and ggn_vp against matrix_exp, dopri5 rtol 1e-9."""
    assert_pairs(closed_form_pairs(case, TIGHT), TOL_CLOSED_FORM)


@pytest.mark.parametrize("case", [
    SecondOrderProblem("linear", 3, 0, "", False, 4, 0.2, 1.3, "mse", 11, 1.2),
    SecondOrderProblem("linear", 2, 0, "", False, 3, 0.5, -0.5, "ce", 12, 1.5),
], ids=["mse-forward", "ce-backward"])
def test_error_falls_with_rtol(case: SecondOrderProblem) -> None:
    """dopri5: each 100× smaller rtol (atol = rtol/100) makes every error at least 10× smaller.

    Measured: ~100× per level (the global error of a 5th-order method with error per unit
    step ∝ rtol is ∝ rtol), e.g. hess_params 3e-5, 2e-7, 2e-9 at rtol 1e-4, 1e-6, 1e-8.
    """
    keys = ("grad_params", "hess_params", "hess_x0", "hess_x0_params", "hess_t1", "hvp", "ggn_vp")
    errs = [closed_form_errors(case, {"method": "dopri5", "rtol": r, "atol": r / 100}) for r in (1e-4, 1e-6, 1e-8)]
    for k in keys:
        series = [e[k] for e in errs]
        assert series[1] <= series[0] / 10 and series[2] <= series[1] / 10, (k, series)
    assert_within(errs[-1], 1e-6)
