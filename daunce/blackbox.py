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

A backend may also offer ``log_likelihoods_many(model_ids, examples) -> (K, n)``, the log-likelihoods under
several models at once; ``BlackBoxDaunce.signals`` then asks for all missing rows in one call
(``LocalLoRABackend`` evaluates its adapters together with peft's mixed-adapter batches).

Backends whose fine-tunes are jobs on a server (``daunce.openai_backend.OpenAIBackend``) also offer
``start_fine_tune(examples, seed) -> job_id`` and ``wait_fine_tune(job_id) -> model_id``:
``BlackBoxDaunce`` then writes every job id to the work folder the moment the job exists, submits all
jobs before waiting on any (the server trains them in parallel), and a run interrupted while a job was
running resumes polling that job instead of paying for a second fine-tune. Model ids and signals are
written too (atomic JSON writes), so a finished model is never fine-tuned or scored twice.

Examples are dicts ``{"prompt": str, "response": str}`` (the format of ``daunce.textdata``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import multiadapter as _multi
from . import scores as _scores
from .method import atomic_save, atomic_write_json, copy_seed

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


# ----------------------------------------------------------------------------------- the method
class BlackBoxDaunce:
    """Daunce through a fine-tuning API: K fine-tunes on random subsets, covariance of losses.

    Args:
        backend: a ``Backend`` (``fine_tune``, ``log_likelihoods``; optionally ``start_fine_tune`` and
            ``wait_fine_tune`` for server-side jobs).
        n_models: K, the number of fine-tunes (>= 2).
        subset_ratio: fraction of the training set each fine-tune sees (0 < r <= 1).
        seed: subset k and fine-tune seed k come from ``(seed, k)``: copy k is the same whatever K is.
        score: ``"cov"`` (the paper) or ``"corr"``.
        workdir: folder for job ids, model ids and signals (``copies/copy_XXXX.json``); ``None`` keeps
            them in memory only.
        progress: show tqdm bars.

    Attributes after ``fit``: ``fine_tunes_started`` (fine-tunes this object paid for),
    ``seconds`` (wall time per copy: fine-tune + scoring).
    """

    def __init__(self, backend, *, n_models: int = 16, subset_ratio: float = 0.5, seed: int = 0,
                 score: str = "cov", workdir=None, progress: bool = True):
        if not (callable(getattr(backend, "fine_tune", None)) and callable(getattr(backend, "log_likelihoods", None))):
            raise TypeError("backend must provide fine_tune(examples, seed) and log_likelihoods(model_id, examples)")
        if not isinstance(n_models, int) or n_models < 2:
            raise ValueError(f"n_models (K) must be an integer >= 2, got {n_models!r}")
        if not 0.0 < float(subset_ratio) <= 1.0:
            raise ValueError(f"subset_ratio must lie in (0, 1], got {subset_ratio!r}")
        if score not in ("cov", "corr"):
            raise ValueError(f"score must be 'cov' or 'corr', got {score!r}")
        self.backend = backend
        self.n_models = n_models
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
        return copy_seed(self.seed, k) % (2**31 - 1)

    # ------------------------------------------------------------------------------ records
    def _path(self, k: int) -> Path:
        return self.workdir / "copies" / f"copy_{k:04d}.json"

    def _record(self, k: int) -> dict:
        if k not in self._records:
            rec = {"k": k}
            if self.workdir is not None and self._path(k).exists():
                rec = json.loads(self._path(k).read_text())
            self._records[k] = rec
        return self._records[k]

    def _save(self, k: int) -> None:
        if self.workdir is not None:
            atomic_write_json(self._records[k], self._path(k))

    def _check_manifest(self, n: int, fp: str) -> None:
        manifest = {"n_train": n, "train_fingerprint": fp, "subset_ratio": self.subset_ratio, "seed": self.seed,
                    "backend": getattr(self.backend, "identity", lambda: type(self.backend).__name__)()}
        path = self.workdir / "manifest.json"
        if path.exists():
            if json.loads(path.read_text()) != manifest:
                raise ValueError(f"workdir {self.workdir} holds fine-tunes of another run (training set, subset "
                                 "ratio, seed or backend differ); use a new workdir or delete it")
        else:
            atomic_write_json(manifest, path)

    # -------------------------------------------------------------------------------- fit
    def fit(self, train: Sequence[Example], queries: Optional[Sequence[Example]] = None) -> "BlackBoxDaunce":
        """Fine-tune the K models (skipping those already in the workdir) and record the losses of
        every training example and query under each."""
        train = check_examples(train, "train")
        n = len(train)
        self.n_train = n
        self.train_fingerprint = examples_fingerprint(train)
        if self.workdir is not None:
            self._check_manifest(n, self.train_fingerprint)
        ks = list(range(self.n_models))
        if is_async(self.backend):
            # submit every missing job first (ids stored at once), then wait on them in order
            for k in ks:
                rec = self._record(k)
                if rec.get("model_id") is None and rec.get("job_id") is None:
                    t0 = time.perf_counter()
                    sub = [train[i] for i in self.subset(k, n)]
                    rec["job_id"] = self.backend.start_fine_tune(sub, self.fine_tune_seed(k))
                    rec["submit_seconds"] = time.perf_counter() - t0
                    self.fine_tunes_started += 1
                    self._save(k)
        bar = tqdm(ks, desc="black-box fine-tunes", disable=not self.progress)
        for k in bar:
            rec = self._record(k)
            t0 = time.perf_counter()
            if rec.get("model_id") is None:
                if rec.get("job_id") is not None:
                    rec["model_id"] = self.backend.wait_fine_tune(rec["job_id"])
                else:
                    sub = [train[i] for i in self.subset(k, n)]
                    rec["model_id"] = self.backend.fine_tune(sub, self.fine_tune_seed(k))
                    self.fine_tunes_started += 1
                rec["fine_tune_seconds"] = time.perf_counter() - t0 + rec.get("submit_seconds", 0.0)
                self._save(k)
            self._signals_of(k, train, self.train_fingerprint)
            if queries is not None:
                queries = check_examples(queries, "queries")
                self._signals_of(k, queries)
            self.seconds[k] = time.perf_counter() - t0
        return self

    def _signals_of(self, k: int, examples: list, fp: Optional[str] = None) -> np.ndarray:
        rec = self._record(k)
        fp = fp or examples_fingerprint(examples)
        sig = rec.setdefault("signals", {})
        if fp not in sig:
            ll = np.asarray(self.backend.log_likelihoods(rec["model_id"], examples), dtype=np.float64)
            if ll.shape != (len(examples),) or not np.all(np.isfinite(ll)):
                raise ValueError(f"backend.log_likelihoods returned shape {ll.shape} (finite: "
                                 f"{bool(np.all(np.isfinite(ll)))}) for {len(examples)} examples")
            sig[fp] = (-ll).tolist()  # the signal is the loss: higher = worse
            self._save(k)
        return np.asarray(sig[fp])

    # ---------------------------------------------------------------------------- outputs
    def signals(self, examples: Sequence[Example], n_models: Optional[int] = None) -> torch.Tensor:
        """``(K, n)`` float64 losses (``-log-likelihood``) of ``examples`` under the first K models."""
        examples = check_examples(examples)
        K = n_models or self.n_models
        for k in range(K):
            if self._record(k).get("model_id") is None:
                raise RuntimeError(f"model {k} is not fine-tuned yet: call fit() first")
        fp = examples_fingerprint(examples)
        missing = [k for k in range(K) if fp not in self._record(k).get("signals", {})]
        many = getattr(self.backend, "log_likelihoods_many", None)
        if len(missing) > 1 and callable(many):  # all missing models in one call
            ll = np.asarray(many([self._record(k)["model_id"] for k in missing], examples), dtype=np.float64)
            if ll.shape != (len(missing), len(examples)) or not np.all(np.isfinite(ll)):
                raise ValueError(f"backend.log_likelihoods_many returned shape {ll.shape} (finite: "
                                 f"{bool(np.all(np.isfinite(ll)))}) for {len(missing)} models and "
                                 f"{len(examples)} examples")
            for k, row in zip(missing, ll):
                self._record(k).setdefault("signals", {})[fp] = (-row).tolist()
                self._save(k)
        return torch.as_tensor(np.stack([self._signals_of(k, examples, fp) for k in range(K)]))

    def train_mask(self, n_models: Optional[int] = None) -> torch.Tensor:
        """``(K, n)`` bool: whether training example i was in model k's subset."""
        K = n_models or self.n_models
        mask = torch.zeros(K, self.n_train, dtype=torch.bool)
        for k in range(K):
            mask[k, self.subset(k, self.n_train)] = True
        return mask

    def attribute(self, train: Sequence[Example], queries: Sequence[Example],
                  n_models: Optional[int] = None) -> torch.Tensor:
        """Scores ``(n_train, n_query)`` float32: covariance (or correlation) of losses across the
        first ``n_models`` fine-tunes (default all K). Positive = the training example helped the query."""
        A = self.signals(train, n_models)
        B = self.signals(queries, n_models)
        return _scores.score(A, B, self.score_kind).float()

    def fine_tune_seconds(self) -> float:
        """Total seconds spent fine-tuning (including ones recorded by an earlier, resumed run)."""
        return float(sum(self._record(k).get("fine_tune_seconds", 0.0) for k in range(self.n_models)))


# ------------------------------------------------------------------------------- local backend
class LocalLoRABackend:
    """The backend protocol served by a local transformers + peft model (SmolLM2-135M-Instruct by
    default, via ``daunce.llm``).

    ``fine_tune`` resets the LoRA adapters (a fresh initialisation seeded by ``seed``, or the adapters of
    a given ``init_state`` such as theta0's), trains them on the examples with ``daunce.llm.finetune`` and
    saves the adapter weights to ``workdir/adapters/<model_id>.pt``. The id is a hash of (examples,
    seed, settings), so asking again for the same fine-tune loads the stored adapter instead of
    training. ``log_likelihoods`` loads an adapter and returns each response's summed log-likelihood
    (``daunce.llm.response_log_likelihood``). One peft model is kept and its adapters swapped.
    ``log_likelihoods_many`` scores several models at once: blocks of their adapters loaded side by side
    into the same peft model and every batch evaluated under all of them in one forward pass (peft's
    mixed-adapter batches, ``daunce.multiadapter``).

    Args:
        model, tokenizer: the base model (a plain causal LM, without adapters; it is copied, not
            modified) and its tokenizer; ``None`` loads SmolLM2-135M-Instruct with ``daunce.llm.load_smollm2``.
        workdir: where adapters are stored.
        lora: keyword arguments of ``daunce.llm.add_lora`` (r, alpha, targets).
        train: keyword arguments of ``daunce.llm.finetune`` (epochs, lr, batch_size, max_length).
        init_state: adapter weights to start every fine-tune from (``daunce.llm.trainable_state`` of a
            model with the same adapters); ``None`` starts from the base model (fresh adapters, B = 0).
        eval_batch_size, max_length: for the log-likelihood passes.
        adapter_block: adapters per pass of ``log_likelihoods_many``; ``None`` chooses it from
            ``adapter_memory`` (bytes of activations one pass may use).
    """

    def __init__(self, model=None, tokenizer=None, *, workdir, lora: Optional[dict] = None,
                 train: Optional[dict] = None, init_state: Optional[dict] = None, eval_batch_size: int = 16,
                 max_length: int = 128, adapter_block: Optional[int] = None,
                 adapter_memory: float = _multi.DEFAULT_MEMORY_BYTES):
        import copy

        from . import llm

        self.adapter_block, self.adapter_memory = _multi.checked_block_options(adapter_block, adapter_memory)
        self._slots = None

        self._llm = llm
        if model is None:
            model, tokenizer = llm.load_smollm2()
        else:
            model = copy.deepcopy(model)
        self.tokenizer = tokenizer
        self.workdir = Path(workdir)
        (self.workdir / "adapters").mkdir(parents=True, exist_ok=True)
        self.lora = dict(lora or {})
        self.train = dict(train or {})
        self.train.setdefault("progress", False)
        self.init_state = init_state
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.n_trained = 0
        self.name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        self.model = llm.add_lora(model, seed=0, **self.lora)
        self._loaded: Optional[str] = None

    def __repr__(self):
        return f"LocalLoRABackend(workdir={str(self.workdir)!r}, lora={self.lora}, train={self.train})"

    def identity(self) -> str:
        init = None
        if self.init_state is not None:
            h = hashlib.sha1()
            for k in sorted(self.init_state):
                h.update(k.encode())
                h.update(self.init_state[k].detach().cpu().float().numpy().tobytes())
            init = h.hexdigest()[:12]
        train = {k: v for k, v in self.train.items() if k != "progress"}
        return json.dumps({"local": self.name, "lora": self.lora, "train": train, "init": init}, sort_keys=True)

    def _path(self, model_id: str) -> Path:
        return self.workdir / "adapters" / f"{model_id}.pt"

    def _reset(self, seed: int) -> None:
        """Adapters to their starting point: ``init_state``, or a fresh initialisation seeded by ``seed``."""
        if self.init_state is not None:
            self._llm.load_trainable_state(self.model, self.init_state)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for module in self.model.modules():
                    if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
                        module.reset_lora_parameters("default", True)
        self._loaded = None

    def fine_tune(self, examples: Sequence[Example], seed: int) -> str:
        examples = check_examples(examples)
        key = json.dumps({"data": examples_fingerprint(examples), "seed": int(seed), "id": self.identity()})
        model_id = "lora-" + hashlib.sha1(key.encode()).hexdigest()[:12]
        if self._path(model_id).exists():
            return model_id
        self._reset(seed)
        self._llm.finetune(self.model, self.tokenizer, examples, seed=seed, **self.train)
        state = {k: v.cpu() for k, v in self._llm.trainable_state(self.model).items()}
        atomic_save(state, self._path(model_id))
        self.n_trained += 1
        self._loaded = model_id
        return model_id

    def _adapter(self, model_id: str) -> dict:
        path = self._path(model_id)
        if not path.exists():
            raise KeyError(f"unknown model id {model_id!r} (no adapter at {path})")
        return torch.load(path, map_location="cpu", weights_only=True)

    def load(self, model_id: str):
        """The peft model with ``model_id``'s adapters loaded (eval mode)."""
        if self._loaded != model_id:
            self._llm.load_trainable_state(self.model, self._adapter(model_id))
            self._loaded = model_id
        self.model.eval()
        return self.model

    def log_likelihoods(self, model_id: str, examples: Sequence[Example]) -> np.ndarray:
        model = self.load(model_id)
        ll = self._llm.response_log_likelihood(model, self.tokenizer, list(examples),
                                               batch_size=self.eval_batch_size, max_length=self.max_length)
        return torch.as_tensor(ll).double().cpu().numpy()

    @torch.no_grad()
    def log_likelihoods_many(self, model_ids: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        """``(K, n)``: ``log_likelihoods(model_ids[k], examples)`` for every k (equal up to float rounding),
        with blocks of the models' adapters evaluated together in mixed-adapter forward passes."""
        ids = list(model_ids)
        if not ids:
            raise ValueError("model_ids is empty")
        examples = check_examples(examples)
        llm = self._llm
        states = [self._adapter(m) for m in ids]  # unknown ids fail here, before any work
        if self._slots is None:
            self._slots = _multi.AdapterSlots(self.model, [n for n, p in self.model.named_parameters() if p.requires_grad])
        ds = llm.TextDataset(self.tokenizer, examples, self.max_length)
        task = llm.CausalLMTask()
        device = next(self.model.parameters()).device
        self.model.eval()
        block = self.adapter_block
        if block is None:
            probe = {k: v.to(device) for k, v in next(llm.batches(ds, min(3, len(ds)))).items()}
            rows = min(self.eval_batch_size, len(ds))
            per_row = _multi.row_bytes(self.model, task.outputs, probe)
            block = _multi.copies_per_pass(self.adapter_memory, rows, per_row, len(ids))
        out = np.empty((len(ids), len(ds)))
        for s in range(0, len(ids), block):
            part = states[s : s + block]
            for c, state in enumerate(part):
                self._slots.load(c, state)
            start = 0
            for batch in llm.batches(ds, self.eval_batch_size):
                batch = {k: v.to(device) for k, v in batch.items()}
                B = batch["input_ids"].shape[0]
                outs = _multi.routed_outputs(self._slots, len(part), task.outputs, batch, B)
                for c, o in enumerate(outs.split(B)):
                    out[s + c, start : start + B] = -task._token_losses(o, batch)[0].double().cpu().numpy()
                start += B
        return out


def clear(workdir) -> None:
    """Delete a black-box run's work folder."""
    shutil.rmtree(workdir, ignore_errors=True)
