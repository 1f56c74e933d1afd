"""Baseline wrappers (dattri, kronfluence): scores with Daunce's sign convention on a planted case."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from daunce.experiments import baselines


@pytest.mark.parametrize("method", ["if-cg", "if-ekfac", "datainf", "trak", "grad-dot", "tracin", "kronfluence-ekfac"])
def test_planted_duplicate_is_helpful(digits_lr, method):
    """A query that duplicates a training example: that example must get a high positive score."""
    model, train, _ = digits_lr
    x, y = train.tensors
    planted = torch.arange(0, 300, 30)[:8]
    query = TensorDataset(x[planted], y[planted])
    S, _ = baselines.run(method, model, train, query, regularization=1e-2, damping=1e-2,
                         checkpoints=[{"state": model.state_dict(), "lr": 1.0}])
    assert S.shape == (len(train), len(planted))
    self_scores = S[planted, torch.arange(len(planted))]
    assert (self_scores > 0).all(), self_scores
    # the duplicate ranks in the top 5% of its query's scores, on average
    ranks = [(S[:, j] > S[p, j]).float().mean().item() for j, p in enumerate(planted)]
    assert np.mean(ranks) < 0.05, ranks
