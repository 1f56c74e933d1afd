"""Training the target model theta0 (and the retrained models of the LDS ground truth)."""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..engines.context import resolve_device
from ..engines.sequential import set_lr


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model without either."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def cpu_state_dict(model: torch.nn.Module) -> dict:
    """Detached CPU clones of ``model``'s state dict (its version metadata kept): a checkpoint that loads into a
    model on any device."""
    out = copy.copy(model.state_dict())  # a fresh state dict: a shallow copy keeps its metadata with it
    for k, v in list(out.items()):
        out[k] = v.detach().cpu().clone()
    return out


def train_classifier(model: torch.nn.Module, train: TensorDataset, *, epochs: int = 20, lr: float = 1e-2,
                     batch_size: int | None = 128, weight_decay: float = 1e-3, seed: int = 0,
                     optimizer: str = "adam", on_epoch: Optional[Callable[[int], None]] = None,
                     device: Optional[str | torch.device] = None, momentum: float = 0.9,
                     schedule: str = "constant", warmup: float = 0.0, shift: int = 0) -> torch.nn.Module:
    """Minimise mean cross-entropy + ``weight_decay/2 * ||theta||^2`` in place; returns the model.

    ``batch_size=None`` is full batch; ``optimizer="lbfgs"`` runs full-batch L-BFGS (``epochs``
    outer iterations), which reaches the optimum of a convex model tightly. ``on_epoch(e)`` is called
    after epoch ``e`` (1-based), e.g. to keep checkpoints. ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ...;
    ``daunce.engines.context.resolve_device``) moves the model there first; ``None`` trains where the model is.
    The data stay where they are (each batch is moved to the model's device) and the batch order comes from a
    CPU generator, so the batches are the same on every device.

    Minibatch options (the paper's from-scratch recipe for a BatchNorm network): ``optimizer="sgd"`` with
    ``momentum``; ``schedule="cosine"`` scales the learning rate by a linear warm-up over the first ``warmup``
    fraction of the steps, then a cosine to 0 (``"constant"``: no schedule); ``shift`` > 0 shifts each image of a
    batch by a random whole number of pixels in ``[-shift, shift]`` along each axis, zero-filled (``random_shift``),
    drawn from the same seeded generator as the batch order.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if shift < 0 or not 0.0 <= warmup < 1.0:
        raise ValueError(f"shift must be >= 0 and warmup in [0, 1), got shift={shift}, warmup={warmup}")
    if device is not None:
        model.to(resolve_device(device))
    dev = model_device(model)
    x, y = train.tensors[:2]
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    model.train()

    def objective(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum((p * p).sum() for p in params)
        return loss

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=50, tolerance_grad=1e-9, tolerance_change=1e-12,
                                history_size=50, line_search_fn="strong_wolfe")
        xd, yd = x.to(dev), y.to(dev)
        for e in range(1, epochs + 1):
            def closure():
                opt.zero_grad()
                loss = objective(xd, yd)
                loss.backward()
                return loss
            opt.step(closure)
            if on_epoch is not None:
                on_epoch(e)
        model.eval()
        return model
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam', 'sgd' or 'lbfgs', got {optimizer!r}")
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr, momentum=momentum)
    n = len(y)
    bs = batch_size or n
    total = epochs * math.ceil(n / bs)
    step = 0
    for e in range(1, epochs + 1):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, bs):
            idx = perm[s : s + bs]
            xb = random_shift(x[idx], shift, g) if shift else x[idx]
            if schedule == "cosine":
                set_lr(opt, lr * lr_factor(step, total, warmup))
            opt.zero_grad()
            objective(xb.to(dev), y[idx].to(dev)).backward()
            opt.step()
            step += 1
        if on_epoch is not None:
            on_epoch(e)
    model.eval()
    return model


def lr_factor(step: int, total: int, warmup: float) -> float:
    """The learning rate's factor at ``step`` (0-based) of ``total``: linear from 1/w to 1 over the first
    ``w = ceil(warmup * total)`` steps, then a cosine from 1 to 0 over the rest (the last step's factor is > 0)."""
    w = math.ceil(warmup * total)
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` ``(B, C, H, W)`` moved by its own random offset in ``[-shift, shift]`` pixels along each
    axis, zero-filled (the random-crop-with-padding augmentation of CIFAR-10 recipes)."""
    if x.ndim != 4:
        raise ValueError(f"random shifts need images (B, C, H, W), got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
    off = torch.randint(0, 2 * shift + 1, (2, B), generator=generator)
    rows = (off[0][:, None] + torch.arange(H))[:, None, :, None]
    cols = (off[1][:, None] + torch.arange(W))[:, None, None, :]
    return padded[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    """Top-1 accuracy of ``model`` on ``data``, evaluated on the model's device."""
    x, y = data.tensors
    dev = model_device(model)
    model.eval()
    return float((model(x.to(dev)).argmax(1) == y.to(dev)).float().mean())
