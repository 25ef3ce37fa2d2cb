"""Input validation shared by the front doors. Every error names the argument."""

import math

import torch
from torch import Tensor, nn

# The solvers of torchdiffeq 0.2.x, by name (its `SOLVERS` table is private).
FIXED_GRID_METHODS = frozenset({"euler", "midpoint", "heun3", "rk4", "explicit_adams", "implicit_adams",
                                "fixed_adams"})
ADAPTIVE_METHODS = frozenset({"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"})
METHODS = FIXED_GRID_METHODS | ADAPTIVE_METHODS


def check_method(name: str, method: str | None) -> str:
    """Return `method` (default ``"dopri5"``) or raise naming the known methods."""
    if method is None:
        return "dopri5"
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"`{name}` must be one of {sorted(METHODS)}; got {method!r}.")
    return method


def check_time_grid(t: object, name: str = "t") -> Tensor:
    """Check that `t` is a 1-D floating tensor of >= 2 finite, strictly monotone times."""
    if not isinstance(t, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of times; got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point tensor; got dtype {t.dtype}.")
    if t.ndim != 1:
        raise ValueError(f"`{name}` must be one-dimensional; got shape {tuple(t.shape)}.")
    if t.numel() < 2:
        raise ValueError(f"`{name}` needs at least 2 time points (start and end); got {t.numel()}.")
    with torch.no_grad():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{name}` must be finite; got {t.tolist()}.")
        d = t[1:] - t[:-1]
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError(f"`{name}` must be strictly increasing or strictly decreasing; got {t.tolist()}.")
    return t


def check_state(y0: object, name: str = "y0") -> Tensor:
    """Check that `y0` is a finite floating tensor."""
    if not isinstance(y0, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(y0).__name__}.")
    if not y0.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point tensor; got dtype {y0.dtype}.")
    if not torch._C._are_functorch_transforms_active():  # data-dependent checks cannot run under vmap
        check_finite(y0, name)
    return y0


def check_finite(x: Tensor, name: str) -> None:
    """Raise a ValueError naming `name` if `x` holds NaN or inf."""
    with torch.no_grad():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"`{name}` contains non-finite values (NaN or inf).")


def check_tolerance(name: str, value: float | None, default: float) -> float:
    """Return a positive finite tolerance (`default` if None)."""
    if value is None:
        return default
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a positive finite number; got {value!r}.")
    return v


def params_of(func: object, adjoint_params: object = None) -> tuple[Tensor, ...]:
    """The trainable tensors an adjoint differentiates: `adjoint_params`, else `func`'s parameters.

    Only tensors with ``requires_grad`` are kept, in order (under torch.func transforms,
    every floating tensor, since a transformed input need not report ``requires_grad``).
    """
    if adjoint_params is None:
        if not isinstance(func, nn.Module):
            raise TypeError(
                "`func` must be an nn.Module so that its parameters can be found; alternatively pass them "
                "explicitly as `adjoint_params=(...)` (use `adjoint_params=()` if there are none).")
        params: tuple[Tensor, ...] = tuple(func.parameters())
    else:
        if isinstance(adjoint_params, Tensor):
            raise TypeError("`adjoint_params` must be a sequence of tensors, not a single tensor.")
        params = tuple(adjoint_params)  # type: ignore[arg-type]
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"`adjoint_params[{i}]` must be a torch.Tensor; got {type(p).__name__}.")
    if torch._C._are_functorch_transforms_active():
        # Under torch.func (e.g. jvp) a differentiated tensor need not report requires_grad.
        return tuple(p for p in params if p.is_floating_point())
    return tuple(p for p in params if p.requires_grad)


def flat_numel(tensors: tuple[Tensor, ...]) -> int:
    """Total number of elements."""
    return sum(p.numel() for p in tensors)
