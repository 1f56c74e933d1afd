"""``exact.daunce_subset_limit``: the K -> infinity limit of copies that train on their own subsets, each with its own
curvature. Checked against the mean of many converged finite-K copies at r = 0.5 on a logistic regression whose
subsets' curvature is rank-deficient (30 examples x 2 free outputs < 123 parameters), where the full-data formula
``exact.daunce_limit`` measurably does not agree."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from daunce import ClassificationTask, Daunce, DaunceConfig, exact
from daunce.experiments import training

TASK = ClassificationTask()


@pytest.fixture(scope="module")
def wide_lr():
    g = torch.Generator().manual_seed(0)
    n, d_in, C = 60, 40, 3
    x, W = torch.randn(n, d_in, generator=g), torch.randn(d_in, C, generator=g)
    y = (x @ W + 0.5 * torch.randn(n, C, generator=g)).argmax(1)
    xq = torch.randn(20, d_in, generator=g)
    torch.manual_seed(0)
    model = training.train_classifier(nn.Linear(d_in, C), TensorDataset(x, y), epochs=3, optimizer="lbfgs",
                                      weight_decay=1e-2)
    return model, TensorDataset(x, y), TensorDataset(xq, (xq @ W).argmax(1))


def test_subset_limit_is_the_mean_of_converged_copies_where_the_full_data_formula_is_not(wide_lr):
    model, train, query = wide_lr
    cfg = DaunceConfig(n_models=1500, subset_ratio=0.5, rho=0.05, damping=0.05, isotropic_noise=True, tol=1e-3,
                       max_steps=2000, perturbation="orthogonal")
    d = Daunce(model, TASK, cfg, progress=False).fit(train, query)
    assert d.n_unconverged == 0
    S = d.attribute(train, query).double()
    sub, sem = exact.daunce_subset_limit(model, TASK, train, query, cfg, n_subsets=400, return_sem=True)
    full = exact.daunce_limit(model, TASK, train, query, cfg)
    assert float(sem.norm() / sub.norm()) < 0.06  # 400 subsets: the average is stable
    assert exact.pearson(S, sub) >= 0.97
    assert 0.9 < float(S.norm() / sub.norm()) < 1.1  # the same scale, not only the same direction
    assert exact.pearson(S, full) < 0.9  # the subsets' null space is missing from the full-data formula
    assert not 0.5 < float(S.norm() / full.norm()) < 2.0


def test_at_ratio_one_the_subset_limit_is_the_full_data_formula(wide_lr):
    model, train, query = wide_lr
    for variant in ("if", "efim"):
        cfg = DaunceConfig(variant=variant, n_models=2, subset_ratio=1.0, rho=0.3, damping=0.05, isotropic_noise=True)
        sub = exact.daunce_subset_limit(model, TASK, train, query, cfg, n_subsets=2)
        full = exact.daunce_limit(model, TASK, train, query, cfg)
        torch.testing.assert_close(sub, full, rtol=1e-6, atol=1e-9 * float(full.abs().max()))


def test_subset_limit_refuses_what_it_cannot_compute(wide_lr):
    model, train, query = wide_lr
    with pytest.raises(ValueError, match="bootstrap"):
        exact.daunce_subset_limit(model, TASK, train, query, DaunceConfig(variant="bootstrap", n_models=2))
    with pytest.raises(ValueError, match="gamma = 1"):
        exact.daunce_subset_limit(model, TASK, train, query, DaunceConfig(n_models=2, gamma=2.0, damping=0.1, rho=0.1))
    with pytest.raises(ValueError, match="n_subsets"):
        exact.daunce_subset_limit(model, TASK, train, query, DaunceConfig(n_models=2, damping=0.1, rho=0.1),
                                  n_subsets=1)
