"""The linear datamodeling score (LDS) and its companions: plain functions of a score matrix and a
ground truth (dattri's style).

Protocol (the paper's, as in dattri): draw M random half-subsets S_m of
the training set, retrain a model on each (several seeds, averaged) and record a *goodness* output
of every query, f(q, S_m) (the margin, or minus the loss). An attribution predicts

    g(q, S_m) = sum_{i in S_m} score(i, q)

and LDS(q) = Spearman correlation over m between f(q, .) and g(q, .); the reported number is the
mean over queries, with a bootstrap confidence interval over queries.

Sign convention: scores are positive when the training example *helped* the query, so the ground
truth must be a goodness (higher = better on the query: margin or -loss) for a good attribution to
score a *positive* LDS. A query whose prediction or ground truth is constant over the subsets has
an undefined Spearman correlation; it counts as 0 (the attribution predicted nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _rank(a: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 (average ranks for ties), as floats."""
    from scipy.stats import rankdata

    return rankdata(a, axis=0)


def columnwise_spearman(a, b) -> np.ndarray:
    """Spearman correlation of ``a[:, j]`` with ``b[:, j]`` for every column j: ``(M, Q), (M, Q) -> (Q,)``.
    A constant column gives 0."""
    a, b = _np(a), _np(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (M, Q) arrays of the same shape, got {a.shape} and {b.shape}")
    ra, rb = _rank(a), _rank(b)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ra * rb).sum(0) / den
    return np.where(den > 0, r, 0.0)


def subset_mask(subsets, n_train: int | None = None) -> np.ndarray:
    """``(M, n_train)`` boolean membership from a boolean mask or an ``(M, m)`` index array."""
    if torch.is_tensor(subsets):
        subsets = subsets.detach().cpu().numpy()
    s = np.asarray(subsets)
    if s.dtype == bool:
        return s
    if n_train is None:
        raise ValueError("index subsets need n_train")
    idx = s.astype(np.int64)
    mask = np.zeros((idx.shape[0], n_train), dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def bootstrap_ci(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling the entries)."""
    v = _np(values).ravel()
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def nested_bootstrap_ci(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Two-level percentile bootstrap interval of the mean of a ``(n_seeds, n_queries)`` table: each replicate
    draws the seeds (rows: retraining seeds, random draws) with replacement, then the queries (columns) with
    replacement, and averages the cells they select. The interval covers both sources of noise; with one seed
    it is the queries' interval, and a spread between the seeds widens it."""
    v = _np(values)
    if v.ndim != 2 or min(v.shape) < 1:
        raise ValueError(f"nested_bootstrap_ci needs a (n_seeds, n_queries) table, got shape {v.shape}")
    rng = np.random.default_rng(seed)
    s = rng.integers(0, v.shape[0], size=(n_boot, v.shape[0]))
    q = rng.integers(0, v.shape[1], size=(n_boot, v.shape[1]))
    means = v[s[:, :, None], q[:, None, :]].mean((1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(a, b, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0, nested: bool = False) -> dict:
    """Method A against method B on the same queries: the mean of the per-query differences ``a - b``, its
    paired bootstrap interval (the queries resampled together for both methods) and the verdict:
    ``"ahead"`` / ``"behind"`` only where the interval excludes 0, ``"tied"`` otherwise.

    ``nested=True``: ``a`` and ``b`` are ``(n_seeds, n_queries)`` tables (row s: the queries' values under
    retraining seed s) and the interval is ``nested_bootstrap_ci`` of their difference, which resamples the
    seeds and then the queries; ``"per_seed"`` holds each seed's mean difference."""
    a, b = _np(a), _np(b)
    if not nested:
        a, b = a.ravel(), b.ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs values of the same queries (and seeds), got {a.shape} and {b.shape}")
    d = a - b
    if nested:
        lo, hi = nested_bootstrap_ci(d, n_boot=n_boot, level=level, seed=seed)
        return {"diff": float(d.mean()), "lo": lo, "hi": hi, "verdict": verdict(lo, hi),
                "per_seed": d.mean(1).tolist()}
    lo, hi = bootstrap_ci(d, n_boot=n_boot, level=level, seed=seed)
    return {"diff": float(d.mean()), "lo": lo, "hi": hi, "verdict": verdict(lo, hi)}


def verdict(lo: float, hi: float) -> str:
    """``"ahead"`` if the interval of a difference lies above 0, ``"behind"`` if below, else ``"tied"``."""
    if lo > 0:
        return "ahead"
    if hi < 0:
        return "behind"
    return "tied"


@dataclass
class LDSResult:
    """``per_query`` (Q,) Spearman correlations; ``mean`` and its bootstrap interval ``(lo, hi)``."""

    per_query: np.ndarray
    mean: float
    lo: float
    hi: float
    extra: dict = field(default_factory=dict)

    def __repr__(self):
        return f"LDS {self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}] over {len(self.per_query)} queries"

    def to_dict(self) -> dict:
        return {"lds": self.mean, "ci": [self.lo, self.hi], "n_queries": int(len(self.per_query))}


def predicted_outputs(scores, subsets) -> np.ndarray:
    """``g[m, q] = sum_{i in S_m} scores[i, q]``: ``(n_train, Q)`` scores, subsets -> ``(M, Q)``."""
    S = _np(scores)
    mask = subset_mask(subsets, S.shape[0])
    if mask.shape[1] != S.shape[0]:
        raise ValueError(f"subsets cover {mask.shape[1]} training examples, scores have {S.shape[0]} rows")
    return mask.astype(np.float64) @ S


def lds(scores, ground_truth_outputs, subsets, *, queries=None, n_boot: int = 2000, level: float = 0.95,
        seed: int = 0) -> LDSResult:
    """Linear datamodeling score.

    Args:
        scores: ``(n_train, Q)`` attribution scores, positive = the training example helped the query.
        ground_truth_outputs: ``(M, Q)`` or ``(M, S, Q)`` goodness (margin or -loss) of each query under
            the model retrained on subset m (with S seeds, averaged here).
        subsets: ``(M, n_train)`` boolean membership, or ``(M, m)`` training indices.
        queries: optional index array: evaluate only these query columns (e.g. the report split).
        n_boot, level, seed: the bootstrap interval over queries.
    Returns: an ``LDSResult`` (per-query values, mean, interval).
    """
    gt = _np(ground_truth_outputs)
    if gt.ndim == 3:
        gt = gt.mean(1)
    if gt.ndim != 2:
        raise ValueError(f"ground_truth_outputs must be (M, Q) or (M, S, Q), got {gt.shape}")
    S = _np(scores)
    if S.ndim != 2 or S.shape[1] != gt.shape[1]:
        raise ValueError(f"scores must be (n_train, Q) with Q = {gt.shape[1]}, got {S.shape}")
    if queries is not None:
        q = np.asarray(queries)
        S, gt = S[:, q], gt[:, q]
    pred = predicted_outputs(S, subsets)
    if pred.shape[0] != gt.shape[0]:
        raise ValueError(f"{pred.shape[0]} subsets but {gt.shape[0]} ground-truth rows")
    per_q = columnwise_spearman(pred, gt)
    lo, hi = bootstrap_ci(per_q, n_boot=n_boot, level=level, seed=seed)
    return LDSResult(per_q, float(per_q.mean()), lo, hi)


def noise_ceiling(ground_truth_outputs, *, queries=None) -> dict:
    """How well the ground truth agrees with itself: LDS-style Spearman (over subsets, mean over
    queries) between the outputs of seed 0 and seed 1 (and every other pair, averaged).

    Returns ``{"between_seeds": r, "of_mean": r_S}`` where ``r_S = S r / (1 + (S - 1) r)`` (Spearman-Brown)
    estimates the reliability of the S-seed average that the LDS uses; no attribution can be expected
    to exceed about ``sqrt(r_S)`` against it."""
    gt = _np(ground_truth_outputs)
    if gt.ndim != 3 or gt.shape[1] < 2:
        n_seeds = int(gt.shape[1]) if gt.ndim == 3 else 1
        return {"between_seeds": float("nan"), "of_mean": float("nan"), "n_seeds": n_seeds}
    if queries is not None:
        gt = gt[:, :, np.asarray(queries)]
    S = gt.shape[1]
    rs = [columnwise_spearman(gt[:, a], gt[:, b]).mean() for a in range(S) for b in range(a + 1, S)]
    r = float(np.mean(rs))
    r_s = S * r / (1 + (S - 1) * r) if r > -1 / (S - 1) else float("nan")
    return {"between_seeds": r, "of_mean": float(r_s), "n_seeds": S}
