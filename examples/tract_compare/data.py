"""Image classification data from local files only: nothing is ever downloaded.

Every loader returns a :class:`Dataset` of float32 images (N, C, H, W) in pixel units and
int64 labels, as numpy arrays; :func:`load_dataset` then pads them if asked and scales
them: by default standardized per channel with the training set's mean and std (the
paper's convention; TrAct's lambda is tuned for standardized inputs), or in [0, 1] or
[0, 255] for the paper's no-standardization ablation. Each trainer converts the arrays to
its framework's tensors (torch without a copy; JAX and Keras channels-last).
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib
import pickle
import struct

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR100_FILES = ["train", "test"]


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where we looked; the message says where and what."""


@dataclasses.dataclass
class Dataset:
    """Standardized images and labels, split into train and test."""

    name: str
    x_train: np.ndarray  # (N, C, H, W) float32
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    pixel_max: float = 255.0  # the brightest pixel value of the format (digits: 16)

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]


def _raw(name, train_images, train_labels, test_images, test_labels, classes,
         pixel_max=255.0):
    """Dataset from uint8/float (N, C, H, W) arrays, kept in pixel units."""
    return Dataset(name=name, x_train=train_images.astype(np.float32),
                   y_train=np.asarray(train_labels, dtype=np.int64),
                   x_test=test_images.astype(np.float32),
                   y_test=np.asarray(test_labels, dtype=np.int64), classes=classes,
                   pixel_max=pixel_max)


INPUTS = ("standardized", "0-1", "0-255")


def scale_inputs(data: Dataset, inputs="standardized") -> Dataset:
    """``data`` (pixel units) scaled in place as ``inputs`` says; returns it.

    "standardized": per channel, with the training set's mean and std. "0-1" and "0-255":
    pixel values mapped linearly from [0, pixel_max] (the paper's ablation, Fig. 8).
    """
    if inputs == "standardized":
        mean = data.x_train.mean(axis=(0, 2, 3), keepdims=True)
        std = data.x_train.std(axis=(0, 2, 3), keepdims=True)
        data.x_train, data.x_test = (data.x_train - mean) / std, (data.x_test - mean) / std
    elif inputs in ("0-1", "0-255"):
        scale = np.float32((1.0 if inputs == "0-1" else 255.0) / data.pixel_max)
        data.x_train, data.x_test = data.x_train * scale, data.x_test * scale
    else:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    return data


def pad_images(data: Dataset, size: int) -> Dataset:
    """``data``'s images zero-padded (black, in pixel units) to size x size, centred."""
    height, width = data.x_train.shape[-2:]
    if size < max(height, width):
        raise ValueError(f"pad_to must be at least the image size {height}x{width}, "
                         f"got {size}")
    top, left = (size - height) // 2, (size - width) // 2
    pads = ((0, 0), (0, 0), (top, size - height - top), (left, size - width - left))
    data.x_train, data.x_test = np.pad(data.x_train, pads), np.pad(data.x_test, pads)
    return data


def _require_files(dataset, folder, names, hint):
    """The paths of ``names`` in ``folder``; DataNotFoundError naming all that are missing."""
    folder = pathlib.Path(folder)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{dataset}: missing {', '.join(missing)} in {folder.resolve()}. "
            f"Expected files there: {', '.join(names)}. {hint}")
    return [folder / name for name in names]


def load_digits(seed=0) -> Dataset:
    """scikit-learn's 8x8 digits (shipped with sklearn): a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = digits.images[:, None]  # (1797, 1, 8, 8), values 0..16
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(0.8 * len(order))
    train, test = order[:cut], order[cut:]
    return _raw("digits", images[train], digits.target[train], images[test],
                digits.target[test], classes=10, pixel_max=16.0)


def read_idx(path) -> np.ndarray:
    """An IDX file (MNIST's format; gzipped if the name ends in .gz) as a uint8 array."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        raw = file.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, file holds {data.size} bytes")
    return data.reshape(shape)


def load_fashion_mnist(folder=FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST from its four IDX .gz files (60000 train, 10000 test, 28x28 gray)."""
    paths = _require_files(
        "fashion-mnist", folder, list(FASHION_MNIST_FILES.values()),
        "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass "
        "--data-dir to a folder holding them.")
    train_images, train_labels, test_images, test_labels = (read_idx(p) for p in paths)
    return _raw("fashion-mnist", train_images[:, None], train_labels, test_images[:, None],
                test_labels, classes=10)


def _read_cifar_batch(path, label_key):
    """One CIFAR python pickle: images (N, 3, 32, 32) uint8 and labels (N,)."""
    with open(path, "rb") as file:
        # The official batches are pickles of plain dicts and arrays (our own data files,
        # chosen by the user, so unpickling them is as safe as the folder they come from).
        batch = pickle.load(file, encoding="bytes")
    batch = {key.decode() if isinstance(key, bytes) else key: value
             for key, value in batch.items()}
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[label_key], dtype=np.int64)


def _load_cifar(name, folder, files, label_key, classes):
    if folder is None:
        raise DataNotFoundError(
            f"{name}: no data folder given. Pass --data-dir to the folder of the python "
            f"version's files ({', '.join(files)}).")
    paths = _require_files(
        name, folder, files,
        "Use the python version of the data set (the folder its tar.gz unpacks to), "
        "and pass that folder with --data-dir.")
    batches = [_read_cifar_batch(p, label_key) for p in paths]
    train, test = batches[:-1], batches[-1]
    return _raw(name, np.concatenate([b[0] for b in train]),
                np.concatenate([b[1] for b in train]), test[0], test[1], classes)


def load_cifar10(folder) -> Dataset:
    """CIFAR-10 from data_batch_1..5 and test_batch (python pickles) in ``folder``."""
    return _load_cifar("cifar10", folder, CIFAR10_FILES, "labels", classes=10)


def load_cifar100(folder) -> Dataset:
    """CIFAR-100 (fine labels) from the python pickles ``train`` and ``test`` in ``folder``."""
    return _load_cifar("cifar100", folder, CIFAR100_FILES, "fine_labels", classes=100)


DATASETS = {
    "digits": lambda folder: load_digits(),
    "fashion-mnist": lambda folder: load_fashion_mnist(folder or FASHION_MNIST_DIR),
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}


def load_dataset(name, folder=None, train_limit=None, test_limit=None,
                 inputs="standardized", pad_to=None) -> Dataset:
    """The data set ``name`` (a key of DATASETS) from ``folder`` (None: its default).

    ``pad_to``: zero-pad the images to pad_to x pad_to pixels (e.g. 28 -> 32 for a CIFAR
    model). ``inputs``: how pixels are scaled, see :func:`scale_inputs`. The statistics
    come from the whole (padded) training set; ``train_limit``/``test_limit`` then keep
    only the first examples.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    data = DATASETS[name](folder)
    if pad_to is not None:
        pad_images(data, pad_to)
    scale_inputs(data, inputs)
    data.x_train, data.y_train = data.x_train[:train_limit], data.y_train[:train_limit]
    data.x_test, data.y_test = data.x_test[:test_limit], data.y_test[:test_limit]
    return data
