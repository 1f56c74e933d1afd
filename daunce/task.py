"""What Daunce needs to know about a model: how to run it on a batch and score each example.

A task separates the model's *outputs* (the tensor at which the perturbed objectives linearise the
loss; logits for a classifier, last hidden states for a language model) from the per-example
*loss* computed from them. Daunce caches the base model's outputs and the loss gradient with
respect to them once, so the linear term of the perturbed objective,
``grad_l(theta0)^T (theta - theta0)``, is taken through the chain rule at the outputs,
``dl/df(f0)^T (f(theta) - f0)``, without any per-example parameter gradient.

Optional hook: a task may define ``check_batch(batch, index, output_shape, what)``, which raises ValueError
naming the dataset ``what`` and the dataset index (``index[row]``, ``index`` of shape ``(B,)``) of the first
example of ``batch`` it cannot use; ``output_shape`` is the per-example shape of the model's outputs, or None on the
first (probe) call, made before the model runs. Daunce calls it on every dataset before training or scoring
(``daunce.engines.context.check_data``); tasks without it are not checked there. It is not part of the ``Task``
protocol, so structural tasks written before it still satisfy ``isinstance(task, Task)``.

Sign convention: ``loss`` and ``signal`` are "badness" (higher = worse on that example), so a
positive covariance between a training example's and a query's signals means the training example
*helped* the query.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate


@runtime_checkable
class Task(Protocol):
    """The protocol. Subclass it to inherit the defaults for ``signal``, ``output_function``, ``collate``."""

    def outputs(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Model outputs of shape ``(B, ...)``; the loss and signal are functions of them."""
        ...

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Per-example training loss, shape ``(B,)``."""
        ...

    def signal(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Per-example signal recorded for every copy, shape ``(B,)``, higher = worse. Default: the loss."""
        return self.loss(outputs, batch)

    def output_function(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """The function the ``"trak"`` variant squares instead of the loss, shape ``(B,)``. Default: the loss."""
        return self.loss(outputs, batch)

    def collate(self, items: list) -> Any:
        """Turn a list of dataset items into a batch. Default: torch's ``default_collate``."""
        return default_collate(items)


def describe(task: Any, fields: dict | None = None, skip: tuple = ()) -> str:
    """``"ClassName(a=1, b='x')"``: a task's class and configuration, the fingerprint a work folder's manifest keeps
    (``daunce.store.task_fingerprint``). ``fields`` (a dict) come first; then every public attribute (no leading
    underscore, not in ``skip``) whose value JSON can hold, in name order. Attributes JSON cannot hold
    (modules, tensors, functions) are left out: they are not configuration."""
    out = dict(fields or {})
    for name, value in sorted(getattr(task, "__dict__", {}).items()):
        if name.startswith("_") or name in out or name in skip:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[name] = value
    return f"{type(task).__qualname__}({', '.join(f'{k}={v!r}' for k, v in out.items())})"


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's margin ``logit_y - logsumexp_{c != y} logit_c``, shape ``(B,)``; higher = more confident."""
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, y, reduction="none")``, shape ``(B,)``, for ``(B, classes)`` logits taken as
    ``(classes, B)``: PyTorch's CPU log-softmax over a short last dimension is slow (for 256,000 x 10 logits,
    forward and backward, 76 ms against 20 ms this way, the same values)."""
    if logits.dim() != 2:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.log_softmax(logits.t(), 0).gather(0, y[None]).squeeze(0)


class ClassificationTask(Task):
    """Classification on ``(x, y)`` batches: outputs = ``model(x)`` logits, loss = cross-entropy.

    Args:
        signal: ``"loss"`` records the cross-entropy of each example; ``"margin"`` records the
            negative margin (so that, as for the loss, higher = worse and positive covariance = helpful).
    """

    def __init__(self, signal: str = "loss"):
        if signal not in ("loss", "margin"):
            raise ValueError(f"ClassificationTask: signal must be 'loss' or 'margin', got {signal!r}")
        self.signal_kind = signal

    def outputs(self, model, batch):
        x, _ = batch[0], batch[1]
        return model(x)

    def loss(self, outputs, batch):
        return cross_entropy(outputs, batch[1])

    def signal(self, outputs, batch):
        if self.signal_kind == "margin":
            return -margin(outputs, batch[1])
        return self.loss(outputs, batch)

    def output_function(self, outputs, batch):
        return -margin(outputs, batch[1])

    def fingerprint(self) -> str:
        """``"ClassificationTask(signal='loss')"`` (a subclass's name and public settings too): what a work folder
        records of the task (``daunce.store.task_fingerprint``)."""
        return describe(self, {"signal": self.signal_kind}, skip=("signal_kind",))

    def check_batch(self, batch, index: torch.Tensor, output_shape=None, what: str = "dataset") -> None:
        """Raise ValueError for a batch this task cannot use, naming ``what`` and the dataset index of the first
        offending example: not ``(x, y)`` pairs; labels that are not integers (float or bool) or not one per
        example; with ``output_shape`` (the per-example shape of the model's outputs): outputs that are not one
        logit vector per example, a single logit (the cross-entropy of one logit is 0 whatever the model does: every
        score would be 0), and labels outside ``[0, classes)``."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            got = f"tuples of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
            raise ValueError(f"{what}: ClassificationTask needs (x, y) examples (features, integer label), got "
                             f"{got}")
        y = batch[1]
        if not torch.is_tensor(y) or y.ndim != 1 or y.shape[0] != len(index):
            shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"{what}: ClassificationTask needs one integer label per example, shape ({len(index)},) "
                             f"for a batch of {len(index)}, got labels of shape {shape}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"{what}: ClassificationTask needs integer class labels, got {y.dtype} (example "
                             f"{int(index[0])} has label {y[0].item()!r}): convert them with .long()")
        if output_shape is None:
            return
        if len(output_shape) != 1:
            raise ValueError(f"{what}: ClassificationTask needs one logit vector per example, outputs of shape "
                             f"(B, classes); the model gives per-example outputs of shape {output_shape}")
        classes = output_shape[0]
        if classes < 2:
            raise ValueError(f"{what}: the model has {classes} output under ClassificationTask's cross-entropy: the "
                             "softmax of one logit is 1, its loss 0 whatever the weights, so every signal and score "
                             "would be 0. Give the model one output per class (2 for a binary task)")
        bad = (y < 0) | (y >= classes)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{what}: example {int(index[row])} has label {int(y[row])}, outside [0, {classes}) for a "
                             f"model with {classes} outputs ({int(bad.sum())} example(s) of {len(index)} checked here)")

    def __repr__(self):
        return f"ClassificationTask(signal={self.signal_kind!r})"


def task_method(task: Any, name: str):
    """The task's method ``name``, or the protocol's default when a structural task lacks it."""
    fn = getattr(task, name, None)
    if fn is not None:
        return fn
    default = getattr(Task, name)
    return lambda *args: default(task, *args)
