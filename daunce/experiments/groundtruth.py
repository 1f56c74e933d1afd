"""Ground truth for the LDS: retrain on random half-subsets, record every query's goodness.

``retrain_outputs`` trains one model per (subset m, seed s) and stores the query outputs of each in
a resumable cache (``workdir/gt/m0007_s1.pt``, written atomically): a rerun loads finished retrains,
and a later call with more subsets or seeds trains only the new ones. The outputs are *goodness*
(higher = better on the query): the margin ``logit_y - logsumexp_{c != y} logit_c`` by default, or
``-loss``, so that positive scores (helpful) give a positive LDS (``daunce.metrics``).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..engines.context import resolve_device
from ..parallel import default_workers, fork_map
from ..store import atomic_save, check_manifest, fingerprint
from ..task import margin
from .training import model_device

OUTPUTS = ("margin", "neg_loss")


def half_subsets(n_train: int, n_subsets: int, ratio: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``(M, n_train)`` boolean masks of M random subsets holding ``round(ratio * n)`` examples each."""
    g = torch.Generator().manual_seed(seed)
    m = int(round(ratio * n_train))
    mask = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for j in range(n_subsets):
        mask[j, torch.randperm(n_train, generator=g)[:m]] = True
    return mask


@torch.no_grad()
def goodness(model: torch.nn.Module, data: TensorDataset, kind: str = "margin", batch_size: int = 1024) -> torch.Tensor:
    """Per-example goodness ``(n,)``, float64 on the CPU: the margin (``kind="margin"``) or minus the cross-entropy,
    evaluated in batches on the model's device."""
    if kind not in OUTPUTS:
        raise ValueError(f"kind must be one of {OUTPUTS}, got {kind!r}")
    model.eval()
    dev = model_device(model)
    x, y = data.tensors[:2]
    out = []
    for s in range(0, len(y), batch_size):
        logits = model(x[s : s + batch_size].to(dev))
        yy = y[s : s + batch_size].to(dev)
        out.append(margin(logits, yy) if kind == "margin" else -F.cross_entropy(logits, yy, reduction="none"))
    return torch.cat(out).cpu().double()


def retrain_outputs(make_model: Callable[[int], torch.nn.Module], train_fn: Callable, train: TensorDataset,
                    query: TensorDataset, subsets: torch.Tensor, n_seeds: int = 2, *, kind: str = "margin",
                    workdir: Optional[str | os.PathLike] = None, key: Optional[dict] = None,
                    progress: bool = True, map_fn: Optional[Callable] = None,
                    device: Optional[str | torch.device] = None, workers: Optional[int] = None) -> dict:
    """Retrain on every subset with ``n_seeds`` seeds and record the queries' goodness.

    Args:
        make_model: ``seed -> fresh model`` (the seed sets the initialisation).
        train_fn: ``(model, dataset, seed) -> model``: trains in place (the seed sets the batch order).
        train, query: ``TensorDataset``s. subsets: ``(M, n_train)`` boolean masks (``half_subsets``).
        n_seeds: S, seeds per subset (outputs are averaged by ``daunce.metrics.lds``).
        kind: ``"margin"`` or ``"neg_loss"``. workdir: resumable cache folder (``None``: in memory).
        key: anything else that decides the retrained models (model name, training settings); it is
            stored in the cache's manifest so that a cache of another setting is never reused.
        map_fn: optional ``map_fn(fn, items) -> list`` to run the retrains elsewhere (e.g. a
            ``daunce.engines.ray_executor.map_tasks`` wrapper); default: ``daunce.parallel.fork_map`` over
            ``workers`` forked single-threaded processes (each retrain is saved as it finishes).
        workers: retrains side by side (``None``: ``daunce.parallel.default_workers``, every core, at most
            ``DAUNCE_WORKERS``; 1 on a CUDA device). Each retrain runs single-threaded from its own seed, so the
            outputs are the same whatever the worker count.
        device: where each retrain runs (``"auto"``, ``"cpu"``, ``"cuda"``, ...): the fresh model of ``make_model`` is
            moved there before ``train_fn``; ``None`` leaves it where ``make_model`` put it. The outputs are kept
            on the CPU. The device is not part of the cache's manifest, so retrains finished on another device are
            reused: they follow the same subsets, seeds and batch order, and differ only by floating-point
            rounding (which training may amplify; the LDS averages over retrains anyway).
    Returns: ``{"outputs": (M, S, Q) float64, "subsets": (M, n_train) bool, "seconds": total training
        seconds (summed over retrains, including cached ones), "trained": number trained in this call}``.
    """
    subsets = torch.as_tensor(subsets, dtype=torch.bool)
    M = subsets.shape[0]
    if subsets.shape[1] != len(train):
        raise ValueError(f"subsets cover {subsets.shape[1]} examples, the training set has {len(train)}")
    folder = Path(workdir) / "gt" if workdir is not None else None
    if folder is not None:
        manifest = {"train": fingerprint(train), "query": fingerprint(query), "kind": kind,
                    "subsets": hashlib.sha1(subsets.numpy().tobytes()).hexdigest()[:16], "key": key or {}}
        # more subsets than before is fine: each retrain's record holds its subset's hash, checked on loading
        check_manifest(folder, manifest, what="retrains", ignore=("subsets",))
    x, y = train.tensors[:2]
    dev = resolve_device(device) if device is not None else None

    def one(job):
        m, s = job
        t0 = time.perf_counter()
        idx = subsets[m].nonzero().squeeze(1)
        model = make_model(1000 * s + m)
        if dev is not None:
            model.to(dev)
        train_fn(model, TensorDataset(x[idx], y[idx]), 1000 * s + m)
        return {"outputs": goodness(model, query, kind), "seconds": time.perf_counter() - t0}

    jobs = [(m, s) for m in range(M) for s in range(n_seeds)]
    # retrains on a GPU run in this process (fork_map does so too once CUDA is initialised here)
    n_workers = 1 if dev is not None and dev.type == "cuda" else workers
    done = cached_retrains(one, jobs, subsets, folder, workers=n_workers, map_fn=map_fn, progress=progress)
    out = torch.stack([torch.stack([done[(m, s)]["outputs"] for s in range(n_seeds)]) for m in range(M)])
    return {"outputs": out, "subsets": subsets, "seconds": float(sum(r["seconds"] for r in done.values())),
            "trained": done.trained}


class Retrains(dict):
    """``{(m, s): record}`` of ``cached_retrains``, with the number of retrains this call made (``trained``)."""

    trained = 0


def retrain_path(folder: str | os.PathLike, m: int, s: int) -> Path:
    """The file of the retrain on subset ``m`` under seed ``s``: ``folder/m0007_s1.pt``."""
    return Path(folder) / f"m{m:04d}_s{s}.pt"


def subset_hash(mask: torch.Tensor) -> str:
    """16 hex digits naming one subset's ``(n_train,)`` bool membership (stored in each retrain's record)."""
    return hashlib.sha1(torch.as_tensor(mask, dtype=torch.bool).numpy().tobytes()).hexdigest()[:16]


def cached_retrains(one: Callable[[tuple[int, int]], dict], jobs: Sequence[tuple[int, int]], subsets: torch.Tensor,
                    folder: Optional[str | os.PathLike], *, workers: Optional[int] = None,
                    map_fn: Optional[Callable] = None, progress: bool = True,
                    desc: str = "ground-truth retrains") -> Retrains:
    """The resumable fan-out of the LDS ground truth: ``one((m, s)) -> record`` (a dict of tensors and numbers) for
    every job ``(subset m, seed s)`` of ``jobs`` whose file (``retrain_path(folder, m, s)``) is not there yet, each
    record saved atomically as soon as it is computed (in the worker), so an interrupted run loses only the running
    retrains and a rerun retrains nothing. Each record is stored with the hash of its subset (``subset_hash`` of
    ``subsets[m]``); a stored record of another subset is refused with a ValueError naming its file, so a folder
    whose subsets were drawn differently is never read as this run's (records written before the hash was kept are
    taken as they are). ``folder=None``: nothing stored.

    The jobs run ``workers`` at a time in forked single-threaded processes (``daunce.parallel.fork_map``; ``None``:
    ``default_workers()``), or through ``map_fn(fn, items) -> list`` where given. ``one`` must take its randomness
    from its job (a seed), never from a shared generator: the records are then the same whatever the worker count.
    Returns ``Retrains``: every job's record, and ``trained`` (how many this call computed)."""
    subsets = torch.as_tensor(subsets, dtype=torch.bool)
    hashes = {m: subset_hash(subsets[m]) for m in sorted({m for m, _ in jobs})}

    def run(job):
        rec = dict(one(job), subset=hashes[job[0]])
        if folder is not None:
            atomic_save(rec, retrain_path(folder, *job))
        return rec

    done = Retrains()
    if folder is not None:
        for j in jobs:
            p = retrain_path(folder, *j)
            if p.exists():
                rec = torch.load(p, weights_only=True)
                if rec.get("subset", hashes[j[0]]) != hashes[j[0]]:
                    raise ValueError(f"{p} holds a retrain on another subset {j[0]} than this run's (subset hash "
                                     f"{rec['subset']} stored, {hashes[j[0]]} now): the subsets were drawn "
                                     "differently; use a new folder or delete it")
                done[j] = rec
    todo = [j for j in jobs if j not in done]
    if map_fn is not None and todo:
        for j, rec in zip(todo, map_fn(run, todo)):
            done[j] = rec
    elif todo:
        fork_map(run, todo, workers if workers is not None else default_workers(), on_result=done.__setitem__,
                 desc=desc, progress=progress, labels=[f"retrain m{m} s{s}" for m, s in todo])
    done.trained = len(todo)
    return done


def split_queries(n_query: int, n_tune: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (tune, report) query indices: settings are chosen on ``tune``, LDS is reported on ``report``."""
    perm = np.random.default_rng(seed).permutation(n_query)
    return np.sort(perm[:n_tune]), np.sort(perm[n_tune:])
