"""Observers: the one place where the adjoint's backward solve talks to the outside."""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class AdjointObserver(Protocol):
    """Told when the adjoint's latest evaluation stands for an accepted backward step.

    ``on_backward_step(t, dt)`` is called right after an evaluation of the backward dynamics
    (F and its vector-Jacobian product) at time `t` that represents an accepted step of
    length `dt` > 0: for fixed-grid methods the first stage of each step (its start); for
    adaptive methods the last stage on acceptance (the step's end, exactly, for the FSAL
    methods dopri5 and bosh3; the last step is pinned to the interval's end). So Σ dt over
    one backward solve is the length of the time interval, and a statistic read from the
    latest evaluation (e.g. by module hooks) weighted by dt is a Riemann sum over [t0, t1].
    Grad mode is off; tensors must not be stored beyond the call.
    """

    def on_backward_step(self, t: Tensor, dt: Tensor) -> None:
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
