"""Diagnostics of one perturbed copy's training, for the figures of the notebooks.

``gradient_norms`` retrains copy k of a fitted ``Daunce`` from theta0 with the same random draws
(``Daunce.plan``), objective (``daunce.objectives``) and optimiser, and records at every step the
gradient norm of each part of the copy's objective (the paper's Figure 3):

* the **risk term**: ``gamma (l_i(theta) - l_i(theta0))`` for ``"if"``, its square for ``"efim"``, the
  squared output-function change for ``"trak"``, the plain loss for ``"bootstrap"`` (mean over the batch);
* the **perturbation term**: the linear term, ``-(1 + eps_i) lin_i`` for ``"if"``, ``-eps_i lin_i`` for
  the Fisher forms (none for ``"bootstrap"``);
* the **damping term**: ``lambda/2 ||Delta||^2 - eta^T Delta``;
* the **whole objective**: their sum, whose gradient is what the optimiser follows.

A converged copy is one where the whole objective's gradient has fallen far below its parts': the
risk and damping terms balance the perturbation.

``linear_response`` checks the same thing against each copy's exact answer in the linear regime (small models
only: it forms d x d matrices): the minimiser of the copy's objective to second order around theta0 is
``Delta_k = A_S^{-1} (b_k + eta_k)`` with ``b_k = (1/m) sum_{i in S} eps_i grad l_i`` and ``A_S`` the curvature of
the subset's objective plus lambda I (Gauss-Newton for ``"if"``, ``2 gamma`` times the empirical Fisher for
``"efim"``); the Pearson correlation between the losses' changes it predicts, ``grad l_i^T Delta_k``, and the
trained copy's actual changes is close to 1 only for a copy at the minimum of its objective.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engines import sequential
from ..objectives import perturbed_objective, proximal_term

__all__ = ["gradient_norms", "linear_response"]


def _flat_norm(grads) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def gradient_norms(daunce, train, k: int = 0) -> dict:
    """Retrain copy ``k`` of ``daunce`` on ``train`` and record its gradient norms per step.

    Args:
        daunce: a ``Daunce`` whose configuration (and, with a workdir, copy k) is the one to inspect.
        train: the training set the copies were fitted on.
        k: the copy.

    Returns:
        dict of ``(steps,)`` arrays ``"risk"``, ``"perturbation"``, ``"damping"``, ``"objective"``: the
        Euclidean norm over all trainable parameters of each term's gradient, at the parameters the
        optimiser steps from (step 0 is theta0); ``"value"``: the whole objective; and ``"signals"``,
        the ``(n,)`` signals of the retrained copy (compare with ``daunce.signals(train)[k]`` to check
        that the retraining reproduces the stored copy). The working model is left at theta0.
    """
    cfg = daunce.resolve(train)  # the configuration the copies were trained with ("auto" fields resolved)
    ctx = daunce.context
    n = len(train)
    plan = daunce.plan(k, n)
    # theta0's outputs, dl/doutputs and losses, as the copies cache them; leaves the model at theta0 in train_mode
    base = sequential.base_cache(ctx, cfg, train)

    params = ctx.params
    opt = sequential.make_optimizer(cfg, params)
    # the eps that switches the linear term off: "if" carries (1 + eps), the Fisher forms eps
    eps_off = -1.0 if cfg.variant == "if" else 0.0
    rows = []
    n_steps, g0 = len(plan.batches), None
    for step, idx in enumerate(plan.batches):
        loss, kw = sequential.objective_parts(cfg, ctx, plan, idx, ctx.fetch(train, idx), base)
        whole = perturbed_objective(cfg.variant, loss=loss, gamma=cfg.gamma, **kw).mean()
        if kw:
            risk = perturbed_objective(cfg.variant, loss=loss, gamma=cfg.gamma,
                                       **{**kw, "eps": torch.full_like(kw["eps"], eps_off)}).mean()
        else:
            risk = whole
        damp = proximal_term(params, ctx.theta0, cfg.damping, plan.eta)
        g_whole = torch.autograd.grad(whole + damp, params, retain_graph=True, allow_unused=True)
        g_risk = torch.autograd.grad(risk, params, retain_graph=True, allow_unused=True)
        g_damp = torch.autograd.grad(damp, params, allow_unused=True) if damp.requires_grad else [None] * len(params)
        zeros = [torch.zeros_like(p) for p in params]
        g_whole, g_risk, g_damp = ([z if g is None else g for g, z in zip(gs, zeros)]
                                   for gs in (g_whole, g_risk, g_damp))
        g_pert = [w - r - d for w, r, d in zip(g_whole, g_risk, g_damp)]
        rows.append((_flat_norm(g_risk), _flat_norm(g_pert), _flat_norm(g_damp), _flat_norm(g_whole),
                     float((whole + damp).detach())))
        if not np.isfinite(rows[-1][-1]):
            raise FloatingPointError(f"copy {k}: the objective is not finite at step {len(rows) - 1}")
        if cfg.stops_early:  # the copy's stopping test, as in sequential.train_copy
            g0 = rows[-1][3] if g0 is None else g0
            if rows[-1][3] <= cfg.tol * g0:
                break
        for p, g in zip(params, g_whole):
            p.grad = g.detach()
        sequential.set_lr(opt, cfg.lr_at(step, n_steps))
        opt.step()
        opt.zero_grad(set_to_none=True)

    signals = sequential.signals_now(ctx, train)
    ctx.reset()
    cols = np.array(rows, dtype=float).T
    return {"risk": cols[0], "perturbation": cols[1], "damping": cols[2], "objective": cols[3], "value": cols[4],
            "signals": signals}


def linear_response(daunce, train, ks=(0, 1), *, train_grads=None) -> list[dict]:
    """``[{"copy", "linear_response_r", "steps"}]`` for the copies ``ks`` of a fitted ``daunce`` (module docstring).

    Variants ``"if"`` (gamma = 1) and ``"efim"``; without damping the subset's curvature is singular and its
    pseudo-inverse is used (for ``"efim"`` through the SVD of the subset's gradients, which also makes it cheap).
    ``train_grads``: the per-example loss gradients ``(n, d)`` if already computed."""
    from torch.utils.data import TensorDataset

    from .. import exact
    from ..task import ClassificationTask

    cfg = daunce.resolve(train)
    if cfg.variant not in ("if", "efim"):
        raise ValueError(f"linear_response covers the 'if' and 'efim' variants, not {cfg.variant!r}")
    model, task = daunce.model, ClassificationTask()
    x, y = train.tensors[:2]
    Gi = (exact.per_example_grads(model, task, train) if train_grads is None else train_grads).double()
    ctx = daunce.context
    ctx.reset()
    loss0 = sequential.signals_now(ctx, train, task.loss).double()
    out = []
    for k in ks:
        plan = daunce.plan(k, len(train))
        sub = plan.subset
        rhs = (plan.eps[sub].double()[:, None] * Gi[sub]).mean(0)
        if plan.eta is not None:
            rhs = rhs + torch.cat([e.reshape(-1).double() for e in plan.eta])
        if cfg.variant == "if":
            A = exact.gauss_newton(model, task, TensorDataset(x[sub], y[sub]), batch_size=50).double()
            A = A + cfg.damping * torch.eye(A.shape[0], dtype=A.dtype)
            delta = torch.linalg.solve(A, rhs) if cfg.damping > 0 else torch.linalg.pinv(A, hermitian=True) @ rhs
        else:  # A = (2 gamma / m) U^T U + lambda I with U the subset's gradients: solved in U's row space
            _, sv, Vh = torch.linalg.svd(Gi[sub], full_matrices=False)
            keep = sv > sv[0] * 1e-10
            sv, Vh = sv[keep], Vh[keep]
            inside = Vh @ rhs
            delta = Vh.T @ (inside / (2 * cfg.gamma * sv**2 / len(sub) + cfg.damping))
            if cfg.damping > 0:  # the rest of rhs (the noise term) meets the damping alone
                delta = delta + (rhs - Vh.T @ inside) / cfg.damping
        ctx.load_state(daunce.state(k))
        change = sequential.signals_now(ctx, train, task.loss).double() - loss0
        ctx.reset()
        rec = daunce.store.load(k)
        out.append({"copy": int(k), "linear_response_r": float(np.corrcoef((Gi @ delta).numpy(), change.numpy())[0, 1]),
                    "steps": rec.get("steps")})
    return out
