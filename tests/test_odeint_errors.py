"""Bad inputs to `snopt.odeint`: each raises the documented error with a message naming the problem."""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import snopt

F64 = torch.float64


class Decay(nn.Module):
    def __init__(self, dtype: torch.dtype = F64) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(0.5, dtype=dtype))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return -self.k * x


class Returns(nn.Module):
    """A field returning whatever `make(x)` builds (to provoke output errors)."""

    def __init__(self, make: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0, dtype=F64))
        self.make = make

    def forward(self, t: Tensor, x: Tensor | tuple[Tensor, ...]) -> Any:
        if isinstance(x, tuple):
            return self.make(tuple(xi * self.w for xi in x))
        return self.make(x * self.w)


def T(*v: float) -> Tensor:
    return torch.tensor(v, dtype=F64)


def Y(*v: float) -> Tensor:
    return torch.tensor(v, dtype=F64)


@dataclass
class Bad:
    """One row of the table: the arguments (defaults are valid) and the error expected."""

    error: type[BaseException]
    match: str
    func: Any = field(default_factory=Decay)
    y0: Any = field(default_factory=lambda: Y(1.0, 2.0))
    t: Any = field(default_factory=lambda: T(0.0, 1.0))
    kwargs: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Bad] = {
    # time grid
    "t non-monotone": Bad(ValueError, "strictly increasing or strictly decreasing", t=T(0.0, 1.0, 0.5)),
    "t repeated": Bad(ValueError, "strictly increasing or strictly decreasing", t=T(0.0, 1.0, 1.0)),
    "t one point": Bad(ValueError, "at least 2 time points", t=T(0.0)),
    "t empty": Bad(ValueError, "at least 2 time points", t=torch.zeros(0, dtype=F64)),
    "t a list": Bad(TypeError, "`t` must be a torch.Tensor", t=[0.0, 1.0]),
    "t integer": Bad(TypeError, "`t` must be a floating point tensor", t=torch.tensor([0, 1])),
    "t 2-D": Bad(ValueError, "`t` must be one-dimensional", t=torch.tensor([[0.0, 1.0]], dtype=F64)),
    "t non-finite": Bad(ValueError, "`t` must be finite", t=T(0.0, float("inf"))),
    # initial state
    "y0 nan": Bad(ValueError, r"`y0` contains non-finite values", y0=Y(1.0, float("nan"))),
    "y0 inf": Bad(ValueError, r"`y0` contains non-finite values", y0=Y(float("inf"), 1.0)),
    "y0 -inf": Bad(ValueError, r"`y0` contains non-finite values", y0=Y(1.0, float("-inf"))),
    "y0 not a tensor": Bad(TypeError, "`y0` must be a torch.Tensor", y0=[1.0, 2.0]),
    "y0 integer": Bad(TypeError, "`y0` must be a floating point tensor", y0=torch.tensor([1, 2])),
    "tuple y0 with nan": Bad(ValueError, r"`y0\[1\]` contains non-finite",
                             func=Returns(lambda x: x), y0=(Y(1.0), Y(float("nan")))),
    # vector field output
    "func wrong shape": Bad(snopt.FieldOutputError, r"shaped like the state \(2,\); got \(3,\)",
                            func=Returns(lambda x: torch.cat([x, x[:1]]))),
    "func wrong shape is a ValueError": Bad(ValueError, "shaped like the state",
                                            func=Returns(lambda x: x.reshape(1, 2))),
    "func wrong dtype": Bad(TypeError, "must return the state's dtype torch.float64; got torch.float32",
                            func=Returns(lambda x: x.float())),
    "func returns a non-tensor": Bad(TypeError, "must return a torch.Tensor; got float",
                                     func=Returns(lambda x: 1.0)),
    "tuple func returns a tensor": Bad(ValueError, "must return a tuple of 2 tensors",
                                       func=Returns(lambda x: x[0]), y0=(Y(1.0), Y(2.0))),
    # methods and tolerances
    "unknown method": Bad(ValueError, "`method` must be one of .*'rk4'.*got 'rk5'", kwargs={"method": "rk5"}),
    "unknown adjoint_method": Bad(ValueError, "`adjoint_method` must be one of", kwargs={"adjoint_method": "RK4"}),
    "rtol zero": Bad(ValueError, "`rtol` must be a positive finite number; got 0", kwargs={"rtol": 0.0}),
    "rtol negative": Bad(ValueError, "`rtol` must be a positive finite number", kwargs={"rtol": -1e-6}),
    "rtol nan": Bad(ValueError, "`rtol` must be a positive finite number; got nan", kwargs={"rtol": float("nan")}),
    "rtol inf": Bad(ValueError, "`rtol` must be a positive finite number", kwargs={"rtol": float("inf")}),
    "atol negative": Bad(ValueError, "`atol` must be a positive finite number", kwargs={"atol": -1.0}),
    "adjoint_rtol zero": Bad(ValueError, "`adjoint_rtol` must be a positive finite", kwargs={"adjoint_rtol": 0.0}),
    "adjoint_atol nan": Bad(ValueError, "`adjoint_atol` must be a positive finite",
                            kwargs={"adjoint_atol": float("nan")}),
    "bad adjoint_norm": Bad(ValueError, "`adjoint_norm` must be 'mixed' or 'seminorm'; got 'l2'",
                            kwargs={"adjoint_norm": "l2"}),
    "event_fn": Bad(NotImplementedError, "does not support `event_fn`", kwargs={"event_fn": lambda t, y: y[0]}),
    "observer with the scipy wrapper": Bad(ValueError, "never does .it makes no step callbacks",
                                           kwargs={"method": "scipy_solver",
                                                   "observer": snopt.curvature.FactorCollector(Decay(), mode="ode")}),
    "seminorm with the scipy wrapper": Bad(ValueError, "scipy's solve_ivp controls the error",
                                           kwargs={"method": "scipy_solver", "adjoint_norm": "seminorm"}),
    "forward norm with the scipy wrapper": Bad(ValueError, "cannot be used with method='scipy_solver'",
                                               kwargs={"method": "scipy_solver", "options": {"norm": torch.norm}}),
    "adjoint norm not a callable": Bad(ValueError, "must be 'seminorm' or a callable",
                                       kwargs={"adjoint_options": {"norm": "max"}}),
    "two backward norms": Bad(ValueError, "two different backward norms",
                              kwargs={"adjoint_norm": "seminorm",
                                      "adjoint_options": {"norm": lambda s: s[1].abs().max()}}),
    "options for another adjoint_method": Bad(ValueError, "pass `adjoint_options` too",
                                              kwargs={"method": "rk4", "options": {"step_size": 0.1},
                                                      "adjoint_method": "dopri5"}),
    # parameters
    "plain function without adjoint_params": Bad(TypeError, r"must be an nn.Module.*adjoint_params",
                                                 func=lambda t, x: -x),
    "adjoint_params a single tensor": Bad(TypeError, "sequence of tensors, not a single tensor",
                                          kwargs={"adjoint_params": torch.ones(1, requires_grad=True)}),
    "adjoint_params holds a non-tensor": Bad(TypeError, r"`adjoint_params\[1\]` must be a torch.Tensor; got float",
                                             kwargs={"adjoint_params": (torch.ones(1, dtype=F64,
                                                                                   requires_grad=True), 1.0)}),
    "params dtype mismatch": Bad(TypeError, "Parameter 0 of `func` has dtype torch.float32 but `y0` has torch.float64",
                                 func=Decay(torch.float32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises(name: str) -> None:
    case = CASES[name]
    with pytest.raises(case.error, match=case.match):
        snopt.odeint(case.func, case.y0, case.t, **case.kwargs)


def test_field_output_error_is_a_value_error() -> None:
    assert issubclass(snopt.FieldOutputError, ValueError)


def _time_in(message: str, pattern: str) -> float:
    found = re.search(pattern, message)
    assert found is not None, message
    return float(found.group(1))


def test_exploding_field_raises_solver_error_naming_the_time() -> None:
    # dx/dt = x², x(0) = 1 has x(t) = 1/(1 − t): it blows up at t = 1, before t1 = 2.
    with pytest.raises(snopt.SolverError, match=r"t = ") as info:
        snopt.odeint(lambda t, x: x**2, Y(1.0), T(0.0, 2.0), adjoint_params=())
    t_fail = _time_in(str(info.value), r"near t = ([-+0-9.e]+)")
    assert 0.9 <= t_fail <= 1.0 + 1e-6, str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_fixed_grid_nan_raises_solver_error_naming_the_output_time() -> None:
    # Euler with h = 0.5 on dx/dt = log(x) − 10 from x = 1: x(0.5) = −4 (finite),
    # then log(−4) = nan, so the first non-finite output is t = 1.
    with pytest.raises(snopt.SolverError, match="non-finite") as info:
        snopt.odeint(lambda t, x: torch.log(x) - 10, Y(1.0), T(0.0, 0.5, 1.0, 1.5), method="euler",
                     adjoint_params=())
    assert _time_in(str(info.value), r"output time t = ([-+0-9.e]+)") == 1.0


def test_solver_error_in_backward_names_the_time() -> None:
    # Forward is fine (dx/dt = −x), but the loss gradient is nan: the backward solve must
    # fail with a SolverError, not return nan gradients silently.
    x0 = Y(1.0).requires_grad_(True)
    ys = snopt.odeint(Decay(), x0, T(0.0, 1.0), method="rk4", options={"step_size": 0.25})
    with pytest.raises(snopt.SolverError, match=r"backward .*t = "):
        (ys[-1] * float("nan")).sum().backward()


def test_double_backward_is_refused_with_a_pointer_to_second_order_tools() -> None:
    x0 = Y(1.0, 2.0).requires_grad_(True)
    ys = snopt.odeint(Decay(), x0, T(0.0, 1.0))
    (g,) = torch.autograd.grad(ys[-1].pow(2).sum(), x0, create_graph=True)
    with pytest.raises(NotImplementedError, match="snopt.hvp"):
        g.sum().backward()


def test_methods_come_from_torchdiffeqs_registry_with_a_clear_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from torchdiffeq._impl.odeint import SOLVERS

    from snopt import _checks

    kinds, _ = _checks.discover_methods()
    assert set(kinds) == set(SOLVERS) and {"heun2", "scipy_solver"} <= set(kinds)
    assert kinds["scipy_solver"] == "scipy" and kinds["heun2"] == "fixed" and kinds["dopri8"] == "adaptive"
    real = importlib.import_module

    def moved(name: str, *args: Any) -> Any:
        if name == "torchdiffeq._impl.odeint":
            raise ModuleNotFoundError("No module named 'torchdiffeq._impl.odeint'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", moved)
    with pytest.warns(RuntimeWarning, match="could not read torchdiffeq's solver registry.*falling back"):
        kinds2, callbacks = _checks.discover_methods()
    assert kinds2 == kinds and callbacks["dopri5"] >= {"callback_accept_step"}
