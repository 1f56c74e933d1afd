import os

import pytest
import torch

# `make test` runs the tests in one process per core (pytest-xdist): each process then keeps to one thread, and the
# notebooks its smoke runs start fan out over one worker (DAUNCE_WORKERS, read by daunce.parallel), so the processes
# together use every core without oversubscribing them. A plain `pytest` (one process) uses up to two threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("DAUNCE_WORKERS", "1")
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits_lr():
    """A logistic regression trained (with L-BFGS, to its optimum) on 300 digits; 30 queries."""
    from daunce.experiments import data, models, training

    train, query = data.digits(300, 30, seed=0)
    model = models.seeded(models.logistic_regression, 0, 64, 10)
    training.train_classifier(model, train, epochs=10, optimizer="lbfgs", weight_decay=1e-2)
    return model, train, query
