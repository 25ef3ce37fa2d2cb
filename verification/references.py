"""Exact references ("oracles") that the verification tree compares snopt against.

Everything here is independent of snopt's adjoint machinery (DESIGN.md §5):

* **Closed form.** The linear ODE dx/dt = A x + b has x(t) = expm(M (t − t0)) applied to
  [x0; 1] with M = [[A, b], [0, 0]]. `linear_solution` writes it with
  `torch.linalg.matrix_exp`, so autograd and `torch.func` (grad, jacrev, jvp, hessian)
  differentiate it exactly with respect to A, b, x0 and every output time.
* **Discretise-then-differentiate, fixed grid.** `rk_solve` is a pure-torch re-implementation
  of torchdiffeq's ``"euler"`` and ``"rk4"`` (torchdiffeq's rk4 is the 3/8-rule variant,
  `rk4_alt_step_func`) on n equal steps per output interval, with no in-place writes and the
  field evaluated through `torch.func.functional_call`, so every `torch.func` transform
  works through it. On a grid aligned with the output times it reproduces
  ``torchdiffeq.odeint(..., options={"step_size": h})`` to rounding.
* **Discretise-then-differentiate, adaptive.** `backprop_grads` / `backprop_hessian`
  differentiate through plain (non-adjoint) ``torchdiffeq.odeint`` by ordinary autograd.

`rel_err` is the one agreement measure used throughout.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torchdiffeq
from torch import Tensor, nn
from torch.func import functional_call

Params = Mapping[str, Tensor]
TensorTree = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
FieldFn = Callable[[Tensor, Tensor], Tensor]

_ONE_THIRD = 1.0 / 3.0
_TWO_THIRDS = 2.0 / 3.0


# ----------------------------------------------------------------------------------------------
# Agreement measure
# ----------------------------------------------------------------------------------------------

def _leaves(tree: TensorTree) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [tree[k] for k in sorted(tree)]
    return list(tree)


def rel_err(a: TensorTree, b: TensorTree, *, tiny: float = 1e-300) -> float:
    """Relative error ||a − b|| / max(||b||, tiny), the 2-norm over all entries.

    Args:
        a: The value under test: a tensor, a sequence of tensors or a dict of tensors.
        b: The reference, with the same structure (dicts are matched by key).
        tiny: Floor of the denominator, so that a zero reference gives the absolute error.

    Returns:
        The relative error as a Python float (computed in float64, outside autograd).
    """
    la, lb = _leaves(a), _leaves(b)
    if isinstance(a, Mapping) and isinstance(b, Mapping) and sorted(a) != sorted(b):
        raise ValueError(f"Keys differ: {sorted(a)} vs {sorted(b)}.")
    if len(la) != len(lb):
        raise ValueError(f"Structures differ: {len(la)} vs {len(lb)} tensors.")
    num = 0.0
    den = 0.0
    with torch.no_grad():
        for x, y in zip(la, lb, strict=True):
            if x.shape != y.shape:
                raise ValueError(f"Shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}.")
            x64, y64 = x.detach().to(torch.float64), y.detach().to(torch.float64)
            num += float((x64 - y64).pow(2).sum())
            den += float(y64.pow(2).sum())
    rel: float = num ** 0.5 / max(den ** 0.5, tiny)
    return rel


# ----------------------------------------------------------------------------------------------
# Closed form: linear ODE
# ----------------------------------------------------------------------------------------------

class LinearField(nn.Module):
    """The affine vector field F(t, x) = A x + b (autonomous), batched over leading dims of x.

    Args:
        A: (n, n) matrix; becomes the parameter ``A`` (a copy).
        b: (n,) vector; becomes the parameter ``b`` (a copy).
    """

    def __init__(self, A: Tensor, b: Tensor) -> None:
        super().__init__()
        if A.ndim != 2 or A.shape[0] != A.shape[1] or b.shape != A.shape[:1]:
            raise ValueError(f"Need A (n, n) and b (n,); got {tuple(A.shape)} and {tuple(b.shape)}.")
        self.A = nn.Parameter(A.detach().clone())
        self.b = nn.Parameter(b.detach().clone())

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Return A x + b for x shaped (..., n)."""
        return x @ self.A.T + self.b


def linear_solution(A: Tensor, b: Tensor, x0: Tensor, t: Tensor) -> Tensor:
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
    M = torch.cat([top, torch.zeros(1, n + 1, dtype=A.dtype, device=A.device)], dim=0)
    phi = torch.linalg.matrix_exp((t - t[0]).reshape(-1, 1, 1) * M)            # (T, n+1, n+1)
    x0_aug = torch.cat([x0, torch.ones(*x0.shape[:-1], 1, dtype=x0.dtype, device=x0.device)], dim=-1)
    xs = torch.einsum("tij,...j->t...i", phi, x0_aug)
    return xs[..., :n]


# ----------------------------------------------------------------------------------------------
# Discretise-then-differentiate: fixed-grid Runge-Kutta written by us
# ----------------------------------------------------------------------------------------------

def euler_step(f: FieldFn, t0: Tensor, dt: Tensor, t1: Tensor, y: Tensor) -> Tensor:
    """Increment of one explicit Euler step (torchdiffeq's ``"euler"``)."""
    return dt * f(t0, y)


def rk4_step(f: FieldFn, t0: Tensor, dt: Tensor, t1: Tensor, y: Tensor) -> Tensor:
    """Increment of one step of the RK4 3/8 rule, as torchdiffeq's ``"rk4"`` (`rk4_alt_step_func`)."""
    k1 = f(t0, y)
    k2 = f(t0 + dt * _ONE_THIRD, y + dt * k1 * _ONE_THIRD)
    k3 = f(t0 + dt * _TWO_THIRDS, y + dt * (k2 - k1 * _ONE_THIRD))
    k4 = f(t1, y + dt * (k1 - k2 + k3))
    return (k1 + 3 * (k2 + k3) + k4) * dt * 0.125


STEPPERS: dict[str, Callable[[FieldFn, Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "euler": euler_step,
    "rk4": rk4_step,
}


def rk_solve(module: nn.Module, params: Params, y0: Tensor, t: Tensor, *, steps: int | Sequence[int],
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
        params: Mapping from (some of) `module`'s parameter/buffer names to tensors.
        y0: Initial state.
        t: 1-D tensor of output times, strictly monotone.
        steps: Steps per output interval (one int for all, or one per interval).
        method: ``"rk4"`` (3/8 rule) or ``"euler"``.

    Returns:
        The solution shaped ``(len(t), *y0.shape)``.
    """
    if method not in STEPPERS:
        raise ValueError(f"`method` must be one of {sorted(STEPPERS)}; got {method!r}.")
    step = STEPPERS[method]
    n_int = len(t) - 1
    per = [steps] * n_int if isinstance(steps, int) else list(steps)
    if len(per) != n_int or any(n < 1 for n in per):
        raise ValueError(f"`steps` must give a positive count for each of the {n_int} intervals; got {steps!r}.")

    def f(tt: Tensor, x: Tensor) -> Tensor:
        out: Tensor = functional_call(module, dict(params), (tt, x), strict=False)
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
    """Steps per output interval for a grid of `step_size` aligned with `t` (raises if not aligned)."""
    gaps = (t[1:] - t[:-1]).abs().tolist()
    counts = [round(g / step_size) for g in gaps]
    for g, c in zip(gaps, counts, strict=True):
        if c < 1 or abs(c * step_size - g) > 1e-12 * max(1.0, g):
            raise ValueError(f"Output interval {g} is not a multiple of step_size {step_size}.")
    return counts


# ----------------------------------------------------------------------------------------------
# Discretise-then-differentiate: autograd through plain (adaptive) torchdiffeq.odeint
# ----------------------------------------------------------------------------------------------

def backprop_grads(func: nn.Module, y0: Tensor, t: Tensor, loss_fn: Callable[[Tensor], Tensor], *,
                   method: str = "dopri5", rtol: float = 1e-7, atol: float = 1e-9,
                   options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gradients of ``loss_fn(odeint(func, y0, t))`` by ordinary autograd through plain torchdiffeq.

    The solver's step-size choices are part of the graph only through the values they
    produce (torchdiffeq's controller runs on detached norms), so this is the exact
    derivative of the discrete adaptive solution.

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


def backprop_hessian(func: nn.Module, y0: Tensor, t: Tensor, loss_fn: Callable[[Tensor], Tensor], *,
                     method: str = "dopri5", rtol: float = 1e-7, atol: float = 1e-9,
                     options: dict[str, Any] | None = None) -> Tensor:
    """Dense p × p Hessian of the loss in the flattened trainable parameters (`parameters()` order).

    Double backward through plain ``torchdiffeq.odeint`` via
    `torch.autograd.functional.hessian`, which works with adaptive solvers (REFERENCE.md §2)
    where `torch.func` transforms do not. Memory grows with the number of solver steps:
    small problems only.
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
    """The trainable parameters of `module`, flattened in `parameters()` order (detached)."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])


def param_dict(module: nn.Module) -> dict[str, Tensor]:
    """Detached copies of `module`'s trainable parameters by name (inputs for `torch.func`)."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
