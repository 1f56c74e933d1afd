"""Sets of Daunce copies for a benchmark: trained side by side on every core, grown in stages, read back from disk.

Notebook 02 trains many sets of copies (every candidate setting of the tuning grid, ``"auto"``, the authors'
recipes, the ablations), each at the K it reports. A ``CopyJob`` names one set: the model, its
``DaunceConfig`` (``n_models`` is the K it reports), the work folder, the training and query sets and the signal
the copies record.
``run_jobs`` trains the jobs that are not finished yet, ``workers`` at a time (every core by default), each in a
forked single-threaded child process (the copies of one set train one after the other or in blocks, so sets side by side
keep every core busy), and returns one ``CopyRun`` per job:

* the copies grow in **stages** (``stages``: K = 4, 8, ..., the reported K; copy k does not depend on K, so the
  LDS-against-K curve comes from the first k copies of one run). A set is **eligible** when at least
  ``MIN_CONVERGED`` of its copies passed their stopping test (the others, stragglers at the step cap, are recorded).
  With ``stop_unconverged`` a set stops at the first stage where more copies reached the step cap than its final K
  allows: the set can no longer be eligible, and its remaining copies are not worth their seconds. A copy
  whose objective stops being finite (a learning rate too large for the model's curvature) ends its set the same
  way, keeping the copies before it; the run says why (``diverged``);
* after training, the **signals** every method of the benchmark reads: the training examples' and the
  queries' loss and minus-margin under every copy, ``(K, n)``. They are written to the job's folder
  (``signals_K<K>.pt``, atomically) with each copy's seconds, steps and convergence flag, so a rerun reads
  them back (with the seconds first measured) without loading a copy. The seconds of a set are its copies'
  seconds plus the resolution of its ``"auto"`` fields (``resolve_seconds.json``, written when first measured).

A child's warnings (copies at the step cap) are not printed: the run records them (``converged``,
``stopped_at``).

An ``EnsembleJob`` names one set of copies spread over M trained models (``daunce.ensemble``: K / M copies on each,
member m with seed ``config.seed + m``): it runs as M member ``CopyJob``s, each in its own folder and cached like any
job, and ``run_jobs`` returns an ``EnsembleRun`` for it, whose ``score`` is the mean of the members' score matrices.
Every run records ``n_models``, the number of trained models its copies perturb (1 for a ``CopyJob``).
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

from .. import scores as _scores
from ..config import DaunceConfig
from ..ensemble import check_models, member_config, member_workdir
from ..parallel import fork_map
from ..store import atomic_save, atomic_write_json
from ..task import ClassificationTask

SIGNALS = ("loss", "margin")


#: The share of a set's copies that must pass their stopping test for the set to be eligible (``CopyRun.eligible``):
#: 0.97 lets 3 stragglers of 128 copies (1 of 64) through, where requiring every copy disqualified notebook 02's
#: noise-free ResNet sets for 1-2 of 128 copies left at the step cap (λ = 1: 127 converged in about 33 steps).
MIN_CONVERGED = 0.97


def allowed_stragglers(K: int) -> int:
    """The most copies of a K-copy set that may miss their stopping test with the set still eligible."""
    return int((1.0 - MIN_CONVERGED) * K + 1e-9)


def doubling_stages(K: int, first: int = 2) -> list:
    """The K values a set grows through: ``first``, twice that, ... below K, then K itself (copy k does not depend on
    K, so each stage trains only its new copies)."""
    stages, k = [], first
    while k < K:
        stages.append(k)
        k *= 2
    return stages + [K]


def converged_share(flags: list) -> Optional[float]:
    """The share of the copies that passed their stopping test, among those that ran one (None: none did)."""
    tested = [c for c in flags if c is not None]
    return sum(bool(c) for c in tested) / len(tested) if tested else None


def is_eligible(diverged: bool, stopped_at: Optional[int], fraction: Optional[float]) -> bool:
    """The eligibility rule of a set (``CopyRun.eligible``) from what it recorded."""
    return not diverged and stopped_at is None and (fraction is None or fraction >= MIN_CONVERGED)


@dataclass
class CopyJob:
    """One set of copies. ``config.n_models`` is the K the set reports; ``stages`` the K values it grows
    through (the last must be K; default: K alone); ``signal`` what the copies record while training
    ("loss" or "margin": both are read afterwards); ``orthogonal_block`` the orthogonal design's block
    (part of what copy k is); ``straggler_k`` the K whose straggler allowance the stopping test applies (default:
    the last stage; a first round of successive halving at a small K keeps the reported K's allowance)."""

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
    straggler_k: Optional[int] = None

    def __post_init__(self):
        K = self.config.n_models
        self.stages = sorted(set(self.stages or [K]))
        if self.stages[-1] != K or self.stages[0] < 2:
            raise ValueError(f"{self.tag}: stages must lie in [2, K] and end at K = {K}, got {self.stages}")
        if self.straggler_k is not None and self.straggler_k < K:
            raise ValueError(f"{self.tag}: straggler_k must be at least K = {K}, got {self.straggler_k}")
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
    n_models: int = 1  # trained models (theta0s) the copies perturb: one for a CopyJob

    def score(self, train_signal: str = "loss", query_signal: str = "margin", kind: str = "cov",
              K: Optional[int] = None) -> torch.Tensor:
        """Scores ``(n_train, n_query)`` of the first ``K`` copies (default: all): ``daunce.scores.score`` (covariance
        or correlation) of ``train[train_signal]`` and ``query[query_signal]``; positive = helpful."""
        K = self.K if K is None else K
        if not 2 <= K <= self.K:
            raise ValueError(f"{self.tag}: K must lie in [2, {self.K}] (the copies of this run), got {K}")
        return _scores.score(self.train[train_signal][:K], self.query[query_signal][:K], kind)

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

    @property
    def converged_fraction(self) -> Optional[float]:
        """The share of the copies that passed their stopping test (None for fixed-step copies)."""
        return converged_share(self.converged[: self.K])

    @property
    def stragglers(self) -> list:
        """The copies (indices) that reached the step cap without passing their stopping test."""
        return [k for k, c in enumerate(self.converged[: self.K]) if c is False]

    @property
    def eligible(self) -> bool:
        """Whether the set counts in a tuning rule: it neither diverged nor stopped early, and at least
        ``MIN_CONVERGED`` of its copies passed their stopping test (every fixed-step set passes this check)."""
        return is_eligible(bool(self.diverged), self.stopped_at, self.converged_fraction)

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
        if job.stop_unconverged and d.n_unconverged > allowed_stragglers(job.straggler_k or job.stages[-1]):
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


@dataclass
class EnsembleJob:
    """One set of copies spread over M trained models (``models``, one architecture: ``daunce.ensemble.check_models``).
    ``config.n_models`` is the total K (a multiple of M, at least 2M); ``stages`` the total K values it grows through
    (each a multiple of M; default: K alone). It runs as M ``CopyJob``s (``members``): member m is the job of
    ``models[m]`` with ``daunce.ensemble.member_config(config, M, m)`` (K / M copies, seed ``config.seed + m``) in
    ``workdir/member_<m>``, tagged ``<tag>/member_<m>``, with the stages divided by M; the other fields as in
    ``CopyJob``."""

    tag: str
    models: list
    config: DaunceConfig
    workdir: Path
    train: TensorDataset
    query: TensorDataset
    signal: str = "loss"
    stages: Optional[list] = None
    stop_unconverged: bool = False
    orthogonal_block: Optional[int] = None
    members: list = field(init=False, repr=False)

    def __post_init__(self):
        self.models = check_models(self.models)
        M, K = len(self.models), self.config.n_models
        configs = [member_config(self.config, M, m) for m in range(M)]  # refuses K not a multiple of M, or < 2M
        self.stages = sorted(set(self.stages or [K]))
        uneven = [s for s in self.stages if s % M]
        if uneven:
            raise ValueError(f"{self.tag}: stages must be multiples of the {M} models (K / {M} copies on each), "
                             f"got {uneven}")
        if self.stages[-1] != K or self.stages[0] < 2 * M:
            raise ValueError(f"{self.tag}: stages must lie in [{2 * M}, K] (at least 2 copies per model) and end at "
                             f"K = {K}, got {self.stages}")
        self.workdir = Path(self.workdir)
        self.members = [CopyJob(f"{self.tag}/member_{m}", model, cfg, member_workdir(self.workdir, m), self.train,
                                self.query, signal=self.signal, stages=[s // M for s in self.stages],
                                stop_unconverged=self.stop_unconverged, orthogonal_block=self.orthogonal_block)
                        for m, (model, cfg) in enumerate(zip(self.models, configs))]

    @property
    def n_models(self) -> int:
        """M, the trained models the copies are spread over."""
        return len(self.models)


@dataclass
class EnsembleRun:
    """What a finished ``EnsembleJob`` left: its members' ``CopyRun``s (``members``, member m on ``models[m]``).
    ``K`` is the total number of copies used: M times the fewest copies a member reached (each member contributes
    the same number, K / M), ``n_models`` is M."""

    tag: str
    members: list

    @property
    def n_models(self) -> int:
        return len(self.members)

    @property
    def per_model(self) -> int:
        """Copies used from each member (the fewest any member reached)."""
        return min(r.K for r in self.members)

    @property
    def K(self) -> int:
        return self.n_models * self.per_model if self.per_model >= 2 else 0

    def _per_member(self, K: Optional[int]) -> int:
        K = self.K if K is None else K
        M = self.n_models
        if K % M or not 2 * M <= K <= self.K:
            raise ValueError(f"{self.tag}: K must be a multiple of the {M} models in [{2 * M}, {self.K}] (K / {M} "
                             f"copies of each), got {K}")
        return K // M

    def score(self, train_signal: str = "loss", query_signal: str = "margin", kind: str = "cov",
              K: Optional[int] = None) -> torch.Tensor:
        """Scores ``(n_train, n_query)`` (the signals' dtype) of the first ``K`` copies (default: all; the first
        K / M of each member): the mean over the members of ``CopyRun.score``, the rule of ``daunce.ensemble``
        (each member's covariance estimates the influence at its own theta0; the ensemble's estimate is their mean,
        as TRAK averages its models' scores). Positive = helpful."""
        k = self._per_member(K)
        member_scores = [r.score(train_signal, query_signal, kind, k) for r in self.members]
        return (sum(S.double() for S in member_scores) / self.n_models).to(member_scores[0].dtype)

    def seconds_for(self, k: int) -> float:
        """Seconds of the first ``k`` copies of the ensemble (``k / M`` of each member, with each member's resolution
        of its "auto" fields). The seconds of training the extra models are not included."""
        return float(sum(r.seconds_for(self._per_member(k)) for r in self.members))

    @property
    def converged(self) -> list:
        """Each used copy's convergence flag, member after member."""
        return [c for r in self.members for c in r.converged[: self.per_model]]

    @property
    def all_converged(self) -> Optional[bool]:
        """True when every member's copies all passed their stopping test; None for fixed-step copies; False when a
        member failed, stopped early or diverged."""
        flags = [r.all_converged for r in self.members]
        if any(f is False for f in flags):
            return False
        return None if all(f is None for f in flags) else all(f is not False for f in flags)

    @property
    def converged_fraction(self) -> Optional[float]:
        """The share of the used copies, over all members, that passed their stopping test (None: fixed steps)."""
        return converged_share(self.converged)

    @property
    def eligible(self) -> bool:
        """``CopyRun.eligible`` over the members' used copies together: no member diverged or stopped early, and at
        least ``MIN_CONVERGED`` of all the used copies passed their stopping test."""
        return is_eligible(any(r.diverged for r in self.members), self.stopped_at, self.converged_fraction)

    @property
    def stopped_at(self) -> Optional[int]:
        """The first total stage (M times a member's stage) at which a member stopped, or None."""
        stops = [r.stopped_at for r in self.members if r.stopped_at is not None]
        return self.n_models * min(stops) if stops else None

    @property
    def diverged(self) -> Optional[str]:
        """Why the first member that diverged did, prefixed with its tag, or None."""
        return next((f"{r.tag}: {r.diverged}" for r in self.members if r.diverged), None)

    @property
    def resolved(self) -> dict:
        """The members' resolved settings: a field's value where every member has the same, else the list of the
        members' values (each member resolves its "auto" fields on its own theta0)."""
        out = {}
        for f in self.members[0].resolved:
            values = [r.resolved.get(f) for r in self.members]
            out[f] = values[0] if all(v == values[0] for v in values) else values
        return out

    @property
    def trainer(self) -> str:
        names = sorted({r.trainer for r in self.members})
        return names[0] if len(names) == 1 else "/".join(names)

    def steps_per_copy(self) -> dict:
        s = torch.tensor([float(v) for r in self.members for v in r.steps[: self.per_model] if v is not None])
        if not len(s):
            return {}
        return {"mean": float(s.mean()), "max": int(s.max()), "min": int(s.min())}


def load_ensemble(job: EnsembleJob) -> Optional[EnsembleRun]:
    """The ensemble job's finished run from its members' folders, or None while a member is not finished."""
    runs = [load(m) for m in job.members]
    return None if any(r is None for r in runs) else EnsembleRun(job.tag, runs)


def load(job: CopyJob) -> Optional[CopyRun]:
    """The job's finished run from its folder, or None."""
    if not job.result_path.exists():
        return None
    return CopyRun(**torch.load(job.result_path, weights_only=False))


def run_jobs(jobs: list, *, workers: Optional[int] = None, progress: bool = False) -> dict:
    """``{tag: CopyRun or EnsembleRun}`` for every job (``CopyJob`` or ``EnsembleJob``; an ensemble runs as its member
    jobs): finished ones are read back, the others trained ``workers`` at a time in forked single-threaded children
    (``daunce.parallel.fork_map``; ``None``: every core of the machine, at most ``DAUNCE_WORKERS``; 1: in this
    process, single-threaded), the longest first (by K). A job's copies are the same whatever the worker count. A
    job that fails raises here with the child's error once the others have finished; the finished ones are on
    disk."""
    tags = [j.tag for j in jobs]
    if len(set(tags)) != len(tags):
        raise ValueError("job tags must be unique")
    flat = [m for j in jobs for m in (j.members if isinstance(j, EnsembleJob) else [j])]
    member_tags = [m.tag for m in flat]
    if len(set(member_tags)) != len(member_tags):
        clash = sorted({t for t in member_tags if member_tags.count(t) > 1})
        raise ValueError(f"job tags must be unique: an ensemble's member jobs ({clash[0]}) clash with another job")
    todo = [j for j in flat if not j.result_path.exists()]
    todo.sort(key=lambda j: -j.config.n_models)
    try:
        fork_map(_fit_and_save, todo, workers, desc="sets of copies", progress=progress, labels=[j.tag for j in todo])
    except RuntimeError as e:
        raise RuntimeError(f"copy jobs failed: {e}") from None
    return {j.tag: load_ensemble(j) if isinstance(j, EnsembleJob) else load(j) for j in jobs}


__all__ = ["CopyJob", "CopyRun", "EnsembleJob", "EnsembleRun", "run_jobs", "load", "load_ensemble", "SIGNALS"]
