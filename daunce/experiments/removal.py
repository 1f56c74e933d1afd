"""Notebook 03's removal test as functions: theta0 per retraining seed, the check of its recipe, the settings of
converged Daunce copies, the controls' scores and the retrains, each cached in the work folder with the seconds it
took (a resumed run reads them back and reports the same costs). The files are named by set and seed only (the LDS
retrains alone check a manifest), so the work folder must be keyed to what decides them: notebook 03 names it by a
hash of the model, the data and theta0's recipe (``daunce.experiments.paths.settings_key``), so that another recipe
never reads them.

The LLM LDS's ground truth (``lds_ground_truth``): theta0's recipe on random half-subsets of the training set, each
query's response NLL after each, one small file per (subset, seed) in the work folder.

The removal test: rank the training examples by their score summed over the query set, remove the top k,
re-fine-tune with theta0's recipe from the same initial adapters under a retraining seed, and record each query's
NLL increase over theta0 of that seed (``daunce.llm.retrain_without``). ``Removals.table`` gives one method's
``(n_seeds, n_queries)`` table of increases, the input of ``daunce.metrics.nested_bootstrap_ci``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .. import auto, llm, parallel
from ..config import DaunceConfig
from ..method import Daunce
from ..store import atomic_save, atomic_write_json, check_manifest, fingerprint, model_fingerprint
from .costs import CostLog
from .groundtruth import cached_retrains

__all__ = ["Removals", "constant_scores", "copy_settings", "daunce_scores", "lds_ground_truth", "recipe_check",
           "run_removals", "theta0_per_seed"]


def _cached_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def recipe_check(model, init_state: dict, data: dict, recipe: dict, *, seed: int, batch: int, work: Path,
                 costs: CostLog) -> dict:
    """Per set, theta0's recipe against twice its epochs (seed ``seed``): ``{"epochs": [E, 2E], "train_nll": [..],
    "query_nll": [..], "seconds": [..]}``, the mean response NLL of the training set and of the queries after each.
    A recipe has reached its plateau where more epochs no longer lower the query NLL. Cached in
    ``work/recipe_check.json``."""
    path = Path(work) / "recipe_check.json"
    out = _cached_json(path) or {}
    E = int(recipe["epochs"])
    for name, d in data.items():
        if name in out:
            continue
        row = {"epochs": [E, 2 * E], "train_nll": [], "query_nll": [], "seconds": []}
        for epochs in row["epochs"]:
            with llm.Timer() as t:
                llm.load_trainable_state(model, init_state)
                llm.finetune(model, None, d["train"], seed=seed, progress=False, **dict(recipe, epochs=epochs))
            row["seconds"].append(t.seconds)
            row["train_nll"].append(float(llm.response_nll(model, None, d["train"], batch).mean()))
            row["query_nll"].append(float(llm.response_nll(model, None, d["query"], batch).mean()))
        out[name] = row
        atomic_write_json(out, path)
        costs.record(f"recipe_check_{name}", seconds=sum(row["seconds"]), fine_tunes=2)
    llm.load_trainable_state(model, init_state)
    return out


def theta0_per_seed(model, init_state: dict, d: dict, recipe: dict, seeds: Sequence[int], *, work: Path,
                    costs: CostLog, name: str, batch: int) -> tuple[dict, dict]:
    """``(theta0 adapters per seed, theta0's per-query NLL per seed)`` for one set: the recipe from ``init_state``
    under each seed (the seed orders the minibatches); adapters kept in ``work/theta0_<name>_seed<s>.pt`` and each
    fine-tune's seconds under the cost key ``"theta0"``."""
    states, qloss = {}, {}
    for s in seeds:
        path = Path(work) / f"theta0_{name}_seed{s}.pt"
        if path.exists():
            llm.load_trainable_state(model, torch.load(path, weights_only=True))
        else:
            with llm.Timer() as t:
                llm.load_trainable_state(model, init_state)
                llm.finetune(model, None, d["train"], seed=s, progress=False, **recipe)
            atomic_save(llm.trainable_state(model), path)
            costs.add("theta0", f"{name}|{s}", seconds=t.seconds, fine_tunes=1,
                      forward_passes=len(d["train"]) * recipe["epochs"])
        states[s] = llm.trainable_state(model)
        qloss[s] = llm.response_nll(model, None, d["query"], batch)
    return states, qloss


def copy_settings(model, task, train, daunce_cfg: dict, K: int, *, work: Path, costs: CostLog, name: str,
                  batch: int, n_examples: int = 16, lanczos_steps: int = 8) -> dict:
    """Settings of full-batch Daunce copies from the curvature at the model's current adapters (theta0), without
    ground truth: a short Lanczos run (``daunce.auto.curvature_spectrum`` on ``n_examples`` training examples),
    the damping at which ``d_lambda = K`` (``daunce.auto.damping_for``: K copies resolve at most K directions)
    and the heavy-ball ``lr`` / ``momentum`` for curvatures in ``[lambda, 6 c_max + lambda]``
    (``daunce.auto.heavy_ball``). The damping is at least the smallest curvature the heavy-ball step resolves
    (``auto.MIN_CURVATURE_RATIO`` of its bound ``auto.CURVATURE_SAFETY * c_max``): where the curvature has fewer than
    K directions (``d_lambda < K`` at every damping, as the ``efim`` form's on 40 instruction-following examples in
    notebook 03), the d_lambda = K rule has no answer and a damping near zero leaves directions in which the copies
    neither feel a restoring force nor converge (there, at 1e-12 c_max, they drifted to the uniform next-token
    distribution: every loss ln V). ``at_floor`` records whether that bound set the damping. Cached in the JSON
    file ``work``; its seconds under ``curvature_<name>``."""
    path = Path(work)
    cached = _cached_json(path)
    if cached is not None:
        return cached
    cfg = DaunceConfig(n_models=K, damping=1.0, lr=1.0, momentum=0.0,
                       **{k: v for k, v in daunce_cfg.items() if k not in ("damping", "lr", "momentum")})
    dn = Daunce(model, task, cfg, eval_batch_size=batch, progress=False)
    with llm.Timer() as t:
        nodes, weights = auto.curvature_spectrum(dn.context, cfg, train, n_examples=n_examples,
                                                 steps=lanczos_steps, probes=1)
    top = float(nodes.max())
    floor = auto.MIN_CURVATURE_RATIO * auto.CURVATURE_SAFETY
    lam = auto.damping_for(nodes, weights, K, floor=floor)
    lr, momentum = auto.heavy_ball(top, lam)
    out = dict(damping=lam, at_floor=bool(lam <= floor * top * (1 + 1e-9)), lr=lr, momentum=momentum, top_curvature=top,
               d_lambda=auto.effective_dimension(nodes, weights, lam), lanczos_steps=lanczos_steps,
               curvature_examples=min(n_examples, len(train)), seconds=t.seconds)
    atomic_write_json(out, path)
    costs.record(f"curvature_{name}", seconds=t.seconds)
    return out


def daunce_scores(model, task, d: dict, daunce_cfg: dict, K: int, settings: dict, *, workdir: Path, batch: int,
                  damping_factor: float = 1.0, stop_unconverged: bool = False) -> tuple:
    """Daunce on one set from the model's current adapters (theta0): ``(scores (n_train, n_query), record)``.

    The damping is ``damping_factor`` times ``settings["damping"]`` (``copy_settings``' d_lambda = K floor for the
    same form), the heavy-ball ``lr`` / ``momentum`` are set for curvatures in ``[lambda, 6 c_max + lambda]`` at that
    damping (``daunce.auto.heavy_ball``); the other fields (form, noise term, rho, ...) are ``daunce_cfg``'s. The
    copies are kept in ``workdir`` (a rerun resumes; a larger K trains only the new copies). ``record``: the
    damping, lr, momentum, each copy's steps and stopping test, the copies' seconds (``per_copy_s`` as recorded
    when each was trained), ``copies_trained`` in this call, and ``eligible``: at least
    ``copyruns.MIN_CONVERGED`` of the K copies passed their stopping test (notebook 02's rule for a tuning candidate).
    Warnings of copies at the step cap are not raised: ``converged`` records them.

    ``stop_unconverged``: the copies grow in stages (2, 4, 8, ..., K; copy k does not depend on K) and the set stops
    at the first stage below K with more copies at the step cap than K's allowance (``copyruns.allowed_stragglers``), as
    a tuning candidate in notebook 02 does: such a set can no longer be eligible, so its remaining copies are not
    trained. A stopped set returns ``None`` scores and records ``stopped_at`` (the stage); a set that reaches K is
    scored, eligible or not."""
    import warnings

    from .copyruns import allowed_stragglers, converged_share, doubling_stages, is_eligible

    lam = float(settings["damping"]) * damping_factor
    lr, momentum = auto.heavy_ball(settings["top_curvature"], lam)
    cfg = DaunceConfig(n_models=K, **{**daunce_cfg, "damping": lam, "lr": lr, "momentum": momentum})
    stages = doubling_stages(K) if stop_unconverged else [K]
    stopped_at, trained, scores = None, 0, None
    with llm.Timer() as t, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Daunce: .* reached max_steps", category=RuntimeWarning)
        for k in stages:
            dn = Daunce(model, task, cfg.replace(n_models=k), workdir=workdir, eval_batch_size=batch, progress=False)
            dn.fit(d["train"], d["query"])
            trained += len(dn.trained_copies)
            if stop_unconverged and k < K and dn.n_unconverged > allowed_stragglers(K):
                stopped_at = k
                break
        if stopped_at is None:
            scores = dn.attribute(d["train"], d["query"])
    n = dn.config.n_models
    steps = [int(dn.store.load(j)["steps"]) for j in range(n)]
    converged = [bool(dn.store.load(j)["converged"]) for j in range(n)]
    eligible = is_eligible(False, stopped_at, converged_share(converged))   # notebook 02's rule (CopyRun.eligible)
    return scores, dict(damping=lam, damping_factor=damping_factor, lr=lr, momentum=momentum, steps=steps,
                        converged=converged, n_converged=int(sum(converged)), this_run_s=t.seconds,
                        copies_trained=trained, per_copy_s=dn.training_seconds() / n,
                        total_s=dn.training_seconds(), stopped_at=stopped_at, eligible=bool(eligible))


def constant_scores(values, n_query: int) -> torch.Tensor:
    """``(n_train, n_query)`` scores that give every query the same per-example value (a control such as
    theta0's training loss or the gradient norm: the removal then takes the examples with the largest values)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1, 1)
    return v.expand(-1, n_query).clone()


class Removals(dict):
    """``{"<set>|<method>|<k>|<seed>": {"removed", "per_query_increase", "seconds", "forward_passes"}}`` with the
    number of retrains this run made (``n_new``) and the workers they ran on (``workers``)."""

    n_new = 0
    workers = 1

    def table(self, name: str, method: str, k: int, seeds: Sequence[int]) -> np.ndarray:
        """``(n_seeds, n_queries)``: each query's NLL increase after the removal, one row per retraining seed."""
        return np.array([self[f"{name}|{method}|{k}|{s}"]["per_query_increase"] for s in seeds], dtype=float)


def random_removal(n: int, k: int, seed: int) -> torch.Tensor:
    """The random set removed under retraining seed ``seed``: a new draw per seed (and per k)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(1000 * seed + k))[:k]


#: memory one removal retrain of the default profile's model needs beside the parent (bytes; SmolLM2-135M with LoRA,
#: its optimiser state and activations at batch 8 x 128 tokens, with room to spare): bounds the workers
RETRAIN_MEMORY = 2.5e9


def run_removals(model, init_state: dict, data: dict, scores: dict, methods: Sequence[str], ks: dict,
                 seeds: Sequence[int], recipe: dict, base_qloss: dict, *, path: Path, batch: int,
                 workers: Optional[int] = None) -> Removals:
    """Every (set, method, k, seed) retrain that is not in ``path`` with the same removed set yet; the file is
    rewritten as each finishes. ``"random"`` removes a new random set per seed; every other method its top k by the
    score summed over the queries (``daunce.llm.top_k_removal``); ``scores[name][m]`` is one ``(n_train, n_query)``
    tensor for every seed, or ``{seed: tensor}`` (each retraining seed removes by its own attribution draw, e.g. from
    its own theta0). The retrains run ``workers`` at a time in forked
    single-threaded processes (``daunce.parallel.fork_map``; ``None``: every core, at most ``DAUNCE_WORKERS``, as
    many as the memory holds at ``RETRAIN_MEMORY`` each; 1 on a CUDA model), so the results do not depend on the
    worker count; a retrain's ``seconds`` are those of its worker."""
    path = Path(path)
    out = Removals(_cached_json(path) or {})
    out.n_new = 0
    todo = []
    for name, d in data.items():
        n = len(d["train"])
        for k in ks[name]:
            for seed in seeds:
                for m in methods:
                    S = scores[name][m] if m != "random" else None
                    S = S[seed] if isinstance(S, dict) else S   # per seed: that seed's own attribution draw
                    removed = random_removal(n, k, seed) if m == "random" else llm.top_k_removal(S, k)
                    key = f"{name}|{m}|{k}|{seed}"
                    if key in out and out[key]["removed"] == removed.tolist():
                        continue   # finished in an earlier run with the same removed set
                    todo.append((key, name, seed, removed))

    def retrain(job):
        key, name, seed, removed = job
        d = data[name]
        with llm.Timer() as t:
            llm.retrain_without(model, init_state, d["train"], removed, seed=seed, progress=False, **recipe)
            q = llm.response_nll(model, None, d["query"], batch)
        return dict(removed=removed.tolist(), per_query_increase=(q - base_qloss[name][seed]).tolist(),
                    seconds=t.seconds, forward_passes=(len(d["train"]) - len(removed)) * recipe["epochs"]
                    + len(d["query"]))

    def save(job, rec):
        out[job[0]] = rec
        atomic_write_json(dict(out), path)
        out.n_new += 1

    device = next(model.parameters()).device
    out.workers = 1 if device.type == "cuda" else (
        workers if workers is not None else parallel.default_workers(RETRAIN_MEMORY, device))
    parallel.fork_map(retrain, todo, out.workers, on_result=save, progress=False, labels=[job[0] for job in todo])
    return out


def lds_ground_truth(model, init_state: dict, train, query, subsets, recipe: dict, *, n_repeat: int = 0,
                     n_seeds: int = 2, batch: int = 16, workdir=None, key: Optional[dict] = None,
                     workers: Optional[int] = None, progress: bool = False) -> dict:
    """The LDS ground truth of one set: theta0's recipe on every subset, each query's mean response NLL after it.

    Subset m is fine-tuned from the seeded initial adapters ``init_state`` (as theta0 and the removal retrains are)
    on ``train.subset(subsets[m])`` with ``recipe`` (``daunce.llm.finetune``: epochs, lr, batch_size, ...) under the
    seed ``1000 * s + m`` (it orders the minibatches) for seed index ``s = 0``, and for ``s = 1 .. n_seeds - 1`` too on
    the first ``n_repeat`` subsets (their seed-to-seed agreement is the noise ceiling). Each retrain is kept in
    ``workdir/gt/m0007_s1.pt`` (``daunce.experiments.groundtruth.cached_retrains``: saved as it finishes, never
    retrained, refused if drawn on another subset) beside a manifest that binds the folder to the training and query
    sets, the model with its initial adapters, the recipe and ``key``; more subsets or more repeats later train only
    the new ones. The retrains run ``workers`` at a time in forked single-threaded processes (``None``: every core,
    at most ``DAUNCE_WORKERS``, as many as the memory holds at ``RETRAIN_MEMORY`` each; 1 on a CUDA model), so the
    values do not depend on the worker count. The model's adapters are restored before returning.

    Args:
        model: the peft model theta0 was trained as (its frozen weights define every retrain); init_state: its
            adapters right after ``add_lora`` (``trainable_state``). train, query: ``daunce.llm.TextDataset``s.
        subsets: ``(M, n_train)`` bool masks (``daunce.experiments.groundtruth.half_subsets``).
        n_repeat: how many subsets (the first ones) get every seed; n_seeds: seeds on those (the others get one).
    Returns: ``{"nll": (M, n_seeds, Q) float64 (NaN where a subset has no such seed), "outputs": (M, Q) goodness,
        minus the mean NLL over the seeds each subset has (higher = better on the query: ``daunce.metrics.lds``'s
        ground truth, with which helpful = positive scores give a positive LDS), "repeats": (n_repeat, n_seeds, Q)
        the goodness of the repeated subsets (``daunce.metrics.noise_ceiling``'s input), "subsets": (M, n_train)
        bool, "seconds": summed fine-tune seconds (cached ones included), "trained": retrains made in this call,
        "workers"}``. The noise ceiling: ``daunce.metrics.noise_ceiling(out["repeats"])``; where most subsets have one
        seed, the LDS is bounded by about the square root of its ``between_seeds`` (its ``of_mean`` holds for a ground
        truth averaged over every seed).
    Raises ValueError for subsets of another width than the training set, an empty subset, ``n_repeat`` outside
    ``[0, M]`` and ``n_seeds < 1``."""
    subsets = torch.as_tensor(subsets, dtype=torch.bool)
    M = subsets.shape[0]
    if subsets.ndim != 2 or subsets.shape[1] != len(train):
        raise ValueError(f"subsets must be (M, n_train) = (M, {len(train)}) bool masks, got {tuple(subsets.shape)}")
    empty = (~subsets.any(1)).nonzero()
    if len(empty):
        raise ValueError(f"subset {int(empty[0, 0])} holds no training example")
    if not 0 <= n_repeat <= M:
        raise ValueError(f"n_repeat must lie in [0, {M}] (the number of subsets), got {n_repeat}")
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
    before = llm.trainable_state(model)
    llm.load_trainable_state(model, init_state)
    folder = Path(workdir) / "gt" if workdir is not None else None
    if folder is not None:
        manifest = {"train": fingerprint(train), "query": fingerprint(query), "model": model_fingerprint(model),
                    "recipe": recipe, "measurement": "mean response NLL", "key": key or {}}
        check_manifest(folder, manifest, what="LDS retrains")

    def one(job):
        m, s = job
        with llm.Timer() as t:
            llm.load_trainable_state(model, init_state)
            llm.finetune(model, None, train.subset(subsets[m].nonzero().squeeze(1)), seed=1000 * s + m,
                         progress=False, **recipe)
            nll = llm.response_nll(model, None, query, batch)
        return {"nll": nll, "seconds": t.seconds}

    jobs = [(m, s) for m in range(M) for s in range(n_seeds if m < n_repeat else 1)]
    device = next(model.parameters()).device
    n_workers = 1 if device.type == "cuda" else (
        workers if workers is not None else parallel.default_workers(RETRAIN_MEMORY, device))
    try:
        done = cached_retrains(one, jobs, subsets, folder, workers=n_workers, progress=progress,
                               desc="LDS retrains")
    finally:
        llm.load_trainable_state(model, before)
    nll = torch.full((M, n_seeds, len(query)), float("nan"), dtype=torch.float64)
    for (m, s), rec in done.items():
        nll[m, s] = rec["nll"]
    return {"nll": nll, "outputs": -nll.nanmean(1), "repeats": -nll[:n_repeat], "subsets": subsets,
            "seconds": float(sum(r["seconds"] for r in done.values())), "trained": done.trained,
            "workers": n_workers}
