"""The shared set-up of the second-order front doors: a Neural ODE loss as flat functions."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from snopt._checks import check_method, check_state, check_time_grid, check_tolerance, params_of
from snopt._types import LossFn, VectorField
from snopt.adjoint._field import Field
from snopt.adjoint._flat import flatten, unflatten
from snopt.adjoint._solve import rms, solve

Norm = Literal["mixed", "seminorm"]


@dataclass
class Problem:
    """L(θ, x0) = loss_fn(x(t1)) with dx/dt = F(t, x; θ), seen through flat vectors x ∈ R^n, θ ∈ R^p."""

    field: Field
    params: tuple[Tensor, ...]
    theta: Tensor
    x0: Tensor
    t: Tensor
    method: str
    rtol: float
    atol: float
    options: dict[str, Any]
    loss_fn: LossFn

    @property
    def n(self) -> int:
        """State size (the batch is part of the state)."""
        return self.x0.numel()

    @property
    def p(self) -> int:
        """Number of trainable parameters."""
        return self.theta.numel()

    def F(self, t: Tensor, x: Tensor, theta: Tensor) -> Tensor:
        """The vector field on flat vectors (functional in θ, so torch.func can differentiate it)."""
        ps = unflatten(theta, self.params)
        return self.field(t, x.reshape(self.x0.shape), ps).reshape(-1)

    def loss(self, x: Tensor) -> Tensor:
        """Φ on a flat state; checked to be a scalar."""
        out = self.loss_fn(x.reshape(self.x0.shape))
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError("`loss_fn` must return a scalar tensor (one element).")
        return out.reshape(())

    def solve(self, rhs: Callable[[Tensor, Any], Any], y0: Any, t: Tensor, *, where: str, norm: Norm,
              primal: Sequence[int] = (0,)) -> Any:
        """Integrate a tuple state with error control on all components or only on `primal` ones."""
        opts = dict(self.options)
        if norm == "seminorm" and self.method not in ("euler", "rk4", "midpoint", "heun3"):
            idx = tuple(primal)

            def seminorm(state: tuple[Tensor, ...]) -> Tensor:
                return torch.stack([rms(state[i]) for i in idx]).max()

            opts["norm"] = seminorm
        return solve(rhs, y0, t, method=self.method, rtol=self.rtol, atol=self.atol, options=opts, where=where,
                     clock=lambda: self.field.last_t)

    def forward(self) -> Tensor:
        """x(t1), flat, without a graph."""
        with torch.no_grad():
            ys = solve(lambda t, x: self.F(t, x, self.theta), self.x0.reshape(-1), self.t, method=self.method,
                       rtol=self.rtol, atol=self.atol, options=self.options, where="forward",
                       clock=lambda: self.field.last_t)
        out: Tensor = ys[-1]
        return out


def make_problem(func: VectorField, x0: Tensor, t: Tensor, loss_fn: LossFn, *, method: str | None, rtol: float,
                 atol: float, options: dict[str, Any] | None) -> Problem:
    """Validate the common arguments of `second_order`, `hvp` and `ggn_vp`."""
    method = check_method("method", method)
    t = check_time_grid(t, "t_span")
    if t.numel() != 2:
        raise ValueError(f"`t_span` must hold exactly two times (t0, t1); got {t.numel()}. "
                         "The loss is a function of the state at the last time.")
    x0 = check_state(x0, "x0")
    if not callable(loss_fn):
        raise TypeError("`loss_fn` must be callable: x(t1) -> scalar tensor.")
    params = params_of(func)
    for i, q in enumerate(params):
        if q.dtype != x0.dtype:
            raise TypeError(f"Parameter {i} of `func` has dtype {q.dtype} but `x0` has {x0.dtype}; convert one.")
    theta = flatten([q.detach() for q in params]).to(dtype=x0.dtype, device=x0.device)
    return Problem(field=Field(func, params), params=tuple(q.detach() for q in params), theta=theta,
                   x0=x0.detach(), t=t.detach(), method=method, rtol=check_tolerance("rtol", rtol, 1e-7),
                   atol=check_tolerance("atol", atol, 1e-9), options=dict(options or {}), loss_fn=loss_fn)
