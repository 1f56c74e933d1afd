"""Signals of many LoRA copies in one forward pass: peft's mixed-adapter batches.

The K perturbed copies of a LoRA model differ only in their adapters. Evaluating them one after the
other (``daunce.engines.sequential.signals_now`` after loading each copy's weights) runs the frozen base model K times
on every batch, each time with a batch of ``B`` examples. peft can instead hold several adapters in
one model and route every row of a batch to its own adapter: a LoRA layer called with the keyword
``adapter_names=[name_0, ..., name_{N-1}]`` (one name per row) computes the base layer on the whole
batch and adds each adapter's low-rank update to its own rows only (``LoraLayer._mixed_batch_forward``
in peft). ``PeftModel.forward(..., adapter_names=...)`` passes that keyword to the LoRA layers with
forward pre-hooks; ``route`` does the same, so that tasks which call the decoder directly (as
``daunce.llm.CausalLMTask`` does) are routed too.

Here a block of C copies is loaded into C extra adapters ("slots") of the working model, the batch
is repeated C times (``(C * B, ...)``, copy-major) and every copy's rows are routed to its slot: one
forward pass gives the C copies' signals on the batch. Each row goes through exactly the operations
of the one-copy pass (the base layer, plus ``lora_B(lora_A(x)) * scaling`` of its adapter), so the
signals agree with the sequential ones up to float rounding.

The slots are created once, next to the model's active adapter, and stay frozen and inactive:
training and the one-copy passes still use the active adapter only.

When it applies (``check``): a peft ``PeftModel`` with one active LoRA adapter (no DoRA or other LoRA
variant, nothing merged) whose trainable parameters are exactly that adapter's LoRA weights, and a
task whose outputs and signals, on a few examples, agree with the one-copy pass under routing.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Any, Optional, Sequence

import torch

from .context import DEFAULT_MEMORY_BYTES, ModelContext, per_example
from .vmap import activation_numel

#: Never put more copies than this in one mixed-adapter pass.
MAX_ADAPTER_BLOCK = 64
#: Names of the extra adapters: ``daunce_slot_0``, ``daunce_slot_1``, ...
SLOT_PREFIX = "daunce_slot_"
#: The sub-modules of a LoRA layer that hold one adapter's weights (``<layer>.<key>.<adapter>...``).
_LORA_KEYS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


# ------------------------------------------------------------------------------------- layout
def _lora_layer_class():
    if "peft" not in sys.modules:  # no peft model can exist: do not import it (it loads transformers)
        return None
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _peft_model_class():
    if "peft" not in sys.modules:
        return None
    from peft import PeftModel

    return PeftModel


def lora_layout(model: torch.nn.Module, names: Sequence[str]) -> tuple[Optional[str], Optional[list], str]:
    """Where the trainable parameters ``names`` sit in the LoRA layers of ``model``.

    Returns ``(adapter, entries, reason)``: the active adapter's name and, for every name, the pair
    ``(prefix, suffix)`` around the adapter name (``<layer>.lora_A`` and ``weight``, say), so the same
    parameter of another adapter is ``f"{prefix}.{other}.{suffix}"``; or ``(None, None, why not)``.
    """
    PeftModel, LoraLayer = _peft_model_class(), _lora_layer_class()
    if PeftModel is None or not isinstance(model, PeftModel):
        return None, None, f"the model is a {type(model).__name__}, not a peft PeftModel"
    active = list(model.active_adapters)
    if len(active) != 1:
        return None, None, f"the model has {len(active)} active adapters {active}; one is needed"
    adapter = active[0]
    cfg = model.peft_config.get(adapter)
    if cfg is None or str(getattr(cfg, "peft_type", "")).split(".")[-1] != "LORA":
        return None, None, f"adapter {adapter!r} is not a LoRA adapter ({type(cfg).__name__})"
    if getattr(cfg, "use_dora", False):
        return None, None, f"adapter {adapter!r} uses DoRA, which peft's mixed-adapter batches do not support"
    modules = dict(model.named_modules())
    entries = []
    for name in names:
        parts = name.split(".")
        hits = [i for i in range(1, len(parts)) if parts[i] == adapter and parts[i - 1] in _LORA_KEYS]
        if len(hits) != 1:
            return None, None, (f"trainable parameter {name} is not a LoRA weight of the active adapter "
                                f"{adapter!r} (only LoRA adapters may be trainable)")
        i = hits[0]
        layer = modules.get(".".join(parts[: i - 1]))
        if not isinstance(layer, LoraLayer) or not hasattr(type(layer), "_mixed_batch_forward"):
            return None, None, f"the layer of {name} ({type(layer).__name__}) has no mixed-adapter forward"
        if adapter in getattr(layer, "lora_variant", {}):
            return None, None, (f"the layer of {name} uses a LoRA variant "
                                f"({type(layer.lora_variant[adapter]).__name__}), not plain LoRA")
        if getattr(layer, "merged", False):
            return None, None, f"the layer of {name} has merged adapters (unmerge them first)"
        entries.append((".".join(parts[:i]), ".".join(parts[i + 1 :])))
    if not entries:
        return None, None, "the model has no trainable parameters"
    return adapter, entries, ""


# -------------------------------------------------------------------------------------- slots
class AdapterSlots:
    """Extra adapters of a peft LoRA model, each able to hold one copy of the active adapter's weights.

    Args:
        model: a ``PeftModel`` (modified in place: the slots are added to it, frozen and inactive).
        names: the names of the trainable parameters (the active adapter's LoRA weights), in the order
            in which ``load`` receives a copy's tensors.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        adapter, entries, reason = lora_layout(model, names)
        if adapter is None:
            raise ValueError(f"mixed-adapter passes need a peft LoRA model: {reason}")
        self.model = model
        self.adapter = adapter
        self.names = list(names)
        self._entries = entries
        self._params = dict(model.named_parameters())
        self.slots: list[str] = []
        self._slot_params: list[list[torch.nn.Parameter]] = []

    def _add(self) -> None:
        model = self.model
        i = len(self.slots)
        while f"{SLOT_PREFIX}{i}" in model.peft_config:  # a name the model does not use yet
            i += 1
        slot = f"{SLOT_PREFIX}{i}"
        flags = {p: p.requires_grad for p in model.parameters()}
        cfg = copy.deepcopy(model.peft_config[self.adapter])
        dev = next(iter(flags)).device
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # peft initialises the new adapter randomly
            model.add_adapter(slot, cfg)
        if list(model.active_adapters) != [self.adapter]:
            model.set_adapter(self.adapter)
        # the slots never train; everything else keeps its requires_grad flag
        for p in model.parameters():
            p.requires_grad_(flags.get(p, False))
        params = dict(model.named_parameters())
        own = []
        for name, (prefix, suffix) in zip(self.names, self._entries):
            target = params.get(f"{prefix}.{slot}.{suffix}" if suffix else f"{prefix}.{slot}")
            src = self._params[name]
            if target is None or target.shape != src.shape:
                raise RuntimeError(f"adapter slot {slot!r} has no parameter matching {name}")
            if target.dtype != src.dtype or target.device != src.device:
                target.data = target.data.to(src.device, src.dtype)
            own.append(target)
        self.slots.append(slot)
        self._slot_params.append(own)

    def ensure(self, n: int) -> list[str]:
        """The names of the first ``n`` slots (adding the missing ones)."""
        while len(self.slots) < n:
            self._add()
        return self.slots[:n]

    @torch.no_grad()
    def load(self, c: int, state: Sequence[torch.Tensor] | dict) -> None:
        """Copy one copy's weights (tensors in the order of ``names``, or a dict by name) into slot ``c``."""
        self.ensure(c + 1)
        if isinstance(state, dict):
            missing = [n for n in self.names if n not in state]
            if missing:
                raise KeyError(f"the state lacks the trainable parameters {missing[:3]}")
            state = [state[n] for n in self.names]
        if len(state) != len(self.names):
            raise ValueError(f"a copy's state has {len(state)} tensors, the model {len(self.names)} "
                             "trainable parameters")
        for p, s in zip(self._slot_params[c], state):
            if tuple(s.shape) != tuple(p.shape):
                raise ValueError(f"a copy's tensor of shape {tuple(s.shape)} does not fit a parameter of shape "
                                 f"{tuple(p.shape)}")
            p.copy_(s.to(p.device, p.dtype))


@contextlib.contextmanager
def route(model: torch.nn.Module, adapter_names: list[str]):
    """Within the block, every LoRA layer of ``model`` receives ``adapter_names`` (one adapter name per
    row of its input) as peft's ``PeftModel.forward(..., adapter_names=...)`` would pass it."""
    LoraLayer = _lora_layer_class()
    if model.training:
        raise ValueError("mixed-adapter batches need the model in eval mode (model.eval())")

    def pre_hook(_module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True)
               for m in model.modules() if LoraLayer is not None and isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def batch_len(batch: Any) -> Optional[int]:
    """The number of rows of a (nested) batch: the first dimension of its first tensor."""
    if torch.is_tensor(batch):
        return batch.shape[0] if batch.ndim else None
    if isinstance(batch, dict):
        values = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return None
    for v in values:
        n = batch_len(v)
        if n is not None:
            return n
    return None


def repeat_batch(batch: Any, C: int, B: Optional[int] = None) -> Any:
    """The batch ``C`` times over, copy-major: row ``c * B + i`` is example ``i``. Every tensor must
    have the batch's ``B`` rows; anything that is not a tensor is kept as it is."""
    B = batch_len(batch) if B is None else B
    if torch.is_tensor(batch):
        if batch.ndim == 0 or batch.shape[0] != B:
            raise ValueError(f"cannot repeat a batch tensor of shape {tuple(batch.shape)} per example: "
                             f"its first dimension is not the batch size {B}")
        return batch.repeat(C, *([1] * (batch.ndim - 1)))
    if isinstance(batch, dict):
        return {k: repeat_batch(v, C, B) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(repeat_batch(v, C, B) for v in batch)
    return batch


# --------------------------------------------------------------------------------- the engine
def routed_outputs(slots: AdapterSlots, C: int, outputs_fn, batch, B: Optional[int] = None):
    """``outputs_fn(model, batch repeated C times)`` with copy ``c``'s rows routed to slot ``c``: one forward
    pass for C copies. Returns the outputs, ``(C * B, ...)``, copy-major."""
    B = batch_len(batch) if B is None else B
    names = slots.ensure(C)
    with route(slots.model, [names[c] for c in range(C) for _ in range(B)]):
        outs = outputs_fn(slots.model, repeat_batch(batch, C, B))
    if not torch.is_tensor(outs) or outs.ndim == 0 or outs.shape[0] != C * B:
        shape = tuple(outs.shape) if torch.is_tensor(outs) else type(outs).__name__
        raise ValueError(f"the outputs must be a tensor with one row per example ({C * B}), got {shape}")
    return outs


@torch.no_grad()
def row_bytes(model: torch.nn.Module, outputs_fn, batch) -> int:
    """Estimated activation bytes per example of a forward pass: the sum of the leaf-module outputs of
    ``outputs_fn(model, batch)`` (an upper bound for a pass without gradients), divided by the batch size."""
    was = model.training
    model.train(False)
    try:
        total = activation_numel(model, lambda: outputs_fn(model, batch), in_bytes=True)
    finally:
        model.train(was)
    return max(1, total // max(1, batch_len(batch) or 1))


class MultiAdapterPass:
    """Signals of blocks of LoRA copies of one ``ModelContext``, in mixed-adapter forward passes.

    The adapter slots are added to the context's working model on first use and kept."""

    def __init__(self, ctx: ModelContext):
        self.ctx = ctx
        self.slots: Optional[AdapterSlots] = None

    def ready_slots(self) -> AdapterSlots:
        if self.slots is None:
            self.slots = AdapterSlots(self.ctx.model, self.ctx.names)
        return self.slots

    def batch_signals(self, C: int, batch, B: int, signal=None) -> torch.Tensor:
        """``(C, B)`` signals of the C copies in slots ``0..C-1`` on one (device) batch: one routed forward
        pass, then the task's signal (or ``signal(outputs, batch)``) on each copy's ``B`` rows of outputs
        (as in the one-copy pass, so per-example work such as an LM head stays at the size of one batch)."""
        ctx = self.ctx
        signal_fn = ctx.task_signal if signal is None else signal
        outs = routed_outputs(self.ready_slots(), C, ctx.task_outputs, batch, B)
        return torch.stack([per_example(signal_fn(o, batch), B, "signal") for o in outs.split(B)])

    @torch.no_grad()
    def signals(self, states: Sequence[Sequence[torch.Tensor] | dict], dataset, signal=None) -> torch.Tensor:
        """Signals ``(C, n)`` (float64, CPU) of the C copies whose trainable tensors are ``states`` (each a
        list in the order of ``ctx.names``, or a dict by name), in one pass over ``dataset``."""
        ctx = self.ctx
        slots = self.ready_slots()
        C = len(states)
        for c, st in enumerate(states):
            slots.load(c, st)
        ctx.model.train(False)
        n = len(dataset)
        out = torch.empty(C, n, dtype=torch.float64)
        for idx in ctx.index_batches(n, dataset):
            out[:, idx] = self.batch_signals(C, ctx.fetch(dataset, idx), len(idx), signal).double().cpu()
        return out

    @torch.no_grad()
    def check(self, dataset) -> tuple[bool, str]:
        """Can signals be computed with mixed-adapter batches? Returns ``(ok, reason)``.

        Needs a peft LoRA model (``lora_layout``) and a task whose outputs follow the routing: on up to
        three examples, a copy whose weights differ from theta0 (slot 0) and theta0 itself (slot 1),
        evaluated in one routed pass, must give the signals of one-copy passes with those weights loaded."""
        ctx = self.ctx
        model = ctx.model
        adapter, _entries, reason = lora_layout(model, ctx.names)
        if adapter is None:
            return False, reason
        if ctx.device.type not in ("cpu", "cuda"):
            return False, f"the model is on {ctx.device.type}; mixed-adapter passes are used on CPU and CUDA only"
        theta0 = ctx.theta0
        g = torch.Generator().manual_seed(0)
        # a copy clearly away from theta0: every weight moved by about its own scale (at least 0.05)
        other = [t + max(float(t.abs().mean()), 0.05) * torch.randn(t.shape, generator=g).to(t.device, t.dtype)
                 for t in theta0]
        probe = torch.arange(min(3, len(dataset)))
        try:
            batch = ctx.fetch(dataset, probe)
            model.train(False)

            def one_copy(state):
                ctx.load_state(state)
                return ctx.signal(ctx.outputs(batch), batch, len(probe))

            ref0, ref1 = one_copy(other), one_copy(theta0)
            slots = self.ready_slots()
            slots.load(0, other)
            slots.load(1, theta0)
            both = self.batch_signals(2, batch, len(probe))
        except Exception as e:  # noqa: BLE001 - any failure means: not usable
            return False, f"the task does not run with mixed-adapter batches ({type(e).__name__}: {e})"
        finally:
            ctx.reset()
        scale = float(torch.cat([ref0, ref1]).abs().max()) + 1e-12
        close = dict(rtol=1e-4, atol=1e-5 * scale)
        if not (torch.allclose(both[0], ref0, **close) and torch.allclose(both[1], ref1, **close)):
            return False, ("task outputs differ between mixed-adapter batches and one-copy passes (does the task's "
                           "outputs() run the model's LoRA layers on the rows of the batch it is given?)")
        return True, f"peft LoRA adapter {adapter!r} ({ctx.n_params:,} trainable parameters)"

    def block_size(self, dataset, n_todo: int, block: Optional[int] = None,
                   memory: float = DEFAULT_MEMORY_BYTES) -> int:
        """Copies per pass: ``block`` if set, else as many as ``memory`` bytes of activations allow for the
        forward pass over one eval batch of every copy (at most ``MAX_ADAPTER_BLOCK``)."""
        if block is not None:
            return max(1, min(block, n_todo))
        ctx = self.ctx
        probe = ctx.fetch(dataset, torch.arange(min(3, len(dataset))))
        per_row = row_bytes(ctx.model, ctx.task_outputs, probe)
        return copies_per_pass(memory, min(ctx.eval_batch_size, len(dataset)), per_row, n_todo)


def checked_block_options(adapter_block: Optional[int], adapter_memory: float) -> tuple[Optional[int], float]:
    """Validate the ``adapter_block`` / ``adapter_memory`` options of a multi-adapter pass; returns them
    (the memory as a float)."""
    if adapter_block is not None and (not isinstance(adapter_block, int) or adapter_block < 1):
        raise ValueError("adapter_block must be None (from adapter_memory) or an integer >= 1, "
                         f"got {adapter_block!r}")
    if isinstance(adapter_memory, bool) or not isinstance(adapter_memory, (int, float)) or not adapter_memory > 0:
        raise ValueError(f"adapter_memory must be a positive number of bytes, got {adapter_memory!r}")
    return adapter_block, float(adapter_memory)


def copies_per_pass(memory: float, rows: int, bytes_per_row: int, n_todo: int) -> int:
    """How many copies' rows (``rows`` examples each) fit ``memory`` bytes of activations, in [1, MAX_ADAPTER_BLOCK]."""
    fit = int(memory // max(1, rows * bytes_per_row))
    return max(1, min(fit, MAX_ADAPTER_BLOCK, n_todo))


__all__ = ["AdapterSlots", "MultiAdapterPass", "route", "repeat_batch", "routed_outputs", "lora_layout", "row_bytes",
           "copies_per_pass", "checked_block_options", "MAX_ADAPTER_BLOCK"]
