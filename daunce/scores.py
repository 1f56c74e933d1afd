"""Scores from signal matrices: covariance or correlation across the K copies.

Both functions take the training signals ``A`` of shape ``(K, n)`` and the query signals ``B`` of
shape ``(K, m)`` and return ``(n, m)``. A signal that does not vary across the K copies (exactly the same value in
every copy) scores 0 against everything; a ``RuntimeWarning`` counts such training and query examples (with
identical copies, e.g. a one-logit cross-entropy or a bootstrap at subset ratio 1, it is all of them).

Work is done in blocks of training examples, so nothing
larger than the output and the two signal matrices is held at once (each block's centred copy
is at most ``K x block``).
"""

from __future__ import annotations

import warnings

import torch


def _check(A: torch.Tensor, B: torch.Tensor):
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"signal matrices must be 2-D (K, n) and (K, m), got {tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"signal matrices must share K (rows), got {A.shape[0]} and {B.shape[0]}")
    if A.shape[0] < 2:
        raise ValueError("a covariance across copies needs K >= 2 rows")


def _blocked(A, B, normalise: bool, block: int, out, dtype):
    _check(A, B)
    K, n = A.shape
    m = B.shape[1]
    Bc = B.to(dtype)
    flat_q = int((Bc == Bc[:1]).all(0).sum())
    Bc = Bc - Bc.mean(0, keepdim=True)
    flat_i = 0
    if normalise:
        Bc = Bc / Bc.norm(dim=0, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    else:
        Bc = Bc / (K - 1)
    if out is None:
        out = torch.empty(n, m, dtype=A.dtype if A.is_floating_point() else torch.float32)
    elif out.shape != (n, m):
        raise ValueError(f"out must have shape {(n, m)}, got {tuple(out.shape)}")
    for s in range(0, n, block):
        a = A[:, s : s + block].to(dtype)
        flat_i += int((a == a[:1]).all(0).sum())
        a = a - a.mean(0, keepdim=True)
        if normalise:
            a = a / a.norm(dim=0, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        out[s : s + block] = (a.T @ Bc).to(out.dtype)
    if flat_i or flat_q:
        warnings.warn(f"{flat_i} of {n} training and {flat_q} of {m} query signals do not vary across the K = {K} "
                      "copies: their scores are 0. If that is all of them the copies are identical (e.g. "
                      "variant='bootstrap' at subset_ratio=1, a constant loss, rho or sigma2 of 0)", RuntimeWarning,
                      stacklevel=3)
    return out


def covariance(A: torch.Tensor, B: torch.Tensor, *, block: int = 4096, out=None, dtype=torch.float64) -> torch.Tensor:
    """Unbiased covariance across copies: ``S[i, q] = 1/(K-1) sum_k (A[k,i]-mean_i)(B[k,q]-mean_q)``.

    Args:
        A: ``(K, n)`` training signals. B: ``(K, m)`` query signals.
        block: training examples processed at once. out: optional ``(n, m)`` tensor to fill.
        dtype: accumulation dtype (float64 by default; float32 halves the memory of a block).
    Returns: ``(n, m)``, positive = the training example helped the query (signals are losses).
    """
    return _blocked(A, B, False, block, out, dtype)


def correlation(A: torch.Tensor, B: torch.Tensor, *, block: int = 4096, out=None, dtype=torch.float64) -> torch.Tensor:
    """Pearson correlation across copies, ``(n, m)``; a constant signal gives 0."""
    return _blocked(A, B, True, block, out, dtype)


def score(A: torch.Tensor, B: torch.Tensor, kind: str = "cov", **kw) -> torch.Tensor:
    """``covariance`` for ``kind="cov"``, ``correlation`` for ``kind="corr"``."""
    if kind == "cov":
        return covariance(A, B, **kw)
    if kind == "corr":
        return correlation(A, B, **kw)
    raise ValueError(f"score kind must be 'cov' or 'corr', got {kind!r}")
