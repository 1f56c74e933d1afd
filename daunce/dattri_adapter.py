"""Daunce behind dattri's attributor contract: ``cache(train_loader)`` then
``attribute(train_loader, test_loader) -> Tensor[n_train, n_test]`` (positive = helpful), so that it
plugs into dattri's benchmarks and metrics (``dattri.metric.lds``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from . import scores
from .config import DaunceConfig
from .method import Daunce
from .task import ClassificationTask


def _dataset(loader: DataLoader) -> TensorDataset:
    """The loader's examples, in order, as a ``TensorDataset`` (Daunce draws its own subsets and batches)."""
    if isinstance(loader.dataset, TensorDataset) and not getattr(loader, "shuffle", False):
        from torch.utils.data import SequentialSampler

        if isinstance(loader.sampler, SequentialSampler):
            return loader.dataset
    parts = None
    for batch in loader:
        batch = batch if isinstance(batch, (list, tuple)) else (batch,)
        if parts is None:
            parts = [[] for _ in batch]
        for p, t in zip(parts, batch):
            p.append(t)
    return TensorDataset(*[torch.cat(p) for p in parts])


class DaunceAttributor:
    """dattri-style attributor for Daunce.

    Args:
        model: theta0 (never modified). task: a ``daunce.Task`` (default ``ClassificationTask()``).
        config: ``DaunceConfig``. workdir: resumable copies folder. kw: passed to ``Daunce``.
    """

    def __init__(self, model: torch.nn.Module, task=None, config: Optional[DaunceConfig] = None,
                 workdir=None, **kw):
        self.daunce = Daunce(model, task or ClassificationTask(), config or DaunceConfig(), workdir, **kw)
        self.full_train: Optional[TensorDataset] = None

    def cache(self, full_train_dataloader: DataLoader) -> None:
        """Train the K perturbed copies on the full training data."""
        self.full_train = _dataset(full_train_dataloader)
        self.daunce.fit(self.full_train)

    def attribute(self, train_dataloader: DataLoader, test_dataloader: DataLoader) -> torch.Tensor:
        """Scores ``(n_train, n_test)``, positive = the training example helped the test example. The
        training loader may be any set of examples (the copies were trained on the cached one)."""
        if self.full_train is None:
            self.cache(train_dataloader)
        # any set of training examples: the covariance of the copies' signals on it (Daunce.attribute itself accepts
        # only the fitted training set)
        d = self.daunce
        return scores.score(d.signals(_dataset(train_dataloader)), d.signals(_dataset(test_dataloader)),
                            d.config.score).float()
