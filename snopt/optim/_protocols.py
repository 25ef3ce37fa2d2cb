"""What SNOpt's helpers see of it: a layer record and two small Protocols.

`snopt.optim._snopt` imports `_distributed` and `_recovery`; they import only this module, so
the dependency runs one way (type level included): a helper names the attributes it reads, and
`SNOpt` satisfies the Protocol without the helper importing it.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from snopt.curvature._collector import FactorCollector
from snopt.curvature._eigen import EigenBasis
from snopt.curvature._kron import KronFactors


@dataclass(frozen=True)
class KronLayerRef:
    """One preconditioned layer: its collector, its name there, the module and its weight (the state key)."""

    collector: FactorCollector
    name: str
    module: nn.Module
    weight: Tensor


class CurvatureOwner(Protocol):
    """What `DistributedCurvature` reads and writes of an optimizer (`SNOpt` is one)."""

    @property
    def layers(self) -> list[KronLayerRef]:
        """The preconditioned layers, in a fixed order."""

    @property
    def collectors(self) -> list[FactorCollector]:
        """The factor collectors."""

    @property
    def update_freq(self) -> int:
        """Steps between refreshes."""

    @property
    def sampling(self) -> str:
        """Where the statistics are sampled (``"steps"`` or ``"grid"``)."""

    @property
    def damping(self) -> float:
        """Shift added to the factors' eigenvalues."""

    @property
    def state(self) -> Any:
        """Per-weight state (eigenbases, m2), keyed by `KronLayerRef.weight`."""

    @property
    def factor_decay(self) -> float:
        """Weight of the previous refresh's factors in the running average (0: none)."""

    def blend(self, factors: list[KronFactors | None]) -> list[KronFactors | None]:
        """Per layer, the new factors averaged with the previous refresh's."""

    def install(self, factors: list[KronFactors | None], bases: list[EigenBasis | None],
                batch_sizes: list[float]) -> None:
        """Per layer, install a refresh's basis and m2 (or keep the layer's state: see `SNOpt.install`)."""


class Undoable(CurvatureOwner, Protocol):
    """What `StepRecovery` needs of an optimizer to undo one of its steps (`SNOpt` is one)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The (shared) parameter groups."""

    @property
    def base(self) -> torch.optim.Optimizer:
        """The base optimizer, whose state a step changes."""

    def counters(self) -> dict[str, Any]:
        """The scalars a step changes (step count, last trust-region factor, ...)."""

    def restore_counters(self, counters: dict[str, Any]) -> None:
        """Set the scalars back to what `counters` returned before the step (and reset the collectors)."""
