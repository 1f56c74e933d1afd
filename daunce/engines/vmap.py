"""Train a block of perturbed copies at once: ``torch.func.functional_call`` + ``vmap`` over stacked weights.

The sequential engine (``daunce.engines.sequential``) fine-tunes one copy after the other in a single working
model. Small models leave most of a CPU (or GPU) idle that way: every step is a few tiny matrix
products plus Python overhead. Here the trainable parameters of C copies are stacked along a new
leading dimension, ``(C, *shape)``, and one vmapped forward pass evaluates all C copies, each on its
own minibatch (``(C, B, ...)``); one backward pass then gives every copy's gradient (the copies do not
interact, so the gradient of the sum of their objectives is each copy's own gradient).

Everything random comes from the copies' ``CopyPlan`` s (``daunce.plans``), so the vectorised and the
sequential trainer see exactly the same subsets, perturbations, noise directions and minibatch orders,
and minimise the same objective (``daunce.objectives``). Adam and SGD are written out functionally over
the stacked tensors with ``torch.optim.Adam`` / ``torch.optim.SGD`` defaults, so the two trainers give
the same copies up to floating-point rounding.

Copies of a block must have the same number of steps and the same batch size at every step; the plans
of one run always do (all subsets have ``round(r * n)`` examples), and ``blocks_of`` groups copies
by their batch-size pattern otherwise.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..config import DaunceConfig
from ..objectives import perturbed_objective, proximal_term
from ..plans import augment_batch, augment_generator
from .context import (
    DEFAULT_MEMORY_BYTES,
    RUNNING_STATS,
    ModelContext,
    TaskOutputs,
    fetch,
    per_example,
    set_copy_mode,
    to_device,
)

#: Never put more copies than this in one vmap block.
MAX_VMAP_BLOCK = 256
#: With the stopping test, the copies that have stopped leave the working tensors once at most this fraction of
#: those still there are training (each removal copies the block's state once; until then a stopped copy is
#: masked but still computed)
COMPACT_AT = 0.75


class _CopyStream:
    """Copy ``row`` of a block's minibatch order (its plan's ``batches``): each ``next`` also tells the trainer
    that this copy takes the step (``VectorisedTrainer._step_rows``), so its running statistics and augmentation
    draws follow it when stopped copies leave the working tensors."""

    def __init__(self, trainer: "VectorisedTrainer", row: int, order):
        self.trainer, self.row, self.order = trainer, row, iter(order)

    def __iter__(self):
        return self

    def __next__(self):
        idx = next(self.order)
        self.trainer.note_step(self.row)
        return idx


def _stack(items: list) -> Any:
    """Stack a list of equally-shaped (nested) batches along a new leading copy dimension."""
    first = items[0]
    if torch.is_tensor(first):
        return torch.stack(items)
    if isinstance(first, dict):
        return {k: _stack([b[k] for b in items]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([b[i] for b in items]) for i in range(len(first)))
    raise TypeError(f"cannot stack batch elements of type {type(first).__name__} across copies")


class VectorisedTrainer:
    """Trains blocks of copies in one ``ModelContext`` (its working model, trainable parameters, theta0
    and task calls) under ``config``."""

    def __init__(self, ctx: ModelContext, config: DaunceConfig):
        self.ctx, self.config = ctx, config
        self.names = list(ctx.names)
        self.theta0 = [t.detach() for t in ctx.theta0]
        self.wrapper = TaskOutputs(ctx.model, ctx.task_outputs)
        self.keys = ["model." + n for n in self.names]
        self.stat_keys = ["model." + n for n in ctx.stat_names]
        #: with ``config.batchnorm == "train"`` on a model with running statistics: every copy of the block trains
        #: its own, stacked ``(C, *shape)`` in the order of ``ctx.stat_names`` (set by ``train``; after it, the
        #: block's final statistics, row c copy c's)
        self.per_copy_stats = config.batchnorm == "train" and bool(ctx.stat_names)
        self.block_stats: Optional[list] = None
        self._gens: Optional[list] = None  # the block's augmentation generators, one per copy (row)
        self._step_rows: list = []  # the rows of the copies that take this step, in the order of their batches

    # --------------------------------------------------------------------------- functional pieces
    def outputs(self, params: Sequence[torch.Tensor], batch, stats: Optional[Sequence[torch.Tensor]] = None):
        """The task's outputs with the trainable weights ``params`` (one copy's) swapped in, and its running
        statistics ``stats`` (in the order of ``ctx.stat_names``) when given (else the working model's)."""
        tensors = dict(zip(self.keys, params))
        if stats is not None:
            tensors.update(zip(self.stat_keys, stats))
        return functional_call(self.wrapper, tensors, (batch,))

    def copy_streams(self, plans: list) -> list:
        """The block's minibatch orders, one ``_CopyStream`` per plan (row c: ``plans[c]``); sets up the block's
        per-copy state: theta0's running statistics for every copy (``per_copy_stats``) and each copy's
        augmentation generator (``config.augment``: ``daunce.plans.augment_generator``, as the sequential engine
        draws them)."""
        C, cfg = len(plans), self.config
        self.block_stats = ([s.unsqueeze(0).expand(C, *s.shape).clone() for s in self.ctx.stats0]
                            if self.per_copy_stats else None)
        self._gens = [augment_generator(cfg.seed, p.k) for p in plans] if cfg.augment != "none" else None
        self._step_rows = []
        return [_CopyStream(self, c, p.batches) for c, p in enumerate(plans)]

    def note_step(self, row: int) -> None:
        """Copy ``row`` takes the coming step (called by its ``_CopyStream``)."""
        if self.block_stats is not None or self._gens is not None:
            self._step_rows.append(row)

    def _take_rows(self, C: int) -> torch.Tensor:
        """The block rows ``(C,)`` of the copies of this step's batches (in their order)."""
        rows, self._step_rows = self._step_rows, []
        if len(rows) != C:
            raise RuntimeError(f"{len(rows)} copies took their minibatch for a step of {C} copies")
        return torch.tensor(rows)

    def stacked_theta0(self, C: int) -> list:
        return [t.unsqueeze(0).expand(C, *t.shape).clone() for t in self.theta0]

    def fetch_block(self, dataset, idx: torch.Tensor):
        """Batches of all copies, ``(C, B, ...)``, from the ``(C, B)`` index tensor ``idx``."""
        from torch.utils.data import TensorDataset

        if isinstance(dataset, TensorDataset):
            flat = idx.reshape(-1)
            batch = tuple(t.index_select(0, flat).view(*idx.shape, *t.shape[1:]) for t in dataset.tensors)
        else:
            batch = _stack([fetch(dataset, row, self.ctx.collate) for row in idx])
        return to_device(batch, self.ctx.device)

    # ------------------------------------------------------------------------------------ training
    def train(self, plans: list, train, cache: Optional[dict], report: Optional[dict] = None) -> list:
        """Train the copies of ``plans`` together; returns the stacked trainable tensors ``(C, *shape)``.

        ``self.config`` must be resolved (no ``"auto"`` left). With the stopping test on
        (``config.stops_early``) each copy stops at the first step whose gradient norm is at most
        ``config.tol`` times the norm of its data part at theta0 (``start_norm``): its updates (and optimiser
        state) are masked from then on, and once a quarter of the copies still in the working tensors have
        stopped, those are taken out of them (``COMPACT_AT``), so the copies still training no longer pay for
        the finished ones; the block stops when every copy has. ``report`` (a dict, if given) receives ``"steps"``
        and ``"converged"``: one entry per copy, as ``sequential.train_copy`` reports them."""
        ctx, cfg = self.ctx, self.config
        C = len(plans)
        n_steps = len(plans[0].batches)
        if any(p.batches.sizes_key() != plans[0].batches.sizes_key() for p in plans):
            raise ValueError("copies of one vmap block must have the same number of steps and batch sizes")
        orders = self.copy_streams(plans)
        ctx.reset()
        ctx.model.train(cfg.train_mode)
        dev = self.theta0[0].device
        params = [p.requires_grad_(True) for p in self.stacked_theta0(C)]
        use_eta = plans[0].eta is not None
        eta = [torch.stack([p.eta[j] for p in plans]).to(dev) for j in range(len(params))] if use_eta else None
        opt = StackedAdam(params, cfg.lr) if cfg.optimizer == "adam" else StackedSGD(params, cfg.lr, cfg.momentum)
        stop = cfg.stops_early
        active = torch.ones(C, dtype=torch.bool, device=dev) if stop else None
        steps = torch.zeros(C, dtype=torch.long)
        alive = torch.arange(C)  # the block's copies still in the working tensors, in their order
        final = [p.detach().clone() for p in params]  # every copy's weights, written when it leaves (or at the end)
        g0 = None
        damping = cfg.damping
        eps_all = torch.stack([p.eps for p in plans])  # (C, n) float64
        for step in range(n_steps):
            idx = torch.stack([next(o) for o in orders])  # (C alive, B)
            prox, prox_grads = self.proximal(params, damping, eta)
            obj = self.block_objective(params, idx, train, cache, eps_all) + prox
            finite = torch.isfinite(obj)
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
                raise FloatingPointError(
                    f"Daunce copy {plans[int(alive[bad])].k}, step {step}: the objective is not finite "
                    f"({obj[bad].item()}); lower lr (now {cfg.lr}) or rho (now {cfg.rho})")
            grads = torch.autograd.grad(obj.sum(), params, allow_unused=True)
            if prox_grads is not None:
                grads = [pg if g is None else g.add_(pg) for g, pg in zip(grads, prox_grads)]
            if stop:
                gn = _per_copy_norm(grads, len(alive), dev)
                g0 = start_norm(grads, eta, len(alive), dev) if g0 is None else g0
                active = active & (gn > cfg.tol * g0)
                if not bool(active.any()):
                    break
            opt.lr = cfg.lr_at(step, n_steps)
            opt.step(grads, active)
            if not stop:
                steps += 1
                continue
            steps[alive] += active.cpu().long()
            if int(active.sum()) <= COMPACT_AT * len(alive):  # take the stopped copies out of the working tensors
                keep, done = active.nonzero().squeeze(1), (~active).nonzero().squeeze(1)
                for f, p in zip(final, params):
                    f[alive[done.cpu()].to(f.device)] = p.detach()[done]
                params = [p.detach()[keep].requires_grad_(True) for p in params]
                opt.keep(keep, params)
                eta = [e[keep] for e in eta] if eta is not None else None
                keep_cpu = keep.cpu()
                eps_all, alive, g0, active = eps_all[keep_cpu], alive[keep_cpu], g0[keep], active[keep]
                orders = [orders[i] for i in keep_cpu.tolist()]
        for f, p in zip(final, params):
            f[alive.to(f.device)] = p.detach()
        if report is not None:
            converged = torch.ones(C, dtype=torch.bool)
            if stop:
                converged[alive] = ~active.cpu()
            report["steps"] = steps.tolist()
            report["converged"] = converged.tolist() if stop else [None] * C
        return final

    def proximal(self, params: list, damping: float, eta: Optional[list]) -> tuple[torch.Tensor, Optional[list]]:
        """Every copy's proximal and isotropic-noise term ``(C,)`` and its gradient (``None``: autograd takes it
        through the term, as here)."""
        return stacked_proximal(params, self.theta0, damping, eta), None

    def block_objective(self, params, idx: torch.Tensor, train, cache: Optional[dict], eps_all: torch.Tensor
                        ) -> torch.Tensor:
        """Every copy's objective ``(C,)`` (the mean of its perturbed objective over its batch ``idx[c]``; the
        proximal term is added by ``train``): each copy's own examples gathered, ``(C, B, ...)``, and the model
        run on them under vmap."""
        ctx, cfg = self.ctx, self.config
        C, B = idx.shape
        set_copy_mode(ctx.model, cfg)
        copies = self._take_rows(C) if (self.block_stats is not None or self._gens is not None) else None
        batch = self.fetch_block(train, idx)
        if self._gens is not None:  # each copy's batch augmented with its own generator
            batch = _stack([augment_batch(_select(batch, c), cfg, self._gens[int(r)]) for c, r in enumerate(copies)])
        flat_batch = flatten_batch(batch)
        # Only the model runs under vmap; the per-example loss, output function and objective run on the
        # (C * B, ...) flattened outputs (per-example functions need no vmap; cross-entropy under vmap falls
        # back to a slow loop).
        if self.block_stats is None:
            out = vmap(self.outputs, in_dims=(0, 0))(tuple(params), batch)
        else:  # batch statistics; each copy's running statistics move in place under vmap, then are written back
            stats = [s[copies.to(s.device)] for s in self.block_stats]
            out = vmap(self.outputs, in_dims=(0, 0, 0))(tuple(params), batch, tuple(stats))
            for s, t in zip(self.block_stats, stats):
                s[copies.to(s.device)] = t
        out = out.flatten(0, 1)  # (C * B, ...)
        loss = per_example(ctx.task_loss(out, flat_batch), C * B, "loss")
        kw = {}
        if cfg.variant != "bootstrap":
            if cfg.live_base:
                base = self.live_theta0_values(batch, flat_batch, C, B)
            else:
                cidx = idx.reshape(-1).to(cache["loss"].device)
                base = {key: v[cidx] for key, v in cache.items()}
            rows = torch.arange(C)[:, None]
            kw = dict(loss0=base["loss"], outputs=out, outputs0=base["outputs"],
                      grad0=base["grad"], eps=eps_all[rows, idx].reshape(-1).to(loss.device, loss.dtype))
            if cfg.variant == "trak":
                kw["f"] = per_example(ctx.task_output_function(out, flat_batch), C * B, "output_function")
                kw["f0"] = base["f"]
        return perturbed_objective(cfg.variant, loss=loss, gamma=cfg.gamma, **kw).view(C, B).mean(1)

    def live_theta0_values(self, batch, flat_batch, C: int, B: int) -> dict:
        """theta0's outputs, loss gradient and loss (and output function) on every copy's batch ``(C, B, ...)`` as
        the copy sees it (``DaunceConfig.live_base``; ``sequential.live_theta0_values`` one copy at a time):
        theta0's weights, with scratch clones of theta0's running statistics for each copy in train-mode
        BatchNorm; ``{"outputs", "grad", "loss", ["f"]}`` over the ``C * B`` flattened examples."""
        ctx, cfg, n = self.ctx, self.config, C * B
        with torch.no_grad():
            if self.block_stats is None:
                out0 = vmap(self.outputs, in_dims=(None, 0))(tuple(self.theta0), batch)
            else:
                scratch = tuple(s.unsqueeze(0).expand(C, *s.shape).clone() for s in ctx.stats0)
                out0 = vmap(self.outputs, in_dims=(None, 0, 0))(tuple(self.theta0), batch, scratch)
        with torch.enable_grad():
            out0 = out0.flatten(0, 1).detach().requires_grad_(True)
            loss0 = per_example(ctx.task_loss(out0, flat_batch), n, "loss")
            (grad0,) = torch.autograd.grad(loss0.sum(), out0)
        vals = {"outputs": out0.detach(), "grad": grad0.detach(), "loss": loss0.detach()}
        if cfg.variant == "trak":
            with torch.no_grad():
                vals["f"] = per_example(ctx.task_output_function(out0.detach(), flat_batch), n, "output_function")
        return vals

    # ------------------------------------------------------------------------------------- signals
    @torch.no_grad()
    def signals(self, stacked: list, dataset, signal=None, stats: Optional[list] = None) -> torch.Tensor:
        """Signals ``(C, n)`` (float64, CPU) of the C copies whose weights are ``stacked``: the task's
        signal, or ``signal(outputs, batch)`` when given. In eval mode, with the copies' own running statistics
        ``stats`` (stacked ``(C, *shape)``, in the order of ``ctx.stat_names``) when given, else the working
        model's (theta0's)."""
        ctx = self.ctx
        ctx.model.train(False)
        n = len(dataset)
        C = stacked[0].shape[0]
        out = torch.empty(C, n, dtype=torch.float64)
        signal_fn = ctx.task_signal if signal is None else signal

        if stats is None:
            vout = vmap(self.outputs, in_dims=(0, None))
        else:
            stats_dev = tuple(s.to(b.device, b.dtype) for s, b in zip(stats, ctx.stats0))
            vout = vmap(lambda p, b, st: self.outputs(p, b, st), in_dims=(0, None, 0))
        for idx in ctx.index_batches(n):
            batch = ctx.fetch(dataset, idx)
            outs = vout(tuple(stacked), batch) if stats is None else vout(tuple(stacked), batch, stats_dev)
            for c in range(C):
                out[c, idx] = per_example(signal_fn(outs[c], batch), len(idx), "signal").double().cpu()
        return out


def _select(batch: Any, c: int) -> Any:
    """Copy ``c``'s batch ``(B, ...)`` of a stacked batch ``(C, B, ...)``."""
    if torch.is_tensor(batch):
        return batch[c]
    if isinstance(batch, dict):
        return {k: _select(v, c) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_select(v, c) for v in batch)
    raise TypeError(f"cannot select a copy's batch from elements of type {type(batch).__name__}")


def _per_copy_norm(grads, C: int, device) -> torch.Tensor:
    """Euclidean norm ``(C,)`` of each copy's gradient over all stacked ``(C, *shape)`` tensors."""
    total = torch.zeros(C, dtype=torch.float64, device=device)
    for g in grads:
        if g is not None:
            total += g.detach().double().pow(2).reshape(C, -1).sum(1)
    return total.sqrt()


def start_norm(grads, eta: Optional[list], C: int, device) -> torch.Tensor:
    """The stopping test's reference ``(C,)``: each copy's gradient norm at theta0 without the isotropic noise term,
    i.e. of its loss and linear terms alone (``grads`` holds the whole objective's gradient, whose noise part at
    theta0 is ``-eta``). With the noise term off it is the whole gradient's norm; with it on the reference is the
    same as off, so the test asks the data part of a copy's answer for the same accuracy in both settings
    (against the whole gradient, ``||eta||`` would set the scale: 7.9 on notebook 02's ResNet with the noise term
    on, where a noise-off start gradient was 0.055 on its CNN). Falls back to the whole gradient's norm where the
    data part's is zero."""
    whole = _per_copy_norm(grads, C, device)
    if eta is None:
        return whole
    data = _per_copy_norm([e.detach().neg() if g is None else g.detach() + e for g, e in zip(grads, eta)], C, device)
    return torch.where(data > 0, data, whole)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` mask shaped to broadcast over ``like`` ``(C, *shape)``, in its dtype."""
    return mask.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def stacked_proximal(params: list, params0: list, damping: float, eta: Optional[list]) -> torch.Tensor:
    """``daunce.objectives.proximal_term`` of every copy, ``(C,)``, for stacked ``(C, *shape)`` weights."""
    if eta is None:
        return torch.vmap(lambda p: proximal_term(p, params0, damping))(params)
    return torch.vmap(lambda p, e: proximal_term(p, params0, damping, e))(params, eta)


def flatten_batch(batch: Any) -> Any:
    """Merge the copy and example dimensions of a stacked batch: ``(C, B, ...) -> (C * B, ...)``."""
    if torch.is_tensor(batch):
        return batch.flatten(0, 1)
    if isinstance(batch, dict):
        return {k: flatten_batch(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(flatten_batch(v) for v in batch)
    raise TypeError(f"cannot flatten batch elements of type {type(batch).__name__}")


# ------------------------------------------------------------------------------------ optimisers
class StackedAdam:
    """``torch.optim.Adam`` (defaults: betas (0.9, 0.999), eps 1e-8, no weight decay) over stacked tensors.

    All copies of a block take their steps together, so one step counter serves them all: a copy that
    stops (``active`` False) never restarts, so the copies still moving all have the same count."""

    def __init__(self, params: list, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.denom = [torch.empty_like(p) for p in params]  # reused: a new large tensor every step costs page faults
        self.t = 0

    def keep(self, rows: torch.Tensor, params: list) -> None:
        """Keep the state of the copies ``rows`` only, now training the stacked tensors ``params``."""
        self.params = params
        self.m, self.v, self.denom = ([t[rows] for t in ts] for ts in (self.m, self.v, self.denom))

    @torch.no_grad()
    def step(self, grads, active: Optional[torch.Tensor] = None) -> None:
        """One step of every copy; with ``active`` (a ``(C,)`` bool mask) only those copies move."""
        b1, b2 = self.betas
        self.t += 1
        bc1 = 1 - b1**self.t
        bc2_sqrt = (1 - b2**self.t) ** 0.5
        step_size = self.lr / bc1
        for p, g, m, v, denom in zip(self.params, grads, self.m, self.v, self.denom):
            if g is None:
                continue
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            torch.sqrt(v, out=denom).div_(bc2_sqrt).add_(self.eps)
            if active is None:
                p.addcdiv_(m, denom, value=-step_size)
            else:
                p.addcdiv_(m * _rows(active, m), denom, value=-step_size)


class StackedSGD:
    """``torch.optim.SGD`` (dampening 0, no Nesterov, no weight decay; ``momentum`` as given) over stacked
    tensors."""

    def __init__(self, params: list, lr: float, momentum: float = 0.0):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.buf: list = [None] * len(params)

    def keep(self, rows: torch.Tensor, params: list) -> None:
        """Keep the state of the copies ``rows`` only, now training the stacked tensors ``params``."""
        self.params = params
        self.buf = [None if b is None else b[rows] for b in self.buf]

    @torch.no_grad()
    def step(self, grads, active: Optional[torch.Tensor] = None) -> None:
        """One step of every copy; with ``active`` (a ``(C,)`` bool mask) only those copies move."""
        for j, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            if self.momentum:
                if self.buf[j] is None:
                    self.buf[j] = g.detach().clone()
                else:
                    self.buf[j].mul_(self.momentum).add_(g)
                g = self.buf[j]
            if active is None:
                p.add_(g, alpha=-self.lr)
            else:
                p.add_(g * _rows(active, g), alpha=-self.lr)


# ---------------------------------------------------------------------------- can it be vectorised?
_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def activation_numel(model: nn.Module, run, in_bytes: bool = False) -> int:
    """Total number of output elements (or, with ``in_bytes``, their bytes) of the model's leaf modules
    during ``run()``."""
    total = [0]

    def hook(_m, _i, out):
        if torch.is_tensor(out):
            total[0] += out.numel() * (out.element_size() if in_bytes else 1)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def check(ctx: ModelContext, config: DaunceConfig, train, memory: float = DEFAULT_MEMORY_BYTES
          ) -> tuple[bool, str, int]:
    """Can the copies be trained with vmap? Returns ``(ok, reason, per_copy_bytes)``.

    Refuses models with BatchNorm running statistics (buffers a training step changes) unless the copies train
    them per copy (``config.batchnorm == "train"``: stacked running statistics passed to ``functional_call`` as
    batched inputs, updated in place under vmap) without the stopping test (a copy that has stopped still runs in
    its block until it leaves, which would keep moving its running statistics), stochastic layers in train mode,
    devices other than CPU/CUDA, trainable weights that would not fit the memory budget (``memory`` bytes) twice over,
    and tasks whose ``outputs`` fail (or differ) under ``functional_call`` + ``vmap``. ``train`` is the training set
    (the probe examples and the batch size come from it).
    """
    model = ctx.model
    for name, m in model.named_modules():
        if isinstance(m, RUNNING_STATS) and m.track_running_stats:
            if config.batchnorm != "train":
                return False, f"module {name or type(m).__name__} is a BatchNorm with running statistics", 0
            if config.stops_early:
                return False, (f"module {name or type(m).__name__} is a BatchNorm whose running statistics each copy "
                               "trains (batchnorm='train') and the stopping test is on: a stopped copy would keep "
                               "running in its vmap block and moving its statistics (the sequential trainer stops "
                               "it)"), 0
        if config.train_mode and isinstance(m, _STOCHASTIC):
            return False, f"module {name} is stochastic (dropout) and train_mode=True", 0
    dev = ctx.device
    if dev.type not in ("cpu", "cuda"):
        return False, f"the model is on {dev.type}, vmap is used on CPU and CUDA only", 0
    params = ctx.params
    elsize = params[0].element_size()
    n_params = ctx.n_params
    # weights, gradient, two Adam moments, theta0 expansion, eta
    weight_bytes = 6 * n_params * elsize
    if 2 * weight_bytes > memory:
        return False, (f"one copy's trainable weights and optimiser state ({weight_bytes / 2**20:.0f} MiB) "
                       "exceed half the vmap memory budget"), 0
    # run the task's outputs under functional_call + vmap on two copies and three examples
    probe = torch.arange(min(3, len(train)))
    try:
        with warnings.catch_warnings():  # torch warns about slow batching rules: the probe decides anyway
            warnings.simplefilter("ignore")
            return _probe(ctx, config, train, probe, weight_bytes, elsize, n_params)
    except Exception as e:  # noqa: BLE001 - any failure means: not vectorisable
        return False, f"task.outputs does not run under functional_call + vmap ({type(e).__name__}: {e})", 0


def _probe(ctx: ModelContext, config: DaunceConfig, train, probe, weight_bytes: int, elsize: int, n_params: int):
    """Run the task's outputs under functional_call + vmap on two copies of theta0 (see ``check``)."""
    model = ctx.model
    batch = ctx.fetch(train, probe)
    ctx.reset()
    model.train(False)
    with torch.no_grad():
        ref = ctx.outputs(batch)
        act = activation_numel(model, lambda: ctx.outputs(batch)) / len(probe)
        vt = VectorisedTrainer(ctx, config)
        stacked = vt.stacked_theta0(2)
        out = vmap(vt.outputs, in_dims=(0, None))(tuple(stacked), batch)
        out2 = vmap(vt.outputs, in_dims=(0, 0))(tuple(stacked), _stack([batch, batch]))
        if vt.per_copy_stats:  # a train-mode pass with batched running statistics must run too
            set_copy_mode(model, config)
            stats = tuple(s.unsqueeze(0).expand(2, *s.shape).clone() for s in ctx.stats0)
            vmap(vt.outputs, in_dims=(0, 0, 0))(tuple(stacked), _stack([batch, batch]), stats)
            model.train(False)
    close = dict(rtol=1e-4, atol=1e-5)
    if not (torch.allclose(out[0], ref, **close) and torch.allclose(out2[1], ref, **close)):
        return False, "task.outputs gives different values under functional_call + vmap", 0
    bs = config.batch_size or max(1, round(config.subset_ratio * len(train)))
    # activations: forward values kept for backward plus their gradients (x3, a rough upper bound)
    per_copy = weight_bytes + 3 * int(act) * bs * elsize
    return True, f"vectorisable ({n_params} trainable parameters)", per_copy


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


CPU_MAX_VMAP_WEIGHT = 100_000  # between the measured 50k (1.3x faster) and 200k (0.8x) elements


def worthwhile(ctx: ModelContext) -> tuple[bool, str]:
    """Whether vmap is expected to be faster than the sequential loop (used by ``trainer="auto"``).

    On CPU, "auto" keeps two kinds of model sequential, from the measurements in benchmarks/results/:
    conv nets (under vmap a convolution with per-copy weights becomes one grouped convolution, slower
    than the copies' convolutions one after the other: 0.8x / 0.4x for ``small_cnn`` at K = 8 / 32,
    trainers_epoch_cnn.md), and models with a trainable weight matrix larger than
    ``CPU_MAX_VMAP_WEIGHT`` elements, where batched matmuls over the copies lose to plain ones (MLP
    784-256-10: 0.8x, trainers_epoch_mlp_h256.md; 784-64-10: 1.3x, trainers_epoch_mlp.md).
    """
    model = ctx.model
    if ctx.device.type == "cpu":
        for name, m in model.named_modules():
            if isinstance(m, _CONV) and any(p.requires_grad for p in m.parameters()):
                return False, (f"module {name} is a trainable convolution: grouped convolutions under vmap are "
                               "slower than the sequential loop on CPU (pass trainer='vmap' to force it)")
        for name, p in model.named_parameters():
            if p.requires_grad and p.dim() >= 2 and p.numel() > CPU_MAX_VMAP_WEIGHT:
                return False, (f"parameter {name} has {p.numel():,} elements: on CPU, batched matmuls over the "
                               "copies were slower than the sequential loop for layers this wide "
                               "(pass trainer='vmap' to force it)")
    return True, ""


def block_size(block: Optional[int], memory: float, per_copy_bytes: int, n_todo: int) -> int:
    """Copies per block: ``block`` if set, else as many as ``memory`` bytes allow (at most ``MAX_VMAP_BLOCK``)."""
    if block is not None:
        return max(1, min(block, n_todo))
    fit = int(memory // max(per_copy_bytes, 1))
    return max(1, min(fit, MAX_VMAP_BLOCK, n_todo))


def blocks_of(plans: list, size: int) -> list:
    """Split plans into blocks of at most ``size`` copies with equal batch-size patterns."""
    groups: dict[tuple, list] = {}
    for p in plans:
        groups.setdefault(p.batches.sizes_key(), []).append(p)
    out = []
    for group in groups.values():
        out.extend(group[s : s + size] for s in range(0, len(group), size))
    out.sort(key=lambda b: b[0].k)
    return out


__all__ = ["VectorisedTrainer", "StackedAdam", "StackedSGD", "check", "worthwhile", "block_size", "blocks_of",
           "COMPACT_AT", "RUNNING_STATS",
           "activation_numel", "stacked_proximal", "MAX_VMAP_BLOCK", "CPU_MAX_VMAP_WEIGHT"]
