"""Notebook 03's LDS rows and removal summaries (daunce.experiments.llm_lds): the tuning / report split by topic, the
interval that resamples topics, the knob chosen by the LDS, each removal's share of the whole fine-tune's effect."""

import numpy as np
import pytest
import torch

from daunce.experiments import groundtruth, llm_lds


def test_query_split_keeps_each_topic_on_one_side_and_balances_the_halves():
    groups = ["a"] * 6 + ["b"] * 5 + ["c"] * 4 + ["d"] * 3 + ["e"] * 2
    tune, report = llm_lds.query_split(groups, seed=3)
    assert sorted(np.concatenate([tune, report]).tolist()) == list(range(len(groups)))
    assert not {groups[i] for i in tune} & {groups[i] for i in report}
    assert abs(len(tune) - len(report)) <= 2, (len(tune), len(report))
    assert llm_lds.query_split(groups, seed=3)[0].tolist() == tune.tolist()   # the seed decides


def test_query_split_with_one_topic_deals_the_queries_and_refuses_one_query():
    tune, report = llm_lds.query_split(["x"] * 5)
    assert tune.tolist() == [0, 2, 4] and report.tolist() == [1, 3]
    with pytest.raises(ValueError, match="at least 2 queries"):
        llm_lds.query_split(["x"])


def test_query_split_gives_each_half_its_share_of_the_topics_and_says_when_a_set_has_too_few(capsys):
    """One large topic beside 16 small ones: dealing by query count alone would give the large topic a half of its
    own; dealt by topic count, each half holds at least MIN_TOPICS topics."""
    groups = ["big"] * 20 + [f"t{i}" for i in range(16) for _ in range(2)]
    for seed in range(5):
        tune, report = llm_lds.query_split(groups, seed=seed)
        topics = [{groups[i] for i in half} for half in (tune, report)]
        assert min(len(t) for t in topics) >= llm_lds.MIN_TOPICS, (seed, [len(t) for t in topics])
        assert not topics[0] & topics[1]
    assert capsys.readouterr().out == ""   # enough topics: nothing to say
    llm_lds.query_split(["a", "b", "c", "d", "e"] * 2, name="math")   # five categories: 2 and 3 per half
    out = capsys.readouterr().out
    assert "math: 5 topics in all" in out and f"fewer than the {llm_lds.MIN_TOPICS} each half should hold" in out
    llm_lds.query_split(["all"] * 4, name="instr")
    assert "instr: one topic ('all')" in capsys.readouterr().out


def test_settings_key_names_the_settings_not_their_order():
    recipe = dict(epochs=3, lr=5e-3, batch_size=8, eps=1e-4)
    key = llm_lds.settings_key(dict(recipe=recipe, n_train=40))
    assert len(key) == 8 and int(key, 16) >= 0
    assert llm_lds.settings_key(dict(n_train=40, recipe=dict(reversed(list(recipe.items()))))) == key
    assert llm_lds.settings_key(dict(recipe=dict(recipe, eps=1e-8), n_train=40)) != key   # AdamW's eps decides
    assert llm_lds.settings_key(dict(recipe=recipe, n_train=41)) != key
    assert llm_lds.settings_key(dict(recipe=recipe, n_train=np.int64(40))) == key
    with pytest.raises(TypeError, match=r"settings.model is a object"):
        llm_lds.settings_key(dict(model=object()))


def test_grouped_bootstrap_resamples_whole_topics():
    """Two topics of ten identical values: resampling topics gives means 0, 0.5 or 1, so the interval is [0, 1];
    resampling the twenty queries as if independent gives a narrow one around 0.5."""
    values = np.array([0.0] * 10 + [1.0] * 10)
    groups = ["a"] * 10 + ["b"] * 10
    lo, hi = llm_lds.grouped_bootstrap_ci(values, groups)
    assert (lo, hi) == (0.0, 1.0)
    lo1, hi1 = llm_lds.grouped_bootstrap_ci(values, ["all"] * 20)   # one group: the queries are resampled
    assert 0.2 < lo1 < 0.5 < hi1 < 0.8
    with pytest.raises(ValueError, match="value 3 is not finite"):
        llm_lds.grouped_bootstrap_ci(np.array([0.0, 1.0, 2.0, np.nan]), ["a", "a", "b", "b"])


def _planted_ground_truth(n=12, Q=6, M=30, seed=0):
    """Goodness that is exactly linear in the subset: sum of a (n, Q) matrix W over the subset's examples."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, Q, generator=g, dtype=torch.float64)
    subsets = groundtruth.half_subsets(n, M, seed=seed)
    return W, {"outputs": subsets.double() @ W, "subsets": subsets}


def test_tune_by_lds_picks_the_planted_scores_over_noisy_and_constant_ones():
    W, gt = _planted_ground_truth()
    noisy = W + 3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = llm_lds.tune_by_lds({"constant": torch.ones_like(W), "noisy": noisy, "exact": W}, gt, np.arange(3))
    assert out["chosen"] == "exact"
    assert out["tune_lds"]["exact"] == pytest.approx(1.0)
    assert out["tune_lds"]["constant"] == 0.0   # every half-subset gets the same prediction: no ranking
    assert 0 < out["tune_lds"]["noisy"] < 1


def test_lds_row_reports_the_chosen_queries_and_their_topics():
    W, gt = _planted_ground_truth()
    row = llm_lds.lds_row(-W, gt, np.array([1, 4, 5]), ["t0", "t1", "t0", "t1", "t2", "t2"])
    assert row["lds"] == pytest.approx(-1.0) and row["n_queries"] == 3 and row["n_groups"] == 2
    assert row["ci"][0] <= row["lds"] <= row["ci"][1] and len(row["per_query"]) == 3


def test_effect_share_and_group_means():
    whole = np.array([[0.2, 0.4], [0.2, 0.4]])
    assert llm_lds.effect_share(np.array([[0.03, 0.06], [0.03, 0.06]]), whole) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="did not lower"):
        llm_lds.effect_share(np.zeros((2, 2)), -whole)
    with pytest.raises(ValueError, match="differ in shape"):
        llm_lds.effect_share(np.zeros((2, 3)), whole)
    t = np.array([[1.0, 3.0, 10.0], [2.0, 4.0, 20.0]])
    assert llm_lds.group_means(t, ["b", "b", "a"]).tolist() == [[10.0, 2.0], [20.0, 3.0]]   # groups sorted: a, b


def test_cached_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"scores": torch.arange(3.0), "damping": None}

    a = llm_lds.cached(tmp_path / "x.pt", compute)
    b = llm_lds.cached(tmp_path / "x.pt", compute)
    assert len(calls) == 1 and torch.equal(a["scores"], b["scores"]) and b["damping"] is None
