import os

import pytest
import torch

# `make test` runs the tests in one process per core (pytest-xdist): each process then keeps to one thread, and the
# notebooks its smoke runs start fan out over one worker (DAUNCE_WORKERS, read by daunce.parallel), so the processes
# together use every core without oversubscribing them. A plain `pytest` (one process) uses up to two threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("DAUNCE_WORKERS", "1")
    # and so does every process a test starts (notebook kernels, scripts, Ray's workers): torch and its BLAS read
    # these when they load. A child at the default of one thread per core beside the other test processes
    # oversubscribes the cores (a two-minute subprocess test took ten minutes under `make test`).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
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


# The notebook smoke runs are the longest tests by far (notebook 02's about 6 minutes on one core, 01's about 3): under
# pytest-xdist they start first, one per worker (`make test` passes --maxschedchunk 1, so each worker holds two tests at
# a time), and the short tests fill the other workers meanwhile; the order of the other tests is kept.
_LONGEST_FIRST = ("02_vision_lds", "01_theory", "03_llm_subset_removal", "04_blackbox_backdoor")


def pytest_collection_modifyitems(config, items):
    smoke = {i.callspec.params["notebook"].stem: i for i in items
             if i.originalname == "test_notebook_smoke_run" and hasattr(i, "callspec")}
    longest = [smoke[s] for s in _LONGEST_FIRST if s in smoke]
    if not longest:
        return
    rest = [i for i in items if i not in longest]
    ordered = []
    for j, item in enumerate(longest):   # long, short, long, short, ...: each worker's first pair holds one long test
        ordered.append(item)
        if j < len(rest):
            ordered.append(rest[j])
    items[:] = ordered + rest[len(longest):]
