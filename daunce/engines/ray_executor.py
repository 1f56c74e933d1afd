"""Fan work out over a Ray cluster (or run it here), with every result stored on disk by key.

Two entry points:

* ``map_tasks(fn, items, workdir, executor=...)``: run ``fn(item)`` for every item, save each result
  atomically as ``workdir/<key>.pt``, skip keys already there. Generic: the LDS ground truth (one
  retrained model per subset and seed) or any other embarrassingly parallel job.
* ``Daunce(..., executor="ray")`` calls ``fit_on_ray``: the K perturbed copies are split into blocks,
  one Ray task per block; each task trains its copies (vmap or sequential, as ``trainer`` says) and
  writes them to ``workdir/copies/`` exactly as a local run does, so a local run can resume a Ray run
  and the other way round.

Failure handling: a task whose worker dies (killed, out of memory, node lost) is retried by Ray up to
``max_retries`` times; a retried task redoes only what is not on disk yet. A driver that dies is
restarted by running the same code again: finished keys / copies are skipped.

Ray is imported lazily; ``executor="local"`` needs no Ray at all.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from ..progress import progress_bar
from ..store import atomic_save

#: Where work runs: in this process, or as Ray tasks.
EXECUTORS = ("local", "ray")


# ------------------------------------------------------------------------------------------ helpers
def _ray(init: Optional[dict] = None):
    """The ``ray`` module, initialised (with ``init`` kwargs, or ``RAY_ADDRESS`` / a local instance)."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is in the "distributed" extra
        raise ImportError("executor='ray' needs Ray: pip install 'daunce[distributed]'") from e
    if not ray.is_initialized():
        ray.init(**{"include_dashboard": False, "log_to_driver": False, **(init or {})})
    return ray


def _wait_all(ray, refs: list, bar) -> list:
    """``ray.get`` of every ref, updating ``bar`` as tasks finish; re-raises the first failure."""
    pending, done = list(refs), []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done.extend(ray.get(ready))
        bar.update(len(ready))
    bar.close()
    return done


_SAFE = re.compile(r"[^A-Za-z0-9_.=-]+")


def default_key(item: Any) -> str:
    """A file-name-safe key for an item: its ``str`` with unsafe characters replaced."""
    key = _SAFE.sub("_", str(item)).strip("._")
    if not key:
        raise ValueError(f"item {item!r} gives an empty key; pass key=...")
    return key[:200]


def result_path(workdir: os.PathLike, key: str) -> Path:
    return Path(workdir) / f"{key}.pt"


def _run_and_save(fn: Callable, item: Any, path: str) -> str:
    """Worker side of ``map_tasks``: skip if the result exists (a retried or repeated task)."""
    if not os.path.exists(path):
        atomic_save(fn(item), Path(path))
    return path


# ---------------------------------------------------------------------------------------- map_tasks
def map_tasks(fn: Callable[[Any], Any], items: Iterable, workdir: os.PathLike, *,
              key: Callable[[Any], str] = default_key,
              executor: str = "local", num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3,
              ray_init: Optional[dict] = None, progress: bool = True, load: bool = True) -> dict:
    """Run ``fn(item)`` for every item; each result is saved atomically to ``workdir/<key(item)>.pt``.

    Items whose result file exists are not run again, so an interrupted call resumes where it stopped.

    Args:
        fn: a picklable function of one item (for Ray: defined at module level, or a closure, which
            cloudpickle ships by value). Its result must be ``torch.save``-able.
        items: the work items; ``key(item)`` names each result and must be unique.
        workdir: folder for the results (for Ray: storage every worker can reach).
        executor: ``"local"`` (a loop in this process) or ``"ray"`` (one Ray task per item).
        num_cpus, num_gpus: resources each Ray task requests. max_retries: Ray retries of a task whose
            worker died (a result already on disk is never recomputed).
        ray_init: kwargs of ``ray.init`` if Ray is not initialised yet.
        load: return the results (loaded from disk); ``False`` returns their paths.
    Returns: ``{key: result}`` (or ``{key: path}``), in the order of ``items``.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    items = list(items)
    keys = [key(it) for it in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"map_tasks: two items share the key {dup!r}; pass a key function that tells them apart")
    paths = {k: result_path(workdir, k) for k in keys}
    todo = [(k, it) for k, it in zip(keys, items) if not paths[k].exists()]
    bar = progress_bar(total=len(todo), desc=f"map_tasks ({executor})", progress=progress and bool(todo))
    if executor == "local":
        for k, it in todo:
            _run_and_save(fn, it, str(paths[k]))
            bar.update(1)
        bar.close()
    elif todo:
        ray = _ray(ray_init)
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(_run_and_save)
        fn_ref = ray.put(fn)
        _wait_all(ray, [remote.remote(fn_ref, it, str(paths[k])) for k, it in todo], bar)
    if not load:
        return {k: paths[k] for k in keys}
    return {k: torch.load(paths[k], map_location="cpu", weights_only=False) for k in keys}


# ------------------------------------------------------------------------------------ Daunce on Ray
def _train_block(front_class, model, task, config, workdir: str, options: dict, ks: list, train, query,
                 cache, device: Optional[str] = None) -> dict:
    """Ray task: build the same front (``front_class(model, task, config, workdir, **options)``) and train
    the copies ``ks`` that are not in the workdir yet; returns ``{"trained", "seconds", "trainer", "reason"}``."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if device is not None:  # e.g. "cuda" for a task that requested a GPU
        model = model.to(device)
        cache = {k: v.to(device) for k, v in cache.items()} if cache is not None else None
    d = front_class(model, task, config, workdir, progress=False, executor="local", **options)
    todo = d.train_copies(ks, train, query, cache)
    return {"trained": todo, "seconds": {k: d.seconds[k] for k in todo},
            "trainer": d.trainer_used, "reason": d.trainer_reason}


RAY_OPTIONS = ("copies_per_task", "num_cpus", "num_gpus", "max_retries", "init", "device")


def fit_on_ray(d, todo: list, train, query) -> None:
    """Train the unfinished copies ``todo`` of the front ``d`` (a ``daunce.Daunce``) as Ray tasks (blocks of
    ``copies_per_task``).

    The driver has already checked the workdir's manifest; it computes the base cache once, and the tasks
    share the model, datasets and cache through Ray's object store and write their copies to
    ``d.workdir``. Afterwards ``d.trained_copies``, ``d.seconds``, ``d.trainer_used`` are filled in as
    after a local fit. Only public attributes of ``d`` are read: ``ray_options``, ``options``, ``model``,
    ``task``, ``config``, ``workdir``, ``vmap_block``, ``progress`` and ``base_cache``.
    """
    opts = d.ray_options
    unknown = set(opts) - set(RAY_OPTIONS)
    if unknown:
        raise ValueError(f"unknown ray_options {sorted(unknown)}")
    cache = d.base_cache(train) if d.uses_base_cache else None
    per_task = opts.get("copies_per_task") or d.vmap_block or 8
    device = opts.get("device", "cuda" if opts.get("num_gpus", 0) > 0 else None)
    ray = _ray(opts.get("init"))
    remote = ray.remote(num_cpus=opts.get("num_cpus", 1), num_gpus=opts.get("num_gpus", 0),
                        max_retries=opts.get("max_retries", 3))(_train_block)
    shared = [ray.put(x) for x in (d.model, d.task, d.config, train, query, cache)]
    model_ref, task_ref, cfg_ref, train_ref, query_ref, cache_ref = shared
    blocks = [todo[s : s + per_task] for s in range(0, len(todo), per_task)]
    t0 = time.perf_counter()
    refs = [remote.remote(type(d), model_ref, task_ref, cfg_ref, str(d.workdir), d.options, ks, train_ref,
                          query_ref, cache_ref, device) for ks in blocks]
    bar = progress_bar(total=len(refs), desc=f"daunce-{d.config.variant} copies (ray, {per_task}/task)",
               progress=d.progress)
    results = _wait_all(ray, refs, bar)
    for r in results:
        d.trained_copies.extend(r["trained"])
        d.seconds.update(r["seconds"])
        if r["trainer"] is not None:
            d.trainer_used, d.trainer_reason = r["trainer"], r["reason"]
    d.trained_copies.sort()
    d.ray_seconds = time.perf_counter() - t0


__all__ = ["map_tasks", "fit_on_ray", "default_key", "result_path", "EXECUTORS", "RAY_OPTIONS"]
