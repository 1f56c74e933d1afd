"""The method itself: agreement with exact influence functions, determinism, planted examples,
errors on bad input, resumption."""

import copy

import pytest
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from daunce import ClassificationTask, Daunce, DaunceConfig, exact, scores
from daunce.engines import sequential

TASK = ClassificationTask()
FAST = dict(optimizer="sgd", lr=1.0, steps=150, damping=1e-2, subset_ratio=1.0, rho=0.3, isotropic_noise=True)


def test_covariance_and_correlation_match_numpy():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(7, 13, generator=g), torch.randn(7, 5, generator=g)
    ref = torch.cov(torch.cat([A, B], 1).T)[:13, 13:]
    torch.testing.assert_close(scores.covariance(A, B, block=4), ref, atol=1e-6, rtol=1e-5)
    ref_c = torch.corrcoef(torch.cat([A, B], 1).T)[:13, 13:]
    torch.testing.assert_close(scores.correlation(A, B, block=3), ref_c, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="share K"):
        scores.covariance(A, B[:3])


def test_exact_influence_hessian_equals_fisher_relation(digits_lr):
    """For cross-entropy at an optimum the Hessian-form and Fisher-form IFs agree closely."""
    model, train, query = digits_lr
    h = exact.influence(model, TASK, train, query, form="hessian", damping=1e-2)
    f = exact.influence(model, TASK, train, query, form="fisher", damping=1e-2)
    assert h.shape == (300, 30)
    assert exact.pearson(h, f) > 0.8


def test_exact_influence_predicts_leave_one_out(digits_lr):
    """The Hessian-form IF predicts the query-loss change of removing a training example."""
    import torch.nn.functional as F

    from daunce.experiments import training

    model, train, query = digits_lr
    wd = 1e-2
    IF = exact.influence(model, TASK, train, TensorDataset(*query[:1]), form="hessian", damping=wd)[:, 0]
    x, y = train.tensors
    base = F.cross_entropy(model(query.tensors[0][:1]), query.tensors[1][:1]).item()
    picks = torch.cat([IF.argsort()[:3], IF.argsort()[-3:]])
    pred, actual = [], []
    for i in picks.tolist():
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[i] = False
        m = copy.deepcopy(model)
        training.train_classifier(m, TensorDataset(x[keep], y[keep]), epochs=30, optimizer="lbfgs", weight_decay=wd)
        after = F.cross_entropy(m(query.tensors[0][:1]), query.tensors[1][:1]).item()
        actual.append(after - base)
        pred.append(IF[i].item() / len(y))  # removing i raises the query loss by about IF/n
    pred, actual = torch.tensor(pred), torch.tensor(actual)
    assert torch.corrcoef(torch.stack([pred, actual]))[0, 1] > 0.9
    assert (torch.sign(pred) == torch.sign(actual)).all()


@pytest.mark.parametrize("variant", ["efim", "if"])
def test_daunce_converges_to_its_exact_limit_and_the_influence_function(digits_lr, variant):
    model, train, query = digits_lr
    G_i = exact.per_example_grads(model, TASK, train)
    G_q = exact.per_example_grads(model, TASK, query)
    r = {}
    for K in (16, 128):
        cfg = DaunceConfig(variant=variant, n_models=K, perturbation="orthogonal", **FAST)
        S = Daunce(model, TASK, cfg, progress=False).fit(train).attribute(train, query)
        form = "fisher" if variant == "efim" else "hessian"
        IF = exact.influence(model, TASK, train, query, form=form, damping=exact.matched_damping(cfg),
                             train_grads=G_i, query_grads=G_q)
        lim = exact.daunce_limit(model, TASK, train, query, cfg, train_grads=G_i, query_grads=G_q)
        r[K] = (exact.pearson(S, lim), exact.pearson(S, IF))
        # the scale matches the derivation too, not only the direction
        scale = float((S.double() * lim).sum() / (lim * lim).sum())
        assert 0.7 < scale < 1.3, scale
    assert r[128][0] > r[16][0] + 0.2, r
    assert r[128][0] > 0.65, r
    assert r[128][1] > 0.6, r


def test_same_seed_same_scores_and_other_seed_differs(digits_lr):
    model, train, query = digits_lr
    cfg = DaunceConfig(n_models=4, **FAST)
    s1 = Daunce(model, TASK, cfg, progress=False).fit(train).attribute(train, query)
    s2 = Daunce(model, TASK, cfg, progress=False).fit(train).attribute(train, query)
    s3 = Daunce(model, TASK, cfg.replace(seed=1), progress=False).fit(train).attribute(train, query)
    assert torch.equal(s1, s2)
    assert not torch.allclose(s1, s3)


def test_model_is_not_modified(digits_lr):
    model, train, query = digits_lr
    before = [p.detach().clone() for p in model.parameters()]
    Daunce(model, TASK, DaunceConfig(n_models=2, **FAST), progress=False).fit(train)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)


@pytest.mark.parametrize("variant", ["if", "efim", "trak", "bootstrap"])
def test_planted_duplicate_of_query_gets_top_score(variant):
    """A training example identical to a query (and alone with its label there) helps it most."""
    from daunce.experiments import data, models, training

    train, query = data.digits(200, 10, seed=1)
    x, y = train.tensors
    qx, qy = query.tensors[0][:1], torch.tensor([(int(query.tensors[1][0]) + 1) % 10])  # an unusual label
    train2 = TensorDataset(torch.cat([x, qx]), torch.cat([y, qy]))
    model = models.seeded(models.logistic_regression, 0, 64, 10)
    training.train_classifier(model, train2, epochs=20, optimizer="lbfgs", weight_decay=1e-2)
    # plain SGD: the trak objective's curvature (margin only) is the sharpest, so it takes the smallest step
    lr = {"bootstrap": 0.1, "trak": 0.2}.get(variant, 0.5)
    cfg = DaunceConfig(variant=variant, n_models=16,
                       **{**FAST, "subset_ratio": 0.5, "lr": lr, "rho": 0.5 if variant != "bootstrap" else 0.1})
    S = Daunce(model, TASK, cfg, progress=False).fit(train2).attribute(train2, TensorDataset(qx, qy))
    assert int(S[:, 0].argmax()) == len(y), S[:, 0].topk(3)


def test_bad_inputs_raise_clear_errors(digits_lr):
    model, train, query = digits_lr
    with pytest.raises(ValueError, match="n_models"):
        DaunceConfig(n_models=1)
    with pytest.raises(ValueError, match="subset_ratio"):
        DaunceConfig(subset_ratio=0.0)
    with pytest.raises(ValueError, match="subset_ratio"):
        DaunceConfig(subset_ratio=1.5)
    with pytest.raises(ValueError, match="variant"):
        DaunceConfig(variant="hessian")
    d = Daunce(model, TASK, DaunceConfig(n_models=2, **FAST), progress=False)
    with pytest.raises(ValueError, match="empty"):
        d.fit(TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)))

    class MeanLoss(ClassificationTask):
        def loss(self, outputs, batch):
            return super().loss(outputs, batch).mean()

    with pytest.raises(ValueError, match="one value per example"):
        Daunce(model, MeanLoss(), DaunceConfig(n_models=2, **FAST), progress=False).fit(train)
    with pytest.raises(FloatingPointError, match=r"copy 0, step \d+"):
        Daunce(model, TASK, DaunceConfig(n_models=2, **{**FAST, "lr": 1e6}), progress=False).fit(train)
    with pytest.raises(RuntimeError, match="fit"):
        Daunce(model, TASK, DaunceConfig(n_models=2, **FAST), progress=False).attribute(train, query)


def test_interrupted_fit_resumes_without_retraining(digits_lr, tmp_path, monkeypatch):
    model, train, query = digits_lr
    cfg = DaunceConfig(n_models=5, **FAST)
    ref = Daunce(model, TASK, cfg, progress=False).fit(train).attribute(train, query)

    d = Daunce(model, TASK, cfg, workdir=tmp_path, progress=False, trainer="sequential")
    real = sequential.train_copy

    def crash_on_third(ctx, config, plan, *a, **k):
        if plan.k == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(ctx, config, plan, *a, **k)

    monkeypatch.setattr(sequential, "train_copy", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        d.fit(train)
    monkeypatch.setattr(sequential, "train_copy", real)
    assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == [f"copy_000{k}.pt" for k in range(3)]

    d2 = Daunce(model, TASK, cfg, workdir=tmp_path, progress=False).fit(train)
    assert d2.trained_copies == [3, 4]
    torch.testing.assert_close(d2.attribute(train, query), ref)
    # a fresh object with the same workdir trains nothing and gives the same scores (queries from weights)
    d3 = Daunce(model, TASK, cfg, workdir=tmp_path, progress=False).fit(train)
    assert d3.trained_copies == []
    torch.testing.assert_close(d3.attribute(train, query), ref)
    # another configuration cannot reuse this workdir
    with pytest.raises(ValueError, match="another run"):
        Daunce(model, TASK, cfg.replace(rho=0.2), workdir=tmp_path, progress=False).fit(train)


def test_structural_task_and_generic_dataset(digits_lr):
    """A task that only implements outputs/loss, and a dataset that is not a TensorDataset."""
    model, train, query = digits_lr

    class Minimal:
        def outputs(self, model, batch):
            return model(batch[0])

        def loss(self, outputs, batch):
            return torch.nn.functional.cross_entropy(outputs, batch[1], reduction="none")

    generic = ConcatDataset([Subset(train, range(150)), Subset(train, range(150, 300))])
    cfg = DaunceConfig(n_models=3, **FAST)
    a = Daunce(model, Minimal(), cfg, progress=False).fit(generic).attribute(generic, query)
    b = Daunce(model, TASK, cfg, progress=False).fit(train).attribute(train, query)
    torch.testing.assert_close(a, b)


def test_correlation_score_and_margin_signal(digits_lr):
    model, train, query = digits_lr
    cfg = DaunceConfig(n_models=8, score="corr", **FAST)
    S = Daunce(model, ClassificationTask("margin"), cfg, progress=False).fit(train).attribute(train, query)
    assert S.abs().max() <= 1.0 + 1e-5
    with pytest.raises(ValueError, match="signal"):
        ClassificationTask("accuracy")


def test_margin_signal_is_minus_the_margin_on_hand_made_logits():
    """``signal="margin"`` records ``-(logit_y - log sum_{c != y} exp logit_c)``, computed here by hand; the
    loss signal stays the cross-entropy, and ``output_function`` is minus the margin under either signal."""
    import math

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 3.0, 1.0], [-2.0, -2.0, 4.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 2, 2, 1])
    rows = logits.tolist()
    expected = torch.tensor([-(row[c] - math.log(sum(math.exp(v) for j, v in enumerate(row) if j != c)))
                             for row, c in zip(rows, y.tolist())])
    # by hand: example 0 has margin 2 - log(1 + e^-1), example 3 (three equal logits) margin 1 - log(2e) = -log 2
    assert expected[0].item() == pytest.approx(-(2 - math.log(1 + math.exp(-1))))
    assert expected[3].item() == pytest.approx(math.log(2))
    batch = (torch.zeros(4, 1), y)
    torch.testing.assert_close(ClassificationTask("margin").signal(logits, batch), expected)
    torch.testing.assert_close(ClassificationTask("margin").output_function(logits, batch), expected)
    torch.testing.assert_close(ClassificationTask("loss").output_function(logits, batch), expected)
    # higher = worse: correctly classified examples (0, 2) have a negative signal, the misclassified one (1) and
    # the tie (3) a positive one; example 2 (4 against two logits of -2) has margin 4 - (log 2 - 2) = 6 - log 2
    assert (expected[[0, 2]] < 0).all() and (expected[[1, 3]] > 0).all()
    assert expected[2].item() == pytest.approx(-(6 - math.log(2)))
    ce = torch.tensor([-(row[c] - math.log(sum(math.exp(v) for v in row))) for row, c in zip(rows, y.tolist())])
    torch.testing.assert_close(ClassificationTask("loss").signal(logits, batch), ce)
    assert not torch.allclose(ClassificationTask("loss").signal(logits, batch), expected)


def test_workdir_of_another_orthogonal_design_is_refused(digits_lr, tmp_path):
    """The orthogonal block decides what copy k is: a workdir trained with one block size is refused
    under another, with the differing field named; the same block reuses the copies."""
    model, train, _ = digits_lr
    cfg = DaunceConfig(n_models=4, perturbation="orthogonal", **{**FAST, "steps": 5})
    first = Daunce(model, TASK, cfg, workdir=tmp_path, progress=False, orthogonal_block=8).fit(train)
    assert first.trained_copies == [0, 1, 2, 3]
    again = Daunce(model, TASK, cfg, workdir=tmp_path, progress=False, orthogonal_block=8).fit(train)
    assert again.trained_copies == []
    with pytest.raises(ValueError, match=r"another run \(orthogonal_block: stored 8, now 16\)"):
        Daunce(model, TASK, cfg, workdir=tmp_path, progress=False, orthogonal_block=16).fit(train)
    # and copy k really differs between the two designs
    other = Daunce(model, TASK, cfg, progress=False, orthogonal_block=16)
    assert not torch.equal(first.plan(1, len(train)).eps, other.plan(1, len(train)).eps)


def test_trainer_is_chosen_on_the_training_set_even_when_queries_come_first(digits_lr, tmp_path, monkeypatch):
    """A fresh object over a finished workdir: the first dataset that needs new signals is a query set,
    yet the trainer (and the signal path that follows it) is decided on the training set of ``fit``."""
    from daunce.engines import stacked

    model, train, query = digits_lr
    cfg = DaunceConfig(n_models=3, **{**FAST, "steps": 5})
    Daunce(model, TASK, cfg, workdir=tmp_path, progress=False).fit(train)

    seen = []
    real = stacked.check

    def spy(ctx, config, dataset, *a, **k):
        seen.append(len(dataset))
        return real(ctx, config, dataset, *a, **k)

    monkeypatch.setattr(stacked, "check", spy)
    fresh = Daunce(model, TASK, cfg, workdir=tmp_path, progress=False).fit(train)  # nothing to train
    assert fresh.trained_copies == [] and seen == []
    S = fresh.signals(query)  # query signals were never recorded: computed from the stored weights
    assert S.shape == (3, len(query))
    assert seen == [len(train)] and len(train) != len(query)
    assert fresh.trainer_used == "shared" and fresh.signal_path_used == "shared"
