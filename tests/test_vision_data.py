"""The CIFAR-10 loader (paper profile) on files written in CIFAR-10's python pickle format."""

import pickle

import numpy as np

from daunce.experiments import data


def _write_cifar(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, size=n_per_batch))
        batches[name] = (x, y)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x, "labels": y, "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": data.CIFAR10_CLASSES, "num_vis": 3072}, f)
    return batches


def test_cifar10_loader_reads_written_files(tmp_path):
    batches = _write_cifar(tmp_path)
    xtr, ytr, xte, yte = data.cifar10_arrays(tmp_path)
    assert xtr.shape == (20, 32, 32, 3) and xte.shape == (4, 32, 32, 3)
    # channel-first layout of the pickle: the first 1024 values are the red plane
    x0 = batches["data_batch_1"][0][0]
    assert np.array_equal(xtr[0, :, :, 0].ravel(), x0[:1024]) and np.array_equal(xtr[0, :, :, 2].ravel(), x0[2048:])
    assert list(ytr[:4]) == batches["data_batch_1"][1]
    train, query = data.cifar10(tmp_path, n_train=12, n_query=3, seed=0)
    x, y = train.tensors
    assert x.shape == (12, 3, 32, 32) and y.dtype.is_floating_point is False
    assert query.tensors[0].shape == (3, 3, 32, 32)
    # normalised with CIFAR-10's channel statistics
    raw = (xtr.astype(np.float32) / 255.0 - data.CIFAR_MEAN) / data.CIFAR_STD
    assert np.isclose(x.numpy().mean(), raw.mean(), atol=0.5)


def test_downsample_average_pools_images_and_refuses_what_it_cannot():
    import pytest
    import torch
    from torch.utils.data import TensorDataset

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    y = torch.tensor([0, 1])
    small = data.downsample(TensorDataset(x, y), 2)
    xs, ys = small.tensors
    assert xs.shape == (2, 1, 2, 2) and torch.equal(ys, y)
    assert xs[0, 0, 0, 0] == x[0, 0, :2, :2].mean()  # the mean of its 2 x 2 block
    assert data.downsample(small, 2) is small  # already that size
    with pytest.raises(ValueError, match="divisor"):
        data.downsample(TensorDataset(x, y), 3)
    with pytest.raises(ValueError, match="images"):
        data.downsample(TensorDataset(x.reshape(2, 16), y), 2)
