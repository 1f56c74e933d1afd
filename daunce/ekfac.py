"""kronfluence's EK-FAC influence scores for any model and any kronfluence ``Task``, at several dampings.

kronfluence (1.0.x) approximates the curvature of each tracked layer (``nn.Linear``, ``nn.Conv2d``) by a Kronecker
product of its input-activation and output-gradient covariances, re-fits the eigenvalues in that product's eigenbasis
from per-example gradients (EK-FAC), and scores a pair as ``grad f_q^T (F + lambda I)^{-1} grad L_i``, with ``f_q`` the
task's measurement of the query and ``L_i`` its training loss of example i. With a measurement that is a loss (higher =
worse), a positive score means that removing i would raise the query's loss: i helped, the sign convention of this
package. ``F`` is the Fisher of the training loss with labels sampled from the model (kronfluence's default) or, with
``empirical_fisher``, with the true labels; it is the mean over examples, so ``lambda`` is on the scale of the mean
per-example squared gradient.

The caller's ``Task`` decides the losses and which modules are tracked; this module only runs the ``Analyzer``: the
factors once, then the scores at every damping of the grid (``daunce.experiments.baselines.kronfluence_grid`` for the
vision models, ``daunce.llm.ekfac_scores`` for an LLM's LoRA adapters).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch


def _device(device) -> torch.device:
    from .engines.context import resolve_device

    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"kronfluence runs on the CPU or on CUDA, not on {dev}")
    return dev


def ekfac_grid(model: torch.nn.Module, task, train, query, *, grid: Sequence[Optional[float]] = (None,),
               empirical_fisher: bool = False, batch_size: int = 8, device: str | torch.device = "cpu",
               seed: Optional[int] = None, workdir=None, on_row: Optional[Callable[[dict], None]] = None,
               dataloader_kwargs: Optional[dict] = None) -> list[dict]:
    """kronfluence's EK-FAC scores ``(n_train, n_query)`` at every damping of ``grid``.

    Args:
        model: the model at theta0; a deep copy is prepared (``kronfluence.prepare_model``: every parameter frozen,
            the tracked layers wrapped), the model itself is left as it is.
        task: a ``kronfluence.task.Task`` (its ``compute_train_loss`` summed over the batch, ``compute_measurement``,
            and optionally ``get_influence_tracked_modules`` / ``get_attention_mask``).
        train, query: map-style datasets whose default-collated batches the task reads.
        grid: the dampings ``lambda`` (``ScoreArguments.damping_factor``); ``None`` is kronfluence's heuristic, 0.1
            times the mean eigenvalue. The factors are fitted once for the whole grid.
        empirical_fisher: the factors from the true labels (``FactorArguments.use_empirical_fisher``) instead of
            labels sampled from the model.
        device: the CPU (``Analyzer(cpu=True)``) or a CUDA device; the scores come back on the CPU.
        seed: seeds torch's generator while the factors are fitted (the sampled labels), restored after; ``None``
            leaves it as it is.
        workdir: where kronfluence keeps its factors and scores (``None``: a temporary folder).
        on_row: called with each row as soon as it is computed.
        dataloader_kwargs: extra ``torch.utils.data.DataLoader`` arguments (``kronfluence.utils.dataset
            .DataLoaderKwargs``), e.g. a ``collate_fn``.
    Returns: ``[{"damping", "scores": (n_train, n_query) float32 on the CPU, positive = helpful when the measurement
        is a loss, "seconds": fitting + this damping's scoring}]``, in the order of ``grid``.

    kronfluence keeps its device in a process-wide singleton (``kronfluence.utils.state.State``): the first one made
    in a process fixes it. It is made here with the device asked for, and a process where it already holds another
    device is refused with a RuntimeError (run kronfluence on the other device in a fresh process).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    from kronfluence.utils.state import State

    dev = _device(device)
    state = State(cpu=(dev.type == "cpu"))
    if state.device.type != dev.type:
        raise RuntimeError(f"kronfluence already runs on {state.device} in this process (the first use of kronfluence "
                           f"in a process fixes its device), so it cannot run on {dev} here; run it in a fresh process")
    prepared = prepare_model(copy.deepcopy(model).eval().to(dev), task)
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    where = str(workdir) if workdir is not None else tmp.name
    out = []
    # on CUDA kronfluence works on torch.device("cuda"), the current CUDA device: make it the one asked for
    on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    seeded = (torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])
              if seed is not None else contextlib.nullcontext())
    # kronfluence calls gc.collect() around every phase; in a process holding a language model's many objects each
    # collection takes most of a second. Objects that exist before the run are frozen out of those collections (they
    # are the caller's, alive throughout); everything the run creates is still collected.
    gc.freeze()
    try:
        with on_device:
            t0 = time.perf_counter()
            analyzer = Analyzer("daunce_ekfac", prepared, task, cpu=(dev.type == "cpu"), disable_tqdm=True,
                                output_dir=where)
            if dataloader_kwargs:
                analyzer.set_dataloader_kwargs(DataLoaderKwargs(**dataloader_kwargs))
            with seeded:
                if seed is not None:
                    torch.manual_seed(seed)
                analyzer.fit_all_factors("ekfac", train, per_device_batch_size=batch_size,
                                         factor_args=FactorArguments(strategy="ekfac",
                                                                     use_empirical_fisher=empirical_fisher),
                                         overwrite_output_dir=True)
            fit_s = time.perf_counter() - t0
            for damping in grid:
                t0 = time.perf_counter()
                analyzer.compute_pairwise_scores("scores", "ekfac", query, train,
                                                 per_device_query_batch_size=batch_size,
                                                 per_device_train_batch_size=batch_size,
                                                 score_args=ScoreArguments(damping_factor=damping),
                                                 overwrite_output_dir=True)
                s = analyzer.load_pairwise_scores("scores")["all_modules"]  # (n_query, n_train), read onto the CPU
                out.append({"damping": damping, "scores": s.T.contiguous().float().cpu(),
                            "seconds": fit_s + time.perf_counter() - t0})
                if on_row is not None:
                    on_row(out[-1])
    finally:
        gc.unfreeze()
        if tmp is not None:
            tmp.cleanup()
    return out


__all__ = ["ekfac_grid"]
