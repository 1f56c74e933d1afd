"""The ``device`` knob of the vision experiment: ``resolve_device``, and training, ground truth and checkpoints that
stay bit-identical on the CPU."""

import pytest
import torch
from torch.utils.data import TensorDataset

from daunce.engines.context import resolve_device
from daunce.experiments import groundtruth, models, training, vision

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def test_resolve_device_auto_and_cpu():
    assert resolve_device() == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


@no_cuda
def test_resolve_device_refuses_cuda_without_cuda():
    assert resolve_device("auto").type == "cpu"
    # a tensor created on the resolved device lands on the CPU, with its values
    t = torch.arange(3.0, device=resolve_device("auto"))
    assert t.device == torch.device("cpu") and t.tolist() == [0.0, 1.0, 2.0]
    for name in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device(name)


@pytest.mark.parametrize("name", ["tpu-bogus", "", "cuda:x", None])
def test_resolve_device_refuses_unknown_names(name):
    with pytest.raises(ValueError, match="device must be"):
        resolve_device(name)


def _data(n=96, p=8, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g)
    return TensorDataset(x, (x @ torch.randn(p, c, generator=g)).argmax(1))


def _params(model):
    return [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("optimizer,kw", [("adam", dict(batch_size=32, epochs=3)), ("lbfgs", dict(epochs=2)),
                                          ("sgd", dict(batch_size=40, epochs=2))])
def test_train_classifier_on_cpu_is_bit_identical(optimizer, kw):
    data = _data()
    devices = [{}, {"device": "cpu"}, {"device": torch.device("cpu")}]
    if not torch.cuda.is_available():  # "auto" is the CPU here: the same bits
        devices.append({"device": "auto"})
    runs = []
    before = _params(models.seeded(models.mlp, 0, 8, 3, 16))
    for device in devices:
        model = models.seeded(models.mlp, 0, 8, 3, 16)
        training.train_classifier(model, data, optimizer=optimizer, seed=3, **kw, **device)
        assert all(p.device.type == "cpu" for p in model.parameters())
        runs.append(_params(model))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    # and training did something: the weights moved
    assert not all(torch.equal(a, b) for a, b in zip(before, runs[0]))


def test_goodness_and_accuracy_come_back_on_the_cpu():
    data = _data()
    model = models.seeded(models.logistic_regression, 0, 8, 3)
    g = groundtruth.goodness(model, data, batch_size=40)
    assert g.device.type == "cpu" and g.dtype == torch.float64 and g.shape == (len(data),)
    assert isinstance(training.accuracy(model, data), float)
    # the values, computed here in one batch: the margin logit_y - logsumexp of the other logits, minus the
    # cross-entropy, and the fraction of argmax hits
    x, y = data.tensors
    with torch.no_grad():
        logits = model(x).double()
    correct = logits[torch.arange(len(y)), y]
    others = logits.masked_fill(torch.nn.functional.one_hot(y, 3).bool(), float("-inf"))
    torch.testing.assert_close(g, correct - torch.logsumexp(others, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(groundtruth.goodness(model, data, kind="neg_loss", batch_size=40),
                               correct - torch.logsumexp(logits, 1), atol=1e-5, rtol=1e-5)
    assert training.accuracy(model, data) == pytest.approx((logits.argmax(1) == y).double().mean().item())


def test_retrain_outputs_on_cpu_is_bit_identical():
    train, query = _data(), _data(20, seed=1)
    subsets = groundtruth.half_subsets(len(train), 2, seed=0)

    def make(seed):
        return models.seeded(models.logistic_regression, seed, 8, 3)

    def fit(model, data, seed):
        return training.train_classifier(model, data, epochs=2, batch_size=16, seed=seed)

    devices = [{}, {"device": "cpu"}] + ([{"device": "auto"}] if not torch.cuda.is_available() else [])
    outs = [groundtruth.retrain_outputs(make, fit, train, query, subsets, 1, progress=False, **kw)["outputs"]
            for kw in devices]
    assert outs[0].dtype == torch.float64 and outs[1].device.type == "cpu"
    assert all(torch.equal(outs[0], other) for other in outs[1:])
    # the values: entry (m, 0) is the query margins of a model retrained here on subset m with seed 1000 * 0 + m
    assert outs[0].shape == (2, 1, len(query))
    x, y = train.tensors
    for m in range(2):
        idx = subsets[m].nonzero().flatten()
        model = fit(make(m), TensorDataset(x[idx], y[idx]), m)
        assert torch.equal(outs[0][m, 0], groundtruth.goodness(model, query))
    assert not torch.equal(outs[0][0, 0], outs[0][1, 0])


def test_vision_fit_keeps_cpu_checkpoints_and_is_bit_identical():
    data = _data()
    recipe = vision.Recipe(optimizer="adam", epochs=4, lr=1e-2, batch_size=32)
    a, ck_a = vision.fit(models.seeded(models.mlp, 0, 8, 3, 16), data, recipe, seed=1, n_checkpoints=2)
    b, ck_b = vision.fit(models.seeded(models.mlp, 0, 8, 3, 16), data, recipe, seed=1, n_checkpoints=2, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b)))
    if not torch.cuda.is_available():  # "auto" is the CPU here: the same bits
        c, _ = vision.fit(models.seeded(models.mlp, 0, 8, 3, 16), data, recipe, seed=1, device="auto")
        assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(c)))
    assert [c["epoch"] for c in ck_a] == [c["epoch"] for c in ck_b] == [2, 4]
    for ca, cb in zip(ck_a, ck_b):
        assert all(v.device.type == "cpu" for v in cb["state"].values())
        assert all(torch.equal(ca["state"][k], cb["state"][k]) for k in ca["state"])
    # the last checkpoint is the final model, detached from it (training on does not change the checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(ck_b[-1]["state"].values(), _params(b)))
    assert all(not v.requires_grad and v.data_ptr() != p.data_ptr()
               for v, p in zip(ck_b[-1]["state"].values(), b.state_dict().values()))
    # loads into a fresh model like the state dict it copies (version metadata kept)
    fresh = models.seeded(models.mlp, 5, 8, 3, 16)
    fresh.load_state_dict(ck_b[-1]["state"])
    assert all(torch.equal(x, y) for x, y in zip(_params(fresh), _params(b)))
    assert ck_b[-1]["state"]._metadata == b.state_dict()._metadata
