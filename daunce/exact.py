"""Exact influence functions for small models (torch.func): the ground truth for the theory.

Everything here forms per-example gradients ``(n, d)`` and ``d x d`` curvature matrices (or, for the subset limit,
kernel matrices of per-example curvature factors), so it is meant for models with at most a few tens of thousands
of trainable parameters. The linear algebra is in float64 (gradients and Jacobians are taken in the model's own
dtype, then cast).

Conventions (``IF[i, q]``, positive = training example i helped query q):

* Hessian form  ``IF = grad_l_q^T (H + lambda I)^{-1} grad_l_i``,  H = mean Hessian of the loss;
* Fisher form   ``IF = grad_l_q^T (G + lambda I)^{-1} grad_l_i``,  G = mean of grad_l grad_l^T.

``daunce_limit`` gives the exact K -> infinity limit of the Daunce covariance in the linearised regime, for a given
configuration, of the copies that are actually run: at subset ratio 1 by the closed form with the full data's
curvature; at a ratio below 1 as the expectation over the copies' own subsets, each with its own curvature (an
average over sampled subsets, grown until its standard error is small). ``subsets="full"`` asks for the full-data
formula at any ratio (exact only at ratio 1 or where ``|S| (C - 1)`` is much larger than d; with the isotropic noise
term on it leaves out the subsets' null-space term). ``daunce_subset_limit`` is that subset average for a fixed number
of subsets; ``matched_damping`` says which damped influence function the limit is proportional to when the
isotropic noise term is on.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Iterator

import torch
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader

from .config import DaunceConfig
from .task import task_method


class _Flat:
    """The model's trainable parameters as one flat vector (float64)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.dtypes = [p.dtype for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.theta0 = torch.cat([p.detach().reshape(-1).double() for _, p in named])

    @property
    def d(self) -> int:
        return self.theta0.numel()

    def unflatten(self, v: torch.Tensor) -> dict:
        out, s = {}, 0
        for n, shape, dt, k in zip(self.names, self.shapes, self.dtypes, self.numels):
            out[n] = v[s : s + k].reshape(shape).to(dt)
            s += k
        return out


class _Functional:
    """Calls ``model`` with the given parameters; a stand-in for the model inside ``task.outputs``."""

    def __init__(self, model, params):
        self._model, self._params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self._model, self._params, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _losses_fn(flat: _Flat, task, fn_name: str = "loss"):
    outputs_fn = task_method(task, "outputs")
    fn = task_method(task, fn_name)

    def losses(theta, batch):
        model = _Functional(flat.model, flat.unflatten(theta))
        return fn(outputs_fn(model, batch), batch).double()

    return losses


def _loader(task, dataset, batch_size):
    if len(dataset) == 0:
        raise ValueError("empty dataset")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=task_method(task, "collate"))


def _per_example_jacobian(fn, theta: torch.Tensor, batch) -> torch.Tensor:
    """``d fn(theta, batch)[b] / d theta`` for every example b of the batch: ``(B, ..., d)``, where row b of
    ``fn``'s output depends on example b only.

    A batch that is a tuple or list of tensors sharing their first dimension is split into examples and the Jacobian
    vectorised over them (``vmap``): one reverse pass per output and example. Any other batch goes through reverse mode
    as a whole, B times that work (each output's pass runs over the whole batch)."""
    if (type(batch) in (tuple, list) and batch and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in batch)
            and len({t.shape[0] for t in batch}) == 1):
        kind = type(batch)

        def one(theta, *example):
            return fn(theta, kind(t.unsqueeze(0) for t in example))[0]

        return vmap(jacrev(one), in_dims=(None,) + (0,) * len(batch))(theta, *batch)
    return jacrev(fn)(theta, batch)


def per_example_grads(model, task, dataset, *, batch_size: int = 128, fn: str = "loss") -> torch.Tensor:
    """Gradients of the per-example ``task.loss`` (or another per-example function) at the model's
    parameters: ``(n, d)`` float64."""
    flat = _Flat(model)
    losses = _losses_fn(flat, task, fn)
    rows = [_per_example_jacobian(losses, flat.theta0, batch) for batch in _loader(task, dataset, batch_size)]
    return torch.cat(rows).detach()


def _hessian(f):
    """The Hessian of a scalar function by reverse over reverse mode (``torch.func.hessian`` uses forward
    mode over reverse, the same matrix, but makes torch script its forward-mode decompositions)."""
    return jacrev(jacrev(f))


def loss_hessian(model, task, dataset, *, batch_size: int = 256) -> torch.Tensor:
    """Mean Hessian of the per-example loss over ``dataset``: ``(d, d)`` float64."""
    flat = _Flat(model)
    losses = _losses_fn(flat, task)
    H = torch.zeros(flat.d, flat.d, dtype=torch.float64)
    n = 0
    for batch in _loader(task, dataset, batch_size):
        H += _hessian(lambda t: losses(t, batch).sum())(flat.theta0).detach()
        n += len(losses(flat.theta0, batch))
    return H / n


def _gauss_newton_blocks(model, task, dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch: the outputs' Jacobians ``J`` ``(B, P, d)`` and the loss's Hessians in the outputs ``(B, P, P)``
    (P outputs per example), the pieces of the generalised Gauss-Newton matrix."""
    flat = _Flat(model)
    outputs_fn, loss_fn = task_method(task, "outputs"), task_method(task, "loss")

    def out_of(theta, batch):
        return outputs_fn(_Functional(flat.model, flat.unflatten(theta)), batch).double()

    for batch in _loader(task, dataset, batch_size):
        out = out_of(flat.theta0, batch).detach()
        B = out.shape[0]
        J = _per_example_jacobian(out_of, flat.theta0, batch).detach().reshape(B, -1, flat.d)
        o = out.reshape(B, -1)
        Hf = _hessian(lambda v: loss_fn(v.reshape(out.shape).to(out.dtype), batch).double().sum())(o).detach()
        yield J, torch.diagonal(Hf, dim1=0, dim2=2).permute(2, 0, 1)  # per-example (B, P, P) blocks


def gauss_newton(model, task, dataset, *, batch_size: int = 128) -> torch.Tensor:
    """Mean generalised Gauss-Newton matrix ``J^T (d2 l / d out2) J`` over ``dataset``: ``(d, d)``.

    It is the curvature of the "if" objective when its linear term is taken through the outputs
    (the outputs' own curvature cancels); for a model linear in its parameters it equals the Hessian."""
    M, n = None, 0
    for J, Hf in _gauss_newton_blocks(model, task, dataset, batch_size):
        part = torch.einsum("bpd,bpq,bqe->de", J, Hf, J)
        M = part if M is None else M + part
        n += J.shape[0]
    return M / n


def _solve(M: torch.Tensor, damping: float, rhs: torch.Tensor) -> torch.Tensor:
    A = M + damping * torch.eye(M.shape[0], dtype=M.dtype)
    return torch.linalg.solve(A, rhs)


#: Condition number of the damped curvature above which ``influence`` warns that the solve is numerically singular.
SINGULAR_CONDITION = 1e12
#: Above this many parameters a damped curvature is not checked (its eigenvalues would cost more than the solve).
SINGULAR_CHECK_MAX_D = 2048


def _check_grads(Gi: torch.Tensor, Gq: torch.Tensor) -> None:
    """A ValueError unless the train and query gradients are ``(n, d)`` and ``(m, d)`` with the same d and finite."""
    if Gi.ndim != 2 or Gq.ndim != 2 or Gi.shape[1] != Gq.shape[1]:
        raise ValueError(f"train and query gradients must be (n, d) and (m, d) with the same d, got "
                         f"{tuple(Gi.shape)} and {tuple(Gq.shape)}")
    for name, t in (("train", Gi), ("query", Gq)):
        bad = ~torch.isfinite(t).all(1)
        if bool(bad.any()):
            raise ValueError(f"the {name} gradients of {int(bad.sum())} example(s) hold NaN or infinite values (the "
                             f"first: {name} example {int(bad.nonzero()[0, 0])})")


def _check_damping(damping) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
            or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    return float(damping)


def influence(model, task, train, query, *, form: str = "hessian", damping: float = 0.0,
              train_grads=None, query_grads=None, curvature=None) -> torch.Tensor:
    """Exact influence function ``(n_train, n_query)``, positive = helpful.

    Args:
        form: ``"hessian"`` (H, the mean loss Hessian) or ``"fisher"`` (G, the mean outer product of
            per-example loss gradients, the empirical Fisher).
        damping: lambda >= 0 added to the curvature's diagonal.
        train_grads, query_grads, curvature: precomputed ``(n, d)``, ``(m, d)``, ``(d, d)`` to reuse.

    Raises ValueError for a negative, NaN or infinite damping, shapes that do not agree on d, and a NaN or infinite
    gradient or curvature. Warns (``RuntimeWarning``) when the damped curvature is singular or numerically so
    (condition number above ``SINGULAR_CONDITION``, e.g. a Fisher of fewer examples than parameters at damping 0):
    its inverse then amplifies rounding and the values mean nothing; use damping > 0.
    """
    if form not in ("hessian", "fisher"):
        raise ValueError(f"form must be 'hessian' or 'fisher', got {form!r}")
    damping = _check_damping(damping)
    Gi = per_example_grads(model, task, train) if train_grads is None else train_grads
    Gq = per_example_grads(model, task, query) if query_grads is None else query_grads
    _check_grads(Gi, Gq)
    if curvature is None:
        curvature = loss_hessian(model, task, train) if form == "hessian" else Gi.T @ Gi / Gi.shape[0]
    d = Gi.shape[1]
    if tuple(curvature.shape) != (d, d):
        raise ValueError(f"curvature must be ({d}, {d}) for gradients of d = {d}, got {tuple(curvature.shape)}")
    if not bool(torch.isfinite(curvature).all()):
        raise ValueError("the curvature holds NaN or infinite values")
    # a damped curvature of many parameters is not checked: its eigenvalues would cost more than the solve
    if damping == 0 or d <= SINGULAR_CHECK_MAX_D:
        _warn_if_singular(curvature, damping, form, Gi.shape[0])
    return Gi @ _solve(curvature, damping, Gq.T)


def _warn_if_singular(curvature: torch.Tensor, damping: float, form: str, n: int) -> None:
    d = curvature.shape[0]
    A = curvature.double() + damping * torch.eye(d, dtype=torch.float64)
    ev = torch.linalg.eigvalsh((A + A.T) / 2)
    top, low = float(ev.abs().max()), float(ev.abs().min())
    if top == 0 or low <= top / SINGULAR_CONDITION:
        cond = "infinite" if low == 0 or top == 0 else f"{top / low:.3g}"
        warnings.warn(f"influence: the {form} curvature plus damping {damping:g} is singular or numerically singular "
                      f"(condition number {cond} > {SINGULAR_CONDITION:g}; d = {d} parameters, {n} "
                      "training examples): the solve amplifies rounding and the values are not meaningful; use "
                      "damping > 0", RuntimeWarning, stacklevel=3)


def matched_damping(config: DaunceConfig) -> float:
    """The damping of the influence function that Daunce with ``isotropic_noise`` converges to:
    ``lambda / (2 gamma)`` for the Fisher forms ("efim", "trak"), ``lambda / gamma`` for "if"."""
    c = 1.0 if config.variant == "if" else 2.0
    return config.damping / (c * config.gamma)


def daunce_limit(model, task, train, query, config: DaunceConfig, *, subsets: str | int = "auto",
                 rtol: float = 0.1, max_subsets: int = 256, train_grads=None, query_grads=None, curvature=None,
                 train_readout=None, return_info: bool = False):
    """The K -> infinity limit of the Daunce covariance of the copies that are run, linearised around theta0:
    ``(n, m)`` scores (and, with ``return_info``, a dict that says how they were computed).

    A copy that trains on subset S (``m = round(r n)`` examples, ``daunce.plans.copy_subset``) moves by
    ``Delta = A_S^{-1} (b + eta)`` with ``b = (1/m) sum_{i in S} eps_i grad_l_i`` (``Cov(b | S) = sigma^2/m G_S``,
    ``G_S`` the subset's mean ``grad_l grad_l^T``) and the isotropic noise term eta (``Cov(eta) = sigma^2 lambda /
    (c gamma m) I``, c = 2 for the Fisher forms, 1 for "if"; zero when ``isotropic_noise`` is off). ``A_S`` is the
    curvature of the subset's objective plus lambda I: ``"efim"``: 2 gamma G_S;  ``"trak"``: 2 gamma G_f,S (from the
    output function's gradients);  ``"if"``: GGN_S + (gamma - 1) H_S (the linear term taken through the outputs
    cancels the outputs' curvature: with gamma = 1 only the Gauss-Newton part is left; for a linear model GGN = H).
    The limit is ``E_S[grad_l_i^T A_S^{-1} (Cov(b | S) + Cov(eta)) A_S^{-1} grad_l_q]`` (b has mean zero given S, so
    the covariance over copies is the mean over subsets). What is computed depends on ``subsets``:

    * ``"auto"`` (default): at subset ratio 1 (every copy's subset is the whole training set) the closed form with
      the full data's curvature, exact; below ratio 1 the average over the copies' own subsets (those of copies
      0, 1, 2, ..., each with its own curvature; ``daunce_subset_limit``'s engine), started with 16 subsets and
      doubled, reusing the subsets already computed, until the relative standard error of the average
      ``||sem|| / ||mean||`` (Frobenius norms over all scores) is below ``rtol`` or ``max_subsets`` subsets were
      used (then a ``RuntimeWarning`` says so). The default ``rtol = 0.1`` leaves the average about 0.995 correlated
      with its expectation (1 / sqrt(1 + rtol^2)), below anything an LDS resolves; the relative standard error falls
      like 0.7-1.2 / sqrt(subsets) on notebook 02's models, so 0.1 takes about 64-128 subsets (0.05 would take
      350-500, beyond the cap).
    * ``"full"``: the full-data formula at any ratio, ``A = A_{all n}``, ``Cov(b) = sigma^2/m G``: the old
      behaviour, for comparison. Below ratio 1 it is not the copies' limit: it agrees with the subset average only
      where ``|S| (C - 1)`` (the rank of a subset's curvature, C outputs per example) is much larger than d; with the
      isotropic noise term on it leaves out the term that the subset curvature's null space adds, a gradient-dot
      term ``sigma^2 / (c gamma m lambda)`` on that null space.
    * an integer >= 2: the average over exactly that many subsets (at any ratio).

    With the noise term on, the full-data formula for "efim" is exactly ``sigma^2/(4 gamma^2 m)`` times the
    Fisher-form IF damped by ``matched_damping(config)``; for "if" ``sigma^2/(gamma^2 m)`` times the Hessian-form IF
    wherever G = H.

    Args:
        subsets: ``"auto"``, ``"full"`` or the number of subsets, as above.
        rtol, max_subsets: the stopping rule of ``"auto"`` below ratio 1.
        train_grads, query_grads: precomputed ``(n, d)``, ``(m, d)`` gradients to reuse (``per_example_grads``;
            the query side may be any per-query vector, e.g. the gradient of minus the margin).
        train_readout: ``(n, d)`` gradients of the signal the training side is read with, where it is not the loss
            whose gradients build the perturbation (``train_grads``): e.g. minus the margin (``per_example_grads(...,
            fn="signal")`` of a margin task), for copies whose training signals are recorded as margins. The limit
            is then ``E_S[r_i^T A_S^{-1} (Cov(b | S) + Cov(eta)) A_S^{-1} grad_l_q]`` with r_i its rows; default:
            ``train_grads`` (the loss on both the perturbation's and the read-out's side).
        curvature: only for the full-data formula of "if" (``subsets="full"``, or ``"auto"`` at ratio 1): the
            ``(d, d)`` matrix ``GGN + (gamma - 1) H`` of all training examples, without lambda, precomputed. The
            subset average does not use it (each subset's curvature is built from per-example Gauss-Newton factors),
            so there it is ignored.
        return_info: also return ``{"subsets": the number averaged (0 for the full-data formula), "rel_sem":
            ||sem|| / ||mean|| of that average (0.0 for the closed form), "formula": "subset-average" or
            "full-data"}``.

    Raises:
        ValueError: for the "bootstrap" variant (no closed-form linear limit); for "if" with gamma != 1 below ratio 1
            unless ``subsets="full"`` (its subset curvature would need per-subset Hessians; the full-data formula is
            available); for a ``subsets`` that is none of the above.

    Forms per-example curvature factors ``(n, outputs, d)`` and kernels of them (below ratio 1), or ``d x d``
    matrices: for small models only. Seconds per subset grow with ``(m * outputs)^3`` (or ``d^3``, whichever the
    cost model finds cheaper).
    """
    if config.variant == "bootstrap":
        raise ValueError("the bootstrap variant has no closed-form linear limit")
    if not (subsets in ("auto", "full") or (isinstance(subsets, int) and not isinstance(subsets, bool)
                                             and subsets >= 2)):
        raise ValueError(f"subsets must be 'auto', 'full' or an integer >= 2, got {subsets!r}")
    n = len(train) if train_grads is None else train_grads.shape[0]
    whole = max(1, round(config.subset_ratio * n)) == n
    if subsets == "full" or (subsets == "auto" and whole):
        out = _full_data_limit(model, task, train, query, config, train_grads, query_grads, curvature, train_readout)
        return (out, {"subsets": 0, "rel_sem": 0.0, "formula": "full-data"}) if return_info else out
    if subsets == "auto":
        if not (isinstance(max_subsets, int) and max_subsets >= 2):
            raise ValueError(f"max_subsets must be an integer >= 2, got {max_subsets!r}")
        if not rtol > 0:
            raise ValueError(f"rtol must be positive, got {rtol!r}")
        counts = [min(16, max_subsets)]
        while counts[-1] < max_subsets:
            counts.append(min(2 * counts[-1], max_subsets))
    else:
        counts = [subsets]
    _check_subset_limit(config)
    scores = _subset_scores(model, task, train, query, config, train_grads=train_grads, query_grads=query_grads,
                            expected=counts[0], train_readout=train_readout)
    for used, mean, sem in _averages(scores, counts):
        info = {"subsets": used, "rel_sem": _relative(sem, mean), "formula": "subset-average"}
        if subsets != "auto" or info["rel_sem"] < rtol:
            break
    else:
        warnings.warn(f"daunce_limit: the average over {info['subsets']} subsets (max_subsets) still has a relative "
                      f"standard error of {info['rel_sem']:.3g} > rtol = {rtol}", RuntimeWarning, stacklevel=2)
    return (mean, info) if return_info else mean


def _check_resolved(config: DaunceConfig) -> None:
    """A ValueError naming the fields the limit's formula reads as numbers (damping, rho) where they are "auto"."""
    unresolved = [f for f in ("damping", "rho") if getattr(config, f) == "auto"]
    if unresolved:
        raise ValueError(f"the limit needs a resolved configuration; {unresolved} are 'auto' "
                         "(pass Daunce.resolved_config after fit, or set them)")


def _full_data_limit(model, task, train, query, config: DaunceConfig, train_grads, query_grads, curvature,
                     train_readout=None):
    """``daunce_limit``'s closed form with the full data's curvature (``subsets="full"``)."""
    _check_resolved(config)
    Gi = (per_example_grads(model, task, train) if train_grads is None else train_grads).double()
    Gq = (per_example_grads(model, task, query) if query_grads is None else query_grads).double()
    _check_grads(Gi, Gq)
    Gr = _readout(train_readout, Gi)
    n, d = Gi.shape
    m = max(1, round(config.subset_ratio * n))
    s2, lam, gam = config.sigma2, config.damping, config.gamma
    G = Gi.T @ Gi / n
    eye = torch.eye(d, dtype=G.dtype)
    if config.variant == "efim":
        A, c = 2 * gam * G + lam * eye, 2.0
    elif config.variant == "trak":
        Gf = per_example_grads(model, task, train, fn="output_function")
        A, c = 2 * gam * (Gf.T @ Gf / n) + lam * eye, 2.0
    else:
        if curvature is None:
            curvature = gauss_newton(model, task, train)
            if gam != 1.0:
                curvature = curvature + (gam - 1.0) * loss_hessian(model, task, train)
        if tuple(curvature.shape) != (d, d) or not bool(torch.isfinite(curvature).all()):
            raise ValueError(f"curvature must be a finite ({d}, {d}) matrix for gradients of d = {d}, got shape "
                             f"{tuple(curvature.shape)}")
        A, c = curvature.double() + lam * eye, 1.0
    C = s2 / m * G
    if config.isotropic_noise:
        C = C + s2 * lam / (c * gam * m) * eye
    X = torch.linalg.solve(A, Gr.T)  # A^{-1} r_i (the read-out, by default g_i), (d, n)
    Y = torch.linalg.solve(A, Gq.T)
    return X.T @ C @ Y


def _readout(train_readout, Gi: torch.Tensor) -> torch.Tensor:
    """The training side's read-out gradients ``(n, d)`` (float64): ``train_readout``, or the loss gradients ``Gi``."""
    if train_readout is None:
        return Gi
    Gr = torch.as_tensor(train_readout).double()
    if tuple(Gr.shape) != tuple(Gi.shape) or not bool(torch.isfinite(Gr).all()):
        raise ValueError(f"train_readout must be a finite {tuple(Gi.shape)} matrix like the training gradients, got "
                         f"shape {tuple(Gr.shape)}")
    return Gr


def _check_subset_limit(config: DaunceConfig) -> None:
    """Raise where the subset limit cannot be computed."""
    if config.variant == "bootstrap":
        raise ValueError("the bootstrap variant has no closed-form linear limit")
    _check_resolved(config)
    if config.variant == "if" and config.gamma != 1.0:
        raise ValueError("the subset limit of the 'if' form needs gamma = 1 (its curvature is then the Gauss-Newton "
                         "matrix; with gamma != 1 it would need each subset's Hessian); pass subsets='full' to "
                         "daunce_limit for the full-data formula")


def _curvature_factors(model, task, train, config: DaunceConfig, Gi: torch.Tensor) -> torch.Tensor:
    """Per-example factors ``F`` ``(n, P, d)`` of the copies' curvature: a subset S's curvature (without lambda) is
    ``(1/|S|) sum_{i in S} F_i^T F_i``. "efim": ``sqrt(2 gamma) grad_l_i``; "trak": the same with the output
    function's gradient; "if" (gamma = 1): ``L_i^T J_i`` with ``L_i L_i^T`` the loss's Hessian in the outputs (the
    Gauss-Newton matrix of ``gauss_newton``), from its eigendecomposition without the directions whose eigenvalue is
    zero to rounding in every example (for softmax cross-entropy: C - 1 of the C outputs' directions)."""
    _check_subset_limit(config)
    gam = config.gamma
    if config.variant == "efim":
        return math.sqrt(2 * gam) * Gi[:, None, :]
    if config.variant == "trak":
        return math.sqrt(2 * gam) * per_example_grads(model, task, train, fn="output_function")[:, None, :]
    pieces, eigenvalues = [], []
    for J, Hf in _gauss_newton_blocks(model, task, train, 128):
        w, V = torch.linalg.eigh(Hf)  # ascending
        w, V = w.flip(-1).clamp_min(0), V.flip(-1)
        pieces.append(torch.einsum("bpd,bpq->bqd", J, V * w.sqrt()[:, None, :]))  # rows of L^T J, largest first
        eigenvalues.append(w)
    w = torch.cat(eigenvalues)
    rank = int((w > 1e-12 * float(w.max())).sum(1).max()) if float(w.max()) > 0 else 1
    return torch.cat([p[:, : max(1, rank)] for p in pieces])


def _gram(X: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``X @ X.T`` computed by block rows of its upper triangle (half the multiplications of one matmul)."""
    p = X.shape[0]
    out = torch.empty(p, p, dtype=X.dtype)
    for a in range(0, p, block):
        b = min(a + block, p)
        part = X[a:b] @ X[a:].T
        out[a:b, a:] = part
        out[b:, a:b] = part[:, b - a:].T
    return out


def _subset_scores(model, task, train, query, config: DaunceConfig, *, train_grads=None, query_grads=None,
                   expected: int = 16, route: str | None = None, train_readout=None) -> Iterator[torch.Tensor]:
    """The scores ``(n, m)`` of the subsets of copies 0, 1, 2, ... in turn (endless), each
    ``grad_l_i^T A_S^{-1} (sigma^2/m G_S + Cov(eta)) A_S^{-1} grad_l_q``: the engine of ``daunce_subset_limit`` and
    of ``daunce_limit`` below ratio 1.

    With ``A_S = Phi Phi^T + lambda I`` (``Phi = F_S^T / sqrt(m)``, d x mP) a subset costs either a d x d Cholesky
    factorisation (direct) or, by Woodbury, one of the mP x mP matrix ``M = lambda I + Phi^T Phi``: then every
    product with ``A_S^{-1}`` reduces to kernels ``F F^T``, ``F g`` and ``g g^T`` of the per-example factors F and
    gradients g, which do not depend on the subset and are computed once for all subsets (when ``expected`` subsets
    repay that) or per subset. The cheapest of the three by a count of multiplications is used, unless ``route``
    (``"direct"``, ``"kernel once"``, ``"kernel per subset"``) names one. ``train_readout`` replaces ``grad_l_i`` on
    the training side of the read-out only (``daunce_limit``)."""
    _check_subset_limit(config)
    from .plans import copy_subset

    Gi = (per_example_grads(model, task, train) if train_grads is None else train_grads).double()
    Gq = (per_example_grads(model, task, query) if query_grads is None else query_grads).double()
    _check_grads(Gi, Gq)
    n, d = Gi.shape
    nq = Gq.shape[0]
    m = max(1, round(config.subset_ratio * n))
    s2, lam, gam = config.sigma2, config.damping, config.gamma
    c = 1.0 if config.variant == "if" else 2.0
    iso = bool(config.isotropic_noise) and lam > 0
    F = _curvature_factors(model, task, train, config, Gi).double()  # (n, P, d)
    P = F.shape[1]
    k = m * P
    if m == n:
        expected = 1  # every subset is the whole training set: one is computed
    Fr = F.reshape(n * P, d)
    Gr = _readout(train_readout, Gi)
    # the vectors A_S^{-1} is applied to: the training read-out, the queries and, where the read-out is not the loss
    # gradients, those too (the subset's g_s, columns g0 + S); N of them
    R = torch.cat([Gr, Gq] + ([Gi] if train_readout is not None else []))
    g0, N = (n + nq if train_readout is not None else 0), R.shape[0]
    # multiplications: the kernel route's per-subset algebra, its kernels (once or per subset), the direct route
    algebra = k**3 / 3 + k * k * N + (2 * k * k * nq if iso else 0) + 2 * m * k * N + 2 * n * nq * k
    once = (n * P) ** 2 * d + 2 * n * P * d * N
    per_subset = 2 * k * k * d + 2 * k * d * N
    direct = 2 * d * d * k + d**3 / 3 + 2 * d * d * N + 2 * m * d * N + (2 * n * nq * d if iso else 0)
    cost = {"direct": expected * direct}
    if lam > 0:
        cost["kernel once"] = 2 * n * d * N + once + expected * algebra
        cost["kernel per subset"] = 2 * n * d * N + expected * (per_subset + algebra)
    if route is None:
        route = min(cost, key=cost.get)
    elif route not in cost:
        raise ValueError(f"route must be one of {sorted(cost)}, got {route!r}")

    def factorise(A):
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise ValueError("a subset's curvature is singular (damping 0 and fewer curvature directions than "
                             "parameters): use damping > 0")
        return L

    if route != "direct":
        GR = Gi @ R.T  # (n, N): g_i^T r_j and g_i^T g_q
        RQ = Gr @ Gq.T  # (n, nq): r_i^T g_q, the noise term's
        if route == "kernel once":
            K, KR = _gram(Fr).div_(m), (Fr @ R.T).div_(math.sqrt(m))  # Phi^T Phi, Phi^T [g_i, g_q] of all
            del F, Fr

    def score(S: torch.Tensor) -> torch.Tensor:
        S = S.sort().values  # (the order of S does not matter; sorted, its rows are gathered faster)
        idx = (S[:, None] * P + torch.arange(P)).reshape(-1)  # rows of Fr of the subset's factors
        if route == "direct":
            FS = Fr[idx]
            A = FS.T @ FS / m
            A.diagonal().add_(lam)
            Z = torch.cholesky_solve(R.T, factorise(A))  # A_S^{-1} [r_i, g_q, ...], (d, N)
            UZ = Gi[S] @ Z
            out = (s2 / m**2) * UZ[:, :n].T @ UZ[:, n:n + nq]
            if iso:
                out += (s2 * lam / (c * gam * m)) * Z[:, :n].T @ Z[:, n:n + nq]
            return out
        if route == "kernel once":
            M, B = K[idx[:, None], idx[None, :]], KR[idx]
        else:
            FS = Fr[idx]
            M, B = FS @ FS.T / m, FS @ R.T / math.sqrt(m)
        M.diagonal().add_(lam)  # M = lambda I + Phi^T Phi;  B = Phi^T [r_i, g_q, ...]
        L = factorise(M)
        V = torch.linalg.solve_triangular(L, B, upper=False)  # L^{-1} B
        # A_S^{-1} = (I - Phi M^{-1} Phi^T) / lambda:  g_s^T A_S^{-1} g = (g_s^T g - V_s^T V) / lambda  (s in S)
        UZ = (GR[S] - V[:, g0 + S].T @ V) / lam
        out = (s2 / m**2) * UZ[:, :n].T @ UZ[:, n:n + nq]
        if iso:  # r_i^T A_S^{-2} g_q = (r_i^T g_q - V_i^T (V_q + lambda L^{-1} L^{-T} V_q)) / lambda^2
            Vq = V[:, n:n + nq]
            W = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L.T, Vq, upper=True), upper=False)
            out += (s2 / (c * gam * m * lam)) * (RQ - V[:, :n].T @ (Vq + lam * W))
        return out

    if m == n:
        whole = score(copy_subset(config, 0, n))
        while True:
            yield whole
    for j in itertools.count():
        yield score(copy_subset(config, j, n))


def _averages(scores: Iterator[torch.Tensor], counts: list[int]):
    """``(count, mean, sem)`` of the first ``count`` scores for each of the increasing ``counts``, the scores already
    taken reused: the mean and the standard error of the mean, both ``(n, m)``."""
    total = total_sq = None
    used = 0
    for count in counts:
        while used < count:
            s = next(scores)
            total = s.clone() if total is None else total.add_(s)
            total_sq = s * s if total_sq is None else total_sq.add_(s * s)
            used += 1
        mean = total / used
        var = (total_sq / used - mean * mean).clamp_min(0) * used / (used - 1)
        yield used, mean, (var / used).sqrt()


def _relative(sem: torch.Tensor, mean: torch.Tensor) -> float:
    """``||sem|| / ||mean||`` (0 when both are 0)."""
    a, b = float(sem.norm()), float(mean.norm())
    return a / b if b > 0 else (0.0 if a == 0 else math.inf)


def daunce_subset_limit(model, task, train, query, config: DaunceConfig, *, n_subsets: int = 64,
                        train_grads=None, query_grads=None, return_sem: bool = False):
    """The K -> infinity limit of the Daunce covariance for copies that each train on their own subset, linearised
    around theta0, estimated from a fixed number of subsets: ``(n, m)``, the average over the subsets of copies
    ``0 .. n_subsets - 1`` (drawn as ``daunce.plans`` draws them) of

        ``grad_l_i^T A_S^{-1} (sigma^2/m G_S + Cov(eta)) A_S^{-1} grad_l_q``,

    with ``A_S`` the curvature of subset S's objective plus lambda I and ``G_S`` its examples' mean
    ``grad_l grad_l^T`` (``Cov(b | S)``; b has mean zero given S, so the covariance over copies is the mean over
    subsets). ``daunce_limit`` (default ``subsets="auto"``) returns this average with as many subsets as make it
    stable; its ``subsets="full"`` uses the full data's curvature instead; the two agree at r = 1 or where
    ``|S| (C - 1)`` is much larger than d. With the noise term on, the subset curvature's null space (rank at most
    ``|S|`` times the outputs per example) adds ``sigma^2 lambda / (c gamma m) A_S^{-2}``, i.e. a gradient-dot term
    ``sigma^2 / (c gamma m lambda)`` on that null space, which the full-data formula leaves out.

    ``return_sem``: also return the standard error of the mean over the subsets ``(n, m)``, to check that
    ``n_subsets`` was enough. Raises ValueError for "bootstrap" and for "if" with gamma != 1. Forms per-example
    factors ``(n, outputs, d)``: for small models only.
    """
    _check_subset_limit(config)
    if not isinstance(n_subsets, int) or isinstance(n_subsets, bool) or n_subsets < 2:
        raise ValueError(f"n_subsets must be an integer >= 2, got {n_subsets!r}")
    scores = _subset_scores(model, task, train, query, config, train_grads=train_grads, query_grads=query_grads,
                            expected=n_subsets)
    _, mean, sem = next(_averages(scores, [n_subsets]))
    return (mean, sem) if return_sem else mean


def _paired(a, b, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f"{what} needs two score matrices of the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)} (a transposed matrix?)")
    if a.numel() < 2:
        raise ValueError(f"{what} needs at least 2 scores, got {a.numel()}")
    for name, t in (("first", a), ("second", b)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: the {name} score matrix holds {int((~torch.isfinite(t)).sum())} NaN or "
                             "infinite value(s)")
    return a, b


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two score matrices of the same shape, over all their entries. Raises ValueError for
    different shapes (two matrices of the same size but transposed are not compared) or a NaN or infinite entry;
    a constant matrix has no correlation: NaN, with a ``RuntimeWarning``."""
    a, b = _paired(a, b, "pearson")
    a = a.reshape(-1) - a.mean()
    b = b.reshape(-1) - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    if den == 0:
        warnings.warn("pearson: a score matrix is constant; the correlation is undefined (NaN)", RuntimeWarning,
                      stacklevel=2)
        return float("nan")
    return float(a @ b) / den


def per_query_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between two ``(n, m)`` score matrices, per query column: ``(m,)``. Raises ValueError for
    matrices of different shapes or not 2-D, or a NaN or infinite entry; a column constant in either matrix has no
    correlation and gives 0, with a ``RuntimeWarning`` that counts them."""
    a, b = _paired(a, b, "per_query_pearson")
    if a.ndim != 2:
        raise ValueError(f"per_query_pearson needs (n, m) score matrices, got shape {tuple(a.shape)}")
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = a.norm(dim=0) * b.norm(dim=0)
    flat = int((den == 0).sum())
    if flat:
        warnings.warn(f"per_query_pearson: {flat} of {den.numel()} query columns are constant in a score matrix; "
                      "they count as 0", RuntimeWarning, stacklevel=2)
    return (a * b).sum(0) / den.clamp_min(1e-300)
