"""The paper's regime at toy size (notebook 02's "resnet" model, smoke profile): a BatchNorm ResNet trained from
scratch by SGD, two ground-truth retrains, and Daunce, kronfluence and TRAK on it."""

import dataclasses

import pytest
import torch

from daunce import ClassificationTask, Daunce, DaunceConfig
from daunce.experiments import baselines, training, vision


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
    after = model.state_dict()
    for k, v in before.items():  # theta0's weights and its BatchNorm statistics are untouched by the copies
        assert torch.equal(v, after[k]), k


def test_train_mode_copies_are_refused_with_batchnorm(toy_resnet):
    _, _, _, target = toy_resnet
    with pytest.raises(ValueError, match="BatchNorm"):
        Daunce(target["model"], ClassificationTask(), DaunceConfig(n_models=4, train_mode=True), progress=False)


@pytest.mark.parametrize("method", ["kronfluence-ekfac", "trak"])
def test_baselines_run_on_the_batchnorm_network(toy_resnet, method):
    s, train, query, target = toy_resnet
    for signal in ("loss", "margin"):
        S, _ = baselines.run(method, target["model"], train, query, damping=1e-2, ensemble=target["ensemble"],
                             train_signal=signal)
        assert S.shape == (len(train), len(query)) and torch.isfinite(S).all() and S.abs().sum() > 0


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
