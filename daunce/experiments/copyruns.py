"""Sets of Daunce copies for a benchmark: trained side by side on every core, grown in stages, read back from disk.

Notebook 02 trains many sets of copies (every candidate setting of the tuning grid, ``"auto"``, the authors'
recipes, the ablations), each at the K it reports. A ``CopyJob`` names one set: the model, its
``DaunceConfig`` (``n_models`` is the K it reports), the work folder, the training and query sets and the signal
the copies record.
``run_jobs`` trains the jobs that are not finished yet, ``workers`` at a time (every core by default), each in a
forked single-threaded child process (the copies of one set train one after the other or in blocks, so sets side by side
keep every core busy), and returns one ``CopyRun`` per job:

* the copies grow in **stages** (``stages``: K = 4, 8, ..., the reported K; copy k does not depend on K, so the
  LDS-against-K curve comes from the first k copies of one run). With ``stop_unconverged`` a set stops at the
  first stage where a copy reached the step cap without passing its stopping test: such copies fail the
  convergence check, so the set is not eligible, and its remaining copies are not worth their seconds. A copy
  whose objective stops being finite (a learning rate too large for the model's curvature) ends its set the same
  way, keeping the copies before it; the run says why (``diverged``);
* after training, the **signals** every method of the benchmark reads: the training examples' and the
  queries' loss and minus-margin under every copy, ``(K, n)``. They are written to the job's folder
  (``signals_K<K>.pt``, atomically) with each copy's seconds, steps and convergence flag, so a rerun reads
  them back (with the seconds first measured) without loading a copy. The seconds of a set are its copies'
  seconds plus the resolution of its ``"auto"`` fields (``resolve_seconds.json``, written when first measured).

A child's warnings (copies at the step cap) are not printed: the run records them (``converged``,
``stopped_at``).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import TensorDataset

from ..config import DaunceConfig
from ..parallel import fork_map
from ..store import atomic_save, atomic_write_json
from ..task import ClassificationTask

SIGNALS = ("loss", "margin")


@dataclass
class CopyJob:
    """One set of copies. ``config.n_models`` is the K the set reports; ``stages`` the K values it grows
    through (the last must be K; default: K alone); ``signal`` what the copies record while training
    ("loss" or "margin": both are read afterwards); ``orthogonal_block`` the orthogonal design's block
    (part of what copy k is)."""

    tag: str
    model: torch.nn.Module
    config: DaunceConfig
    workdir: Path
    train: TensorDataset
    query: TensorDataset
    signal: str = "loss"
    stages: Optional[list] = None
    stop_unconverged: bool = False
    orthogonal_block: Optional[int] = None

    def __post_init__(self):
        K = self.config.n_models
        self.stages = sorted(set(self.stages or [K]))
        if self.stages[-1] != K or self.stages[0] < 2:
            raise ValueError(f"{self.tag}: stages must lie in [2, K] and end at K = {K}, got {self.stages}")
        if self.signal not in SIGNALS:
            raise ValueError(f"{self.tag}: signal must be one of {SIGNALS}, got {self.signal!r}")
        self.workdir = Path(self.workdir)

    @property
    def result_path(self) -> Path:
        return self.workdir / f"signals_K{self.config.n_models}.pt"


@dataclass
class CopyRun:
    """What a finished job left: ``K`` copies (fewer when it stopped at an unconverged stage), their signals
    ``train[signal]`` ``(K, n)`` and ``query[signal]`` ``(K, Q)`` for signal in ("loss", "margin": minus the
    margin), per copy ``seconds`` (training and recording), ``steps`` and ``converged`` (None without a
    stopping test), the resolved configuration, and ``stopped_at`` (the stage with an unconverged copy)."""

    tag: str
    K: int
    train: dict
    query: dict
    seconds: list
    steps: list
    converged: list
    resolved: dict
    trainer: str
    stopped_at: Optional[int] = None
    resolve_seconds: float = 0.0
    info: dict = field(default_factory=dict)
    diverged: Optional[str] = None  # why the set stopped at a copy whose objective was not finite

    @property
    def all_converged(self) -> Optional[bool]:
        """True when every copy passed its stopping test; None for fixed-step copies (no test); False for a set that
        diverged."""
        if self.diverged:
            return False
        flags = [c for c in self.converged if c is not None]
        if not flags:
            return None
        return self.stopped_at is None and all(flags)

    def seconds_for(self, k: int) -> float:
        """Seconds of the first ``k`` copies (training and recording, as measured when they were trained) plus the
        resolution of the "auto" fields (once per set)."""
        return float(self.resolve_seconds + sum(self.seconds[:k]))

    def steps_per_copy(self) -> dict:
        s = torch.tensor([float(v) for v in self.steps if v is not None])
        if not len(s):
            return {}
        return {"mean": float(s.mean()), "max": int(s.max()), "min": int(s.min())}


def _fit(job: CopyJob) -> dict:
    """Train the job's copies stage by stage and read every signal; the record ``run_jobs`` saves."""
    from .vision import make_daunce

    train, query = job.train, job.query
    stopped_at, d, diverged, done = None, None, None, 0
    timing = job.workdir / "resolve_seconds.json"
    for K in job.stages:
        d = make_daunce(job.model, job.config.replace(n_models=K), job.workdir, signal=job.signal,
                        orthogonal_block=job.orthogonal_block)
        if K == job.stages[0]:  # the "auto" fields' resolution, timed once (a rerun reads it from the manifest)
            t0 = time.perf_counter()
            d.resolve(train)
            if not timing.exists() and not d.resolved.get("reused_from_manifest"):
                atomic_write_json({"seconds": time.perf_counter() - t0}, timing)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # copies at the step cap: recorded below
                d.fit(train, query)
        except FloatingPointError as e:  # a copy's objective blew up: keep the copies before it
            stopped_at, diverged = K, str(e)
            done = next((k for k in range(K) if not d.is_trained(k)), K)
            if done >= 2:  # else no covariance: the set has no copies
                d = make_daunce(job.model, job.config.replace(n_models=done), job.workdir, signal=job.signal,
                                orthogonal_block=job.orthogonal_block)
            break
        if job.stop_unconverged and d.n_unconverged:
            stopped_at = K
            break
    K = 0 if diverged and done < 2 else d.config.n_models
    other = "margin" if job.signal == "loss" else "loss"
    sig_train, sig_query = {}, {}
    for sig, fn in ((job.signal, None), (other, ClassificationTask(other).signal)):
        sig_train[sig] = d.signals(train, signal=fn) if K else torch.zeros(0, len(train))
        sig_query[sig] = d.signals(query, signal=fn) if K else torch.zeros(0, len(query))
    recs = [d.store.load(k) for k in range(K)]
    cfg = d.training_config()
    return {"tag": job.tag, "K": K, "train": sig_train, "query": sig_query,
            "seconds": [float(r.get("seconds", 0.0)) for r in recs],
            "steps": [r.get("steps") for r in recs], "converged": [r.get("converged") for r in recs],
            "resolved": {f: getattr(cfg, f) for f in ("rho", "damping", "isotropic_noise", "optimizer", "lr",
                                                       "momentum", "steps", "batch_size", "epochs")},
            "trainer": d.trainer_used or "", "stopped_at": stopped_at,
            "resolve_seconds": json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0,
            "info": {"n_steps_cap": cfg.n_steps(max(1, round(cfg.subset_ratio * len(train)))),
                     "resolution": {k: v for k, v in d.resolved.items() if k != "proxy"}},
            "diverged": diverged}


def _fit_and_save(job: CopyJob) -> None:
    atomic_save(_fit(job), job.result_path)


def load(job: CopyJob) -> Optional[CopyRun]:
    """The job's finished run from its folder, or None."""
    if not job.result_path.exists():
        return None
    return CopyRun(**torch.load(job.result_path, weights_only=False))


def run_jobs(jobs: list, *, workers: Optional[int] = None, progress: bool = False) -> dict:
    """``{tag: CopyRun}`` for every job: finished ones are read back, the others trained ``workers`` at a time
    in forked single-threaded children (``daunce.parallel.fork_map``; ``None``: every core of the machine, at most
    ``DAUNCE_WORKERS``; 1: in this process, single-threaded), the longest first (by K). A job's copies are the same
    whatever the worker count. A job that fails raises here with the child's error once the others have finished;
    the finished ones are on disk."""
    tags = [j.tag for j in jobs]
    if len(set(tags)) != len(tags):
        raise ValueError("job tags must be unique")
    todo = [j for j in jobs if not j.result_path.exists()]
    todo.sort(key=lambda j: -j.config.n_models)
    try:
        fork_map(_fit_and_save, todo, workers, desc="sets of copies", progress=progress, labels=[j.tag for j in todo])
    except RuntimeError as e:
        raise RuntimeError(f"copy jobs failed: {e}") from None
    return {j.tag: load(j) for j in jobs}


__all__ = ["CopyJob", "CopyRun", "run_jobs", "load", "SIGNALS"]
