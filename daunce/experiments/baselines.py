"""Baseline attributions from maintained libraries, on the same theta0, data and ground truth.

Every baseline returns scores ``(n_train, n_query)`` with Daunce's sign convention (positive = the
training example helped the query; the planted-duplicate test in ``tests/test_baselines.py`` checks
it). Nothing here re-implements a method: each wrapper builds the library's objects and calls it.

* dattri 0.3.0: influence functions (``if-explicit``, ``if-cg``, ``if-lissa``, ``if-arnoldi``,
  ``if-ekfac``), ``datainf``, ``trak`` (an ensemble of independently trained checkpoints),
  ``tracin`` (checkpoints along theta0's trajectory, weighted by the learning rate), ``grad-dot``,
  ``grad-cos``.
* kronfluence 1.0.1: ``kronfluence-ekfac``.

Known snags, handled here: a bare ``nn.Linear`` as the whole model breaks dattri's EK-FAC and
kronfluence (``daunce.experiments.models`` wraps every model in ``nn.Sequential``); TRAK without projection needs
``regularization > 0``; dattri's ``TRAKAttributor.attribute`` takes ``(test_loader, train_loader)`` in that
order; dattri's LiSSA casts labels to float (the loss casts them back); dattri's projector defaults are
a module-level dict that ``TRAKAttributor`` updates in place, so full projector arguments are passed
every time; dattri's EK-FAC only sees ``nn.Linear`` layers (a CNN's convolutions are left out).
"""

from __future__ import annotations

import copy
import tempfile
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from ..task import margin

DATTRI_METHODS = ("if-explicit", "if-cg", "if-lissa", "if-arnoldi", "if-ekfac", "datainf", "trak", "tracin",
                  "grad-dot", "grad-cos")
METHODS = DATTRI_METHODS + ("kronfluence-ekfac",)


def _loss_fn(model: torch.nn.Module, sample_ndim: int):
    """dattri's ``f(params, data)``: mean cross-entropy; accepts one example (under vmap) or a batch."""

    def f(params, data):
        x, y = data[0], data[1]
        if x.ndim == sample_ndim:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        logits = functional_call(model, params, (x,))
        return F.cross_entropy(logits, y.long())

    return f


def _margin_fn(model: torch.nn.Module, sample_ndim: int):
    """TRAK's output function: the margin ``logit_y - logsumexp_{c != y} logit_c`` (dattri's TRAK
    attributes a *loss-like* target through its Q term; see ``_trak``)."""

    def f(params, data):
        x, y = data[0], data[1]
        if x.ndim == sample_ndim:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        logits = functional_call(model, params, (x,))
        return margin(logits, y.long()).sum()

    return f


def _prob_fn(model: torch.nn.Module, sample_ndim: int):
    def p(params, data):
        x, y = data[0], data[1]
        x, y = x.unsqueeze(0), y.unsqueeze(0)
        logits = functional_call(model, params, (x,))
        return torch.exp(-F.cross_entropy(logits, y.long()))

    return p


def _loaders(train: TensorDataset, query: TensorDataset, batch_size: int):
    return (DataLoader(train, batch_size=100, shuffle=False),
            DataLoader(query, batch_size=batch_size, shuffle=False))


def dattri_scores(method: str, model: torch.nn.Module, train: TensorDataset, query: TensorDataset, *,
                  checkpoints: Optional[list] = None, ensemble: Optional[list] = None,
                  regularization: float = 1e-3, batch_size: int = 20, **kw) -> torch.Tensor:
    """Scores ``(n_train, n_query)`` (positive = helpful) of one dattri method on theta0 = ``model``.

    Args:
        method: one of ``DATTRI_METHODS``.
        checkpoints: for ``tracin``: ``[{"state": state_dict, "lr": float}, ...]`` along the trajectory.
        ensemble: for ``trak``: state dicts of independently trained models (theta0 first).
        regularization: the damping added to the Hessian / Fisher / kernel (the training weight decay).
        kw: method-specific overrides (``max_iter``, ``proj_dim``, ``recursion_depth`` ...).
    """
    from dattri.algorithm import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorDataInf,
        IFAttributorEKFAC,
        IFAttributorExplicit,
        IFAttributorLiSSA,
        TracInAttributor,
        TRAKAttributor,
    )
    from dattri.task import AttributionTask

    if method not in DATTRI_METHODS:
        raise ValueError(f"method must be one of {DATTRI_METHODS}, got {method!r}")
    model = copy.deepcopy(model).eval()
    sample_ndim = train.tensors[0].ndim - 1
    loss = _loss_fn(model, sample_ndim)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_loader, query_loader = _loaders(train, query, batch_size)
    d = sum(p.numel() for p in model.parameters())

    if method == "trak":
        ckpts = ensemble or [theta0]
        # dattri's TRAK differentiates task.loss_func as its output function: use the margin, as TRAK does
        task = AttributionTask(loss_func=_margin_fn(model, sample_ndim), model=model, checkpoints=ckpts)
        proj = {"proj_dim": int(kw.get("proj_dim", min(512, d))), "proj_max_batch_size": 32, "proj_seed": 0,
                "device": "cpu"}
        att = TRAKAttributor(task=task, correct_probability_func=_prob_fn(model, sample_ndim),
                             projector_kwargs=proj, device="cpu", regularization=kw.get("trak_regularization", 1e-3))
        att.cache(train_loader)
        with torch.no_grad():
            return att.attribute(query_loader).detach().float()
    if method in ("tracin", "grad-dot", "grad-cos"):
        if method == "tracin":
            cks = checkpoints or [{"state": theta0, "lr": 1.0}]
            states, weights = [c["state"] for c in cks], torch.tensor([float(c["lr"]) for c in cks])
        else:
            states, weights = [theta0], torch.ones(1)
        task = AttributionTask(loss_func=loss, model=model, checkpoints=states)
        att = TracInAttributor(task=task, weight_list=weights, normalized_grad=(method == "grad-cos"), device="cpu")
        return att.attribute(train_loader, query_loader).detach().float()

    task = AttributionTask(loss_func=loss, model=model, checkpoints=theta0)
    if method == "if-explicit":
        att = IFAttributorExplicit(task=task, device="cpu", regularization=regularization)
    elif method == "if-cg":
        att = IFAttributorCG(task=task, device="cpu", max_iter=int(kw.get("max_iter", 50)),
                             regularization=regularization)
    elif method == "if-lissa":
        att = IFAttributorLiSSA(task=task, device="cpu", batch_size=int(kw.get("lissa_batch", 50)),
                                recursion_depth=int(kw.get("recursion_depth", 200)), damping=regularization,
                                scaling=float(kw.get("scaling", 50.0)))
    elif method == "if-arnoldi":
        att = IFAttributorArnoldi(task=task, device="cpu", proj_dim=int(kw.get("proj_dim", 100)),
                                  max_iter=int(kw.get("max_iter", 100)), regularization=regularization)
    elif method == "if-ekfac":
        att = IFAttributorEKFAC(task=task, device="cpu", damping=regularization)
    else:  # datainf
        att = IFAttributorDataInf(task=task, device="cpu", regularization=regularization)
    full_loader = train_loader
    if method == "if-arnoldi":  # dattri's Arnoldi takes its Hessian from the first batch(es): give it all
        full_loader = DataLoader(train, batch_size=len(train), shuffle=False)
    att.cache(full_loader)
    return att.attribute(train_loader, query_loader).detach().float()


def kronfluence_ekfac(model: torch.nn.Module, train: TensorDataset, query: TensorDataset, *,
                      damping: Optional[float] = None, batch_size: int = 128, workdir=None) -> torch.Tensor:
    """kronfluence's EK-FAC influence scores ``(n_train, n_query)``, positive = helpful. The query
    measurement is the cross-entropy (the same loss the training signal uses)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask

    class _Task(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    model = prepare_model(copy.deepcopy(model).eval(), _Task())
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    out = str(workdir) if workdir is not None else tmp.name
    try:
        analyzer = Analyzer("daunce_baseline", model, _Task(), cpu=True, disable_tqdm=True, output_dir=out)
        fargs = FactorArguments(strategy="ekfac")
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=batch_size, factor_args=fargs,
                                 overwrite_output_dir=True)
        sargs = ScoreArguments(damping_factor=damping)
        analyzer.compute_pairwise_scores("scores", "ekfac", query, train, per_device_query_batch_size=batch_size,
                                         per_device_train_batch_size=batch_size, score_args=sargs,
                                         overwrite_output_dir=True)
        s = analyzer.load_pairwise_scores("scores")["all_modules"]  # (n_query, n_train)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return s.T.contiguous().float()


def run(method: str, model, train, query, **kw) -> tuple[torch.Tensor, float]:
    """``(scores (n_train, n_query), seconds)`` of one baseline (``METHODS``)."""
    t0 = time.perf_counter()
    if method == "kronfluence-ekfac":
        s = kronfluence_ekfac(model, train, query, damping=kw.get("damping"), batch_size=kw.get("batch_size", 128))
    else:
        s = dattri_scores(method, model, train, query, **kw)
        # dattri's Arnoldi returns NaN when proj_dim reaches the Hessian's numerical rank: halve it
        while method == "if-arnoldi" and not torch.isfinite(s).all() and kw.get("proj_dim", 100) > 10:
            kw = {**kw, "proj_dim": kw.get("proj_dim", 100) // 2}
            s = dattri_scores(method, model, train, query, **kw)
    return s, time.perf_counter() - t0


def _child(conn, method, model, train, query, kw, mem_bytes):
    import os
    import resource
    import sys

    # the libraries' per-batch progress bars would fill the caller's output (a notebook cell); the result
    # or the error goes back through ``conn``
    sys.stderr = open(os.devnull, "w")
    try:
        if mem_bytes:
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (vm + int(mem_bytes), hard))
        torch.set_num_threads(1)
        s, sec = run(method, model, train, query, **kw)
        conn.send(("ok", s.numpy(), sec))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {str(e)[:300]}", 0.0))
    finally:
        conn.close()


def run_isolated(method: str, model, train, query, *, timeout: float = 120.0, memory_gb: float = 4.0, **kw):
    """``run`` in a forked child process with a memory cap (address space grown by at most ``memory_gb``)
    and a wall-clock ``timeout``: a baseline that blows up on a shared machine fails alone, with a reason.
    Returns ``(scores, seconds)``; raises ``RuntimeError`` with the reason otherwise."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, method, model, train, query, kw, memory_gb * 2**30))
    p.start()
    child.close()
    if not parent.poll(timeout):
        p.kill()
        p.join()
        raise RuntimeError(f"{method}: no result within {timeout:.0f} s on this machine")
    status, payload, sec = parent.recv()
    p.join()
    if status != "ok":
        raise RuntimeError(f"{method}: {payload} (memory cap {memory_gb} GB)")
    return torch.from_numpy(payload), sec
