"""Offline data: loaders of real data shipped in packages or local files, and generated toys.

Nothing here touches the network. Every loader returns a frozen `Split` of tensors
(or a `TabularSplit`/`SequenceSplit`), split deterministically from a seed, with
standardisation fitted on the training part only. A loader whose files are missing
raises `DatasetNotFoundError` (a `FileNotFoundError`) saying how to install them; one
whose package is missing raises `ImportError` naming the ``pip install``.

| loader | data | needs |
|---|---|---|
| `load_digits` | 1,797 real 8×8 digits, 10 classes | scikit-learn |
| `load_fashion_mnist` | 60k + 10k 28×28, 10 classes | Debian ``dataset-fashion-mnist`` or torchvision's files |
| `load_mnist`, `load_cifar10`, `load_svhn` | the user's local torchvision files | (scipy for SVHN) |
| `load_uea` | JapaneseVowels, BasicMotions (UEA) | sktime |
| `load_tabular` | wine (13-D), breast_cancer (30-D), old_faithful (2-D) | scikit-learn; plotnine for old_faithful |
| `sample_toy`, `load_toy` | 2-D toys: moons, 8gaussians, circles, pinwheel, checkerboard | — |
"""

from snopt.data._images import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    find_idx_folder,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_svhn,
    read_idx,
)
from snopt.data._tabular import (
    TABULAR_NAMES,
    DatasetNotFoundError,
    Split,
    TabularName,
    TabularSplit,
    faithful_csv_path,
    fit_standardizer,
    load_tabular,
    random_indices,
    read_faithful_csv,
    stratified_indices,
)
from snopt.data._timeseries import UEA_NAMES, SequenceSplit, UEAName, load_uea
from snopt.data._toys import TOY_NAMES, ToyName, load_toy, sample_toy, sample_toy_labeled

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "TABULAR_NAMES",
    "TOY_NAMES",
    "UEA_NAMES",
    "DatasetNotFoundError",
    "SequenceSplit",
    "Split",
    "TabularName",
    "TabularSplit",
    "ToyName",
    "UEAName",
    "faithful_csv_path",
    "find_idx_folder",
    "fit_standardizer",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_svhn",
    "load_tabular",
    "load_toy",
    "load_uea",
    "random_indices",
    "read_faithful_csv",
    "read_idx",
    "sample_toy",
    "sample_toy_labeled",
    "stratified_indices",
]
