"""Multivariate time-series classification: real UEA archive data shipped inside sktime.

``JapaneseVowels`` (270 + 370 utterances, 12 LPC cepstrum channels, lengths 7–29,
9 speakers) and ``BasicMotions`` (40 + 40 recordings, 6 accelerometer/gyroscope channels,
length 100, 4 activities) are bundled in the sktime wheel and read from its package
data, with no network access. The archive's own train/test split is used.
"""

import dataclasses
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from snopt.data._tabular import Split, _check_float_dtype, require

UEAName = Literal["JapaneseVowels", "BasicMotions"]
UEA_NAMES: tuple[UEAName, ...] = ("JapaneseVowels", "BasicMotions")
_SKTIME_LOADERS = {"JapaneseVowels": "load_japanese_vowels", "BasicMotions": "load_basic_motions"}


@dataclasses.dataclass(frozen=True, repr=False)
class SequenceSplit(Split):
    """A split of padded sequences.

    ``x_*`` have shape ``(N, T_max, C)``, zero-padded after each sequence's end
    (zero is the channel mean once standardised).

    Attributes:
        lengths_train: Valid length of each training sequence, int64 ``(N_train,)``.
        lengths_test: Valid length of each test sequence, int64 ``(N_test,)``.
    """

    lengths_train: Tensor
    lengths_test: Tensor

    def mask(self, part: Literal["train", "test"]) -> Tensor:
        """Boolean mask of valid time steps.

        Args:
            part: ``"train"`` or ``"test"``.

        Returns:
            ``(N, T_max)``, True where a step is part of the sequence.
        """
        x: Tensor = getattr(self, f"x_{part}")
        lengths: Tensor = getattr(self, f"lengths_{part}")
        return torch.arange(x.shape[1], device=lengths.device)[None, :] < lengths[:, None]


def _nested_to_list(frame: Any) -> list[np.ndarray]:
    """Turn sktime's nested DataFrame (one pd.Series per cell) to a list of ``(T_i, C)`` arrays."""
    rows = []
    for i in range(len(frame)):
        cells = [np.asarray(frame.iloc[i, c], dtype=np.float64) for c in range(frame.shape[1])]
        if len({len(cell) for cell in cells}) != 1:
            raise ValueError(f"Series {i} has channels of different lengths: {[len(cell) for cell in cells]}.")
        rows.append(np.stack(cells, axis=1))
    return rows


def _pad(rows: list[np.ndarray], t_max: int) -> tuple[Tensor, Tensor]:
    x = torch.zeros(len(rows), t_max, rows[0].shape[1], dtype=torch.float64)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.from_numpy(r)
    return x, torch.tensor([len(r) for r in rows], dtype=torch.int64)


def load_uea(name: UEAName, *, dtype: torch.dtype = torch.float32, standardize: bool = True) -> SequenceSplit:
    """Load a UEA multivariate series data set shipped in sktime, padded to ``(N, T_max, C)``.

    Args:
        name: ``"JapaneseVowels"`` or ``"BasicMotions"``.
        dtype: Floating dtype of the series.
        standardize: Standardise each channel with the mean and std of the valid training steps
            (``meta["mean"]``, ``meta["std"]``, shape ``(C,)``, float64); padding stays zero.

    Returns:
        A `SequenceSplit` with int64 labels (indices into ``meta["classes"]``) and lengths.

    Raises:
        ImportError: When sktime is not installed (``pip install sktime``).
    """
    if name not in _SKTIME_LOADERS:
        raise ValueError(f"Unknown UEA data set {name!r}; choose one of {UEA_NAMES}.")
    _check_float_dtype(dtype)
    datasets = require("sktime.datasets", "sktime")
    loader = getattr(datasets, _SKTIME_LOADERS[name])
    raw = {part: loader(split=part) for part in ("train", "test")}  # nested DataFrame, labels as strings
    rows = {part: _nested_to_list(x) for part, (x, _) in raw.items()}
    labels = {part: [str(v) for v in y] for part, (_, y) in raw.items()}
    classes = tuple(sorted(set(labels["train"]) | set(labels["test"])))
    index = {c: i for i, c in enumerate(classes)}
    t_max = max(len(r) for part in rows.values() for r in part)
    (x_train, len_train), (x_test, len_test) = _pad(rows["train"], t_max), _pad(rows["test"], t_max)
    channels = x_train.shape[2]
    meta: dict[str, object] = {"name": name, "source": f"sktime.datasets.{_SKTIME_LOADERS[name]}",
                               "num_classes": len(classes), "classes": classes, "channels": channels,
                               "max_length": t_max, "min_length": int(min(len_train.min(), len_test.min())),
                               "standardized": standardize}
    if standardize:
        valid = torch.cat([torch.from_numpy(r) for r in rows["train"]])  # (Σ T_i, C)
        mean, std = valid.mean(0), valid.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        for x, lengths in ((x_train, len_train), (x_test, len_test)):
            mask = (torch.arange(t_max)[None, :] < lengths[:, None])[..., None]
            x.copy_(torch.where(mask, (x - mean) / std, torch.zeros(())))
        meta.update(mean=mean, std=std)

    def encode(part: str) -> Tensor:
        return torch.tensor([index[v] for v in labels[part]], dtype=torch.int64)

    return SequenceSplit(x_train=x_train.to(dtype), y_train=encode("train"), x_test=x_test.to(dtype),
                         y_test=encode("test"), meta=meta, lengths_train=len_train, lengths_test=len_test)


__all__ = ["UEA_NAMES", "SequenceSplit", "UEAName", "load_uea"]
