"""Copy plans: deterministic in (seed, k), and held in O(m) memory whatever the number of steps."""

import subprocess
import sys
import textwrap

import pytest
import torch

from daunce import DaunceConfig
from daunce.plans import make_plan


def _plan(k=0, **kw):
    kw = {"rho": 0.3, "damping": 1e-2, "isotropic_noise": True, **kw}
    return make_plan(DaunceConfig(**kw), k, 50, 7, lambda flat: [flat])


def test_a_plan_needs_a_resolved_configuration():
    with pytest.raises(ValueError, match="auto"):
        make_plan(DaunceConfig(damping="auto", rho=0.3, isotropic_noise=True), 0, 50, 7, lambda flat: [flat])


def _bytes(plan) -> int:
    """Bytes of every tensor the plan holds (its batch order included)."""
    tensors = [plan.subset, plan.eps, plan.batches.subset, plan.batches.state, *(plan.eta or [])]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_batch_order_is_an_epoch_by_epoch_shuffle_of_the_subset():
    p = _plan(batch_size=8, epochs=3)
    batches = list(p.batches)
    assert len(batches) == len(p.batches) == 3 * 4  # 25 examples in batches of 8: 8, 8, 8, 1
    assert [len(b) for b in batches[:4]] == [8, 8, 8, 1]
    for e in range(3):
        epoch = torch.cat(batches[4 * e : 4 * e + 4])
        assert torch.equal(epoch.sort().values, p.subset.sort().values)
    assert not torch.equal(torch.cat(batches[:4]), torch.cat(batches[4:8]))  # reshuffled every epoch
    again = list(p.batches)  # iterating twice gives the same order
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert all(torch.equal(a, b) for a, b in zip(batches, _plan(batch_size=8, epochs=3).batches))


def test_a_plan_does_not_grow_with_the_number_of_steps():
    small, large = _plan(steps=200), _plan(steps=20_000)
    assert _bytes(small) == _bytes(large) < 10_000
    # the steps still draw from the same stream: the first 200 steps agree
    assert all(torch.equal(a, b) for a, b in zip(small.batches, large.batches))
    # the perturbations come after the order's draws, as they always did, so they depend on the steps
    assert not torch.equal(small.eps, large.eps)


@pytest.mark.slow
def test_fit_memory_does_not_grow_with_the_number_of_steps():
    """Peak resident memory of a fit of 32 copies with 600 full-batch steps each stays within a few MB of
    one with 20 steps (plans that stored every step's indices took about 1.7 KB per copy per step, here
    about 33 MB)."""
    script = textwrap.dedent("""
        import resource, sys, torch
        torch.set_num_threads(1)
        from torch.utils.data import TensorDataset
        from daunce import ClassificationTask, Daunce, DaunceConfig
        torch.manual_seed(0)
        train = TensorDataset(torch.randn(60, 5), torch.randint(0, 3, (60,)))
        model = torch.nn.Linear(5, 3)
        cfg = DaunceConfig(n_models=32, steps=int(sys.argv[1]), optimizer="sgd", lr=0.1, subset_ratio=1.0,
                           rho=0.3, damping=1e-2, isotropic_noise=False)   # explicit: the "auto" proxies are not tested
        Daunce(model, ClassificationTask(), cfg, progress=False, trainer="vmap").fit(train)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    rss = {}
    for steps in (20, 600):
        out = subprocess.run([sys.executable, "-c", script, str(steps)], capture_output=True, text=True,
                             timeout=600, check=True)
        rss[steps] = int(out.stdout.split()[-1]) / 1024  # MiB (ru_maxrss is in KiB on Linux)
    assert rss[600] - rss[20] < 10, rss
