"""Exact influence functions for small models (torch.func): the ground truth for the theory.

Everything here forms per-example gradients ``(n, d)`` and ``d x d`` curvature matrices, so it is
meant for models with at most a few tens of thousands of trainable parameters.

Conventions (``IF[i, q]``, positive = training example i helped query q):

* Hessian form  ``IF = grad_l_q^T (H + lambda I)^{-1} grad_l_i``,  H = mean Hessian of the loss;
* Fisher form   ``IF = grad_l_q^T (G + lambda I)^{-1} grad_l_i``,  G = mean of grad_l grad_l^T.

``daunce_limit`` gives the exact K -> infinity limit of the Daunce covariance in the linearised
regime, for a given configuration, with the full data's curvature (exact at subset ratio 1);
``daunce_subset_limit`` averages over the copies' own subsets, each with its own curvature (exact at any
ratio); ``matched_damping`` says which damped influence function that limit is proportional to when the
isotropic noise term is on.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, jacrev
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


def per_example_grads(model, task, dataset, *, batch_size: int = 128, fn: str = "loss") -> torch.Tensor:
    """Gradients of the per-example ``task.loss`` (or another per-example function) at the model's
    parameters: ``(n, d)`` float64."""
    flat = _Flat(model)
    losses = _losses_fn(flat, task, fn)
    rows = [jacrev(losses)(flat.theta0, batch) for batch in _loader(task, dataset, batch_size)]
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


def gauss_newton(model, task, dataset, *, batch_size: int = 128) -> torch.Tensor:
    """Mean generalised Gauss-Newton matrix ``J^T (d2 l / d out2) J`` over ``dataset``: ``(d, d)``.

    It is the curvature of the "if" objective when its linear term is taken through the outputs
    (the outputs' own curvature cancels); for a model linear in its parameters it equals the Hessian."""
    flat = _Flat(model)
    outputs_fn, loss_fn = task_method(task, "outputs"), task_method(task, "loss")
    M = torch.zeros(flat.d, flat.d, dtype=torch.float64)
    n = 0
    for batch in _loader(task, dataset, batch_size):
        def out_of(theta):
            return outputs_fn(_Functional(flat.model, flat.unflatten(theta)), batch).double()

        out = out_of(flat.theta0).detach()
        J = jacrev(out_of)(flat.theta0).detach().reshape(out.shape[0], -1, flat.d)  # (B, P, d)
        o = out.reshape(out.shape[0], -1)
        Hf = _hessian(lambda v: loss_fn(v.reshape(out.shape).to(out.dtype), batch).double().sum())(o).detach()
        Hf = torch.diagonal(Hf, dim1=0, dim2=2).permute(2, 0, 1)  # per-example (B, P, P) blocks
        M += torch.einsum("bpd,bpq,bqe->de", J, Hf, J)
        n += out.shape[0]
    return M / n


def _solve(M: torch.Tensor, damping: float, rhs: torch.Tensor) -> torch.Tensor:
    A = M + damping * torch.eye(M.shape[0], dtype=M.dtype)
    return torch.linalg.solve(A, rhs)


def influence(model, task, train, query, *, form: str = "hessian", damping: float = 0.0,
              train_grads=None, query_grads=None, curvature=None) -> torch.Tensor:
    """Exact influence function ``(n_train, n_query)``, positive = helpful.

    Args:
        form: ``"hessian"`` (H, the mean loss Hessian) or ``"fisher"`` (G, the mean outer product of
            per-example loss gradients, the empirical Fisher).
        damping: lambda added to the curvature's diagonal.
        train_grads, query_grads, curvature: precomputed ``(n, d)``, ``(m, d)``, ``(d, d)`` to reuse.
    """
    if form not in ("hessian", "fisher"):
        raise ValueError(f"form must be 'hessian' or 'fisher', got {form!r}")
    Gi = per_example_grads(model, task, train) if train_grads is None else train_grads
    Gq = per_example_grads(model, task, query) if query_grads is None else query_grads
    if curvature is None:
        curvature = loss_hessian(model, task, train) if form == "hessian" else Gi.T @ Gi / Gi.shape[0]
    return Gi @ _solve(curvature, damping, Gq.T)


def matched_damping(config: DaunceConfig) -> float:
    """The damping of the influence function that Daunce with ``isotropic_noise`` converges to:
    ``lambda / (2 gamma)`` for the Fisher forms ("efim", "trak"), ``lambda / gamma`` for "if"."""
    c = 1.0 if config.variant == "if" else 2.0
    return config.damping / (c * config.gamma)


def daunce_limit(model, task, train, query, config: DaunceConfig, *,
                 train_grads=None, query_grads=None, curvature=None) -> torch.Tensor:
    """The K -> infinity limit of the Daunce covariance, linearised around theta0: ``(n, m)``.

    With ``b = (1/m) sum_i eps_i grad_l_i`` (``Cov(b) = sigma^2/m G``) and ``Delta = A^{-1} (b + eta)``:

    * ``"efim"``: A = 2 gamma G + lambda I;   ``"trak"``: A = 2 gamma G_f + lambda I (G_f from the
      output function);  ``"if"``: A = GGN + (gamma - 1) H + lambda I (the linear term taken through
      the outputs cancels the outputs' curvature: with gamma = 1 only the Gauss-Newton part is left;
      for a linear model GGN = H). ``curvature`` may pass that matrix (without lambda) precomputed;
    * Cov(eta) = sigma^2 lambda / (c gamma m) I with isotropic noise (c = 2 for Fisher forms, 1 for "if");
    * limit = ``grad_l_i^T A^{-1} (Cov(b) + Cov(eta)) A^{-1} grad_l_q``.

    With the noise term on, "efim" gives exactly ``sigma^2/(4 gamma^2 m)`` times the Fisher-form IF
    damped by ``matched_damping(config)``; "if" gives ``sigma^2/(gamma^2 m)`` times the Hessian-form IF
    wherever G = H.
    """
    if config.variant == "bootstrap":
        raise ValueError("the bootstrap variant has no closed-form linear limit")
    Gi = per_example_grads(model, task, train) if train_grads is None else train_grads
    Gq = per_example_grads(model, task, query) if query_grads is None else query_grads
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
        A, c = curvature + lam * eye, 1.0
    C = s2 / m * G
    if config.isotropic_noise:
        C = C + s2 * lam / (c * gam * m) * eye
    X = torch.linalg.solve(A, Gi.T)  # A^{-1} g_i, (d, n)
    Y = torch.linalg.solve(A, Gq.T)
    return X.T @ C @ Y


def _curvature_factors(model, task, train, config: DaunceConfig, Gi: torch.Tensor) -> torch.Tensor:
    """Per-example factors ``F`` ``(n, d, P)`` of the copies' curvature: a subset S's curvature (without lambda) is
    ``(1/|S|) sum_{i in S} F_i F_i^T``. "efim": ``sqrt(2 gamma) grad_l_i``; "trak": the same with the output
    function's gradient; "if" (gamma = 1): ``J_i^T L_i`` with ``L_i L_i^T`` the loss's Hessian in the outputs
    (the Gauss-Newton matrix of ``gauss_newton``)."""
    gam = config.gamma
    if config.variant == "efim":
        return math.sqrt(2 * gam) * Gi[:, :, None]
    if config.variant == "trak":
        return math.sqrt(2 * gam) * per_example_grads(model, task, train, fn="output_function")[:, :, None]
    if gam != 1.0:
        raise ValueError("the subset limit of the 'if' form needs gamma = 1 (its curvature is then the Gauss-Newton "
                         "matrix); use daunce_limit for the full-data formula")
    flat = _Flat(model)
    outputs_fn, loss_fn = task_method(task, "outputs"), task_method(task, "loss")
    rows = []
    for batch in _loader(task, train, 128):
        def out_of(theta):
            return outputs_fn(_Functional(flat.model, flat.unflatten(theta)), batch).double()

        out = out_of(flat.theta0).detach()
        B = out.shape[0]
        J = jacrev(out_of)(flat.theta0).detach().reshape(B, -1, flat.d)  # (B, P, d)
        o = out.reshape(B, -1)
        Hf = _hessian(lambda v: loss_fn(v.reshape(out.shape).to(out.dtype), batch).double().sum())(o).detach()
        Hf = torch.diagonal(Hf, dim1=0, dim2=2).permute(2, 0, 1)  # (B, P, P)
        w, V = torch.linalg.eigh(Hf)
        L = V * w.clamp_min(0).sqrt()[:, None, :]  # L L^T = Hf
        rows.append(torch.einsum("bpd,bpq->bdq", J, L))
    return torch.cat(rows)


def daunce_subset_limit(model, task, train, query, config: DaunceConfig, *, n_subsets: int = 64,
                        train_grads=None, query_grads=None, return_sem: bool = False):
    """The K -> infinity limit of the Daunce covariance for copies that each train on their own subset, linearised
    around theta0: ``(n, m)``, the average over the subsets of copies ``0 .. n_subsets - 1`` (drawn as
    ``daunce.plans`` draws them) of

        ``grad_l_i^T A_S^{-1} (sigma^2/m G_S + Cov(eta)) A_S^{-1} grad_l_q``,

    with ``A_S`` the curvature of subset S's objective plus lambda I and ``G_S`` its examples' mean
    ``grad_l grad_l^T`` (``Cov(b | S)``; b has mean zero given S, so the covariance over copies is the mean over
    subsets). ``daunce_limit`` uses the full data's curvature instead; the two agree at r = 1 or where
    ``|S| (C - 1)`` is much larger than d. With the noise term on, the subset curvature's null space (rank at most
    ``|S|`` times the outputs per example) adds ``sigma^2 lambda / (c gamma m) A_S^{-2}``, i.e. a gradient-dot term
    ``sigma^2 / (c gamma m lambda)`` on that null space, which the full-data formula leaves out.

    ``return_sem``: also return the standard error of the mean over the subsets ``(n, m)``, to check that
    ``n_subsets`` was enough. Forms per-example factors ``(n, d, outputs)``: for small models only.
    """
    if config.variant == "bootstrap":
        raise ValueError("the bootstrap variant has no closed-form linear limit")
    if not isinstance(n_subsets, int) or n_subsets < 2:
        raise ValueError(f"n_subsets must be an integer >= 2, got {n_subsets!r}")
    from .plans import copy_subset

    Gi = per_example_grads(model, task, train) if train_grads is None else train_grads.double()
    Gq = per_example_grads(model, task, query) if query_grads is None else query_grads.double()
    n, d = Gi.shape
    m = max(1, round(config.subset_ratio * n))
    s2, lam, gam = config.sigma2, config.damping, config.gamma
    c = 1.0 if config.variant == "if" else 2.0
    F = _curvature_factors(model, task, train, config, Gi)  # (n, d, P)
    total = torch.zeros(n, Gq.shape[0], dtype=torch.float64)
    total_sq = torch.zeros_like(total) if return_sem else None
    eye = torch.eye(d, dtype=torch.float64)
    for k in range(n_subsets):
        S = copy_subset(config, k, n)
        FS = F[S].permute(1, 0, 2).reshape(d, -1) / math.sqrt(m)  # A_S = FS FS^T + lambda I
        R = torch.cat([Gi.T, Gq.T], 1)  # (d, n + n_q)
        if FS.shape[1] < d and lam > 0:  # Woodbury: (FS FS^T + lam I)^{-1} = (I - FS (lam I + FS^T FS)^{-1} FS^T) / lam
            inner = lam * torch.eye(FS.shape[1], dtype=torch.float64) + FS.T @ FS
            Z = (R - FS @ torch.linalg.solve(inner, FS.T @ R)) / lam
        else:
            Z = torch.linalg.solve(FS @ FS.T + lam * eye, R)
        X, Y = Z[:, :n], Z[:, n:]
        U = Gi[S]  # (m, d): sigma^2/m G_S = sigma^2/m^2 U^T U
        score = (s2 / m**2) * (U @ X).T @ (U @ Y)
        if config.isotropic_noise and lam > 0:
            score = score + (s2 * lam / (c * gam * m)) * X.T @ Y
        total += score
        if return_sem:
            total_sq += score * score
    mean = total / n_subsets
    if not return_sem:
        return mean
    var = (total_sq / n_subsets - mean * mean).clamp_min(0) * n_subsets / (n_subsets - 1)
    return mean, (var / n_subsets).sqrt()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two score matrices, flattened."""
    a = a.reshape(-1).double()
    b = b.reshape(-1).double()
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / math.sqrt(float((a @ a) * (b @ b)) + 1e-300))


def per_query_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between two ``(n, m)`` score matrices, per query column: ``(m,)``."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-300)
