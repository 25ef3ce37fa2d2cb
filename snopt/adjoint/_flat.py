"""Flattening parameters to one vector (in `parameters()` order) and back."""

from collections.abc import Sequence

import torch
from torch import Tensor


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one 1-D vector (empty tensors allowed)."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Split a 1-D vector (or a batch (k, p) of them) into tensors shaped like `like`."""
    sizes = [t.numel() for t in like]
    lead = vec.shape[:-1]
    parts = torch.split(vec, sizes, dim=-1)
    return tuple(part.reshape(*lead, *t.shape) for part, t in zip(parts, like, strict=True))
