"""Baseline attributions from maintained libraries, on the same theta0, data and ground truth.

Every baseline returns scores ``(n_train, n_query)`` with Daunce's sign convention (positive = the
training example helped the query; the planted-duplicate test in ``tests/test_baselines.py`` checks
it). Nothing here re-implements a method: each wrapper builds the library's objects and calls it the
way the library's own benchmark does (dattri's ``experiments/benchmark_result.py``: curvature cached
from the full training set, ``attribute`` under ``torch.no_grad()``, CG with 10 iterations, LiSSA with
recursion depth 100, batches of 10 and scaling 50; Arnoldi with dattri's defaults, 100 iterations and 100 directions).

* dattri 0.3.0: influence functions (``if-explicit``, ``if-cg``, ``if-lissa``, ``if-arnoldi``,
  ``if-ekfac`` with the shim of ``daunce.experiments.dattri_ekfac``; ``if-ekfac-stock`` is dattri's
  class as shipped), ``datainf``, ``trak`` (an ensemble of independently trained checkpoints),
  ``tracin`` (checkpoints along theta0's trajectory, weighted by the learning rate), ``grad-dot``,
  ``grad-cos``.
* kronfluence 1.0.1: ``kronfluence-ekfac`` (its default: the Fisher with labels sampled from the
  model) and ``kronfluence-ekfac-ef`` (the empirical Fisher, true labels). kronfluence covers
  ``nn.Linear`` and ``nn.Conv2d``; dattri's EK-FAC sees ``nn.Linear`` layers only.

**One damping knob, one grid.** Every method with a damping or regularisation knob gets the values
of ``DAMPING_GRID`` on the scale of the *mean* training loss's curvature (the scale of Daunce's
``damping`` and of the exact influence function in ``daunce.exact``), translated to each library's
parameter by ``library_damping``: LiSSA's update solves ``(H + damping * scaling) x = v``, so it gets
``lambda / scaling``; TRAK adds its regularisation to the *summed* kernel ``X^T X``, so it gets
``n * lambda``; the others add ``lambda`` to a mean-scale curvature. ``run_grid`` scores a method at
every grid value; the caller chooses one on tuning queries.

**One measurement.** Every influence-type method and the gradient baselines measure the query by
minus its margin ``logit_y - logsumexp_{c != y} logit_c`` (a loss-like quantity: higher = worse), the
function the ground truth records and kronfluence's CIFAR-10 example measures; the training side is
the cross-entropy the model was trained on. TRAK keeps its own output function (the margin) on both.

**The training-side function is an option** (``train_signal``, tuned like the damping) where it leaves the method's
curvature alone (``TRAIN_SIGNAL_METHODS``): ``"margin"`` differentiates minus the training example's margin instead of
its loss. On a model that fits its training set, the loss gradient is the margin gradient times about (1 - p_i), a
weight spanning orders of magnitude that retraining from scratch does not follow. For TRAK, whose training side is the
margin already, ``"margin"`` divides its (1 - p) weight out (its probability function returns 0); for TracIn, grad-dot
and grad-cos it is their training gradient; for kronfluence's EK-FAC the training gradient, its factors still from the
loss with labels sampled from the model. The dattri influence functions and ``kronfluence-ekfac-ef`` fit their
curvature on the training function itself, so they keep the loss.

Known snags, handled here: a bare ``nn.Linear`` as the whole model breaks dattri's EK-FAC and
kronfluence (``daunce.experiments.models`` wraps every model in ``nn.Sequential``); TRAK without projection needs
``regularization > 0``; dattri's ``TRAKAttributor.attribute`` takes ``(test_loader, train_loader)`` in that
order; dattri's LiSSA casts labels to float (the loss casts them back); dattri's projector defaults are
a module-level dict that ``TRAKAttributor`` updates in place, so full projector arguments are passed
every time; DataInf's peak memory grows with (query batch)^2 x (largest layer), so its queries go in batches of 32.

**Device.** Every entry point takes ``device`` (``"cpu"``, the default, ``"cuda"``, ``"auto"``; see
``daunce.engines.context.resolve_device``): the model's deep copy is moved there, every dattri attributor gets it as its
``device`` (TRAK and TracIn their projector's as well: dattri 0.3.0 builds a ``CudaProjector`` on CUDA, whose random
matrix differs from the CPU one), kronfluence's ``Analyzer`` runs on the CPU only for ``device="cpu"``; the data stay on
the CPU (the libraries move each batch) and the scores come back on the CPU. ``device="cpu"`` gives what the code
gave before the knob existed, bit for bit.
"""

from __future__ import annotations

import copy
import re
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from ..engines.context import resolve_device
from ..task import margin

DATTRI_METHODS = ("if-explicit", "if-cg", "if-lissa", "if-arnoldi", "if-ekfac", "if-ekfac-stock", "datainf", "trak",
                  "tracin", "grad-dot", "grad-cos")
KRONFLUENCE_METHODS = ("kronfluence-ekfac", "kronfluence-ekfac-ef")
METHODS = DATTRI_METHODS + KRONFLUENCE_METHODS
#: the baselines grouped by how they attribute (notebook 02's figures draw each family's best; ``COMPARED`` is what
#: Daunce's goal and the README's findings compare with). The exact solves (an explicit inverse, conjugate gradients to
#: convergence) are references a user would not run at scale, so they are drawn but not in ``COMPARED``.
FAMILIES = {
    "influence function, exact solve": ("if-explicit", "if-cg"),
    "influence function, approximate": ("if-lissa", "if-arnoldi", "if-ekfac", "if-ekfac-stock", "kronfluence-ekfac",
                                         "kronfluence-ekfac-ef", "datainf"),
    "TRAK": ("trak",),
    "gradient similarity": ("tracin", "grad-dot", "grad-cos"),
}
EXACT_FAMILY = "influence function, exact solve"
COMPARED = tuple(m for fam, ms in FAMILIES.items() if fam != EXACT_FAMILY for m in ms)


def family(method: str) -> Optional[str]:
    """The family of a baseline (a key of ``FAMILIES``), or None for a method that is not a baseline. A row over M
    trained models (``"trak (M = 4)"``: notebook 02's ensembles) belongs to its method's family."""
    base = re.sub(r" \(M = \d+\)$", "", method)
    return next((fam for fam, ms in FAMILIES.items() if base in ms), None)

#: methods whose training-side function can be minus the margin instead of the loss (``train_signal``; module docstring)
TRAIN_SIGNAL_METHODS = ("trak", "tracin", "grad-dot", "grad-cos", "kronfluence-ekfac")
TRAIN_SIGNALS = ("loss", "margin")
#: methods with a damping / regularisation knob (tuned on ``DAMPING_GRID``)
DAMPED = ("if-explicit", "if-cg", "if-lissa", "if-arnoldi", "if-ekfac", "if-ekfac-stock", "datainf", "trak",
          *KRONFLUENCE_METHODS)
#: the damping grid every method is tuned on (mean-loss scale): decades from 1e-4, below the training weight
#: decay of notebook 02's models (1e-3, which the training objective's Hessian already holds as 1e-3 * I), to 1
#: (on a downsized CNN the exact influence function's LDS still rose from 0.1 to 1).
DAMPING_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# dattri's benchmark: depth 100, scaling 50, batches of 10 (the cheapest of its 10, 50 and 100: every query vector
# runs its own recursion of 100 Hessian-vector products, 30,000 per damping for 300 queries)
LISSA = dict(recursion_depth=100, batch_size=10, scaling=50.0)
CG_ITERATIONS = 10  # dattri's benchmark
# dattri's defaults: with its benchmark's 50 iterations the Krylov space holds the top 50 of the digits LR's 650
# directions and the planted-duplicate test fails (a duplicate ranks in the top 26%, not 5%)
ARNOLDI = dict(max_iter=100, proj_dim=100)
TRAK_PROJ_DIM = 512  # dattri's benchmark; min(d, 512) for smaller models
# dattri 0.3.0's TracIn projector (its ``DEFAULT_PROJECTOR_KWARGS``; TracIn always projects): passed in full with the
# device, since ``TracInAttributor`` updates that module-level dict in place (a CUDA run would leave "cuda" in it)
TRACIN_PROJECTOR = dict(proj_dim=512, proj_max_batch_size=32, proj_seed=0)


def baseline_device(device: str | torch.device = "cpu") -> torch.device:
    """``resolve_device(device)``, limited to what both libraries run on (dattri's projectors and kronfluence take
    the CPU or CUDA only)."""
    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"the baselines run on the CPU or CUDA, got device {device!r}")
    return dev


def library_damping(method: str, damping: float, n_train: int) -> float:
    """The library parameter that adds ``damping`` (mean-loss scale) to the method's curvature."""
    if method == "if-lissa":
        return damping / LISSA["scaling"]
    if method == "trak":
        return damping * n_train
    return damping


def _loss_fn(model: torch.nn.Module, sample_ndim: int):
    """dattri's ``f(params, data)``: mean cross-entropy; accepts one example (under vmap) or a batch."""

    def f(params, data):
        x, y = data[0], data[1]
        if x.ndim == sample_ndim:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        logits = functional_call(model, params, (x,))
        return F.cross_entropy(logits, y.long())

    return f


def _margin_fn(model: torch.nn.Module, sample_ndim: int, sign: float = 1.0):
    """``sign`` x the margin ``logit_y - logsumexp_{c != y} logit_c``, summed over the batch: TRAK's output
    function (sign +1) or the query measurement of the other methods (sign -1: loss-like)."""

    def f(params, data):
        x, y = data[0], data[1]
        if x.ndim == sample_ndim:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        logits = functional_call(model, params, (x,))
        return sign * margin(logits, y.long()).sum()

    return f


def check_train_signal(method: str, train_signal: str) -> None:
    """A ``ValueError`` unless ``train_signal`` is "loss", or "margin" for a method of ``TRAIN_SIGNAL_METHODS``."""
    if train_signal not in TRAIN_SIGNALS:
        raise ValueError(f"train_signal must be one of {TRAIN_SIGNALS}, got {train_signal!r}")
    if train_signal == "margin" and method not in TRAIN_SIGNAL_METHODS:
        raise ValueError(f"train_signal='margin' applies to {TRAIN_SIGNAL_METHODS}, not {method!r} (its curvature "
                         "is fitted on the training function)")


def _prob_fn(model: torch.nn.Module, sample_ndim: int, weighted: bool = True):
    """TRAK's probability of the correct class, whose ``1 - p`` weights each training example; ``weighted=False``
    returns 0, which divides the weight out."""
    if not weighted:
        return lambda params, data: torch.zeros(())

    def p(params, data):
        x, y = data[0], data[1]
        x, y = x.unsqueeze(0), y.unsqueeze(0)
        logits = functional_call(model, params, (x,))
        return torch.exp(-F.cross_entropy(logits, y.long()))

    return p


def _attributor(method, model, train, sample_ndim, theta0, damping, checkpoints, ensemble, kw, device="cpu",
                train_signal="loss"):
    """dattri's attributor object for one method and one damping (not yet cached), on ``device`` (where ``model``
    is), with ``train_signal`` on the training side (``TRAIN_SIGNAL_METHODS``)."""
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

    from .dattri_ekfac import corrected_ekfac

    dev = str(device)  # dattri types its device as a string ("cpu", "cuda", "cuda:1")
    loss, measure = _loss_fn(model, sample_ndim), _margin_fn(model, sample_ndim, -1.0)
    lam = library_damping(method, damping, len(train)) if damping is not None else None
    if method == "trak":
        task = AttributionTask(loss_func=_margin_fn(model, sample_ndim), model=model, checkpoints=ensemble or [theta0])
        d = sum(p.numel() for p in model.parameters())
        proj = {"proj_dim": int(kw.get("proj_dim", min(TRAK_PROJ_DIM, d))), "proj_max_batch_size": 32, "proj_seed": 0,
                "device": dev}
        return TRAKAttributor(task=task, correct_probability_func=_prob_fn(model, sample_ndim, train_signal == "loss"),
                              projector_kwargs=proj, device=dev, regularization=lam)
    if method in ("tracin", "grad-dot", "grad-cos"):
        cks = (checkpoints or [{"state": theta0, "lr": 1.0}]) if method == "tracin" else [{"state": theta0, "lr": 1.0}]
        train_fn = loss if train_signal == "loss" else measure
        task = AttributionTask(loss_func=train_fn, model=model, checkpoints=[c["state"] for c in cks],
                               target_func=measure)
        return TracInAttributor(task=task, weight_list=torch.tensor([float(c["lr"]) for c in cks]),
                                normalized_grad=(method == "grad-cos"),
                                projector_kwargs={**TRACIN_PROJECTOR, "device": dev}, device=dev)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=theta0, target_func=measure)
    if method == "if-explicit":
        return IFAttributorExplicit(task=task, device=dev, regularization=lam)
    if method == "if-cg":
        return IFAttributorCG(task=task, device=dev, max_iter=int(kw.get("max_iter", CG_ITERATIONS)),
                              regularization=lam)
    if method == "if-lissa":
        return IFAttributorLiSSA(task=task, device=dev, batch_size=LISSA["batch_size"],
                                 recursion_depth=int(kw.get("recursion_depth", LISSA["recursion_depth"])),
                                 damping=lam, scaling=LISSA["scaling"])
    if method == "if-arnoldi":
        return IFAttributorArnoldi(task=task, device=dev, proj_dim=int(kw.get("proj_dim", ARNOLDI["proj_dim"])),
                                   max_iter=ARNOLDI["max_iter"], regularization=lam)
    if method == "if-ekfac":
        return corrected_ekfac()(task=task, device=dev, damping=lam)
    if method == "if-ekfac-stock":  # dattri's class as shipped: its Fisher comes from the target, so give it the loss
        return IFAttributorEKFAC(task=AttributionTask(loss_func=loss, model=model, checkpoints=theta0), device=dev,
                                 damping=lam)
    return IFAttributorDataInf(task=task, device=dev, regularization=lam)


def dattri_grid(method: str, model: torch.nn.Module, train: TensorDataset, query: TensorDataset, *,
                grid=DAMPING_GRID, checkpoints: Optional[list] = None, ensemble: Optional[list] = None,
                on_row=None, device: str | torch.device = "cpu", train_signal: str = "loss", **kw) -> list[dict]:
    """One dattri method at every damping of ``grid`` (a single run, damping ``None``, for methods without
    the knob): ``[{"damping", "scores" (n_train, n_query), "seconds"}]``. The curvature is cached from the
    full training set in one batch; the training set is attributed in one batch and the queries in as few
    as memory allows. Where the library keeps the cache valid across dampings (EK-FAC, DataInf), it is
    computed once and each value's seconds are cache + attribute.

    Args:
        checkpoints: for ``tracin``: ``[{"state": state_dict, "lr": float}, ...]`` along the trajectory.
        ensemble: for ``trak``: state dicts of independently trained models (theta0 first).
        on_row: called with each row as soon as it is computed.
        train_signal: the training-side function, "loss" or "margin" (``TRAIN_SIGNAL_METHODS`` only).
        device: where the attributors run (the model's copy is moved there; ``checkpoints`` and ``ensemble`` may be
            on any device); the scores come back on the CPU.
        kw: overrides (``max_iter``, ``proj_dim``, ``recursion_depth``).
    """
    if method not in DATTRI_METHODS:
        raise ValueError(f"method must be one of {DATTRI_METHODS}, got {method!r}")
    check_train_signal(method, train_signal)
    dev = baseline_device(device)
    model = copy.deepcopy(model).eval().to(dev)
    sample_ndim = train.tensors[0].ndim - 1
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = DataLoader(train, batch_size=len(train), shuffle=False)
    qb = 32 if method == "datainf" else len(query)
    queries = DataLoader(query, batch_size=qb, shuffle=False)
    values = list(grid) if method in DAMPED else [None]
    reuse = method in ("if-ekfac", "if-ekfac-stock", "datainf")
    out, att, cache_s = [], None, 0.0
    for damping in values:
        t0 = time.perf_counter()
        if att is None or not reuse:
            att = _attributor(method, model, train, sample_ndim, theta0, damping, checkpoints, ensemble, kw, dev,
                              train_signal)
            if method != "tracin" and not method.startswith("grad-"):
                att.cache(full)
            cache_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        elif method == "datainf":
            att.regularization = damping
        else:
            att.damping = damping
        with torch.no_grad():
            s = att.attribute(queries) if method == "trak" else att.attribute(full, queries)
        out.append({"damping": damping, "scores": s.detach().float().cpu(),
                    "seconds": cache_s + time.perf_counter() - t0})
        if on_row is not None:
            on_row(out[-1])
    return out


def kronfluence_grid(model: torch.nn.Module, train: TensorDataset, query: TensorDataset, *, grid=DAMPING_GRID,
                     empirical_fisher: bool = False, batch_size: int = 128, workdir=None, on_row=None,
                     device: str | torch.device = "cpu", train_signal: str = "loss") -> list[dict]:
    """kronfluence's EK-FAC influence scores ``(n_train, n_query)`` (positive = helpful) at every damping of
    ``grid`` (``None`` in the grid: kronfluence's own heuristic, 0.1 x the mean eigenvalue): the factors are
    fitted once and each value's seconds are fitting + scoring. The query measurement is minus the margin,
    as in kronfluence's CIFAR-10 example; ``empirical_fisher`` uses the true labels for the factors; ``train_signal=
    "margin"`` takes the training gradients of minus the margin (the factors still from the loss, with sampled labels;
    not with ``empirical_fisher``, whose factors come from the training function itself). ``device``: the
    CPU (``Analyzer(cpu=True)``) or CUDA (``cpu=False``); the scores come back on the CPU."""
    from kronfluence.task import Task as KTask

    from ..ekfac import ekfac_grid

    check_train_signal("kronfluence-ekfac-ef" if empirical_fisher else "kronfluence-ekfac", train_signal)
    dev = baseline_device(device)

    class _Task(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(1)
            elif train_signal == "margin":  # the training gradients (the sampled Fisher's factors keep the loss)
                return -margin(logits, y).sum()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return -margin(model(x), y).sum()

    return ekfac_grid(model, _Task(), train, query, grid=grid, empirical_fisher=empirical_fisher,
                      batch_size=batch_size, device=dev, workdir=workdir, on_row=on_row)


def run_grid(method: str, model, train, query, *, grid=DAMPING_GRID, on_row=None, device: str | torch.device = "cpu",
             **kw) -> list[dict]:
    """``[{"damping", "scores", "seconds"}]`` of one baseline (``METHODS``) over the damping grid, run on ``device``
    (scores on the CPU); ``on_row`` is called with each row as soon as it is computed (a row may be sent again when
    Arnoldi is retried)."""
    if method in KRONFLUENCE_METHODS:
        return kronfluence_grid(model, train, query, grid=grid, empirical_fisher=method.endswith("-ef"),
                                batch_size=kw.get("batch_size", 128), on_row=on_row, device=device,
                                train_signal=kw.get("train_signal", "loss"))
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out = dattri_grid(method, model, train, query, grid=grid, on_row=on_row, device=device, **kw)
    # dattri's Arnoldi returns NaN when proj_dim reaches the Hessian's numerical rank: halve it
    while method == "if-arnoldi" and not all(torch.isfinite(r["scores"]).all() for r in out) and kw.get(
            "proj_dim", ARNOLDI["proj_dim"]) > 10:
        kw = {**kw, "proj_dim": kw.get("proj_dim", ARNOLDI["proj_dim"]) // 2}
        out = dattri_grid(method, model, train, query, grid=grid, on_row=on_row, device=device, **kw)
    return out


def run(method: str, model, train, query, damping: Optional[float] = 1e-3, *, device: str | torch.device = "cpu",
        **kw) -> tuple[torch.Tensor, float]:
    """``(scores (n_train, n_query), seconds)`` of one baseline at one damping (ignored without the knob), run on
    ``device`` (scores on the CPU)."""
    r = run_grid(method, model, train, query, grid=(damping,), device=device, **kw)[0]
    return r["scores"], r["seconds"]


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
        run_grid(method, model, train, query, on_row=lambda r: conn.send(("row", {**r, "scores": r["scores"].numpy()})),
                 **kw)
        conn.send(("done", None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {str(e)[:300]}"))
    finally:
        conn.close()


def _spawned_child(conn, payload: bytes):
    """``_child`` in a spawned process. The arguments come as one pickle of plain bytes, not through the sharing of
    torch's multiprocessing pickler (which would put every tensor in shared memory, and a container's small /dev/shm
    breaks that)."""
    import pickle

    try:
        method, model, train, query, kw = pickle.loads(payload)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"the arguments did not unpickle: {type(e).__name__}: {str(e)[:300]}"))
        conn.close()
        return
    _child(conn, method, model, train, query, kw, 0)


def _spawn_payload(args) -> tuple[Optional[bytes], Optional[str]]:
    """``(pickle of args, None)``, or ``(None, why)`` when a spawned process could not get them: something that does
    not pickle, or a class or function defined in ``__main__`` (a notebook's own model class), which the spawned
    interpreter does not have."""
    import io
    import pickle
    import types

    class _Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) == "__main__":
                raise pickle.PicklingError(f"{obj.__qualname__} is defined in __main__")
            return NotImplemented

    buf = io.BytesIO()
    try:
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(args)
    except Exception as e:  # noqa: BLE001 - any failure means: do not spawn
        return None, f"{type(e).__name__}: {str(e)[:300]}"
    return buf.getvalue(), None


def _run_here(method, model, train, query, kw, why: str) -> list[dict]:
    """``run_grid`` in this process (no time or memory cap), with ``run_isolated``'s rows and errors."""
    import warnings

    warnings.warn(f"{method}: run in this process, without the time or memory cap of run_isolated, because {why}",
                  stacklevel=3)
    rows, error = {}, None

    def keep(row):  # by damping: Arnoldi's retry sends its rows again
        rows[row["damping"]] = row

    try:
        run_grid(method, model, train, query, on_row=keep, **kw)
    except Exception as e:  # noqa: BLE001 - reported like the child's errors
        error = f"{type(e).__name__}: {str(e)[:300]} (in this process: {why})"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if error is not None and not rows:
        raise RuntimeError(f"{method}: {error}")
    return [{**r, "grid_complete": error is None, "grid_error": error} for r in rows.values()]


def run_isolated(method: str, model, train, query, *, timeout: float = 120.0, memory_gb: float = 4.0,
                 device: str | torch.device = "cpu", **kw) -> list[dict]:
    """``run_grid`` in a forked child process with a memory cap (address space grown by at most ``memory_gb``)
    and a wall-clock ``timeout`` for the whole grid: a baseline that blows up on a shared machine fails alone,
    with a reason. Returns ``run_grid``'s rows; when the time runs out after some dampings, the rows finished
    so far, each marked ``"grid_complete": False`` with the reason in ``"grid_error"``. Raises ``RuntimeError``
    with the reason when no row came.

    On CUDA (``device``) the child is spawned, not forked, and has no memory cap (see the comments); where the
    arguments cannot go to a spawned process (a model class defined in the notebook itself, something that does not
    pickle), the grid runs in this process, with a warning and without the time and memory caps."""
    import multiprocessing as mp

    dev = baseline_device(device)
    kw = {**kw, "device": str(dev)}
    # the child gets the model on the CPU (a forked child must not touch CUDA; see below); ``checkpoints`` and
    # ``ensemble`` are expected there already (``daunce.experiments.vision`` keeps them on the CPU)
    on_cpu = all(t.device.type == "cpu" for t in model.state_dict().values())
    cpu_model = model if on_cpu else copy.deepcopy(model).cpu()
    if dev.type == "cpu":
        ctx, mem_bytes = mp.get_context("fork"), memory_gb * 2**30
        target, args = _child, (method, cpu_model, train, query, kw, mem_bytes)
    else:
        # CUDA does not survive fork: a forked child cannot initialise CUDA once this process has, so the child is a
        # spawned interpreter that gets the arguments pickled. It gets no address-space cap: CUDA reserves far more
        # virtual memory than the cap would allow, and GPU memory is not covered by it anyway.
        payload, why = _spawn_payload((method, cpu_model, train, query, kw))
        if payload is None:
            # no spawned child can get these arguments, and a forked one cannot use CUDA: run here
            return _run_here(method, model, train, query, kw, f"its arguments cannot go to a spawned process ({why})")
        ctx, mem_bytes = mp.get_context("spawn"), 0
        target, args = _spawned_child, (payload,)
    cap = f"memory cap {memory_gb} GB" if mem_bytes else f"on {dev}, no memory cap"
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(child, *args))
    p.start()
    child.close()
    rows, deadline, error = {}, time.monotonic() + timeout, None
    while True:
        if not parent.poll(max(0.0, deadline - time.monotonic())):
            p.kill()
            error = f"no complete grid within {timeout:.0f} s on this machine"
            break
        try:
            kind, payload = parent.recv()
        except EOFError:
            error = "the child process died (memory cap or signal)" if mem_bytes else "the child process died"
            break
        if kind == "row":
            rows[payload["damping"]] = {**payload, "scores": torch.from_numpy(payload["scores"])}
        else:
            if kind == "error":
                error = f"{payload} ({cap})"
            break
    p.join()
    if error is not None and not rows:
        raise RuntimeError(f"{method}: {error}")
    return [{**r, "grid_complete": error is None, "grid_error": error} for r in rows.values()]


def settings_key(method: str, model, train, query, grid, device: str | torch.device = "cpu",
                 train_signal: str = "loss") -> str:
    """A hash of everything a baseline's scores depend on: the method and its library settings, the grid, theta0,
    both datasets and, when it is not the CPU, the device type (the key of the CPU is the one it was before the
    device knob, so existing caches stay valid) and ``train_signal`` when it is not the loss; it names the cache file
    of ``run_cached``."""
    import hashlib
    import json

    from ..store import fingerprint

    settings = {"method": method, "grid": list(grid), "lissa": LISSA, "cg": CG_ITERATIONS, "arnoldi": ARNOLDI,
                "trak": TRAK_PROJ_DIM, "train": fingerprint(train), "query": fingerprint(query)}
    dev = baseline_device(device)
    if dev.type != "cpu":  # another device gives other numbers (TRAK's and TracIn's projections, float rounding)
        settings["device"] = dev.type
    if train_signal != "loss":
        settings["train_signal"] = train_signal
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for v in model.state_dict().values():
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def run_cached(method: str, model, train, query, *, cache_dir, grid=DAMPING_GRID, device: str | torch.device = "cpu",
               **kw) -> list[dict]:
    """``run_isolated`` with its rows kept in ``cache_dir`` (one file per method and settings): a rerun reads
    the scores and the seconds measured when they were computed; a complete grid is not run again. An
    incomplete one (time cap) is kept, and the next call runs only the values it lacks (under the same time
    cap), so a rerun costs the missing values alone and can complete it. ``device`` is where the grid runs
    (``run_isolated``); the cache of a CUDA run is kept apart from the CPU one (``settings_key``)."""
    from pathlib import Path

    from ..store import atomic_save

    key = settings_key(method, model, train, query, grid, device, kw.get("train_signal", "loss"))
    path = Path(cache_dir) / f"{method}_{key}.pt"
    old = torch.load(path, weights_only=False) if path.exists() else []
    if old and all(r["grid_complete"] for r in old):
        return old
    done = {r["damping"] for r in old}
    todo = [d for d in grid if d not in done]
    try:
        new = run_isolated(method, model, train, query, grid=todo or list(grid), device=device, **kw)
    except RuntimeError:
        if old:  # an earlier partial grid is better than none
            return old
        raise
    error = next((r["grid_error"] for r in new if not r["grid_complete"]), None)
    order = {d: i for i, d in enumerate(grid)}
    rows = sorted([r for r in old if r["damping"] not in {x["damping"] for x in new}] + new,
                  key=lambda r: order.get(r["damping"], len(order)))
    rows = [{**r, "grid_complete": error is None, "grid_error": error} for r in rows]
    atomic_save(rows, path)
    return rows
