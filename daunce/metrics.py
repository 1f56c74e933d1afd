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

Inputs are checked, never guessed at: subsets are a *bool* membership mask ``(M, n_train)`` or explicit
training indices (an ``(M, m)`` integer array or M lists of indices, possibly of different lengths); an integer
0/1 matrix of shape ``(M, n_train)`` is refused (it would read as indices 0 and 1), as are indices out of range
or negative, an index listed twice in one subset, fewer than two subsets, and a NaN or infinite score or
ground-truth value (refused, not skipped: a query that cannot be scored is a bug upstream).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _finite(a: np.ndarray, what: str) -> np.ndarray:
    """``a``, or a ValueError naming how many entries of ``what`` are NaN or infinite and the first of them."""
    bad = ~np.isfinite(a)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what} has {int(bad.sum())} NaN or infinite value(s) (the first at index {first}): "
                         "remove or fix those queries before scoring")
    return a


def _level(level: float, n_boot: int) -> None:
    if not (isinstance(n_boot, int) and not isinstance(n_boot, bool) and n_boot >= 1):
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ValueError(f"level must lie in (0, 1), got {level!r}")


def _rank(a: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 (average ranks for ties), as floats."""
    from scipy.stats import rankdata

    return rankdata(a, axis=0)


def columnwise_spearman(a, b) -> np.ndarray:
    """Spearman correlation of ``a[:, j]`` with ``b[:, j]`` for every column j: ``(M, Q), (M, Q) -> (Q,)``.
    A constant column gives 0. Raises ValueError for arrays of other shapes, fewer than two rows, or a NaN or
    infinite entry."""
    a, b = _np(a), _np(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (M, Q) arrays of the same shape, got {a.shape} and {b.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"a Spearman correlation over rows needs at least 2 rows, got {a.shape[0]}")
    _finite(a, "the first array")
    _finite(b, "the second array")
    ra, rb = _rank(a), _rank(b)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ra * rb).sum(0) / den
    return np.where(den > 0, r, 0.0)


def subset_mask(subsets, n_train: int | None = None) -> np.ndarray:
    """``(M, n_train)`` boolean membership from a *bool* mask ``(M, n_train)`` or from explicit training indices:
    an ``(M, m)`` integer array, or M sequences of indices (of any lengths).

    Raises ValueError for an integer 0/1 matrix of shape ``(M, n_train)`` (a mask stored as integers would read
    as the indices 0 and 1: pass ``.astype(bool)``), for float or other non-integer subsets, for an index out of
    ``[0, n_train)`` (a negative index is not read from the end), an index listed twice in one subset, a mask of
    another width than ``n_train``, and no subsets at all."""
    if torch.is_tensor(subsets):
        subsets = subsets.detach().cpu().numpy()
    if isinstance(subsets, np.ndarray) and subsets.dtype == object:
        subsets = list(subsets)
    if isinstance(subsets, (list, tuple)) and subsets and not all(np.ndim(r) == 0 for r in subsets):
        rows = [np.asarray(r.detach().cpu().numpy() if torch.is_tensor(r) else r) for r in subsets]
        if any(r.ndim != 1 for r in rows):
            raise ValueError("index subsets must be M one-dimensional sequences of training indices")
        if any(r.dtype == bool for r in rows):
            if len({r.shape for r in rows}) != 1:
                raise ValueError("bool subset rows must all have length n_train")
            return subset_mask(np.stack(rows), n_train)
        if len({len(r) for r in rows}) > 1:  # ragged index lists
            if n_train is None:
                raise ValueError("index subsets need n_train")
            mask = np.zeros((len(rows), n_train), dtype=bool)
            for m, r in enumerate(rows):
                mask[m] = subset_mask(r[None] if r.size else np.zeros((1, 0), dtype=np.int64), n_train)[0]
            return mask
        subsets = np.stack(rows) if rows else np.zeros((0, 0), dtype=np.int64)
    s = np.asarray(subsets)
    if s.ndim != 2:
        raise ValueError(f"subsets must be an (M, n_train) bool mask or (M, m) training indices, got shape {s.shape}")
    if s.shape[0] == 0:
        raise ValueError("no subsets given: the LDS needs the outputs of models retrained on M >= 2 subsets")
    if s.dtype == bool:
        if n_train is not None and s.shape[1] != n_train:
            raise ValueError(f"the bool subset mask has {s.shape[1]} columns, but there are {n_train} training "
                             "examples (scores rows)")
        return s
    if not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"subsets of dtype {s.dtype} are neither a bool mask nor integer training indices: pass a "
                         "bool (M, n_train) mask or index lists")
    if n_train is None:
        raise ValueError("index subsets need n_train")
    if s.shape[1] == n_train and n_train > 2 and s.size and s.min() >= 0 and s.max() <= 1:
        raise ValueError(f"subsets is an integer 0/1 matrix of shape {s.shape} = (M, n_train): read as indices it "
                         "would name only the examples 0 and 1. Pass a bool mask (subsets.astype(bool)) or index "
                         "lists")
    if s.size and (s.min() < 0 or s.max() >= n_train):
        bad = np.argwhere((s < 0) | (s >= n_train))[0]
        raise ValueError(f"subset {int(bad[0])} holds the index {int(s[tuple(bad)])}, outside [0, {n_train}) "
                         f"(n_train = {n_train}); negative indices are not read from the end")
    srt = np.sort(s, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]).any(1) if s.shape[1] > 1 else np.zeros(len(s), dtype=bool)
    if dup.any():
        m = int(np.flatnonzero(dup)[0])
        i = int(srt[m, 1:][srt[m, 1:] == srt[m, :-1]][0])
        raise ValueError(f"subset {m} lists the training index {i} more than once")
    mask = np.zeros((s.shape[0], n_train), dtype=bool)
    np.put_along_axis(mask, s.astype(np.int64), True, axis=1)
    return mask


def bootstrap_ci(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling the entries). Raises ValueError for no
    values or a NaN or infinite one."""
    _level(level, n_boot)
    v = _finite(_np(values).ravel(), "values")
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value, got none")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def nested_bootstrap_ci(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Two-level percentile bootstrap interval of the mean of a ``(n_seeds, n_queries)`` table: each replicate
    draws the seeds (rows: retraining seeds, random draws) with replacement, then the queries (columns) with
    replacement, and averages the cells they select. The interval covers both sources of noise; with one seed
    it is the queries' interval, and a spread between the seeds widens it."""
    _level(level, n_boot)
    v = _np(values)
    if v.ndim != 2 or min(v.shape) < 1:
        raise ValueError(f"nested_bootstrap_ci needs a (n_seeds, n_queries) table, got shape {v.shape}")
    _finite(v, "values")
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
    """``"ahead"`` if the interval of a difference lies above 0, ``"behind"`` if below, else ``"tied"``. Raises
    ValueError for a NaN bound or ``lo > hi``."""
    if not (lo == lo and hi == hi) or lo > hi:
        raise ValueError(f"verdict needs an interval lo <= hi, got ({lo!r}, {hi!r})")
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
    """``g[m, q] = sum_{i in S_m} scores[i, q]``: ``(n_train, Q)`` scores, subsets (as ``subset_mask`` reads
    them) -> ``(M, Q)``."""
    S = _np(scores)
    if S.ndim != 2:
        raise ValueError(f"scores must be (n_train, Q), got shape {S.shape}")
    _finite(S, "scores")
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
        subsets: ``(M, n_train)`` *bool* membership, or training indices (``(M, m)`` integers or M index
            lists); an integer 0/1 ``(M, n_train)`` matrix is refused (``subset_mask``).
        queries: optional index array (or a bool mask of the Q columns): evaluate only these query columns (e.g.
            the report split).
        n_boot, level, seed: the bootstrap interval over queries.
    Returns: an ``LDSResult`` (per-query values, mean, interval).

    Raises ValueError for mismatched shapes, fewer than two subsets, a NaN or infinite score or ground-truth
    value (of the evaluated queries), subsets ``subset_mask`` refuses, and query indices out of range.
    """
    gt = _np(ground_truth_outputs)
    if gt.ndim not in (2, 3):
        raise ValueError(f"ground_truth_outputs must be (M, Q) or (M, S, Q), got {gt.shape}")
    S = _np(scores)
    if S.ndim != 2 or S.shape[1] != gt.shape[-1]:
        raise ValueError(f"scores must be (n_train, Q) with Q = {gt.shape[-1]}, got {S.shape}")
    if queries is not None:
        q = _query_index(queries, S.shape[1])
        S, gt = S[:, q], gt[..., q]
    _finite(gt, "ground_truth_outputs")
    if gt.ndim == 3:
        gt = gt.mean(1)
    pred = predicted_outputs(S, subsets)
    if pred.shape[0] != gt.shape[0]:
        raise ValueError(f"{pred.shape[0]} subsets but {gt.shape[0]} ground-truth rows")
    if pred.shape[0] < 2:
        raise ValueError(f"the LDS is a rank correlation over subsets and needs at least 2, got {pred.shape[0]}")
    per_q = columnwise_spearman(pred, gt)
    lo, hi = bootstrap_ci(per_q, n_boot=n_boot, level=level, seed=seed)
    return LDSResult(per_q, float(per_q.mean()), lo, hi)


def _query_index(queries, Q: int) -> np.ndarray:
    """``queries`` as column indices into Q query columns: integer indices in ``[0, Q)`` or a bool mask of length Q."""
    q = queries.detach().cpu().numpy() if torch.is_tensor(queries) else np.asarray(queries)
    if q.dtype == bool:
        if q.shape != (Q,):
            raise ValueError(f"a bool queries mask must have shape ({Q},), got {q.shape}")
        return np.flatnonzero(q)
    if q.ndim != 1 or (q.size and not np.issubdtype(q.dtype, np.integer)):
        raise ValueError(f"queries must be a 1-D array of integer query indices or a bool mask, got {q.dtype} "
                         f"of shape {q.shape}")
    if q.size == 0:
        raise ValueError("queries selects no query")
    if q.min() < 0 or q.max() >= Q:
        raise ValueError(f"queries holds the index {int(q[(q < 0) | (q >= Q)][0])}, outside [0, {Q}) (Q = {Q} "
                         "score columns); negative indices are not read from the end")
    return q


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
        gt = gt[:, :, _query_index(queries, gt.shape[2])]
    _finite(gt, "ground_truth_outputs")
    S = gt.shape[1]
    rs = [columnwise_spearman(gt[:, a], gt[:, b]).mean() for a in range(S) for b in range(a + 1, S)]
    r = float(np.mean(rs))
    r_s = S * r / (1 + (S - 1) * r) if r > -1 / (S - 1) else float("nan")
    return {"between_seeds": r, "of_mean": float(r_s), "n_seeds": S}
