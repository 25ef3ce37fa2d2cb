"""Image classification data, read from local files only.

* `load_digits`: scikit-learn's bundled 8×8 digits (1,797 real images), the fast default.
* `load_fashion_mnist` / `load_mnist`: the IDX files (``train-images-idx3-ubyte.gz`` ...),
  read by a small parser of our own (`read_idx`). Fashion-MNIST on Debian-based
  machines: ``apt-get install dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist/`` (MIT licence); elsewhere torchvision's
  ``<root>/FashionMNIST/raw`` (or ``<root>/MNIST/raw``) folders are read, without
  torchvision.
* `load_cifar10` / `load_svhn`: the files torchvision downloads
  (``cifar-10-batches-py/``; ``train_32x32.mat``, ``test_32x32.mat``), when the user has them.

Images come as ``(N, C, H, W)`` floats in [0, 1] (optionally standardised with the
scalar mean and std of the training pixels), labels as int64.
"""

import gzip
import os
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from snopt.data._tabular import DatasetNotFoundError, Split, _check_float_dtype, require, stratified_indices

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_IDX_DTYPES: dict[int, np.dtype[Any]] = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
                                          0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then each
    dimension as a big-endian uint32; the data follow in C order, big-endian.

    Args:
        path: File path; a name ending in ``.gz`` is decompressed.

    Returns:
        The array, in native byte order.

    Raises:
        ValueError: For a malformed header or a data size that does not match it.
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header.")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()}).")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: {len(raw) - header} data bytes, expected {expected} for shape {shape}.")
    data: np.ndarray = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _default_roots() -> list[Path]:
    roots = [Path(os.environ["SNOPT_DATA_DIR"])] if os.environ.get("SNOPT_DATA_DIR") else []
    return roots + [Path("data"), Path.home() / "data", Path.home() / ".torch" / "datasets",
                    Path.home() / ".cache" / "torchvision"]


def find_idx_folder(candidates: Sequence[Path]) -> Path | None:
    """The first folder holding all four IDX files (``.gz`` or not), or None.

    Args:
        candidates: Folders to try, in order.

    Returns:
        The folder, or None.
    """
    for folder in candidates:
        if all(_idx_file(folder, stem) is not None for stem in IDX_FILES.values()):
            return folder
    return None


def _fashion_candidates(root: str | Path | None) -> list[Path]:
    if root is not None:
        r = Path(root).expanduser()
        return [r, r / "FashionMNIST" / "raw", r / "fashion-mnist"]
    return [FASHION_MNIST_DIR] + [r / "FashionMNIST" / "raw" for r in _default_roots()]


def _mnist_candidates(root: str | Path | None) -> list[Path]:
    if root is not None:
        r = Path(root).expanduser()
        return [r, r / "MNIST" / "raw", r / "mnist"]
    return [r / "MNIST" / "raw" for r in _default_roots()]


def _finish(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, meta: dict[str, object],
            *, subset: int | None, test_subset: int | None, seed: int, dtype: torch.dtype, flatten: bool,
            standardize: bool) -> Split:
    """Subsample, scale uint8 pixels to [0, 1], optionally standardise and flatten."""
    g = torch.Generator().manual_seed(seed)
    for name, k, n in (("subset", subset, len(x_train)), ("test_subset", test_subset, len(x_test))):
        if k is not None and not 0 < k <= n:
            raise ValueError(f"`{name}` must lie in [1, {n}]; got {k}.")
    if subset is not None:
        idx = torch.randperm(len(x_train), generator=g)[:subset]
        x_train, y_train = x_train[idx], y_train[idx]
    if test_subset is not None:
        idx = torch.randperm(len(x_test), generator=g)[:test_subset]
        x_test, y_test = x_test[idx], y_test[idx]
    xtr, xte = x_train.to(dtype) / 255, x_test.to(dtype) / 255
    meta.update(seed=seed, standardized=standardize, image_shape=tuple(xtr.shape[1:]))
    if standardize:
        mean = float(xtr.to(torch.float64).mean())
        std = float(xtr.to(torch.float64).std(unbiased=False)) or 1.0
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        meta.update(mean=mean, std=std)
    if flatten:
        xtr, xte = xtr.flatten(1), xte.flatten(1)
    return Split(x_train=xtr, y_train=y_train.to(torch.int64), x_test=xte, y_test=y_test.to(torch.int64), meta=meta)


def _load_idx_dataset(folder: Path, name: str, classes: Sequence[str], *, subset: int | None,
                      test_subset: int | None, seed: int, dtype: torch.dtype, flatten: bool,
                      standardize: bool) -> Split:
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = _idx_file(folder, stem)
        assert path is not None
        arrays[key] = torch.from_numpy(read_idx(path).copy())
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: {part} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                             "do not match.")
    meta: dict[str, object] = {"name": name, "source": str(folder), "num_classes": len(classes),
                               "classes": tuple(classes)}
    return _finish(arrays["train_images"][:, None], arrays["train_labels"], arrays["test_images"][:, None],
                   arrays["test_labels"], meta, subset=subset, test_subset=test_subset, seed=seed, dtype=dtype,
                   flatten=flatten, standardize=standardize)


def load_fashion_mnist(root: str | Path | None = None, *, subset: int | None = None, test_subset: int | None = None,
                       seed: int = 0, dtype: torch.dtype = torch.float32, flatten: bool = False,
                       standardize: bool = False) -> Split:
    """Fashion-MNIST (60,000 + 10,000 28×28 greyscale images, 10 classes) from local IDX files.

    Looks in `root` (or ``root/FashionMNIST/raw``); without `root`, in
    ``/usr/share/datasets/fashion-mnist/`` (Debian's ``dataset-fashion-mnist``), then
    in ``FashionMNIST/raw`` under ``$SNOPT_DATA_DIR``, ``./data``, ``~/data``,
    ``~/.torch/datasets`` and ``~/.cache/torchvision``. The official test set is the test part.

    Args:
        root: Folder with the four IDX files, or a torchvision root.
        subset: Keep this many random training images (seeded).
        test_subset: Keep this many random test images (seeded).
        seed: Seed of the subsets.
        dtype: Floating dtype of the images.
        flatten: Return ``(N, 784)`` instead of ``(N, 1, 28, 28)``.
        standardize: Standardise with the training pixels' scalar mean and std.

    Returns:
        A `Split`; images in [0, 1] unless standardised.

    Raises:
        DatasetNotFoundError: When no folder holds the files; the message says how to install them.
    """
    _check_float_dtype(dtype)
    candidates = _fashion_candidates(root)
    folder = find_idx_folder(candidates)
    if folder is None:
        tried = ", ".join(str(c) for c in candidates)
        raise DatasetNotFoundError(
            f"Fashion-MNIST IDX files not found (tried {tried}). On Debian/Ubuntu: `apt-get install "
            f"dataset-fashion-mnist` (installs them in {FASHION_MNIST_DIR}/). Elsewhere put "
            f"{', '.join(s + '.gz' for s in IDX_FILES.values())} in one folder and pass it as `root=`, or pass the "
            "root of a torchvision download (the folder holding FashionMNIST/raw/).")
    return _load_idx_dataset(folder, "fashion_mnist", FASHION_MNIST_CLASSES, subset=subset, test_subset=test_subset,
                             seed=seed, dtype=dtype, flatten=flatten, standardize=standardize)


def load_mnist(root: str | Path | None = None, *, subset: int | None = None, test_subset: int | None = None,
               seed: int = 0, dtype: torch.dtype = torch.float32, flatten: bool = False,
               standardize: bool = False) -> Split:
    """MNIST (60,000 + 10,000 28×28 digits) from local IDX files, when the user has them.

    Looks in `root` (or ``root/MNIST/raw``); without `root`, in ``MNIST/raw`` under
    ``$SNOPT_DATA_DIR``, ``./data``, ``~/data``, ``~/.torch/datasets`` and ``~/.cache/torchvision``.

    Args:
        root: Folder with the four IDX files, or a torchvision root.
        subset: Keep this many random training images (seeded).
        test_subset: Keep this many random test images (seeded).
        seed: Seed of the subsets.
        dtype: Floating dtype of the images.
        flatten: Return ``(N, 784)`` instead of ``(N, 1, 28, 28)``.
        standardize: Standardise with the training pixels' scalar mean and std.

    Returns:
        A `Split`.

    Raises:
        DatasetNotFoundError: When no folder holds the files.
    """
    _check_float_dtype(dtype)
    candidates = _mnist_candidates(root)
    folder = find_idx_folder(candidates)
    if folder is None:
        tried = ", ".join(str(c) for c in candidates)
        raise DatasetNotFoundError(
            f"MNIST IDX files not found (tried {tried}). Put {', '.join(s + '.gz' for s in IDX_FILES.values())} "
            "in one folder and pass it as `root=`, or pass the root of a torchvision download (holding MNIST/raw/). "
            "For data that install offline use `load_digits` or `load_fashion_mnist`.")
    return _load_idx_dataset(folder, "mnist", tuple(str(i) for i in range(10)), subset=subset,
                             test_subset=test_subset, seed=seed, dtype=dtype, flatten=flatten,
                             standardize=standardize)


def load_cifar10(root: str | Path | None = None, *, subset: int | None = None, test_subset: int | None = None,
                 seed: int = 0, dtype: torch.dtype = torch.float32, flatten: bool = False,
                 standardize: bool = False) -> Split:
    """CIFAR-10 (50,000 + 10,000 32×32 colour images) from torchvision's ``cifar-10-batches-py`` files.

    The batches are Python pickles: read only files you trust.

    Args:
        root: Folder holding ``cifar-10-batches-py/`` (or that folder itself); None: the first of
            ``$SNOPT_DATA_DIR``, ``./data``, ``~/data``, ``~/.torch/datasets`` and
            ``~/.cache/torchvision`` that holds it.
        subset: Keep this many random training images (seeded).
        test_subset: Keep this many random test images (seeded).
        seed: Seed of the subsets.
        dtype: Floating dtype of the images.
        flatten: Return ``(N, 3072)`` instead of ``(N, 3, 32, 32)``.
        standardize: Standardise with the training pixels' scalar mean and std.

    Returns:
        A `Split`.

    Raises:
        DatasetNotFoundError: When the batch files are not there.
    """
    _check_float_dtype(dtype)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    roots = [Path(root).expanduser()] if root is not None else _default_roots()
    candidates = [f for r in roots for f in (r / "cifar-10-batches-py", r)]
    folder = next((f for f in candidates if all((f / n).is_file() for n in [*names, "test_batch"])), None)
    if folder is None:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found under {', '.join(map(str, roots))}: expected cifar-10-batches-py/ with "
            "data_batch_1..5 and test_batch (the python version that torchvision.datasets.CIFAR10 downloads; "
            "pass its folder, or set SNOPT_DATA_DIR to the folder above it). No offline package ships it.")

    def batch(name: str) -> tuple[Tensor, Tensor]:
        with open(folder / name, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")  # the standard CIFAR format (trusted files only)
        x = torch.from_numpy(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
        return x, torch.as_tensor(d[b"labels"], dtype=torch.int64)

    train = [batch(n) for n in names]
    x_test, y_test = batch("test_batch")
    meta: dict[str, object] = {"name": "cifar10", "source": str(folder), "num_classes": 10,
                               "classes": CIFAR10_CLASSES}
    return _finish(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test, meta,
                   subset=subset, test_subset=test_subset, seed=seed, dtype=dtype, flatten=flatten,
                   standardize=standardize)


def load_svhn(root: str | Path | None = None, *, subset: int | None = None, test_subset: int | None = None,
              seed: int = 0, dtype: torch.dtype = torch.float32, flatten: bool = False,
              standardize: bool = False) -> Split:
    """SVHN (73,257 + 26,032 32×32 colour digits) from torchvision's ``train_32x32.mat``/``test_32x32.mat``.

    Reading the MATLAB files needs scipy. Label 10 (digit 0) becomes 0, as in torchvision.

    Args:
        root: Folder holding the two ``.mat`` files; None: the first of ``$SNOPT_DATA_DIR``,
            ``./data``, ``~/data``, ``~/.torch/datasets`` and ``~/.cache/torchvision`` (or its
            ``svhn/`` subfolder) that holds them.
        subset: Keep this many random training images (seeded).
        test_subset: Keep this many random test images (seeded).
        seed: Seed of the subsets.
        dtype: Floating dtype of the images.
        flatten: Return ``(N, 3072)`` instead of ``(N, 3, 32, 32)``.
        standardize: Standardise with the training pixels' scalar mean and std.

    Returns:
        A `Split`.

    Raises:
        DatasetNotFoundError: When the files are not there.
    """
    _check_float_dtype(dtype)
    roots = [Path(root).expanduser()] if root is not None else _default_roots()
    stems = ("train_32x32.mat", "test_32x32.mat")
    r = next((f for q in roots for f in (q, q / "svhn") if all((f / s).is_file() for s in stems)), None)
    if r is None:
        raise DatasetNotFoundError(
            f"SVHN not found under {', '.join(map(str, roots))}: expected train_32x32.mat and test_32x32.mat (as "
            "torchvision.datasets.SVHN downloads them; pass their folder, or set SNOPT_DATA_DIR to it). No "
            "offline package ships it.")
    files = [r / s for s in stems]
    sio = require("scipy.io", "scipy")

    def part(path: Path) -> tuple[Tensor, Tensor]:
        m = sio.loadmat(str(path))
        x = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(m["X"], dtype=np.uint8), (3, 2, 0, 1))))
        y = torch.as_tensor(np.asarray(m["y"]).reshape(-1).astype(np.int64)) % 10
        return x, y

    (x_train, y_train), (x_test, y_test) = part(files[0]), part(files[1])
    meta: dict[str, object] = {"name": "svhn", "source": str(r), "num_classes": 10,
                               "classes": tuple(str(i) for i in range(10))}
    return _finish(x_train, y_train, x_test, y_test, meta, subset=subset, test_subset=test_subset, seed=seed,
                   dtype=dtype, flatten=flatten, standardize=standardize)


def load_digits(*, test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32,
                flatten: bool = False, standardize: bool = False) -> Split:
    """scikit-learn's bundled digits: 1,797 real 8×8 images of 10 classes, stratified split.

    Args:
        test_fraction: Fraction of each class held out for test.
        seed: Seed of the split.
        dtype: Floating dtype of the images.
        flatten: Return ``(N, 64)`` instead of ``(N, 1, 8, 8)``.
        standardize: Standardise with the training pixels' scalar mean and std.

    Returns:
        A `Split`; pixels (0..16) scaled to [0, 1] unless standardised.

    Raises:
        ImportError: When scikit-learn is not installed.
    """
    _check_float_dtype(dtype)
    datasets = require("sklearn.datasets", "scikit-learn")
    bunch = datasets.load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float64)[:, None] / 16
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    train, test = stratified_indices(y, test_fraction, seed)
    meta: dict[str, object] = {"name": "digits", "source": "sklearn.datasets.load_digits", "num_classes": 10,
                               "classes": tuple(str(i) for i in range(10)), "seed": seed,
                               "standardized": standardize, "image_shape": (1, 8, 8)}
    xtr, xte = x[train], x[test]
    if standardize:
        mean, std = float(xtr.mean()), float(xtr.std(unbiased=False))
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        meta.update(mean=mean, std=std)
    if flatten:
        xtr, xte = xtr.flatten(1), xte.flatten(1)
    return Split(x_train=xtr.to(dtype), y_train=y[train], x_test=xte.to(dtype), y_test=y[test], meta=meta)


__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IDX_FILES",
    "find_idx_folder",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_svhn",
    "read_idx",
]
