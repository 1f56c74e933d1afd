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
