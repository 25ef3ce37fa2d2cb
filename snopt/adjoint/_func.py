"""Typed wrappers of the `torch.func` calls used inside the dynamics (its stubs return unions)."""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def vjp(fn: Callable[..., Tensor], *primals: Tensor) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]]:
    """`torch.func.vjp` without auxiliary outputs."""
    out, pull = torch.func.vjp(fn, *primals)[:2]
    return out, pull


def jvp(fn: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    """`torch.func.jvp` without auxiliary outputs: (outputs, output tangents)."""
    res = torch.func.jvp(fn, primals, tangents)
    return res[0], res[1]
