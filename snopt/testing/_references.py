"""Exact solutions and discretise-then-differentiate solvers, independent of snopt's adjoint code.

* **Closed form.** The linear ODE dx/dt = A x + b has x(t) = expm(M (t − t0)) applied to
  [x0; 1] with M = [[A, b], [0, 0]]. `linear_solution` writes it with
  `torch.linalg.matrix_exp`, so autograd and `torch.func` (grad, jacrev, jvp, hessian)
  differentiate it exactly with respect to A, b, x0 and every output time.
* **Discretise-then-differentiate, fixed grid.** `rk_solve` is a pure-torch re-implementation
  of torchdiffeq's ``"euler"``, ``"midpoint"`` and ``"rk4"`` (torchdiffeq's rk4 is the 3/8-rule
  variant, ``rk4_alt_step_func``) on n equal steps per output interval, with no in-place writes
  and the field evaluated through `torch.func.functional_call`, so every `torch.func` transform
  works through it. On a grid aligned with the output times it reproduces
  ``torchdiffeq.odeint(..., options={"step_size": h})`` to rounding.
* **Discretise-then-differentiate, adaptive.** `backprop_grads` / `backprop_hessian`
  differentiate through plain (non-adjoint) ``torchdiffeq.odeint`` by ordinary autograd.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torchdiffeq
from torch import Tensor, nn
from torch.func import functional_call

from snopt._types import LossFn

Params = Mapping[str, Tensor]
FieldFn = Callable[[Tensor, Tensor], Tensor]
Stepper = Callable[[FieldFn, Tensor, Tensor, Tensor, Tensor], Tensor]

_ONE_THIRD = 1.0 / 3.0
_TWO_THIRDS = 2.0 / 3.0


# ----------------------------------------------------------------------------------------------
# Closed form: linear ODE
# ----------------------------------------------------------------------------------------------

class LinearField(nn.Module):
    """The affine vector field F(t, x) = A x + b (autonomous), batched over leading dims of x.

    θ = (A, b) in `parameters()` order, so ``snopt.second_order(LinearField(A, b), ...)`` and
    `ClosedFormReference` flatten θ the same way.

    Args:
        A: (n, n) matrix; becomes the parameter ``A`` (a copy).
        b: (n,) vector; becomes the parameter ``b`` (a copy).

    Raises:
        ValueError: If the shapes are not (n, n) and (n,).
    """

    def __init__(self, A: Tensor, b: Tensor) -> None:  # noqa: N803 (the maths' name)
        super().__init__()
        if A.ndim != 2 or A.shape[0] != A.shape[1] or b.shape != A.shape[:1]:
            raise ValueError(f"Need A (n, n) and b (n,); got {tuple(A.shape)} and {tuple(b.shape)}.")
        self.A = nn.Parameter(A.detach().clone())
        self.b = nn.Parameter(b.detach().clone())

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Return A x + b for x shaped (..., n)."""
        return x @ self.A.T + self.b


def linear_solution(A: Tensor, b: Tensor, x0: Tensor, t: Tensor) -> Tensor:  # noqa: N803
    """Exact solution of dx/dt = A x + b, x(t[0]) = x0, at every time in `t`.

    [x(t); 1] = expm(M (t − t[0])) [x0; 1] with the augmented M = [[A, b], [0, 0]]. Written
    without in-place operations, so it is differentiable by autograd and `torch.func`
    with respect to A, b, x0 and all of t (including t[0]).

    Args:
        A: (n, n) matrix.
        b: (n,) vector.
        x0: Initial state shaped (..., n).
        t: 1-D tensor of output times (any order).

    Returns:
        The solution shaped ``(len(t), *x0.shape)``, as `snopt.odeint` returns it.
    """
    n = A.shape[-1]
    top = torch.cat([A, b.unsqueeze(-1)], dim=-1)
    M = torch.cat([top, torch.zeros(1, n + 1, dtype=A.dtype, device=A.device)], dim=0)  # noqa: N806
    phi = torch.linalg.matrix_exp((t - t[0]).reshape(-1, 1, 1) * M)            # (T, n+1, n+1)
    x0_aug = torch.cat([x0, torch.ones(*x0.shape[:-1], 1, dtype=x0.dtype, device=x0.device)], dim=-1)
    xs = torch.einsum("tij,...j->t...i", phi, x0_aug)
    return xs[..., :n]


# ----------------------------------------------------------------------------------------------
# Discretise-then-differentiate: fixed-grid Runge-Kutta written for torch.func
# ----------------------------------------------------------------------------------------------

def _euler_step(f: FieldFn, t0: Tensor, dt: Tensor, t1: Tensor, y: Tensor) -> Tensor:
    """Increment of one explicit Euler step (torchdiffeq's ``"euler"``)."""
    return dt * f(t0, y)


def _midpoint_step(f: FieldFn, t0: Tensor, dt: Tensor, t1: Tensor, y: Tensor) -> Tensor:
    """Increment of one explicit midpoint step (torchdiffeq's ``"midpoint"``)."""
    half = 0.5 * dt
    return dt * f(t0 + half, y + f(t0, y) * half)


def _rk4_step(f: FieldFn, t0: Tensor, dt: Tensor, t1: Tensor, y: Tensor) -> Tensor:
    """Increment of one step of the RK4 3/8 rule, as torchdiffeq's ``"rk4"`` (``rk4_alt_step_func``)."""
    k1 = f(t0, y)
    k2 = f(t0 + dt * _ONE_THIRD, y + dt * k1 * _ONE_THIRD)
    k3 = f(t0 + dt * _TWO_THIRDS, y + dt * (k2 - k1 * _ONE_THIRD))
    k4 = f(t1, y + dt * (k1 - k2 + k3))
    return (k1 + 3 * (k2 + k3) + k4) * dt * 0.125


GRID_METHODS: dict[str, Stepper] = {"euler": _euler_step, "midpoint": _midpoint_step, "rk4": _rk4_step}
"""The fixed-grid methods `rk_solve` re-implements, by torchdiffeq name."""


def check_grid_method(method: str) -> Stepper:
    """The step function of a fixed-grid `method` (one of `GRID_METHODS`).

    Args:
        method: A torchdiffeq fixed-grid method name.

    Returns:
        The increment function ``step(f, t0, dt, t1, y)``.

    Raises:
        ValueError: If `method` is not one of `GRID_METHODS`.
    """
    if method not in GRID_METHODS:
        raise ValueError(f"`method` must be one of {sorted(GRID_METHODS)} (the fixed-grid methods the reference "
                         f"re-implements); got {method!r}. For adaptive methods use `backprop_grads` / "
                         "`backprop_hessian`, or a closed form.")
    return GRID_METHODS[method]


def rk_solve(module: nn.Module, params: Params | None, y0: Tensor, t: Tensor, *, steps: int | Sequence[int],
             method: str = "rk4") -> Tensor:
    """Fixed-grid solve with `steps` equal steps per output interval, written for `torch.func`.

    The field is evaluated as ``functional_call(module, params, (t, x))``, so `params`
    (and `y0`, `t`) may be the inputs of `torch.func.grad`/`jacrev`/`jvp`/`hessian`. The
    grid of interval i is t[i] + k (t[i+1] − t[i]) / n, k = 0..n, so it moves with t and
    the solution is differentiable with respect to every output time. On grids aligned
    with the output times this equals torchdiffeq's ``odeint(..., method=method,
    options={"step_size": h})`` (which steps from t[0] by h) up to rounding.

    Args:
        module: Vector field module with ``forward(t, x)``.
        params: Mapping from (some of) `module`'s parameter/buffer names to tensors; None
            uses the module's own.
        y0: Initial state.
        t: 1-D tensor of output times, strictly monotone.
        steps: Steps per output interval (one int for all, or one per interval).
        method: ``"euler"``, ``"midpoint"`` or ``"rk4"`` (3/8 rule), as in torchdiffeq.

    Returns:
        The solution shaped ``(len(t), *y0.shape)``.

    Raises:
        ValueError: For an unknown `method` or a `steps` that does not give a positive count
            for each interval.
    """
    step = check_grid_method(method)
    n_int = len(t) - 1
    per = [steps] * n_int if isinstance(steps, int) else list(steps)
    if len(per) != n_int or any(n < 1 for n in per):
        raise ValueError(f"`steps` must give a positive count for each of the {n_int} intervals; got {steps!r}.")
    pdict = dict(params) if params is not None else {}

    def f(tt: Tensor, x: Tensor) -> Tensor:
        out: Tensor = functional_call(module, pdict, (tt, x), strict=False)
        return out

    outs = [y0]
    y = y0
    for i in range(n_int):
        n = per[i]
        h = (t[i + 1] - t[i]) / n
        for k in range(n):
            s = t[i] + k * h
            e = t[i + 1] if k == n - 1 else t[i] + (k + 1) * h
            y = y + step(f, s, h, e, y)
        outs.append(y)
    return torch.stack(outs)


def steps_for(t: Tensor, step_size: float) -> list[int]:
    """Steps per output interval for a grid of `step_size` aligned with `t`.

    Args:
        t: 1-D tensor of output times.
        step_size: The fixed step (as passed to torchdiffeq in ``options={"step_size": ...}``).

    Returns:
        One step count per output interval.

    Raises:
        ValueError: If an interval is not a multiple of `step_size` (torchdiffeq's grid would then
            not pass through the output times, and the reference would solve another discretisation).
    """
    gaps = (t[1:] - t[:-1]).abs().tolist()
    counts = [round(g / step_size) for g in gaps]
    for g, c in zip(gaps, counts, strict=True):
        if c < 1 or abs(c * step_size - g) > 1e-12 * max(1.0, g):
            raise ValueError(f"Output interval {g} is not a multiple of step_size {step_size}.")
    return counts


# ----------------------------------------------------------------------------------------------
# Discretise-then-differentiate: autograd through plain (adaptive) torchdiffeq.odeint
# ----------------------------------------------------------------------------------------------

def backprop_grads(func: nn.Module, y0: Tensor, t: Tensor, loss_fn: LossFn, *, method: str = "dopri5",
                   rtol: float = 1e-7, atol: float = 1e-9, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gradients of ``loss_fn(odeint(func, y0, t))`` by ordinary autograd through plain torchdiffeq.

    The solver's step-size choices are part of the graph only through the values they
    produce (torchdiffeq's controller runs on detached norms), so this is the exact
    derivative of the discrete adaptive solution. Memory grows with the number of steps.

    Args:
        func: Vector field module with ``forward(t, x)``.
        y0: Initial state.
        t: 1-D tensor of output times.
        loss_fn: Maps the whole solution ``(len(t), *y0.shape)`` to a scalar.
        method: torchdiffeq method (any, adaptive included).
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        options: torchdiffeq solver options.

    Returns:
        A dict with ``"y0"``, ``"t"`` (gradients) and ``"params"`` (a dict by parameter name).
    """
    names = [n for n, p in func.named_parameters() if p.requires_grad]
    ps = [p for p in func.parameters() if p.requires_grad]
    y0_ = y0.detach().clone().requires_grad_(True)
    t_ = t.detach().clone().requires_grad_(True)
    ys = torchdiffeq.odeint(func, y0_, t_, method=method, rtol=rtol, atol=atol, options=options)
    grads = torch.autograd.grad(loss_fn(ys), (y0_, t_, *ps), allow_unused=True, materialize_grads=True)
    return {"y0": grads[0], "t": grads[1], "params": dict(zip(names, grads[2:], strict=True))}


def backprop_hessian(func: nn.Module, y0: Tensor, t: Tensor, loss_fn: LossFn, *, method: str = "dopri5",
                     rtol: float = 1e-7, atol: float = 1e-9, options: dict[str, Any] | None = None) -> Tensor:
    """Dense p × p Hessian of the loss in the flattened trainable parameters (`parameters()` order).

    Double backward through plain ``torchdiffeq.odeint`` via
    `torch.autograd.functional.hessian`, which works with adaptive solvers where `torch.func`
    transforms do not. Memory grows with the number of solver steps: small problems only.

    Args:
        func: Vector field module with ``forward(t, x)``.
        y0: Initial state.
        t: 1-D tensor of output times.
        loss_fn: Maps the whole solution ``(len(t), *y0.shape)`` to a scalar.
        method: torchdiffeq method (any, adaptive included).
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        options: torchdiffeq solver options.

    Returns:
        ∇²_θθ L, shape (p, p).
    """
    named = [(n, p) for n, p in func.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(flat: Tensor) -> Tensor:
        parts = torch.split(flat, sizes)
        pdict = {n: q.reshape(s) for (n, _), q, s in zip(named, parts, shapes, strict=True)}

        def f(tt: Tensor, x: Tensor) -> Tensor:
            out: Tensor = functional_call(func, pdict, (tt, x))
            return out

        ys = torchdiffeq.odeint(f, y0, t, method=method, rtol=rtol, atol=atol, options=options)
        return loss_fn(ys)

    hess: Tensor = torch.autograd.functional.hessian(loss_of, flat0)  # type: ignore[no-untyped-call]
    return hess


def flat_params(module: nn.Module) -> Tensor:
    """The trainable parameters of `module`, flattened in `parameters()` order (detached).

    Args:
        module: Any module.

    Returns:
        θ, shape (p,): the layout of snopt's `grad_params`, `hess_params` and of `hvp`'s `v`.
    """
    return torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])


def param_dict(module: nn.Module) -> dict[str, Tensor]:
    """Detached copies of `module`'s trainable parameters by name (inputs for `torch.func`).

    Args:
        module: Any module.

    Returns:
        Name → tensor, for `torch.func.functional_call` or `rk_solve`.
    """
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
