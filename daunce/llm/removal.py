"""The removal evaluation: remove the top-k training examples of a score matrix and retrain.

``top_k_removal`` picks the examples most helpful to the query set as a whole; ``retrain_without``
reruns theta0's recipe (``finetune``) without them, from the same seeded initial adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .models import load_trainable_state
from .training import finetune

if TYPE_CHECKING:
    from .data import TextDataset


def top_k_removal(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` training examples with the largest summed score over the queries
    (the most helpful for the query set as a whole); ``scores`` is ``(n_train, n_query)``."""
    return torch.argsort(scores.double().sum(1), descending=True)[:k]


def keep_mask(n: int, removed: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: False at the ``removed`` indices, True elsewhere."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return keep


def retrain_without(model, init_state: dict, train: TextDataset, removed, *, seed: int, **recipe):
    """theta0's recipe on the training set minus ``removed``: reset the adapters to their seeded
    initial state ``init_state`` (from ``trainable_state`` right after ``add_lora``) and fine-tune
    with ``recipe`` (epochs, lr, batch_size, ...) and ``seed``. Returns the model (trained in place)."""
    keep = keep_mask(len(train), torch.as_tensor(removed, dtype=torch.long)).nonzero().squeeze(1)
    load_trainable_state(model, init_state)
    return finetune(model, None, train.subset(keep), seed=seed, **recipe)
