"""``exact.daunce_limit(..., train_readout=...)``: the K -> infinity limit of copies whose training side is read with
another signal than the loss their perturbation weighs (notebook 02's ``daunce-best`` may record minus the margin).
Checked against the closed form computed here by hand, and the three routes of the subset engine against each other
with the noise term on (the kernel routes compute its read-out term differently from the direct one)."""

import pytest
import torch
from torch import nn

from daunce import ClassificationTask, DaunceConfig, exact
from daunce.exact import _subset_scores
from daunce.experiments import data, training

TASK = ClassificationTask()


@pytest.fixture(scope="module")
def lr_grads():
    train, query = data.synthetic_classification(40, 8, 3, 12, seed=1)
    torch.manual_seed(0)
    model = training.train_classifier(nn.Linear(8, 3), train, epochs=3, optimizer="lbfgs", weight_decay=1e-2)
    Gi = exact.per_example_grads(model, TASK, train)
    Gm = exact.per_example_grads(model, ClassificationTask("margin"), train, fn="signal")  # minus the margin
    Gq = exact.per_example_grads(model, ClassificationTask("margin"), query, fn="signal")
    return model, train, query, Gi, Gm, Gq


def test_full_data_limit_reads_the_training_side_with_the_readout(lr_grads):
    model, train, query, Gi, Gm, Gq = lr_grads
    cfg = DaunceConfig(variant="efim", subset_ratio=1.0, rho=0.3, damping=0.1, isotropic_noise=True)
    got = exact.daunce_limit(model, TASK, train, query, cfg, train_grads=Gi, query_grads=Gq, train_readout=Gm)
    n, d = Gi.shape
    G = Gi.T @ Gi / n
    A = 2 * cfg.gamma * G + cfg.damping * torch.eye(d, dtype=G.dtype)
    C = cfg.sigma2 / n * G + cfg.sigma2 * cfg.damping / (2 * cfg.gamma * n) * torch.eye(d, dtype=G.dtype)
    want = torch.linalg.solve(A, Gm.T).T @ C @ torch.linalg.solve(A, Gq.T)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-12)
    loss_side = exact.daunce_limit(model, TASK, train, query, cfg, train_grads=Gi, query_grads=Gq)
    assert torch.allclose(exact.daunce_limit(model, TASK, train, query, cfg, train_grads=Gi, query_grads=Gq,
                                             train_readout=Gi), loss_side)
    assert exact.pearson(got, loss_side) < 0.99  # the margin's read-out is another matrix than the loss's


@pytest.mark.parametrize("variant", ["if", "efim"])
def test_subset_routes_agree_with_a_readout(lr_grads, variant):
    model, train, query, Gi, Gm, Gq = lr_grads
    cfg = DaunceConfig(variant=variant, subset_ratio=0.5, rho=0.3, damping=0.05, isotropic_noise=True)
    first = {route: next(_subset_scores(model, TASK, train, query, cfg, train_grads=Gi, query_grads=Gq,
                                        route=route, train_readout=Gm))
             for route in ("direct", "kernel once", "kernel per subset")}
    for route in ("kernel once", "kernel per subset"):
        assert torch.allclose(first[route], first["direct"], rtol=1e-6, atol=1e-10), route
    plain = next(_subset_scores(model, TASK, train, query, cfg, train_grads=Gi, query_grads=Gq, route="direct"))
    assert not torch.allclose(first["direct"], plain)


def test_a_readout_of_the_wrong_shape_is_refused(lr_grads):
    model, train, query, Gi, Gm, Gq = lr_grads
    cfg = DaunceConfig(variant="efim", subset_ratio=1.0, rho=0.3, damping=0.1)
    with pytest.raises(ValueError, match=r"train_readout must be a finite \(40, 27\) matrix"):
        exact.daunce_limit(model, TASK, train, query, cfg, train_grads=Gi, query_grads=Gq, train_readout=Gm[:5])
