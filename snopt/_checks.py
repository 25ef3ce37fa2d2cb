"""Input validation shared by the front doors. Every error names the argument."""

import importlib
import math
import warnings
from typing import Literal

import torch
from torch import Tensor, nn

MethodKind = Literal["fixed", "adaptive", "scipy"]
"""How a torchdiffeq solver steps: on a fixed grid (``step_size``/``grid_constructor``, reports
``callback_step``), adaptively with torchdiffeq's own error control (takes ``norm``, ``step_t``,
``jump_t``; reports ``callback_accept_step``), or ``"scipy"``: a black box that controls its own error
and reports no steps (``scipy_solver``, and any solver class that is neither of the other two)."""

# torchdiffeq 0.2.5's methods, used only when its solver registry cannot be read (see `discover_methods`).
_FALLBACK_KINDS: dict[str, MethodKind] = {
    "dopri8": "adaptive", "dopri5": "adaptive", "bosh3": "adaptive", "fehlberg2": "adaptive",
    "adaptive_heun": "adaptive", "euler": "fixed", "midpoint": "fixed", "heun2": "fixed", "heun3": "fixed",
    "rk4": "fixed", "explicit_adams": "fixed", "implicit_adams": "fixed", "fixed_adams": "fixed",
    "scipy_solver": "scipy"}
_FALLBACK_CALLBACKS: dict[MethodKind, frozenset[str]] = {
    "fixed": frozenset({"callback_step"}),
    "adaptive": frozenset({"callback_step", "callback_accept_step", "callback_reject_step"}),
    "scipy": frozenset()}


def discover_methods() -> tuple[dict[str, MethodKind], dict[str, frozenset[str]]]:
    """Every method of the installed torchdiffeq, with its kind and the step callbacks it makes.

    Read from torchdiffeq's solver registry (``torchdiffeq._impl.odeint.SOLVERS``, name → solver
    class); the kind comes from the class (a subclass of ``AdaptiveStepsizeODESolver`` or of
    ``FixedGridODESolver``; anything else, such as ``ScipyWrapperODESolver``, is ``"scipy"``), so a
    method added by a later torchdiffeq works without a change here. The registry is private: if it
    cannot be read, this warns and falls back to torchdiffeq 0.2.5's table.
    """
    try:
        solvers = importlib.import_module("torchdiffeq._impl.odeint").SOLVERS
        base = importlib.import_module("torchdiffeq._impl.solvers")
        adaptive, fixed = base.AdaptiveStepsizeODESolver, base.FixedGridODESolver
        kinds: dict[str, MethodKind] = {}
        callbacks: dict[str, frozenset[str]] = {}
        for name, cls in dict(solvers).items():
            kinds[str(name)] = ("adaptive" if issubclass(cls, adaptive) else "fixed" if issubclass(cls, fixed)
                                else "scipy")
            callbacks[str(name)] = frozenset(cls.valid_callbacks())
        if not kinds:
            raise ValueError("the registry is empty")
    except Exception as err:  # any change of the private layout lands here
        warnings.warn(
            f"snopt could not read torchdiffeq's solver registry (torchdiffeq._impl.odeint.SOLVERS: "
            f"{type(err).__name__}: {err}); falling back to torchdiffeq 0.2.5's methods "
            f"{sorted(_FALLBACK_KINDS)}. Methods of a newer torchdiffeq will be refused.",
            RuntimeWarning, stacklevel=2)
        return dict(_FALLBACK_KINDS), {k: _FALLBACK_CALLBACKS[v] for k, v in _FALLBACK_KINDS.items()}
    return kinds, callbacks


_KINDS, _CALLBACKS = discover_methods()
FIXED_GRID_METHODS = frozenset(k for k, v in _KINDS.items() if v == "fixed")
ADAPTIVE_METHODS = frozenset(k for k, v in _KINDS.items() if v == "adaptive")
METHODS = frozenset(_KINDS)


def check_method(name: str, method: str | None) -> str:
    """Return `method` (default ``"dopri5"``) or raise naming the known methods."""
    if method is None:
        return "dopri5"
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"`{name}` must be one of {sorted(METHODS)}; got {method!r}.")
    return method


def method_kind(method: str) -> MethodKind:
    """``"fixed"``, ``"adaptive"`` or ``"scipy"`` (see `MethodKind`) for a torchdiffeq method name.

    Raises:
        ValueError: For a name torchdiffeq does not know (the message lists those it does).
    """
    return _KINDS[check_method("method", method)]


def reports_steps(method: str) -> bool:
    """Whether the solver reports the steps it takes, as an `AdjointObserver` needs.

    Fixed-grid solvers report each step's start (``callback_step``), adaptive ones each accepted step
    (``callback_accept_step``); the scipy wrapper reports nothing.
    """
    kind = method_kind(method)
    needed = {"fixed": "callback_step", "adaptive": "callback_accept_step"}.get(kind)
    return needed is not None and needed in _CALLBACKS[method]


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


class NonFiniteStateError(ValueError):
    """The initial state of a solve holds NaN or inf (in training: the layers before an ODE block blew up)."""


def check_state(y0: object, name: str = "y0") -> Tensor:
    """Check that `y0` is a finite floating tensor (`NonFiniteStateError` if it is not finite)."""
    if not isinstance(y0, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(y0).__name__}.")
    if not y0.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point tensor; got dtype {y0.dtype}.")
    if not torch._C._are_functorch_transforms_active():  # data-dependent checks cannot run under vmap
        check_finite(y0, name)
    return y0


def check_finite(x: Tensor, name: str) -> None:
    """Raise a `NonFiniteStateError` (a ValueError) naming `name` if the state `x` holds NaN or inf."""
    with torch.no_grad():
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteStateError(f"`{name}` contains non-finite values (NaN or inf).")


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
