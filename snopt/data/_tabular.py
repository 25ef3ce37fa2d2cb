"""Splits, errors and split helpers shared by all loaders; tabular density data.

Every loader returns a frozen `Split` of tensors (float features, int64 labels),
built from a seed alone (no global random state) and standardised with statistics of
the training part only. Tabular data for density estimation (`load_tabular`) come as a
`TabularSplit` with a validation part as well.

Nothing here reaches the network: scikit-learn's wine and breast-cancer tables ship
inside scikit-learn, the Old Faithful table (R's ``datasets::faithful``, 272 eruptions)
inside the ``plotnine`` wheel (``plotnine/data/faithful.csv``), which is located
through its installed-files record without importing plotnine.
"""

import csv
import dataclasses
import importlib
import importlib.metadata
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Literal, Self

import torch
from torch import Tensor

TabularName = Literal["wine", "breast_cancer", "old_faithful"]
TABULAR_NAMES: tuple[TabularName, ...] = ("wine", "breast_cancer", "old_faithful")


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not on this machine; the message says how to install them."""


def require(module: str, install: str) -> ModuleType:
    """Import an optional dependency, or fail with the command that installs it.

    Args:
        module: Module to import (e.g. ``"sklearn.datasets"``).
        install: The pip requirement that provides it (e.g. ``"scikit-learn"``).

    Returns:
        The imported module.

    Raises:
        ImportError: When it is not installed; the message names ``pip install <install>``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"This loader needs `{module}`: install it with `pip install {install}` "
                          "(or `pip install snopt[experiments]`).") from err


@dataclasses.dataclass(frozen=True, repr=False)
class Split:
    """A train/test split of tensors.

    Attributes:
        x_train: Training inputs, shape ``(N_train, ...)``.
        y_train: Training targets (int64 class labels), shape ``(N_train,)``.
        x_test: Test inputs, shape ``(N_test, ...)``.
        y_test: Test targets, shape ``(N_test,)``.
        meta: Read-only facts about the data (``name``, ``num_classes``, ``classes``,
            ``source``, the standardisation ``mean``/``std`` when applied, ...).
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    meta: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))
        for part in ("train", "test", "val"):
            x, y = getattr(self, f"x_{part}", None), getattr(self, f"y_{part}", None)
            if x is not None and y is not None and len(x) != len(y):
                raise ValueError(f"x_{part} has {len(x)} rows but y_{part} has {len(y)}.")

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for data without labels)."""
        return int(self.meta.get("num_classes", 0))

    def to(self, device: torch.device | str) -> Self:
        """Move every tensor field to `device`.

        Args:
            device: Target device.

        Returns:
            A new split of the same type.
        """
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **moved)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{f.name}={tuple(getattr(self, f.name).shape)}" for f in dataclasses.fields(self)
                           if isinstance(getattr(self, f.name), Tensor))
        return f"{type(self).__name__}({self.meta.get('name', '?')!r}, {shapes})"


@dataclasses.dataclass(frozen=True, repr=False)
class TabularSplit(Split):
    """A train/validation/test split of a table.

    Attributes:
        x_val: Validation inputs, shape ``(N_val, D)``.
        y_val: Validation labels, shape ``(N_val,)``.
    """

    x_val: Tensor
    y_val: Tensor


def stratified_indices(y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic stratified split of row indices.

    Each class gives ``round(test_fraction * count)`` rows to the test part; both parts
    are then shuffled. The result depends only on `y` and `seed`.

    Args:
        y: Integer labels, shape ``(N,)``.
        test_fraction: Fraction in (0, 1) of each class to hold out.
        seed: Seed of the permutations.

    Returns:
        ``(train_idx, test_idx)``, int64 tensors.
    """
    _check_fraction("test_fraction", test_fraction)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr, te = torch.cat(train), torch.cat(test)
    return tr[torch.randperm(len(tr), generator=g)], te[torch.randperm(len(te), generator=g)]


def random_indices(n: int, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Deterministic random split of ``range(n)`` into parts of the given fractions, then the rest.

    Args:
        n: Number of rows.
        fractions: Fractions of the leading parts (the last part takes the remainder).
        seed: Seed of the permutation.

    Returns:
        ``len(fractions) + 1`` int64 index tensors.
    """
    for f in fractions:
        _check_fraction("fraction", f)
    if sum(fractions) >= 1:
        raise ValueError(f"Fractions must sum to less than 1; got {list(fractions)}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for f in fractions:
        k = int(round(f * n))
        parts.append(perm[start:start + k])
        start += k
    parts.append(perm[start:])
    return parts


def fit_standardizer(x: Tensor, dims: int | tuple[int, ...] = 0) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of `x` over `dims` (kept for broadcasting); a zero std becomes 1.

    Args:
        x: Training data.
        dims: Dimensions reduced over (0: per feature; all dims: one scalar).

    Returns:
        ``(mean, std)``, broadcastable against `x`.
    """
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=dims, keepdim=True)
    std = x64.std(dim=dims, keepdim=True, unbiased=False)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"`{name}` must lie in (0, 1); got {value}.")


def _check_float_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be a floating dtype; got {dtype}.")


def faithful_csv_path() -> Path | None:
    """Where an installed package ships R's Old Faithful table, or None.

    Looks in the installed files of ``plotnine`` (``plotnine/data/faithful.csv``)
    without importing it.

    Returns:
        The CSV path, or None when no installed package ships it.
    """
    try:
        dist = importlib.metadata.distribution("plotnine")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("plotnine/data/faithful.csv")))
    return path if path.is_file() else None


def read_faithful_csv(path: str | Path) -> Tensor:
    """Read an Old Faithful CSV with columns ``eruptions`` and ``waiting`` (minutes).

    Args:
        path: CSV file with a header naming both columns (other columns are ignored).

    Returns:
        float64 tensor of shape ``(N, 2)``: eruption duration, waiting time.
    """
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"eruptions", "waiting"} <= set(rows[0]):
        raise ValueError(f"{path} does not look like the Old Faithful table (columns `eruptions`, `waiting`).")
    return torch.tensor([[float(r["eruptions"]), float(r["waiting"])] for r in rows], dtype=torch.float64)


def _load_table(name: TabularName, path: str | Path | None) -> tuple[Tensor, Tensor, dict[str, Any]]:
    if name == "old_faithful":
        csv_path = Path(path) if path is not None else faithful_csv_path()
        if csv_path is None or not csv_path.is_file():
            where = f"{csv_path} does not exist" if csv_path is not None else "no installed package ships it"
            raise DatasetNotFoundError(
                f"Old Faithful data not found ({where}). Install it with `pip install plotnine` (its wheel ships "
                "plotnine/data/faithful.csv, MIT licence), or pass `path=` to a CSV with columns "
                "`eruptions,waiting` (R's datasets::faithful).")
        x = read_faithful_csv(csv_path)
        meta = {"features": ("eruptions", "waiting"), "source": str(csv_path), "num_classes": 0, "classes": ()}
        return x, torch.zeros(len(x), dtype=torch.int64), meta
    if path is not None:
        raise ValueError(f"`path` applies to 'old_faithful' only; {name!r} ships with scikit-learn.")
    datasets = require("sklearn.datasets", "scikit-learn")
    bunch = datasets.load_wine() if name == "wine" else datasets.load_breast_cancer()
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    classes = tuple(str(c) for c in bunch.target_names)
    meta = {"features": tuple(str(f) for f in bunch.feature_names), "source": f"sklearn.datasets.load_{name}",
            "num_classes": len(classes), "classes": classes}
    return x, y, meta


def load_tabular(name: TabularName, *, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                 dtype: torch.dtype = torch.float32, standardize: bool = True,
                 path: str | Path | None = None) -> TabularSplit:
    """Load a real table for density estimation, split into train/validation/test.

    ``"wine"`` (178 × 13) and ``"breast_cancer"`` (569 × 30) come from scikit-learn
    (class labels kept in ``y_*``, unused by a density model); ``"old_faithful"``
    (272 × 2: eruption duration and waiting time, in minutes; labels are zeros) from
    the CSV that ``plotnine`` ships, or `path`. Waiting times are whole minutes
    (``meta["integer_valued"]``) and durations have many ties: add dequantisation noise
    if a flow's likelihood must not collapse onto them.

    Args:
        name: ``"wine"``, ``"breast_cancer"`` or ``"old_faithful"``.
        val_fraction: Fraction of rows for validation.
        test_fraction: Fraction of rows for test.
        seed: Seed of the random split.
        dtype: Floating dtype of the features.
        standardize: Standardise each feature with the training mean and std
            (``meta["mean"]``, ``meta["std"]``, shape ``(1, D)``, float64).
        path: For ``"old_faithful"`` only: a CSV to read instead of plotnine's.

    Returns:
        A `TabularSplit`.

    Raises:
        DatasetNotFoundError: When the Old Faithful CSV is not found (the message says how to install it).
        ImportError: When scikit-learn is missing for ``"wine"``/``"breast_cancer"``.
    """
    if name not in TABULAR_NAMES:
        raise ValueError(f"Unknown table {name!r}; choose one of {TABULAR_NAMES}.")
    _check_float_dtype(dtype)
    x, y, meta = _load_table(name, path)
    val_idx, test_idx, train_idx = random_indices(len(x), (val_fraction, test_fraction), seed)
    meta.update(name=name, seed=seed, dim=x.shape[1], standardized=standardize)
    if name == "old_faithful":
        meta["integer_valued"] = ("waiting",)
    if standardize:
        mean, std = fit_standardizer(x[train_idx])
        x = (x - mean) / std
        meta.update(mean=mean, std=std)
    x = x.to(dtype)
    return TabularSplit(x_train=x[train_idx], y_train=y[train_idx], x_test=x[test_idx], y_test=y[test_idx],
                        meta=meta, x_val=x[val_idx], y_val=y[val_idx])


__all__ = [
    "TABULAR_NAMES",
    "DatasetNotFoundError",
    "Split",
    "TabularName",
    "TabularSplit",
    "faithful_csv_path",
    "fit_standardizer",
    "load_tabular",
    "random_indices",
    "read_faithful_csv",
    "require",
    "stratified_indices",
]
