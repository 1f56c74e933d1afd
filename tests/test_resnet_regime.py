"""The paper's regime at toy size (notebook 02's "resnet" model, smoke profile): a BatchNorm ResNet trained from
scratch by SGD, two ground-truth retrains, and Daunce, kronfluence and TRAK on it."""

import dataclasses

import pytest
import torch
from torch.utils.data import TensorDataset

from daunce import ClassificationTask, Daunce, DaunceConfig, scores
from daunce.experiments import baselines, training, vision
from daunce.task import margin


@pytest.fixture(scope="module")
def toy_resnet():
    s = dataclasses.replace(vision.settings("smoke")["resnet"], n_subsets=2, n_seeds=1, n_train=64,
                            n_query=12)
    assert s.batchnorm and s.recipe.optimizer == "sgd" and s.recipe.shift > 0
    train, query = vision.load_data(s)
    target = vision.train_target(s, train)
    return s, train, query, target


def test_theta0_and_two_retrains_from_scratch(toy_resnet, tmp_path):
    s, train, query, target = toy_resnet
    model = target["model"]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.num_batches_tracked > 0 and not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert len(target["ensemble"]) == s.n_ensemble
    gt = vision.ground_truth(s, train, query, workdir=tmp_path, progress=False)
    assert gt["outputs"].shape == (2, 1, len(query)) and torch.isfinite(gt["outputs"]).all()
    assert gt["subsets"].shape == (2, len(train)) and gt["subsets"].sum(1).tolist() == [len(train) // 2] * 2
    # from scratch: two subsets' retrains are different models
    assert not torch.allclose(gt["outputs"][0, 0], gt["outputs"][1, 0])


def test_daunce_copies_keep_theta0s_batchnorm_statistics(toy_resnet):
    s, train, query, target = toy_resnet
    model = target["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = DaunceConfig(n_models=4, damping=0.1, rho=0.05, isotropic_noise=False, subset_ratio=0.5, optimizer="sgd",
                       lr=0.01, momentum=0.9, steps=20)
    d = Daunce(model, ClassificationTask(), cfg, progress=False)
    S = d.fit(train).attribute(train, query)
    assert S.shape == (len(train), len(query)) and torch.isfinite(S).all() and S.abs().sum() > 0
    assert d.trainer_used == "sequential"  # BatchNorm: neither the vmap nor the shared-input trainer
    # the scores are the covariance of the copies' recorded signals (training loss, query minus the margin)
    A, B = d.signals(train), d.signals(query)
    assert A.shape == (4, len(train)) and B.shape == (4, len(query))
    torch.testing.assert_close(S.double(), scores.covariance(A, B).double(), atol=1e-9, rtol=1e-5)
    # small perturbations, a few steps: each copy stays near theta0 (in eval mode, on its running statistics), so the
    # copies' mean signal follows theta0's own losses and negative margins (measured Pearson 0.9999 and 0.9997) while
    # the copies differ from one another
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss0 = torch.nn.functional.cross_entropy(model(train.tensors[0]), train.tensors[1], reduction="none")
        neg_margin0 = -margin(model(query.tensors[0]), query.tensors[1])
    model.train(was_training)
    for signals, ref in ((A, loss0), (B, neg_margin0)):
        assert torch.corrcoef(torch.stack([signals.mean(0).double(), ref.double()]))[0, 1] > 0.99
        assert (signals.std(0) > 0).all()
    after = model.state_dict()
    for k, v in before.items():  # theta0's weights and its BatchNorm statistics are untouched by the copies
        assert torch.equal(v, after[k]), k


def test_train_mode_copies_are_refused_with_batchnorm(toy_resnet):
    _, _, _, target = toy_resnet
    with pytest.raises(ValueError, match="BatchNorm"):
        Daunce(target["model"], ClassificationTask(), DaunceConfig(n_models=4, train_mode=True), progress=False)


@pytest.mark.parametrize("method", ["kronfluence-ekfac", "trak"])
def test_baselines_run_on_the_batchnorm_network(toy_resnet, method):
    """Both training-side functions run; six training examples appended to the queries are each among the top 3
    of their own column with a positive score (self-influence; measured: top 1 in 22 of 24 columns, never below
    3rd)."""
    s, train, query, target = toy_resnet
    (x, y), (xq, yq), n = train.tensors, query.tensors, len(query)
    queries = TensorDataset(torch.cat([xq, x[:6]]), torch.cat([yq, y[:6]]))
    out = {}
    for signal in ("loss", "margin"):
        S, _ = baselines.run(method, target["model"], train, queries, damping=1e-2, ensemble=target["ensemble"],
                             train_signal=signal)
        assert S.shape == (len(train), n + 6) and torch.isfinite(S).all() and S.abs().sum() > 0
        for i in range(6):
            own = S[i, n + i]
            assert own > 0 and (S[:, n + i] > own).sum() <= 2, (signal, i, own.item())
        out[signal] = S
    assert not torch.allclose(out["loss"], out["margin"])  # the training-side function reaches the library


def test_random_shift_moves_whole_images():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float).reshape(2, 1, 5, 5) + 1
    out = training.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):  # the non-zero part is a shifted window of the image
        nz = out[i, 0] != 0
        rows, cols = nz.any(1).nonzero().flatten(), nz.any(0).nonzero().flatten()
        window = out[i, 0][rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        h, w = window.shape
        hits = [(a, b) for a in range(6 - h) for b in range(6 - w) if torch.equal(x[i, 0, a:a + h, b:b + w], window)]
        assert hits, (i, window)


def test_theta0_is_saved_and_read_back_with_its_seconds(toy_resnet, tmp_path, monkeypatch):
    """A resumed run reads theta0, its checkpoints and its extra trained models back, with the seconds the cold run
    measured, and trains nothing; another setting gets another file."""
    s, train, _, _ = toy_resnet
    s = dataclasses.replace(s, n_ensemble=2, n_checkpoints=2)
    work = tmp_path / "runs"   # not there yet: made on the first save
    first = vision.train_target(s, train, workdir=work)
    assert not first["cached"] and len(list(work.glob("theta0_*.pt"))) == 1
    monkeypatch.setattr(vision, "fit", lambda *a, **k: pytest.fail("a cached theta0 was trained again"))
    again = vision.train_target(s, train, workdir=work)
    assert again["cached"] and again["seconds"] == first["seconds"]
    assert again["ensemble_seconds"] == first["ensemble_seconds"]
    for k, v in first["model"].state_dict().items():   # weights and BatchNorm buffers
        assert torch.equal(again["model"].state_dict()[k], v), k
    assert all(torch.equal(a[k], b[k]) for a, b in zip(again["ensemble"], first["ensemble"]) for k in a)
    assert [c["epoch"] for c in again["checkpoints"]] == [c["epoch"] for c in first["checkpoints"]]
    monkeypatch.undo()
    other = vision.train_target(dataclasses.replace(s, n_ensemble=1), train, workdir=work)
    assert not other["cached"] and len(list(work.glob("theta0_*.pt"))) == 2
