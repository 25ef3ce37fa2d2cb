"""Peer suite: the kinds of checks torchdiffeq 0.2.5 runs on its own adjoint, run on `snopt.odeint`.

torchdiffeq tests `odeint_adjoint` by gradcheck over (y0, t), by comparing adjoint gradients with
backprop through plain `torchdiffeq.odeint` on three problem kinds (a "constant" field whose exact
solution is a straight line, a linear ODE, and a "sine" ODE without parameters), on tuple states,
backward in time, in float32 and float64, and by checking its solver options (grid constructors,
perturbation, jumps, norms, seminorms). The same kinds of check are written here for snopt (our own
problems and tolerances), parametrised over every method torchdiffeq's solver registry holds, so a
method a later torchdiffeq adds is checked too. Where a method cannot serve a feature (the scipy
wrapper makes no step callbacks and takes no norm) the test asserts snopt's error instead.

References. "Direct" gradients come from backprop through `torchdiffeq.odeint` with the same method
and options, except: ``scipy_solver`` (a numpy solver, not differentiable) is compared with direct
dopri5 at the same tolerances, and gradients with respect to the times are compared with direct
dopri5 at rtol = 1e-12 for every method, because a fixed-grid solve returns the node value at a
time that lies on its grid (torchdiffeq's linear interpolation returns y0 unchanged there), so its
direct derivative in that time is not the derivative of the solution.
"""

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn
from torchdiffeq._impl.odeint import SOLVERS

import snopt
from snopt._checks import METHODS, method_kind, reports_steps

F32, F64 = torch.float32, torch.float64
ALL = sorted(SOLVERS)  # every method torchdiffeq accepts, aliases included ("fixed_adams")
FIXED = [m for m in ALL if method_kind(m) == "fixed"]
ADAPTIVE = [m for m in ALL if method_kind(m) == "adaptive"]
OPAQUE = [m for m in ALL if method_kind(m) == "scipy"]
T0, T1, NPTS = 1.0, 4.0, 7  # output times 1, 1.5, ..., 4: on every grid below (steps 2^-k)


# ----------------------------------------------------------------------------------------------
# Problems: the three kinds torchdiffeq uses (our own small versions), and a tuple state
# ----------------------------------------------------------------------------------------------

class Constant(nn.Module):
    """dy/dt = a + (y − (a t + b))⁵: exactly y = a t + b from y(t0) = a t0 + b, for every method."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.2))
        self.b = nn.Parameter(torch.tensor(3.0))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.a + (y - (self.a * t + self.b)) ** 5

    def y_start(self, t0: Tensor) -> Tensor:
        return (self.a * t0 + self.b).detach()


class Linear(nn.Module):
    """dy/dt = A y with A a small skew-symmetric matrix plus a little growth (4 states)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        u = 0.1 * torch.randn(4, 4, generator=g, dtype=F64)
        self.A = nn.Parameter(u - u.T + 0.05 * torch.eye(4, dtype=F64))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.A @ y

    def y_start(self, t0: Tensor) -> Tensor:
        return torch.ones(4, dtype=self.A.dtype)


class Sine(nn.Module):
    """dy/dt = 2y/t + t⁴ sin 2t − t² + 4t³ (no parameters), with its closed-form solution."""

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return 2 * y / t + t**4 * torch.sin(2 * t) - t**2 + 4 * t**3

    def y_start(self, t0: Tensor) -> Tensor:
        t = t0
        return (-0.5 * t**4 * torch.cos(2 * t) + 0.5 * t**3 * torch.sin(2 * t) + 0.25 * t**2 * torch.cos(2 * t)
                - t**3 + 2 * t**4 + (math.pi - 0.25) * t**2)


class Coupled(nn.Module):
    """A tuple state (u of shape (), w of shape (2, 2)): du/dt = c·mean(w) − u, dw/dt = B w + u."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.c = nn.Parameter(torch.tensor(0.3, dtype=F64))
        self.B = nn.Parameter(0.2 * torch.randn(4, 4, generator=g, dtype=F64))

    def forward(self, t: Tensor, y: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        u, w = y
        return self.c * w.mean() - u, (self.B @ w.reshape(4)).reshape(2, 2) + u

    def y_start(self, t0: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tensor(1.0, dtype=self.c.dtype), torch.tensor([[0.5, 0.5], [0.1, -0.2]], dtype=self.c.dtype)


PROBLEMS: dict[str, type[nn.Module]] = {"constant": Constant, "linear": Linear, "sine": Sine}


def make(name: str, dtype: torch.dtype = F64, reverse: bool = False) -> tuple[nn.Module, Any, Tensor]:
    """(field, y0, t) for problem `name`; `reverse` integrates from T1 down to T0."""
    func = (Coupled if name == "tuple" else PROBLEMS[name])().to(dtype)
    t = torch.linspace(T0, T1, NPTS, dtype=dtype)
    if reverse:
        t = t.flip(0)
    y0 = func.y_start(t[0])  # type: ignore[operator]
    return func, y0, t


# ----------------------------------------------------------------------------------------------
# Solver settings and tolerances per method
# ----------------------------------------------------------------------------------------------

# Fixed grids: a step by the method's order (errors of the discrete and the continuous adjoint differ
# by O(h^order)). Explicit Adams runs at max_order 4: at torchdiffeq's default (Adams–Bashforth up to
# order 12) its forward blows up at h = 1/16 even on dy/dt = −y, and on the tuple problem at h = 1/128
# its outputs are fine while their derivative (backprop, confirmed by finite differences) is ~1e27:
# a useless reference. With max_order <= 8 the derivative is 28.2161 at h = 1/32, as rk4's.
STEP = {1: 1 / 256, 2: 1 / 64, 3: 1 / 32, 4: 1 / 32}
EXTRA_OPTIONS: dict[str, dict[str, Any]] = {"explicit_adams": {"max_order": 4}}
# Adaptive: rtol by the method's order (atol = rtol / 1000), so that low-order methods stay cheap.
RTOL = {2: 1e-4, 3: 1e-7, 5: 1e-9, 8: 1e-10}


def solver_kwargs(method: str, dtype: torch.dtype = F64) -> dict[str, Any]:
    """Method, tolerances and options of one solve with `method`."""
    cls = SOLVERS[method]
    order = getattr(cls, "order", 4)
    kind = method_kind(method)
    if kind == "fixed":
        return {"method": method, "options": {"step_size": STEP.get(order, 1 / 64), **EXTRA_OPTIONS.get(method, {})}}
    rtol = RTOL.get(order, 1e-8) if kind == "adaptive" else 1e-9
    if dtype == F32:
        rtol = max(rtol, 1e-6)
    return {"method": method, "rtol": rtol, "atol": rtol * 1e-3}


# Largest error allowed against the direct reference, as max|ours − ref| / max(max|ref|, 1), float64.
# Each is the largest error measured over the problems here (7 output times on [1, 4]) times 5 to 20:
# constant ~1e-14 for every method (its solution is exact); dopri5 1.1e-7 (t), 1.4e-9 (y0, θ);
# dopri8 3.7e-6; bosh3 5.7e-3 (t), 4.9e-5 (θ); order-2 adaptive at rtol 1e-4 ~1e-2; euler
# (h = 1/256) 4.8e-3; midpoint/heun2 (1/64) 2e-4; heun3 (1/32) 1.3e-5; rk4, implicit Adams (1/32)
# ~1e-7; explicit Adams (1/128) ~1e-4; scipy (LSODA, rtol 1e-9) 1.4e-7.
TOL64 = {"dopri5": 1e-6, "dopri8": 5e-5, "bosh3": 5e-2, "adaptive_heun": 1e-1, "fehlberg2": 1e-1,
         "euler": 3e-2, "midpoint": 2e-3, "heun2": 2e-3, "heun3": 2e-4, "rk4": 1e-5, "explicit_adams": 2e-3,
         "implicit_adams": 1e-5, "fixed_adams": 1e-5, "scipy_solver": 2e-6}
TOL_UNKNOWN = 1e-1  # a method added by a later torchdiffeq: only gross errors are caught


def tol(method: str, dtype: torch.dtype = F64) -> float:
    """Allowed error (see TOL64); float32 adds its roundoff (measured <= 1e-4 here, allowed 2e-3)."""
    base = TOL64.get(method, TOL_UNKNOWN)
    return base if dtype == F64 else max(base, 2e-3)


def err(ours: Tensor, ref: Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1.0))


def _loss(ys: Any, gy: Any) -> Tensor:
    if isinstance(ys, tuple):
        total = torch.zeros(())
        for y, g in zip(ys, gy, strict=True):
            total = total + (y * g).sum()
        return total
    out: Tensor = (ys * gy).sum()
    return out


def cotangents(ys: Any, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    if isinstance(ys, tuple):
        return tuple(torch.rand(y.shape, generator=g, dtype=F64).to(y.dtype) for y in ys)
    return torch.rand(ys.shape, generator=g, dtype=F64).to(ys.dtype)


def grads(solve: Callable[..., Any], func: nn.Module, y0: Any, t: Tensor, gy: Any = None, *, t_grad: bool = True,
          **kwargs: Any) -> dict[str, Any]:
    """Outputs and dL/dy0, dL/dt, dL/dθ of L = Σ gy·ys through `solve` (snopt or torchdiffeq)."""
    y0 = tuple(y.detach().requires_grad_(True) for y in y0) if isinstance(y0, tuple) \
        else y0.detach().requires_grad_(True)
    t = t.detach().requires_grad_(t_grad)
    for p in func.parameters():
        p.grad = None
    ys = solve(func, y0, t, **kwargs)
    gy = cotangents(ys) if gy is None else gy
    _loss(ys, gy).backward()  # type: ignore[no-untyped-call]
    detached = tuple(y.detach() for y in ys) if isinstance(ys, tuple) else ys.detach()
    y0_grad = tuple(y.grad for y in y0) if isinstance(y0, tuple) else y0.grad
    return {"ys": detached, "y0": y0_grad, "t": t.grad, "params": [p.grad for p in func.parameters()], "gy": gy}


def _flat(x: Any) -> Tensor:
    return torch.cat([v.reshape(-1) for v in x]) if isinstance(x, tuple) else x


@functools.cache
def _t_reference(name: str, dtype: torch.dtype, reverse: bool) -> Tensor:
    """dL/dt by backprop through dopri5 at rtol 1e-12 (cached per problem)."""
    func, y0, t = make(name, F64, reverse)
    ys = torchdiffeq.odeint(func, y0, t)  # only for the shapes of the cotangents
    gy = cotangents(tuple(y.to(dtype) for y in ys) if isinstance(ys, tuple) else ys.to(dtype))
    gy64 = tuple(g.to(F64) for g in gy) if isinstance(gy, tuple) else gy.to(F64)
    out = grads(torchdiffeq.odeint, func, y0, t, gy64, rtol=1e-12, atol=1e-14, method="dopri5")["t"]
    return out.to(dtype)  # type: ignore[no-any-return]


def direct_kwargs(method: str, dtype: torch.dtype) -> dict[str, Any]:
    kwargs = solver_kwargs(method, dtype)
    if method_kind(method) == "scipy":
        kwargs["method"] = "dopri5"  # the scipy wrapper is not differentiable
    return kwargs


def check_against_direct(method: str, name: str, dtype: torch.dtype = F64, reverse: bool = False) -> None:
    """Our gradients (y0, t, θ) against backprop through plain torchdiffeq (see the module's note)."""
    func, y0, t = make(name, dtype, reverse)
    ours = grads(snopt.odeint, func, y0, t, **solver_kwargs(method, dtype))
    ref = grads(torchdiffeq.odeint, func, y0, t, ours["gy"], **direct_kwargs(method, dtype))
    bound = tol(method, dtype)
    assert err(_flat(ours["ys"]), _flat(ref["ys"])) < bound, "outputs"
    assert err(_flat(ours["y0"]), _flat(ref["y0"])) < bound, f"y0: {err(_flat(ours['y0']), _flat(ref['y0'])):.2e}"
    for i, (a, b) in enumerate(zip(ours["params"], ref["params"], strict=True)):
        assert a is not None and b is not None
        assert err(a, b) < bound, f"param {i}: {err(a, b):.2e}"
    t_err = err(ours["t"], _t_reference(name, dtype, reverse))
    assert t_err < bound, f"t: {t_err:.2e}"


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

def test_snopt_accepts_every_method_of_the_registry() -> None:
    assert set(METHODS) == set(SOLVERS)
    assert {"heun2", "scipy_solver", "fixed_adams"} <= set(METHODS)
    assert method_kind("scipy_solver") == "scipy" and not reports_steps("scipy_solver")
    assert all(reports_steps(m) for m in FIXED + ADAPTIVE)


def test_kinds_follow_the_solver_classes() -> None:
    from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver, FixedGridODESolver

    for m in ALL:
        cls = SOLVERS[m]
        expected = ("adaptive" if issubclass(cls, AdaptiveStepsizeODESolver)
                    else "fixed" if issubclass(cls, FixedGridODESolver) else "scipy")
        assert method_kind(m) == expected, m


# ----------------------------------------------------------------------------------------------
# Forward: the same solve as torchdiffeq (its TestSolverError kind, against torchdiffeq itself)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward_time", "backward_time"])
@pytest.mark.parametrize("method", ALL)
def test_forward_is_torchdiffeq_forward(method: str, reverse: bool, dtype: torch.dtype) -> None:
    for name in ("constant", "linear", "tuple"):
        func, y0, t = make(name, dtype, reverse)
        with torch.no_grad():
            ours = snopt.odeint(func, y0, t, **solver_kwargs(method, dtype))
            theirs = torchdiffeq.odeint(func, y0, t, **solver_kwargs(method, dtype))
        torch.testing.assert_close(_flat(ours), _flat(theirs), rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------------------------------
# gradcheck over (y0, t) (torchdiffeq's TestGradient.test_odeint kind)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL)
def test_gradcheck_y0_and_t(method: str) -> None:
    func, y0, t = make("constant")
    kwargs: dict[str, Any] = {"method": method}  # each method's default options, grid = t for fixed grids

    def solve(y0_: Tensor, t_: Tensor) -> Tensor:
        out: Tensor = snopt.odeint(func, y0_, t_, **kwargs)
        return out

    assert torch.autograd.gradcheck(solve, (y0.clone().requires_grad_(True), t.clone().requires_grad_(True)))


# ----------------------------------------------------------------------------------------------
# Adjoint against direct backprop (torchdiffeq's TestGradient.test_adjoint kind)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", ALL)
def test_adjoint_matches_direct(method: str, problem: str) -> None:
    check_against_direct(method, problem)


@pytest.mark.parametrize("method", ALL)
def test_adjoint_matches_direct_backward_in_time(method: str) -> None:
    check_against_direct(method, "linear", reverse=True)


@pytest.mark.parametrize("method", ALL)
def test_adjoint_matches_direct_float32(method: str) -> None:
    check_against_direct(method, "linear", F32)


@pytest.mark.parametrize("method", ALL)
def test_adjoint_matches_direct_tuple_state(method: str) -> None:
    check_against_direct(method, "tuple")


@pytest.mark.parametrize("t_grad", [True, False], ids=["t_grad", "no_t_grad"])
@pytest.mark.parametrize("method", ALL)
def test_adjoint_matches_torchdiffeq_adjoint(method: str, t_grad: bool) -> None:
    """Against `torchdiffeq.odeint_adjoint` itself: both solve the continuous adjoint with the same solver.

    Fixed grids take the same steps, so y0 and θ agree to roundoff; adaptive backward solves differ
    only in their error norm (torchdiffeq's also controls its time adjoint), within tolerance.
    """
    func, y0, t = make("linear")
    ours = grads(snopt.odeint, func, y0, t, t_grad=t_grad, **solver_kwargs(method))
    theirs = grads(torchdiffeq.odeint_adjoint, func, y0, t, ours["gy"], t_grad=t_grad, **solver_kwargs(method))
    bound = 1e-12 if method_kind(method) == "fixed" else tol(method)
    assert err(ours["y0"], theirs["y0"]) < bound
    assert err(ours["params"][0], theirs["params"][0]) < bound
    if t_grad:
        assert err(ours["t"], theirs["t"]) < tol(method)
    else:
        assert ours["t"] is None and theirs["t"] is None


class Cubic(nn.Module):
    """torchdiffeq's TestCompareAdjointGradient field: y³ A, with a module that the field never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64))
        self.unused = nn.Linear(2, 5).double()

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return torch.mm(y**3, self.A)


def test_unused_parameters_get_zero_gradients() -> None:
    func = Cubic()
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 5.0, 6, dtype=F64, requires_grad=True)
    ys = snopt.odeint(func, y0, t, rtol=1e-8, atol=1e-10)
    (ys * cotangents(ys)).sum().backward()
    assert func.unused.weight.grad is not None and func.unused.bias.grad is not None
    assert float(func.unused.weight.grad.abs().max()) == 0.0 and float(func.unused.bias.grad.abs().max()) == 0.0
    assert func.A.grad is not None and float(func.A.grad.abs().max()) > 0


# ----------------------------------------------------------------------------------------------
# Options (torchdiffeq's odeint_tests and norm_tests kinds, through the adjoint)
# ----------------------------------------------------------------------------------------------

def test_grid_constructor_is_used_backward_with_reversed_times() -> None:
    seen: list[tuple[float, float]] = []

    def grid(f: Any, y0: Tensor, t: Tensor) -> Tensor:
        seen.append((float(t[0]), float(t[1])))
        return torch.linspace(float(t[0]), float(t[1]), 11, dtype=t.dtype)

    x0 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    xs = snopt.odeint(lambda t, x: x, x0, torch.tensor([0.0, 1.0], dtype=F64), method="euler",
                      options={"grid_constructor": grid}, adjoint_params=())
    assert abs(float(xs[1].detach()) - 1.1**10) < 1e-12
    xs[1].backward()
    assert seen == [(0.0, 1.0), (1.0, 0.0)]
    assert x0.grad is not None and abs(float(x0.grad) - 1.1**10) < 1e-12  # Euler's own adjoint, exactly


@pytest.mark.parametrize("perturb", [True, False], ids=["perturb", "no_perturb"])
@pytest.mark.parametrize("method", FIXED)
def test_perturb_reaches_forward_and_backward(method: str, perturb: bool) -> None:
    times: list[float] = []

    def f(t: Tensor, x: Tensor) -> Tensor:
        times.append(float(t))
        return -x

    x0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdiffeq's implicit Adams may warn about its functional iteration
        xs = snopt.odeint(f, x0, torch.tensor([0.0, 1.0], dtype=F64), method=method,
                          options={"step_size": 0.5, "perturb": perturb}, adjoint_params=())
        assert (0.0 in times) != perturb and (0.5 in times) != perturb
        times.clear()
        xs.sum().backward()
    assert (1.0 in times) != perturb and (0.5 in times) != perturb


class Jump(nn.Module):
    """−x/2 before t = 0.5, x² after: a discontinuity that `jump_t` tells the solver about."""

    def __init__(self) -> None:
        super().__init__()
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        return -0.5 * x if float(t) < 0.5 else x**2


@pytest.mark.parametrize("method", ADAPTIVE)
def test_jump_t_saves_steps_forward_and_backward(method: str) -> None:
    x0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    plain, better = Jump(), Jump()
    xs = snopt.odeint(plain, x0, t, rtol=1e-6, atol=1e-6, method=method, adjoint_params=())
    ys = snopt.odeint(better, x0, t, rtol=1e-6, atol=1e-6, method=method, adjoint_params=(),
                      options={"jump_t": torch.tensor([0.5], dtype=F64)})
    assert better.nfe < plain.nfe
    plain.nfe = better.nfe = 0
    xs.sum().backward()
    ys.sum().backward()
    assert better.nfe < plain.nfe


class Neural(nn.Module):
    """A small tanh MLP on R² with an oscillating time factor (torchdiffeq's seminorm test kind)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(width, 2, generator=g, dtype=F64) / math.sqrt(2))
        self.w2 = nn.Parameter(torch.randn(2, width, generator=g, dtype=F64) / math.sqrt(width))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.w2 @ torch.tanh(self.w1 @ x)) * torch.sin(2 * t)


def _backward_nfe(method: str, **kwargs: Any) -> tuple[int, Tensor]:
    stats = snopt.SolveStats()
    func = Neural()
    x0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    out = snopt.odeint(func, x0, torch.tensor([0.0, 1.0], dtype=F64), method=method, stats=stats, **kwargs)
    out.sum().backward()
    assert x0.grad is not None
    return stats.nfe_backward, x0.grad


@pytest.mark.parametrize("method", ADAPTIVE)
def test_seminorm_needs_no_more_backward_steps(method: str) -> None:
    tols = {"rtol": 1e-5, "atol": 1e-5} if SOLVERS[method].order <= 2 else {"rtol": 1e-8, "atol": 1e-8}
    mixed, g_mixed = _backward_nfe(method, **tols)
    semi, g_semi = _backward_nfe(method, adjoint_options={"norm": "seminorm"}, **tols)
    semi2, _ = _backward_nfe(method, adjoint_norm="seminorm", **tols)
    assert semi <= mixed and semi2 == semi
    assert err(g_semi, g_mixed) < 1e3 * tols["rtol"]


@pytest.mark.parametrize("method", ADAPTIVE)
def test_looser_adjoint_tolerances_take_fewer_backward_steps(method: str) -> None:
    tight, g_tight = _backward_nfe(method, rtol=1e-7, atol=1e-7)
    loose, g_loose = _backward_nfe(method, rtol=1e-7, atol=1e-7, adjoint_rtol=1e-3, adjoint_atol=1e-3)
    assert loose < tight
    assert err(g_loose, g_tight) < 1e-1


@pytest.mark.parametrize("method", FIXED)
def test_adjoint_options_set_the_backward_grid(method: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit Adams' functional iteration at a coarse step
        same, _ = _backward_nfe(method, options={"step_size": 0.25})
        finer, _ = _backward_nfe(method, options={"step_size": 0.25}, adjoint_options={"step_size": 0.0625})
    assert finer >= 2 * same  # 4x the steps (multistep methods start with a few rk4 steps)


@pytest.mark.parametrize("adjoint_method", ALL)
def test_adjoint_method_can_differ_from_method(adjoint_method: str) -> None:
    func, y0, t = make("linear")
    fwd = solver_kwargs("dopri5")
    bwd = solver_kwargs(adjoint_method)
    ours = grads(snopt.odeint, func, y0, t, **fwd, adjoint_method=adjoint_method,
                 adjoint_options=bwd.get("options", {}), adjoint_rtol=bwd.get("rtol"), adjoint_atol=bwd.get("atol"))
    ref = grads(torchdiffeq.odeint, func, y0, t, ours["gy"], **fwd)
    assert err(ours["y0"], ref["y0"]) < tol(adjoint_method) + tol("dopri5")
    assert err(ours["params"][0], ref["params"][0]) < tol(adjoint_method) + tol("dopri5")


def test_adjoint_params_subset() -> None:
    func = Constant().double()
    y0, t = func.y_start(torch.tensor(T0, dtype=F64)), torch.linspace(T0, T1, NPTS, dtype=F64)
    ys = snopt.odeint(func, y0.requires_grad_(True), t, adjoint_params=(func.a,))
    ys.sum().backward()
    assert func.a.grad is not None and func.b.grad is None
    ref = grads(torchdiffeq.odeint, Constant().double(), y0, t, torch.ones_like(ys), t_grad=False)
    assert err(func.a.grad, ref["params"][0]) < 1e-10


def test_forward_norm_sees_the_tuple_state() -> None:
    seen: list[tuple[torch.Size, ...]] = []

    def norm(state: tuple[Tensor, ...]) -> Tensor:
        seen.append(tuple(s.shape for s in state))
        return torch.stack([s.abs().max() for s in state]).max()

    func, y0, t = make("tuple")
    ys = snopt.odeint(func, y0, t, options={"norm": norm})
    ref = torchdiffeq.odeint(func, y0, t, options={"norm": norm})
    assert seen and set(seen) == {((), (2, 2))}
    torch.testing.assert_close(_flat(ys), _flat(ref), rtol=0, atol=0)


@pytest.mark.parametrize("state", ["tensor", "tuple"])
def test_custom_adjoint_norm_sees_torchdiffeqs_layout(state: str) -> None:
    """A callable `adjoint_options["norm"]` receives (t, y, a, *g_θ), y and a split as y0 is."""
    seen: list[tuple[torch.Size, ...]] = []

    def norm(s: tuple[Tensor, ...]) -> Tensor:
        seen.append(tuple(x.shape for x in s))
        return torch.stack([x.pow(2).mean().sqrt() for x in s]).max()

    params = (torch.rand(7, dtype=F64, requires_grad=True), torch.rand((), dtype=F64, requires_grad=True))
    x0: Any = torch.tensor(1.0, dtype=F64) if state == "tensor" else (
        torch.tensor(1.0, dtype=F64), torch.tensor([[0.5, 0.5], [0.1, 0.1]], dtype=F64))
    f: Callable[..., Any] = (lambda t, x: x) if state == "tensor" else (lambda t, x: x)
    xs = snopt.odeint(f, x0, torch.tensor([0.0, 1.0], dtype=F64), adjoint_params=params,
                      adjoint_options={"norm": norm})
    (xs if state == "tensor" else xs[0]).sum().backward()
    expected = ((), (), (), (7,), ()) if state == "tensor" else ((), (), (2, 2), (), (2, 2), (7,), ())
    assert seen and set(seen) == {expected}


# ----------------------------------------------------------------------------------------------
# What a method cannot serve: the error says why and what to use instead
# ----------------------------------------------------------------------------------------------

class _Observer:
    def on_backward_step(self, t: Tensor, dt: Tensor) -> None:
        pass


@pytest.mark.parametrize("method", ALL)
def test_observer_needs_a_method_that_reports_steps(method: str) -> None:
    func, y0, t = make("linear")
    kwargs = solver_kwargs(method)
    if reports_steps(method):
        ours = grads(snopt.odeint, func, y0, t, observer=_Observer(), **kwargs)
        assert ours["y0"] is not None
    else:
        with pytest.raises(ValueError, match=r"`observer` needs the backward solver to report .*adjoint_method="):
            snopt.odeint(func, y0, t, observer=_Observer(), **kwargs)


@pytest.mark.parametrize("method", OPAQUE)
def test_a_norm_with_the_scipy_wrapper_is_refused(method: str) -> None:
    func, y0, t = make("linear")
    with pytest.raises(ValueError, match=r"`adjoint_norm='seminorm'` cannot be used .*takes no norm"):
        snopt.odeint(func, y0, t, method=method, adjoint_norm="seminorm")
    with pytest.raises(ValueError, match=r"`adjoint_options\['norm'\]` cannot be used"):
        snopt.odeint(func, y0, t, method=method, adjoint_options={"norm": "seminorm"})
    with pytest.raises(ValueError, match=r"`options\['norm'\]` cannot be used"):
        snopt.odeint(func, y0, t, method=method, options={"norm": lambda x: x.abs().max()})
    # The forward may stay on the scipy wrapper while a torchdiffeq method solves backward.
    ours = grads(snopt.odeint, func, y0, t, method=method, adjoint_method="dopri5", adjoint_norm="seminorm",
                 observer=_Observer())
    ref = grads(torchdiffeq.odeint, func, y0, t, ours["gy"])
    assert err(ours["y0"], ref["y0"]) < 1e-4


def test_event_fn_is_refused() -> None:
    func, y0, t = make("linear")
    with pytest.raises(NotImplementedError, match="does not support `event_fn`.*torchdiffeq.odeint_adjoint"):
        snopt.odeint(func, y0, t, event_fn=lambda t, y: y.sum())
