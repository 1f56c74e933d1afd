"""How many copies are enough? A ground-truth-free reliability estimate of Daunce scores.

Split the K copies into two disjoint halves, score with each half, and correlate the two score
matrices query by query (Pearson over training examples, averaged over queries): the split-half
agreement ``r_half`` of two K/2-copy estimates. Monte-Carlo noise of the covariance shrinks like 1/K,
so the Spearman-Brown formula extrapolates it to any number of copies:

    rel(K') = c r_half / (1 + (c - 1) r_half),   c = K' / (K/2).

``rel(K)`` estimates the correlation of a K-copy score with a second, independent K-copy score; the
correlation with the estimator's own K -> infinity limit is ``sqrt(rel(K))``. So an LDS measured at
K can be extrapolated as ``LDS(K') ~ LDS(K) * sqrt(rel(K') / rel(K))`` (``predicted_curve``).

``fit_until`` grows ``n_models`` until the reliability reaches a target, reusing finished copies
(copy k does not depend on K).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import scores as _scores
from .exact import per_query_pearson


def split_half(A: torch.Tensor, B: torch.Tensor, *, score: str = "cov", n_splits: int = 4, seed: int = 0) -> float:
    """Split-half agreement of the scores from two disjoint random halves of the K copies.

    Args:
        A: ``(K, n)`` training signals; B: ``(K, Q)`` query signals (``Daunce.signals``).
        score: ``"cov"`` or ``"corr"``. n_splits: random splits averaged.
    Returns: the mean over splits and queries of the Pearson correlation (over training examples)
        between the two halves' scores, an estimate of the reliability of a K/2-copy score.
    """
    K = A.shape[0]
    if K < 4:
        raise ValueError(f"split-half reliability needs K >= 4 copies, got {K}")
    g = torch.Generator().manual_seed(seed)
    rs = []
    for _ in range(n_splits):
        perm = torch.randperm(K, generator=g)
        h1, h2 = perm[: K // 2], perm[K // 2 : 2 * (K // 2)]
        s1 = _scores.score(A[h1], B[h1], score)
        s2 = _scores.score(A[h2], B[h2], score)
        rs.append(per_query_pearson(s1, s2).mean().item())
    return float(np.mean(rs))


def spearman_brown(r: float, factor: float) -> float:
    """Reliability of an average of ``factor`` times as many measurements as the one with reliability r."""
    r = float(np.clip(r, -0.999999, 0.999999))
    return factor * r / (1 + (factor - 1) * r)


def reliability(A: torch.Tensor, B: torch.Tensor, *, at: Optional[int] = None, **kw) -> float:
    """Estimated reliability of the score from ``at`` copies (default: all K of ``A``) from the split-half
    agreement of ``A``'s K copies, extrapolated with Spearman-Brown."""
    K = A.shape[0]
    r_half = split_half(A, B, **kw)
    return spearman_brown(r_half, (at or K) / (K // 2))


def copies_needed(A: torch.Tensor, B: torch.Tensor, target: float = 0.9, **kw) -> int:
    """Smallest K whose predicted reliability reaches ``target`` (from the copies in ``A``)."""
    K = A.shape[0]
    r = max(split_half(A, B, **kw), 1e-6)
    half = K // 2
    # solve c r / (1 + (c-1) r) = t  ->  c = t (1 - r) / (r (1 - t))
    c = target * (1 - r) / (r * (1 - target))
    return int(np.ceil(c * half))


def predicted_curve(lds_at_k: float, k: int, ks, rel_fn) -> np.ndarray:
    """Extrapolated LDS at every K in ``ks`` from an LDS measured at ``k`` and a reliability function
    ``rel_fn(K)``: ``LDS(K') = LDS(k) sqrt(rel(K') / rel(k))``."""
    base = max(rel_fn(k), 1e-9)
    return np.array([lds_at_k * np.sqrt(max(rel_fn(kk), 0.0) / base) for kk in ks])


def fit_until(daunce, train, query, *, target: float = 0.9, start: int = 16, step: Optional[int] = None,
              max_models: int = 1024, verbose: bool = False) -> dict:
    """Grow ``daunce.config.n_models`` until the split-half reliability of the scores on ``query`` reaches
    ``target`` (or ``max_models``). Finished copies are reused: copy k does not depend on K.

    Args:
        daunce: a ``Daunce`` object (its config's ``n_models`` is replaced as it grows).
        train, query: datasets; the reliability is measured on these queries.
        target: reliability to reach; start: first K; step: copies added per round (``None``: double K,
            or jump straight to the Spearman-Brown estimate of the K needed when that is smaller).
        max_models: never train more copies than this.
    Returns: ``{"n_models": K reached, "reliability": rel(K), "history": [(K, rel), ...]}``.
    """
    K = max(4, start)
    history = []
    while True:
        daunce.config = daunce.config.replace(n_models=K)
        daunce.fit(train, query)
        A, B = daunce.signals(train), daunce.signals(query)
        rel = reliability(A, B, score=daunce.config.score)
        history.append((K, rel))
        if verbose:
            print(f"K = {K}: reliability {rel:.3f}")
        if rel >= target or K >= max_models:
            return {"n_models": K, "reliability": rel, "history": history}
        if step is not None:
            nxt = K + step
        else:
            need = copies_needed(A, B, target, score=daunce.config.score)
            nxt = max(K + 4, min(2 * K, need))
        K = int(min(max_models, nxt))
