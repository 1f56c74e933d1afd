"""Every random draw of copy k, decided before it is trained and shared by all engines.

Copy k's subset, perturbations, isotropic noise direction and minibatch order come from a generator
seeded by ``(config.seed, k)`` (``copy_seed``), so copy k is the same whatever K is and whichever
engine trains it. With ``perturbation="orthogonal"`` the perturbation vectors of a block of copies
are the rows of one random orthogonal matrix (``OrthogonalDesign``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .config import DaunceConfig

ORTHO_MAX_ENTRIES = 5e7  # the default block keeps one (D x block) float64 matrix under 400 MB


def copy_seed(seed: int, k: int) -> int:
    """The generator seed of copy ``k`` of a run seeded ``seed``."""
    return (seed * 1_000_003 + k * 7_919 + 12_345) % (2**63 - 1)


def augment_generator(seed: int, k: int) -> torch.Generator:
    """Copy ``k``'s generator of augmentation draws (``DaunceConfig.augment``), seeded by ``(seed, k)`` apart from
    the plan's generator, so the plan (subset, perturbations, minibatch order) is the same with and without
    augmentation. The draws are taken step by step, in training order."""
    return torch.Generator().manual_seed((copy_seed(seed, k) + 0x9E3779B97F4A7C15) % (2**63 - 1))


def shift_flip(x: torch.Tensor, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Images ``x`` ``(B, C, H, W)``, each moved by its own random offset in ``[-shift, shift]`` pixels along each
    axis, zero-filled (a random crop of the image padded by ``shift`` zeros; ``shift=0``: no shift), then, with
    ``flip``, each mirrored left-right with probability 1/2. The offsets (``(2, B)`` integers) are drawn first, the
    flips (``B`` uniforms) second, from ``generator`` (on the CPU), so the draws do not depend on ``x``'s device."""
    if x.ndim != 4:
        raise ValueError(f"augment: random shifts and flips need images (B, C, H, W) as the batch's first tensor, "
                         f"got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if shift:
        off = torch.randint(0, 2 * shift + 1, (2, B), generator=generator).to(x.device)
        padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
        rows = (off[0][:, None] + torch.arange(H, device=x.device))[:, None, :, None]
        cols = (off[1][:, None] + torch.arange(W, device=x.device))[:, None, None, :]
        b = torch.arange(B, device=x.device)[:, None, None, None]
        c = torch.arange(C, device=x.device)[None, :, None, None]
        x = padded[b, c, rows, cols]
    if flip:
        mirror = (torch.rand(B, generator=generator) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


def augment_batch(batch, config: DaunceConfig, generator: torch.Generator):
    """``batch`` with its first tensor (the inputs: a tensor batch, or element 0 of a tuple / list batch) augmented
    as ``config.augment`` says (``shift_flip``); the batch itself when ``augment`` is "none"."""
    if config.augment == "none":
        return batch
    shift = config.augment_shift if "shift" in config.augment else 0
    flip = "flip" in config.augment
    if torch.is_tensor(batch):
        return shift_flip(batch, shift, flip, generator)
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return type(batch)([shift_flip(batch[0], shift, flip, generator), *batch[1:]])
    raise ValueError(f"augment={config.augment!r} needs batches whose first element is an image tensor (B, C, H, W); "
                     f"got a batch of type {type(batch).__name__}")


class BatchOrder:
    """Copy k's minibatch order: ``n_steps`` index tensors over its subset, one shuffled pass (epoch) of
    the subset after another, cut into batches of ``batch_size`` (the last of an epoch may be smaller).

    The order is not stored: it is generated step by step from the generator state saved when the plan
    was drawn, so a plan holds O(m) numbers whatever the number of steps. Iterating twice gives the same
    batches."""

    def __init__(self, subset: torch.Tensor, batch_size: int, n_steps: int, state: torch.Tensor):
        self.subset, self.batch_size, self.n_steps, self.state = subset, batch_size, n_steps, state

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.subset) / self.batch_size)

    @property
    def n_epochs(self) -> int:
        """Shuffled passes over the subset the ``n_steps`` steps start (the last may be cut short)."""
        return math.ceil(self.n_steps / self.per_epoch)

    def __len__(self) -> int:
        return self.n_steps

    def __iter__(self):
        g = torch.Generator()
        g.set_state(self.state)
        m, bs, step = len(self.subset), self.batch_size, 0
        while step < self.n_steps:
            order = self.subset[torch.randperm(m, generator=g)]
            for s in range(0, m, bs):
                if step == self.n_steps:
                    return
                yield order[s : s + bs]
                step += 1

    def sizes_key(self) -> tuple:
        """Equal keys mean equal batch sizes at every step (the copies of one vmap block need that)."""
        return (len(self.subset), self.batch_size, self.n_steps)


@dataclass
class CopyPlan:
    """Every random draw of copy k: decided before training, shared by all trainers."""

    k: int
    subset: torch.Tensor  # (m,) indices into the training set
    eps: torch.Tensor  # (n,) perturbation of every training example (only the subset's are used)
    batches: BatchOrder  # the (B,) index tensors of every step, in training order
    eta: Optional[list] = field(default=None)  # one tensor per trainable parameter, or None


def uses_isotropic_noise(config: DaunceConfig) -> bool:
    """Whether copies of ``config`` carry the isotropic linear term ``-eta^T (theta - theta0)``."""
    return config.isotropic_noise and config.variant != "bootstrap" and config.damping > 0


def orthogonal_block_size(D: int, block: Optional[int]) -> int:
    """Copies per block of mutually orthogonal perturbation vectors in R^D: ``min(D, block or 5e7 / D)``."""
    return int(min(D, block or ORTHO_MAX_ENTRIES // D))


class OrthogonalDesign:
    """Row ``k % B`` of a random block of B mutually orthogonal vectors in R^D, each of norm sqrt(D) (so
    entries have unit variance, like a standard Gaussian vector). The block ``k // B`` is drawn from its
    own seed; the last block is kept, so consecutive copies cost one QR per block."""

    def __init__(self, seed: int, block: Optional[int] = None):
        self.seed, self.block = seed, block
        self._cached: Optional[tuple] = None

    def row(self, k: int, D: int) -> torch.Tensor:
        B = orthogonal_block_size(D, self.block)
        if B < 2:
            raise ValueError(f"perturbation='orthogonal' is too large for {D} perturbed values; use 'iid'")
        b = k // B
        if self._cached is None or self._cached[0] != (b, D, B):
            g = torch.Generator().manual_seed(copy_seed(self.seed, 10**9 + b))
            Z = torch.randn(D, B, generator=g, dtype=torch.float64)
            Q, R = torch.linalg.qr(Z)
            Q = Q * torch.sign(torch.diagonal(R))
            self._cached = ((b, D, B), (Q.T * math.sqrt(D)).contiguous())
        return self._cached[1][k % B]


def _draw_subset(g: torch.Generator, n: int, m: int) -> torch.Tensor:
    return torch.randperm(n, generator=g)[:m]


def copy_subset(config: DaunceConfig, k: int, n: int) -> torch.Tensor:
    """Copy k's subset of the ``n`` training examples, as ``make_plan`` draws it (its generator's first draw)."""
    g = torch.Generator().manual_seed(copy_seed(config.seed, k))
    return _draw_subset(g, n, max(1, round(config.subset_ratio * n)))


def make_plan(config: DaunceConfig, k: int, n: int, n_params: int,
              unflatten: Callable[[torch.Tensor], list], design: Optional[OrthogonalDesign] = None) -> CopyPlan:
    """Copy k's subset, perturbations, noise term and minibatch order (deterministic in (seed, k)).

    Args:
        config: the run's configuration.
        k: copy index.
        n: training-set size.
        n_params: number of trainable parameters d (the isotropic term's dimension).
        unflatten: maps a flat ``(d,)`` vector to one tensor per trainable parameter.
        design: the orthogonal design, for ``perturbation="orthogonal"``.
    """
    cfg = config
    if cfg.plan_auto_fields:
        raise ValueError(f"make_plan needs a resolved configuration; {cfg.plan_auto_fields} are 'auto' "
                         "(daunce.auto.resolve, or Daunce.resolved_config after fit)")
    g = torch.Generator().manual_seed(copy_seed(cfg.seed, k))
    m = max(1, round(cfg.subset_ratio * n))
    if cfg.variant == "bootstrap" and m == n:
        raise ValueError(f"variant='bootstrap' with subset_ratio={cfg.subset_ratio} on {n} training example(s) trains "
                         f"every copy on all of them (round(r n) = {m} = n): the copies differ by nothing the "
                         "attribution can use and every score is 0 (or minibatch noise): use subset_ratio < 1, "
                         "e.g. 0.5")
    subset = _draw_subset(g, n, m)
    batches = BatchOrder(subset, cfg.batch_size or m, cfg.n_steps(m), g.get_state())
    for _ in range(batches.n_epochs):  # the order's draws come before the perturbations' (as they always did)
        torch.randperm(m, generator=g)
    use_eta = uses_isotropic_noise(cfg)
    d = n_params if use_eta else 0
    eta_std = 0.0
    if use_eta:
        c = 1.0 if cfg.variant == "if" else 2.0
        eta_std = math.sqrt(cfg.sigma2 * cfg.damping / (c * cfg.gamma * m))
    if cfg.perturbation == "orthogonal":
        if design is None:
            raise ValueError("perturbation='orthogonal' needs an OrthogonalDesign")
        z = design.row(k, n + d)
        eps, eta_flat = math.sqrt(cfg.sigma2) * z[:n], eta_std * z[n:]
    else:
        eps = cfg.rho * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
        eta_flat = torch.randn(d, generator=g, dtype=torch.float64) * eta_std
    return CopyPlan(k, subset, eps, batches, unflatten(eta_flat) if use_eta else None)


__all__ = ["BatchOrder", "CopyPlan", "augment_batch", "augment_generator", "shift_flip",
           "OrthogonalDesign", "copy_seed", "copy_subset", "make_plan",
           "orthogonal_block_size", "uses_isotropic_noise", "ORTHO_MAX_ENTRIES"]
