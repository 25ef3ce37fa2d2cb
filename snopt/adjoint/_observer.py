"""Observers: the one place where the adjoint's backward solve talks to the outside."""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from snopt.adjoint._solve import SolverError


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


@runtime_checkable
class StepGuard(Protocol):
    """Decides whether a failed solve is absorbed (an optimizer undoes its step) or raised.

    `snopt.SNOpt` sets one on every `ODEBlock` of its model (see `snopt.optim.StepRecovery`):
    a solve that fails while the optimizer's latest step has not yet been validated was caused
    by that step, so the optimizer undoes it instead of ending the user's run.

    * ``forward_failed(err)`` — the forward solve raised `err`. True: `snopt.odeint` returns a
      finite placeholder (zeros) instead of raising; the guard reruns the forward pass once the
      step is undone, so the placeholder never reaches a loss. False: `err` is raised.
    * ``backward_failed(err)`` — the adjoint backward solve raised `err`. True: the gradients of
      this solve are NaN instead (the optimizer's next `step` sees them and undoes its step).
      False: `err` is raised.
    * ``tripped`` — a failure was absorbed during the current forward pass: later solves of it
      return their placeholder at once, without solving.
    """

    @property
    def tripped(self) -> bool:
        """Whether the current forward pass already absorbed a failure."""

    def forward_failed(self, err: SolverError) -> bool:
        """Whether to absorb a failed forward solve."""

    def backward_failed(self, err: SolverError) -> bool:
        """Whether to absorb a failed backward solve."""


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
