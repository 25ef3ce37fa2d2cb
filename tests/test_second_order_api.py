"""Front doors `second_order`, `hvp`, `ggn_vp`: argument errors (messages pinned) and result shapes."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import snopt

F64 = torch.float64
SOLVER: dict[str, Any] = {"method": "rk4", "options": {"step_size": 0.25}}


class _Field(nn.Module):
    def __init__(self, dim: int = 3, width: int = 4, dtype: torch.dtype = F64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(dim, width, dtype=dtype)
        self.lin2 = nn.Linear(width, dim, dtype=dtype)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.lin2(torch.tanh(self.lin1(x)))
        return out


def _mse(x: Tensor) -> Tensor:
    return (x ** 2).mean()


def _setup(dtype: torch.dtype = F64) -> tuple[_Field, Tensor, Tensor, int]:
    func = _Field().to(dtype)  # drawn in float64, then cast: the same problem in every dtype
    x0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1)).to(dtype)
    p = sum(q.numel() for q in func.parameters())
    return func, x0, torch.tensor([0.0, 1.0], dtype=dtype), p


FrontDoor = Callable[..., Any]


def _call(door: str, func: nn.Module, x0: Tensor, t: Tensor, loss_fn: Any, v: Any = None, **kw: Any) -> Any:
    if door == "second_order":
        return snopt.second_order(func, x0, t, loss_fn, **{**SOLVER, **kw})
    fn: FrontDoor = snopt.hvp if door == "hvp" else snopt.ggn_vp
    if v is None:
        v = torch.zeros(sum(q.numel() for q in func.parameters() if q.requires_grad), dtype=x0.dtype)
    return fn(func, x0, t, loss_fn, v, **{**SOLVER, **kw})


DOORS = ["second_order", "hvp", "ggn_vp"]


# ----------------------------------------------------------------------------------------------
# Errors common to the three front doors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize(("change", "error", "match"), [
    ({"t": torch.tensor([0.0, 0.5, 1.0], dtype=F64)}, ValueError,
     r"`t_span` must hold exactly two times \(t0, t1\); got 3"),
    ({"t": torch.tensor([1.0], dtype=F64)}, ValueError, "`t_span` needs at least 2 time points"),
    ({"t": torch.tensor([0.0, 0.0], dtype=F64)}, ValueError, "`t_span` must be strictly increasing or"),
    ({"t": torch.tensor([0, 1])}, TypeError, "`t_span` must be a floating point tensor"),
    ({"t": [0.0, 1.0]}, TypeError, "`t_span` must be a torch.Tensor"),
    ({"loss_fn": lambda x: x.sum(dim=-1)}, ValueError, r"`loss_fn` must return a scalar tensor \(one element\)"),
    ({"loss_fn": "mse"}, TypeError, "`loss_fn` must be callable"),
    ({"x0": torch.randn(2, 3, dtype=torch.float32)}, TypeError,
     "Parameter 0 of `func` has dtype torch.float64 but `x0` has torch.float32"),
    ({"x0": torch.full((2, 3), float("nan"), dtype=F64)}, ValueError, "`x0` contains non-finite values"),
    ({"method": "rk5"}, ValueError, "`method` must be one of"),
    ({"rtol": -1.0}, ValueError, "`rtol` must be a positive finite number; got -1.0"),
], ids=["t-3-points", "t-1-point", "t-not-monotone", "t-int", "t-list", "loss-vector", "loss-not-callable",
        "dtype-mismatch", "x0-nan", "method", "rtol"])
def test_argument_errors(door: str, change: dict[str, Any], error: type[Exception], match: str) -> None:
    func, x0, t, _ = _setup()
    args: dict[str, Any] = {"func": func, "x0": x0, "t": t, "loss_fn": _mse}
    kw = {k: v for k, v in change.items() if k in ("method", "rtol")}
    args.update({k: v for k, v in change.items() if k not in kw})
    with pytest.raises(error, match=match):
        _call(door, **args, **kw)


def test_field_returning_wrong_shape() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=F64))

        def forward(self, t: Tensor, x: Tensor) -> Tensor:
            return (x * self.w).sum(-1)

    x0 = torch.ones(2, 3, dtype=F64)
    with pytest.raises(snopt.FieldOutputError, match=r"must return a tensor shaped like the state \(2, 3\)"):
        snopt.second_order(Bad(), x0, torch.tensor([0.0, 1.0], dtype=F64), _mse, **SOLVER)


# ----------------------------------------------------------------------------------------------
# Errors of the direction v
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("door", ["hvp", "ggn_vp"])
@pytest.mark.parametrize(("make_v", "error", "match"), [
    (lambda p: torch.zeros(p + 1, dtype=F64), ValueError, r"`v` must have shape \(P,\) or \(k, P\) .*got \(Q,\)"),
    (lambda p: torch.zeros(2, p - 1, dtype=F64), ValueError, r"got \(2, R\)"),
    (lambda p: torch.zeros(1, 1, p, dtype=F64), ValueError, r"got \(1, 1, P\)"),
    (lambda p: torch.zeros((), dtype=F64), ValueError, r"got \(\)"),
    (lambda p: [0.0] * p, TypeError, r"`v` must be a torch.Tensor of shape \(P,\) or \(k, P\); got list"),
], ids=["too-long", "batch-too-short", "3d", "scalar", "list"])
def test_direction_errors(door: str, make_v: Callable[[int], Any], error: type[Exception], match: str) -> None:
    func, x0, t, p = _setup()
    pattern = match.replace("P", str(p)).replace("Q", str(p + 1)).replace("R", str(p - 1))
    with pytest.raises(error, match=pattern):
        _call(door, func, x0, t, _mse, make_v(p))


def test_v_error_names_trainable_parameter_count() -> None:
    func, x0, t, p = _setup()
    func.lin1.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=f"match `func`'s {p - 4} trainable parameters"):
        snopt.hvp(func, x0, t, _mse, torch.zeros(p, dtype=F64), **SOLVER)


# ----------------------------------------------------------------------------------------------
# Shapes and conventions
# ----------------------------------------------------------------------------------------------

def test_second_order_result_shapes() -> None:
    func, x0, t, p = _setup()
    n = x0.numel()
    res = snopt.second_order(func, x0, t, _mse, **SOLVER)
    assert isinstance(res, snopt.SecondOrderResult)
    assert res.loss.shape == ()
    assert res.grad_params.shape == (p,)
    assert res.grad_x0.shape == x0.shape
    assert res.hess_params.shape == (p, p)
    assert res.hess_x0.shape == (n, n)
    assert res.hess_x0_params.shape == (n, p)
    assert res.grad_t1 is None and res.hess_t1 is None and res.hess_t1_params is None
    # rk4 with 4 steps: 4 evaluations per step forward; the backward counts evaluations of F.
    assert res.nfe_forward == 16
    assert res.nfe_backward > 0
    for k in ("loss", "grad_params", "hess_params"):
        assert getattr(res, k).dtype == F64


def test_second_order_wrt_t1_adds_fields_and_changes_nothing_else() -> None:
    func, x0, t, p = _setup()
    plain = snopt.second_order(func, x0, t, _mse, **SOLVER)
    res = snopt.second_order(func, x0, t, _mse, wrt_t1=True, **SOLVER)
    assert res.grad_t1 is not None and res.grad_t1.shape == ()
    assert res.hess_t1 is not None and res.hess_t1.shape == ()
    assert res.hess_t1_params is not None and res.hess_t1_params.shape == (p,)
    # Fixed grid: the extra (y, z) states change no step, so the shared fields agree to rounding.
    for k in ("loss", "grad_params", "grad_x0", "hess_params", "hess_x0", "hess_x0_params"):
        assert torch.allclose(getattr(res, k), getattr(plain, k), rtol=1e-13, atol=1e-15), k


def test_frozen_parameters_are_excluded() -> None:
    func, x0, t, p = _setup()
    func.lin2.weight.requires_grad_(False)
    q = p - func.lin2.weight.numel()
    res = snopt.second_order(func, x0, t, _mse, **SOLVER)
    assert res.hess_params.shape == (q, q)
    assert snopt.hvp(func, x0, t, _mse, torch.ones(q, dtype=F64), **SOLVER).shape == (q,)


@pytest.mark.parametrize("door", ["hvp", "ggn_vp"])
def test_product_shapes_and_batches(door: str) -> None:
    func, x0, t, p = _setup()
    fn: FrontDoor = snopt.hvp if door == "hvp" else snopt.ggn_vp
    single = fn(func, x0, t, _mse, torch.ones(p, dtype=F64), **SOLVER)
    batch = fn(func, x0, t, _mse, torch.ones(3, p, dtype=F64), **SOLVER)
    assert single.shape == (p,)
    assert batch.shape == (3, p)
    assert torch.allclose(batch, single.expand(3, p), rtol=1e-13, atol=1e-15)
    assert fn(func, x0, t, _mse, torch.ones(1, p, dtype=F64), **SOLVER).shape == (1, p)


def test_float32_runs_and_stays_float32() -> None:
    func, x0, t, p = _setup(torch.float32)
    res = snopt.second_order(func, x0, t, _mse, **SOLVER)
    assert res.hess_params.dtype == torch.float32
    hv = snopt.hvp(func, x0, t, _mse, torch.ones(p, dtype=torch.float32), **SOLVER)
    assert hv.dtype == torch.float32
    # float32 vs the float64 run of the same problem: unit roundoff 6e-8 times the conditioning.
    func64, x64, t64, _ = _setup(F64)
    ref = snopt.second_order(func64, x64, t64, _mse, **SOLVER)
    assert torch.allclose(res.hess_params.double(), ref.hess_params, rtol=1e-4, atol=1e-5)


def test_module_parameters_not_modified() -> None:
    func, x0, t, p = _setup()
    before = [q.detach().clone() for q in func.parameters()]
    snopt.second_order(func, x0, t, _mse, **SOLVER)
    snopt.hvp(func, x0, t, _mse, torch.ones(p, dtype=F64), **SOLVER)
    snopt.ggn_vp(func, x0, t, _mse, torch.ones(p, dtype=F64), **SOLVER)
    assert all(torch.equal(a, b) for a, b in zip(func.parameters(), before))
    assert all(q.grad is None for q in func.parameters())
