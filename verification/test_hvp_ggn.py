"""Claim: `hvp`, `ggn_vp` and the Gauss-Newton mode of `second_order` have the properties of the exact objects.

Checked without any external reference (the same-grid and closed-form comparisons are in
test_second_order.py): symmetry, linearity in v, agreement between the three front doors,
positive semi-definiteness of Gauss-Newton for a convex Φ, Gauss-Newton = Hessian when x(t1)
is affine in (x0, θ) jointly, and central finite differences of the gradients.

All on a fixed RK4 grid in float64 unless said otherwise, so the discretisation is the same
for every quantity compared.
"""

import copy
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from hypothesis import given, settings
from torch import Tensor, nn

import snopt
from snopt.testing import SecondOrderProblem, rel_err
from snopt.testing.strategies import second_order_problems

STEP = 1.0 / 256
GRID: dict[str, Any] = {"method": "rk4", "options": {"step_size": STEP}}
# Quantities that integrate the *same* equations on the same grid (or linear combinations of
# them) agree to rounding: ~1e-15 per operation, accumulated over ≤ 32 steps × 4 stages and
# amplified by ||H|| / (smallest compared entry); measured ≤ 1e-13.
TOL_ROUNDING = 1e-10
# Different discretisations of the same derivative (hvp's tangent ODE vs second_order's matrix
# ODE; ggn_vp's vs second_order(gauss_newton=True)'s): O(h⁴) apart. Measured over 40 draws
# (weights up to 2/sqrt(fan_in), spans ≤ 1/8) at h = 1/256: hvp 5.5e-10, ggn_vp 4.5e-10,
# self-adjointness 2.8e-12 (at h = 1/128 and spans ≤ 1/4: 4.1e-8, 6.3e-8, 1.4e-10).
TOL_DISCRETISATION = 1e-8
# The exact GN J_zᵀ Φ_xx J_z has rank ≤ n, so most of its eigenvalues are 0; RK4 applied to the
# matrix ODE dW/dt = −(W K̄ + K̄ᵀ W) is a truncated series, not a congruence, and perturbs
# those zeros by O(h⁴)·||W|| of either sign: measured ≥ −3.8e-11·λ_max over 40 draws at
# h = 1/256 (−5.4e-9 at 1/128). A planted indefinite term would show as the exact Hessian does
# in the control test (≤ −1e-3·λ_max).
TOL_PSD = 1e-9
# Central differences with ε = 1e-5: truncation ε²/6 · |∂³L| / |∂²L v| and rounding
# 1e-16 · |g| / ε ≈ 1e-11 · |g| / |Hv|, plus the O(h⁴) gap between the differentiated-then-
# discretised gradient and its own exact derivative. Measured ≤ 1.6e-9 over 12 draws (with
# ε = 1e-4 the truncation term reached 5.4e-7).
TOL_FD = 1e-7
FD_EPS = 1e-5


def _fraction(n: int) -> int:
    return max(2, round(settings().max_examples * n / 8))


def _rand(shape: int | tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _num_params(func: nn.Module) -> int:
    return sum(p.numel() for p in func.parameters() if p.requires_grad)


def _shifted(func: nn.Module, v: Tensor) -> nn.Module:
    out = copy.deepcopy(func)
    theta = nn.utils.parameters_to_vector(out.parameters())
    nn.utils.vector_to_parameters(theta + v, out.parameters())
    return out


def _rel_asym(m: Tensor) -> float:
    return float((m - m.T).norm() / m.norm())




# ----------------------------------------------------------------------------------------------
# Symmetry and agreement of the front doors
# ----------------------------------------------------------------------------------------------

@settings(max_examples=_fraction(2))
@given(second_order_problems("mlp", lattice=1 / 16, max_units=2, max_batch=4))
def test_hessian_symmetric_and_hvp_agrees(case: SecondOrderProblem) -> None:
    """Full W symmetric; hvp == hess_params v; ggn_vp == GN hess_params v; vᵀ(H w) == wᵀ(H v)."""
    func, x0, t_span, loss_fn = case.build()
    p = _num_params(func)
    v, w = _rand(p, case.seed % 1000), _rand(p, case.seed % 1000 + 1)
    so = snopt.second_order(func, x0, t_span, loss_fn, **GRID)
    gn = snopt.second_order(func, x0, t_span, loss_fn, gauss_newton=True, **GRID)
    for res in (so, gn):
        full = torch.cat([torch.cat([res.hess_x0, res.hess_x0_params], 1),
                          torch.cat([res.hess_x0_params.T, res.hess_params], 1)], 0)
        assert _rel_asym(full) <= 1e-12
    hv = snopt.hvp(func, x0, t_span, loss_fn, torch.stack([v, w]), **GRID)
    assert rel_err(hv[0], so.hess_params @ v) <= TOL_DISCRETISATION
    assert rel_err(hv[1], so.hess_params @ w) <= TOL_DISCRETISATION
    # Self-adjointness of the hvp operator itself, without forming H.
    assert abs(float(w @ hv[0] - v @ hv[1])) <= TOL_DISCRETISATION * float(hv.norm() * v.norm())
    gv = snopt.ggn_vp(func, x0, t_span, loss_fn, v, **GRID)
    assert rel_err(gv, gn.hess_params @ v) <= TOL_DISCRETISATION
    # Gauss-Newton keeps the gradient and drops a non-zero term: the blocks must differ.
    assert rel_err(gn.grad_params, so.grad_params) <= TOL_ROUNDING
    assert rel_err(gn.hess_params, so.hess_params) > 1e-6


DOPRI5: dict[str, Any] = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-8}
@pytest.mark.parametrize(("product", "solver"), [
    pytest.param(snopt.hvp, GRID, id="hvp-rk4"),
    pytest.param(snopt.hvp, DOPRI5, id="hvp-dopri5"),
    pytest.param(snopt.ggn_vp, GRID, id="ggn_vp-rk4"),
    pytest.param(snopt.ggn_vp, DOPRI5, id="ggn_vp-dopri5"),
])
def test_products_linear_in_v(product: Any, solver: dict[str, Any]) -> None:
    """P(a v + b w) = a P(v) + b P(w) across calls, and a (k, p) batch equals k single calls.

    Exact to rounding also with dopri5 when the error control ignores the tangents (the
    default seminorm): the step sizes then do not depend on v. (ggn_vp's backward solve
    controlled the v-dependent cotangents until this test caught it: results then moved by
    ~rtol with the other directions in the batch.)
    """
    case = SecondOrderProblem("mlp", 2, 6, "softplus", True, 3, 0.0, 0.125, "ce", 5, 1.2)
    func, x0, t_span, loss_fn = case.build()
    p = _num_params(func)
    v, w = _rand(p, 1), _rand(p, 2)
    batch = product(func, x0, t_span, loss_fn, torch.stack([v, w]), **solver)
    assert batch.shape == (2, p)
    single = product(func, x0, t_span, loss_fn, 2.0 * v - 3.0 * w, **solver)
    assert single.shape == (p,)
    assert rel_err(single, 2.0 * batch[0] - 3.0 * batch[1]) <= TOL_ROUNDING


# ----------------------------------------------------------------------------------------------
# Gauss-Newton
# ----------------------------------------------------------------------------------------------

@settings(max_examples=_fraction(3))
@given(second_order_problems("mlp", lattice=1 / 16, max_units=2, max_batch=4, max_scale=2.0))
def test_gauss_newton_psd_for_convex_loss(case: SecondOrderProblem) -> None:
    """MSE and cross-entropy are convex in x(t1): the GN matrix over (x0, θ) is PSD, the exact one need not be."""
    func, x0, t_span, loss_fn = case.build()
    gn = snopt.second_order(func, x0, t_span, loss_fn, gauss_newton=True, **GRID)
    full = torch.cat([torch.cat([gn.hess_x0, gn.hess_x0_params], 1),
                      torch.cat([gn.hess_x0_params.T, gn.hess_params], 1)], 0)
    eig = torch.linalg.eigvalsh(0.5 * (full + full.T))
    assert float(eig.min()) >= -TOL_PSD * float(eig.abs().max()), eig
    v = _rand(gn.hess_params.shape[0], 3)
    assert float(v @ snopt.ggn_vp(func, x0, t_span, loss_fn, v, **GRID)) >= 0.0


def test_exact_hessian_of_nonconvex_problem_is_indefinite() -> None:
    """Control for the PSD test: the same machinery reports negative curvature where there is some."""
    case = SecondOrderProblem("mlp", 2, 8, "tanh", False, 2, 0.0, 0.125, "mse", 7, 1.5)
    func, x0, t_span, loss_fn = case.build()
    so = snopt.second_order(func, x0, t_span, loss_fn, **GRID)
    eig = torch.linalg.eigvalsh(so.hess_params)
    assert float(eig.min()) < -1e-3 * float(eig.abs().max()), eig


@settings(max_examples=_fraction(3))
@given(second_order_problems("affine", lattice=1 / 16, max_units=2))
def test_gauss_newton_equals_hessian_when_flow_affine(case: SecondOrderProblem) -> None:
    """F = A0 x + b + t c, θ = (b, c): x(t1) is affine in (x0, θ) jointly, so GN == Hessian.

    `second_order(gauss_newton=True)` equals the exact mode (which test_second_order.py checks
    against the exact Hessian of the discretisation for this field), and ggn_vp == hvp. Holds
    for cross-entropy as well: only the flow must be affine. Control: on an MLP field the two
    differ (test_hessian_symmetric_and_hvp_agrees).
    """
    func, x0, t_span, loss_fn = case.build()
    gn = snopt.second_order(func, x0, t_span, loss_fn, gauss_newton=True, **GRID)
    so = snopt.second_order(func, x0, t_span, loss_fn, **GRID)
    for k in ("hess_params", "hess_x0", "hess_x0_params"):
        assert rel_err(getattr(gn, k), getattr(so, k)) <= TOL_ROUNDING, k
    v = _rand(gn.hess_params.shape[0], 4)
    hv = snopt.hvp(func, x0, t_span, loss_fn, v, **GRID)
    assert rel_err(snopt.ggn_vp(func, x0, t_span, loss_fn, v, **GRID), hv) <= TOL_ROUNDING


def test_ggn_vp_hessian_roots_path_matches_autodiff_path() -> None:
    """`ggn_vp` applies Φ_xx through `hessian_roots` when the loss has them; without them by autodiff."""
    for loss in ("mse", "ce"):
        case = SecondOrderProblem("mlp", 3, 5, "silu", True, 4, 0.0, 0.125, loss, 9, 1.0)
        func, x0, t_span, loss_fn = case.build()
        v = _rand(_num_params(func), 5)
        with_roots = snopt.ggn_vp(func, x0, t_span, loss_fn, v, **GRID)
        plain = snopt.ggn_vp(func, x0, t_span, cast(Callable[[Tensor], Tensor], lambda x, f=loss_fn: f(x)), v, **GRID)
        assert rel_err(with_roots, plain) <= TOL_ROUNDING


# ----------------------------------------------------------------------------------------------
# Finite differences of the gradients
# ----------------------------------------------------------------------------------------------

@settings(max_examples=_fraction(2))
@given(second_order_problems("mlp", lattice=1 / 16, max_units=2, max_batch=4))
def test_central_differences_of_gradients(case: SecondOrderProblem) -> None:
    """(∇L(θ + εv) − ∇L(θ − εv)) / 2ε == H v for the θθ, x0x0 and x0θ blocks (both directions)."""
    func, x0, t_span, loss_fn = case.build()
    p, n = _num_params(func), x0.numel()
    v, u = _rand(p, 6), _rand(n, 7).reshape(x0.shape)
    so = snopt.second_order(func, x0, t_span, loss_fn, **GRID)

    def grads(f: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        # gauss_newton=True: same grad_params / grad_x0 (the gradient ODEs are untouched), cheaper.
        r = snopt.second_order(f, x, t_span, loss_fn, gauss_newton=True, **GRID)
        return r.grad_params, r.grad_x0.reshape(-1)

    gp_plus, gx_plus = grads(_shifted(func, FD_EPS * v), x0)
    gp_minus, gx_minus = grads(_shifted(func, -FD_EPS * v), x0)
    assert rel_err((gp_plus - gp_minus) / (2 * FD_EPS), so.hess_params @ v) <= TOL_FD
    assert rel_err((gx_plus - gx_minus) / (2 * FD_EPS), so.hess_x0_params @ v) <= TOL_FD
    gp_plus, gx_plus = grads(func, x0 + FD_EPS * u)
    gp_minus, gx_minus = grads(func, x0 - FD_EPS * u)
    assert rel_err((gx_plus - gx_minus) / (2 * FD_EPS), so.hess_x0 @ u.reshape(-1)) <= TOL_FD
    assert rel_err((gp_plus - gp_minus) / (2 * FD_EPS), so.hess_x0_params.T @ u.reshape(-1)) <= TOL_FD
