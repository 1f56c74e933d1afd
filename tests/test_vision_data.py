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
    # each loaded image is a written training image, scaled to [0, 1] and normalised channel by channel
    pixels = xtr.astype(np.float64) / 255.0                                  # (20, 32, 32, 3)
    mean, std = data.CIFAR_MEAN.astype(np.float64), data.CIFAR_STD.astype(np.float64)
    back = x.numpy().astype(np.float64).transpose(0, 2, 3, 1) * std + mean   # undo the normalisation
    for i, img in enumerate(back):
        dist = np.abs(pixels - img).reshape(len(pixels), -1).max(1)
        assert dist.min() < 1e-3, f"loaded training image {i} is no written image (closest: {dist.min():.3g})"
        assert y[i].item() == ytr[dist.argmin()], f"loaded training image {i} has another label"
    # the whole training set loaded (a permutation of it): its per-channel mean and std are the written pixels'
    # statistics, shifted and scaled by CIFAR-10's
    full, full_query = data.cifar10(tmp_path, n_train=20, n_query=4, seed=1)
    for loaded, written in ((full.tensors[0], pixels), (full_query.tensors[0], xte.astype(np.float64) / 255.0)):
        got = loaded.numpy().astype(np.float64)
        np.testing.assert_allclose(got.mean(axis=(0, 2, 3)), (written.mean(axis=(0, 1, 2)) - mean) / std, atol=1e-3)
        np.testing.assert_allclose(got.std(axis=(0, 2, 3)), written.std(axis=(0, 1, 2)) / std, atol=1e-3)


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
    blocks = x.reshape(2, 1, 2, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(2, 1, 2, 2, 4)  # (N, C, row, col, 4 pixels)
    torch.testing.assert_close(xs, blocks.mean(-1))  # every block, e.g. image 1's last is mean(26, 27, 30, 31)
    assert xs[1, 0, 1, 1] == (26 + 27 + 30 + 31) / 4
    assert data.downsample(small, 2) is small  # already that size
    with pytest.raises(ValueError, match="divisor"):
        data.downsample(TensorDataset(x, y), 3)
    with pytest.raises(ValueError, match="images"):
        data.downsample(TensorDataset(x.reshape(2, 16), y), 2)
