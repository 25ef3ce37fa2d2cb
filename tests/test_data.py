"""Offline loaders: shapes, deterministic seeded splits, train-only standardisation, the IDX/CIFAR/SVHN readers
on files made in tmp_path, and clear errors when data are missing. Every test blocks the network."""

import dataclasses
import gzip
import pickle
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import snopt.data as D
from snopt.data._tabular import require


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a data loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def _sktime() -> None:
    pytest.importorskip("sktime", reason="sktime not installed (`pip install sktime`): UEA loaders untested")


# --- splits -----------------------------------------------------------------------------------------------------


def test_split_is_frozen_and_read_only() -> None:
    pytest.importorskip("sklearn")
    s = D.load_tabular("wine")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.x_train = s.x_test  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.meta["name"] = "other"  # type: ignore[index]
    assert "wine" in repr(s) and "(124, 13)" in repr(s)
    moved = s.to("cpu")
    assert type(moved) is D.TabularSplit and torch.equal(moved.x_val, s.x_val)
    with pytest.raises(ValueError, match="rows"):
        D.Split(torch.zeros(3, 2), torch.zeros(2), torch.zeros(1, 2), torch.zeros(1), {})


def test_stratified_indices_partition_and_proportions() -> None:
    y = torch.arange(10).repeat_interleave(torch.arange(10, 110, 10))  # class c has 10(c+1) rows
    tr, te = D.stratified_indices(y, 0.2, seed=3)
    assert sorted(torch.cat([tr, te]).tolist()) == list(range(len(y)))
    assert torch.bincount(y[te], minlength=10).tolist() == [2 * (c + 1) for c in range(10)]
    tr2, te2 = D.stratified_indices(y, 0.2, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert not torch.equal(te, D.stratified_indices(y, 0.2, seed=4)[1])
    with pytest.raises(ValueError):
        D.stratified_indices(y, 1.0, seed=0)
    parts = D.random_indices(100, (0.1, 0.25), seed=0)
    assert [len(p) for p in parts] == [10, 25, 65]
    assert sorted(torch.cat(parts).tolist()) == list(range(100))
    with pytest.raises(ValueError):
        D.random_indices(10, (0.5, 0.5), seed=0)


# --- images -----------------------------------------------------------------------------------------------------


def test_load_digits() -> None:
    pytest.importorskip("sklearn")
    s = D.load_digits()
    assert s.x_train.shape == (1438, 1, 8, 8) and s.x_test.shape == (359, 1, 8, 8)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert float(s.x_train.min()) == 0.0 and float(s.x_train.max()) == 1.0
    assert s.num_classes == 10
    counts = torch.bincount(s.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: ~20% of each class (174..183 rows)
    again = D.load_digits()
    assert torch.equal(again.x_train, s.x_train) and torch.equal(again.y_test, s.y_test)
    assert not torch.equal(D.load_digits(seed=1).y_test, s.y_test)
    z = D.load_digits(standardize=True, flatten=True, dtype=torch.float64)
    assert z.x_train.shape == (1438, 64) and z.x_train.dtype == torch.float64
    assert abs(float(z.x_train.mean())) < 1e-10 and abs(float(z.x_train.std(unbiased=False)) - 1) < 1e-10
    assert abs(float(z.x_test.mean())) > 1e-6  # test statistics are not refitted
    with pytest.raises(TypeError):
        D.load_digits(dtype=torch.int64)


def _write_idx(path: Path, array: np.ndarray, code: int, compress: bool) -> None:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    big = array.astype(array.dtype.newbyteorder(">"))
    data = header + big.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize(("dtype", "code"), [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
                                             (np.float32, 0x0D), (np.float64, 0x0E)])
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, dtype: type, code: int, compress: bool) -> None:
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    _write_idx(path, array, code, compress)
    out = D.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_malformed(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="not an IDX"):
        D.read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">HBB", 0, 8, 2) + struct.pack(">2I", 3, 3) + b"\x00" * 8)
    with pytest.raises(ValueError, match="expected 9"):
        D.read_idx(short)


def _fake_idx_folder(folder: Path, n_train: int = 30, n_test: int = 12, side: int = 28) -> tuple[np.ndarray, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = (rng.integers(0, 256, (n_train, side, side), dtype=np.uint8), np.arange(n_train, dtype=np.uint8) % 10,
              rng.integers(0, 256, (n_test, side, side), dtype=np.uint8), np.arange(n_test, dtype=np.uint8) % 10)
    for stem, array in zip(("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                            "t10k-labels-idx1-ubyte"), arrays):
        _write_idx(folder / f"{stem}.gz", array, 0x08, compress=True)
    return arrays


def test_load_fashion_mnist_from_generated_idx(tmp_path: Path) -> None:
    xtr, ytr, xte, yte = _fake_idx_folder(tmp_path / "fm")
    s = D.load_fashion_mnist(tmp_path / "fm")
    assert s.x_train.shape == (30, 1, 28, 28) and s.x_test.shape == (12, 1, 28, 28)
    torch.testing.assert_close(s.x_train[:, 0], torch.from_numpy(xtr).float() / 255)
    assert s.y_train.tolist() == ytr.tolist() and s.y_test.tolist() == yte.tolist()
    assert s.meta["classes"][9] == "Ankle boot"
    sub = D.load_fashion_mnist(tmp_path / "fm", subset=10, test_subset=5, flatten=True, seed=2)
    assert sub.x_train.shape == (10, 784) and sub.x_test.shape == (5, 784)
    assert torch.equal(sub.x_train, D.load_fashion_mnist(tmp_path / "fm", subset=10, flatten=True, seed=2).x_train)
    with pytest.raises(ValueError):
        D.load_fashion_mnist(tmp_path / "fm", subset=31)
    # torchvision's layout: <root>/FashionMNIST/raw, uncompressed files accepted too.
    _fake_idx_folder(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert D.load_fashion_mnist(tmp_path / "tv").x_train.shape == (30, 1, 28, 28)
    _fake_idx_folder(tmp_path / "tvm" / "MNIST" / "raw", side=28)
    assert D.load_mnist(tmp_path / "tvm").meta["name"] == "mnist"


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_fashion_mnist(tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "FashionMNIST/raw" in str(info.value)
    with pytest.raises(D.DatasetNotFoundError, match="MNIST/raw"):
        D.load_mnist(tmp_path)
    with pytest.raises(D.DatasetNotFoundError, match="cifar-10-batches-py"):
        D.load_cifar10(tmp_path)
    with pytest.raises(D.DatasetNotFoundError, match="train_32x32.mat"):
        D.load_svhn(tmp_path)


@pytest.mark.skipif(not (D.FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (`apt-get install dataset-fashion-mnist`)")
def test_real_fashion_mnist() -> None:
    s = D.load_fashion_mnist(subset=2000, test_subset=500)
    assert s.x_train.shape == (2000, 1, 28, 28) and s.x_test.shape == (500, 1, 28, 28)
    assert float(s.x_train.min()) >= 0.0 and float(s.x_train.max()) <= 1.0
    assert s.meta["source"] == str(D.FASHION_MNIST_DIR)
    labels = D.read_idx(D.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    assert D.read_idx(D.FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[:5].tolist() == [9, 0, 0, 3, 0]


def test_load_cifar10_from_generated_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 3, 9, 1]}
        (folder / name).write_bytes(pickle.dumps(batch))
    s = D.load_cifar10(tmp_path)
    assert s.x_train.shape == (20, 3, 32, 32) and s.x_test.shape == (4, 3, 32, 32)
    assert s.y_test.tolist() == [0, 3, 9, 1] and s.meta["classes"][9] == "truck"
    last = pickle.loads((folder / "test_batch").read_bytes())[b"data"]
    torch.testing.assert_close(s.x_test[1, 2, 0, :4], torch.from_numpy(last[1, 2048:2052]).float() / 255)


def test_cifar10_and_svhn_are_found_where_torchvision_keeps_them(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a root, the loaders search $SNOPT_DATA_DIR, ./data, ~/data, ... and say where they looked."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SNOPT_DATA_DIR", str(tmp_path / "store"))
    with pytest.raises(D.DatasetNotFoundError, match="store.*SNOPT_DATA_DIR"):
        D.load_cifar10()
    with pytest.raises(D.DatasetNotFoundError, match="store.*SNOPT_DATA_DIR"):
        D.load_svhn()
    folder = tmp_path / "store" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [7, 2]}
        (folder / name).write_bytes(pickle.dumps(batch))
    s = D.load_cifar10()
    assert s.meta["source"] == str(folder) and s.x_train.shape == (10, 3, 32, 32)
    (folder / "data_batch_3").unlink()  # an incomplete copy is not taken for the data set
    with pytest.raises(D.DatasetNotFoundError, match="data_batch_1..5"):
        D.load_cifar10()
    sio = pytest.importorskip("scipy.io", reason="scipy not installed")
    svhn = tmp_path / "data" / "svhn"  # ./data/svhn, the second place searched
    svhn.mkdir(parents=True)
    for name, n in (("train_32x32.mat", 4), ("test_32x32.mat", 2)):
        sio.savemat(svhn / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                  "y": np.array([[1], [2], [3], [10]][:n], dtype=np.uint8)})
    s = D.load_svhn()
    assert s.meta["source"] == str(Path("data") / "svhn") and s.y_train.tolist() == [1, 2, 3, 0]


def test_load_svhn_from_generated_mat(tmp_path: Path) -> None:
    sio = pytest.importorskip("scipy.io", reason="scipy not installed")
    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", 6), ("test_32x32.mat", 3)):
        sio.savemat(tmp_path / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                      "y": np.array([[10], [1], [2], [3], [4], [5]][:n], dtype=np.uint8)})
    s = D.load_svhn(tmp_path)
    assert s.x_train.shape == (6, 3, 32, 32) and s.y_train.tolist() == [0, 1, 2, 3, 4, 5]
    raw = sio.loadmat(tmp_path / "test_32x32.mat")["X"]
    torch.testing.assert_close(s.x_test[2, 1], torch.from_numpy(raw[:, :, 1, 2].astype(np.float32)) / 255)


# --- time series ------------------------------------------------------------------------------------------------


def test_load_uea_japanese_vowels() -> None:
    pytest.importorskip("sktime")
    _sktime()
    s = D.load_uea("JapaneseVowels")
    assert s.x_train.shape == (270, 29, 12) and s.x_test.shape == (370, 29, 12)
    assert s.num_classes == 9 and s.meta["classes"] == tuple("123456789")
    assert int(torch.cat([s.lengths_train, s.lengths_test]).min()) == 7
    assert int(torch.cat([s.lengths_train, s.lengths_test]).max()) == 29
    assert sorted(set(s.y_train.tolist())) == list(range(9))
    mask = s.mask("train")
    valid = s.x_train[mask].double()  # (Σ T_i, C)
    torch.testing.assert_close(valid.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(valid.std(0, unbiased=False), torch.ones(12, dtype=torch.float64), atol=1e-6, rtol=0)
    assert bool((s.x_train[~mask] == 0).all()) and bool((s.x_test[~s.mask("test")] == 0).all())
    raw = D.load_uea("JapaneseVowels", standardize=False, dtype=torch.float64)
    mean, std = s.meta["mean"], s.meta["std"]
    torch.testing.assert_close(s.x_test[0, :5].double(), ((raw.x_test[0, :5] - mean) / std), atol=1e-5, rtol=0)


def test_load_uea_basic_motions() -> None:
    pytest.importorskip("sktime")
    _sktime()
    s = D.load_uea("BasicMotions", dtype=torch.float64)
    assert s.x_train.shape == (40, 100, 6) and s.x_test.shape == (40, 100, 6)
    assert s.meta["classes"] == ("badminton", "running", "standing", "walking")
    assert torch.bincount(s.y_train).tolist() == [10, 10, 10, 10]
    assert bool((s.lengths_train == 100).all()) and bool(s.mask("test").all())
    torch.testing.assert_close(s.x_train.mean((0, 1)), torch.zeros(6, dtype=torch.float64), atol=1e-10, rtol=0)


def test_missing_package_names_the_install() -> None:
    pytest.importorskip("sktime")
    with pytest.raises(ImportError, match="pip install not-a-package"):
        require("snopt_no_such_module_xyz", "not-a-package")
    with pytest.raises(ValueError):
        D.load_uea("CharacterTrajectories")  # type: ignore[arg-type]


# --- tabular ----------------------------------------------------------------------------------------------------


def test_load_tabular_wine_and_breast_cancer() -> None:
    pytest.importorskip("sklearn")
    s = D.load_tabular("wine")
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (124, 18, 36) and s.x_train.shape[1] == 13
    assert s.meta["dim"] == 13 and s.num_classes == 3
    torch.testing.assert_close(s.x_train.double().mean(0), torch.zeros(13, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.x_train.double().std(0, unbiased=False), torch.ones(13, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    raw = D.load_tabular("wine", standardize=False, dtype=torch.float64)
    torch.testing.assert_close(raw.x_train.mean(0, keepdim=True), s.meta["mean"])
    assert torch.equal(D.load_tabular("wine").x_test, s.x_test)
    assert not torch.equal(D.load_tabular("wine", seed=1).x_test, s.x_test)
    b = D.load_tabular("breast_cancer")
    assert b.x_train.shape[1] == 30 and len(b.x_train) + len(b.x_val) + len(b.x_test) == 569
    with pytest.raises(ValueError):
        D.load_tabular("wine", path="x.csv")


def test_load_tabular_old_faithful_from_path(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("plotnine")
    csv = tmp_path / "faithful.csv"
    rows = [(1.8 + 0.01 * i, 50 + i % 40) for i in range(50)]
    csv.write_text('"eruptions","waiting"\n' + "".join(f"{a:.3f},{w}\n" for a, w in rows))
    s = D.load_tabular("old_faithful", path=csv, standardize=False, dtype=torch.float64)
    assert len(s.x_train) + len(s.x_val) + len(s.x_test) == 50 and s.x_train.shape[1] == 2
    allx = torch.cat([s.x_train, s.x_val, s.x_test])
    assert sorted(allx[:, 1].tolist()) == sorted(float(w) for _, w in rows)
    with pytest.raises(D.DatasetNotFoundError, match="pip install plotnine"):
        D.load_tabular("old_faithful", path=tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="Old Faithful"):
        D.load_tabular("old_faithful", path=bad)


@pytest.mark.skipif(D.faithful_csv_path() is None, reason="plotnine (which ships faithful.csv) is not installed")
def test_load_tabular_old_faithful_shipped() -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("plotnine")
    s = D.load_tabular("old_faithful")
    assert len(s.x_train) + len(s.x_val) + len(s.x_test) == 272 and s.x_train.shape[1] == 2
    raw = D.read_faithful_csv(D.faithful_csv_path())  # type: ignore[arg-type]
    assert raw[0].tolist() == [3.6, 79.0]


# --- toys -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", D.TOY_NAMES)
def test_toys(name: D.ToyName) -> None:
    x, y = D.sample_toy_labeled(name, 4000, seed=0)
    assert x.shape == (4000, 2) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert bool((x.abs() < 8).all())
    assert torch.equal(x, D.sample_toy(name, 4000, seed=0))
    assert not torch.equal(x, D.sample_toy(name, 4000, seed=1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(D.sample_toy(name, 4000, generator=g), x)
    assert not torch.equal(D.sample_toy(name, 4000, generator=g), x)  # the generator advanced
    split = D.load_toy(name, 100, 20, 50, seed=0)
    assert (len(split.x_train), len(split.x_val), len(split.x_test)) == (100, 20, 50)
    assert sorted(set(y.tolist())) == list(range(split.num_classes))
    assert D.sample_toy(name, 0, seed=0).shape == (0, 2)
    assert D.sample_toy(name, 5, seed=0, dtype=torch.float64).dtype == torch.float64


def test_toy_geometry() -> None:
    x, y = D.sample_toy_labeled("checkerboard", 5000, seed=0)
    cell = torch.floor(x / 2).to(torch.int64)  # 4 × 4 board of side-2 squares over [-4, 4]²
    assert bool(((cell[:, 0] + cell[:, 1]) % 2 == 0).all())  # dark squares only
    x, y = D.sample_toy_labeled("8gaussians", 8000, seed=0)
    angle = y.double() * torch.pi / 4
    centers = 4 / 2**0.5 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    resid = x.double() - centers
    assert abs(float(resid.mean())) < 0.02 and abs(float(resid.std()) - 0.5 / 2**0.5) < 0.02
    x, y = D.sample_toy_labeled("circles", 8000, seed=0)
    radius = x.double().norm(dim=1)
    assert abs(float(radius[y == 0].mean()) - 3.0) < 0.05 and abs(float(radius[y == 1].mean()) - 1.5) < 0.05
    with pytest.raises(ValueError):
        D.sample_toy("spirals", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        D.sample_toy("moons", 10, seed=0, generator=torch.Generator())
