"""``ModelContext``: the one public object every engine receives.

It owns the working copy of the model (the target model itself is never modified), the trainable
parameters and theta0, and the task's calls checked for one value per example. Engines (sequential,
vmap, multi-adapter, Ray) read and call this object only; they never see the ``Daunce`` front.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

from ..task import task_method

#: Bytes a block of copies may use by default in one engine pass (vmap training, multi-adapter signals).
DEFAULT_MEMORY_BYTES = 2 * 2**30
#: layers with running statistics (buffers a training step changes)
RUNNING_STATS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


def running_stat_modules(model: torch.nn.Module) -> list:
    """``[(name, module)]`` of the model's BatchNorm layers that track running statistics."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RUNNING_STATS) and m.track_running_stats]


def set_copy_mode(model: torch.nn.Module, config) -> None:
    """Put ``model`` in the mode a copy trains in: ``train(config.train_mode)``, and its BatchNorm layers with running
    statistics in train mode (batch statistics) with ``config.batchnorm == "train"``, else in eval mode (theta0's or
    the copy's running statistics). Signals are always recorded in eval mode (``model.train(False)``)."""
    model.train(config.train_mode)
    for _, m in running_stat_modules(model):
        m.train(config.batchnorm == "train")


class TaskOutputs(torch.nn.Module):
    """Wraps ``task.outputs(model, batch)`` as a module, so ``torch.func.functional_call`` can swap in the weights
    (and buffers) of one copy (their names are the model's, prefixed with ``model.``)."""

    def __init__(self, model: torch.nn.Module, outputs_fn):
        super().__init__()
        self.model = model
        self.outputs_fn = outputs_fn

    def forward(self, batch):
        return self.outputs_fn(self.model, batch)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` that ``device`` names; the default ``"auto"`` is CUDA when ``torch.cuda.is_available()``,
    else the CPU.

    Raises ``ValueError`` for a string torch does not read as a device, and for a CUDA device (or CUDA index) that
    this machine does not have."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or a torch.device, "
                         f"got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asks for CUDA, but torch.cuda.is_available() is False on this "
                             "machine; use device='auto' or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


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
    """The batch of ``dataset`` at indices ``idx`` (fast path for a ``TensorDataset``), on the CPU."""
    if isinstance(dataset, TensorDataset):
        return tuple(t[idx] for t in dataset.tensors)
    return collate([dataset[int(i)] for i in idx])


def per_example(value: torch.Tensor, batch_len: int, what: str) -> torch.Tensor:
    """``value`` if it holds one number per example (shape ``(batch_len,)``), else a clear error."""
    if not torch.is_tensor(value) or value.ndim != 1 or value.shape[0] != batch_len:
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(
            f"task.{what} must return one value per example, shape ({batch_len},), got {shape}; "
            "use reduction='none' in the loss")
    return value


class ModelContext:
    """The working model, its trainable parameters and theta0, and the task's calls.

    Args:
        model: the trained target model theta0 (deep-copied; the original is never modified). Its
            parameters with ``requires_grad=True`` are the ones the copies fine-tune.
        task: a ``daunce.Task``.
        eval_batch_size: batch size of the passes that cache base outputs and record signals.
        copy_model: work in a deep copy of ``model`` (the default: the target model is never modified);
            ``False`` works in ``model`` itself, for an owner that keeps one model and swaps its weights.
        sort_by_length: evaluation passes over a dataset with per-example ``lengths`` batch examples of
            similar length (``index_batches``); ``False`` keeps consecutive batches (the former path, kept for one
            release). On ``03_llm_subset_removal``'s copies this cut the padding of the signal passes
            (``benchmarks/results/copy_throughput.md``).

    Attributes:
        model: the working copy; ``load_state`` writes a copy's trainable tensors into it.
        names: names of the trainable parameters, in a fixed order.
        params: the working copy's trainable parameters, in that order.
        theta0: detached clones of the trainable parameters at theta0.
        task_outputs, task_loss, task_signal, task_output_function, collate: the task's methods
            (``outputs(model, batch)``, ``loss(outputs, batch)``, ...), or its defaults.
    """

    def __init__(self, model: torch.nn.Module, task, eval_batch_size: int = 256, copy_model: bool = True,
                 sort_by_length: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be an integer >= 1, got {eval_batch_size!r}")
        self.task = task
        self.eval_batch_size = eval_batch_size
        self.sort_by_length = sort_by_length
        self.task_outputs = task_method(task, "outputs")
        self.task_loss = task_method(task, "loss")
        self.task_signal = task_method(task, "signal")
        self.task_output_function = task_method(task, "output_function")
        self.collate = task_method(task, "collate")
        self.model = copy.deepcopy(model) if copy_model else model
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        self.params = [p for _, p in self.model.named_parameters() if p.requires_grad]
        self.theta0 = [p.detach().clone() for p in self.params]
        #: names of the BatchNorm running-statistic buffers (``running_stat_modules``: running_mean, running_var,
        #: num_batches_tracked), in a fixed order, and their values at theta0 (clones: theta0's own never move)
        self.stat_names = [f"{n}.{b}" if n else b for n, m in running_stat_modules(self.model)
                           for b, t in m.named_buffers(recurse=False) if t is not None]
        self.stats0 = [self.model.get_buffer(n).detach().clone() for n in self.stat_names]
        self.wrapper = TaskOutputs(self.model, self.task_outputs)
        self._checked: dict[int, tuple] = {}  # id(dataset) -> (dataset, its length): datasets check_data passed

    # ------------------------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def stat_buffers(self) -> list:
        """The working model's BatchNorm running-statistic buffers (in the order of ``stat_names``)."""
        return [self.model.get_buffer(n) for n in self.stat_names]

    @property
    def n_params(self) -> int:
        """d, the number of trainable parameters."""
        return sum(p.numel() for p in self.params)

    def load_state(self, state: Sequence[torch.Tensor]) -> None:
        """Write one copy's trainable tensors (in the order of ``names``) into the working model."""
        with torch.no_grad():
            for p, s in zip(self.params, state):
                p.copy_(s.to(p.device, p.dtype))

    def reset(self) -> None:
        """Put the working model back at theta0: its trainable tensors and its BatchNorm running statistics."""
        self.load_state(self.theta0)
        self.load_stats(self.stats0)

    def load_stats(self, stats: Optional[Sequence[torch.Tensor]]) -> None:
        """Write one copy's BatchNorm running statistics (in the order of ``stat_names``) into the working model;
        ``None`` (a copy trained with theta0's statistics) writes theta0's."""
        with torch.no_grad():
            for b, s in zip(self.stat_buffers, self.stats0 if stats is None else stats):
                b.copy_(s.to(b.device, b.dtype))

    def stats(self) -> list:
        """The working model's BatchNorm running statistics now (detached CPU clones, in the order of
        ``stat_names``)."""
        return [b.detach().clone().cpu() for b in self.stat_buffers]

    def outputs_with(self, tensors: dict, batch) -> torch.Tensor:
        """The task's outputs with the weights and buffers ``tensors`` (``{model name: tensor}``, e.g. theta0's and
        scratch running statistics) swapped in for this call (``torch.func.functional_call``); the others are the
        working model's."""
        return torch.func.functional_call(self.wrapper, {"model." + k: v for k, v in tensors.items()}, (batch,))

    def state(self) -> list:
        """The working model's trainable tensors now (detached CPU clones)."""
        return [p.detach().clone().cpu() for p in self.params]

    def unflatten(self, flat: torch.Tensor) -> list:
        """A flat ``(d,)`` vector as one tensor per trainable parameter (device and dtype of each)."""
        out, s = [], 0
        for p in self.params:
            out.append(flat[s : s + p.numel()].reshape(p.shape).to(p.device, p.dtype))
            s += p.numel()
        return out

    # ------------------------------------------------------------------------------------- data
    def fetch(self, dataset: Dataset, idx: torch.Tensor) -> Any:
        """The batch of ``dataset`` at ``idx``, on the model's device."""
        return to_device(fetch(dataset, idx, self.collate), self.device)

    def index_batches(self, n: int, dataset: Optional[Dataset] = None) -> Iterator[torch.Tensor]:
        """Index tensors of the evaluation batches over ``n`` examples: consecutive, or, for a ``dataset`` with
        per-example ``lengths`` (``daunce.llm.TextDataset``) and ``sort_by_length`` on, runs of examples sorted
        by length, so a batch trimmed to its longest example pads less (every caller writes results at the
        batch's indices, so the order changes nothing else)."""
        bs = self.eval_batch_size
        lengths = getattr(dataset, "lengths", None) if self.sort_by_length else None
        order = torch.argsort(torch.as_tensor(lengths), stable=True) if lengths is not None else None
        for s in range(0, n, bs):
            yield torch.arange(s, min(n, s + bs)) if order is None else order[s : s + bs]

    def check_data(self, dataset: Dataset, what: str) -> int:
        """``len(dataset)`` after ``check_data`` (module function) passed on it; a dataset object already checked
        (and of the same length) is not checked again."""
        key = id(dataset)
        seen = self._checked.get(key)
        if seen is not None and seen[0] is dataset and seen[1] == len(dataset):
            return seen[1]
        n = check_data(self, dataset, what)
        self._checked[key] = (dataset, n)
        return n

    # ------------------------------------------------------------------------------- task calls
    def outputs(self, batch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """The task's outputs of ``model`` (default: the working model) on ``batch``."""
        return self.task_outputs(self.model if model is None else model, batch)

    def loss(self, outputs: torch.Tensor, batch, n: int) -> torch.Tensor:
        """Per-example loss ``(n,)``."""
        return per_example(self.task_loss(outputs, batch), n, "loss")

    def signal(self, outputs: torch.Tensor, batch, n: int) -> torch.Tensor:
        """Per-example signal ``(n,)`` (higher = worse)."""
        return per_example(self.task_signal(outputs, batch), n, "signal")

    def output_function(self, outputs: torch.Tensor, batch, n: int) -> torch.Tensor:
        """Per-example output function ``(n,)`` (the TRAK-like form's f)."""
        return per_example(self.task_output_function(outputs, batch), n, "output_function")


def check_dataset(dataset, what: str) -> int:
    """``len(dataset)``, with a clear error for a dataset without a length or with none."""
    try:
        n = len(dataset)
    except TypeError as e:
        raise TypeError(f"{what} must be a map-style dataset with len(), got {type(dataset).__name__}") from e
    if n == 0:
        raise ValueError(f"{what} is empty: Daunce needs at least one example")
    return n


def check_training_set(ctx: "ModelContext", train: Dataset) -> int:
    """``len(train)`` after ``ctx.check_data(train, "train_dataset")``; a ValueError for fewer than two examples
    (every copy would train on the same data: the covariance across copies would be 0 or noise)."""
    n = ctx.check_data(train, "train_dataset")
    if n < 2:
        raise ValueError(f"train_dataset has {n} example: Daunce needs at least 2 training examples (with one, every "
                         "copy trains on the same data and every score is 0)")
    return n


#: Examples in the probe batch on which ``check_data`` runs the model once.
PROBE_EXAMPLES = 8


def _describe(batch: Any) -> str:
    """The shapes and dtypes of a batch's tensors, for an error message."""
    if torch.is_tensor(batch):
        return f"tensor {tuple(batch.shape)} {str(batch.dtype).replace('torch.', '')}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (list, tuple)):
        return f"{type(batch).__name__} of {len(batch)}: (" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def _tensors(batch: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(where, tensor)`` for every tensor of a (nested) batch; ``where`` names its place, e.g. ``"[0]"``."""
    if torch.is_tensor(batch):
        yield path or "the example", batch
    elif isinstance(batch, dict):
        for k, v in batch.items():
            yield from _tensors(v, f"{path}[{k!r}]")
    elif isinstance(batch, (list, tuple)):
        for j, v in enumerate(batch):
            yield from _tensors(v, f"{path}[{j}]")


def check_finite(batch: Any, index: torch.Tensor, what: str) -> None:
    """Raise ValueError naming the dataset index of the first example of ``batch`` (rows at dataset indices
    ``index``, ``(B,)``) with a NaN or infinite value in a floating-point tensor, and how many examples have one."""
    B = len(index)
    for where, t in _tensors(batch):
        if not (t.is_floating_point() or t.is_complex()) or t.ndim == 0 or t.shape[0] != B:
            continue
        bad = ~torch.isfinite(t.reshape(B, -1)).all(1)
        if bool(bad.any()):
            rows = bad.nonzero().squeeze(1).cpu()
            raise ValueError(f"{what}: example {int(index[rows[0]])} has a NaN or infinite value in its features "
                             f"(tensor {where} of the batch; {len(rows)} example(s) of {B} checked here have one): "
                             "clean or drop those examples before fitting or scoring")


def check_data(ctx: ModelContext, dataset: Dataset, what: str) -> int:
    """``len(dataset)`` after checking its content against the model and the task, before any training or scoring:

    * every floating-point tensor of every example is finite (``check_finite``; one vectorised pass over a
      ``TensorDataset``'s tensors, else one pass over the dataset in evaluation batches);
    * the task's ``check_batch(batch, index, output_shape)`` hook, where the task has one (``ClassificationTask``:
      ``(x, y)`` examples, integer labels in the range of the model's outputs, more than one output): first on a
      probe batch of the first ``PROBE_EXAMPLES`` examples with ``output_shape=None`` (the batch's structure), then on
      every batch with the per-example shape of the model's outputs. Tasks without the hook are not checked there;
    * the model runs on the probe batch: an error there (a feature size the model does not take) is raised again
      as a ValueError naming the dataset and the batch's shapes.

    Raises ValueError (each problem named with the dataset and, where it is an example's, its index)."""
    n = check_dataset(dataset, what)
    hook = getattr(ctx.task, "check_batch", None)
    probe_idx = torch.arange(min(n, PROBE_EXAMPLES))
    probe = ctx.fetch(dataset, probe_idx)
    if hook is not None:
        hook(probe, probe_idx, None, what)
    was_training = ctx.model.training
    ctx.model.train(False)
    try:
        with torch.no_grad():
            out = ctx.outputs(probe)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise ValueError(f"{what}: the model cannot run on its first examples (batch of {_describe(probe)}; model "
                         f"{type(ctx.model).__name__}): {e}") from e
    finally:
        ctx.model.train(was_training)
    shape = tuple(out.shape[1:]) if torch.is_tensor(out) and out.ndim >= 1 else None
    if isinstance(dataset, TensorDataset):
        batches: Iterator = iter([(tuple(dataset.tensors), torch.arange(n))])
    else:
        batches = ((fetch(dataset, idx, ctx.collate), idx) for idx in ctx.index_batches(n))
    for batch, idx in batches:
        check_finite(batch, idx, what)
        if hook is not None:
            hook(batch, idx, shape, what)
    return n


__all__ = ["DEFAULT_MEMORY_BYTES", "ModelContext", "PROBE_EXAMPLES", "RUNNING_STATS", "TaskOutputs",
           "running_stat_modules", "set_copy_mode", "check_data", "check_dataset", "check_finite",
           "check_training_set", "fetch", "per_example", "resolve_device", "to_device"]
