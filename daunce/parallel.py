"""Every core of the machine: how many workers a fan-out uses, and the fan-out itself.

The expensive parts of the notebooks are many independent jobs: sets of Daunce copies, ground-truth retrains,
removal retrains, baseline grids. ``fork_map`` runs such jobs ``workers`` at a time in forked, single-threaded
child processes (a fork shares the parent's models and data without copying or pickling them; only each job's
result travels back), and ``default_workers`` decides ``workers`` from the machine:

* every core this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere),
* at most ``DAUNCE_WORKERS`` when that environment variable is set (``make reproduce`` passes it through: e.g.
  ``DAUNCE_WORKERS=4 make reproduce`` leaves the other cores free),
* at most as many workers as the available memory holds, when the caller says what one worker needs,
* one worker (in this process) on a CUDA device: a CUDA context does not survive a fork.

**Results do not depend on the worker count.** Every job runs single-threaded whatever ``workers`` is (with
``workers=1`` in this process, torch's thread count set to 1 for the job and restored after), so its float
arithmetic is the same in every run; a job's randomness must come from its own seed, never from a generator
shared across jobs (``tests/test_parallel.py`` checks that ground-truth retrains and sets of copies are identical
with 1 and 2 workers). In-process work that is not a fan-out (one model's fine-tune, a baseline's solve) uses
``torch_threads()``: every core, or ``DAUNCE_WORKERS``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from contextlib import contextmanager
from multiprocessing import connection as mp_connection
from typing import Any, Callable, Optional, Sequence

import torch

from .progress import progress_bar

#: environment variable that caps the cores every fan-out and torch's thread count use
ENV_WORKERS = "DAUNCE_WORKERS"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def worker_cap() -> Optional[int]:
    """The ``DAUNCE_WORKERS`` cap (an integer >= 1), or ``None`` when it is unset; anything else is an error."""
    raw = os.environ.get(ENV_WORKERS, "").strip()
    if not raw:
        return None
    try:
        cap = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_WORKERS} must be a whole number of workers >= 1, got {raw!r}") from None
    if cap < 1:
        raise ValueError(f"{ENV_WORKERS} must be a whole number of workers >= 1, got {raw!r}")
    return cap


def available_memory() -> Optional[int]:
    """Bytes of memory available to new work (``MemAvailable`` of ``/proc/meminfo``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_workers(memory_per_worker: Optional[float] = None, device: Any = "cpu") -> int:
    """Workers of a fan-out on this machine: every available core, at most ``DAUNCE_WORKERS``, at most as many
    as ``available_memory() // memory_per_worker`` (bytes; ``None``: not bounded by memory), and 1 on a CUDA
    device."""
    if torch.device(device).type == "cuda":
        return 1
    n = available_cores()
    cap = worker_cap()
    if cap is not None:
        n = min(n, cap)
    if memory_per_worker:
        free = available_memory()
        if free is not None:
            n = min(n, max(1, int(free // float(memory_per_worker))))
    return max(1, n)


def torch_threads() -> int:
    """Threads for in-process torch work: every available core, at most ``DAUNCE_WORKERS``."""
    cap = worker_cap()
    return min(available_cores(), cap) if cap is not None else available_cores()


def describe(workers: Optional[int] = None) -> dict:
    """What a run records of the machine's parallelism: cores available, the ``DAUNCE_WORKERS`` cap, the workers
    and torch threads it used."""
    return {"cores": available_cores(), "cap": worker_cap(),
            "workers": default_workers() if workers is None else int(workers), "torch_threads": torch.get_num_threads()}


@contextmanager
def single_threaded():
    """Run the body with one torch thread (restored after): the thread count every fan-out job runs with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _child(conn, fn, item):
    # plain pickle, not multiprocessing's: torch's reducers would send a tensor as a handle to shared memory that
    # this process owns, and it exits before the parent reads it
    try:
        torch.set_num_threads(1)
        conn.send_bytes(pickle.dumps(("done", fn(item))))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send_bytes(pickle.dumps(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")))
    finally:
        conn.close()


def fork_map(fn: Callable[[Any], Any], items: Sequence, workers: Optional[int] = None, *,
             on_result: Optional[Callable[[Any, Any], None]] = None, desc: Optional[str] = None,
             progress: bool = True, labels: Optional[Sequence[str]] = None) -> list:
    """``[fn(item) for item in items]``, ``workers`` at a time in forked single-threaded children.

    Args:
        fn: the job; it sees the parent's memory as it was at the fork (no pickling), its result is sent back
            pickled. It must draw its randomness from its item (a seed), not from a shared generator.
        items: the jobs' inputs, run in this order (the first ``workers`` first).
        workers: ``None``: ``default_workers()``. 1 runs every job in this process, single-threaded, as does
            any count once this process has initialised CUDA.
        on_result: called in this process as ``on_result(item, result)`` when a job finishes (in completion
            order): where a caller saves what is done, so that an interrupted fan-out loses only the running jobs.
        desc, progress: the progress bar. labels: a name per item for error messages (default: ``repr(item)``).
    Returns: the results in the order of ``items``. A job that raises (or whose child dies) raises a
    ``RuntimeError`` here, naming it and its error, once the other jobs have finished.
    """
    items = list(items)
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    names = list(labels) if labels is not None else [repr(it)[:80] for it in items]
    results: list = [None] * len(items)
    errors: dict = {}
    bar = progress_bar(total=len(items), desc=desc, progress=progress and bool(items))
    # a CUDA context does not survive a fork: once this process has one, every job runs here
    if workers == 1 or len(items) <= 1 or torch.cuda.is_initialized():
        with single_threaded():
            for i, item in enumerate(items):
                try:
                    results[i] = fn(item)
                except Exception as e:  # noqa: BLE001 - reported below with the job's name
                    errors[i] = f"{type(e).__name__}: {e}"
                    continue
                if on_result is not None:
                    on_result(item, results[i])
                bar.update(1)
    else:
        ctx = mp.get_context("fork")
        running: dict = {}
        queue = list(range(len(items)))
        while queue or running:
            while queue and len(running) < workers:
                i = queue.pop(0)
                parent, child = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_child, args=(child, fn, items[i]))
                p.start()
                child.close()
                running[i] = (p, parent)
            ready = mp_connection.wait([c for _, c in running.values()])
            for i in [i for i, (_, c) in running.items() if c in ready]:
                p, c = running.pop(i)
                try:
                    kind, value = pickle.loads(c.recv_bytes())
                except EOFError:
                    kind, value = "error", "the child process died (out of memory, or killed by a signal)"
                p.join()
                if kind == "error":
                    errors[i] = value
                    continue
                results[i] = value
                if on_result is not None:
                    on_result(items[i], value)
                bar.update(1)
    bar.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(items)} jobs failed: "
                           + "; ".join(f"{names[i]}: {msg}" for i, msg in sorted(errors.items())))
    return results


__all__ = ["ENV_WORKERS", "available_cores", "available_memory", "default_workers", "describe", "fork_map",
           "single_threaded", "torch_threads", "worker_cap"]
