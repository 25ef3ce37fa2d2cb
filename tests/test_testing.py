"""`snopt.testing`: each reference against an independent one, the reports, the tolerance policy, lazy imports."""

import importlib
import math
import sys
from typing import Any, cast

import pytest
import torch
import torchdiffeq
from hypothesis import given, settings
from torch import Tensor, nn
from torch.func import functional_call

import snopt
import snopt.testing
from snopt.testing import (
    SECOND_ORDER_BLOCKS,
    ClosedFormReference,
    GridReference,
    LinearField,
    SecondOrderProblem,
    Tolerance,
    assert_close,
    assert_memory_flat,
    assert_second_order_close,
    default_tolerance,
    flat_params,
    rel_err,
    rk_solve,
    saved_tensor_bytes,
    second_order_errors,
    steps_for,
)

F64 = torch.float64
MLP = SecondOrderProblem("mlp", 2, 3, "tanh", True, 2, 0.0, 0.5, "ce", 3, 1.2)
LINEAR = SecondOrderProblem("linear", 2, 0, "", False, 2, 0.1, 0.6, "mse", 4, 1.0)


# ----------------------------------------------------------------------------------------------
# An independent reference: torch.autograd.functional.hessian through plain torchdiffeq.odeint
# ----------------------------------------------------------------------------------------------

def _grid(steps: int) -> Any:
    """torchdiffeq grid t0 + k (t1 − t0)/steps, ending exactly at t1: the grid of `rk_solve`, moving with t1."""
    def construct(func: Any, y0: Tensor, t: Tensor) -> Tensor:
        h = (t[1] - t[0]) / steps
        return torch.stack([t[0] + k * h for k in range(steps)] + [t[1]])

    return construct


def _torchdiffeq_blocks(case: SecondOrderProblem, method: str, steps: int) -> dict[str, Tensor]:
    """Loss, gradient and Hessian over z = [x0; θ; t1] by double backward through torchdiffeq.odeint."""
    func, x0, t_span, loss_fn = case.build()
    named = [(k, q) for k, q in func.named_parameters()]
    n, p = x0.numel(), sum(q.numel() for _, q in named)

    def loss(z: Tensor) -> Tensor:
        parts = torch.split(z[n:n + p], [q.numel() for _, q in named])
        ps = {k: v.reshape(q.shape) for (k, q), v in zip(named, parts, strict=True)}

        def f(t: Tensor, x: Tensor) -> Tensor:
            out: Tensor = functional_call(func, ps, (t, x))
            return out

        t = torch.stack([t_span[0], z[n + p]])
        ys = torchdiffeq.odeint(f, z[:n].reshape(x0.shape), t, method=method,
                                options={"grid_constructor": _grid(steps)})
        return loss_fn(ys[-1])

    z = torch.cat([x0.reshape(-1), flat_params(func), t_span[1:]]).requires_grad_(True)
    (g,) = torch.autograd.grad(loss(z), z)
    h = cast(Tensor, torch.autograd.functional.hessian(loss, z.detach()))  # type: ignore[no-untyped-call]
    return {"loss": loss(z.detach()).detach(), "grad_x0": g[:n].reshape(x0.shape), "grad_params": g[n:n + p],
            "hess_x0": h[:n, :n], "hess_x0_params": h[:n, n:n + p], "hess_params": h[n:n + p, n:n + p],
            "grad_t1": g[n + p], "hess_t1": h[n + p, n + p], "hess_t1_params": h[n + p, n:n + p]}


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("case", [MLP, SecondOrderProblem("conv", 1, 2, "softplus", True, 1, 0.0, -0.25, "mse", 5)],
                         ids=["mlp", "conv-backward"])
def test_grid_reference_matches_autograd_through_torchdiffeq(case: SecondOrderProblem, method: str) -> None:
    """Every block (t1 included) equals double backward through torchdiffeq on the same grid, to rounding."""
    func, x0, t_span, loss_fn = case.build()
    got = GridReference(func, x0, t_span, loss_fn, method=method, steps=4).second_order()
    assert_second_order_close(got, _torchdiffeq_blocks(case, method, 4), rtol=1e-11)


def test_closed_form_matches_fine_grid() -> None:
    """matrix_exp vs rk4 at h = 1/200: O(h⁴) ≈ 6e-10 apart; and a frozen A leaves θ = b."""
    func, x0, t_span, loss_fn = LINEAR.build()
    lin = cast(LinearField, func)
    exact = ClosedFormReference(lin, x0, t_span, loss_fn)
    grid = GridReference(func, x0, t_span, loss_fn, step_size=1 / 400)
    assert_second_order_close(exact.second_order(), grid.second_order(), rtol=1e-7)
    assert_close(exact.ggn(), grid.ggn(), rtol=1e-7, name="ggn")
    lin.A.requires_grad_(False)
    frozen = ClosedFormReference(lin, x0, t_span, loss_fn).second_order()
    assert frozen.hess_params.shape == (2, 2)
    assert_second_order_close(frozen, GridReference(func, x0, t_span, loss_fn, step_size=1 / 400).second_order(),
                              rtol=1e-7)


def test_closed_form_matches_snopt_dopri5() -> None:
    func, x0, t_span, loss_fn = LINEAR.build()
    so = snopt.second_order(func, x0, t_span, loss_fn, rtol=1e-10, atol=1e-12, wrt_t1=True)
    assert_second_order_close(so, ClosedFormReference(cast(LinearField, func), x0, t_span, loss_fn).second_order(),
                              solver_rtol=1e-10)


def test_products_match_dense_blocks_and_snopt() -> None:
    func, x0, t_span, loss_fn = MLP.build()
    ref = GridReference(func, x0, t_span, loss_fn, step_size=1 / 64)
    dense = ref.second_order()
    v = torch.randn(2, ref.p, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert ref.hvp(v).shape == (2, ref.p) and ref.hvp(v[0]).shape == (ref.p,)
    assert_close(ref.hvp(v), v @ dense.hess_params, rtol=1e-12, name="hvp")
    assert_close(ref.ggn_vp(v[1]), ref.ggn() @ v[1], rtol=1e-12, name="ggn_vp")
    assert_close(ref.second_order(gauss_newton=True).hess_params, ref.ggn(), rtol=1e-14, name="ggn")
    grid = {"method": "rk4", "options": {"step_size": 1 / 64}}
    assert_close(snopt.hvp(func, x0, t_span, loss_fn, v[0], **grid), ref.hvp(v[0]), rtol=1e-6, name="hvp")
    assert_close(snopt.ggn_vp(func, x0, t_span, loss_fn, v[0], **grid), ref.ggn_vp(v[0]), rtol=1e-6, name="ggn_vp")
    gn = snopt.second_order(func, x0, t_span, loss_fn, gauss_newton=True, wrt_t1=True, **grid)
    assert_second_order_close(gn, ref.second_order(gauss_newton=True), rtol=1e-6)
    with pytest.raises(ValueError, match=r"`v` must have shape \(\d+,\) or \(k, \d+\)"):
        ref.hvp(torch.zeros(3, dtype=F64))


def test_gauss_newton_is_exact_for_affine_flow() -> None:
    func, x0, t_span, loss_fn = SecondOrderProblem("affine", 2, 0, "", False, 3, 0.0, 0.5, "ce", 6).build()
    ref = GridReference(func, x0, t_span, loss_fn, steps=8)
    assert_second_order_close(ref.second_order(gauss_newton=True), ref.second_order(), rtol=1e-12)


def test_wrt_t1_false_leaves_t1_blocks_out() -> None:
    func, x0, t_span, loss_fn = MLP.build()
    ref = GridReference(func, x0, t_span, loss_fn, steps=8)
    short, full = ref.second_order(wrt_t1=False), ref.second_order()
    assert short.grad_t1 is None and short.hess_t1 is None and short.hess_t1_params is None
    assert_second_order_close(short, full, rtol=1e-14)
    with pytest.raises(ValueError, match=r"reference has no block 'grad_t1' \(build the reference with wrt_t1=True\)"):
        assert_second_order_close(full, short)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 4, "step_size": 0.125}, "exactly one of `steps`"),
    ({}, "exactly one of `steps`"),
    ({"step_size": 0.3}, "does not divide the span"),
    ({"steps": 0}, "must be positive"),
    ({"steps": 4, "method": "dopri5"}, r"one of \['euler', 'midpoint', 'rk4'\].*backprop_hessian"),
])
def test_grid_reference_errors(kwargs: dict[str, Any], match: str) -> None:
    func, x0, t_span, loss_fn = MLP.build()
    with pytest.raises(ValueError, match=match):
        GridReference(func, x0, t_span, loss_fn, **kwargs)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_rk_solve_reproduces_torchdiffeq(method: str) -> None:
    func, x0, _, _ = MLP.build()
    t = torch.tensor([0.0, 0.25, 0.75], dtype=F64)
    ref = torchdiffeq.odeint(func, x0, t, method=method, options={"step_size": 0.125})
    assert_close(rk_solve(func, None, x0, t, steps=steps_for(t, 0.125), method=method), ref, rtol=1e-14)
    with pytest.raises(ValueError, match="not a multiple of step_size"):
        steps_for(t, 0.1)


@pytest.mark.parametrize("kind", ["mlp", "conv", "affine", "linear"])
def test_problems_build(kind: str) -> None:
    case = SecondOrderProblem(kind, 2, 2, "silu", True, 2, 0.0, 0.25, "ce", 1)
    func, x0, t_span, loss_fn = case.build()
    assert loss_fn(func(t_span[0], x0)).shape == ()
    assert case.steps(1 / 16) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        case.steps(0.1)


@settings(max_examples=3)
@given(snopt.testing.strategies.second_order_problems("mlp", max_batch=2))
def test_strategies_draw_solvable_problems(case: SecondOrderProblem) -> None:
    func, x0, t_span, loss_fn = case.build()
    with torch.no_grad():
        x1 = snopt.odeint(func, x0, t_span, method="rk4", options={"step_size": 1 / 8})[-1]
    assert math.isfinite(float(loss_fn(x1)))


# ----------------------------------------------------------------------------------------------
# Reports and the tolerance policy
# ----------------------------------------------------------------------------------------------

def _planted(rel: float) -> tuple[snopt.SecondOrderResult, snopt.SecondOrderResult, tuple[int, int]]:
    """A reference and a copy whose hess_params is off by a relative `rel` in one entry (and its mirror)."""
    func, x0, t_span, loss_fn = MLP.build()
    ref = GridReference(func, x0, t_span, loss_fn, steps=8).second_order()
    h = ref.hess_params.clone()
    i, j = 2, 5
    bump = rel * float(h.norm()) / math.sqrt(2)
    h[i, j] += bump
    h[j, i] += bump
    fields = {k: getattr(ref, k) for k in SECOND_ORDER_BLOCKS}
    return snopt.SecondOrderResult(**{**fields, "hess_params": h}), ref, (i, j)


def test_second_order_report_names_block_entries_and_tolerance() -> None:
    bad, ref, (i, j) = _planted(1e-5)
    with pytest.raises(AssertionError) as info:
        assert_second_order_close(bad, ref, rtol=1e-8)
    msg = str(info.value)
    assert msg.startswith("second_order: 1 of 9 blocks differ from the reference:\nhess_params (")
    assert "relative error 1.000e-05" in msg and "exceeds rtol 1.0e-08, atol 0.0e+00 (given)" in msg
    assert f"({i}, {j}):" in msg and f"({j}, {i}):" in msg and "worst 5 of" in msg
    assert "passed (relative error): loss 0.0e+00, grad_params" in msg
    assert second_order_errors(bad, ref)["hess_params"] == pytest.approx(1e-5, rel=1e-6)
    assert_second_order_close(bad, ref, rtol={"hess_params": 2e-5})  # per-block rtol; the rest √eps


def test_assert_close_report_and_default_source() -> None:
    expected = torch.arange(1.0, 7.0, dtype=F64).reshape(2, 3)
    actual = expected.clone()
    actual[1, 2] += 1e-4
    with pytest.raises(AssertionError, match=r"(?s)^hvp differs from the reference:\nhvp \(2, 3\): relative error "
                                             r"1\.048e-05 .*default: √eps of torch\.float64.*\(1, 2\):  6\.0001"):
        assert_close(actual, expected, name="hvp")
    assert_close(actual, expected, rtol=2e-5)
    assert_close(actual, expected, atol=2e-4)
    with pytest.raises(AssertionError, match=r"default: 1e4 × solver rtol 1e-10"):
        assert_close(actual, expected, solver_rtol=1e-10)
    assert_close(actual, expected, solver_rtol=1e-8)
    with pytest.raises(AssertionError, match=r"shape \(6,\) differs from the reference's \(2, 3\)"):
        assert_close(actual.reshape(-1), expected)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(torch.full((2, 3), math.nan, dtype=F64), expected, rtol=1.0)
    assert_close(0.5, torch.tensor(0.5, dtype=F64))


def test_default_tolerance_policy() -> None:
    assert default_tolerance(torch.float64).rtol == pytest.approx(1.49e-8, rel=1e-2)
    assert default_tolerance(torch.float32).rtol == pytest.approx(3.45e-4, rel=1e-2)
    assert default_tolerance(torch.float64, solver_rtol=1e-9).rtol == pytest.approx(1e-5)
    assert default_tolerance(torch.float64, solver_rtol=1e-14).rtol == default_tolerance(torch.float64).rtol
    assert default_tolerance(torch.float64).atol == 0.0
    # float32 against a float64 reference: the float32 rule.
    x = torch.ones(3, dtype=F64)
    assert_close((x * (1 + 1e-4)).float(), x)
    with pytest.raises(AssertionError):
        assert_close(x * (1 + 1e-4), x)
    assert Tolerance(1e-3, 1e-6).allows(1e-3 + 1e-6, 1.0) and not Tolerance(1e-3).allows(2e-3, 1.0)
    with pytest.raises(TypeError, match="floating dtype"):
        default_tolerance(torch.int64)
    with pytest.raises(ValueError, match="non-negative"):
        Tolerance(-1.0)


def test_rel_err_structures() -> None:
    a = {"w": torch.ones(2), "b": torch.zeros(1)}
    assert rel_err(a, {"w": torch.ones(2), "b": torch.zeros(1)}) == 0.0
    with pytest.raises(ValueError, match="Keys differ"):
        rel_err(a, {"w": torch.ones(2)})


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------

class _Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def _loss_with_steps(solver: Any) -> Any:
    torch.manual_seed(0)
    func, y0, t = _Field(), torch.randn(8, 4, requires_grad=True), torch.tensor([0.0, 1.0])
    return lambda steps: solver(func, y0, t, method="rk4", options={"step_size": 1 / steps})[-1].pow(2).sum()


def test_memory_flat_for_adjoint_and_not_for_backprop() -> None:
    found = assert_memory_flat(_loss_with_steps(snopt.odeint), steps=(5, 50))
    assert set(found) == {5, 50} and all(m.retained > 0 and m.peak >= m.retained for m in found.values())
    with pytest.raises(AssertionError, match=r"retained saved bytes grow with the number of steps \(5 steps: "):
        assert_memory_flat(_loss_with_steps(torchdiffeq.odeint), steps=(5, 50))


def test_saved_tensor_bytes_counts_and_checks() -> None:
    w = torch.randn(10, 10, requires_grad=True)
    found = saved_tensor_bytes(lambda: (w @ w).tanh().sum())
    # matmul saves w twice (100 float32 each), tanh its output: 3 × 400 bytes.
    assert (found.retained, found.peak, found.total) == (1200, 1200, 1200)
    keep: list[Tensor] = []

    def leaky() -> Tensor:
        keep.append((w * 2).exp())  # a second graph that the loss's backward does not free
        return (w * w).sum()

    with pytest.raises(AssertionError, match="still alive after backward"):
        saved_tensor_bytes(leaky)
    with pytest.raises(ValueError, match="scalar tensor that requires grad"):
        saved_tensor_bytes(lambda: w.detach().sum())
    with pytest.raises(ValueError, match="at least two positive step counts"):
        assert_memory_flat(lambda n: w.sum(), steps=(10,))


# ----------------------------------------------------------------------------------------------
# hypothesis stays optional
# ----------------------------------------------------------------------------------------------

def test_snopt_testing_imports_without_hypothesis(monkeypatch: pytest.MonkeyPatch) -> None:
    """With hypothesis unimportable, snopt.testing imports; its strategies say what to install."""
    for name in [m for m in sys.modules if m == "snopt.testing" or m.startswith("snopt.testing.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(snopt, "testing")  # restored afterwards, with sys.modules, to the module imported above
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # `import hypothesis` now raises ImportError
    fresh = importlib.import_module("snopt.testing")
    assert "snopt.testing.strategies" not in sys.modules
    assert fresh.GridReference is not GridReference  # really re-imported
    with pytest.raises(ImportError, match=r"needs hypothesis.*pip install snopt\[testing\]"):
        importlib.import_module("snopt.testing.strategies")
    with pytest.raises(ImportError, match=r"pip install snopt\[testing\]"):
        _ = fresh.strategies
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = fresh.nonexistent
