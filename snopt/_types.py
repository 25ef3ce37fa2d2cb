"""Type aliases shared by the whole package.

Shapes are documented in names rather than enforced: `State` is any floating tensor
(a batch is part of the state), `TimeGrid` a 1-D floating tensor of strictly
monotone times, `FlatVector` a 1-D tensor of length p (parameters flattened in
`func.parameters()` order).
"""

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

State = Tensor
TimeGrid = Tensor
FlatVector = Tensor
LossFn = Callable[[Tensor], Tensor]


class VectorField(Protocol):
    """Anything called as ``func(t, x) -> dx/dt`` with ``dx/dt`` shaped like ``x``."""

    def __call__(self, t: Tensor, x: Tensor) -> Tensor: ...


__all__ = ["FlatVector", "LossFn", "State", "TimeGrid", "VectorField", "torch"]
