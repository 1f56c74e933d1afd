"""Image data: offline sets for the default profile, CIFAR-10 for the paper profile.

Every loader returns ``(train, query)`` as ``TensorDataset(x, y)`` with float32 images and int64
labels, drawn reproducibly from ``seed``.

* ``digits``: scikit-learn's 1,797 8x8 digits (ships inside scikit-learn).
* ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` files (``/usr/share/datasets/fashion-mnist``),
  or torchvision's download where that package is absent and the network allows.
* ``cifar10``: torchvision's CIFAR-10 from its on-disk python format (paper profile).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
CIFAR10_CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _split(x: np.ndarray, y: np.ndarray, n_train: int, n_query: int, seed: int, x_query=None, y_query=None):
    rng = np.random.default_rng(seed)
    if x_query is None:
        if n_train + n_query > len(x):
            raise ValueError(f"asked for {n_train} + {n_query} examples, the data has {len(x)}")
        perm = rng.permutation(len(x))
        tr, q = perm[:n_train], perm[n_train : n_train + n_query]
        x_query, y_query = x[q], y[q]
        x, y = x[tr], y[tr]
    else:
        if n_train > len(x) or n_query > len(x_query):
            raise ValueError(f"asked for {n_train} training / {n_query} query examples, the data has "
                             f"{len(x)} / {len(x_query)}")
        tr = rng.permutation(len(x))[:n_train]
        q = rng.permutation(len(x_query))[:n_query]
        x, y, x_query, y_query = x[tr], y[tr], x_query[q], y_query[q]

    def ds(a, b):
        return TensorDataset(torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32),
                             torch.as_tensor(np.ascontiguousarray(b), dtype=torch.long))

    return ds(x, y), ds(x_query, y_query)


def digits(n_train: int = 1000, n_query: int = 200, seed: int = 0, classes=None, image: bool = False):
    """scikit-learn digits, pixels scaled to [0, 1]; ``classes`` keeps a subset of labels (relabelled
    0..c-1); ``image=True`` gives ``(N, 1, 8, 8)`` instead of ``(N, 64)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    if classes is not None:
        keep = np.isin(y, classes)
        x, y = x[keep], np.searchsorted(np.asarray(sorted(classes)), y[keep])
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return _split(x, y, n_train, n_query, seed)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def fashion_mnist_arrays(root: Path | str | None = None):
    """``(x_train (60000, 28, 28) uint8, y_train, x_test (10000, 28, 28), y_test)``."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    files = {"xtr": "train-images-idx3-ubyte.gz", "ytr": "train-labels-idx1-ubyte.gz",
             "xte": "t10k-images-idx3-ubyte.gz", "yte": "t10k-labels-idx1-ubyte.gz"}
    if all((root / f).exists() for f in files.values()):
        xtr = _read_idx(root / files["xtr"], 16).reshape(-1, 28, 28)
        ytr = _read_idx(root / files["ytr"], 8)
        xte = _read_idx(root / files["xte"], 16).reshape(-1, 28, 28)
        yte = _read_idx(root / files["yte"], 8)
        return xtr, ytr, xte, yte
    try:
        from torchvision.datasets import FashionMNIST

        cache = Path.home() / ".cache" / "daunce"
        tr = FashionMNIST(cache, train=True, download=True)
        te = FashionMNIST(cache, train=False, download=True)
    except Exception as e:  # no package, no network
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {root} and could not be downloaded ({e}); "
            "install it with: apt-get install dataset-fashion-mnist") from e
    return tr.data.numpy(), tr.targets.numpy(), te.data.numpy(), te.targets.numpy()


def fashion_mnist(n_train: int = 5000, n_query: int = 500, seed: int = 0, image: bool = False, root=None):
    """Fashion-MNIST: training examples from the training split, queries from the test split.
    Pixels in [0, 1], ``(N, 784)`` or ``(N, 1, 28, 28)`` with ``image=True``."""
    xtr, ytr, xte, yte = fashion_mnist_arrays(root)
    shape = (-1, 1, 28, 28) if image else (-1, 784)
    xtr = (xtr.astype(np.float32) / 255.0).reshape(shape)
    xte = (xte.astype(np.float32) / 255.0).reshape(shape)
    return _split(xtr, ytr.astype(np.int64), n_train, n_query, seed, xte, yte.astype(np.int64))


CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)


def _read_cifar_batch(path: Path):
    import pickle

    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    return x, y


def cifar10_arrays(root: Path | str, download: bool = False):
    """``(x_train (N, 32, 32, 3) uint8, y_train, x_test, y_test)`` from ``root/cifar-10-batches-py``
    (CIFAR-10's python pickle format: data_batch_1..5, test_batch, batches.meta), read directly (no
    checksum, so a few images written by a test load too). ``download=True`` lets torchvision fetch
    the files first where the network allows."""
    folder = Path(root) / "cifar-10-batches-py"
    if not folder.exists() and download:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    if not folder.exists():
        raise FileNotFoundError(f"no CIFAR-10 under {folder}; download it (needs the internet) or pass download=True")
    files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    parts = [_read_cifar_batch(f) for f in files if f.exists()]
    if not parts:
        raise FileNotFoundError(f"no data_batch_* files in {folder}")
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _read_cifar_batch(folder / "test_batch")
    return xtr, ytr, xte, yte


def cifar10(root: Path | str, n_train: int = 5000, n_query: int = 500, seed: int = 0, download: bool = False):
    """CIFAR-10 (paper profile) from ``root/cifar-10-batches-py``, normalised, ``(N, 3, 32, 32)``;
    training examples from the training batches, queries from the test batch."""
    xtr, ytr, xte, yte = cifar10_arrays(root, download)

    def prep(a):
        a = (a.astype(np.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD
        return a.transpose(0, 3, 1, 2)

    return _split(prep(xtr), ytr, n_train, n_query, seed, prep(xte), yte)


def downsample(data: TensorDataset, size: int) -> TensorDataset:
    """Images ``(N, C, H, W)`` average-pooled to ``(N, C, size, size)`` (``H`` and ``W`` multiples of ``size``);
    the other tensors unchanged."""
    x, *rest = data.tensors
    if x.ndim != 4:
        raise ValueError(f"downsample needs images (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-1] == size and x.shape[-2] == size:
        return data
    if x.shape[-2] % size or x.shape[-1] % size:
        raise ValueError(f"cannot average-pool {tuple(x.shape[-2:])} images to {size} x {size}: not a divisor")
    return TensorDataset(torch.nn.functional.avg_pool2d(x, (x.shape[-2] // size, x.shape[-1] // size)), *rest)


def synthetic_classification(n: int, d_in: int, n_classes: int, n_query: int, seed: int = 0):
    """``(train, query)``: Gaussian features ``(n, d_in)`` labelled by the argmax of a random linear map plus noise
    (standard deviation 0.5); the queries labelled without noise. Small problems with a known shape, e.g. one whose
    subsets' curvature is rank-deficient (few examples, many features)."""
    g = torch.Generator().manual_seed(seed)
    x, W = torch.randn(n, d_in, generator=g), torch.randn(d_in, n_classes, generator=g)
    y = (x @ W + 0.5 * torch.randn(n, n_classes, generator=g)).argmax(1)
    xq = torch.randn(n_query, d_in, generator=g)
    return TensorDataset(x, y), TensorDataset(xq, (xq @ W).argmax(1))
