"""Black-box Daunce: attribution through nothing but "fine-tune on this data" and "score this text".

A hosted fine-tuning service (OpenAI's, or a self-hosted one) gives no gradients and no weights. The
paper's black-box variant needs none: train K models, each on a random subset of the training set
(the ``"bootstrap"`` objective, plain fine-tuning; the linear perturbation term of the white-box
variants needs gradients and is dropped), read every example's and every query's response
log-likelihood under each model, and score each (training example, query) pair by the covariance
of their losses (``loss = -log-likelihood``) across the K models. A training example that was in a
model's subset has a lower loss under it; if that same model also gives the query a lower loss, the
example helped the query: a positive score = helpful, as in ``daunce.scores``.

The backend protocol has two operations (``Backend``):

* ``fine_tune(examples, seed) -> model_id``
* ``log_likelihoods(model_id, examples) -> (n,)`` summed log-probability of each example's response
  given its prompt.

The signal of an example is its loss under a copy: by default the **mean** response NLL (the summed NLL over the
number of response tokens), the authors' choice and white-box Daunce's (``daunce.llm.CausalLMTask``); for it the
backend also offers ``response_lengths(examples) -> (n,)``, the number of response tokens. ``signal="sum"`` uses
the summed NLL: its spread across copies grows with the response's length, so the covariance then favours long
responses. By default every copy is fine-tuned with the same seed (**common random numbers**): copies differ only
in their subsets, so the covariance sees which examples a copy trained on and not the noise of a new adapter
initialisation and minibatch order per copy (``fine_tune_seeds="per-copy"``, the former design).

A backend may also offer ``log_likelihoods_many(model_ids, examples) -> (K, n)``, the log-likelihoods under
several models at once; ``BlackBoxDaunce.signals`` then asks for all missing rows in one call
(``LocalLoRABackend`` evaluates its adapters together with peft's mixed-adapter batches).

Backends whose fine-tunes are jobs on a server (``daunce.blackbox.openai.OpenAIBackend``) also offer
``start_fine_tune(examples, seed) -> job_id`` and ``wait_fine_tune(job_id) -> model_id``:
``BlackBoxDaunce`` then writes every job id to the work folder the moment the job exists, submits all
jobs before waiting on any (the server trains them in parallel), and a run interrupted while a job was
running resumes polling that job instead of paying for a second fine-tune. Model ids and signals are
written too (atomic JSON writes), so a finished model is never fine-tuned or scored twice. An id must be a str
or an int; any other is saved as its repr (``job_id_unstorable`` / ``model_id_unstorable``) before the error is
raised, and a rerun refuses to start that copy's fine-tune again. The work folder's manifest binds it to the
training set, the subset design and the backend (``identity()``, and the model name where the backend has one);
a damaged copy file is moved aside (``copy_XXXX.json.damaged``) with a warning naming it.

Examples are dicts ``{"prompt": str, "response": str}`` (the format of ``daunce.experiments.textdata``).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import time
from pathlib import Path
from typing import Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .. import scores
from ..plans import copy_seed
from ..progress import progress_bar
from ..store import atomic_write_json, check_manifest, read_manifest, set_aside

Example = dict  # {"prompt": str, "response": str}


# ------------------------------------------------------------------------------------- protocol
@runtime_checkable
class Backend(Protocol):
    """What black-box Daunce may ask of a model provider, and nothing else."""

    def fine_tune(self, examples: Sequence[Example], seed: int) -> str:
        """Fine-tune the provider's base model on ``examples``; return the new model's id."""
        ...

    def log_likelihoods(self, model_id: str, examples: Sequence[Example]) -> np.ndarray:
        """``(n,)`` float: log p(response | prompt) summed over the response tokens, under ``model_id``."""
        ...


def is_async(backend) -> bool:
    """True when the backend exposes ``start_fine_tune`` / ``wait_fine_tune`` (fine-tunes are server jobs)."""
    return callable(getattr(backend, "start_fine_tune", None)) and callable(getattr(backend, "wait_fine_tune", None))


# ----------------------------------------------------------------------------------------- examples
def examples_fingerprint(examples: Sequence[Example]) -> str:
    """Content hash of a list of examples (order matters)."""
    h = hashlib.sha1()
    for ex in examples:
        h.update(json.dumps([ex["prompt"], ex["response"]] + ([ex["system"]] if ex.get("system") else [])).encode())
    return h.hexdigest()[:16]


def check_examples(examples: Sequence[Example], what: str = "examples") -> list:
    examples = list(examples)
    if not examples:
        raise ValueError(f"{what} is empty")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str) or not isinstance(ex.get("response"), str):
            raise ValueError(f"{what}[{i}] must be a dict with str 'prompt' and 'response', got {ex!r:.200}")
    return examples


def _check_signal(signal: str, backend) -> None:
    """A signal name ``BlackBoxDaunce`` knows, and for the mean a backend that can count response tokens."""
    if signal not in ("mean", "sum"):
        raise ValueError(f"signal must be 'mean' or 'sum', got {signal!r}")
    if signal == "mean" and not callable(getattr(backend, "response_lengths", None)):
        raise TypeError("signal='mean' divides each summed NLL by its number of response tokens: the backend must "
                        "provide response_lengths(examples); pass signal='sum' otherwise")


def backend_identity(backend) -> str:
    """What decides a fine-tune besides its data and seed: the backend's ``identity()``, else its class name."""
    return getattr(backend, "identity", lambda: type(backend).__name__)()


def backend_model_name(backend) -> Optional[str]:
    """The name of the model a backend fine-tunes (its ``model_name``, ``base_model`` or ``name``), or None."""
    for attr in ("model_name", "base_model", "name"):
        v = getattr(backend, attr, None)
        if isinstance(v, str):
            return v
    return None


def storable_id(value):
    """A job or model id as JSON stores it: a str, or an int (numpy integers included); None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


# ----------------------------------------------------------------------------------- the method
class BlackBoxDaunce:
    """Daunce through a fine-tuning API: K fine-tunes on random subsets, covariance of losses.

    Args:
        backend: a ``Backend`` (``fine_tune``, ``log_likelihoods``; optionally ``start_fine_tune`` and
            ``wait_fine_tune`` for server-side jobs).
        n_models: K, the number of fine-tunes (>= 2).
        subset_ratio: fraction of the training set each fine-tune sees (0 < r <= 1).
        seed: subset k comes from ``(seed, k)``: copy k is the same whatever K is.
        signal: ``"mean"`` (mean response NLL; needs the backend's ``response_lengths``) or ``"sum"``.
        fine_tune_seeds: ``"common"`` (every fine-tune gets ``seed``: only the subsets differ) or ``"per-copy"``
            (fine-tune k gets a seed of its own from ``(seed, k)``).
        score: ``"cov"`` (the paper) or ``"corr"``.
        workdir: folder for job ids, model ids and signals (``copies/copy_XXXX.json``); ``None`` keeps
            them in memory only.
        progress: show tqdm bars.

    Attributes after ``fit``: ``fine_tunes_started`` (fine-tunes this object paid for),
    ``seconds`` (wall time per copy: fine-tune + scoring).
    """

    def __init__(self, backend, *, n_models: int = 16, subset_ratio: float = 0.5, seed: int = 0,
                 score: str = "cov", workdir=None, progress: bool = True, signal: str = "mean",
                 fine_tune_seeds: str = "common"):
        if not (callable(getattr(backend, "fine_tune", None)) and callable(getattr(backend, "log_likelihoods", None))):
            raise TypeError("backend must provide fine_tune(examples, seed) and log_likelihoods(model_id, examples)")
        # types as well as ranges: a bool is not a count, a string not a ratio, a float not a seed
        if not isinstance(n_models, numbers.Integral) or isinstance(n_models, bool) or n_models < 2:
            raise ValueError(f"n_models (K) must be an integer >= 2, got {n_models!r}")
        if (not isinstance(subset_ratio, numbers.Real) or isinstance(subset_ratio, bool)
                or not 0.0 < float(subset_ratio) <= 1.0):
            raise ValueError(f"subset_ratio must be a number in (0, 1], got {subset_ratio!r}")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not isinstance(score, str) or score not in ("cov", "corr"):
            raise ValueError(f"score must be 'cov' or 'corr', got {score!r}")
        if not isinstance(signal, str):
            raise ValueError(f"signal must be 'mean' or 'sum', got {signal!r}")
        _check_signal(signal, backend)
        if not isinstance(fine_tune_seeds, str) or fine_tune_seeds not in ("common", "per-copy"):
            raise ValueError(f"fine_tune_seeds must be 'common' or 'per-copy', got {fine_tune_seeds!r}")
        if workdir is not None and not isinstance(workdir, (str, os.PathLike)):
            raise ValueError(f"workdir must be None or a path, got {workdir!r}")
        if not isinstance(progress, bool):
            raise ValueError(f"progress must be True or False, got {progress!r}")
        self.signal_kind = signal
        self.fine_tune_seeds = fine_tune_seeds
        self._lengths: dict[str, np.ndarray] = {}
        self.backend = backend
        self.n_models = int(n_models)
        self.subset_ratio = float(subset_ratio)
        self.seed = int(seed)
        self.score_kind = score
        self.workdir = Path(workdir) if workdir is not None else None
        self.progress = progress
        self._records: dict[int, dict] = {}
        self.fine_tunes_started = 0
        self.seconds: dict[int, float] = {}
        self.n_train: Optional[int] = None
        self.train_fingerprint: Optional[str] = None

    def __repr__(self):
        return (f"BlackBoxDaunce(backend={self.backend!r}, n_models={self.n_models}, "
                f"subset_ratio={self.subset_ratio}, seed={self.seed}, workdir={str(self.workdir)!r})")

    # ------------------------------------------------------------------------------ plans
    def subset(self, k: int, n: int) -> list[int]:
        """Training indices of copy k (sorted), drawn from a generator seeded by ``(seed, k)``."""
        g = torch.Generator().manual_seed(copy_seed(self.seed, k))
        m = max(1, round(self.subset_ratio * n))
        return sorted(torch.randperm(n, generator=g)[:m].tolist())

    def fine_tune_seed(self, k: int) -> int:
        """The seed of fine-tune k: ``seed`` for every copy (common random numbers) or one per copy."""
        if self.fine_tune_seeds == "common":
            return self.seed % (2**31 - 1)
        return copy_seed(self.seed, k) % (2**31 - 1)

    # ------------------------------------------------------------------------------ records
    def _path(self, k: int) -> Path:
        return self.workdir / "copies" / f"copy_{k:04d}.json"

    def _record(self, k: int) -> dict:
        """Copy ``k``'s record (read from the workdir once). A file that cannot be read, is not a record, or holds
        another copy's record is moved aside (``.damaged``, kept: it may hold the id of a paid fine-tune) with a
        warning naming it, and the copy starts afresh."""
        if k not in self._records:
            rec = {"k": k}
            path = self._path(k) if self.workdir is not None else None
            if path is not None and path.exists():
                problem = None
                try:
                    stored = json.loads(path.read_text())
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    problem = f"unreadable: {type(e).__name__}: {e}"
                else:
                    if not isinstance(stored, dict):
                        problem = f"holds a {type(stored).__name__}, not a copy record"
                    elif stored.get("k") != k:
                        problem = f"it holds the record of copy {stored.get('k')!r}, not of copy {k}"
                    elif not isinstance(stored.get("signals", {}), dict):
                        problem = "its signals are not a dict"
                if problem is None:
                    rec = stored
                else:
                    set_aside(path, problem, f"fine-tune {k}")
            self._records[k] = rec
        return self._records[k]

    def _keep_id(self, k: int, rec: dict, key: str, value, method: str) -> None:
        """Store the id ``value`` a backend's ``method`` returned for copy ``k`` under ``rec[key]`` and save the
        record at once. An id JSON cannot hold is saved as its repr (``key + "_unstorable"``) and then refused:
        the fine-tune it names is paid for, so the record of it is kept before anything can fail."""
        ok = storable_id(value)
        if ok is not None:
            rec[key] = ok
            self._save(k)
            return
        rec[key + "_unstorable"] = repr(value)[:2000]
        self._save(k)
        where = f"saved in {self._path(k)}" if self.workdir is not None else "kept in memory"
        raise TypeError(f"backend.{method} returned a {type(value).__name__} id for fine-tune {k} ({value!r:.200}); "
                        f"ids must be str or int. Its repr is {where} ('{key}_unstorable') so this fine-tune is not "
                        "started again: make the backend return str ids")

    def _refuse_unstorable(self, k: int, rec: dict) -> None:
        """A copy whose fine-tune was started but whose id could not be stored: never start it again."""
        bad = {key: rec[key] for key in ("job_id_unstorable", "model_id_unstorable") if key in rec}
        if bad and rec.get("model_id") is None:
            where = self._path(k) if self.workdir is not None else "this object's record"
            raise RuntimeError(f"fine-tune {k} was started but the backend returned an id that could not be stored "
                               f"({bad}, in {where}); starting it again would pay twice: write the id as a string "
                               "into 'job_id' (or 'model_id') of that record and remove the '_unstorable' key, or "
                               "delete the record to fine-tune the copy again")

    def _save(self, k: int) -> None:
        if self.workdir is not None:
            atomic_write_json(self._records[k], self._path(k))

    def _check_manifest(self, n: int, fp: str) -> None:
        """Claim the workdir for this run: fine-tunes of another training set, subset ratio, seed, seed design
        or backend are refused (``daunce.store.check_manifest``)."""
        manifest = {"n_train": n, "train_fingerprint": fp, "subset_ratio": self.subset_ratio, "seed": self.seed,
                    "fine_tune_seeds": self.fine_tune_seeds, "backend": backend_identity(self.backend),
                    "model_name": backend_model_name(self.backend)}
        check_manifest(self.workdir, manifest, "fine-tunes", adopt=("model_name",))

    def _bind_workdir(self) -> None:
        """For an object that has not fitted: the workdir's backend must be this one; the fitted training set is
        taken from its manifest (``attribute`` checks against it)."""
        if self.train_fingerprint is not None or self.workdir is None:
            return
        stored = read_manifest(self.workdir)
        if stored is None:
            return
        now = {"backend": backend_identity(self.backend), "model_name": backend_model_name(self.backend)}
        check_manifest(self.workdir, {**stored, **{k: v for k, v in now.items() if k in stored}}, "fine-tunes")
        self.n_train, self.train_fingerprint = stored.get("n_train"), stored.get("train_fingerprint")

    # -------------------------------------------------------------------------------- fit
    def fit(self, train: Sequence[Example], queries: Optional[Sequence[Example]] = None) -> "BlackBoxDaunce":
        """Fine-tune the K models (skipping those already in the workdir) and record the losses of
        every training example and query under each."""
        train = check_examples(train, "train")
        if queries is not None:
            queries = check_examples(queries, "queries")
        n = len(train)
        fp = examples_fingerprint(train)
        if self.train_fingerprint is not None and fp != self.train_fingerprint:
            if self.workdir is not None:
                raise ValueError(f"{self.workdir} holds fine-tunes of another training set ({self.n_train} examples, "
                                 f"fingerprint {self.train_fingerprint}; now {n} examples, fingerprint {fp}): use a "
                                 "new workdir for another training set")
            # in memory: start afresh (the fine-tunes of the earlier training set are dropped)
            self._records.clear()
            self.seconds.clear()
        self.n_train = n
        self.train_fingerprint = fp
        if self.workdir is not None:
            self._check_manifest(n, self.train_fingerprint)
        ks = list(range(self.n_models))
        if is_async(self.backend):
            # submit every missing job first (ids stored the moment they exist), then wait on them in order
            for k in ks:
                rec = self._record(k)
                self._refuse_unstorable(k, rec)
                if rec.get("model_id") is None and rec.get("job_id") is None:
                    t0 = time.perf_counter()
                    sub = [train[i] for i in self.subset(k, n)]
                    job = self.backend.start_fine_tune(sub, self.fine_tune_seed(k))
                    self.fine_tunes_started += 1
                    rec["submit_seconds"] = time.perf_counter() - t0
                    self._keep_id(k, rec, "job_id", job, "start_fine_tune")
        bar = progress_bar(ks, desc="black-box fine-tunes", progress=self.progress)
        for k in bar:
            rec = self._record(k)
            self._refuse_unstorable(k, rec)
            t0 = time.perf_counter()
            if rec.get("model_id") is None:
                if rec.get("job_id") is not None:
                    model_id, method = self.backend.wait_fine_tune(rec["job_id"]), "wait_fine_tune"
                else:
                    sub = [train[i] for i in self.subset(k, n)]
                    model_id, method = self.backend.fine_tune(sub, self.fine_tune_seed(k)), "fine_tune"
                    self.fine_tunes_started += 1
                rec["fine_tune_seconds"] = time.perf_counter() - t0 + rec.get("submit_seconds", 0.0)
                self._keep_id(k, rec, "model_id", model_id, method)
            self._signals_of(k, train, self.train_fingerprint)
            if queries is not None:
                self._signals_of(k, queries)
            self.seconds[k] = time.perf_counter() - t0
        return self

    def _signals_of(self, k: int, examples: list, fp: Optional[str] = None) -> np.ndarray:
        rec = self._record(k)
        fp = fp or examples_fingerprint(examples)
        sig = rec.setdefault("signals", {})
        if fp not in sig:
            t0 = time.perf_counter()
            ll = np.asarray(self.backend.log_likelihoods(rec["model_id"], examples), dtype=np.float64)
            if ll.shape != (len(examples),) or not np.all(np.isfinite(ll)):
                raise ValueError(f"backend.log_likelihoods returned shape {ll.shape} (finite: "
                                 f"{bool(np.all(np.isfinite(ll)))}) for {len(examples)} examples")
            sig[fp] = (-ll).tolist()  # the signal is the loss: higher = worse
            rec["signal_seconds"] = rec.get("signal_seconds", 0.0) + time.perf_counter() - t0
            rec["signal_passes"] = rec.get("signal_passes", 0) + len(examples)
            self._save(k)
        return np.asarray(sig[fp])

    # ---------------------------------------------------------------------------- outputs
    def response_lengths(self, examples: Sequence[Example]) -> np.ndarray:
        """``(n,)`` response tokens of each example (the backend's ``response_lengths``), kept per example set
        (in the workdir's ``response_lengths.json`` when there is one)."""
        fp = examples_fingerprint(examples)
        path = self.workdir / "response_lengths.json" if self.workdir is not None else None
        if fp not in self._lengths and path is not None and path.exists():
            try:
                stored = json.loads(path.read_text())
                self._lengths.update({k: np.asarray(v, dtype=np.float64) for k, v in stored.items()})
            except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
                set_aside(path, f"unreadable: {type(e).__name__}: {e}", "response lengths")
        if fp not in self._lengths:
            lengths = np.asarray(self.backend.response_lengths(list(examples)), dtype=np.float64)
            if lengths.shape != (len(examples),) or not np.all(lengths > 0):
                raise ValueError(f"backend.response_lengths returned {lengths.shape} (all positive: "
                                 f"{bool(np.all(lengths > 0))}) for {len(examples)} examples")
            self._lengths[fp] = lengths
            if path is not None:  # kept with the copies: a resumed run asks the backend nothing
                atomic_write_json({k: v.tolist() for k, v in self._lengths.items()}, path)
        return self._lengths[fp]

    def signals(self, examples: Sequence[Example], n_models: Optional[int] = None,
                signal: Optional[str] = None) -> torch.Tensor:
        """``(K, n)`` float64 losses of ``examples`` under the first K models: the mean response NLL, or the
        summed one (``-log-likelihood``), as ``signal`` (default: the object's) says. The workdir keeps the
        summed NLL; the mean divides it by ``response_lengths``."""
        signal = signal or self.signal_kind
        _check_signal(signal, self.backend)
        summed = self._summed_signals(examples, n_models)
        if signal == "sum":
            return summed
        return summed / torch.as_tensor(self.response_lengths(check_examples(examples)))

    def _summed_signals(self, examples: Sequence[Example], n_models: Optional[int] = None) -> torch.Tensor:
        examples = check_examples(examples)
        self._bind_workdir()
        K = n_models or self.n_models
        for k in range(K):
            if self._record(k).get("model_id") is None:
                raise RuntimeError(f"model {k} is not fine-tuned yet: call fit() first")
        fp = examples_fingerprint(examples)
        missing = [k for k in range(K) if fp not in self._record(k).get("signals", {})]
        many = getattr(self.backend, "log_likelihoods_many", None)
        if len(missing) > 1 and callable(many):  # all missing models in one call
            t0 = time.perf_counter()
            ll = np.asarray(many([self._record(k)["model_id"] for k in missing], examples), dtype=np.float64)
            if ll.shape != (len(missing), len(examples)) or not np.all(np.isfinite(ll)):
                raise ValueError(f"backend.log_likelihoods_many returned shape {ll.shape} (finite: "
                                 f"{bool(np.all(np.isfinite(ll)))}) for {len(missing)} models and "
                                 f"{len(examples)} examples")
            share = (time.perf_counter() - t0) / len(missing)
            for k, row in zip(missing, ll):
                rec = self._record(k)
                rec.setdefault("signals", {})[fp] = (-row).tolist()
                rec["signal_seconds"] = rec.get("signal_seconds", 0.0) + share
                rec["signal_passes"] = rec.get("signal_passes", 0) + len(examples)
                self._save(k)
        return torch.as_tensor(np.stack([self._signals_of(k, examples, fp) for k in range(K)]))

    def attribute(self, train: Sequence[Example], queries: Sequence[Example],
                  n_models: Optional[int] = None, signal: Optional[str] = None) -> torch.Tensor:
        """Scores ``(n_train, n_query)`` float32: covariance (or correlation) of losses across the
        first ``n_models`` fine-tunes (default all K). Positive = the training example helped the query.
        ``signal``: ``"mean"`` or ``"sum"`` (default: the object's). ``train`` must be the training set the
        fine-tunes were made on (by this object, or in its workdir): another one is refused."""
        train = check_examples(train, "train")
        self._bind_workdir()
        fp = examples_fingerprint(train)
        if self.train_fingerprint is not None and fp != self.train_fingerprint:
            raise ValueError(f"attribute: train ({len(train)} examples, fingerprint {fp}) is not the training set the "
                             f"fine-tunes were made on ({self.n_train} examples, fingerprint {self.train_fingerprint}):"
                             " call fit() on it first")
        A = self.signals(train, n_models, signal)
        B = self.signals(queries, n_models, signal)
        return scores.score(A, B, self.score_kind).float()

    def fine_tune_seconds(self) -> float:
        """Total seconds spent fine-tuning (including ones recorded by an earlier, resumed run)."""
        return float(sum(self._record(k).get("fine_tune_seconds", 0.0) for k in range(self.n_models)))

    def signal_seconds(self) -> float:
        """Total seconds spent scoring examples (``log_likelihoods``), as recorded in the copies' files
        when first measured: a resumed run reports what the work cost, not what reading it back cost."""
        return float(sum(self._record(k).get("signal_seconds", 0.0) for k in range(self.n_models)))

    def signal_passes(self) -> int:
        """Total example forward passes spent scoring (one per example per model), as recorded."""
        return int(sum(self._record(k).get("signal_passes", 0) for k in range(self.n_models)))
