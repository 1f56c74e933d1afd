"""Training the target model theta0 (and the retrained models of the LDS ground truth)."""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..engines.context import resolve_device


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
                     device: Optional[str | torch.device] = None) -> torch.nn.Module:
    """Minimise mean cross-entropy + ``weight_decay/2 * ||theta||^2`` in place; returns the model.

    ``batch_size=None`` is full batch; ``optimizer="lbfgs"`` runs full-batch L-BFGS (``epochs``
    outer iterations), which reaches the optimum of a convex model tightly. ``on_epoch(e)`` is called
    after epoch ``e`` (1-based), e.g. to keep checkpoints. ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ...;
    ``daunce.engines.context.resolve_device``) moves the model there first; ``None`` trains where the model is.
    The data stay where they are (each batch is moved to the model's device) and the batch order comes from a
    CPU generator, so the batches are the same on every device.
    """
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
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    n = len(y)
    bs = batch_size or n
    for e in range(1, epochs + 1):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, bs):
            idx = perm[s : s + bs]
            opt.zero_grad()
            objective(x[idx].to(dev), y[idx].to(dev)).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(e)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    """Top-1 accuracy of ``model`` on ``data``, evaluated on the model's device."""
    x, y = data.tensors
    dev = model_device(model)
    model.eval()
    return float((model(x.to(dev)).argmax(1) == y.to(dev)).float().mean())
