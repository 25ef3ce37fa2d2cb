"""Evaluating a vector field at explicit parameter tensors.

Every adjoint system in snopt needs F(t, x; θ) at parameter tensors that are not
necessarily the module's own attributes (torch.func unwraps them, tangent systems
perturb them). `Field` hides that: if the tensors handed in are the module's own, it
calls the module directly (no overhead); otherwise it uses
`torch.func.functional_call` with the parameters' names.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from snopt._types import VectorField


class FieldOutputError(ValueError):
    """The vector field returned something that is not shaped like the state."""


class Field:
    """A vector field `func(t, x)` with its trainable parameters made explicit.

    Args:
        func: The vector field.
        params: The trainable tensors of `func` the adjoint differentiates, in order.

    Attributes:
        nfe: Number of evaluations made through this object (forward and backward solves).
        last_t: The time of the latest evaluation (for error messages).
    """

    def __init__(self, func: VectorField, params: Sequence[Tensor]) -> None:
        self.func = func
        self.params = tuple(params)
        self.names: tuple[str, ...] | None = None
        if isinstance(func, nn.Module):
            by_id = {id(p): n for n, p in func.named_parameters(remove_duplicate=False)}
            names = [by_id.get(id(p)) for p in self.params]
            if all(n is not None for n in names):
                self.names = tuple(n for n in names if n is not None)
        self.nfe = 0
        self.last_t: Tensor | None = None

    def _is_own(self, params: Sequence[Tensor]) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params, strict=True))

    def raw(self, t: Tensor, x: Tensor, params: Sequence[Tensor]) -> Tensor:
        """F(t, x; params) without output checks."""
        self.nfe += 1
        self.last_t = t
        if self._is_own(params):
            return self.func(t, x)
        if self.names is None:
            raise NotImplementedError(
                "This operation evaluates `func` at parameter tensors other than its own, which needs every "
                "entry of `adjoint_params` to be a parameter of the nn.Module `func` (found by "
                "`named_parameters()`). Make the tensors module parameters.")
        assert isinstance(self.func, nn.Module)
        out: Tensor = functional_call(self.func, dict(zip(self.names, params, strict=True)), (t, x), strict=False)
        return out

    def __call__(self, t: Tensor, x: Tensor, params: Sequence[Tensor]) -> Tensor:
        """F(t, x; params), checked to have the state's shape and dtype."""
        out = self.raw(t, x, params)
        if not isinstance(out, Tensor):
            raise TypeError(f"`func` must return a torch.Tensor; got {type(out).__name__}.")
        if out.shape != x.shape:
            raise FieldOutputError(
                f"`func(t, x)` must return a tensor shaped like the state {tuple(x.shape)}; "
                f"got {tuple(out.shape)}.")
        if out.dtype != x.dtype:
            raise TypeError(f"`func(t, x)` must return the state's dtype {x.dtype}; got {out.dtype}.")
        return out

    def bind(self, params: Sequence[Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """A closure ``(t, x) -> F(t, x; params)`` (for torchdiffeq)."""
        ps = tuple(params)

        def rhs(t: Tensor, x: Tensor) -> Tensor:
            return self(t, x, ps)

        return rhs

    def vjp(self, t: Tensor, x: Tensor, a: Tensor, params: Sequence[Tensor], *, need_t: bool = False,
            ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor | None]:
        """F and the vector-Jacobian products aᵀF_x, aᵀF_θ (and aᵀF_t if `need_t`).

        Plain reverse mode on detached copies, so it runs inside a backward pass without
        keeping a graph. Returns ``(F, aᵀF_x, (aᵀF_θ per param), aᵀF_t or None)``.
        """
        if torch._C._are_functorch_transforms_active():
            return self._vjp_functional(t, x, a, params, need_t)
        own = self._is_own(params)
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            t_ = t.detach().requires_grad_(need_t)
            ps = tuple(params) if own else tuple(p.detach().requires_grad_(True) for p in params)
            f = self(t_, x_, ps)
            inputs: tuple[Tensor, ...] = (x_, *ps, *((t_,) if need_t else ()))
            grads = torch.autograd.grad(f, inputs, a, allow_unused=True, materialize_grads=True)
        gx = grads[0]
        gp = tuple(grads[1:1 + len(ps)])
        gt = grads[-1] if need_t else None
        return f.detach(), gx, gp, gt

    def _vjp_functional(self, t: Tensor, x: Tensor, a: Tensor, params: Sequence[Tensor], need_t: bool,
                        ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor | None]:
        # Inside a torch.func transform `requires_grad_` is not allowed: take the vjp functionally,
        # evaluating at parameter tensors that are explicit inputs (never the module's attributes).
        if self.names is None and len(params) > 0:
            raise NotImplementedError(
                "Under torch.func transforms every entry of `adjoint_params` must be a parameter of the "
                "nn.Module `func`.")

        def fn(t_: Tensor, x_: Tensor, *ps: Tensor) -> Tensor:
            return self._call_functional(t_, x_, ps)

        f, pullback = torch.func.vjp(fn, t, x, *params)  # type: ignore[misc]
        grads = pullback(a)
        return f, grads[1], tuple(grads[2:]), (grads[0] if need_t else None)

    def _call_functional(self, t: Tensor, x: Tensor, params: Sequence[Tensor]) -> Tensor:
        self.nfe += 1
        self.last_t = t
        if not params:
            return self.func(t, x)
        assert isinstance(self.func, nn.Module) and self.names is not None
        out: Tensor = functional_call(self.func, dict(zip(self.names, params, strict=True)), (t, x), strict=False)
        return out


def functional_field(field: Field) -> Callable[..., Any]:
    """``(t, x, params) -> F``, for use inside torch.func transforms."""
    return field.__call__
