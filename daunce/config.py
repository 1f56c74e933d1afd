"""Configuration of a Daunce run: one validated dataclass.

Defaults come from two sources, noted field by field: the paper (Pan et al., arXiv 2505.23223)
and this repository's own measurements in ``notebooks/01_theory.ipynb`` and
``notebooks/02_vision_lds.ipynb``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Literal, Optional, Union

VARIANTS = ("if", "efim", "trak", "bootstrap")
SCORES = ("cov", "corr")
OPTIMIZERS = ("adam", "sgd")
PERTURBATIONS = ("iid", "orthogonal")
LR_SCHEDULES = ("constant", "cosine")
BATCHNORM_MODES = ("eval", "train")
AUGMENTATIONS = ("none", "shift", "flip", "shift-flip")
AUTO = "auto"
#: the fields that accept ``"auto"`` (resolved by ``daunce.auto.resolve`` from theta0 and the training data)
AUTO_FIELDS = ("rho", "damping", "isotropic_noise", "optimizer", "lr", "momentum")
OPTIMIZER_FIELDS = ("optimizer", "lr", "momentum")
#: Adam's learning rate where ``lr`` is "auto" and the copies use Adam (minibatches or fixed ``steps``): the
#: default before "auto".
ADAM_LR = 1e-2


@dataclass(frozen=True)
class DaunceConfig:
    """How the K perturbed copies are trained and how their signals become scores.

    Every field is checked on construction, for its type as well as its range (a bool is not a count, a string
    is not a number, ``seed`` is an integer), so a bad value is refused before a run writes anything to its work
    folder. numpy numbers are accepted and stored as Python ``int`` / ``float``.

    Attributes:
        variant: the perturbed objective (``daunce.objectives``; derived in ``notebooks/01_theory.ipynb``):
            ``"if"`` (Hessian form; this package's default), ``"efim"`` (Fisher form; the default of the authors' public
            code; notebook 02's tuning chooses between the two per model), ``"trak"`` (Fisher form with the task's
            output function inside the square), ``"bootstrap"`` (plain fine-tuning on the subset: the black-box
            variant). The paper states all four; ``docs/method.md`` compares the paper, its authors' code and this
            package.
        n_models: K, the number of perturbed copies (at least 2).
        subset_ratio: r, the fraction of the training set each copy trains on, in (0, 1].
            The reference code uses 0.3; in ``01_theory``'s sweep r = 0.3, 0.5 and 1 agreed about equally
            well with the exact influence function (r = 0.1 diverged with plain SGD at lr 1).
        rho: half-width of the perturbation, ``eps = rho * (2 * U(0, 1) - 1)``, or ``"auto"`` (the default:
            measured on theta0 so the copies stay in the linear regime, ``daunce.auto``). Small values keep the
            copies in the linear regime where the covariance means an influence function; rho = 1
            (a large perturbation) lost most of the agreement in our measurements. In that regime rho only
            scales the covariance: ``02_vision_lds`` measures it (``"auto"``) instead of tuning it.
        gamma: weight of the quadratic term. gamma = 1 makes theta0 a stationary point of the
            "if" objective on every subset.
        damping: lambda of the proximal term ``lambda/2 * ||theta - theta0||^2`` that keeps each copy
            near theta0 (damping *around theta0*, not weight decay towards zero), or ``"auto"`` (the
            default, ``daunce.auto``: the damping whose limit best predicts warm-started half-subset
            fine-tunes of theta0, a proxy ground truth, and large enough that K copies resolve the directions
            above it). ``02_vision_lds`` chooses it per model with ground truth (its metrics JSON,
            ``papermill_runs/02_vision_lds.json``, records each model's choice, ``daunce_chosen``).
        isotropic_noise: add the random linear term ``-eta^T (theta - theta0)`` that turns the damped
            estimator's limit into exactly the damped influence function (see ``daunce.exact``). It
            spreads the perturbation over d more dimensions, so at finite K it costs Monte-Carlo noise:
            ``02_vision_lds`` tunes it off or on per model with ground truth (its metrics JSON records the
            choice). ``"auto"`` (the default) turns it on only when
            the K copies can resolve its kernel and the proxy ground truth prefers it (``daunce.auto``).
        perturbation: ``"iid"`` draws every copy's perturbations independently, as the paper does
            (eps uniform, eta Gaussian). ``"orthogonal"`` keeps their mean and covariance but makes
            the K perturbation vectors (eps of all n examples and eta, jointly) orthogonal across
            copies, in blocks of up to n + d copies: a variance-reduced design with the same limit.
            At K = n + d the Monte-Carlo noise of the linear regime vanishes.
        optimizer, lr, epochs, batch_size: the inner optimisation of each copy. ``batch_size=None``
            means full batch. With minibatches a copy takes ``epochs`` passes over its subset. Full batch
            without ``steps`` trains each copy until its stopping test passes (``tol``) or ``max_steps``.
            ``steps`` (if set) fixes the number of steps of every copy (no stopping test). Each copy must reach the
            minimum of its objective for the covariance to mean an influence function: on an earlier version of
            ``02_vision_lds``'s logistic regression (measured once, not rerun), 50 full-batch Adam steps at lr 1e-2 left
            copies whose change agreed with the exact linear response at r = 0.36-0.80 (0.17-0.53 at rho = 0.03), 200
            steps at r = 0.99; with converged copies (and the damping and noise term chosen for them) the LDS at K = 512
            rose from 0.21 to 0.51. On the MLP 100 steps did as well as 200.
        tol: stopping test of full-batch copies (``steps=None``, ``batch_size=None``): a copy stops at the
            first step where the gradient norm of its whole perturbed objective (loss terms, linear term,
            proximal and isotropic terms) has fallen to ``tol`` times the norm at theta0 of its gradient without
            the isotropic noise term (the loss and linear terms: the data part of the perturbation, so a
            relative test that does not depend on rho and asks the same of a copy with the noise term on or off;
            measured against the whole start gradient, ``||eta||`` would set the scale with the noise term on:
            ``daunce.engines.vmap.start_norm``).
            Checked at every step, per copy (under vmap a converged copy's updates are masked).
            The default 0.05: in ``benchmarks/auto_settings.py`` a 5x tighter test (0.01) cost 1.1-2.0x the
            seconds and raised the LDS by at most 0.006 on any pair (on the breast-cancer pairs it lowered it by
            0.04-0.07; the rule's proxy fine-tunes stop on the same test).
        max_steps: the step cap of the stopping test (default 400, twice the former fixed 200 full-batch steps;
            in ``benchmarks/auto_settings.py`` the "auto" heavy-ball copies passed the test after 11-85 steps on
            average per pair, Adam copies at lr 1e-2 had taken 43-211).
            A copy that reaches it without passing the test
            is counted as not converged: ``Daunce.n_unconverged``, a warning per fit, its record
            (``"converged": False``) and the work folder's manifest (``"unconverged"``).
        momentum: SGD momentum (``torch.optim.SGD``'s, dampening 0); only with ``optimizer="sgd"``.
            The authors' recipe uses 0.9.
            ``optimizer``, ``lr`` and ``momentum`` default to ``"auto"`` (``daunce.auto``): full-batch copies with
            the stopping test get heavy-ball SGD with the step and momentum that are optimal for a quadratic whose
            curvature lies in ``[lambda, 6 c_max + lambda]`` (c_max: the top curvature the rule measures), so
            a copy's displacement scales with its perturbation as the linear theory needs; Adam's steps do not
            (they have the size lr whatever the gradient). The measurement behind the choice, made once when the
            rule was written (an earlier version of ``02_vision_lds``'s MLP, K = 64, damping 0.128; not rerun with
            the notebook): Adam at lr 1e-2 left 23 of 64 copies at the cap after 61 s and an LDS of 0.18, heavy-ball
            copies (with a curvature bound of 1.5 c_max) all converged in 4 s, LDS 0.36. Minibatch copies, and
            copies with fixed ``steps``, get Adam at lr 1e-2 (the former defaults); SGD with a given ``lr`` gets
            momentum 0 unless one is given.
        lr_schedule: ``"constant"`` or ``"cosine"`` (the learning rate falls as ``lr * (1 + cos(pi t / T)) / 2``
            over the copy's T steps, the cap ``max_steps`` when the stopping test is on: the authors' recipe).
        score: ``"cov"`` (the paper) or ``"corr"`` (Pearson correlation across the copies).
        seed: every random draw of copy k comes from a generator seeded by (seed, k).
        train_mode: run the model in ``train()`` mode while fine-tuning the copies (dropout on).
            Off by default: the linearisation assumes a deterministic model. BatchNorm layers with running statistics
            follow ``batchnorm``, not this field: ``Daunce`` refuses ``train_mode=True`` with ``batchnorm="eval"``
            on a model that has them (pass ``batchnorm="train"`` too for the authors' ``net.train()``).
        batchnorm: how the copies' BatchNorm layers with running statistics run (models without them: no effect).
            ``"eval"`` (the default, this package's since BatchNorm models were first supported): every copy
            normalises with theta0's running statistics, its scale and shift trained like every other weight; the
            copies are then deterministic functions of their weights, as the linear theory assumes. ``"train"``
            (the authors' public code, ``net.train()`` for the copy and the frozen base: ``docs/method.md``): each
            copy starts from theta0's weights and a private copy of theta0's running statistics, trains with batch
            statistics (updating its own running statistics; theta0's are never modified), and records its signals
            in eval mode with its own statistics; those statistics are stored with the copy (signals computed
            later from stored copies use them). theta0's outputs, loss and loss gradient in the objective are then
            computed on each training batch in the copy's mode (batch statistics), not cached once in eval mode,
            so theta0 stays a stationary point of the "if" objective. ``Daunce.copies_batchnorm`` says which mode
            the copies ran in.
        augment: random augmentation of each training batch's inputs while the copies train (the authors train
            their copies with random crops and horizontal flips; this package's default is ``"none"``).
            ``"shift"``: each image moved by its own random offset in ``[-augment_shift, augment_shift]`` pixels
            along each axis, zero-filled (a random crop with ``augment_shift`` pixels of zero padding);
            ``"flip"``: each image mirrored left-right with probability 1/2; ``"shift-flip"``: both (the authors'
            ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``). Applied to the first tensor of a batch,
            which must hold images ``(B, C, H, W)``. Copy k's draws come from its own generator (seeded by
            ``(seed, k)``: ``daunce.plans.augment_generator``), so a run is reproducible and the copies see
            different shifts. Signals are recorded without augmentation. theta0's values in the objective are
            computed on the same augmented batch (as with ``batchnorm="train"``).
        augment_shift: the largest shift in pixels of ``augment`` ``"shift"`` / ``"shift-flip"`` (default 4,
            the authors' crop padding).
    """

    variant: Literal["if", "efim", "trak", "bootstrap"] = "if"
    n_models: int = 64
    subset_ratio: float = 0.5
    rho: Union[float, Literal["auto"]] = AUTO
    gamma: float = 1.0
    damping: Union[float, Literal["auto"]] = AUTO
    isotropic_noise: Union[bool, Literal["auto"]] = AUTO
    perturbation: Literal["iid", "orthogonal"] = "iid"
    optimizer: Literal["adam", "sgd", "auto"] = AUTO
    lr: Union[float, Literal["auto"]] = AUTO
    epochs: int = 1
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    score: Literal["cov", "corr"] = "cov"
    seed: int = 0
    train_mode: bool = False
    tol: float = 0.05
    max_steps: int = 400
    momentum: Union[float, Literal["auto"]] = AUTO
    lr_schedule: Literal["constant", "cosine"] = "constant"
    batchnorm: Literal["eval", "train"] = "eval"
    augment: Literal["none", "shift", "flip", "shift-flip"] = "none"
    augment_shift: int = 4

    def __post_init__(self):
        # every field is checked for its type as well as its range before anything uses it: a bool is not a count
        # (True == 1), a string is not a ratio, a float is not a seed. numpy scalars are accepted and stored as
        # Python numbers, so the configuration's JSON (a work folder's manifest) is the same either way.
        def bad(msg):
            raise ValueError(f"DaunceConfig: {msg}")

        def is_int(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def is_real(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        def normalise(name):
            v = getattr(self, name)
            if is_int(v) and type(v) is not int:
                object.__setattr__(self, name, int(v))
            elif is_real(v) and not is_int(v) and type(v) is not float:
                object.__setattr__(self, name, float(v))

        def one_of(name, allowed):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in allowed:
                bad(f"{name} must be one of {allowed}, got {v!r}")

        def integer(name, low, none_ok=False, what=""):
            v = getattr(self, name)
            if v is None and none_ok:
                return
            if not is_int(v) or v < low:
                bad(f"{name}{what} must be {'None or ' if none_ok else ''}an integer >= {low}, got {v!r}"
                    + (" (a bool is not a count)" if isinstance(v, bool) else ""))

        for f in dataclasses.fields(self):
            normalise(f.name)
        one_of("variant", VARIANTS)
        integer("n_models", 2, what=" (K, to form a covariance)")
        if not is_real(self.subset_ratio) or not 0.0 < self.subset_ratio <= 1.0:
            bad(f"subset_ratio must be a number in (0, 1], got {self.subset_ratio!r}")
        for name in AUTO_FIELDS:
            if name == "optimizer":  # a string either way: checked below
                continue
            v = getattr(self, name)
            if isinstance(v, str) and v != AUTO:
                bad(f"{name} must be a number or 'auto', got the string {v!r}")
        for name in ("rho", "gamma", "lr"):
            v = getattr(self, name)
            if name in AUTO_FIELDS and v == AUTO:
                continue
            if not (is_real(v) and v > 0):
                bad(f"{name} must be a positive finite number{' or auto' if name in AUTO_FIELDS else ''}, got {v!r}")
        if self.damping != AUTO and not (is_real(self.damping) and self.damping >= 0):
            bad(f"damping must be a number >= 0 or 'auto', got {self.damping!r}")
        if self.isotropic_noise != AUTO and not isinstance(self.isotropic_noise, bool):
            bad(f"isotropic_noise must be True, False or 'auto', got {self.isotropic_noise!r}")
        one_of("perturbation", PERTURBATIONS)
        one_of("optimizer", OPTIMIZERS + (AUTO,))
        integer("epochs", 1)
        integer("steps", 1, none_ok=True)
        integer("batch_size", 1, none_ok=True, what=" (None: full batch)")
        one_of("score", SCORES)
        if not is_int(self.seed):
            bad(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.train_mode, bool):
            bad(f"train_mode must be True or False, got {self.train_mode!r}")
        if not (is_real(self.tol) and 0 < self.tol < 1):
            bad(f"tol must be a number in (0, 1) (relative gradient norm), got {self.tol!r}")
        integer("max_steps", 1)
        if self.momentum != AUTO and not (is_real(self.momentum) and 0 <= self.momentum < 1):
            bad(f"momentum must be a number in [0, 1) or 'auto', got {self.momentum!r}")
        if self.momentum != AUTO and self.momentum and self.optimizer == "adam":
            bad(f"momentum applies to optimizer='sgd' only (Adam has its own moments), got {self.optimizer!r}")
        one_of("lr_schedule", LR_SCHEDULES)
        one_of("batchnorm", BATCHNORM_MODES)
        one_of("augment", AUGMENTATIONS)
        integer("augment_shift", 1, what=" (pixels)")

    @property
    def stops_early(self) -> bool:
        """Whether copies train until the stopping test passes (full batch, no fixed ``steps``)."""
        return self.steps is None and self.batch_size is None

    @property
    def live_base(self) -> bool:
        """Whether theta0's outputs, loss and loss gradient in the objective are computed on each training batch
        (as the copy sees it: batch statistics with ``batchnorm="train"``, the augmented inputs with ``augment``)
        rather than cached once for every training example (``daunce.engines.sequential.base_cache``)."""
        return self.variant != "bootstrap" and (self.batchnorm == "train" or self.augment != "none")

    @property
    def auto_fields(self) -> tuple:
        """The ``"auto"`` fields whose values come from theta0 and the training data (resolved before training;
        the optimiser's fields that follow from the configuration alone are not among them: ``static``)."""
        cfg = self.static()
        return tuple(f for f in AUTO_FIELDS if getattr(cfg, f) == AUTO)

    def static(self) -> "DaunceConfig":
        """This configuration with the ``"auto"`` optimiser fields that follow from the configuration alone set:
        ``optimizer`` (SGD for full-batch copies with the stopping test or with a momentum given, else Adam);
        with Adam, ``lr`` ``ADAM_LR`` and ``momentum`` 0; with SGD and a given ``lr``, ``momentum`` 0. What is
        left "auto" (SGD's heavy-ball ``lr`` and ``momentum``) needs the curvature (``daunce.auto``)."""
        out = {}
        opt = self.optimizer
        if opt == AUTO:
            opt = "sgd" if self.stops_early or (self.momentum != AUTO and self.momentum > 0) else "adam"
            out["optimizer"] = opt
        if opt == "adam":
            if self.lr == AUTO:
                out["lr"] = ADAM_LR
            if self.momentum == AUTO:
                out["momentum"] = 0.0
        elif self.lr != AUTO and self.momentum == AUTO:
            out["momentum"] = 0.0
        return dataclasses.replace(self, **out) if out else self

    @property
    def plan_auto_fields(self) -> tuple:
        """The "auto" fields a copy's plan (subset, perturbations, noise term, minibatch order) depends on;
        the optimiser's fields are not among them."""
        return tuple(f for f in self.auto_fields if f not in OPTIMIZER_FIELDS)

    def n_steps(self, m: int) -> int:
        """Optimiser steps of one copy that trains on ``m`` examples (with the stopping test: the cap)."""
        if self.steps is not None:
            return self.steps
        if self.batch_size is None:
            return self.max_steps
        return self.epochs * math.ceil(m / self.batch_size)

    def lr_at(self, step: int, n_steps: int) -> float:
        """The learning rate of step ``step`` (0-based) of a copy with ``n_steps`` steps."""
        if self.lr_schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / n_steps))

    @property
    def sigma2(self) -> float:
        """Variance of the perturbation eps ~ U(-rho, rho): rho^2 / 3."""
        if self.rho == AUTO:
            raise ValueError("rho is 'auto': resolve the configuration first (Daunce.resolved_config)")
        return self.rho**2 / 3.0

    def replace(self, **changes) -> "DaunceConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_key(self) -> str:
        """The fields that decide what a trained copy is (everything but the scoring rule and K).

        Fields that have no effect are left out, so a configuration keeps the key (and the work folders)
        it had before they existed: ``momentum`` at 0, ``lr_schedule`` at "constant", ``batchnorm`` at "eval",
        ``augment`` at "none" (and ``augment_shift`` unless ``augment`` shifts), and ``tol`` / ``max_steps``
        unless the stopping test is on (full batch without ``steps``). "auto" optimiser fields that follow from
        the configuration alone enter with their values (``static``)."""
        cfg = self.static()
        d = cfg.to_dict()
        d.pop("score")
        d.pop("n_models")
        if not cfg.momentum:
            d.pop("momentum")
        if self.lr_schedule == "constant":
            d.pop("lr_schedule")
        if self.batchnorm == "eval":
            d.pop("batchnorm")
        if self.augment == "none":
            d.pop("augment")
        if "shift" not in self.augment:
            d.pop("augment_shift")
        if not self.stops_early:
            d.pop("tol")
            d.pop("max_steps")
        return json.dumps(d, sort_keys=True)
