"""`ODEBlock`: a Neural ODE layer x ↦ x(t1) through the O(1)-memory adjoint."""

from typing import Any, Literal

import torch
from torch import Tensor, nn

from snopt._types import VectorField
from snopt.adjoint._observer import AdjointObserver, SolveStats, StepGuard
from snopt.adjoint._odeint import odeint
from snopt.nn._regularized import RegularizedField, check_weights


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
        kinetic: Weight λ_K of the kinetic-energy regulariser λ_K ∫‖f‖² dt (RNODE, Finlay et al.
            2020), batch mean; 0: off.
        jacobian: Weight λ_J of the Jacobian regulariser λ_J ∫‖∂f/∂x‖_F² dt (Hutchinson estimate,
            fresh Gaussian noise per forward); 0: off. Both integrals are solved as one extra scalar
            per sample in the same adjoint solve (O(1) memory); the forward call leaves their batch
            mean in ``regularization``, which the training loss must add
            (``snopt.nn.regularization(model)`` sums every block's).

    Attributes:
        stats: Forward/backward NFE of the latest forward call and its backward pass.
        observer: Receives accepted backward steps (set by `snopt.SNOpt`).
        guard: Absorbs a solve that fails because of an optimizer's latest step (set by
            `snopt.SNOpt`, which then undoes that step; see `snopt.adjoint.StepGuard`).
        regularization: The latest forward call's regulariser (a scalar with its graph), or None.

    Example:
        >>> block = ODEBlock(func, t1=1.0)  # doctest: +SKIP
        >>> y = block(x); y.sum().backward(); block.stats.nfe_forward, block.stats.nfe_backward  # doctest: +SKIP
    """

    def __init__(self, func: VectorField, t1: float = 1.0, t0: float = 0.0, *, method: str = "dopri5",
                 rtol: float = 1e-3, atol: float = 1e-3, options: dict[str, Any] | None = None,
                 adjoint_norm: Literal["mixed", "seminorm"] = "mixed", kinetic: float = 0.0,
                 jacobian: float = 0.0) -> None:
        super().__init__()
        check_weights(kinetic, jacobian)
        self.t0: Tensor
        self.t1: Tensor
        if not isinstance(func, nn.Module):
            raise TypeError(f"`func` must be an nn.Module with forward(t, x); got {type(func).__name__}.")
        if not float(t1) > float(t0):
            raise ValueError(f"`t1` must be greater than `t0`; got t0={t0}, t1={t1}.")
        self.func = func
        self.register_buffer("t0", torch.tensor(float(t0), dtype=torch.float64))  # exact times in float64 models
        self.register_buffer("t1", torch.tensor(float(t1), dtype=torch.float64))
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.options = dict(options or {})
        self.adjoint_norm: Literal["mixed", "seminorm"] = adjoint_norm
        self.stats = SolveStats()
        self.observer: AdjointObserver | None = None
        self.guard: StepGuard | None = None
        self.adjoint_options: dict[str, Any] | None = None
        self.kinetic = float(kinetic)
        self.jacobian = float(jacobian)
        self.regularization: Tensor | None = None

    @property
    def regularized(self) -> bool:
        """Whether a regulariser weight is > 0."""
        return self.kinetic > 0.0 or self.jacobian > 0.0

    def forward(self, x: Tensor) -> Tensor:
        """x(t1)."""
        self.stats.reset()
        t = torch.stack([self.t0, self.t1]).to(dtype=x.dtype, device=x.device)
        kw: dict[str, Any] = {"method": self.method, "rtol": self.rtol, "atol": self.atol, "options": self.options,
                              "adjoint_options": self.adjoint_options, "adjoint_norm": self.adjoint_norm,
                              "observer": self.observer, "stats": self.stats, "guard": self.guard}
        if not self.regularized:
            ys: Tensor = odeint(self.func, x, t, **kw)
            return ys[-1]
        field = RegularizedField(self.func, self.kinetic, self.jacobian)
        if self.jacobian > 0.0:
            field.sample_noise(x)
        xs, rs = odeint(field, (x, x.new_zeros(x.shape[0])), t, **kw)
        self.regularization = rs[-1].mean()
        out: Tensor = xs[-1]
        return out

    def extra_repr(self) -> str:
        t0, t1 = float(self.t0.detach()), float(self.t1.detach())
        reg = (f", kinetic={self.kinetic:g}" if self.kinetic else "") + (
            f", jacobian={self.jacobian:g}" if self.jacobian else "")
        return f"t0={t0:g}, t1={t1:g}, method={self.method!r}, rtol={self.rtol:g}{reg}"
