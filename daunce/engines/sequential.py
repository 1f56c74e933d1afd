"""The sequential engine: one copy after the other in the context's working model.

Also home of the two passes every engine shares: the base cache (theta0's outputs, their loss
gradient and loss on every training example, computed once) and one signal pass of the working model.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from ..config import DaunceConfig
from ..objectives import perturbed_objective, proximal_term
from ..plans import CopyPlan, augment_batch, augment_generator
from .context import ModelContext, check_training_set, per_example, set_copy_mode

SignalFn = Callable[[torch.Tensor, object], torch.Tensor]


def theta0_values(ctx: ModelContext, config: DaunceConfig, batch, m: int, tensors: Optional[dict] = None) -> dict:
    """The working model's outputs, dloss/doutputs and loss on one batch of ``m`` examples (and the output
    function for the TRAK-like form), detached: ``{"outputs", "grad", "loss", ["f"]}``. Called with the model
    at theta0, these are the cached values of every copy's objective. ``tensors`` (``{name: tensor}``) are swapped
    in for the call (``ModelContext.outputs_with``)."""
    with torch.enable_grad():
        out = ctx.outputs(batch) if tensors is None else ctx.outputs_with(tensors, batch)
        out = out.detach().requires_grad_(True)
        loss = ctx.loss(out, batch, m)
        (grad,) = torch.autograd.grad(loss.sum(), out)
    vals = {"outputs": out.detach(), "grad": grad.detach(), "loss": loss.detach()}
    if config.variant == "trak":
        with torch.no_grad():
            vals["f"] = ctx.output_function(out.detach(), batch, m)
    return vals


def base_cache(ctx: ModelContext, config: DaunceConfig, train: Dataset) -> dict:
    """Outputs, dloss/doutputs and loss of theta0 on every training example (and the output function
    for the TRAK-like form): ``{"outputs": (n, ...), "grad": (n, ...), "loss": (n,), ["f": (n,)]}``. The training set
    is checked first (``check_training_set``; once per dataset object)."""
    check_training_set(ctx, train)
    ctx.reset()
    ctx.model.train(config.train_mode)
    n = len(train)
    cache: dict[str, torch.Tensor] = {}
    for idx in ctx.index_batches(n, train):
        vals = theta0_values(ctx, config, ctx.fetch(train, idx), len(idx))
        for key, v in vals.items():
            if key not in cache:
                cache[key] = v.new_empty((n,) + tuple(v.shape[1:]))
            cache[key][idx.to(v.device)] = v
    return cache


def live_theta0_values(ctx: ModelContext, config: DaunceConfig, batch, m: int) -> dict:
    """``theta0_values`` of theta0 on one training batch as a copy sees it (``DaunceConfig.live_base``): theta0's
    weights in the working model's current mode (``set_copy_mode``: batch statistics with ``batchnorm="train"``),
    on the batch as given (augmented), with scratch clones of theta0's running statistics (a train-mode pass moves
    those, never theta0's or the copy's)."""
    tensors = dict(zip(ctx.names, ctx.theta0))
    tensors.update((n, s.clone()) for n, s in zip(ctx.stat_names, ctx.stats0))
    with torch.no_grad():
        return theta0_values(ctx, config, batch, m, tensors)


def make_optimizer(config: DaunceConfig, params):
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def set_lr(opt, lr: float) -> None:
    """Set the learning rate of every parameter group of ``opt`` (the schedule's value of this step)."""
    for group in opt.param_groups:
        group["lr"] = lr


def gradient_norm(params) -> float:
    """Euclidean norm over all ``params``' ``.grad`` (missing gradients count as zero)."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return total**0.5


def start_norm(params, eta, whole: float) -> float:
    """The stopping test's reference: the gradient norm at theta0 without the isotropic noise term (whose gradient
    there is ``-eta``), ``whole`` (the whole gradient's norm) with the noise term off or where the data part's is
    zero; ``daunce.engines.vmap.start_norm`` for one copy."""
    if eta is None:
        return whole
    total = 0.0
    for p, e in zip(params, eta):
        g = e.detach().neg() if p.grad is None else p.grad.detach() + e.to(p.grad.device)
        total += float(g.double().pow(2).sum())
    return total**0.5 if total > 0 else whole


def objective_parts(config: DaunceConfig, ctx: ModelContext, plan: CopyPlan, idx: torch.Tensor, batch,
                    cache: Optional[dict]) -> tuple[torch.Tensor, dict]:
    """``(loss, kw)`` of the working model on one batch of copy ``plan.k``: the per-example loss ``(B,)`` and
    the other keyword arguments of ``perturbed_objective`` (theta0's values and the copy's eps; none for the
    bootstrap form). theta0's values are the cached ones at ``idx``, or, with ``config.live_base``, computed on
    ``batch`` (``live_theta0_values``; ``cache`` is then not used)."""
    out = ctx.outputs(batch)
    loss = ctx.loss(out, batch, len(idx))
    kw = {}
    if config.variant != "bootstrap":
        if config.live_base:
            base = live_theta0_values(ctx, config, batch, len(idx))
        else:
            dev_idx = idx.to(cache["loss"].device)
            base = {key: v[dev_idx] for key, v in cache.items()}
        kw = dict(loss0=base["loss"], outputs=out, outputs0=base["outputs"], grad0=base["grad"],
                  eps=plan.eps[idx].to(loss.device, loss.dtype))
        if config.variant == "trak":
            kw["f"] = ctx.output_function(out, batch, len(idx))
            kw["f0"] = base["f"]
    return loss, kw


def objective_terms(config: DaunceConfig, ctx: ModelContext, plan: CopyPlan, idx: torch.Tensor, batch,
                    cache: Optional[dict]) -> torch.Tensor:
    """Per-example perturbed objective ``(B,)`` of the working model on one batch of copy ``plan.k``."""
    loss, kw = objective_parts(config, ctx, plan, idx, batch, cache)
    return perturbed_objective(config.variant, loss=loss, gamma=config.gamma, **kw)


def train_copy(ctx: ModelContext, config: DaunceConfig, plan: CopyPlan, train: Dataset,
               cache: Optional[dict], report: Optional[dict] = None) -> list:
    """Fine-tune one copy from theta0 with its perturbed objective; returns its trainable tensors (CPU).

    The copy starts from theta0's weights and running statistics (``ctx.reset``) and trains in the mode
    ``set_copy_mode`` sets; with ``config.batchnorm == "train"`` its running statistics are left in the working
    model (``ctx.stats()``), where the signal passes use them. With ``config.augment`` every batch's inputs are
    augmented with draws from the copy's own generator (``daunce.plans.augment_generator``).
    ``config`` must be resolved (no ``"auto"`` left). With the stopping test on (``config.stops_early``) the
    copy stops at the first step whose gradient norm is at most ``config.tol`` times the norm at theta0 of its
    gradient without the isotropic noise term (``start_norm``);
    ``report`` (a dict, if given) receives ``"steps"`` (optimiser steps taken) and ``"converged"`` (True /
    False with the stopping test, None without it)."""
    ctx.reset()
    set_copy_mode(ctx.model, config)
    opt = make_optimizer(config, ctx.params)
    n_steps, stop = len(plan.batches), config.stops_early
    g0, steps, converged = None, 0, (False if stop else None)
    gen = augment_generator(config.seed, plan.k) if config.augment != "none" else None
    for step, idx in enumerate(plan.batches):
        batch = augment_batch(ctx.fetch(train, idx), config, gen)
        obj = objective_terms(config, ctx, plan, idx, batch, cache).mean()
        obj = obj + proximal_term(ctx.params, ctx.theta0, config.damping, plan.eta)
        if not torch.isfinite(obj):
            raise FloatingPointError(
                f"Daunce copy {plan.k}, step {step}: the objective is not finite ({obj.item()}); "
                f"lower lr (now {config.lr}) or rho (now {config.rho})")
        opt.zero_grad(set_to_none=True)
        obj.backward()
        if stop:
            gn = gradient_norm(ctx.params)
            g0 = start_norm(ctx.params, plan.eta, gn) if g0 is None else g0
            if gn <= config.tol * g0:
                converged = True
                break
        set_lr(opt, config.lr_at(step, n_steps))
        opt.step()
        steps += 1
    if report is not None:
        report.update(steps=steps, converged=converged)
    return ctx.state()


@torch.no_grad()
def signals_now(ctx: ModelContext, dataset: Dataset, signal: Optional[SignalFn] = None) -> torch.Tensor:
    """Signals ``(n,)`` (float64, CPU) of the working model as it is now: the task's signal, or
    ``signal(outputs, batch)`` (one value per example, higher = worse) when given."""
    ctx.model.train(False)
    n = len(dataset)
    out = torch.empty(n, dtype=torch.float64)
    for idx in ctx.index_batches(n, dataset):
        batch = ctx.fetch(dataset, idx)
        outputs = ctx.outputs(batch)
        s = ctx.signal(outputs, batch, len(idx)) if signal is None else per_example(signal(outputs, batch),
                                                                                     len(idx), "signal")
        out[idx] = s.double().cpu()
    return out


__all__ = ["base_cache", "live_theta0_values", "theta0_values", "make_optimizer", "set_lr", "gradient_norm",
           "objective_parts", "objective_terms", "train_copy", "signals_now",
           "SignalFn"]
