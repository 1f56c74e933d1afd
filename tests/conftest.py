import os

import pytest
import torch

# Two cores on the target machines: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits_lr():
    """A logistic regression trained (with L-BFGS, to its optimum) on 300 digits; 30 queries."""
    from daunce.experiments import data, models, training

    train, query = data.digits(300, 30, seed=0)
    model = models.seeded(models.logistic_regression, 0, 64, 10)
    training.train_classifier(model, train, epochs=10, optimizer="lbfgs", weight_decay=1e-2)
    return model, train, query
