"""2-D toy densities (as in FFJORD's experiments), sampled from a `torch.Generator`.

Each toy also gives a component label per point (moon, ring, Gaussian, arm or square),
which `load_toy` stores as ``y``; a density model ignores it.
"""

import math
from typing import Literal

import torch
from torch import Tensor

from snopt.data._tabular import TabularSplit, _check_float_dtype

ToyName = Literal["moons", "8gaussians", "circles", "pinwheel", "checkerboard"]
TOY_NAMES: tuple[ToyName, ...] = ("moons", "8gaussians", "circles", "pinwheel", "checkerboard")
_NUM_COMPONENTS = {"moons": 2, "8gaussians": 8, "circles": 2, "pinwheel": 5, "checkerboard": 8}


def _moons(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    # sklearn's make_moons(noise=0.1) with random angles, then FFJORD's affine map 2x + (-1, -0.2).
    label = torch.randint(0, 2, (n,), generator=g)
    angle = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    x = torch.where(label[:, None] == 0, upper, lower)
    x = x + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return 2 * x + torch.tensor([-1.0, -0.2], dtype=torch.float64), label


def _eight_gaussians(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    label = torch.randint(0, 8, (n,), generator=g)
    angle = label.to(torch.float64) * (math.pi / 4)
    centers = 4 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    x = centers + 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x / math.sqrt(2), label


def _circles(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    # sklearn's make_circles(factor=0.5, noise=0.08) with random angles, scaled by 3.
    label = torch.randint(0, 2, (n,), generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    radius = torch.where(label == 0, 1.0, 0.5).to(torch.float64)
    x = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return 3 * (x + 0.08 * torch.randn(n, 2, generator=g, dtype=torch.float64)), label


def _pinwheel(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    radial_std, tangential_std, num_arms, rate = 0.3, 0.1, 5, 0.25
    label = torch.randint(0, num_arms, (n,), generator=g)
    feats = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([radial_std, tangential_std],
                                                                                dtype=torch.float64)
    feats[:, 0] += 1.0
    angle = label.to(torch.float64) * (2 * math.pi / num_arms) + rate * torch.exp(feats[:, 0])
    cos, sin = torch.cos(angle), torch.sin(angle)
    x = torch.stack([feats[:, 0] * cos + feats[:, 1] * sin, -feats[:, 0] * sin + feats[:, 1] * cos], dim=1)
    return 2 * x, label


def _checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    # Uniform on the 8 dark squares of a 4 × 4 board over [-4, 4]².
    x1 = 4 * torch.rand(n, generator=g, dtype=torch.float64) - 2
    row = torch.randint(0, 2, (n,), generator=g)
    x2 = torch.rand(n, generator=g, dtype=torch.float64) - 2 * row + torch.floor(x1) % 2
    col = (torch.floor(x1) + 2).to(torch.int64)
    label = 2 * col + row
    return 2 * torch.stack([x1, x2], dim=1), label


_SAMPLERS = {"moons": _moons, "8gaussians": _eight_gaussians, "circles": _circles, "pinwheel": _pinwheel,
             "checkerboard": _checkerboard}


def sample_toy_labeled(name: ToyName, n: int, *, generator: torch.Generator | None = None, seed: int | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Draw `n` points of a 2-D toy density and their component labels.

    Args:
        name: ``"moons"``, ``"8gaussians"``, ``"circles"``, ``"pinwheel"`` or ``"checkerboard"``.
        n: Number of points.
        generator: Random generator (advanced by the draw); exclusive with `seed`.
        seed: Seed of a fresh generator; with neither, the global generator is used.
        dtype: Floating dtype of the points.

    Returns:
        ``(x, labels)``: points of shape ``(n, 2)`` and int64 labels of shape ``(n,)``.
    """
    if name not in _SAMPLERS:
        raise ValueError(f"Unknown toy {name!r}; choose one of {TOY_NAMES}.")
    if n < 0:
        raise ValueError(f"`n` must be non-negative; got {n}.")
    if generator is not None and seed is not None:
        raise ValueError("Pass `generator` or `seed`, not both.")
    _check_float_dtype(dtype)
    if generator is None:
        generator = torch.Generator().manual_seed(seed) if seed is not None else torch.default_generator
    x, label = _SAMPLERS[name](n, generator)
    return x.to(dtype), label


def sample_toy(name: ToyName, n: int, *, generator: torch.Generator | None = None, seed: int | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Draw `n` points of a 2-D toy density (fresh batches for CNF training).

    Args:
        name: ``"moons"``, ``"8gaussians"``, ``"circles"``, ``"pinwheel"`` or ``"checkerboard"``.
        n: Number of points.
        generator: Random generator (advanced by the draw); exclusive with `seed`.
        seed: Seed of a fresh generator; with neither, the global generator is used.
        dtype: Floating dtype.

    Returns:
        Points of shape ``(n, 2)``.
    """
    return sample_toy_labeled(name, n, generator=generator, seed=seed, dtype=dtype)[0]


def load_toy(name: ToyName, n_train: int = 10_000, n_val: int = 1_000, n_test: int = 5_000, *, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> TabularSplit:
    """A fixed train/validation/test sample of a toy density (not standardised).

    Args:
        name: Toy name (see `TOY_NAMES`).
        n_train: Training points.
        n_val: Validation points.
        n_test: Test points.
        seed: Seed of the whole sample.
        dtype: Floating dtype.

    Returns:
        A `TabularSplit` with component labels as ``y``.
    """
    g = torch.Generator().manual_seed(seed)
    parts = [sample_toy_labeled(name, k, generator=g, dtype=dtype) for k in (n_train, n_val, n_test)]
    (xtr, ytr), (xva, yva), (xte, yte) = parts
    meta = {"name": name, "seed": seed, "dim": 2, "num_classes": _NUM_COMPONENTS[name], "standardized": False,
            "source": "snopt.data.sample_toy"}
    return TabularSplit(x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, meta=meta, x_val=xva, y_val=yva)


__all__ = ["TOY_NAMES", "ToyName", "load_toy", "sample_toy", "sample_toy_labeled"]
