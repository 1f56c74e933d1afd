"""Notebook 03's LLM LDS as functions: tuning and report queries split by topic, an LDS row with an interval that
resamples topics, a knob chosen by the LDS on the tuning queries, each removal's effect as a share of the whole
fine-tune's effect, and (from ``paths``) the key that names each cached file by the settings that decide it
(``settings_key``).

Conventions: scores are ``(n_train, n_query)``, positive = helpful (removing the example raises the query's NLL);
the ground truth is ``daunce.experiments.removal.lds_ground_truth``'s dict (``outputs`` ``(M, Q)`` goodness,
``subsets`` ``(M, n_train)`` bool); ``queries`` are column indices into the Q queries; ``groups`` holds one label
per query (its topic or category), and queries that share a label are resampled together.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .. import metrics
from ..store import atomic_save
from . import tuning
from .costs import CostLog
from .paths import settings_key

__all__ = ["MIN_TOPICS", "cached", "effect_share", "group_means", "grouped_bootstrap_ci", "lds_row", "query_split",
           "settings_key", "tune_by_lds"]


#: each half of a set's queries (tuning, report) should hold at least this many topics: the LDS's interval resamples
#: topics, and a half of two or three topics gives it next to nothing to resample
MIN_TOPICS = 8


def query_split(groups: Sequence, seed: int = 0, *, min_groups: int = MIN_TOPICS,
                name: str = "queries") -> tuple[np.ndarray, np.ndarray]:
    """``(tuning, report)`` query indices, disjoint, covering every query; whole groups (topics) go to one side, so no
    group is in both halves. The distinct groups, shuffled from ``seed``, are dealt largest first to the half with
    fewer groups (ties: the one with fewer queries, then the tuning half), so of ``n`` groups the halves hold
    ``n // 2`` and ``n - n // 2``, with about as many queries each. Where a half holds fewer than ``min_groups`` groups
    (the set has fewer than ``2 * min_groups`` topics) it prints so, naming the set ``name`` and the counts. With a
    single group the queries themselves are dealt alternately (printed too: the interval then resamples queries).
    Raises ValueError for fewer than two queries."""
    labels = list(groups)
    if len(labels) < 2:
        raise ValueError(f"query_split needs at least 2 queries to split into tuning and report, got {len(labels)}")
    uniq = sorted({str(g) for g in labels})
    if len(uniq) < 2:
        print(f"{name}: one topic ({uniq[0]!r}) for all {len(labels)} queries: the queries are dealt alternately to "
              "the tuning and report halves, and the interval resamples queries, not topics")
        idx = np.arange(len(labels))
        return idx[0::2], idx[1::2]
    random.Random(seed).shuffle(uniq)
    size = {g: sum(str(x) == g for x in labels) for g in uniq}
    halves: list[list[str]] = [[], []]
    for g in sorted(uniq, key=lambda g: -size[g]):   # stable: ties keep the shuffled order
        halves[min((0, 1), key=lambda h: (len(halves[h]), sum(size[x] for x in halves[h]), h))].append(g)
    if min(len(h) for h in halves) < min_groups:
        print(f"{name}: {len(uniq)} topics in all, so the tuning half holds {len(halves[0])} and the report half "
              f"{len(halves[1])}, fewer than the {min_groups} each half should hold: the set has no more")
    tune = np.array([i for i, x in enumerate(labels) if str(x) in halves[0]])
    report = np.array([i for i, x in enumerate(labels) if str(x) in halves[1]])
    return tune, report


def grouped_bootstrap_ci(values, groups: Sequence, *, n_boot: int = 2000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` (one per query) resampling whole groups with replacement
    (every query of a drawn group enters; the mean is over the queries drawn). With a single group it resamples the
    queries (``daunce.metrics.bootstrap_ci``). Raises ValueError for a length mismatch or a non-finite value."""
    v = np.asarray(values, dtype=float)
    labels = [str(g) for g in groups]
    if v.ndim != 1 or len(v) != len(labels):
        raise ValueError(f"values must be 1-D with one entry per group label: {v.shape} against {len(labels)} labels")
    if not np.isfinite(v).all():
        raise ValueError(f"grouped_bootstrap_ci: value {int(np.flatnonzero(~np.isfinite(v))[0])} is not finite")
    uniq = sorted(set(labels))
    if len(uniq) < 2:
        return metrics.bootstrap_ci(v, n_boot=n_boot, level=level, seed=seed)
    sums = np.array([v[[x == g for x in labels]].sum() for g in uniq])
    counts = np.array([sum(x == g for x in labels) for g in uniq], dtype=float)
    draw = np.random.default_rng(seed).integers(0, len(uniq), size=(n_boot, len(uniq)))
    means = sums[draw].sum(1) / counts[draw].sum(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def lds_row(scores, gt: dict, queries, groups: Sequence, **kw) -> dict:
    """One method's LDS on the queries ``queries``: ``{"lds", "ci", "n_queries", "n_groups", "per_query"}``, the
    mean over those queries of the Spearman correlation (over the subsets) between the scores summed over each
    subset and the ground truth's goodness (``daunce.metrics.lds``), its interval resampling the queries' groups
    (``grouped_bootstrap_ci``; ``kw``: its ``n_boot``, ``level``, ``seed``)."""
    q = np.asarray(queries)
    res = metrics.lds(scores, gt["outputs"], gt["subsets"], queries=q)
    g = [groups[i] for i in q]
    lo, hi = grouped_bootstrap_ci(res.per_query, g, **kw)
    return dict(lds=res.mean, ci=[lo, hi], n_queries=int(len(q)), n_groups=len(set(map(str, g))),
                per_query=[float(x) for x in res.per_query])


def tune_by_lds(candidates: dict, gt: dict, tuning_queries) -> dict:
    """The candidate (``{label: (n_train, Q) scores}``) with the highest LDS on the tuning queries:
    ``{"chosen": label, "tune_lds": {label: LDS}}`` (ties: the first; constant scores rank no subset above another and
    get 0; an undefined LDS is recorded as None and never chosen). Raises ValueError when no candidate has a finite
    LDS."""
    q = np.asarray(tuning_queries)
    rows = [dict(label=lab, tune_lds=float(metrics.lds(S, gt["outputs"], gt["subsets"], queries=q).mean))
            for lab, S in candidates.items()]
    best = tuning.choose(rows)
    if best is None:
        raise ValueError("tune_by_lds: no candidate has a finite LDS on the tuning queries: "
                         f"{[r['label'] for r in rows]}")
    return {"chosen": best["label"],
            "tune_lds": {r["label"]: None if math.isnan(r["tune_lds"]) else r["tune_lds"] for r in rows}}


def group_means(table, groups: Sequence) -> np.ndarray:
    """``(n_seeds, n_groups)``: each row's mean over the queries of each group (groups in sorted order), from a
    ``(n_seeds, n_queries)`` table; a two-level bootstrap over its rows and columns then resamples seeds and whole
    groups (queries that share a topic are not treated as independent)."""
    t = np.asarray(table, dtype=float)
    labels = [str(g) for g in groups]
    if t.ndim != 2 or t.shape[1] != len(labels):
        raise ValueError(f"table must be (n_seeds, n_queries) with one group label per query: {t.shape} against "
                         f"{len(labels)} labels")
    return np.stack([t[:, [x == g for x in labels]].mean(1) for g in sorted(set(labels))], axis=1)


def cached(path, compute: Callable, *, costs: Optional[CostLog] = None, key: Optional[str] = None):
    """``compute()``'s value (tensors, lists, dicts, numbers), kept in ``path`` with the seconds it took; a later call
    loads it instead. With ``costs``, the seconds are recorded under ``key`` when computed (a resumed run reads them
    back from the cost log)."""
    import time

    path = Path(path)
    if path.exists():
        return torch.load(path, weights_only=True)["value"]
    t0 = time.perf_counter()
    value = compute()
    seconds = time.perf_counter() - t0
    atomic_save({"value": value, "seconds": seconds}, path)
    if costs is not None and key is not None:
        costs.record(key, seconds=seconds)
    return value


def effect_share(increase, whole_effect) -> float:
    """A removal's effect as a share of the whole fine-tune's: the mean query-NLL increase after the removal over
    the mean decrease that theta0's fine-tune made (base model's NLL minus theta0's, the same seeds and queries).
    ``increase`` and ``whole_effect``: arrays of the same shape (e.g. seeds x queries). 1 = the removal undid the
    whole fine-tune's effect on the queries, 0 = none of it. Raises ValueError where the fine-tune did not lower the
    queries' mean NLL (no effect to take a share of) or for a shape mismatch."""
    inc, whole = np.asarray(increase, dtype=float), np.asarray(whole_effect, dtype=float)
    if inc.shape != whole.shape:
        raise ValueError(f"effect_share: increase {inc.shape} and whole_effect {whole.shape} differ in shape")
    if not whole.mean() > 0:
        raise ValueError(f"effect_share: the fine-tune did not lower the queries' mean NLL ({whole.mean():+.4g})")
    return float(inc.mean() / whole.mean())
