"""A thin, error-translating wrapper around torchdiffeq's (unmodified) solvers."""

from collections.abc import Callable
from typing import Any

import torch
import torchdiffeq
from torch import Tensor


class SolverError(RuntimeError):
    """The ODE solver failed (step-size underflow, non-finite state, too many steps)."""


def rms(x: Tensor) -> Tensor:
    """Root-mean-square norm (torchdiffeq's default)."""
    return x.abs().pow(2).mean().sqrt()


def solve(rhs: Callable[[Tensor, Any], Any], y0: Any, t: Tensor, *, method: str, rtol: float, atol: float,
          options: dict[str, Any], where: str, clock: Callable[[], Tensor | None]) -> Any:
    """Call `torchdiffeq.odeint` and turn its assertion failures into a `SolverError` naming the time.

    Args:
        rhs: Dynamics ``(t, y) -> dy/dt`` (``y`` a tensor or a tuple of tensors).
        y0: Initial state at ``t[0]``.
        t: Output times.
        method: A torchdiffeq method name.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        options: Solver options (copied, never modified).
        where: "forward" or "backward", for messages.
        clock: Returns the latest time at which the dynamics were evaluated.

    Returns:
        The solution at `t`, as torchdiffeq returns it.

    Raises:
        SolverError: When the solver fails or the state becomes non-finite.
    """
    try:
        sol = torchdiffeq.odeint(rhs, y0, t, rtol=rtol, atol=atol, method=method, options=dict(options))
    except AssertionError as err:
        last = clock()
        at = f"t = {float(last):.6g}" if last is not None else "the first step"
        raise SolverError(
            f"The {where} ODE solve ({method}, rtol={rtol:g}, atol={atol:g}) failed near {at} "
            f"on the way from t = {float(t[0]):.6g} to {float(t[-1]):.6g}: {str(err)[:200]}. "
            "Typical causes: a stiff or exploding vector field, or tolerances too tight for the dtype.") from err
    sols = sol if isinstance(sol, tuple) else (sol,)
    with torch.no_grad():
        if not all(bool(torch.isfinite(s).all()) for s in sols):
            first = sols[0]
            bad = (~torch.isfinite(first.reshape(first.shape[0], -1))).any(dim=1).nonzero()
            i = int(bad[0]) if bad.numel() else -1
            raise SolverError(
                f"The {where} ODE solve ({method}) produced a non-finite state, first seen at output time "
                f"t = {float(t[i]):.6g} (interval {float(t[max(i - 1, 0)]):.6g} to {float(t[i]):.6g}). "
                "The vector field may be exploding; try smaller steps or an adaptive method.")
    return sol
