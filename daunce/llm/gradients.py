"""Gradient baselines: per-example LoRA gradients and the scores built from them.

``per_example_gradients`` gives each example's gradient of its mean response NLL with respect to
the trainable parameters (the LoRA adapters), optionally randomly projected (LoGra / TRAK's first
stage). The scores are ``(n_train, n_query)`` matrices, positive = helpful: ``gradient_if_scores``
(LoGra-style influence), ``gradient_dot_scores`` (grad-dot, TracIn at one checkpoint) and
``gradient_cosine_scores`` (grad-cos).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from ..progress import progress_bar
from .task import CausalLMTask

if TYPE_CHECKING:
    from .data import TextDataset


def per_example_gradients(model, dataset: TextDataset, *, proj_dim: Optional[int] = 512, seed: int = 0,
                          progress: bool = False) -> torch.Tensor:
    """``(n, proj_dim)`` float32 on the CPU: each example's gradient of its mean response NLL with
    respect to the trainable parameters (the LoRA adapters), one example per backward pass, randomly
    projected with dattri's ``random_project`` (Gaussian, seeded) -- the first stage of LoGra / TRAK.
    ``proj_dim=None`` (or ``proj_dim >= d``) keeps the full ``(n, d)`` gradients."""
    task = CausalLMTask()
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    d = sum(p.numel() for p in params)
    project = None
    if proj_dim is not None and proj_dim < d:
        from dattri.func.projection import random_project

        project = random_project(torch.zeros(1, d), 1, proj_dim, 32, proj_seed=seed, proj_type="normal",
                                 device="cpu")
    rows = []
    was = model.training
    model.eval()
    for i in progress_bar(range(len(dataset)), desc="per-example gradients", progress=progress, leave=False):
        batch = {k: v[None].to(device) for k, v in dataset[i].items()}
        loss = task.loss(task.outputs(model, batch), batch).sum()
        grads = torch.autograd.grad(loss, params)
        g = torch.cat([x.reshape(-1) for x in grads]).detach().float().cpu()[None]
        rows.append(project(g, ensemble_id=0) if project is not None else g)
    model.train(was)
    return torch.cat(rows).float()


def gradient_if_scores(g_train: torch.Tensor, g_query: torch.Tensor, damping: float = 0.1) -> torch.Tensor:
    """LoGra-style influence in the projected gradient space, ``(n_train, n_query)``:
    ``g_i^T (F + lam I)^{-1} g_q`` with ``F = G^T G / n`` (empirical Fisher of the projected gradients) and
    ``lam = damping * mean(diag F)``. Positive = helpful (removing i raises q's loss)."""
    G = g_train.double()
    Fm = G.T @ G / G.shape[0]
    lam = damping * Fm.diagonal().mean()
    A = Fm + lam * torch.eye(Fm.shape[0], dtype=Fm.dtype)
    return (G @ torch.linalg.solve(A, g_query.double().T)).float()


def gradient_dot_scores(g_train: torch.Tensor, g_query: torch.Tensor) -> torch.Tensor:
    """Dot products of (projected) gradients, ``(n_train, n_query)`` float32 (computed in float64):
    grad-dot, TracIn at one checkpoint. Positive = a gradient step on the training example lowers the
    query's loss (helpful)."""
    return (g_train.double() @ g_query.double().T).float()


def gradient_cosine_scores(g_train: torch.Tensor, g_query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of (projected) gradients, ``(n_train, n_query)`` float32 (computed in float64):
    grad-cos. Positive = helpful."""
    return gradient_dot_scores(F.normalize(g_train.double(), dim=1), F.normalize(g_query.double(), dim=1))
