"""``exact.daunce_limit`` and its engine ``exact.daunce_subset_limit``: the K -> infinity limit of copies that train
on their own subsets, each with its own curvature. Checked against the mean of many converged finite-K copies at
r = 0.5 on a logistic regression whose subsets' curvature is rank-deficient (30 examples x 2 free outputs < 123
parameters), where the full-data formula (``daunce_limit(..., subsets="full")``) measurably does not agree."""

import warnings

import pytest
import torch
from torch import nn

from daunce import ClassificationTask, Daunce, DaunceConfig, exact
from daunce.experiments import data, training

TASK = ClassificationTask()
# the copies of the expensive fit: subsets of half the data, the isotropic noise term on
COPIES = DaunceConfig(n_models=1500, subset_ratio=0.5, rho=0.05, damping=0.05, isotropic_noise=True, tol=1e-3,
                      max_steps=2000, perturbation="orthogonal")


@pytest.fixture(scope="module")
def wide_lr():
    train, query = data.synthetic_classification(60, 40, 3, 20, seed=0)
    torch.manual_seed(0)
    model = training.train_classifier(nn.Linear(40, 3), train, epochs=3, optimizer="lbfgs", weight_decay=1e-2)
    return model, train, query


@pytest.fixture(scope="module")
def converged_copies(wide_lr):
    """The mean score of 1,500 converged copies of ``COPIES`` (the expensive fit, shared by the tests)."""
    model, train, query = wide_lr
    d = Daunce(model, TASK, COPIES, progress=False).fit(train, query)
    assert d.n_unconverged == 0
    return d.attribute(train, query).double()


def test_subset_limit_is_the_mean_of_converged_copies_where_the_full_data_formula_is_not(wide_lr, converged_copies):
    model, train, query = wide_lr
    S = converged_copies
    sub, sem = exact.daunce_subset_limit(model, TASK, train, query, COPIES, n_subsets=400, return_sem=True)
    full = exact.daunce_limit(model, TASK, train, query, COPIES, subsets="full")
    assert float(sem.norm() / sub.norm()) < 0.06  # 400 subsets: the average is stable
    assert exact.pearson(S, sub) >= 0.97
    assert 0.9 < float(S.norm() / sub.norm()) < 1.1  # the same scale, not only the same direction
    assert exact.pearson(S, full) < 0.9  # the subsets' null space is missing from the full-data formula
    assert not 0.5 < float(S.norm() / full.norm()) < 2.0


def test_daunce_limit_is_by_default_the_subset_average_that_the_copies_converge_to(wide_lr, converged_copies):
    model, train, query = wide_lr
    S = converged_copies
    # about 0.93 / sqrt(subsets) here: rtol = 0.05 needs 512 subsets, beyond the default cap of 256
    auto, info = exact.daunce_limit(model, TASK, train, query, COPIES, rtol=0.05, max_subsets=512, return_info=True)
    assert info["formula"] == "subset-average" and info["rel_sem"] < 0.05
    sub = exact.daunce_subset_limit(model, TASK, train, query, COPIES, n_subsets=info["subsets"])
    torch.testing.assert_close(auto, sub, rtol=1e-12, atol=0)  # the same subsets, the same average
    assert exact.pearson(S, auto) >= 0.97
    assert 0.9 < float(S.norm() / auto.norm()) < 1.1
    full = exact.daunce_limit(model, TASK, train, query, COPIES, subsets="full")
    assert exact.pearson(S, full) < 0.9  # the old formula, still available, is not the copies' limit here


def test_auto_doubles_the_subsets_until_the_tolerance(wide_lr):
    model, train, query = wide_lr
    cfg = COPIES.replace(n_models=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stops by the tolerance, not by the cap
        _, info = exact.daunce_limit(model, TASK, train, query, cfg, rtol=0.1, return_info=True)
    used = info["subsets"]
    assert info["formula"] == "subset-average" and used in (16, 32, 64, 128) and info["rel_sem"] < 0.1
    if used > 16:  # and not earlier: half as many subsets (the same ones) were not enough
        _, half = exact.daunce_limit(model, TASK, train, query, cfg, subsets=used // 2, return_info=True)
        assert half["subsets"] == used // 2 and half["rel_sem"] >= 0.1
    with pytest.warns(RuntimeWarning, match="max_subsets"):
        _, capped = exact.daunce_limit(model, TASK, train, query, cfg, rtol=1e-3, max_subsets=32, return_info=True)
    assert capped["subsets"] == 32 and capped["rel_sem"] >= 1e-3


def test_at_ratio_one_the_subset_limit_is_the_full_data_formula(wide_lr):
    model, train, query = wide_lr
    for variant in ("if", "efim"):
        cfg = DaunceConfig(variant=variant, n_models=2, subset_ratio=1.0, rho=0.3, damping=0.05, isotropic_noise=True)
        sub = exact.daunce_subset_limit(model, TASK, train, query, cfg, n_subsets=2)
        full = exact.daunce_limit(model, TASK, train, query, cfg, subsets="full")
        torch.testing.assert_close(sub, full, rtol=1e-6, atol=1e-9 * float(full.abs().max()))
        auto, info = exact.daunce_limit(model, TASK, train, query, cfg, return_info=True)
        assert info == {"subsets": 0, "rel_sem": 0.0, "formula": "full-data"}
        torch.testing.assert_close(auto, full, rtol=0, atol=0)


def test_the_ways_of_computing_a_subset_agree(wide_lr):
    """Direct d x d solve, Woodbury with kernels computed once, Woodbury with kernels per subset; the softmax
    Gauss-Newton factors keep C - 1 = 2 of the 3 outputs' directions and rebuild ``exact.gauss_newton``."""
    model, train, query = wide_lr
    cfg = DaunceConfig(n_models=2, subset_ratio=0.5, rho=0.05, damping=1e-3, isotropic_noise=True)
    Gi = exact.per_example_grads(model, TASK, train)
    F = exact._curvature_factors(model, TASK, train, cfg, Gi)
    assert F.shape == (60, 2, 123)
    torch.testing.assert_close(torch.einsum("ipd,ipe->de", F, F) / 60, exact.gauss_newton(model, TASK, train))
    ways = []
    for route in ("direct", "kernel once", "kernel per subset"):
        scores = exact._subset_scores(model, TASK, train, query, cfg, train_grads=Gi, route=route)
        ways.append(torch.stack([next(scores) for _ in range(3)]))
    for other in ways[1:]:
        torch.testing.assert_close(other, ways[0], rtol=1e-8, atol=1e-10 * float(ways[0].abs().max()))


def test_subset_limit_refuses_what_it_cannot_compute(wide_lr):
    model, train, query = wide_lr
    with pytest.raises(ValueError, match="bootstrap"):
        exact.daunce_subset_limit(model, TASK, train, query, DaunceConfig(variant="bootstrap", n_models=2))
    with pytest.raises(ValueError, match="bootstrap"):
        exact.daunce_limit(model, TASK, train, query, DaunceConfig(variant="bootstrap", n_models=2))
    gamma2 = DaunceConfig(n_models=2, gamma=2.0, damping=0.1, rho=0.1)
    with pytest.raises(ValueError, match="gamma = 1"):
        exact.daunce_subset_limit(model, TASK, train, query, gamma2)
    with pytest.raises(ValueError, match="subsets='full'"):
        exact.daunce_limit(model, TASK, train, query, gamma2)
    assert exact.daunce_limit(model, TASK, train, query, gamma2, subsets="full").shape == (60, 20)
    with pytest.raises(ValueError, match="n_subsets"):
        exact.daunce_subset_limit(model, TASK, train, query, DaunceConfig(n_models=2, damping=0.1, rho=0.1),
                                  n_subsets=1)
    for bad in (1, True, "half"):
        with pytest.raises(ValueError, match="subsets must be"):
            exact.daunce_limit(model, TASK, train, query, DaunceConfig(n_models=2, damping=0.1, rho=0.1),
                               subsets=bad)
