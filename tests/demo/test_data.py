"""Data loaders: digits, CIFAR-10 pickles written here in the real format, image folders."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from symmech.demo.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Dataset,
    get_dataset,
    load_cifar10,
    load_digits_tensors,
    load_image_folder,
    make_loader,
)

# --------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_labels_and_split() -> None:
    X_train, y_train, X_test, y_test = load_digits_tensors()
    assert X_train.shape == (1438, 1, 8, 8) and X_test.shape == (359, 1, 8, 8)
    assert y_train.shape == (1438,) and y_test.shape == (359,)
    assert X_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert set(y_train.tolist()) == set(range(10)) and set(y_test.tolist()) == set(range(10))


def test_digits_are_normalised_with_training_statistics() -> None:
    X_train, _, X_test, _ = load_digits_tensors(dtype=torch.float64)
    assert X_train.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert X_train.std().item() == pytest.approx(1.0, abs=1e-12)
    # Test images use the training mean/std, so they are close to, not exactly, standardised.
    assert abs(X_test.mean().item()) < 0.1 and abs(X_test.std().item() - 1.0) < 0.1
    from sklearn.datasets import load_digits

    raw = load_digits().images
    # Normalisation is affine with one scale: the smallest pixel (0 in raw data) maps to the min.
    assert X_train.min().item() == pytest.approx(((0 - raw.mean()) / raw.std()), rel=0.05)


def test_digits_split_is_deterministic_and_seeded() -> None:
    a, b = load_digits_tensors(), load_digits_tensors()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    c = load_digits_tensors(seed=1)
    assert not torch.equal(a[1], c[1])


def test_digits_split_is_disjoint_and_complete() -> None:
    X_train, _, X_test, _ = load_digits_tensors(dtype=torch.float64)
    from sklearn.datasets import load_digits

    assert len(X_train) + len(X_test) == len(load_digits().target)
    rows = {tuple(x.flatten().tolist()) for x in X_train}
    # The digits set has a few duplicate images, so compare counts, not every row.
    overlap = sum(tuple(x.flatten().tolist()) in rows for x in X_test)
    assert overlap < 5


@pytest.mark.parametrize("size", [16, 32])
def test_digits_upsampled(size: int) -> None:
    X_train, y_train, X_test, _ = load_digits_tensors(upsample_to=size)
    assert X_train.shape == (1438, 1, size, size) and X_test.shape == (359, 1, size, size)
    assert X_train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert X_train.std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(y_train, load_digits_tensors()[1])


def test_digits_dtype_and_bad_arguments() -> None:
    assert load_digits_tensors(dtype=torch.float64)[0].dtype == torch.float64
    with pytest.raises(ValueError, match="test_fraction must lie strictly between 0 and 1"):
        load_digits_tensors(test_fraction=1.0)
    with pytest.raises(ValueError, match="upsample_to must be a positive"):
        load_digits_tensors(upsample_to=0)


# --------------------------------------------------------------------------------------------
# CIFAR-10 (files written here in the official python-pickle format)


def _write_cifar_batch(path: Path, n: int, rng: np.random.Generator) -> dict[bytes, object]:
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": rng.integers(0, 10, size=n).tolist(),
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    return batch


@pytest.fixture()
def cifar_dir(tmp_path: Path) -> tuple[Path, list[dict[bytes, object]]]:
    """``tmp_path/cifar-10-batches-py`` with data_batch_1 (4 images), data_batch_2 (3), test (5)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [
        _write_cifar_batch(folder / "data_batch_1", 4, rng),
        _write_cifar_batch(folder / "data_batch_2", 3, rng),
        _write_cifar_batch(folder / "test_batch", 5, rng),
    ]
    return tmp_path, batches


def _expected_pixel(data: np.ndarray, row: int, c: int, h: int, w: int) -> float:
    # Official layout: 1024 red values, then green, then blue, each 32×32 row-major.
    return (data[row, c * 1024 + h * 32 + w] / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_reads_both_train_batches_in_order(cifar_dir, nested: bool) -> None:
    root, (b1, b2, _) = cifar_dir
    X, y = load_cifar10(root / "cifar-10-batches-py" if nested else root, train=True)
    assert X.shape == (7, 3, 32, 32) and X.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == b1[b"labels"] + b2[b"labels"]
    data = np.concatenate([b1[b"data"], b2[b"data"]])
    for row, c, h, w in [(0, 0, 0, 0), (1, 1, 2, 3), (4, 2, 31, 17), (6, 1, 16, 0)]:
        assert X[row, c, h, w].item() == pytest.approx(_expected_pixel(data, row, c, h, w), 1e-5)


def test_cifar10_test_split(cifar_dir) -> None:
    root, (_, _, test) = cifar_dir
    X, y = load_cifar10(root, train=False, dtype=torch.float64)
    assert X.shape == (5, 3, 32, 32) and X.dtype == torch.float64
    assert y.tolist() == test[b"labels"]
    assert X[3, 2, 5, 7].item() == pytest.approx(_expected_pixel(test[b"data"], 3, 2, 5, 7))


def test_cifar10_missing_names_expected_path_and_how_to_get_it(tmp_path: Path) -> None:
    expected = str(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    with pytest.raises(FileNotFoundError, match=re.escape(expected)) as info:
        load_cifar10(tmp_path)
    assert "cifar-10-python.tar.gz" in str(info.value) and "tar -xzf" in str(info.value)
    missing = tmp_path / "does-not-exist"
    expected = str(missing / "cifar-10-batches-py" / "data_batch_1")
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        load_cifar10(missing)


def test_cifar10_missing_test_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_cifar_batch(folder / "data_batch_1", 2, np.random.default_rng(0))
    assert load_cifar10(tmp_path)[0].shape == (2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "test_batch"))):
        load_cifar10(tmp_path, train=False)


def test_cifar10_malformed_batch(tmp_path: Path) -> None:
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"pixels": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"expected keys b'data' and b'labels'"):
        load_cifar10(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"must be uint8 of shape \(N, 3072\)"):
        load_cifar10(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        load_cifar10(tmp_path)


# --------------------------------------------------------------------------------------------
# image folder


def _write_image_folder(root: Path) -> None:
    """cat: 2 RGB PNGs (6×5, 7×7); dog: 1 grayscale PNG, 1 JPEG; plus files that are no images."""
    rng = np.random.default_rng(0)
    (root / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(root / "cat" / "a.png")
    Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)).save(root / "cat" / "b.png")
    Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), "L").save(root / "dog" / "c.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(root / "dog" / "d.JPG")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README").write_text("a file beside the class folders")


def test_image_folder_classes_sorted_resized_normalised(tmp_path: Path) -> None:
    _write_image_folder(tmp_path)
    X, y, classes = load_image_folder(tmp_path, image_size=4)
    assert classes == ("cat", "dog")
    assert X.shape == (4, 3, 4, 4) and X.dtype == torch.float32
    assert y.tolist() == [0, 0, 1, 1]
    assert torch.allclose(X.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(X.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5)


def test_image_folder_grayscale_and_given_statistics(tmp_path: Path) -> None:
    _write_image_folder(tmp_path)
    X, _, _ = load_image_folder(tmp_path, 3, mode="L", mean=[0.0], std=[1.0], dtype=torch.float64)
    assert X.shape == (4, 1, 3, 3)
    assert X.min().item() >= 0.0 and X.max().item() <= 1.0  # plain [0, 1] pixels
    with Image.open(tmp_path / "cat" / "a.png") as img:
        small = img.convert("L").resize((3, 3), Image.Resampling.BILINEAR)
    expected = np.asarray(small)
    assert torch.allclose(X[0, 0], torch.from_numpy(expected / 255.0))
    with pytest.raises(ValueError, match="one value per channel"):
        load_image_folder(tmp_path, 3, mean=[0.5], std=[0.5])


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 4)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        load_image_folder(tmp_path, 4)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_class holds no images"):
        load_image_folder(tmp_path, 4)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        load_image_folder(tmp_path, 0)


# --------------------------------------------------------------------------------------------
# batching


def test_make_loader_is_deterministic_per_seed() -> None:
    X, y = torch.arange(20.0).view(10, 2), torch.arange(10)

    def epochs(seed: int) -> list[list[int]]:
        loader = make_loader(X, y, batch_size=4, shuffle=True, seed=seed)
        return [[int(i) for _, yb in loader for i in yb] for _ in range(2)]

    first = epochs(0)
    assert first == epochs(0)
    assert first != epochs(1)
    assert first[0] != first[1]  # each pass is a new permutation
    assert all(sorted(order) == list(range(10)) for order in first)


def test_make_loader_in_order_and_batch_sizes() -> None:
    X, y = torch.randn(10, 1, 2, 2), torch.arange(10)
    batches = list(make_loader(X, y, batch_size=4, shuffle=False))
    assert [len(yb) for _, yb in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([xb for xb, _ in batches]), X)
    assert len(list(make_loader(X, y, 4, shuffle=False, drop_last=True))) == 2
    with pytest.raises(ValueError, match="same length"):
        make_loader(X, y[:3], 4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        make_loader(X, y, 0)


# --------------------------------------------------------------------------------------------
# dispatch


def test_get_dataset_digits() -> None:
    ds = get_dataset("digits", upsample_to=16)
    assert isinstance(ds, Dataset)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 16)
    X_train, y_train, _, _ = ds.tensors()
    assert X_train.shape == (1438, 1, 16, 16) and torch.equal(y_train, load_digits_tensors()[1])


def test_get_dataset_cifar10(cifar_dir) -> None:
    root, _ = cifar_dir
    ds = get_dataset("cifar10", root)
    assert ds.X_train.shape == (7, 3, 32, 32) and ds.X_test.shape == (5, 3, 32, 32)
    assert ds.classes[0] == "airplane" and ds.num_classes == 10


def test_get_dataset_folder_split_and_train_test(tmp_path: Path) -> None:
    _write_image_folder(tmp_path / "one")
    ds = get_dataset("folder", tmp_path / "one", image_size=4, test_fraction=0.25)
    assert (len(ds.y_train), len(ds.y_test)) == (3, 1) and ds.classes == ("cat", "dog")
    assert torch.allclose(ds.X_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    again = get_dataset("folder", tmp_path / "one", image_size=4, test_fraction=0.25)
    assert torch.equal(ds.X_test, again.X_test)

    _write_image_folder(tmp_path / "two" / "train")
    _write_image_folder(tmp_path / "two" / "test")
    ds = get_dataset("folder", tmp_path / "two", image_size=5, mode="L")
    assert ds.X_train.shape == (4, 1, 5, 5) and ds.X_test.shape == (4, 1, 5, 5)
    assert torch.allclose(ds.X_train, ds.X_test)  # same images, normalised with train statistics


def test_get_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; valid names are 'digits', "):
        get_dataset("mnist")
    with pytest.raises(ValueError, match=r"get_dataset\('cifar10'\) needs data_dir"):
        get_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        get_dataset("cifar10", tmp_path)


def test_numpy_floating_point_errors_are_strict_in_tests() -> None:
    """conftest makes divide/overflow/invalid raise; underflow stays silent for decaying sums."""
    expected = {"divide": "raise", "over": "raise", "invalid": "raise", "under": "ignore"}
    assert np.geterr() == expected
    with pytest.raises(FloatingPointError):
        np.array([1.0]) / np.array([0.0])
    assert np.exp(np.float64(-1000.0)) == 0.0
    from sklearn.linear_model import LogisticRegression

    X_train, y_train, X_test, y_test = load_digits_tensors(dtype=torch.float64)
    clf = LogisticRegression(max_iter=200).fit(X_train.flatten(1).numpy(), y_train.numpy())
    assert clf.score(X_test.flatten(1).numpy(), y_test.numpy()) > 0.9
