"""The LDS metric, the ground truth and the dattri adapter."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from daunce import DaunceConfig, metrics
from daunce.experiments import groundtruth, models, training


def test_lds_hand_computed():
    # 3 training examples, subsets {0,1}, {1,2}, {0,2}; scores 1, 2, 3 predict g = 3, 5, 4
    scores = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    subsets = torch.tensor([[True, True, False], [False, True, True], [True, False, True]])
    gt = torch.tensor([[10.0, 30.0], [30.0, 10.0], [20.0, 20.0]])  # query 0 agrees in rank, query 1 reverses
    assert np.allclose(metrics.predicted_outputs(scores, subsets)[:, 0], [3, 5, 4])
    res = metrics.lds(scores, gt, subsets)
    assert np.allclose(res.per_query, [1.0, -1.0])
    assert res.mean == pytest.approx(0.0)
    # index subsets give the same answer; a flipped sign flips the LDS
    idx = torch.tensor([[0, 1], [1, 2], [0, 2]])
    assert np.allclose(metrics.lds(scores, gt, idx).per_query, [1.0, -1.0])
    assert np.allclose(metrics.lds(-scores, gt, subsets).per_query, [-1.0, 1.0])


def test_lds_matches_scipy_and_dattri_on_random_data():
    from dattri.metric import lds as dattri_lds

    g = torch.Generator().manual_seed(0)
    n, Q, M = 40, 7, 15
    scores = torch.randn(n, Q, generator=g)
    subsets = groundtruth.half_subsets(n, M, seed=1)
    gt = torch.randn(M, 3, Q, generator=g, dtype=torch.float64)  # 3 seeds, averaged
    res = metrics.lds(scores, gt, subsets)
    pred = subsets.double() @ scores.double()
    ref = [spearmanr(pred[:, q], gt.mean(1)[:, q]).correlation for q in range(Q)]
    assert np.allclose(res.per_query, ref)
    idx = torch.stack([s.nonzero().squeeze(1) for s in subsets])
    d, _ = dattri_lds(scores.double(), (gt.mean(1), idx))
    assert np.allclose(res.per_query, d.numpy())
    assert res.lo <= res.mean <= res.hi


def test_noise_ceiling_and_constant_queries():
    gt = torch.randn(20, 1, 4).repeat(1, 2, 1)  # two identical seeds
    assert metrics.noise_ceiling(gt)["between_seeds"] == pytest.approx(1.0)
    # a constant prediction counts as 0, not NaN
    res = metrics.lds(torch.zeros(10, 4), gt, groundtruth.half_subsets(10, 20))
    assert np.all(res.per_query == 0)


def test_ground_truth_is_cached_and_resumable(tmp_path, digits_lr):
    _, train, query = digits_lr
    subsets = groundtruth.half_subsets(len(train), 4, seed=0)
    calls = []

    def make(seed):
        return models.seeded(models.logistic_regression, seed, 64, 10)

    def fit(model, data, seed):
        calls.append(seed)
        return training.train_classifier(model, data, epochs=3, optimizer="lbfgs", weight_decay=1e-2)

    # one worker: `calls` is seen only by retrains in this process (forked workers would append to their own copy)
    a = groundtruth.retrain_outputs(make, fit, train, query, subsets, 1, workdir=tmp_path, progress=False, workers=1)
    b = groundtruth.retrain_outputs(make, fit, train, query, subsets, 1, workdir=tmp_path, progress=False, workers=1)
    assert len(calls) == 4 and a["trained"] == 4 and b["trained"] == 0
    assert torch.equal(a["outputs"], b["outputs"]) and a["outputs"].shape == (4, 1, len(query))


@pytest.fixture(scope="module")
def digits_gt(digits_lr):
    """20 half-subset retrains of the digits logistic regression (L-BFGS, to the optimum)."""
    model, train, query = digits_lr
    subsets = groundtruth.half_subsets(len(train), 20, seed=0)

    def make(seed):
        return models.seeded(models.logistic_regression, seed, 64, 10)

    def fit(m, d, s):
        return training.train_classifier(m, d, epochs=5, optimizer="lbfgs", weight_decay=1e-2)

    return groundtruth.retrain_outputs(make, fit, train, query, subsets, 1, progress=False)


def test_dattri_adapter_inside_dattri_lds(digits_lr, digits_gt):
    """Daunce behind dattri's contract, scored by dattri's own LDS: clearly positive, and equal to ours."""
    from dattri.metric import lds as dattri_lds
    from torch.utils.data import DataLoader

    from daunce.dattri_adapter import DaunceAttributor

    model, train, query = digits_lr
    cfg = DaunceConfig(n_models=64, rho=0.1, damping=1e-2, steps=50, lr=1e-2, perturbation="orthogonal")
    att = DaunceAttributor(model, config=cfg, progress=False)
    train_loader = DataLoader(train, batch_size=64, shuffle=False)
    att.cache(train_loader)
    S = att.attribute(train_loader, DataLoader(query, batch_size=64, shuffle=False))
    assert S.shape == (len(train), len(query))
    idx = torch.stack([s.nonzero().squeeze(1) for s in digits_gt["subsets"]])
    corr, _ = dattri_lds(S, (digits_gt["outputs"].mean(1).float(), idx))
    ours = metrics.lds(S, digits_gt["outputs"], digits_gt["subsets"])
    assert np.allclose(corr.numpy(), ours.per_query, atol=1e-5)
    assert ours.mean > 0.2, ours
    # negated scores must score negatively: the sign convention is right
    assert metrics.lds(-S, digits_gt["outputs"], digits_gt["subsets"]).mean < -0.2


def test_paired_verdict_needs_an_interval_that_excludes_zero():
    """Overlapping methods are tied, a consistent per-query lead is ahead, and pairing matters: two
    methods whose own intervals overlap can still be told apart when one is higher on every query."""
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.2, size=100)  # queries differ a lot in difficulty
    noise = rng.normal(0.0, 0.05, size=100)
    tied = metrics.paired_difference(base + noise, base - noise)
    assert tied["verdict"] == "tied" and tied["lo"] < 0 < tied["hi"]
    ahead = metrics.paired_difference(base + 0.02, base)  # higher on every query by 0.02
    assert ahead["verdict"] == "ahead" and ahead["lo"] > 0
    # unpaired, the two means' own intervals overlap
    lo_a, hi_a = metrics.bootstrap_ci(base + 0.02)
    lo_b, hi_b = metrics.bootstrap_ci(base)
    assert lo_a < hi_b
    assert metrics.paired_difference(base, base + 0.02)["verdict"] == "behind"
    assert metrics.verdict(-0.1, 0.2) == "tied"


def test_nested_interval_counts_the_seeds_spread():
    """A lead that holds on every query of every seed is ahead either way; a lead that one seed's queries show
    and the other seeds contradict is ahead on the pooled queries yet tied once the seeds are resampled."""
    rng = np.random.default_rng(1)
    base = rng.normal(0.0, 0.01, size=(5, 30))
    steady = metrics.paired_difference(base + 0.01, base, nested=True)
    assert steady["verdict"] == "ahead" and np.allclose(steady["per_seed"], 0.01)
    seed_effect = np.array([0.03, -0.01, 0.002, -0.008, 0.006])[:, None]   # mean +0.004, spread 0.04
    a = base + seed_effect + rng.normal(0.0, 0.002, size=(5, 30))
    pooled = metrics.paired_difference(a.mean(0), base.mean(0))   # seeds averaged, queries resampled
    nested = metrics.paired_difference(a, base, nested=True)
    assert pooled["verdict"] == "ahead"
    assert nested["verdict"] == "tied" and nested["lo"] < 0 < nested["hi"]
    assert nested["hi"] - nested["lo"] > 3 * (pooled["hi"] - pooled["lo"])
    # one seed: the nested interval is the queries' own
    one = metrics.nested_bootstrap_ci(base[:1])
    assert np.allclose(one, metrics.bootstrap_ci(base[0]), atol=2e-3)
    with pytest.raises(ValueError):
        metrics.nested_bootstrap_ci(base[0])
