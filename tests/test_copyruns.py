"""Sets of copies trained side by side (``daunce.experiments.copyruns``), the tuning rule's grid extension
(``daunce.experiments.tuning``) and the linear-response convergence check (``diagnostics.linear_response``)."""

import pytest
import torch
from torch import nn

from daunce import DaunceConfig
from daunce.experiments import copyruns, data, diagnostics, training, tuning


@pytest.fixture(scope="module")
def small_lr():
    train, query = data.synthetic_classification(80, 12, 3, 10, seed=0)
    torch.manual_seed(0)
    model = training.train_classifier(nn.Sequential(nn.Linear(12, 3)), train, epochs=3, optimizer="lbfgs",
                                      weight_decay=1e-2)
    return model, train, query


def _job(tag, model, train, query, tmp, cfg, **kw):
    return copyruns.CopyJob(tag, model, cfg, tmp / tag, train, query, orthogonal_block=16, **kw)


def test_two_workers_give_the_copies_of_one_and_a_rerun_reads_them_back(small_lr, tmp_path):
    model, train, query = small_lr
    cfg = DaunceConfig(n_models=8, damping=0.1, isotropic_noise=False, perturbation="orthogonal")
    jobs = [_job("a", model, train, query, tmp_path / "two", cfg, stages=[4, 8]),
            _job("b", model, train, query, tmp_path / "two", cfg.replace(variant="efim"), signal="margin")]
    two = copyruns.run_jobs(jobs, workers=2)
    one = copyruns.run_jobs([_job(j.tag, model, train, query, tmp_path / "one", j.config, signal=j.signal)
                             for j in jobs], workers=1)
    for tag in ("a", "b"):
        assert two[tag].K == 8 and two[tag].all_converged
        for sig in copyruns.SIGNALS:
            torch.testing.assert_close(two[tag].train[sig], one[tag].train[sig], rtol=1e-5, atol=1e-7)
            assert two[tag].query[sig].shape == (8, len(query))
        assert two[tag].seconds_for(8) >= two[tag].seconds_for(4) > 0
    # the recorded signal of a margin job is minus the margin; its "loss" is the cross-entropy
    assert not torch.allclose(two["b"].train["loss"], two["b"].train["margin"])
    stamp = jobs[0].result_path.stat().st_mtime_ns
    again = copyruns.run_jobs(jobs, workers=2)
    assert jobs[0].result_path.stat().st_mtime_ns == stamp  # read back, not trained again
    torch.testing.assert_close(again["a"].train["loss"], two["a"].train["loss"])
    assert again["a"].seconds == two["a"].seconds


def test_a_set_whose_copies_fail_the_stopping_test_stops_at_that_stage(small_lr, tmp_path):
    model, train, query = small_lr
    cfg = DaunceConfig(n_models=16, damping=1e-3, isotropic_noise=False, max_steps=2, tol=1e-6)
    run = copyruns.run_jobs([_job("c", model, train, query, tmp_path, cfg, stages=[4, 8, 16], stop_unconverged=True)],
                            workers=1)["c"]
    assert run.stopped_at == 4 and run.K == 4 and run.all_converged is False
    assert run.steps_per_copy()["max"] == 2


def test_a_first_round_grows_into_the_full_set_in_the_same_folder(small_lr, tmp_path):
    """Successive halving: a first round of 4 copies in the full set's folder, then the full set, gives the copies of
    the full set trained at once (copy k does not depend on K) and trains only the copies the first round lacked."""
    model, train, query = small_lr
    cfg = DaunceConfig(n_models=8, damping=0.1, isotropic_noise=False, perturbation="orthogonal")
    first = copyruns.run_jobs([_job("r", model, train, query, tmp_path, cfg.replace(n_models=4), straggler_k=8)],
                              workers=1)["r"]
    full = copyruns.run_jobs([_job("r", model, train, query, tmp_path, cfg, stages=[4, 8])], workers=1)["r"]
    once = copyruns.run_jobs([_job("r", model, train, query, tmp_path / "once", cfg)], workers=1)["r"]
    torch.testing.assert_close(full.train["loss"], once.train["loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(full.train["loss"][:4], first.train["loss"])
    assert full.seconds[:4] == first.seconds  # the first round's copies read back, not trained again


def test_straggler_allowance_of_a_first_round(small_lr, tmp_path):
    """A first round stops on the allowance of the K it is ranked for, not its own: 4 copies at the step cap stop a
    set of 4 (allowance 0) and not a first round for K = 200 (allowance 6)."""
    model, train, query = small_lr
    cfg = DaunceConfig(n_models=4, damping=1e-3, isotropic_noise=False, max_steps=2, tol=1e-6)
    own = copyruns.run_jobs([_job("own", model, train, query, tmp_path, cfg, stop_unconverged=True)], workers=1)["own"]
    big = copyruns.run_jobs([_job("big", model, train, query, tmp_path, cfg, stop_unconverged=True, straggler_k=200)],
                            workers=1)["big"]
    assert own.stopped_at == 4 and len(own.stragglers) == 4
    assert big.stopped_at is None and len(big.stragglers) == 4 and copyruns.allowed_stragglers(200) == 6
    with pytest.raises(ValueError, match="straggler_k"):
        _job("x", model, train, query, tmp_path, cfg, straggler_k=2)


def test_job_validation(small_lr, tmp_path):
    model, train, query = small_lr
    with pytest.raises(ValueError, match="stages"):
        _job("x", model, train, query, tmp_path, DaunceConfig(n_models=8), stages=[4, 16])
    with pytest.raises(ValueError, match="signal"):
        _job("x", model, train, query, tmp_path, DaunceConfig(n_models=8), signal="prob")
    j = _job("x", model, train, query, tmp_path, DaunceConfig(n_models=8))
    with pytest.raises(ValueError, match="unique"):
        copyruns.run_jobs([j, j])


def test_grid_extension_goes_past_an_end_and_stops_inside_or_at_a_failure():
    grid = [1e-4, 1e-3, 1e-2]
    assert tuning.extension(grid, 1e-3, grid) is None
    assert tuning.extension(grid, 1e-4, grid) == pytest.approx(1e-5)
    assert tuning.extension(grid, 1e-2, grid) == pytest.approx(1e-1)
    tried = [1e-7, 1e-6, 1e-5, *grid]  # three extensions below: the limit
    assert tuning.extension(tried, 1e-7, grid) is None
    st = tuning.grid_status(tried, 1e-7, grid)
    assert not st["interior"] and "limit" in st["why"] and len(st["extended"]) == 3
    # the value past the chosen one failed (e.g. copies that did not converge): the search ends, and says why
    st = tuning.grid_status([1e-5, *grid], 1e-4, grid, failed={1e-5: "did not converge"})
    assert not st["interior"] and "did not converge" in st["why"]
    assert tuning.grid_status(grid, 1e-3, grid)["interior"]
    assert tuning.extension([1e-2], 1e-2, [1e-2]) is None   # one value: no end to step past, and the record says so
    assert tuning.grid_status([1e-2], 1e-2, [1e-2])["why"] == ("the only value tried: a grid of one value is "
                                                               "not extended")
    rows = [dict(d=1, s=0.2, ok=True), dict(d=2, s=0.5, ok=False), dict(d=3, s=None, ok=True),
            dict(d=4, s=0.3, ok=True)]
    assert tuning.choose(rows, key="s", eligible=lambda r: r["ok"])["d"] == 4
    assert tuning.choose(rows, key="s")["d"] == 2


def test_linear_response_is_one_for_converged_copies_and_lower_for_copies_stopped_early(small_lr):
    from daunce.experiments.vision import make_daunce

    model, train, query = small_lr
    for variant in ("if", "efim"):
        done = DaunceConfig(variant=variant, n_models=2, rho=0.05, damping=0.05, isotropic_noise=True, tol=1e-4,
                            max_steps=3000)
        d = make_daunce(model, done).fit(train)
        r_done = [c["linear_response_r"] for c in diagnostics.linear_response(d, train)]
        early = make_daunce(model, done.replace(steps=2, optimizer="sgd", lr=0.05)).fit(train)
        r_early = [c["linear_response_r"] for c in diagnostics.linear_response(early, train)]
        assert min(r_done) > 0.99, (variant, r_done)
        assert max(r_early) < min(r_done) - 0.01, (variant, r_early, r_done)


def test_a_set_whose_copies_diverge_ends_with_the_reason_and_no_covariance(small_lr, tmp_path):
    """A learning rate far above 2 / curvature: the first copy's objective is not finite. The set ends with no copies
    (a covariance needs two), says why, and counts as not converged; the pass itself does not fail."""
    model, train, query = small_lr
    cfg = DaunceConfig(n_models=4, variant="efim", rho=1.0, damping=0.0, isotropic_noise=False, optimizer="sgd",
                       momentum=0.9, lr=1e6, steps=50, perturbation="iid")
    run = copyruns.run_jobs([_job("blowup", model, train, query, tmp_path, cfg)], workers=1)["blowup"]
    assert run.K == 0 and "not finite" in run.diverged and run.all_converged is False
    assert run.train["loss"].shape == (0, len(train)) and run.query["margin"].shape == (0, len(query))


def test_a_set_is_eligible_when_at_least_the_stated_share_of_its_copies_converged():
    def run(flags, **kw):
        n = len(flags)
        return copyruns.CopyRun("t", n, {}, {}, [0.0] * n, [1] * n, list(flags), {}, "vmap", **kw)

    assert copyruns.MIN_CONVERGED == 0.97
    assert [copyruns.allowed_stragglers(K) for K in (16, 64, 128, 512)] == [0, 1, 3, 15]
    for K in range(2, 257):   # the count a stage check allows is exactly what eligibility allows
        a = copyruns.allowed_stragglers(K)
        assert run([True] * (K - a) + [False] * a).eligible
        assert not run([True] * (K - a - 1) + [False] * (a + 1)).eligible
    straggly = run([True] * 60 + [False] + [True] * 67)   # one of 128 at the step cap
    assert straggly.eligible and straggly.all_converged is False and straggly.stragglers == [60]
    assert straggly.converged_fraction == 127 / 128
    assert run([None] * 8).eligible and run([None] * 8).converged_fraction is None   # fixed steps: no test
    assert not run([True] * 8, diverged="inf at step 3").eligible
    assert not run([True] * 8, stopped_at=4).eligible


def test_doubling_stages_end_at_K_and_double_below_it():
    assert copyruns.doubling_stages(16) == [2, 4, 8, 16]
    assert copyruns.doubling_stages(12) == [2, 4, 8, 12]
    assert copyruns.doubling_stages(2) == [2]
    assert copyruns.doubling_stages(128, first=4) == [4, 8, 16, 32, 64, 128]
