"""Hostile inputs to the public API: each is refused with a message that names the problem (or, where the input is
legitimately odd, gives the right answer), instead of a score that is silently wrong. Every case runs on a
40-example linear model or on small arrays."""

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from daunce import ClassificationTask, Daunce, DaunceConfig, exact, metrics, scores

TASK = ClassificationTask()
N, Q, M = 40, 6, 20
FAST = dict(n_models=4, optimizer="sgd", lr=0.5, steps=20, damping=1e-2, subset_ratio=0.5, rho=0.3,
            isotropic_noise=False)


def _data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, (x[:, 0] > 0).long()


X, Y = _data()
TRAIN, QUERY = TensorDataset(X, Y), TensorDataset(X[:Q], Y[:Q])


def _model(outputs=2, bias=True):
    torch.manual_seed(0)
    return torch.nn.Linear(3, outputs, bias=bias)


def _fit(train=TRAIN, query=QUERY, model=None, task=TASK, **kw):
    d = Daunce(model if model is not None else _model(), task, DaunceConfig(**{**FAST, **kw}), progress=False)
    d.fit(train)
    return d.attribute(train, query)


def _with(x=X, y=Y, at=None, value=None):
    x = x.clone()
    if at is not None:
        x[at] = value
    return TensorDataset(x, y)


# ------------------------------------------------------------------------------------------------- metrics
G = torch.Generator().manual_seed(1)
S = torch.randn(N, Q, generator=G)
MASK = torch.rand(M, N, generator=G) < 0.5
GT = torch.randn(M, Q, generator=G, dtype=torch.float64)
IDX = torch.stack([torch.randperm(N, generator=G)[:N // 2] for _ in range(M)])  # (M, m) equal-size index subsets


def _put(t, at, value):
    t = t.clone()
    t[at] = value
    return t


BAD_LDS = {
    "integer 0/1 mask (torch)": (lambda: metrics.lds(S, GT, MASK.long()), r"integer 0/1 matrix.*bool mask"),
    "integer 0/1 mask (numpy)": (lambda: metrics.lds(S, GT, MASK.numpy().astype(np.int32)),
                                 r"integer 0/1 matrix of shape \(20, 40\)"),
    "float 0/1 mask": (lambda: metrics.lds(S, GT, MASK.float()), r"float32 are neither a bool mask nor integer"),
    "NaN score": (lambda: metrics.lds(_put(S, (3, 2), float("nan")), GT, MASK),
                  r"scores has 1 NaN or infinite value\(s\) \(the first at index \(3, 2\)\)"),
    "inf score": (lambda: metrics.lds(_put(S, (0, 5), float("inf")), GT, MASK), r"scores has 1 NaN or infinite"),
    "NaN ground truth": (lambda: metrics.lds(S, _put(GT, (4, 1), float("nan")), MASK),
                         r"ground_truth_outputs has 1 NaN.*\(4, 1\)"),
    "inf in one seed of the ground truth": (
        lambda: metrics.lds(S, _put(GT[:, None].repeat(1, 2, 1), (2, 1, 0), -float("inf")), MASK),
        r"ground_truth_outputs has 1 NaN or infinite value\(s\) \(the first at index \(2, 1, 0\)\)"),
    "zero subsets": (lambda: metrics.lds(S, GT[:0], MASK[:0]), r"no subsets given"),
    "one subset": (lambda: metrics.lds(S, GT[:1], MASK[:1]), r"needs at least 2, got 1"),
    "negative index": (lambda: metrics.lds(S, GT[:2], torch.tensor([[0, -1], [2, 3]])),
                       r"subset 0 holds the index -1, outside \[0, 40\).*not read from the end"),
    "index past the end": (lambda: metrics.lds(S, GT[:2], torch.tensor([[0, 1], [2, 40]])),
                           r"subset 1 holds the index 40, outside \[0, 40\)"),
    "repeated index": (lambda: metrics.lds(S, GT[:2], [[0, 1, 2], [3, 5, 3]]),
                       r"subset 1 lists the training index 3 more than once"),
    "mask of another width": (lambda: metrics.lds(S, GT, MASK[:, :39]), r"39 columns, but there are 40 training"),
    "subsets and ground truth of other counts": (lambda: metrics.lds(S, GT[:19], MASK),
                                                 r"20 subsets but 19 ground-truth rows"),
    "scores of other query count": (lambda: metrics.lds(S[:, :5], GT, MASK),
                                    r"scores must be \(n_train, Q\) with Q = 6"),
    "query index out of range": (lambda: metrics.lds(S, GT, MASK, queries=[0, 6]), r"queries holds the index 6"),
    "negative query index": (lambda: metrics.lds(S, GT, MASK, queries=[-1]), r"queries holds the index -1"),
    "one-dimensional subsets": (lambda: metrics.lds(S, GT, MASK[0]), r"subsets must be an \(M, n_train\) bool mask"),
    "bootstrap_ci of nothing": (lambda: metrics.bootstrap_ci([]), r"at least one value"),
    "bootstrap_ci of NaN": (lambda: metrics.bootstrap_ci([0.1, float("nan")]), r"values has 1 NaN"),
    "bootstrap_ci level 1.5": (lambda: metrics.bootstrap_ci([0.1, 0.2], level=1.5), r"level must lie in \(0, 1\)"),
    "verdict of a NaN interval": (lambda: metrics.verdict(float("nan"), 0.1), r"interval lo <= hi"),
    "paired_difference with NaN": (lambda: metrics.paired_difference([0.1, float("nan")], [0.0, 0.0]),
                                   r"values has 1 NaN"),
    "columnwise_spearman with NaN": (lambda: metrics.columnwise_spearman(_put(GT, (0, 0), float("nan")), GT),
                                     r"first array has 1 NaN"),
    "noise_ceiling with NaN": (lambda: metrics.noise_ceiling(_put(GT[:, None].repeat(1, 2, 1), (1, 0, 3),
                                                                  float("nan"))), r"ground_truth_outputs has 1 NaN"),
}


@pytest.mark.parametrize("case", list(BAD_LDS))
def test_metrics_refuse(case):
    call, match = BAD_LDS[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_lds_bool_mask_and_index_lists_agree():
    """The same subsets as a bool mask, as ragged index lists and as an (M, m) index array give the same LDS."""
    ragged = [torch.nonzero(s).squeeze(1) for s in MASK]
    assert len({len(r) for r in ragged}) > 1  # the lists really are ragged
    a, b = metrics.lds(S, GT, MASK), metrics.lds(S, GT, ragged)
    np.testing.assert_allclose(a.per_query, b.per_query)
    assert abs(a.mean) > 0.01  # a real value, not the 0 of an unreadable input
    as_mask = torch.zeros(M, N, dtype=torch.bool).scatter_(1, IDX, True)
    np.testing.assert_allclose(metrics.lds(S, GT, IDX).per_query, metrics.lds(S, GT, as_mask).per_query)
    # a bool mask of the queries selects the same columns as their indices
    keep = np.array([True, False, True, True, False, False])
    np.testing.assert_allclose(metrics.lds(S, GT, MASK, queries=keep).per_query,
                               metrics.lds(S, GT, MASK, queries=[0, 2, 3]).per_query)


# --------------------------------------------------------------------------------------------------- exact
BAD_EXACT = {
    "pearson of transposed shapes": (lambda: exact.pearson(torch.randn(40, 6), torch.randn(6, 40)),
                                     r"same shape, got \(40, 6\) and \(6, 40\)"),
    "pearson with NaN": (lambda: exact.pearson(_put(S, (1, 1), float("nan")), S), r"first score matrix holds 1 NaN"),
    "per_query_pearson of other shapes": (lambda: exact.per_query_pearson(S, S[:30]), r"same shape"),
    "influence damping -1": (lambda: exact.influence(_model(), TASK, TRAIN, QUERY, damping=-1.0),
                             r"damping must be a finite number >= 0, got -1.0"),
    "influence damping NaN": (lambda: exact.influence(_model(), TASK, TRAIN, QUERY, damping=float("nan")),
                              r"damping must be a finite number >= 0, got nan"),
    "influence damping inf": (lambda: exact.influence(_model(), TASK, TRAIN, QUERY, damping=float("inf")),
                              r"damping must be a finite number >= 0, got inf"),
    "influence gradients of other d": (lambda: exact.influence(None, TASK, None, None, damping=0.1,
                                                               train_grads=torch.randn(5, 8),
                                                               query_grads=torch.randn(2, 7)),
                                       r"same d, got \(5, 8\) and \(2, 7\)"),
    "daunce_limit with a NaN gradient": (
        lambda: exact.daunce_limit(None, TASK, None, None, DaunceConfig(variant="efim", damping=0.1, rho=0.3,
                                                                        subset_ratio=1.0, isotropic_noise=False),
                                   subsets="full", train_grads=_put(torch.randn(5, 8), (2, 0), float("nan")),
                                   query_grads=torch.randn(2, 8)),
        r"train gradients of 1 example\(s\) hold NaN.*train example 2"),
    "daunce_limit of an unresolved configuration": (
        lambda: exact.daunce_limit(None, TASK, None, None, DaunceConfig(variant="efim", rho=0.3, subset_ratio=1.0),
                                   subsets="full", train_grads=torch.randn(5, 8), query_grads=torch.randn(2, 8)),
        r"needs a resolved configuration; \['damping'\] are 'auto'"),
}


@pytest.mark.parametrize("case", list(BAD_EXACT))
def test_exact_refuses(case):
    call, match = BAD_EXACT[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_influence_warns_on_a_singular_curvature_and_not_when_damped():
    model = torch.nn.Linear(3, 30)  # d = 120 parameters, 5 examples: a Fisher of rank <= 5
    x, y = X[:5], torch.arange(5)
    train, query = TensorDataset(x, y), TensorDataset(x[:2], y[:2])
    with pytest.warns(RuntimeWarning, match=r"fisher curvature plus damping 0 is singular.*d = 120 parameters, 5 "):
        exact.influence(model, TASK, train, query, form="fisher")
    Gi = exact.per_example_grads(model, TASK, train)
    Gq = exact.per_example_grads(model, TASK, query)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        damped = exact.influence(model, TASK, train, query, form="fisher", damping=0.1, train_grads=Gi, query_grads=Gq)
    ref = Gi @ torch.linalg.solve(Gi.T @ Gi / 5 + 0.1 * torch.eye(120, dtype=torch.float64), Gq.T)
    torch.testing.assert_close(damped, ref)


def test_pearson_of_a_constant_matrix_is_nan_with_a_warning():
    with pytest.warns(RuntimeWarning, match="constant"):
        assert np.isnan(exact.pearson(torch.zeros(4, 3), torch.randn(4, 3)))


# ------------------------------------------------------------------------------------------ data and settings
def _labels(change):
    y = Y.clone()
    for i, v in change.items():
        y[i] = v
    return TensorDataset(X, y)


BAD_FIT = {
    "NaN feature in train": (lambda: _fit(train=_with(at=(7, 1), value=float("nan"))),
                             r"train_dataset: example 7 has a NaN or infinite value in its features"),
    "inf feature in train": (lambda: _fit(train=_with(at=(12, 0), value=float("inf"))),
                             r"train_dataset: example 12 has a NaN or infinite"),
    "NaN feature in query": (lambda: _fit(query=TensorDataset(_put(X[:Q], (3, 2), float("nan")), Y[:Q])),
                             r"example 3 has a NaN or infinite value in its features"),
    "NaN query passed to fit": (lambda: Daunce(_model(), TASK, DaunceConfig(**FAST), progress=False).fit(
        TRAIN, TensorDataset(_put(X[:Q], (4, 0), float("nan")), Y[:Q])),
                                r"query_dataset: example 4 has a NaN"),
    "label past the outputs": (lambda: _fit(train=_labels({5: 3})),
                               r"train_dataset: example 5 has label 3, outside \[0, 2\) for a model with 2 outputs"),
    "negative label": (lambda: _fit(train=_labels({9: -1})), r"example 9 has label -1, outside \[0, 2\)"),
    "label out of range in the query": (lambda: _fit(query=TensorDataset(X[:Q], torch.tensor([0, 1, 0, 2, 1, 0]))),
                                        r"example 3 has label 2, outside \[0, 2\)"),
    "float labels": (lambda: _fit(train=TensorDataset(X, Y.float())),
                     r"ClassificationTask needs integer class labels, got torch.float32"),
    "bool labels": (lambda: _fit(train=TensorDataset(X, Y.bool())), r"integer class labels, got torch.bool"),
    "labels of shape (n, 1)": (lambda: _fit(train=TensorDataset(X, Y[:, None])),
                               r"one integer label per example, shape \(8,\).*got labels of shape \(8, 1\)"),
    "examples without a label": (lambda: _fit(train=TensorDataset(X)), r"\(x, y\) examples.*got tuples of 1"),
    "examples of three tensors": (lambda: _fit(train=TensorDataset(X, Y, Y)), r"got tuples of 3"),
    "feature size 5 for a model of 3": (lambda: _fit(train=TensorDataset(torch.randn(N, 5), Y)),
                                        r"train_dataset: the model cannot run on its first examples \(batch of tuple "
                                        r"of 2: \(tensor \(8, 5\) float32"),
    "query feature size 4": (lambda: _fit(query=TensorDataset(torch.randn(Q, 4), Y[:Q])),
                             r"the model cannot run.*tensor \(6, 4\) float32"),
    "one training example": (lambda: _fit(train=TensorDataset(X[:1], Y[:1])),
                             r"train_dataset has 1 example: Daunce needs at least 2 training examples"),
    "bootstrap at subset ratio 1": (lambda: _fit(variant="bootstrap", subset_ratio=1.0),
                                    r"variant='bootstrap' with subset_ratio=1.0 on 40 .*copies differ by nothing"),
    "bootstrap at a ratio that rounds to 1": (lambda: _fit(variant="bootstrap", subset_ratio=0.99),
                                              r"round\(r n\) = 40 = n"),
    "one logit under cross-entropy": (lambda: _fit(model=_model(1), train=TensorDataset(X, torch.zeros(N).long()),
                                                   query=TensorDataset(X[:Q], torch.zeros(Q).long())),
                                      r"model has 1 output under ClassificationTask's cross-entropy.*every signal "
                                      r"and score would be 0"),
    "auto on 2 examples": (lambda: Daunce(_model(), TASK, DaunceConfig(n_models=4), progress=False).fit(
        TensorDataset(X[:2], Y[:2])), r"damping='auto' needs at least 4 training examples.*got 2"),
    "auto on 3 examples": (lambda: Daunce(_model(), TASK, DaunceConfig(n_models=4), progress=False).fit(
        TensorDataset(X[:3], Y[:3])), r"damping='auto' needs at least 4 training examples.*got 3"),
    "auto on 1 example": (lambda: Daunce(_model(), TASK, DaunceConfig(n_models=4), progress=False).fit(
        TensorDataset(X[:1], Y[:1])), r"needs at least 2 training examples"),
}


@pytest.mark.parametrize("case", list(BAD_FIT))
def test_daunce_refuses_bad_data_and_degenerate_settings(case):
    call, match = BAD_FIT[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_zero_spread_across_copies_is_counted():
    """A query at x = 0 of a model without bias has the same logits (0) in every copy: its signal does not vary and
    a warning counts it; the other queries score as usual."""
    x = X[:Q].clone()
    x[2] = 0.0
    with pytest.warns(RuntimeWarning, match=r"0 of 40 training and 1 of 6 query signals do not vary across the K = 4"):
        S_ = _fit(model=_model(bias=False), query=TensorDataset(x, Y[:Q]))
    assert torch.all(S_[:, 2] == 0)
    assert (S_[:, [0, 1, 3, 4, 5]].abs() > 0).float().mean() > 0.9


def test_scores_count_constant_signals():
    A, B = torch.randn(5, 7), torch.randn(5, 3)
    A[:, [1, 4]] = 0.3  # the same value in every copy (0.3 is not exact in binary: the mean is off by rounding)
    B[:, 0] = -2.0
    with pytest.warns(RuntimeWarning, match=r"2 of 7 training and 1 of 3 query signals do not vary across the K = 5"):
        out = scores.covariance(A, B, block=3)
    assert torch.all(out[[1, 4]] == 0) and torch.all(out[:, 0] == 0)


def test_a_structural_task_without_the_hook_still_works():
    """A user task that is not a ClassificationTask and has no check_batch: the data are checked for finite values
    and a model that runs, the rest is the task's business."""
    import torch.nn.functional as F

    class Plain:
        def outputs(self, model, batch):
            return model(batch[0])

        def loss(self, outputs, batch):
            return F.cross_entropy(outputs, batch[1], reduction="none")

    S_ = _fit(task=Plain())
    assert S_.shape == (N, Q) and bool(torch.isfinite(S_).all()) and float(S_.abs().max()) > 0
    with pytest.raises(ValueError, match=r"example 7 has a NaN"):
        _fit(task=Plain(), train=_with(at=(7, 1), value=float("nan")))


class _Items(torch.utils.data.Dataset):
    """A map-style dataset that is not a TensorDataset: checked batch by batch."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("bad, match", [
    ("nan", r"train_dataset: example 13 has a NaN or infinite value"),
    ("label", r"train_dataset: example 21 has label 5, outside \[0, 2\)"),
])
def test_a_generic_dataset_is_checked_batch_by_batch(bad, match):
    x, y = X.clone(), Y.clone()
    if bad == "nan":
        x[13, 2] = float("nan")
    else:
        y[21] = 5
    d = Daunce(_model(), TASK, DaunceConfig(**FAST), eval_batch_size=8, progress=False)
    with pytest.raises(ValueError, match=match):  # example 13 / 21 lie in the second / third batch of 8
        d.fit(_Items(x, y))
    ok = Daunce(_model(), TASK, DaunceConfig(**FAST), eval_batch_size=8, progress=False).fit(_Items(X, Y))
    assert ok.attribute(_Items(X, Y), _Items(X[:Q], Y[:Q])).shape == (N, Q)
