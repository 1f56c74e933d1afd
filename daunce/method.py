"""``Daunce``: train K perturbed copies of a model, record per-example signals, score by covariance.

Usage::

    d = Daunce(model, ClassificationTask(), DaunceConfig(n_models=64), workdir="runs/lr")
    d.fit(train_set)
    scores = d.attribute(train_set, query_set)      # (n_train, n_query), positive = helpful

The model passed in is never modified: the copies are trained one after the other in a single
working copy whose trainable parameters are reset to theta0 before each copy. Each copy's random
draws (its subset, perturbations, noise direction and minibatch order) come from a generator seeded
by ``(config.seed, k)``, so copy k is the same whatever K is, and a rerun gives the same scores.

With a ``workdir``, every finished copy (its trainable weights and its training signals) is written
atomically to ``workdir/copies/copy_XXXX.pt``; a rerun after a crash loads finished copies instead of
training them again, and growing ``n_models`` later trains only the new ones.

Two trainers produce the same copies from the same plans: the sequential loop (``train_copy``) and
the vectorised one (``daunce.vectorised``: blocks of copies at once with ``torch.func.vmap``);
``trainer="auto"`` picks vmap where the model allows it and says why not otherwise
(``trainer_used``, ``trainer_reason``). Signals that were not recorded during ``fit`` are computed by
``signals`` from the stored copies: with vmap when the trainer is vmap, for a peft LoRA model with
peft's mixed-adapter batches (``daunce.multiadapter``: a block of copies loaded as adapters of one
model, one routed pass per eval batch), and one copy after the other otherwise
(``signal_path_used``, ``signal_path_reason``). ``executor="ray"`` fans blocks of copies out as Ray tasks
(``daunce.distributed``) that write to the same workdir files.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from . import scores as _scores
from .config import DaunceConfig
from .objectives import perturbed_objective, proximal_term
from . import multiadapter as _multi
from . import vectorised as _vec
from .task import task_method

TRAINERS = ("auto", "sequential", "vmap")
SIGNAL_PATHS = ("auto", "sequential", "multi-adapter")
EXECUTORS = ("local", "ray")


# ----------------------------------------------------------------------------------------- helpers
def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path, **dumps_kw) -> None:
    """Write JSON to a temporary file and rename it over ``path``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, **dumps_kw))
    os.replace(tmp, path)


def to_device(batch: Any, device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def fetch(dataset: Dataset, idx: torch.Tensor, collate) -> Any:
    """The batch of ``dataset`` at indices ``idx`` (fast path for a ``TensorDataset``)."""
    if isinstance(dataset, TensorDataset):
        return tuple(t[idx] for t in dataset.tensors)
    return collate([dataset[int(i)] for i in idx])


def fingerprint(dataset: Dataset) -> str:
    """A content hash of a dataset, used to name cached signals."""
    h = hashlib.sha1()
    h.update(str(len(dataset)).encode())
    if isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    else:
        for i in range(len(dataset)):
            item = dataset[i]
            buf = io.BytesIO()
            if torch.is_tensor(item) or isinstance(item, (tuple, list, dict)):
                torch.save(item, buf)
            else:
                pickle.dump(item, buf)
            h.update(buf.getvalue())
    return h.hexdigest()[:16]


def copy_seed(seed: int, k: int) -> int:
    return (seed * 1_000_003 + k * 7_919 + 12_345) % (2**63 - 1)


@dataclass
class CopyPlan:
    """Every random draw of copy k: decided before training, shared by all trainers."""

    k: int
    subset: torch.Tensor  # (m,) indices into the training set
    eps: torch.Tensor  # (n,) perturbation of every training example (only the subset's are used)
    batches: list  # list of (B,) index tensors, in training order
    eta: Optional[list] = field(default=None)  # one tensor per trainable parameter, or None


# ------------------------------------------------------------------------------------------ Daunce
class Daunce:
    """Data attribution through uncertainty estimation.

    Args:
        model: the trained target model theta0 (never modified). Its parameters with
            ``requires_grad=True`` are the ones the copies fine-tune (e.g. only LoRA adapters).
        task: a ``daunce.Task`` (outputs, per-example loss and signal).
        config: a ``DaunceConfig``.
        workdir: folder for resumable artefacts; ``None`` keeps everything in memory.
        eval_batch_size: batch size of the passes that cache base outputs and record signals.
        progress: show tqdm progress bars.
        trainer: ``"sequential"`` trains one copy after the other (``train_copy``); ``"vmap"`` trains
            blocks of copies at once with ``torch.func.vmap`` (``daunce.vectorised``), from the same
            plans, to the same copies up to float rounding; ``"auto"`` uses vmap when the model can be
            vectorised and says why not otherwise (``trainer_used``, ``trainer_reason``, a warning).
        vmap_block: copies per vmap block; ``None`` chooses it from ``vmap_memory`` (bytes).
        executor: ``"local"`` trains in this process; ``"ray"`` fans the copies out as Ray tasks
            (``daunce.distributed``; needs a ``workdir`` that every worker can reach).
        ray_options: for ``executor="ray"``: ``copies_per_task`` (default: the vmap block, or 8),
            ``num_cpus`` (1), ``num_gpus`` (0), ``max_retries`` (3), ``device`` (where each task
            moves the model; default "cuda" when ``num_gpus > 0``), ``init`` (kwargs of ``ray.init``
            when Ray is not initialised yet).
        orthogonal_block: for ``perturbation="orthogonal"``: copies per block of mutually orthogonal
            perturbations; ``None`` takes min(n + d, 5e7 / (n + d)). Each block costs a QR of an
            (n + d) x block matrix, so a block no larger than the K a run needs saves that time. Copy k
            depends on it: keep it fixed for a workdir.
        signal_path: how ``signals`` computes signals that were not recorded during ``fit`` (``fit``
            itself records each copy's signals right after training it). ``"sequential"``: one pass per
            copy with its weights loaded. ``"multi-adapter"``: for peft LoRA models, blocks of copies
            loaded as adapters of one model and evaluated together with peft's mixed-adapter batches
            (``daunce.multiadapter``), the same signals up to float rounding. ``"auto"``: vmap when the
            trainer is vmap, else (on a GPU) multi-adapter when the model and task allow it, else
            sequential (``signal_path_used``, ``signal_path_reason``). On a CPU "auto" keeps one pass
            per copy: the multi-adapter pass measured 0.92-0.99x of it there
            (``benchmarks/results/lora_signals.md``).
        adapter_block: copies per multi-adapter pass; ``None`` chooses it from ``adapter_memory`` (bytes
            of activations one pass, one eval batch of every copy of the block, may use).
    """

    def __init__(self, model: torch.nn.Module, task, config: Optional[DaunceConfig] = None,
                 workdir: Optional[str | os.PathLike] = None, *, eval_batch_size: int = 256,
                 progress: bool = True, trainer: str = "auto", vmap_block: Optional[int] = None,
                 vmap_memory: float = _vec.DEFAULT_MEMORY_BYTES, executor: str = "local",
                 ray_options: Optional[dict] = None, orthogonal_block: Optional[int] = None,
                 signal_path: str = "auto", adapter_block: Optional[int] = None,
                 adapter_memory: float = _multi.DEFAULT_MEMORY_BYTES):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
        if vmap_block is not None and (not isinstance(vmap_block, int) or vmap_block < 1):
            raise ValueError(f"vmap_block must be None (from the memory budget) or an integer >= 1, got {vmap_block!r}")
        if orthogonal_block is not None and (not isinstance(orthogonal_block, int) or orthogonal_block < 2):
            raise ValueError(f"orthogonal_block must be None or an integer >= 2, got {orthogonal_block!r}")
        self.orthogonal_block = orthogonal_block
        if signal_path not in SIGNAL_PATHS:
            raise ValueError(f"signal_path must be one of {SIGNAL_PATHS}, got {signal_path!r}")
        self.adapter_block, self.adapter_memory = _multi.checked_block_options(adapter_block, adapter_memory)
        self.signal_path = signal_path
        self.signal_path_used: Optional[str] = None  # "vmap", "multi-adapter" or "sequential", decided by signals()
        self.signal_path_reason: str = ""
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        if executor == "ray" and workdir is None:
            raise ValueError("executor='ray' needs a workdir on storage that all Ray workers share "
                             "(the copies are written there)")
        self.executor = executor
        self.ray_options = dict(ray_options or {})
        self._init_kwargs = dict(eval_batch_size=eval_batch_size, trainer=trainer, vmap_block=vmap_block,
                                 vmap_memory=vmap_memory, orthogonal_block=orthogonal_block,
                                 signal_path=signal_path, adapter_block=adapter_block, adapter_memory=adapter_memory)
        self.trainer = trainer
        self.vmap_block = vmap_block
        self.vmap_memory = float(vmap_memory)
        self.trainer_used: Optional[str] = None  # "sequential" or "vmap", decided by fit()
        self.trainer_reason: str = ""
        self.model = model
        self.task = task
        self.config = config or DaunceConfig()
        self.workdir = Path(workdir) if workdir is not None else None
        self.eval_batch_size = eval_batch_size
        self.progress = progress
        self._outputs = task_method(task, "outputs")
        self._loss = task_method(task, "loss")
        self._signal = task_method(task, "signal")
        self._ofn = task_method(task, "output_function")
        self._collate = task_method(task, "collate")
        self._work: Optional[torch.nn.Module] = None
        self._states: dict[int, list] = {}  # k -> trainable tensors, when there is no workdir
        self._signal_cache: dict[tuple, torch.Tensor] = {}  # (dataset fingerprint, k) -> signals (n,)
        self.train_fingerprint: Optional[str] = None
        self.n_train: Optional[int] = None
        self.seconds: dict[int, float] = {}
        self.trained_copies: list[int] = []  # copies trained (not loaded) by this object

    # ---------------------------------------------------------------------------- working model
    def _working_model(self) -> torch.nn.Module:
        if self._work is None:
            import copy

            self._work = copy.deepcopy(self.model)
            self._names = [n for n, p in self._work.named_parameters() if p.requires_grad]
            if not self._names:
                raise ValueError("the model has no trainable parameters (requires_grad=True)")
            self._params = [p for n, p in self._work.named_parameters() if p.requires_grad]
            self._theta0 = [p.detach().clone() for p in self._params]
        return self._work

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _load_state(self, state: list) -> None:
        self._working_model()
        with torch.no_grad():
            for p, s in zip(self._params, state):
                p.copy_(s.to(p.device, p.dtype))

    # ------------------------------------------------------------------------------- validation
    def _check_dataset(self, dataset, what: str):
        try:
            n = len(dataset)
        except TypeError as e:
            raise TypeError(f"{what} must be a map-style dataset with len(), got {type(dataset).__name__}") from e
        if n == 0:
            raise ValueError(f"{what} is empty: Daunce needs at least one example")
        return n

    def _per_example(self, value: torch.Tensor, batch_len: int, what: str) -> torch.Tensor:
        if not torch.is_tensor(value) or value.ndim != 1 or value.shape[0] != batch_len:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(
                f"task.{what} must return one value per example, shape ({batch_len},), got {shape}; "
                "use reduction='none' in the loss")
        return value

    # ------------------------------------------------------------------------------- base cache
    def _batches(self, n: int):
        bs = self.eval_batch_size
        for s in range(0, n, bs):
            yield torch.arange(s, min(n, s + bs))

    def _base_cache(self, train: Dataset) -> dict:
        """Outputs, dl/doutputs, loss (and output function) of theta0 on every training example."""
        model = self._working_model()
        self._load_state(self._theta0)
        model.train(self.config.train_mode)
        n = len(train)
        cache: dict[str, torch.Tensor] = {}
        for idx in self._batches(n):
            batch = to_device(fetch(train, idx, self._collate), self.device)
            with torch.enable_grad():
                out = self._outputs(model, batch).detach().requires_grad_(True)
                loss = self._per_example(self._loss(out, batch), len(idx), "loss")
                (grad,) = torch.autograd.grad(loss.sum(), out)
            vals = {"outputs": out.detach(), "grad": grad.detach(), "loss": loss.detach()}
            if self.config.variant == "trak":
                with torch.no_grad():
                    vals["f"] = self._per_example(self._ofn(out.detach(), batch), len(idx), "output_function")
            for key, v in vals.items():
                if key not in cache:
                    cache[key] = v.new_empty((n,) + tuple(v.shape[1:]))
                cache[key][idx.to(v.device)] = v
        return cache

    # ------------------------------------------------------------------------------------ plans
    def plan(self, k: int, n: int) -> CopyPlan:
        """Copy k's subset, perturbations, noise term and minibatch order (deterministic in (seed, k))."""
        cfg = self.config
        g = torch.Generator().manual_seed(copy_seed(cfg.seed, k))
        m = max(1, round(cfg.subset_ratio * n))
        subset = torch.randperm(n, generator=g)[:m]
        bs = cfg.batch_size or m
        batches = []
        n_steps = cfg.n_steps(m)
        while len(batches) < n_steps:
            order = subset[torch.randperm(m, generator=g)]
            batches.extend(order[s : s + bs] for s in range(0, m, bs))
        batches = batches[:n_steps]
        use_eta = self._uses_eta()
        d = self._n_params() if use_eta else 0
        eta_std = 0.0
        if use_eta:
            c = 1.0 if cfg.variant == "if" else 2.0
            eta_std = math.sqrt(cfg.sigma2 * cfg.damping / (c * cfg.gamma * m))
        if cfg.perturbation == "orthogonal":
            z = self._orthogonal_row(k, n + d)
            eps, eta_flat = math.sqrt(cfg.sigma2) * z[:n], eta_std * z[n:]
        else:
            eps = cfg.rho * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
            eta_flat = torch.randn(d, generator=g, dtype=torch.float64) * eta_std
        return CopyPlan(k, subset, eps, batches, self._unflatten(eta_flat) if use_eta else None)

    def _n_params(self) -> int:
        self._working_model()
        return sum(p.numel() for p in self._params)

    def _unflatten(self, flat: torch.Tensor) -> list:
        out, s = [], 0
        for p in self._params:
            out.append(flat[s : s + p.numel()].reshape(p.shape).to(p.device, p.dtype))
            s += p.numel()
        return out

    _ORTHO_MAX_ENTRIES = 5e7

    def _uses_eta(self) -> bool:
        cfg = self.config
        return cfg.isotropic_noise and cfg.variant != "bootstrap" and cfg.damping > 0

    def orthogonal_block_size(self, n: int) -> Optional[int]:
        """Copies per block of the orthogonal design on ``n`` training examples (``None`` for i.i.d.
        perturbations). It decides what copy k is, so it is part of a workdir's manifest."""
        if self.config.perturbation != "orthogonal":
            return None
        D = n + (self._n_params() if self._uses_eta() else 0)
        return int(min(D, self.orthogonal_block or self._ORTHO_MAX_ENTRIES // D))

    def _orthogonal_row(self, k: int, D: int) -> torch.Tensor:
        """Row ``k % B`` of a random block of B mutually orthogonal vectors in R^D, each of norm sqrt(D)
        (so entries have unit variance, like a standard Gaussian vector). B = min(D, ``orthogonal_block``
        or 5e7 / D)."""
        B = int(min(D, self.orthogonal_block or self._ORTHO_MAX_ENTRIES // D))
        if B < 2:
            raise ValueError(f"perturbation='orthogonal' is too large for {D} perturbed values; use 'iid'")
        block = k // B
        cache = getattr(self, "_ortho_cache", None)
        if cache is None or cache[0] != (block, D):
            g = torch.Generator().manual_seed(copy_seed(self.config.seed, 10**9 + block))
            Z = torch.randn(D, B, generator=g, dtype=torch.float64)
            Q, R = torch.linalg.qr(Z)
            Q = Q * torch.sign(torch.diagonal(R))
            cache = ((block, D), (Q.T * math.sqrt(D)).contiguous())
            self._ortho_cache = cache
        return cache[1][k % B]

    # --------------------------------------------------------------------------------- training
    def _optimizer(self, params):
        cfg = self.config
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr)
        return torch.optim.SGD(params, lr=cfg.lr)

    def train_copy(self, plan: CopyPlan, train: Dataset, cache: Optional[dict]) -> list:
        """Fine-tune one copy from theta0 with its perturbed objective; returns its trainable tensors."""
        cfg = self.config
        model = self._working_model()
        self._load_state(self._theta0)
        model.train(cfg.train_mode)
        opt = self._optimizer(self._params)
        eps_all = plan.eps
        for step, idx in enumerate(plan.batches):
            batch = to_device(fetch(train, idx, self._collate), self.device)
            out = self._outputs(model, batch)
            loss = self._per_example(self._loss(out, batch), len(idx), "loss")
            kw = {}
            if cfg.variant != "bootstrap":
                dev_idx = idx.to(cache["loss"].device)
                kw = dict(loss0=cache["loss"][dev_idx], outputs=out, outputs0=cache["outputs"][dev_idx],
                          grad0=cache["grad"][dev_idx], eps=eps_all[idx].to(loss.device, loss.dtype))
                if cfg.variant == "trak":
                    kw["f"] = self._ofn(out, batch)
                    kw["f0"] = cache["f"][dev_idx]
            obj = perturbed_objective(cfg.variant, loss=loss, gamma=cfg.gamma, **kw).mean()
            obj = obj + proximal_term(self._params, self._theta0, cfg.damping, plan.eta)
            if not torch.isfinite(obj):
                raise FloatingPointError(
                    f"Daunce copy {plan.k}, step {step}: the objective is not finite ({obj.item()}); "
                    f"lower lr (now {cfg.lr}) or rho (now {cfg.rho})")
            opt.zero_grad(set_to_none=True)
            obj.backward()
            opt.step()
        return [p.detach().clone().cpu() for p in self._params]

    @torch.no_grad()
    def _signals_now(self, dataset: Dataset) -> torch.Tensor:
        """Signals ``(n,)`` of the working model as it is now."""
        model = self._working_model()
        model.train(False)
        n = len(dataset)
        out = torch.empty(n, dtype=torch.float64)
        for idx in self._batches(n):
            batch = to_device(fetch(dataset, idx, self._collate), self.device)
            s = self._per_example(self._signal(self._outputs(model, batch), batch), len(idx), "signal")
            out[idx] = s.double().cpu()
        return out

    # ------------------------------------------------------------------------------- workdir io
    def _copy_path(self, k: int) -> Path:
        return self.workdir / "copies" / f"copy_{k:04d}.pt"

    def _check_manifest(self, n: int, fp: str) -> None:
        manifest = {"config": json.loads(self.config.training_key()), "n_train": n, "train_fingerprint": fp,
                    "orthogonal_block": self.orthogonal_block_size(n)}
        path = self.workdir / "manifest.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != manifest:
                differ = sorted(key for key in set(old) | set(manifest) if old.get(key) != manifest.get(key))
                raise ValueError(
                    f"workdir {self.workdir} holds copies of another run ({', '.join(differ)} differ: "
                    f"stored {[old.get(key) for key in differ]}, now {[manifest.get(key) for key in differ]}); "
                    "use a new workdir or delete it")
        else:
            atomic_write_json(manifest, path)

    def _finished(self, k: int) -> bool:
        if self.workdir is None:
            return k in self._states
        return self._copy_path(k).exists()

    def _state(self, k: int) -> list:
        if self.workdir is None:
            return self._states[k]
        return torch.load(self._copy_path(k), map_location="cpu", weights_only=True)["state"]

    # ---------------------------------------------------------------------------------- public
    def fit(self, train_dataset: Dataset, query_dataset: Optional[Dataset] = None) -> "Daunce":
        """Train the K perturbed copies on ``train_dataset`` (skipping finished ones in the workdir)
        and record every copy's training signals (and the query signals, if given)."""
        n = self._check_dataset(train_dataset, "train_dataset")
        if query_dataset is not None:
            self._check_dataset(query_dataset, "query_dataset")
        self.n_train = n
        self.train_fingerprint = fingerprint(train_dataset)
        qfp = fingerprint(query_dataset) if query_dataset is not None else None
        if self.workdir is not None:
            self._check_manifest(n, self.train_fingerprint)
        todo = [k for k in range(self.config.n_models) if not self._finished(k)]
        cache = None
        if todo and self.config.variant != "bootstrap":
            cache = self._base_cache(train_dataset)
        if not todo:
            return self
        if self.executor == "ray":
            from .distributed import fit_on_ray

            fit_on_ray(self, todo, train_dataset, query_dataset, qfp, cache)
            return self
        self._train_copies(todo, train_dataset, query_dataset, qfp, cache)
        return self

    def _train_copies(self, todo: list, train: Dataset, query: Optional[Dataset], qfp, cache) -> None:
        """Train and record the copies ``todo`` in this process, with the chosen trainer."""
        n = len(train)
        per_copy = self._choose_trainer(train)
        if self.trainer_used == "vmap":
            self._fit_vmap(todo, train, query, qfp, cache, per_copy)
            return
        bar = tqdm(todo, desc=f"daunce-{self.config.variant} copies", disable=not self.progress)
        for k in bar:
            t0 = time.perf_counter()
            plan = self.plan(k, n)
            state = self.train_copy(plan, train, cache)
            signals = {self.train_fingerprint: self._signals_now(train)}
            if qfp is not None:
                signals[qfp] = self._signals_now(query)
            self._record(k, state, signals, time.perf_counter() - t0)

    def _record(self, k: int, state: list, signals: dict, seconds: float) -> None:
        """Keep (and with a workdir, atomically save) a finished copy's weights and signals."""
        record = {"k": k, "state": state, "signals": signals, "seconds": seconds}
        self.seconds[k] = seconds
        self.trained_copies.append(k)
        if self.workdir is not None:
            atomic_save(record, self._copy_path(k))
        else:
            self._states[k] = state
        for fp, s in signals.items():
            self._signal_cache[(fp, k)] = s

    # ----------------------------------------------------------------------------- vmap trainer
    def _choose_trainer(self, train: Dataset) -> int:
        """Set ``trainer_used`` / ``trainer_reason``; returns vmap's estimated bytes per copy (or 0)."""
        import warnings

        if self.trainer == "sequential":
            self.trainer_used, self.trainer_reason = "sequential", "trainer='sequential' was asked for"
            return 0
        if Daunce.train_copy is not _SEQUENTIAL_TRAIN_COPY or type(self).train_copy is not _SEQUENTIAL_TRAIN_COPY:
            ok, reason, per_copy = False, "train_copy is overridden (the vmap trainer would bypass it)", 0
        else:
            ok, reason, per_copy = _vec.check(self, train)
            if ok and self.trainer == "auto":
                ok, why = _vec.worthwhile(self)
                reason = reason if ok else why
        if ok:
            self.trainer_used, self.trainer_reason = "vmap", reason
            return per_copy
        if self.trainer == "vmap":
            raise ValueError(f"trainer='vmap' cannot be used: {reason}")
        self.trainer_used, self.trainer_reason = "sequential", reason
        warnings.warn(f"Daunce: training the copies one by one (sequential trainer): {reason}", stacklevel=3)
        return 0

    def _fit_vmap(self, todo: list, train: Dataset, query: Optional[Dataset], qfp, cache, per_copy: int) -> None:
        n = len(train)
        vt = _vec.VectorisedTrainer(self)
        size = _vec.block_size(self, per_copy, len(todo))
        self.vmap_block_used = size
        blocks = _vec.blocks_of([self.plan(k, n) for k in todo], size)
        bar = tqdm(total=len(todo), desc=f"daunce-{self.config.variant} copies (vmap x{size})",
                   disable=not self.progress)
        for plans in blocks:
            t0 = time.perf_counter()
            stacked = vt.train(plans, train, cache)
            sig = {self.train_fingerprint: vt.signals(stacked, train)}
            if qfp is not None:
                sig[qfp] = vt.signals(stacked, query)
            seconds = (time.perf_counter() - t0) / len(plans)
            for c, plan in enumerate(plans):
                state = [t[c].clone().cpu() for t in stacked]
                self._record(plan.k, state, {fp: s[c].clone() for fp, s in sig.items()}, seconds)
            bar.update(len(plans))
        bar.close()

    def training_seconds(self, n_models: Optional[int] = None) -> float:
        """Seconds the first ``n_models`` copies (default: K) took to train and record their signals,
        as measured when they were trained (read back from the workdir for copies of an earlier run;
        copies trained together in a vmap block share the block's time equally)."""
        total = 0.0
        for k in range(self.config.n_models if n_models is None else n_models):
            if k not in self.seconds and self.workdir is not None and self._copy_path(k).exists():
                self.seconds[k] = float(torch.load(self._copy_path(k), weights_only=True).get("seconds", 0.0))
            total += self.seconds.get(k, 0.0)
        return total

    def signals(self, dataset: Dataset) -> torch.Tensor:
        """Signal matrix ``(K, n)``: each copy's per-example signal on ``dataset`` (higher = worse).

        Recorded signals are reused; missing ones are computed from the stored copies' weights, with vmap,
        peft mixed-adapter batches or one pass per copy (``signal_path``; ``signal_path_used`` says which)."""
        self._check_dataset(dataset, "dataset")
        K = self.config.n_models
        missing = [k for k in range(K) if not self._finished(k)]
        if missing:
            raise RuntimeError(f"copies {missing[:5]}{'...' if len(missing) > 5 else ''} are not trained: call fit() first")
        fp = fingerprint(dataset)
        rows = [None] * K
        for k in range(K):
            if (fp, k) in self._signal_cache:
                rows[k] = self._signal_cache[(fp, k)]
            elif self.workdir is not None:
                rec = torch.load(self._copy_path(k), map_location="cpu", weights_only=True)
                if fp in rec["signals"]:
                    rows[k] = self._signal_cache[(fp, k)] = rec["signals"][fp]
        todo = [k for k in range(K) if rows[k] is None]
        extra_path = self.workdir / "signals" / f"{fp}.pt" if self.workdir is not None else None
        stored = torch.load(extra_path, weights_only=True) if extra_path is not None and extra_path.exists() else {}
        compute = [k for k in todo if k not in stored]
        path = self._choose_signal_path(dataset) if compute else None
        if path == "vmap":
            # vectorised: the stored copies' weights stacked in blocks, one vmapped pass per eval batch
            vt = _vec.VectorisedTrainer(self)
            size = self.vmap_block or _vec.MAX_BLOCK
            for s in tqdm(range(0, len(compute), size), desc="signals (vmap)", disable=not self.progress):
                ks = compute[s : s + size]
                states = [self._state(k) for k in ks]
                stacked = [torch.stack([st[j] for st in states]).to(p.device, p.dtype)
                           for j, p in enumerate(self._params)]
                sig = vt.signals(stacked, dataset)
                for c, k in enumerate(ks):
                    stored[k] = sig[c].clone()
                if extra_path is not None:
                    atomic_save(stored, extra_path)
        elif path == "multi-adapter":
            # peft mixed-adapter batches: a block of copies as adapters of one model, one routed pass per batch
            size = _multi.block_size(self, dataset, len(compute))
            self.adapter_block_used = size
            if size == 1 and self.signal_path == "auto":
                compute = []  # one copy per pass (budget, or one copy to do): the one-copy loop below
            for s in tqdm(range(0, len(compute), size), desc=f"signals (multi-adapter x{size})",
                          disable=not self.progress):
                ks = compute[s : s + size]
                sig = _multi.signals(self, [self._state(k) for k in ks], dataset)
                for c, k in enumerate(ks):
                    stored[k] = sig[c].clone()
                if extra_path is not None:
                    atomic_save(stored, extra_path)
        for k in tqdm(todo, desc="signals", disable=not self.progress or not todo):
            if k not in stored:
                self._load_state(self._state(k))
                stored[k] = self._signals_now(dataset)
                if extra_path is not None:
                    atomic_save(stored, extra_path)
            rows[k] = self._signal_cache[(fp, k)] = stored[k]
        return torch.stack(rows)

    def _signals_vmap_ok(self, dataset: Dataset) -> bool:
        """Whether ``signals`` may stack copies with vmap (same rules as the trainer; decided once)."""
        if self.trainer == "sequential":
            return False
        if self.trainer_used is None:
            self._choose_trainer(dataset)
        return self.trainer_used == "vmap"

    def _choose_signal_path(self, dataset: Dataset) -> str:
        """How ``signals`` computes missing signals: sets ``signal_path_used`` / ``signal_path_reason``
        (decided on the first dataset that needs it, then kept)."""
        if self.signal_path_used is not None:
            return self.signal_path_used
        if self.signal_path == "sequential":
            used, reason = "sequential", "signal_path='sequential' was asked for"
        elif self.signal_path == "auto" and self._signals_vmap_ok(dataset):
            used, reason = "vmap", f"the trainer is vmap ({self.trainer_reason})"
        else:
            if type(self)._signals_now is not Daunce._signals_now:
                ok, why = False, "_signals_now is overridden (the multi-adapter pass would bypass it)"
            else:
                ok, why = _multi.check(self, dataset)
            if not ok and self.signal_path == "multi-adapter":
                raise ValueError(f"signal_path='multi-adapter' cannot be used: {why}")
            used, reason = ("multi-adapter", why) if ok else ("sequential", why)
            if ok and self.signal_path == "auto" and self.device.type == "cpu":
                # benchmarks/results/lora_signals.md: on a CPU the mixed-adapter pass measured 0.92-0.99x of
                # the one-copy loop (the base model does the same work either way), so "auto" keeps the loop
                used, reason = "sequential", ("on a CPU the multi-adapter pass is not faster than one pass per copy "
                                              "(benchmarks/results/lora_signals.md); signal_path='multi-adapter' "
                                              f"forces it ({why})")
        self.signal_path_used, self.signal_path_reason = used, reason
        return used

    def attribute(self, train_dataset: Dataset, query_dataset: Dataset) -> torch.Tensor:
        """Scores ``(n_train, n_query)`` (float32): covariance (or correlation) of training and query
        signals across the K copies. Positive = the training example helped the query."""
        self._check_dataset(train_dataset, "train_dataset")
        self._check_dataset(query_dataset, "query_dataset")
        A = self.signals(train_dataset)
        B = self.signals(query_dataset)
        return _scores.score(A, B, self.config.score).float()


_SEQUENTIAL_TRAIN_COPY = Daunce.train_copy
