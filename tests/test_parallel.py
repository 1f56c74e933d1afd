"""Every core (``daunce.parallel``): the worker count a fan-out uses, the fan-out itself, and results that do not
depend on the worker count (ground-truth retrains, sets of copies, removal retrains)."""

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

from daunce import DaunceConfig, llm, parallel
from daunce.experiments import copyruns, data, groundtruth, training


def _square_or_fail(x):
    if x == 3:
        raise ValueError("three is not allowed")
    return x * x


def _threads(_):
    return torch.get_num_threads()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_fork_map_returns_results_in_order_and_reports_each_finished_job(workers):
    seen = []
    out = parallel.fork_map(lambda x: (x, x * x), range(7), workers, on_result=lambda i, r: seen.append(i),
                            progress=False)
    assert out == [(x, x * x) for x in range(7)]
    assert sorted(seen) == list(range(7))


@pytest.mark.parametrize("workers", [1, 2])
def test_every_job_runs_single_threaded_and_the_caller_keeps_its_threads(workers):
    before = torch.get_num_threads()
    assert parallel.fork_map(_threads, range(3), workers, progress=False) == [1, 1, 1]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_is_named_after_the_others_finish(workers):
    done = []
    with pytest.raises(RuntimeError, match=r"1 of 5 jobs failed: job 3: ValueError: three is not allowed"):
        parallel.fork_map(_square_or_fail, range(5), workers, on_result=lambda i, r: done.append(i),
                          labels=[f"job {i}" for i in range(5)], progress=False)
    assert sorted(done) == [0, 1, 2, 4]   # the others finished and were handed over


def test_a_child_that_dies_is_reported():
    with pytest.raises(RuntimeError, match="child process died"):
        parallel.fork_map(lambda x: os._exit(3) if x == 1 else x, range(3), 2, progress=False)


def test_default_workers_takes_every_core_within_the_cap_and_the_memory(monkeypatch):
    monkeypatch.delenv(parallel.ENV_WORKERS, raising=False)
    monkeypatch.setattr(parallel, "available_cores", lambda: 16)
    assert parallel.default_workers() == 16 and parallel.torch_threads() == 16
    monkeypatch.setenv(parallel.ENV_WORKERS, "4")
    assert parallel.default_workers() == 4 and parallel.torch_threads() == 4
    monkeypatch.setenv(parallel.ENV_WORKERS, "64")   # a cap above the cores does not add cores
    assert parallel.default_workers() == 16
    monkeypatch.delenv(parallel.ENV_WORKERS)
    monkeypatch.setattr(parallel, "available_memory", lambda: 10 * 2**30)
    assert parallel.default_workers(memory_per_worker=3 * 2**30) == 3   # 10 GiB hold three 3-GiB workers
    assert parallel.default_workers(memory_per_worker=40 * 2**30) == 1  # never fewer than one
    assert parallel.default_workers(device="cuda") == 1                 # CUDA does not survive a fork
    assert parallel.describe(5) == {"cores": 16, "cap": None, "workers": 5, "torch_threads": torch.get_num_threads()}


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_a_bad_worker_cap_is_refused(monkeypatch, bad):
    monkeypatch.setenv(parallel.ENV_WORKERS, bad)
    with pytest.raises(ValueError, match="DAUNCE_WORKERS must be a whole number of workers >= 1"):
        parallel.default_workers()


def test_available_cores_is_this_process_affinity():
    assert parallel.available_cores() == len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def small_problem():
    train, query = data.synthetic_classification(60, 8, 3, 10, seed=1)
    torch.manual_seed(0)
    model = training.train_classifier(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)), train, epochs=3,
                                      optimizer="lbfgs", weight_decay=1e-2)
    return model, train, query


def _make(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(model, d, seed):
    return training.train_classifier(model, d, epochs=4, lr=0.05, batch_size=8, seed=seed)


def test_ground_truth_retrains_do_not_depend_on_the_worker_count(small_problem, tmp_path):
    _, train, query = small_problem
    torch.set_num_threads(2)   # the parent's threads must not leak into the jobs' arithmetic
    subsets = groundtruth.half_subsets(len(train), 5, seed=0)
    runs = {w: groundtruth.retrain_outputs(_make, _train, train, query, subsets, 2, workdir=tmp_path / f"w{w}",
                                           progress=False, workers=w) for w in (1, 2)}
    assert torch.equal(runs[1]["outputs"], runs[2]["outputs"])   # bit for bit
    assert runs[2]["trained"] == 10 and runs[2]["outputs"].shape == (5, 2, len(query))
    assert runs[2]["outputs"].std(dim=0).min() > 0   # the subsets give different models
    again = groundtruth.retrain_outputs(_make, _train, train, query, subsets, 2, workdir=tmp_path / "w2",
                                        progress=False, workers=2)
    assert again["trained"] == 0 and torch.equal(again["outputs"], runs[2]["outputs"])


def test_sets_of_copies_do_not_depend_on_the_worker_count(small_problem, tmp_path):
    model, train, query = small_problem
    cfg = DaunceConfig(n_models=6, damping=0.1, isotropic_noise=False)
    runs, configs = {}, (("if", cfg), ("efim", cfg.replace(variant="efim")), ("r3", cfg.replace(subset_ratio=0.3)))
    for w in (1, 2, 3):
        jobs = [copyruns.CopyJob(tag, model, c, tmp_path / f"w{w}" / tag, train, query) for tag, c in configs]
        runs[w] = copyruns.run_jobs(jobs, workers=w)
    for tag in ("if", "efim", "r3"):
        for sig in copyruns.SIGNALS:
            assert torch.equal(runs[1][tag].train[sig], runs[2][tag].train[sig])
            assert torch.equal(runs[1][tag].query[sig], runs[3][tag].query[sig])


def test_removal_retrains_do_not_depend_on_the_worker_count(tmp_path):
    from daunce.experiments import removal as rm

    model, tok = llm.tiny_llama(seed=0, num_layers=1)
    pm = llm.add_lora(copy.deepcopy(model), r=2, alpha=4, seed=0)
    init = llm.trainable_state(pm)
    examples = [{"prompt": f"Say {w}.", "response": f"{w} {w}."} for w in ("one", "two", "three", "four", "five")]
    train, query = llm.TextDataset(tok, examples, 64), llm.TextDataset(tok, examples[:2], 64)
    d = {"s": dict(train=train, query=query)}
    recipe = dict(epochs=1, lr=1e-2, batch_size=2)
    base = {"s": {s: llm.response_nll(pm, None, query, 4) for s in (0, 1)}}
    scores = {"s": {"first": rm.constant_scores(torch.arange(5.0, 0, -1), 2)}}
    out = {w: rm.run_removals(pm, init, d, scores, ["first", "random"], {"s": [2]}, [0, 1], recipe, base,
                              path=tmp_path / f"w{w}.json", batch=4, workers=w) for w in (1, 2)}
    assert out[1].n_new == out[2].n_new == 4
    for m in ("first", "random"):
        assert np.array_equal(out[1].table("s", m, 2, [0, 1]), out[2].table("s", m, 2, [0, 1]))
    assert out[2]["s|first|2|0"]["removed"] == [0, 1]


def test_once_cuda_is_initialised_every_job_runs_in_this_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)   # a CUDA context does not survive a fork
    assert parallel.fork_map(lambda _: os.getpid(), range(3), 2, progress=False) == [os.getpid()] * 3
