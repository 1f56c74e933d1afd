"""Training the target model theta0 (and the retrained models of the LDS ground truth)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def train_classifier(model: torch.nn.Module, train: TensorDataset, *, epochs: int = 20, lr: float = 1e-2,
                     batch_size: int | None = 128, weight_decay: float = 1e-3, seed: int = 0,
                     optimizer: str = "adam", on_epoch: Optional[Callable[[int], None]] = None) -> torch.nn.Module:
    """Minimise mean cross-entropy + ``weight_decay/2 * ||theta||^2`` in place; returns the model.

    ``batch_size=None`` is full batch; ``optimizer="lbfgs"`` runs full-batch L-BFGS (``epochs``
    outer iterations), which reaches the optimum of a convex model tightly. ``on_epoch(e)`` is called
    after epoch ``e`` (1-based), e.g. to keep checkpoints.
    """
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
        for e in range(1, epochs + 1):
            def closure():
                opt.zero_grad()
                loss = objective(x, y)
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
            objective(x[idx], y[idx]).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(e)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())
