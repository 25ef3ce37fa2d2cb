"""Observers: the one place where the adjoint's backward solve talks to the outside."""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class AdjointObserver(Protocol):
    """Called once per accepted step of the adjoint's backward solve.

    `t` is the real (decreasing) time at the start of the step, `x` the re-solved state
    there, `a` the adjoint dL/dx there, `dt` the (positive) length of the step. Grad
    mode is off. Tensors must not be stored: they are reused by the solver.
    """

    def on_backward_step(self, t: Tensor, x: Tensor, a: Tensor, dt: Tensor) -> None:
        """Receive one accepted backward step."""


@dataclass
class SolveStats:
    """Counters filled in by `snopt.odeint` (pass one in with ``stats=``).

    Attributes:
        nfe_forward: Vector-field evaluations in the forward solve(s).
        nfe_backward: Vector-field evaluations in the adjoint backward solve(s) (each
            evaluation there also runs one vector-Jacobian product).
    """

    nfe_forward: int = 0
    nfe_backward: int = 0

    def reset(self) -> None:
        """Set both counters to zero."""
        self.nfe_forward = 0
        self.nfe_backward = 0
