"""`ODEBlock`: a Neural ODE layer x ↦ x(t1) through the O(1)-memory adjoint."""

from typing import Any, Literal

import torch
from torch import Tensor, nn

from snopt._types import VectorField
from snopt.adjoint._observer import AdjointObserver, SolveStats
from snopt.adjoint._odeint import odeint


class ODEBlock(nn.Module):
    """x ↦ x(t1) with dx/dt = func(t, x), x(t0) = x, differentiated by `snopt.odeint`.

    Args:
        func: The vector field, an nn.Module with ``forward(t, x)``.
        t1: End time (> t0); a buffer, so `HorizonController` can move it.
        t0: Start time.
        method: torchdiffeq method.
        rtol: Relative tolerance (forward and backward).
        atol: Absolute tolerance (forward and backward).
        options: torchdiffeq options.
        adjoint_norm: Backward error control, ``"mixed"`` or ``"seminorm"`` (see `snopt.odeint`).

    Attributes:
        stats: Forward/backward NFE of the latest forward call and its backward pass.
        observer: Receives accepted backward steps (set by `snopt.SNOpt`).

    Example:
        >>> block = ODEBlock(func, t1=1.0)  # doctest: +SKIP
        >>> y = block(x); y.sum().backward(); block.stats.nfe_forward, block.stats.nfe_backward  # doctest: +SKIP
    """

    def __init__(self, func: VectorField, t1: float = 1.0, t0: float = 0.0, *, method: str = "dopri5",
                 rtol: float = 1e-3, atol: float = 1e-3, options: dict[str, Any] | None = None,
                 adjoint_norm: Literal["mixed", "seminorm"] = "mixed") -> None:
        super().__init__()
        self.t0: Tensor
        self.t1: Tensor
        if not isinstance(func, nn.Module):
            raise TypeError(f"`func` must be an nn.Module with forward(t, x); got {type(func).__name__}.")
        if not float(t1) > float(t0):
            raise ValueError(f"`t1` must be greater than `t0`; got t0={t0}, t1={t1}.")
        self.func = func
        self.register_buffer("t0", torch.tensor(float(t0)))
        self.register_buffer("t1", torch.tensor(float(t1)))
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.options = dict(options or {})
        self.adjoint_norm: Literal["mixed", "seminorm"] = adjoint_norm
        self.stats = SolveStats()
        self.observer: AdjointObserver | None = None
        self.adjoint_options: dict[str, Any] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x(t1)."""
        self.stats.reset()
        t = torch.stack([self.t0, self.t1]).to(dtype=x.dtype, device=x.device)
        ys: Tensor = odeint(self.func, x, t, method=self.method, rtol=self.rtol, atol=self.atol,
                            options=self.options, adjoint_options=self.adjoint_options,
                            adjoint_norm=self.adjoint_norm, observer=self.observer, stats=self.stats)
        return ys[-1]

    def extra_repr(self) -> str:
        t0, t1 = float(self.t0.detach()), float(self.t1.detach())
        return f"t0={t0:g}, t1={t1:g}, method={self.method!r}, rtol={self.rtol:g}"
