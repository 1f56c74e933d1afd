"""``Daunce``: train K perturbed copies of a model, record per-example signals, score by covariance.

Usage::

    d = Daunce(model, ClassificationTask(), DaunceConfig(n_models=64), workdir="runs/lr")
    d.fit(train_set)
    scores = d.attribute(train_set, query_set)      # (n_train, n_query), positive = helpful

This class is a small front; the work is done elsewhere and handed one public object:

* ``daunce.plans``: copy k's random draws (subset, perturbations, noise direction, minibatch order),
  from a generator seeded by ``(config.seed, k)``, so copy k is the same whatever K is;
* ``daunce.engines``: a ``ModelContext`` (the working copy of the model, theta0, the task's calls; the
  model passed in is never modified) and the engines that train copies and record signals with it:
  ``sequential`` (one copy after the other), ``vmap`` (blocks of copies at once with
  ``torch.func.vmap``, the same copies up to float rounding), ``stacked`` (blocks of full-batch copies in
  shared-input passes: the first layer of every copy as one large matmul), ``multiadapter`` (signals of LoRA copies
  in peft mixed-adapter passes) and ``ray_executor`` (blocks of copies as Ray tasks);
* ``daunce.store``: with a ``workdir``, every finished copy (its trainable weights and signals) is
  written atomically to ``workdir/copies/copy_XXXX.pt``; a rerun loads finished copies instead of
  training them again, growing ``n_models`` trains only the new ones, and a workdir of another run
  (configuration, orthogonal design, training set, model architecture, theta0's weights or task) is refused.
  A damaged copy file is moved aside with a warning and the copy trained again.

A ``Daunce`` object is bound to the training set of its last ``fit``: in memory a ``fit`` on another training
set starts afresh (the earlier copies, cached signals, resolved "auto" settings and trainer choice are dropped);
with a workdir it is refused (the folder holds the copies of the first training set). ``attribute`` refuses a
training set other than the fitted one (``signals`` gives the copies' signals on any dataset).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from . import auto
from . import scores as _scores
from .config import DaunceConfig
from .engines import multiadapter, sequential, stacked, vmap
from .engines.context import (
    DEFAULT_MEMORY_BYTES,
    ModelContext,
    check_dataset,
    check_training_set,
    running_stat_modules,
)
from .engines.ray_executor import EXECUTORS, fit_on_ray
from .plans import CopyPlan, OrthogonalDesign, make_plan, orthogonal_block_size, uses_isotropic_noise
from .progress import progress_bar
from .store import (
    CopyStore,
    check_manifest,
    fingerprint,
    model_fingerprint,
    read_manifest,
    task_fingerprint,
    update_manifest,
)

TRAINERS = ("auto", "sequential", "vmap", "shared")
SIGNAL_PATHS = ("auto", "sequential", "multi-adapter")
SignalFn = Callable[[torch.Tensor, object], torch.Tensor]
#: manifest fields that bind a workdir to the model and the task (added to a manifest written before them)
BINDING_FIELDS = ("architecture", "model_weights", "task")


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
        trainer: ``"sequential"`` trains one copy after the other; ``"vmap"`` trains blocks of copies at
            once with ``torch.func.vmap`` (``daunce.engines.vmap``), from the same plans, to the same copies
            up to float rounding; ``"shared"`` trains blocks of full-batch copies in shared-input passes
            (``daunce.engines.stacked``: the first layer of all copies of a block as one large matmul on the
            union of their subsets, later layers as batched matmuls), the same copies up to float rounding.
            ``"auto"`` uses "shared" where it applies (an ``nn.Sequential`` of supported layers, or a module whose
            ``forward`` ``torch.fx`` traces into one chain of them and of functional activations, pooling and
            flatten/view: ``daunce.engines.stacked.supported``; full batch) and the model has no trainable
            convolution on a CPU, else vmap when the model can be vectorised and it
            is expected to be faster, else the sequential loop, and says why (``trainer_used``,
            ``trainer_reason``). The choice is made on the training set. From
            ``benchmarks/results/copy_throughput.md``: on ``02_vision_lds``'s logistic regression and MLP "shared"
            was 4.4x and 1.6x faster than vmap at K = 256 (the MLP written as a class, ``models.MLPModule``: 1.57x);
            on its CNN the sequential loop stayed fastest (the copies'
            convolutions are bound by memory traffic on their activations, which sharing does not reduce).
        vmap_block: copies per vmap or shared-input block; ``None`` chooses it from ``vmap_memory`` (bytes).
        shared_layout: the shared-input trainer's layout: ``"union"`` (the first layer on the union of the
            block's subsets), ``"gather"`` (each copy's subset gathered once per block) or ``"auto"`` (by the
            first trainable layer's width, ``daunce.engines.stacked.GATHER_MIN_WIDTH``; ``trainer_reason`` says
            which and why).
        executor: ``"local"`` trains in this process; ``"ray"`` fans the copies out as Ray tasks
            (``daunce.engines.ray_executor``; needs a ``workdir`` that every worker can reach).
        ray_options: for ``executor="ray"``: ``copies_per_task`` (default: the vmap block, or 8),
            ``num_cpus`` (1), ``num_gpus`` (0), ``max_retries`` (3), ``device`` (where each task
            moves the model; default "cuda" when ``num_gpus > 0``), ``init`` (kwargs of ``ray.init``
            when Ray is not initialised yet).
        orthogonal_block: for ``perturbation="orthogonal"``: copies per block of mutually orthogonal
            perturbations; ``None`` takes min(n + d, 5e7 / (n + d)). Each block costs a QR of an
            (n + d) x block matrix, so a block no larger than the K a run needs saves that time. Copy k
            depends on it: it is part of a workdir's manifest.
        signal_path: how ``signals`` computes signals that were not recorded during ``fit`` (``fit``
            itself records each copy's signals right after training it). ``"sequential"``: one pass per
            copy with its weights loaded. ``"multi-adapter"``: for peft LoRA models, blocks of copies
            loaded as adapters of one model and evaluated together with peft's mixed-adapter batches
            (``daunce.engines.multiadapter``), the same signals up to float rounding. ``"auto"``: vmap
            when the trainer is vmap, else (on a GPU) multi-adapter when the model and task allow it, else
            sequential (``signal_path_used``, ``signal_path_reason``). On a CPU "auto" keeps one pass
            per copy: the multi-adapter pass measured 0.92-0.99x of it there
            (``benchmarks/results/lora_signals.md``).
        adapter_block: copies per multi-adapter pass; ``None`` chooses it from ``adapter_memory`` (bytes
            of activations one pass, one eval batch of every copy of the block, may use).
    """

    def __init__(self, model: torch.nn.Module, task, config: Optional[DaunceConfig] = None,
                 workdir: Optional[str | os.PathLike] = None, *, eval_batch_size: int = 256,
                 progress: bool = True, trainer: str = "auto", vmap_block: Optional[int] = None,
                 vmap_memory: float = DEFAULT_MEMORY_BYTES, executor: str = "local",
                 ray_options: Optional[dict] = None, orthogonal_block: Optional[int] = None,
                 signal_path: str = "auto", adapter_block: Optional[int] = None,
                 adapter_memory: float = DEFAULT_MEMORY_BYTES, shared_layout: str = "auto"):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
        if vmap_block is not None and (not isinstance(vmap_block, int) or vmap_block < 1):
            raise ValueError(f"vmap_block must be None (from the memory budget) or an integer >= 1, got {vmap_block!r}")
        if orthogonal_block is not None and (not isinstance(orthogonal_block, int) or orthogonal_block < 2):
            raise ValueError(f"orthogonal_block must be None or an integer >= 2, got {orthogonal_block!r}")
        if shared_layout not in stacked.LAYOUTS:
            raise ValueError(f"shared_layout must be one of {stacked.LAYOUTS}, got {shared_layout!r}")
        if signal_path not in SIGNAL_PATHS:
            raise ValueError(f"signal_path must be one of {SIGNAL_PATHS}, got {signal_path!r}")
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        if executor == "ray" and workdir is None:
            raise ValueError("executor='ray' needs a workdir on storage that all Ray workers share "
                             "(the copies are written there)")
        if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be an integer >= 1, got {eval_batch_size!r}")
        self.adapter_block, self.adapter_memory = multiadapter.checked_block_options(adapter_block, adapter_memory)
        self.model, self.task = model, task
        self.config = config or DaunceConfig()
        if self.config.train_mode and self.config.batchnorm == "eval" and running_stat_modules(model):
            # train_mode=True is model.train(): it would put BatchNorm in train mode too, which batchnorm="eval" says
            # it is not; the two settings must agree
            raise ValueError(f"train_mode=True with batchnorm='eval' on a model with BatchNorm running statistics "
                             f"(module {running_stat_modules(model)[0][0]!r}): pass batchnorm='train' too (each copy "
                             "trains its own running statistics, the authors' net.train()), or train_mode=False "
                             "(BatchNorm with theta0's statistics)")
        self.workdir = Path(workdir) if workdir is not None else None
        self.eval_batch_size, self.progress = eval_batch_size, progress
        self.trainer, self.vmap_block, self.vmap_memory = trainer, vmap_block, float(vmap_memory)
        self.executor, self.ray_options = executor, dict(ray_options or {})
        self.orthogonal_block, self.signal_path, self.shared_layout = orthogonal_block, signal_path, shared_layout
        #: the keyword options of this object (what a Ray worker needs to build the same front)
        self.options = dict(eval_batch_size=eval_batch_size, trainer=trainer, vmap_block=vmap_block,
                            vmap_memory=vmap_memory, orthogonal_block=orthogonal_block, signal_path=signal_path,
                            adapter_block=adapter_block, adapter_memory=adapter_memory, shared_layout=shared_layout)
        self.trainer_used: Optional[str] = None  # "sequential", "vmap" or "shared", decided on the training set
        self.trainer_reason: str = ""
        self.signal_path_used: Optional[str] = None  # "vmap", "shared", "multi-adapter" or "sequential"
        self.signal_path_reason: str = ""
        self.vmap_block_used: Optional[int] = None
        self.adapter_block_used: Optional[int] = None
        self.store = CopyStore(self.workdir)
        self.train_fingerprint: Optional[str] = None
        self.n_train: Optional[int] = None
        self.seconds: dict[int, float] = {}
        self.trained_copies: list[int] = []  # copies trained (not loaded) by this object
        #: the configuration the copies are trained with: ``config`` with every "auto" field resolved
        #: (``daunce.auto``) on the training set of ``fit``; ``resolved`` holds what the rule measured
        self.resolved_config: Optional[DaunceConfig] = None if self.config.auto_fields else self.config.static()
        self.resolved: dict = {}
        #: per copy trained or loaded by this object: optimiser steps taken and whether the stopping test passed
        #: (None: no stopping test); ``unconverged``: copies that reached ``max_steps`` without passing it
        self.copy_steps: dict[int, int] = {}
        self.copy_converged: dict[int, Optional[bool]] = {}
        self.unconverged: set = set()
        self._ctx: Optional[ModelContext] = None
        self._design = OrthogonalDesign(self.config.seed, orthogonal_block)
        self._train_set: Optional[Dataset] = None  # the training set of the last fit (trainer choice)
        self._per_copy_bytes = 0
        self._signal_cache: dict[tuple, torch.Tensor] = {}  # (dataset fingerprint, k) -> signals (n,)
        self._adapter_pass: Optional[multiadapter.MultiAdapterPass] = None
        self._bound = False  # whether the workdir's manifest has been checked against this model and task

    # ---------------------------------------------------------------------------------- context
    @property
    def context(self) -> ModelContext:
        """The ``ModelContext`` the engines work in (created on first use)."""
        if self._ctx is None:
            self._ctx = ModelContext(self.model, self.task, self.eval_batch_size)
        return self._ctx

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def copies_batchnorm(self) -> Optional[str]:
        """The mode the copies' BatchNorm layers with running statistics train in: ``"train"`` (batch statistics,
        each copy its own running statistics, signals in eval mode with them) or ``"eval"`` (theta0's running
        statistics), from ``config.batchnorm``; ``None`` for a model without such layers."""
        return self.config.batchnorm if running_stat_modules(self.model) else None

    @property
    def per_copy_stats(self) -> bool:
        """Whether every copy keeps its own BatchNorm running statistics (``copies_batchnorm == "train"``): they are
        stored with the copy (``stats``) and used by every signal pass of it."""
        return self.copies_batchnorm == "train"

    @property
    def uses_base_cache(self) -> bool:
        """Whether the copies' objective uses theta0's values cached once per fit (``base_cache``); not for the
        bootstrap form, nor where they are computed on each batch (``DaunceConfig.live_base``)."""
        return self.config.variant != "bootstrap" and not self.config.live_base

    # ------------------------------------------------------------------------------------ plans
    def plan(self, k: int, n: int) -> CopyPlan:
        """Copy k's subset, perturbations, noise term and minibatch order (deterministic in (seed, k))."""
        ctx = self.context
        cfg = self.resolved_config
        if cfg is None and not self.config.plan_auto_fields:  # only the optimiser is "auto": the plan is known
            cfg = self.config
        return make_plan(cfg if cfg is not None else self.training_config(), k, n, ctx.n_params, ctx.unflatten,
                         self._design)

    def training_config(self) -> DaunceConfig:
        """The resolved configuration (``resolved_config``); an error before ``resolve`` / ``fit`` when the
        configuration has "auto" fields."""
        if self.resolved_config is None:
            raise RuntimeError(f"the fields {self.config.auto_fields} are 'auto': call fit() (or resolve(train)) first")
        return self.resolved_config

    def resolve(self, train_dataset: Dataset) -> DaunceConfig:
        """Resolve the "auto" fields of the configuration on ``train_dataset`` (``daunce.auto``; once per
        object). With a workdir whose manifest already holds resolved values, or holds the same configuration
        with these fields set explicitly, those values are taken, so a rerun or a run that grows K trains its
        copies with the settings of the copies already there."""
        if self.resolved_config is not None:
            return self.resolved_config
        stored = read_manifest(self.workdir) if self.workdir is not None else None
        if stored is not None and stored.get("n_train") == len(train_dataset):
            key, old = json.loads(self.config.training_key()), stored.get("config", {})
            autos = self.config.auto_fields
            if old == key and "resolved" in stored:
                if stored.get("auto_rule") != auto.RULE_VERSION:
                    raise ValueError(
                        f"{self.workdir}: its copies' 'auto' settings {stored['resolved']} were resolved by "
                        f"{'version ' + str(stored['auto_rule']) if 'auto_rule' in stored else 'an earlier version'}"
                        f" of the rule (daunce.auto), this is version {auto.RULE_VERSION}: use a new folder (or delete "
                        "this one) to resolve them again, or pass those values explicitly to keep these copies")
                self.resolved = {"resolved": stored["resolved"], "reused_from_manifest": True}
                self.resolved_config = self.config.static().replace(**stored["resolved"])
                return self.resolved_config
            if set(old) == set(key) and all(old[f] == key[f] for f in key if f not in autos) \
                    and all(old[f] != "auto" for f in autos):
                # the folder's copies were trained with these fields set explicitly: "auto" takes their values,
                # and the folder keeps its manifest
                values = {f: old[f] for f in autos}
                self.resolved = {"resolved": values, "reused_from_manifest": True, "explicit_in_manifest": True}
                self.resolved_config = self.config.static().replace(**values)
                return self.resolved_config
        self.resolved_config, self.resolved = auto.resolve(self.context, self.config, train_dataset)
        return self.resolved_config

    def orthogonal_block_size(self, n: int) -> Optional[int]:
        """Copies per block of the orthogonal design on ``n`` training examples (``None`` for i.i.d.
        perturbations). It decides what copy k is, so it is part of a workdir's manifest."""
        if self.config.perturbation != "orthogonal":
            return None
        d = self.context.n_params if uses_isotropic_noise(self.training_config()) else 0
        return orthogonal_block_size(n + d, self.orthogonal_block)

    # ------------------------------------------------------------------------------ copy store
    def is_trained(self, k: int) -> bool:
        """Whether copy ``k`` is finished (in memory or in the workdir)."""
        return self.store.has(k)

    def state(self, k: int) -> list:
        """Copy ``k``'s trainable tensors (CPU), in the order of ``context.names``."""
        return self.store.load(k)["state"]

    def stats(self, k: int) -> Optional[list]:
        """Copy ``k``'s own BatchNorm running statistics (CPU, in the order of ``context.stat_names``) when it kept
        them (``per_copy_stats``), else ``None`` (it used theta0's)."""
        return self.store.load(k).get("stats")

    @property
    def n_unconverged(self) -> int:
        """Copies (of the first K) that reached ``max_steps`` without passing the stopping test."""
        return sum(1 for k in self.unconverged if k < self.config.n_models)

    def _record(self, k: int, state: list, signals: dict, seconds: float, steps: Optional[int] = None,
                converged: Optional[bool] = None, stats: Optional[list] = None) -> None:
        """Keep (and with a workdir, atomically save) a finished copy's weights, signals, steps and
        convergence flag, and its own running statistics ``stats`` (``per_copy_stats``)."""
        rec = {"k": k, "state": state, "signals": signals, "seconds": seconds}
        if stats is not None:
            rec["stats"] = stats
        if steps is not None:
            rec.update(steps=int(steps), converged=converged)
            self.copy_steps[k], self.copy_converged[k] = int(steps), converged
            if converged is False:
                self.unconverged.add(k)
        self.store.save(rec)
        self.seconds[k] = seconds
        self.trained_copies.append(k)
        for fp, s in signals.items():
            self._signal_cache[(fp, k)] = s

    # ---------------------------------------------------------------------------------- fitting
    def _binding(self) -> dict:
        """The manifest fields that bind a workdir to this model and task: ``architecture`` and ``model_weights``
        (``daunce.store.model_fingerprint`` of theta0) and ``task`` (``daunce.store.task_fingerprint``). Also
        tells the store the shapes of a copy's trainable tensors (checked when a copy file is read)."""
        self.store.state_shapes = [tuple(p.shape) for _, p in self.model.named_parameters() if p.requires_grad]
        self.store.stats_shapes = [tuple(self.model.get_buffer(n).shape) for n in self.context.stat_names]
        fp = model_fingerprint(self.model)
        return {"architecture": fp["architecture"], "model_weights": fp["weights"], "task": task_fingerprint(self.task)}

    def _bind_workdir(self) -> None:
        """Before copies of a workdir are used by an object that has not fitted (e.g. ``attribute`` in a new
        process): the folder's model, task and training set must be this object's; the fitted training set is
        taken from its manifest. Folders of an earlier version without these fields are checked on what they
        hold (``fit`` adds the fields)."""
        if self._bound or self.workdir is None:
            return
        stored = read_manifest(self.workdir)
        if stored is None:
            return
        now = self._binding()
        check_manifest(self.workdir, {**stored, **{k: v for k, v in now.items() if k in stored}}, what="copies")
        if self.train_fingerprint is None:
            self.n_train, self.train_fingerprint = stored.get("n_train"), stored.get("train_fingerprint")
        self._bound = True

    def _forget(self) -> None:
        """Drop what this object learnt from its last training set (copies in memory, cached signals, the
        resolved "auto" settings, the trainer and signal-path choices, timings): a fit on another set starts
        afresh."""
        self.store.clear()
        self._signal_cache.clear()
        self.resolved_config = None if self.config.auto_fields else self.config.static()
        self.resolved = {}
        self.trainer_used, self.trainer_reason = None, ""
        self.signal_path_used, self.signal_path_reason = None, ""
        self.vmap_block_used = self.adapter_block_used = None
        self._per_copy_bytes = 0
        self.seconds.clear()
        self.trained_copies.clear()
        self.copy_steps.clear()
        self.copy_converged.clear()
        self.unconverged.clear()
        self._design = OrthogonalDesign(self.config.seed, self.orthogonal_block)
        self.train_fingerprint, self.n_train, self._train_set = None, None, None

    def fit(self, train_dataset: Dataset, query_dataset: Optional[Dataset] = None) -> "Daunce":
        """Train the K perturbed copies on ``train_dataset`` (skipping finished ones in the workdir)
        and record every copy's training signals (and the query signals, if given).

        A second ``fit`` on another training set starts afresh in memory (``_forget``); with a workdir it is
        refused, as is a workdir whose manifest names another model (architecture or theta0's weights), task,
        configuration or training set. A damaged copy file is moved aside with a warning and trained again."""
        n = check_dataset(train_dataset, "train_dataset")
        if query_dataset is not None:
            check_dataset(query_dataset, "query_dataset")
        # the data's content before anything is resolved, written or trained (checked once per dataset object)
        check_training_set(self.context, train_dataset)
        if query_dataset is not None:
            self.context.check_data(query_dataset, "query_dataset")
        fp = fingerprint(train_dataset)
        if self.train_fingerprint is not None and fp != self.train_fingerprint:
            if self.workdir is not None:
                raise ValueError(f"{self.workdir} holds copies fitted on another training set ({self.n_train} "
                                 f"examples, fingerprint {self.train_fingerprint}; now {n} examples, fingerprint {fp}):"
                                 " use a new workdir for another training set")
            self._forget()
        self.n_train = n
        self.train_fingerprint = fp
        self._train_set = train_dataset
        self.resolve(train_dataset)
        if self.workdir is not None:
            manifest = {"config": json.loads(self.config.training_key()), "n_train": n,
                        "train_fingerprint": self.train_fingerprint,
                        "orthogonal_block": self.orthogonal_block_size(n), **self._binding()}
            if self.resolved.get("explicit_in_manifest"):  # a folder of the same settings given explicitly
                manifest["config"] = json.loads(self.resolved_config.training_key())
            elif self.config.auto_fields:  # only then: the manifests of explicit configurations stay as they were
                manifest["resolved"] = {f: getattr(self.resolved_config, f) for f in self.config.auto_fields}
                manifest["auto_rule"] = auto.RULE_VERSION
            stored = read_manifest(self.workdir) or {}
            if "unconverged" in stored:
                manifest["unconverged"] = stored["unconverged"]
                self.unconverged |= set(stored["unconverged"])
            check_manifest(self.workdir, manifest, what="copies", ignore=("unconverged",), adopt=BINDING_FIELDS)
            self._bound = True
        todo = [k for k in range(self.config.n_models) if not self.is_trained(k)]
        if not todo:
            return self
        if self.executor == "ray":
            fit_on_ray(self, todo, train_dataset, query_dataset)
        else:
            self.train_copies(todo, train_dataset, query_dataset)
        self._report_convergence(todo)
        return self

    def _report_convergence(self, todo: list) -> None:
        """One warning per fit for copies that hit the step cap; their indices go to the manifest."""
        cfg = self.training_config()
        if not cfg.stops_early:
            return
        if self.workdir is not None:
            for k in todo:  # copies trained elsewhere (Ray) are read back from their records
                if k not in self.copy_converged and self.is_trained(k):
                    rec = self.store.load(k)
                    if rec.get("converged") is False:
                        self.unconverged.add(k)
            update_manifest(self.workdir, unconverged=sorted(self.unconverged))
        bad = sorted(k for k in todo if k in self.unconverged)
        if bad:
            more = "..." if len(bad) > 5 else ""
            warnings.warn(f"Daunce: {len(bad)} of {len(todo)} copies reached max_steps={cfg.max_steps} without "
                          f"passing the stopping test (gradient norm <= tol={cfg.tol} x its data part's at theta0): "
                          f"copies {bad[:5]}{more}; raise max_steps or lr (their scores may not mean an "
                          "influence function)", RuntimeWarning, stacklevel=3)

    def train_copies(self, ks: list, train: Dataset, query: Optional[Dataset] = None,
                     cache: Optional[dict] = None) -> list:
        """Train and record the copies ``ks`` that are not finished yet, in this process, with the chosen
        trainer; returns the copies trained. ``cache`` is the base cache (``base_cache``) if already computed."""
        if self.train_fingerprint is None:
            self.n_train, self.train_fingerprint, self._train_set = len(train), fingerprint(train), train
        todo = [k for k in ks if not self.is_trained(k)]
        if not todo:
            return []
        check_training_set(self.context, train)
        if query is not None:
            self.context.check_data(query, "query_dataset")
        cfg = self.resolve(train)
        if cache is None and self.uses_base_cache:
            cache = self.base_cache(train)
        qfp = fingerprint(query) if query is not None else None
        self.choose_trainer(train)
        if self.trainer_used in ("vmap", "shared"):
            self._fit_vmap(todo, train, query, qfp, cache)
            return todo
        ctx = self.context
        bar = progress_bar(todo, desc=f"daunce-{self.config.variant} copies", progress=self.progress)
        for k in bar:
            t0 = time.perf_counter()
            plan = self.plan(k, len(train))
            rep: dict = {}
            state = sequential.train_copy(ctx, cfg, plan, train, cache, rep)
            # signals in eval mode with the copy's weights and running statistics (its own, or theta0's)
            signals = {self.train_fingerprint: sequential.signals_now(ctx, train)}
            if qfp is not None:
                signals[qfp] = sequential.signals_now(ctx, query)
            self._record(k, state, signals, time.perf_counter() - t0, rep.get("steps"), rep.get("converged"),
                         ctx.stats() if self.per_copy_stats else None)
        return todo

    def base_cache(self, train: Dataset) -> dict:
        """theta0's outputs, their loss gradient and loss on every training example (computed once per fit)."""
        return sequential.base_cache(self.context, self.config, train)

    def choose_trainer(self, train: Dataset) -> str:
        """Decide the trainer on the training set ``train`` (once; ``fit`` calls it): sets and returns
        ``trainer_used`` ("shared", "vmap" or "sequential") and sets ``trainer_reason``."""
        if self.trainer_used is not None:
            return self.trainer_used
        if self.trainer == "sequential":
            self.trainer_used, self.trainer_reason = "sequential", "trainer='sequential' was asked for"
            return self.trainer_used
        ctx, reasons = self.context, []
        if self.trainer in ("auto", "shared"):
            ok, reason, per_copy = stacked.check(ctx, self.config, train, self.vmap_memory)
            if ok and self.trainer == "auto":
                ok, why = stacked.worthwhile(ctx)
                reason = reason if ok else why
            if ok:
                self.trainer_used, self.trainer_reason, self._per_copy_bytes = "shared", reason, per_copy
                return self.trainer_used
            if self.trainer == "shared":
                raise ValueError(f"trainer='shared' cannot be used: {reason}")
            reasons.append(f"not shared: {reason}")
        ok, reason, per_copy = vmap.check(ctx, self.config, train, self.vmap_memory)
        if ok and self.trainer == "auto":
            ok, why = vmap.worthwhile(ctx)
            reason = reason if ok else why
        if ok:
            self.trainer_used, self._per_copy_bytes = "vmap", per_copy
            self.trainer_reason = "; ".join(reasons + [reason])
            return self.trainer_used
        if self.trainer == "vmap":
            raise ValueError(f"trainer='vmap' cannot be used: {reason}")
        # an expected fallback (a model vmap cannot run, or would not speed up): the reason is recorded
        self.trainer_used, self.trainer_reason = "sequential", "; ".join(reasons + [reason])
        return self.trainer_used

    def _fit_vmap(self, todo: list, train: Dataset, query: Optional[Dataset], qfp, cache) -> None:
        n = len(train)
        vt = self._block_trainer(self.training_config())
        size = vmap.block_size(self.vmap_block, self.vmap_memory, self._per_copy_bytes, len(todo))
        self.vmap_block_used = size
        blocks = vmap.blocks_of([self.plan(k, n) for k in todo], size)
        bar = progress_bar(total=len(todo), desc=f"daunce-{self.config.variant} copies ({self.trainer_used} x{size})",
                           progress=self.progress)
        for plans in blocks:
            t0 = time.perf_counter()
            rep: dict = {}
            stacked = vt.train(plans, train, cache, rep)
            stats = vt.block_stats if self.per_copy_stats else None  # each copy's own running statistics
            extra = {} if stats is None else {"stats": stats}
            sig = {self.train_fingerprint: vt.signals(stacked, train, **extra)}
            if qfp is not None:
                sig[qfp] = vt.signals(stacked, query, **extra)
            seconds = (time.perf_counter() - t0) / len(plans)
            for c, plan in enumerate(plans):
                state = [t[c].clone().cpu() for t in stacked]
                self._record(plan.k, state, {fp: s[c].clone() for fp, s in sig.items()}, seconds,
                             rep["steps"][c], rep["converged"][c],
                             None if stats is None else [t[c].clone().cpu() for t in stats])
            bar.update(len(plans))
            if self.trainer_used == "shared" and vt.layout_report and "; layout " not in self.trainer_reason:
                self.trainer_reason += f"; layout {vt.layout_report['chosen']}: {vt.layout_report['reason']}"
        bar.close()

    def _block_trainer(self, config: DaunceConfig) -> vmap.VectorisedTrainer:
        """The trainer of blocks of copies that ``trainer_used`` names (vmap or shared-input passes)."""
        if self.trainer_used == "shared":
            return stacked.SharedInputTrainer(self.context, config, self.shared_layout)
        return vmap.VectorisedTrainer(self.context, config)

    def training_seconds(self, n_models: Optional[int] = None) -> float:
        """Seconds the first ``n_models`` copies (default: K) took to train and record their signals,
        as measured when they were trained (read back from the workdir for copies of an earlier run;
        copies trained together in a vmap block share the block's time equally)."""
        total = 0.0
        for k in range(self.config.n_models if n_models is None else n_models):
            if k not in self.seconds and self.workdir is not None and self.is_trained(k):
                self.seconds[k] = float(self.store.load(k).get("seconds", 0.0))
            total += self.seconds.get(k, 0.0)
        return total

    # ---------------------------------------------------------------------------------- signals
    def base_signals(self, dataset: Dataset, signal: Optional[SignalFn] = None) -> torch.Tensor:
        """Signals ``(n,)`` of theta0 itself on ``dataset`` (the task's signal, or ``signal``)."""
        ctx = self.context
        ctx.check_data(dataset, "dataset")
        ctx.reset()
        return sequential.signals_now(ctx, dataset, signal)

    def signals(self, dataset: Dataset, signal: Optional[SignalFn] = None) -> torch.Tensor:
        """Signal matrix ``(K, n)``: each copy's per-example signal on ``dataset`` (higher = worse).

        With ``signal=None`` the task's signal: recorded signals are reused, missing ones are computed from
        the stored copies' weights (with vmap, peft mixed-adapter batches or one pass per copy:
        ``signal_path``; ``signal_path_used`` says which) and stored. ``signal(outputs, batch)`` (one value
        per example, higher = worse, e.g. minus the margin) computes another signal from the stored weights
        on the same path, without storing it. The dataset's content is checked first (``ModelContext.check_data``:
        finite features, the task's ``check_batch``, a model that runs on it)."""
        self.context.check_data(dataset, "dataset")
        return self._signals(dataset, signal)

    def _signals(self, dataset: Dataset, signal: Optional[SignalFn] = None, fp: Optional[str] = None) -> torch.Tensor:
        """``signals`` of a checked dataset whose fingerprint may be known (``fp``)."""
        self._bind_workdir()
        K = self.config.n_models
        missing = [k for k in range(K) if not self.is_trained(k)]
        if missing:
            more = "..." if len(missing) > 5 else ""
            raise RuntimeError(f"copies {missing[:5]}{more} are not trained: call fit() first")
        if signal is not None:
            computed = self._compute_signals(list(range(K)), dataset, signal, None)
            return torch.stack([computed[k] for k in range(K)])
        fp = fp or fingerprint(dataset)
        rows: list = [None] * K
        for k in range(K):
            if (fp, k) in self._signal_cache:
                rows[k] = self._signal_cache[(fp, k)]
            elif self.workdir is not None:
                recorded = self.store.load(k)["signals"]
                if fp in recorded:
                    rows[k] = self._signal_cache[(fp, k)] = recorded[fp]
        todo = [k for k in range(K) if rows[k] is None]
        if todo:
            stored = self.store.load_extra_signals(fp)
            computed = self._compute_signals([k for k in todo if k not in stored], dataset, None, fp, stored)
            stored.update(computed)
            for k in todo:
                rows[k] = self._signal_cache[(fp, k)] = stored[k]
        return torch.stack(rows)

    def _compute_signals(self, ks: list, dataset: Dataset, signal: Optional[SignalFn], fp: Optional[str],
                         stored: Optional[dict] = None) -> dict:
        """``{k: signals (n,)}`` of the stored copies ``ks`` on ``dataset``, on the chosen signal path. With a
        fingerprint ``fp`` the results are saved as they come (``stored`` is what is saved already)."""
        out: dict = {}
        if not ks:
            return out
        ctx = self.context
        saved = dict(stored or {})

        def keep(k, s):
            out[k] = s
            if fp is not None:
                saved[k] = s
                self.store.save_extra_signals(fp, saved)

        path = self._choose_signal_path(dataset)
        if path in ("vmap", "shared"):
            # vectorised: the stored copies' weights stacked in blocks, one vmapped / shared-input pass per eval batch
            vt = self._block_trainer(self.config)
            size = self.vmap_block or vmap.MAX_VMAP_BLOCK
            for s in progress_bar(range(0, len(ks), size), desc=f"signals ({path})", progress=self.progress):
                block = ks[s : s + size]
                states = [self.state(k) for k in block]
                stacked = [torch.stack([st[j] for st in states]).to(p.device, p.dtype)
                           for j, p in enumerate(ctx.params)]
                extra = {}
                if self.per_copy_stats:  # each copy's own running statistics, stacked like its weights
                    copy_stats = [self.stats(k) for k in block]
                    extra["stats"] = [torch.stack([st[j] for st in copy_stats]) for j in range(len(ctx.stat_names))]
                sig = vt.signals(stacked, dataset, signal, **extra)
                for c, k in enumerate(block):
                    keep(k, sig[c].clone())
            return out
        if path == "multi-adapter" and not self.per_copy_stats:
            # peft mixed-adapter batches: a block of copies as adapters of one model, one routed pass per batch
            engine = self._adapter_engine()
            size = engine.block_size(dataset, len(ks), self.adapter_block, self.adapter_memory)
            self.adapter_block_used = size
            if size > 1 or self.signal_path == "multi-adapter":
                for s in progress_bar(range(0, len(ks), size), desc=f"signals (multi-adapter x{size})",
                              progress=self.progress):
                    block = ks[s : s + size]
                    sig = engine.signals([self.state(k) for k in block], dataset, signal)
                    for c, k in enumerate(block):
                        keep(k, sig[c].clone())
                return out
            # one copy per pass (budget, or one copy to do): the one-copy loop below
        for k in progress_bar(ks, desc="signals", progress=self.progress):
            ctx.load_state(self.state(k))
            ctx.load_stats(self.stats(k))  # its own running statistics, or theta0's (None)
            keep(k, sequential.signals_now(ctx, dataset, signal))
        ctx.reset()
        return out

    def _adapter_engine(self) -> multiadapter.MultiAdapterPass:
        if self._adapter_pass is None:
            self._adapter_pass = multiadapter.MultiAdapterPass(self.context)
        return self._adapter_pass

    def _choose_signal_path(self, dataset: Dataset) -> str:
        """How missing signals are computed: sets ``signal_path_used`` / ``signal_path_reason`` (decided on
        the first dataset that needs it, then kept). The vmap path follows the trainer, which is chosen on
        the training set of ``fit``, never on the dataset asked for here."""
        if self.signal_path_used is not None:
            return self.signal_path_used
        if self.signal_path == "sequential":
            used, reason = "sequential", "signal_path='sequential' was asked for"
        else:
            vmap_ok = False
            if self.signal_path == "auto" and self.trainer != "sequential":
                if self.trainer_used is None and self._train_set is not None:
                    self.choose_trainer(self._train_set)
                vmap_ok = self.trainer_used in ("vmap", "shared")
            if vmap_ok:
                used, reason = self.trainer_used, f"the trainer is {self.trainer_used} ({self.trainer_reason})"
            else:
                ok, why = self._adapter_engine().check(dataset)
                if not ok and self.signal_path == "multi-adapter":
                    raise ValueError(f"signal_path='multi-adapter' cannot be used: {why}")
                used, reason = ("multi-adapter", why) if ok else ("sequential", why)
                if ok and self.signal_path == "auto" and self.device.type == "cpu":
                    # benchmarks/results/lora_signals.md: on a CPU the mixed-adapter pass measured 0.92-0.99x of
                    # the one-copy loop (the base model does the same work either way), so "auto" keeps the loop
                    used, reason = "sequential", ("on a CPU the multi-adapter pass is not faster than one pass per "
                                                  "copy (benchmarks/results/lora_signals.md); "
                                                  f"signal_path='multi-adapter' forces it ({why})")
        self.signal_path_used, self.signal_path_reason = used, reason
        return used

    # ---------------------------------------------------------------------------------- scoring
    def attribute(self, train_dataset: Dataset, query_dataset: Dataset) -> torch.Tensor:
        """Scores ``(n_train, n_query)`` (float32): covariance (or correlation) of training and query
        signals across the K copies. Positive = the training example helped the query.

        ``train_dataset`` must be the training set the copies were fitted on (by this object, or in its workdir):
        another one is refused (the covariance of another set's signals is not its attribution; ``signals`` gives
        the copies' signals on any dataset)."""
        check_dataset(train_dataset, "train_dataset")
        check_dataset(query_dataset, "query_dataset")
        self.context.check_data(query_dataset, "query_dataset")
        self._bind_workdir()
        fp = fingerprint(train_dataset)
        if self.train_fingerprint is not None and fp != self.train_fingerprint:
            raise ValueError(f"attribute: train_dataset ({len(train_dataset)} examples, fingerprint {fp}) is not the "
                             f"training set the copies were fitted on ({self.n_train} examples, fingerprint "
                             f"{self.train_fingerprint}): call fit() on it first")
        A = self._signals(train_dataset, fp=fp)
        B = self.signals(query_dataset)
        return _scores.score(A, B, self.config.score).float()


__all__ = ["Daunce", "TRAINERS", "SIGNAL_PATHS", "EXECUTORS"]
