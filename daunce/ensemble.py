"""``DaunceEnsemble``: Daunce over M independently trained models (M values of theta0).

Usage::

    ens = DaunceEnsemble([model_a, model_b, model_c], ClassificationTask(), DaunceConfig(n_models=96),
                         workdir="runs/lr_ensemble")
    ens.fit(train_set)
    scores = ens.attribute(train_set, query_set)    # (n_train, n_query), positive = helpful

The K = ``config.n_models`` copies are spread evenly over the M models: member m is a ``Daunce`` on
``models[m]`` with ``n_models = K / M`` and ``seed = config.seed + m`` (``member_config``), so its copies are
exactly those of a single-model ``Daunce(models[m], task, config.replace(n_models=K // M, seed=config.seed + m))``;
member 0 has the copies of the single-model run with the ensemble's own seed. K must be a multiple of M with at
least two copies per model (a covariance needs two), else the ensemble is refused: an uneven split would weigh the
members' estimates by different noise without saying so.

**The combination rule is the mean of the members' score matrices.** Each member's covariance across its K / M
copies estimates the influence at its own theta0 (that trained model's curvature and gradients); the ensemble's
estimate is their mean, the way TRAK averages the scores of its independently trained models. Pooling all K
copies' signals into one covariance instead would add the spread of the signals between the theta0s themselves
(e.g. a training example whose loss is high under one trained model and low under another), which is a difference
between trained models and not the copies' response to their perturbations.

With a ``workdir`` each member keeps its copies in ``workdir/member_<m>`` (``member_workdir``), bound there to its
own theta0 by ``Daunce``'s manifest: the same folder with the models in another order is refused by the first member
whose folder holds another model's copies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from .config import DaunceConfig
from .method import Daunce, SignalFn


def member_seed(seed: int, m: int) -> int:
    """The seed of member ``m``'s copies in an ensemble whose configuration has ``seed``: ``seed + m``."""
    return int(seed) + int(m)


def member_config(config: DaunceConfig, n_members: int, m: int) -> DaunceConfig:
    """Member ``m``'s configuration: ``config`` with ``n_models = config.n_models // n_members`` and
    ``seed = member_seed(config.seed, m)``. Refuses a K that is not a multiple of ``n_members`` or leaves fewer than
    two copies per model."""
    K = config.n_models
    if K % n_members:
        lower = n_members * max(2, K // n_members)
        raise ValueError(f"n_models = {K} copies cannot be spread evenly over {n_members} models: an ensemble trains "
                         f"n_models / {n_members} copies on each model, so n_models must be a multiple of {n_members} "
                         f"(e.g. {lower} or {lower + n_members})")
    if K // n_members < 2:
        raise ValueError(f"n_models = {K} copies over {n_members} models leaves {K // n_members} per model: each model "
                         f"needs at least 2 copies (a covariance), so n_models must be at least {2 * n_members}")
    if not 0 <= m < n_members:
        raise ValueError(f"member index {m} is outside 0..{n_members - 1}")
    return config.replace(n_models=K // n_members, seed=member_seed(config.seed, m))


def member_workdir(workdir: Optional[str | os.PathLike], m: int) -> Optional[Path]:
    """Member ``m``'s folder inside an ensemble's ``workdir`` (``workdir/member_<m>``), or None without one."""
    return None if workdir is None else Path(workdir) / f"member_{m}"


def _layout(model: torch.nn.Module) -> list:
    """What an architecture is, one readable line per item: every module's name and class, then every parameter's
    name, shape, dtype and trainability, then every buffer's name, shape and dtype (``store.model_fingerprint``
    hashes the same items)."""
    out = [f"module '{name}' is a {type(mod).__name__}" for name, mod in model.named_modules()]
    out += [f"parameter '{n}' has shape {tuple(p.shape)}, {p.dtype}, {'trainable' if p.requires_grad else 'frozen'}"
            for n, p in model.named_parameters()]
    out += [f"buffer '{n}' has shape {tuple(b.shape)}, {b.dtype}" for n, b in model.named_buffers()]
    return out


def architecture_difference(a: torch.nn.Module, b: torch.nn.Module) -> Optional[str]:
    """The first difference between the architectures of ``a`` and ``b`` as ``"in <a>: ...; in <b>: ..."`` (a
    module's class, a parameter's or buffer's name, shape, dtype or trainability), or None when they are the same."""
    la, lb = _layout(a), _layout(b)
    for x, y in zip(la, lb):
        if x != y:
            return f"{x} in the first, {y} in the second"
    if len(la) != len(lb):
        longer, extra = ("first", la[len(lb)]) if len(la) > len(lb) else ("second", lb[len(la)])
        return f"only the {longer} has: {extra}"
    return None


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models of the same architecture hold equal parameters and buffers (compared on the CPU)."""
    pairs = zip(list(a.parameters()) + list(a.buffers()), list(b.parameters()) + list(b.buffers()))
    return all(torch.equal(x.detach().cpu(), y.detach().cpu()) for x, y in pairs)


def check_models(models: Sequence[torch.nn.Module]) -> list:
    """The ensemble's models as a list, or an error naming the problem: a single module instead of a list, an empty
    list, an entry that is not a ``torch.nn.Module``, a model whose architecture differs from ``models[0]``'s (the
    first difference is named), or one theta0 given twice (the same object, or equal weights)."""
    if isinstance(models, torch.nn.Module):
        raise TypeError(f"models must be a list of trained models (torch.nn.Module), got one {type(models).__name__}: "
                        "for one model use Daunce, or pass [model]")
    if isinstance(models, (str, bytes)) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a list of trained models (torch.nn.Module), got {type(models).__name__}")
    models = list(models)
    if not models:
        raise ValueError("models is empty: an ensemble needs at least one trained model")
    for i, model in enumerate(models):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"models[{i}] must be a torch.nn.Module, got {type(model).__name__}")
    for i, model in enumerate(models[1:], 1):
        diff = architecture_difference(models[0], model)
        if diff is not None:
            raise ValueError(f"models[{i}] has another architecture than models[0] (an ensemble's members are "
                             f"trained copies of one network): {diff}")
    for i in range(len(models)):
        for j in range(i):
            if models[i] is models[j]:
                raise ValueError(f"models[{j}] and models[{i}] are the same object: an ensemble needs independently "
                                 "trained models (for more copies of one model, raise n_models of one Daunce)")
            if _same_weights(models[j], models[i]):
                raise ValueError(f"models[{j}] and models[{i}] have the same weights: an ensemble needs independently "
                                 "trained models (for more copies of one model, raise n_models of one Daunce)")
    return models


class DaunceEnsemble:
    """Daunce over M trained models: K / M copies on each, scores combined by their mean.

    Args:
        models: the M trained target models (theta0s; never modified), one architecture (``check_models``).
        task: a ``daunce.Task``, shared by every member.
        config: a ``DaunceConfig``; ``n_models`` is the total K over all members (a multiple of M, at least 2M).
            Member m trains with ``member_config(config, M, m)``: ``n_models = K / M``, ``seed = config.seed + m``.
            "auto" fields are resolved by each member on its own theta0.
        workdir: folder of the members' folders (``workdir/member_<m>``, each bound to ``models[m]``); ``None``
            keeps everything in memory.
        **options: keyword options of ``Daunce`` (``eval_batch_size``, ``progress``, ``trainer``, ``executor``, ...),
            the same for every member.

    ``members`` holds the M ``Daunce`` objects: member m's scores are those of the single-model run on ``models[m]``
    with its configuration, and ``attribute`` is the mean of the members' score matrices (the module's docstring
    says why the mean).
    """

    def __init__(self, models: Sequence[torch.nn.Module], task, config: Optional[DaunceConfig] = None,
                 workdir: Optional[str | os.PathLike] = None, **options):
        self.models = check_models(models)
        self.task = task
        self.config = config or DaunceConfig()
        M = len(self.models)
        configs = [member_config(self.config, M, m) for m in range(M)]
        self.workdir = Path(workdir) if workdir is not None else None
        self.members = [Daunce(model, task, cfg, member_workdir(self.workdir, m), **options)
                        for m, (model, cfg) in enumerate(zip(self.models, configs))]

    @property
    def n_members(self) -> int:
        """M, the number of trained models."""
        return len(self.members)

    @property
    def copies_per_model(self) -> int:
        """K / M."""
        return self.config.n_models // self.n_members

    @property
    def trainer_used(self) -> list:
        """Each member's trainer (``Daunce.trainer_used``; None before ``fit``)."""
        return [d.trainer_used for d in self.members]

    @property
    def n_unconverged(self) -> int:
        """Copies of all members that reached ``max_steps`` without passing the stopping test."""
        return sum(d.n_unconverged for d in self.members)

    def resolve(self, train_dataset: Dataset) -> list:
        """Each member's resolved configuration (``Daunce.resolve`` on its own theta0)."""
        return [d.resolve(train_dataset) for d in self.members]

    def fit(self, train_dataset: Dataset, query_dataset: Optional[Dataset] = None) -> "DaunceEnsemble":
        """``Daunce.fit`` of every member in turn (finished copies in their folders are read back, not trained)."""
        for d in self.members:
            d.fit(train_dataset, query_dataset)
        return self

    def training_seconds(self, n_models: Optional[int] = None) -> float:
        """Seconds the first ``n_models`` copies of the ensemble (default: K; a multiple of M: the first
        ``n_models / M`` of each member) took to train and record their signals."""
        k = self.config.n_models if n_models is None else n_models
        if k % self.n_members:
            raise ValueError(f"n_models = {k} is not a multiple of the {self.n_members} models")
        return float(sum(d.training_seconds(k // self.n_members) for d in self.members))

    def signals(self, dataset: Dataset, signal: Optional[SignalFn] = None) -> torch.Tensor:
        """Signal tensor ``(M, K / M, n)``: member m's copies' per-example signals on ``dataset`` (higher = worse;
        ``Daunce.signals``)."""
        return torch.stack([d.signals(dataset, signal) for d in self.members])

    def base_signals(self, dataset: Dataset, signal: Optional[SignalFn] = None) -> torch.Tensor:
        """Signals ``(M, n)`` of each theta0 itself on ``dataset``."""
        return torch.stack([d.base_signals(dataset, signal) for d in self.members])

    def attribute(self, train_dataset: Dataset, query_dataset: Dataset) -> torch.Tensor:
        """Scores ``(n_train, n_query)`` (float32): the mean over the M members of their ``Daunce.attribute``
        (covariance or correlation of training and query signals across each member's K / M copies). Positive =
        the training example helped the query."""
        total = None
        for d in self.members:
            S = d.attribute(train_dataset, query_dataset).double()
            total = S if total is None else total + S
        return (total / self.n_members).float()


__all__ = ["DaunceEnsemble", "member_config", "member_seed", "member_workdir", "check_models",
           "architecture_difference"]
