"""Daunce over several trained models (``daunce.ensemble``, ``copyruns.EnsembleJob``): the mean of the members'
single-model runs with the members' seeds, each member bound to its own theta0, and bad inputs refused by name."""

import pytest
import torch
from torch import nn

from daunce import ClassificationTask, Daunce, DaunceConfig, DaunceEnsemble, scores
from daunce.ensemble import member_config, member_seed
from daunce.experiments import copyruns, data, models, training

TASK = ClassificationTask()
FAST = dict(optimizer="sgd", lr=1.0, steps=60, damping=1e-2, subset_ratio=0.5, rho=0.3, isotropic_noise=True)


@pytest.fixture(scope="module")
def two_digits_lrs():
    """Two logistic regressions on 300 digits from different initialisations and minibatch orders (Adam, 5 epochs:
    not at the optimum, so their weights differ visibly); 30 queries."""
    train, query = data.digits(300, 30, seed=0)
    out = []
    for seed in (0, 1):
        model = models.seeded(models.logistic_regression, seed, 64, 10)
        out.append(training.train_classifier(model, train, epochs=5, batch_size=32, seed=seed, weight_decay=1e-2))
    return out, train, query


def _single(model, cfg, seed, train, query, workdir=None):
    d = Daunce(model, TASK, cfg.replace(n_models=cfg.n_models // 2, seed=seed), workdir, progress=False)
    return d.fit(train).attribute(train, query)


def test_ensemble_of_two_models_is_the_mean_of_the_two_single_model_runs(two_digits_lrs):
    (a, b), train, query = two_digits_lrs
    assert (a[1].weight - b[1].weight).abs().max() > 0.05  # two different theta0s
    cfg = DaunceConfig(n_models=8, seed=3, **FAST)
    ens = DaunceEnsemble([a, b], TASK, cfg, progress=False).fit(train)
    assert ens.n_members == 2 and ens.copies_per_model == 4
    assert [d.model for d in ens.members] == [a, b]
    assert [d.config.seed for d in ens.members] == [3, 4] == [member_seed(3, 0), member_seed(3, 1)]
    S = ens.attribute(train, query)
    Sa, Sb = _single(a, cfg, 3, train, query), _single(b, cfg, 4, train, query)
    assert S.shape == (300, 30) and S.dtype == torch.float32
    torch.testing.assert_close(S, (Sa + Sb) / 2, rtol=1e-6, atol=1e-9)
    # the members differ (else the mean would be trivial), and the mean is not the covariance of the pooled copies
    assert (Sa - Sb).abs().max() > 0.1 * Sa.abs().max()
    sig_train, sig_query = ens.signals(train), ens.signals(query)
    assert sig_train.shape == (2, 4, 300) and sig_query.shape == (2, 4, 30)
    P = scores.score(sig_train.reshape(8, 300), sig_query.reshape(8, 30), cfg.score).float()  # one covariance of all 8
    assert not torch.allclose(P, S, rtol=1e-3, atol=1e-6)
    assert ens.training_seconds() > 0 and ens.training_seconds(4) < ens.training_seconds()
    assert ens.base_signals(query).shape == (2, 30)


def test_members_keep_their_copies_in_their_own_folders_bound_to_their_model(two_digits_lrs, tmp_path):
    (a, b), train, query = two_digits_lrs
    cfg = DaunceConfig(n_models=4, **FAST)
    S = DaunceEnsemble([a, b], TASK, cfg, tmp_path / "ens", progress=False).fit(train).attribute(train, query)
    assert sorted(p.name for p in (tmp_path / "ens").iterdir()) == ["member_0", "member_1"]
    # member 1's folder holds the copies of a single-model run on b with seed 1
    torch.testing.assert_close(S * 2 - _single(a, cfg, 0, train, query), _single(b, cfg, 1, train, query),
                               rtol=1e-5, atol=1e-8)
    again = DaunceEnsemble([a, b], TASK, cfg, tmp_path / "ens", progress=False).fit(train)
    assert all(not d.trained_copies for d in again.members)  # read back, not trained
    torch.testing.assert_close(again.attribute(train, query), S)
    with pytest.raises(ValueError, match="member_0"):  # the models swapped: member 0's folder holds a's copies
        DaunceEnsemble([b, a], TASK, cfg, tmp_path / "ens", progress=False).fit(train)


def test_bad_ensembles_are_refused_naming_the_problem(two_digits_lrs):
    (a, b), _, _ = two_digits_lrs
    cfg = DaunceConfig(n_models=4, **FAST)
    with pytest.raises(ValueError, match="models is empty"):
        DaunceEnsemble([], TASK, cfg)
    with pytest.raises(TypeError, match=r"got one Sequential: for one model use Daunce"):
        DaunceEnsemble(a, TASK, cfg)
    with pytest.raises(TypeError, match=r"models\[1\] must be a torch.nn.Module, got str"):
        DaunceEnsemble([a, "b"], TASK, cfg)
    with pytest.raises(ValueError, match=r"n_models = 5 copies cannot be spread evenly over 2 models.*multiple of 2"):
        DaunceEnsemble([a, b], TASK, cfg.replace(n_models=5))
    with pytest.raises(ValueError, match=r"leaves 1 per model.*at least 6"):
        DaunceEnsemble([a, b, models.seeded(models.logistic_regression, 2, 64, 10)], TASK, cfg.replace(n_models=3))
    with pytest.raises(ValueError, match=r"models\[1\] has another architecture.*'1.weight' has shape \(10, 64\).*"
                                         r"'1.weight' has shape \(5, 64\)"):
        DaunceEnsemble([a, models.logistic_regression(64, 5)], TASK, cfg)
    with pytest.raises(ValueError, match=r"models\[1\] has another architecture.*module '2' is a Tanh"):
        relu_mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        DaunceEnsemble([models.mlp(64, 10), relu_mlp], TASK, cfg)
    with pytest.raises(ValueError, match=r"models\[0\] and models\[1\] are the same object"):
        DaunceEnsemble([a, a], TASK, cfg)
    twin = models.logistic_regression(64, 10)
    twin.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"models\[0\] and models\[1\] have the same weights"):
        DaunceEnsemble([a, twin], TASK, cfg)
    with pytest.raises(ValueError, match="member index 2"):
        member_config(cfg, 2, 2)


def test_ensemble_job_is_the_mean_of_member_jobs_records_n_models_and_reads_back(two_digits_lrs, tmp_path):
    (a, b), train, query = two_digits_lrs
    cfg = DaunceConfig(n_models=8, seed=5, **FAST)
    job = copyruns.EnsembleJob("ens", [a, b], cfg, tmp_path / "ens", train, query, stages=[4, 8])
    assert [m.stages for m in job.members] == [[2, 4], [2, 4]] and job.n_models == 2
    # the member jobs' stages (a stage's copies train as one block: the same stages give the same float rounding)
    singles = [copyruns.CopyJob(f"single{m}", mod, cfg.replace(n_models=4, seed=5 + m), tmp_path / f"single{m}",
                                train, query, stages=[2, 4]) for m, mod in enumerate((a, b))]
    runs = copyruns.run_jobs([job, *singles], workers=1)
    run = runs["ens"]
    assert isinstance(run, copyruns.EnsembleRun) and run.n_models == 2 and run.K == 8
    assert runs["single0"].n_models == 1
    for K in (4, 8):
        mean = (runs["single0"].score(K=K // 2) + runs["single1"].score(K=K // 2)) / 2
        torch.testing.assert_close(run.score("loss", "margin", K=K), mean, rtol=1e-5, atol=1e-8)
    assert run.seconds_for(8) > run.seconds_for(4) > 0
    assert run.resolved["rho"] == 0.3 and len(run.converged) == 8
    with pytest.raises(ValueError, match=r"K must be a multiple of the 2 models"):
        run.score(K=5)
    stamp = job.members[1].result_path.stat().st_mtime_ns
    again = copyruns.run_jobs([job], workers=1)["ens"]
    assert job.members[1].result_path.stat().st_mtime_ns == stamp  # read back, not trained again
    torch.testing.assert_close(again.score(), run.score())


def test_ensemble_job_validation(two_digits_lrs, tmp_path):
    (a, b), train, query = two_digits_lrs
    cfg = DaunceConfig(n_models=8, **FAST)
    with pytest.raises(ValueError, match=r"stages must be multiples of the 2 models.*\[5\]"):
        copyruns.EnsembleJob("e", [a, b], cfg, tmp_path, train, query, stages=[5, 8])
    with pytest.raises(ValueError, match=r"stages must lie in \[4, K\]"):
        copyruns.EnsembleJob("e", [a, b], cfg, tmp_path, train, query, stages=[2, 8])
    with pytest.raises(ValueError, match="cannot be spread evenly over 3 models"):
        copyruns.EnsembleJob("e", [a, b, models.seeded(models.logistic_regression, 2, 64, 10)], cfg, tmp_path,
                             train, query)
    job = copyruns.EnsembleJob("e", [a, b], cfg, tmp_path, train, query)
    clash = copyruns.CopyJob("e/member_0", a, cfg, tmp_path / "x", train, query)
    with pytest.raises(ValueError, match="e/member_0"):
        copyruns.run_jobs([job, clash])
