"""Each check of test_odeint_gradients.py fails on a deliberately wrong term (DESIGN.md §5).

Every case plants one bug into snopt's adjoint with pytest's `monkeypatch` (undone after
the test) and runs the *same* comparison helper the property tests use, on a fixed small
problem, asserting the error now exceeds the property test's tolerance. A control test
runs every comparison unmutated on the same problems, so a "kill" cannot come from the
problem itself. (The memory checks are shown able to fail on plain backprop through
torchdiffeq in test_odeint_memory.py.)
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import snopt.adjoint._function as fn
from snopt.testing import FieldSpec, LinearSpec, OdeintProblem
from verification import test_odeint_gradients as grads

LINEAR = OdeintProblem(field=LinearSpec(dim=3, dtype=torch.float64, seed=1, scale=1.0), batch=2,
                       t=(0.0, 0.4, 1.0), seed=1)
LINEAR_DOWN = OdeintProblem(field=LinearSpec(dim=2, dtype=torch.float64, seed=2, scale=1.0), batch=3,
                            t=(1.0, 0.5, -0.25), seed=2)
MLP = OdeintProblem(field=FieldSpec(dim=2, width=8, activation="tanh", time_dependent=True, dtype=torch.float64,
                                    seed=3), batch=2, t=(0.0, 0.125, 0.25), seed=3)
MLP32 = OdeintProblem(field=FieldSpec(dim=2, width=8, activation="silu", time_dependent=True, dtype=torch.float32,
                                      seed=4), batch=2, t=(0.0, 0.125, 0.25), seed=4)




# ----------------------------------------------------------------------------------------------
# The checks, as (errors, tolerance) — exactly what the property tests assert
# ----------------------------------------------------------------------------------------------

Check = Callable[[], tuple[float, float]]


def closed_form(problem: OdeintProblem, **kw: Any) -> Check:
    return lambda: (max(grads.linear_errors(problem, **kw).values()), grads.TOL_CLOSED_FORM)


def closed_form_key(problem: OdeintProblem, key: str) -> Check:
    return lambda: (grads.linear_errors(problem)[key], grads.TOL_CLOSED_FORM)


def rk4_reference(problem: OdeintProblem) -> Check:
    return lambda: (max(grads.rk4_errors(problem).values()), grads.TOL_RK4_REF)


def rk4_float32(problem: OdeintProblem) -> Check:
    def run() -> tuple[float, float]:
        got = grads.snopt_grads(problem, method="rk4", options={"step_size": grads.RK4_STEP})
        ref = grads.rk_reference_grads(problem, grads.RK4_STEP, dtype=torch.float64)
        return max(grads.grad_errors(got, ref).values()), grads.TOL_RK4_FLOAT32
    return run


def func_grad(problem: OdeintProblem) -> Check:
    return lambda: (grads.func_grad_errors(problem)["closed"], grads.TOL_CLOSED_FORM)


def jvp(problem: OdeintProblem) -> Check:
    return lambda: (grads.jvp_errors(problem, seed=0)["closed"], grads.TOL_CLOSED_FORM)


def jvp_fd(problem: OdeintProblem) -> Check:
    return lambda: (grads.jvp_errors(problem, seed=0)["fd"], 1e-6)


def jacrev(problem: OdeintProblem) -> Check:
    return lambda: (max(grads.jacrev_errors(problem).values()), grads.TOL_CLOSED_FORM)


def vmap(problem: OdeintProblem) -> Check:
    return lambda: (max(grads.vmap_errors(problem).values()), 1e-13)


def rtol_convergence(problem: OdeintProblem) -> Check:
    # 0 when the error drops with rtol as required, 1 when it does not.
    return lambda: (0.0 if grads.drops_with_rtol(grads.rtol_errors(problem)) else 1.0, 0.5)


RTOL_PROBLEM = OdeintProblem(field=LinearSpec(dim=3, dtype=torch.float64, seed=0, scale=1.5), batch=4,
                             t=(0.0, 0.6, 1.5), seed=0)

CHECKS: dict[str, Check] = {
    "closed_form": closed_form(LINEAR),
    "closed_form_decreasing_t": closed_form(LINEAR_DOWN),
    "closed_form_seminorm": closed_form(LINEAR, adjoint_norm="seminorm"),
    "closed_form_t": closed_form_key(LINEAR, "t"),
    "rk4_reference": rk4_reference(MLP),
    "rk4_float32": rk4_float32(MLP32),
    "func_grad": func_grad(LINEAR),
    "jvp_closed_form": jvp(LINEAR),
    "jvp_finite_differences": jvp_fd(LINEAR),
    "vmap": vmap(MLP),
    "jacrev": jacrev(grads.JACREV_PROBLEM),
    "rtol_convergence": rtol_convergence(RTOL_PROBLEM),
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_control_every_check_passes_unmutated(name: str) -> None:
    err, tol = CHECKS[name]()
    assert err <= tol, f"{name}: {err:.3g} > {tol:.3g} without any mutation"


# ----------------------------------------------------------------------------------------------
# Mutations
# ----------------------------------------------------------------------------------------------

Mutation = Callable[[pytest.MonkeyPatch], None]


def _dynamics(edit: Callable[[Tensor, Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]]) -> Mutation:
    """Wrap the backward dynamics, whose output is (F, −aᵀF_x, −aᵀF_θ per parameter), and edit it."""
    def apply(mp: pytest.MonkeyPatch) -> None:
        orig = fn._BackwardDynamics.__call__

        def call(self: fn._BackwardDynamics, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            f, da, *dg = orig(self, t, state)
            return edit(f, da, tuple(dg))
        mp.setattr(fn._BackwardDynamics, "__call__", call)
    return apply


# (x, a, g_θ)' = (F, −aᵀF_x, −aᵀF_θ) with one term wrong:
drop_param_term = _dynamics(lambda f, da, dg: (f, da, *(torch.zeros_like(g) for g in dg)))
flip_param_term = _dynamics(lambda f, da, dg: (f, da, *(-g for g in dg)))
flip_adjoint_term = _dynamics(lambda f, da, dg: (f, -da, *dg))
half_adjoint_term = _dynamics(lambda f, da, dg: (f, 0.5 * da, *dg))


def _t_grad(edit: Callable[[Tensor], Tensor]) -> Mutation:
    def apply(mp: pytest.MonkeyPatch) -> None:
        orig = fn.adjoint_backward

        def wrapped(*args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
            a, t_grad, *gp = orig(*args, **kwargs)
            return (a, edit(t_grad.clone()), *gp)
        mp.setattr(fn, "adjoint_backward", wrapped)
    return apply


def _zero_first(g: Tensor) -> Tensor:
    g[0] = 0.0
    return g


def _negate_outputs(g: Tensor) -> Tensor:
    g[1:] = -g[1:]
    return g


forget_t0_flow_term = _t_grad(_zero_first)
flip_output_time_term = _t_grad(_negate_outputs)


def _tangent(edit: Callable[[dict[str, Any]], None]) -> Mutation:
    def apply(mp: pytest.MonkeyPatch) -> None:
        orig = fn.tangent_solve

        def wrapped(cfg: Any, y0: Tensor, t: Tensor, ys: Tensor, params: tuple[Tensor, ...], y0_dot: Tensor | None,
                    t_dot: Tensor | None, p_dots: tuple[Tensor, ...]) -> Tensor:
            kw: dict[str, Any] = {"y0_dot": y0_dot, "t_dot": t_dot, "p_dots": p_dots}
            edit(kw)
            return orig(cfg, y0, t, ys, params, kw["y0_dot"], kw["t_dot"], kw["p_dots"])
        mp.setattr(fn, "tangent_solve", wrapped)
    return apply


def _drop_p_dots(kw: dict[str, Any]) -> None:
    kw["p_dots"] = tuple(torch.zeros_like(p) for p in kw["p_dots"])


def _drop_t0_dot(kw: dict[str, Any]) -> None:
    td = kw["t_dot"]
    if td is not None:
        kw["t_dot"] = torch.cat([torch.zeros_like(td[:1]), td[1:]])


jvp_drops_param_tangent = _tangent(_drop_p_dots)
jvp_drops_t0_tangent = _tangent(_drop_t0_dot)


def vmap_permutes_batch(mp: pytest.MonkeyPatch) -> None:
    orig = fn._AdjointSolve.vmap

    def bad(info: Any, in_dims: Any, *args: Any) -> tuple[Tensor, int]:
        out, dim = orig(info, in_dims, *args)
        return out.flip(dim), dim
    mp.setattr(fn._AdjointSolve, "vmap", staticmethod(bad))


def seminorm_blind(mp: pytest.MonkeyPatch) -> None:
    # A seminorm that sees nothing: the adaptive backward solve takes ever larger steps.
    mp.setattr(fn, "_seminorm", lambda state: torch.zeros((), dtype=state[0].dtype))


def backward_ignores_rtol(mp: pytest.MonkeyPatch) -> None:
    # not re-exported by the module, so read from its namespace (the same binding the adjoint calls)
    orig: Callable[..., Any] = vars(fn)["solve"]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("where") == "adjoint backward":
            kwargs = {**kwargs, "rtol": 1e-4, "atol": 1e-4}
        return orig(*args, **kwargs)
    mp.setattr(fn, "solve", wrapped)


KILLS: list[tuple[str, Mutation, str]] = [
    ("drop -a^T F_theta", drop_param_term, "closed_form"),
    ("drop -a^T F_theta", drop_param_term, "rk4_reference"),
    ("drop -a^T F_theta", drop_param_term, "rk4_float32"),
    ("drop -a^T F_theta", drop_param_term, "func_grad"),
    ("flip sign of -a^T F_theta", flip_param_term, "closed_form"),
    ("flip sign of -a^T F_theta", flip_param_term, "rk4_reference"),
    ("flip sign of -a^T F_x", flip_adjoint_term, "closed_form"),
    ("flip sign of -a^T F_x", flip_adjoint_term, "closed_form_decreasing_t"),
    ("flip sign of -a^T F_x", flip_adjoint_term, "jacrev"),
    ("halve -a^T F_x", half_adjoint_term, "rk4_reference"),
    ("halve -a^T F_x", half_adjoint_term, "closed_form_seminorm"),
    ("forget dL/dt0 flow term", forget_t0_flow_term, "closed_form_t"),
    ("forget dL/dt0 flow term", forget_t0_flow_term, "rk4_reference"),
    ("flip output-time term", flip_output_time_term, "closed_form_t"),
    ("flip output-time term", flip_output_time_term, "func_grad"),
    ("jvp drops F_theta theta_dot", jvp_drops_param_tangent, "jvp_closed_form"),
    ("jvp drops F_theta theta_dot", jvp_drops_param_tangent, "jvp_finite_differences"),
    ("jvp drops t0 tangent", jvp_drops_t0_tangent, "jvp_closed_form"),
    ("vmap permutes the batch", vmap_permutes_batch, "vmap"),
    ("seminorm sees nothing", seminorm_blind, "closed_form_seminorm"),
    ("backward ignores rtol", backward_ignores_rtol, "rtol_convergence"),
]


@pytest.mark.parametrize(("mutation", "check"), [(m, c) for _, m, c in KILLS],
                         ids=[f"{name} / {c}" for name, _, c in KILLS])
def test_mutation_is_caught(mutation: Mutation, check: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mutation(monkeypatch)
    err, tol = CHECKS[check]()
    assert err > tol, f"planted bug not detected by {check}: error {err:.3g} <= tolerance {tol:.3g}"
