"""Image classification data as normalised float tensors, and a deterministic batch iterator.

Three sources, all returning ``(N, C, H, W)`` float tensors and ``int64`` labels:

* ``digits``: scikit-learn's bundled handwritten digits (1797 images, 8×8, 1 channel). Always
  available, no download; the default for tests and the demo.
* ``cifar10``: the real CIFAR-10 "python version" pickles (``cifar-10-batches-py``).
* ``folder``: an ImageFolder-style tree ``root/<class_name>/*.png|jpg`` read with PIL.

``get_dataset`` dispatches on these names and returns a :class:`Dataset` with a train/test split.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "Dataset",
    "get_dataset",
    "load_cifar10",
    "load_digits_tensors",
    "load_image_folder",
    "make_loader",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "cifar10", "folder")

#: Per-channel statistics of the CIFAR-10 training set (RGB, pixel values scaled to [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

_CIFAR_DIRNAME = "cifar-10-batches-py"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Dataset:
    """A train/test split of normalised images ``(N, C, H, W)`` and ``int64`` labels ``(N,)``."""

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def image_size(self) -> int:
        """Height of the images (all sources here give square images)."""
        return int(self.X_train.shape[2])

    def tensors(self) -> Tensors:
        """``(X_train, y_train, X_test, y_test)``, the same order as ``load_digits_tensors``."""
        return self.X_train, self.y_train, self.X_test, self.y_test


# --------------------------------------------------------------------------------------------
# digits


def load_digits_tensors(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    upsample_to: int | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Tensors:
    """Load scikit-learn's handwritten digits as ``(X_train, y_train, X_test, y_test)``.

    Parameters
    ----------
    dtype, device:
        Type and place of the image tensors (labels are ``int64`` on the same device).
    upsample_to:
        If given, images are bilinearly resized from 8×8 to ``upsample_to``×``upsample_to``.
    test_fraction:
        Share of the 1797 images put in the test split.
    seed:
        Seed of the permutation that makes the split; the same seed gives the same split.

    Images have shape ``(N, 1, H, W)``; they are normalised with the mean and standard deviation
    of all training pixels (one scalar each), so the training images have mean 0 and std 1.

    Examples
    --------
    >>> X_train, y_train, X_test, y_test = load_digits_tensors()
    >>> tuple(X_train.shape), tuple(X_test.shape)
    ((1438, 1, 8, 8), (359, 1, 8, 8))
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    if upsample_to is not None and upsample_to < 1:
        raise ValueError(f"upsample_to must be a positive image size or None, got {upsample_to!r}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    if upsample_to is not None and upsample_to != images.shape[-1]:
        images = F.interpolate(
            images, size=(upsample_to, upsample_to), mode="bilinear", align_corners=False
        )
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(labels)))
    n_test = int(round(test_fraction * len(labels)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    X_train, X_test = images[train_idx], images[test_idx]
    mean, std = X_train.mean(), X_train.std()
    X_train, X_test = (X_train - mean) / std, (X_test - mean) / std
    return (
        X_train.to(device=device, dtype=dtype),
        labels[train_idx].to(device),
        X_test.to(device=device, dtype=dtype),
        labels[test_idx].to(device),
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10


def _cifar_missing_message(data_dir: Path, missing: Path) -> str:
    return (
        f"CIFAR-10 not found: expected the file {missing} "
        f"(looked in {data_dir} and {data_dir / _CIFAR_DIRNAME}). "
        f"Get the python version of CIFAR-10 ({_CIFAR_URL}) and unpack it into {data_dir}, "
        f"e.g. `tar -xzf cifar-10-python.tar.gz -C {data_dir}`, which creates "
        f"{data_dir / _CIFAR_DIRNAME}/data_batch_1..5 and test_batch."
    )


def _cifar_batch_dir(data_dir: Path) -> Path:
    """``data_dir/cifar-10-batches-py`` if it exists, else ``data_dir`` itself."""
    nested = data_dir / _CIFAR_DIRNAME
    return nested if nested.is_dir() else data_dir


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # The official files are pickles; only load files from a source you trust.
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict, got {type(batch)}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(
            f"{path} is not a CIFAR-10 batch: expected keys b'data' and b'labels', "
            f"got {sorted(map(repr, batch))}"
        )
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: {labels.shape[0]} labels for {data.shape[0]} images; they must match"
        )
    return data, labels


def load_cifar10(
    data_dir: str | Path,
    train: bool = True,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of CIFAR-10 from its official python-pickle files as ``(X, y)``.

    Parameters
    ----------
    data_dir:
        Either the folder that contains ``cifar-10-batches-py`` or that folder itself.
    train:
        ``True`` reads every ``data_batch_<n>`` file present (``1..5`` in the real data set),
        in numeric order; ``False`` reads ``test_batch``.

    ``X`` has shape ``(N, 3, 32, 32)``, pixel values scaled to [0, 1] and normalised per channel
    with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`; ``y`` holds ``int64`` labels 0..9.
    Raises ``FileNotFoundError`` naming the expected file, and how to get it, when data is missing.
    """
    data_dir = Path(data_dir).expanduser()
    batch_dir = _cifar_batch_dir(data_dir)
    if train:
        listing = batch_dir.iterdir() if batch_dir.is_dir() else ()
        found = [p for p in listing if re.fullmatch(r"data_batch_\d+", p.name)]
        files = sorted(found, key=lambda p: int(p.name.rsplit("_", 1)[1]))
        if not files:
            raise FileNotFoundError(
                _cifar_missing_message(data_dir, data_dir / _CIFAR_DIRNAME / "data_batch_1")
            )
    else:
        files = [batch_dir / "test_batch"]
        if not files[0].is_file():
            raise FileNotFoundError(
                _cifar_missing_message(data_dir, data_dir / _CIFAR_DIRNAME / "test_batch")
            )
    parts = [_read_cifar_batch(p) for p in files]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    X = torch.from_numpy(data).reshape(-1, 3, 32, 32).to(torch.float64) / 255.0
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float64).view(1, 3, 1, 1)
    X = (X - mean) / std
    return X.to(device=device, dtype=dtype), torch.from_numpy(labels).to(device)


# --------------------------------------------------------------------------------------------
# image folder


def _read_image_folder(
    root: Path, image_size: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Images in [0, 1] as float64 ``(N, C, S, S)``, labels, and the sorted class names."""
    from PIL import Image

    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; expected {root}/<class_name>/*.png"
        )
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise FileNotFoundError(
            f"no class folders in {root}; expected {root}/<class_name>/*.png (or .jpg)"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise FileNotFoundError(
                f"class folder {root / name} holds no images with an extension in "
                f"{IMAGE_EXTENSIONS}"
            )
        for path in files:
            with Image.open(path) as img:
                img = img.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.float64) / 255.0
            images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
            labels.append(label)
    X = torch.from_numpy(np.stack(images))
    return X, torch.tensor(labels, dtype=torch.int64), classes


def _channel_stats(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = X.mean(dim=(0, 2, 3), keepdim=True)
    std = X.std(dim=(0, 2, 3), keepdim=True)
    # A constant channel (e.g. a blank test folder) would divide by zero; leave it unscaled.
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def load_image_folder(
    root: str | Path,
    image_size: int,
    *,
    mode: str = "RGB",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Load ``root/<class_name>/*.png|jpg`` as ``(X, y, classes)``.

    Class folders are sorted by name and numbered from 0, files are sorted within each class.
    Every image is converted to the PIL ``mode`` ("RGB" gives 3 channels, "L" gives 1), resized to
    ``image_size``×``image_size`` and normalised per channel with ``mean``/``std`` (pixel values
    in [0, 1]), or with the statistics of the loaded images when they are not given.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    X, y, classes = _read_image_folder(Path(root).expanduser(), image_size, mode)
    if mean is None or std is None:
        m, s = _channel_stats(X)
    else:
        shape = (1, -1, 1, 1)
        m = torch.tensor(mean, dtype=torch.float64).view(shape)
        s = torch.tensor(std, dtype=torch.float64).view(shape)
        if m.shape[1] != X.shape[1] or s.shape[1] != X.shape[1]:
            raise ValueError(
                f"mean and std need one value per channel ({X.shape[1]} for mode {mode!r}), "
                f"got {len(mean)} and {len(std)}"
            )
    X = (X - m) / s
    return X.to(device=device, dtype=dtype), y.to(device), classes


# --------------------------------------------------------------------------------------------
# batching and dispatch


def make_loader(
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    *,
    drop_last: bool = False,
) -> DataLoader:
    """A deterministic batch iterator over ``(X, y)``.

    With ``shuffle=True`` the order comes from a ``torch.Generator`` seeded with ``seed``: each
    pass over the loader is a new permutation, and the whole sequence of passes is the same for
    the same seed. Batches are yielded on the device of ``X``.
    """
    if len(X) != len(y):
        raise ValueError(f"X and y must have the same length, got {len(X)} and {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(X, y),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=0,
    )


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.as_tensor(np.random.default_rng(seed).permutation(n))
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    return order[n_test:], order[:n_test]


def _folder_dataset(
    root: Path,
    image_size: int,
    mode: str,
    test_fraction: float,
    seed: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> Dataset:
    if (root / "train").is_dir() and (root / "test").is_dir():
        X_train, y_train, classes = _read_image_folder(root / "train", image_size, mode)
        X_test, y_test, test_classes = _read_image_folder(root / "test", image_size, mode)
        if test_classes != classes:
            raise ValueError(
                f"{root}/train and {root}/test must hold the same class folders, "
                f"got {classes} and {test_classes}"
            )
    else:
        X, y, classes = _read_image_folder(root, image_size, mode)
        if len(y) < 2:
            raise ValueError(f"{root} holds {len(y)} image; a train/test split needs at least 2")
        train_idx, test_idx = _split(len(y), test_fraction, seed)
        X_train, y_train, X_test, y_test = X[train_idx], y[train_idx], X[test_idx], y[test_idx]
    mean, std = _channel_stats(X_train)
    return Dataset(
        "folder",
        ((X_train - mean) / std).to(device=device, dtype=dtype),
        y_train.to(device),
        ((X_test - mean) / std).to(device=device, dtype=dtype),
        y_test.to(device),
        classes,
    )


def get_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    upsample_to: int | None = None,
    image_size: int = 32,
    mode: str = "RGB",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Load a data set by name: ``"digits"``, ``"cifar10"`` or ``"folder"``.

    ``data_dir`` is required for ``"cifar10"`` (see :func:`load_cifar10`) and ``"folder"``.
    A folder with ``train/`` and ``test/`` subfolders uses them as the split; otherwise the images
    are split with ``test_fraction`` and ``seed``, and normalised with the training statistics.
    ``upsample_to`` applies to digits, ``image_size`` and ``mode`` to folders.
    """
    if name not in DATASET_NAMES:
        valid = ", ".join(repr(n) for n in DATASET_NAMES)
        raise ValueError(f"unknown dataset {name!r}; valid names are {valid}")
    if name == "digits":
        tensors = load_digits_tensors(
            dtype, device, upsample_to, test_fraction=test_fraction, seed=seed
        )
        return Dataset("digits", *tensors, classes=tuple(str(d) for d in range(10)))
    if data_dir is None:
        raise ValueError(f"get_dataset({name!r}) needs data_dir, the folder that holds the data")
    if name == "cifar10":
        X_train, y_train = load_cifar10(data_dir, train=True, dtype=dtype, device=device)
        X_test, y_test = load_cifar10(data_dir, train=False, dtype=dtype, device=device)
        return Dataset("cifar10", X_train, y_train, X_test, y_test, CIFAR10_CLASSES)
    return _folder_dataset(
        Path(data_dir).expanduser(), image_size, mode, test_fraction, seed, dtype, device
    )
