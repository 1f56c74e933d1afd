"""Ground-truth-free reliability of Daunce scores, and growing K until a target is reached."""

import pytest
import torch

from daunce import ClassificationTask, Daunce, DaunceConfig, reliability


def test_spearman_brown():
    assert reliability.spearman_brown(0.5, 1) == pytest.approx(0.5)
    assert reliability.spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    assert reliability.spearman_brown(0.2, 8) > reliability.spearman_brown(0.2, 4)


@pytest.fixture(scope="module")
def signals(digits_lr):
    model, train, query = digits_lr
    d = Daunce(model, ClassificationTask(), DaunceConfig(n_models=64, rho=0.1, damping=1e-2, steps=40, lr=1e-2),
               progress=False)
    d.fit(train, query)
    return d.signals(train), d.signals(query)


def test_reliability_rises_with_k(signals):
    A, B = signals
    r8, r64 = reliability.split_half(A[:8], B[:8]), reliability.split_half(A, B)
    assert r64 > r8 + 0.1, (r8, r64)
    # pure noise has no reliability
    g = torch.Generator().manual_seed(0)
    assert abs(reliability.split_half(torch.randn(64, 300, generator=g), torch.randn(64, 30, generator=g))) < 0.1
    # Spearman-Brown from 16 copies predicts the split-half agreement of 64 (two halves of 32) roughly
    pred32 = reliability.spearman_brown(reliability.split_half(A[:16], B[:16]), 4)
    assert pred32 == pytest.approx(r64, abs=0.15)


def test_fit_until_reaches_its_target_and_reuses_copies(digits_lr, tmp_path):
    """Target 0.5 is reached before the cap (measured: K = 8, 16, 20 with reliability 0.29, 0.46, 0.61), K stops
    at the first reliability at or above the target, and the reported reliability is that of the final K's
    signals; an unreachable target stops at ``max_models`` instead."""
    model, train, query = digits_lr
    d = Daunce(model, ClassificationTask(), DaunceConfig(n_models=4, rho=0.1, damping=1e-2, steps=20, lr=1e-2),
               tmp_path, progress=False)
    out = reliability.fit_until(d, train, query, target=0.5, start=8, max_models=48)
    Ks, rels = [k for k, _ in out["history"]], [r for _, r in out["history"]]
    assert out["reliability"] >= 0.5 and out["n_models"] < 48, out  # reached, not stopped by the cap
    assert out["n_models"] == Ks[-1] and out["reliability"] == rels[-1] and all(r < 0.5 for r in rels[:-1]), out
    assert Ks[0] == 8 and all(a < b <= 2 * a for a, b in zip(Ks, Ks[1:])), Ks  # at most doubling each round
    assert d.config.n_models == out["n_models"]
    assert reliability.reliability(d.signals(train), d.signals(query)) == pytest.approx(out["reliability"])
    # every copy was trained once: growing K reused the finished ones
    assert sorted(d.trained_copies) == list(range(out["n_models"]))
    # a target out of reach stops at max_models, below the target, training only the copies it adds
    K = out["n_models"]
    capped = reliability.fit_until(d, train, query, target=0.999, start=K, max_models=K + 4)
    assert capped["n_models"] == K + 4 and capped["reliability"] < 0.999
    assert [k for k, _ in capped["history"]] == [K, K + 4] and capped["history"][0][1] == pytest.approx(rels[-1])
    assert sorted(d.trained_copies) == list(range(K + 4))
