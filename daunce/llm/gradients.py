"""Gradient baselines: per-example LoRA gradients and the scores built from them.

``per_example_gradients`` gives each example's gradient of its mean response NLL with respect to
the trainable parameters (the LoRA adapters), optionally randomly projected (LoGra / TRAK's first
stage). The scores are ``(n_train, n_query)`` matrices, positive = helpful: ``gradient_if_scores``
(LoGra-style influence), ``gradient_dot_scores`` (grad-dot, TracIn at one checkpoint) and
``gradient_cosine_scores`` (grad-cos). ``logra_scores`` runs dattri's LoGra attributor on the adapters;
``ekfac_scores`` / ``ekfac_damping_grid`` run kronfluence's EK-FAC influence on them.
"""

from __future__ import annotations

import tempfile
import warnings
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from ..progress import progress_bar
from .data import IGNORE
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


def lora_linear_names(model, caller: str = "lora_linear_names") -> list[str]:
    """Names of the LoRA adapters' linear layers of a peft model (``...lora_A.default``, ``...lora_B.default``), in
    module order, leaving out every ``lora_A`` whose ``lora_B`` is still 0 (a fresh adapter): its gradient is exactly
    0, and no relative damping can make that block of a curvature invertible. Raises ValueError, naming ``caller``,
    when the model has no LoRA adapters."""
    modules = dict(model.named_modules())
    names = []
    for n, mod in modules.items():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if ".lora_B." in n + ".":
            names.append(n)
        elif ".lora_A." in n + ".":
            partner = modules.get(n.replace(".lora_A.", ".lora_B.") if ".lora_A." in n else
                                  n.rsplit(".lora_A", 1)[0] + ".lora_B" + n.rsplit(".lora_A", 1)[1])
            if partner is not None and bool(partner.weight.detach().abs().sum() > 0):
                names.append(n)
    if not names:
        raise ValueError(f"{caller}: the model has no LoRA adapters (lora_A / lora_B linear layers)")
    return names


class _ForwardInputs(torch.utils.data.Dataset):
    """A ``TextDataset``'s items restricted to what the causal LM's forward accepts (dattri calls
    ``model(**batch)`` to size its projections): cached features or token ids, mask, labels."""

    def __init__(self, dataset: TextDataset):
        self.dataset = dataset
        self.keys = [k for k in ("inputs_embeds", "input_ids") if k in dataset.enc][:1] + ["attention_mask", "labels"]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return {k: item[k] for k in self.keys}


def logra_scores(model, train: TextDataset, query: TextDataset, *, proj_dim: int = 256, damping: float = 1e-3,
                 batch_size: int = 8, device: str = "cpu") -> torch.Tensor:
    """LoGra through dattri (``dattri.algorithm.logra.LoGraAttributor``), ``(n_train, n_query)``, positive =
    helpful: per-example gradients of the mean response NLL collected by hooks on the **LoRA adapters'**
    ``lora_A`` / ``lora_B`` linear layers, projected per layer (Kronecker-factored Gaussian projection to
    ``proj_dim`` = a perfect square), preconditioned by each layer's damped empirical Fisher (``damping``
    relative to its mean diagonal).

    What makes dattri 0.3's LoGra run on a peft model: the batches hold only the forward's keyword
    arguments (dattri calls ``model(**batch)``; the dataset's ``index`` is not one); the hooked layers are
    the adapters (by default dattri hooks every ``nn.Linear``: the frozen projections and the LM head too,
    whose gradients are not the trained parameters'); a ``lora_A`` whose ``lora_B`` is still 0 (a fresh
    adapter) is left out, since its gradient is exactly 0 and dattri's relative damping cannot make that
    block invertible; and dattri's metadata goes to a temporary folder (without a ``cache_dir`` it writes
    ``batch_metadata.json`` into the working folder and reads it back in the next call, which then returns
    scores of the wrong shape)."""
    import logging

    from torch.utils.data import DataLoader

    task = CausalLMTask()

    def loss_func(m, batch, dev):
        b = {k: v.to(dev) for k, v in batch.items()}
        return task.loss(task.outputs(m, b), b).sum()   # per-example losses summed: per-example gradients

    def loader(ds):
        return DataLoader(_ForwardInputs(ds), batch_size=batch_size, shuffle=False)

    names = lora_linear_names(model, "logra_scores")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was = model.training
    model.eval()
    ext_log = logging.getLogger("torch.utils.cpp_extension")  # dattri's projection probes for CUDA builds
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from dattri.algorithm.logra import LoGraAttributor
        from dattri.task import AttributionTask

        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as cache:
            # dattri's offload loader asks for pinned memory, which a CPU run cannot give (a harmless warning)
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            att = LoGraAttributor(AttributionTask(loss_func=loss_func, model=model, checkpoints=state),
                                  layer_names=names, hessian="eFIM", damping=damping, proj_dim=proj_dim,
                                  device=device, offload="cpu", cache_dir=cache)
            att.cache(loader(train))
            scores = att.attribute(loader(train), loader(query))
    finally:
        ext_log.setLevel(level)
        model.load_state_dict(state)
        model.train(was)
    return scores.detach().float().cpu()


def _lora_ekfac_task(names: list[str]):
    """The ``kronfluence.task.Task`` of response-masked chat batches, tracking the LoRA layers ``names``."""
    from kronfluence.task import Task as KTask

    lm = CausalLMTask()

    class LoRAResponseTask(KTask):
        """Training loss: each example's mean response NLL (theta0's per-example objective), summed over the batch
        (kronfluence's convention); with ``sample=True`` the response tokens are replaced by tokens sampled from the
        model (the true Fisher). Measurement: each query's mean response NLL (the package's LLM signal), summed."""

        def compute_train_loss(self, batch, model, sample=False):
            hidden = lm.outputs(model, batch)
            if sample:
                labels = batch["labels"].clone()
                target = labels[:, 1 : hidden.shape[1]]
                rows, cols = (target != IGNORE).nonzero(as_tuple=True)
                with torch.no_grad():
                    logits = lm.head(hidden[:, :-1][rows, cols].detach()).float()
                    target[rows, cols] = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
                batch = dict(batch, labels=labels)
            return lm.loss(hidden, batch).sum()

        def compute_measurement(self, batch, model):
            return lm.loss(lm.outputs(model, batch), batch).sum()

        def get_influence_tracked_modules(self):
            return list(names)

        def get_attention_mask(self, batch):
            # the model runs on the batch trimmed to its longest example (CausalLMTask.outputs)
            mask = batch["attention_mask"]
            return mask[:, : int(mask.sum(1).max())]

    return LoRAResponseTask()


def ekfac_damping_grid(model, train: TextDataset, query: TextDataset, *, grid=(None,), empirical_fisher: bool = False,
                       batch_size: int = 8, device: str | torch.device = "cpu", seed: int = 0) -> list[dict]:
    """kronfluence's EK-FAC influence on the **LoRA adapters** (``daunce.ekfac.ekfac_grid``) at every damping of
    ``grid``, the factors fitted once: ``[{"damping", "scores": (n_train, n_query) float32, "seconds"}]``.

    ``scores[i, q] = grad f_q^T (F + lambda I)^{-1} grad L_i``, positive = helpful (removing i would raise the query's
    NLL): ``L_i`` is training example i's mean response NLL (the per-example term of theta0's objective,
    ``daunce.llm.finetune``), ``f_q`` the query's mean response NLL (the signal of ``CausalLMTask``), both through the
    adapters' linear layers only (``lora_linear_names``: every ``lora_A`` / ``lora_B``, a fresh adapter's ``lora_A``
    left out), the frozen weights as they are. ``F`` is EK-FAC's block-diagonal (one block per adapter layer) mean
    Fisher of the training loss, with response tokens sampled from the model (kronfluence's default) or with the
    true ones (``empirical_fisher=True``: the empirical Fisher); padding is masked out of its activation covariance.
    ``lambda`` (``grid``) is kronfluence's absolute damping, on the scale of the mean per-example squared gradient;
    ``None``: kronfluence's heuristic, 0.1 times the mean eigenvalue. ``seed`` seeds the sampled tokens, so the same
    seed gives the same scores; ``device``: the CPU or CUDA (the scores come back on the CPU). The model is left as
    it is (a deep copy is analysed). ``train`` / ``query`` may carry cached bottom features (``split_model``)."""
    from ..ekfac import ekfac_grid

    names = lora_linear_names(model, "ekfac_scores")
    return ekfac_grid(model, _lora_ekfac_task(names), train, query, grid=tuple(grid), empirical_fisher=empirical_fisher,
                      batch_size=batch_size, device=device, seed=seed)


def ekfac_scores(model, train: TextDataset, query: TextDataset, *, damping: Optional[float] = None,
                 empirical_fisher: bool = False, batch_size: int = 8, device: str | torch.device = "cpu",
                 seed: int = 0) -> torch.Tensor:
    """kronfluence's EK-FAC influence on the LoRA adapters at one damping: ``(n_train, n_query)`` float32 on the
    CPU, positive = helpful (``ekfac_damping_grid`` for what it computes and the arguments)."""
    return ekfac_damping_grid(model, train, query, grid=(damping,), empirical_fisher=empirical_fisher,
                              batch_size=batch_size, device=device, seed=seed)[0]["scores"]
