"""Parallel efficiency of the fan-outs that run the notebooks' jobs: the same work with 1 and with 2 workers.

Two jobs of ``notebooks/02_vision_lds.ipynb``'s default profile, each run with ``workers=1`` and ``workers=2``
(``daunce.parallel.fork_map``: forked single-threaded processes) in this one run, in the order 1, 2, 2, 1 so that
a drift of the machine's speed falls on both counts alike, after one unmeasured run that pays the process's
one-time start-up costs (the first retrain of a fresh process took 10x the others):

* ``ground truth``: ``--retrains`` LDS retrains of the ResNet (its theta0 recipe from scratch on random half-subsets
  of its data: the notebook's costliest retrains; the MLP's take about 0.1 s each, less than a fork's overhead);
* ``sets of copies``: ``--sets`` sets of K = ``--k`` Daunce copies of the logistic regression (the tuning grid's
  form: "if", orthogonal perturbations, the stopping test), as ``copyruns.run_jobs`` trains them.

The speed-up is ``T_1 / T_2`` (mean of the two measurements of each), the efficiency ``speed-up / 2``. The
outputs of the two worker counts are compared bit for bit (they must be identical: ``tests/test_parallel.py``).
The README's cold times on more cores are predicted from the efficiency here (``daunce.experiments.report``).

    .venv/bin/python benchmarks/parallel_efficiency.py          # about 5 minutes on 2 cores

Results: ``benchmarks/results/parallel_efficiency.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common
import torch

from daunce import DaunceConfig, parallel
from daunce.experiments import copyruns, groundtruth, vision


def ground_truth_job(n_retrains: int):
    s = vision.settings("default")["resnet"]
    train, query = vision.load_data(s)
    subsets = groundtruth.half_subsets(len(train), n_retrains, 0.5, seed=1234)

    def run(workers: int, folder: Path):
        out = groundtruth.retrain_outputs(lambda seed: vision.make_model(s, train, seed),
                                          lambda m, d, seed: vision.fit(m, d, s.recipe, seed)[0], train, query,
                                          subsets, 1, workdir=folder, progress=False, workers=workers)
        return out["outputs"]
    return run


def copy_sets_job(n_sets: int, k: int):
    s = vision.settings("default")["lr"]
    train, query = vision.load_data(s)
    model = vision.train_target(s, train)["model"]
    dampings = [10.0 ** (-1 - j / 2) for j in range(n_sets)]

    def run(workers: int, folder: Path):
        jobs = [copyruns.CopyJob(f"d{d:g}", model, DaunceConfig(n_models=k, damping=d, isotropic_noise=False,
                                                               perturbation="orthogonal", subset_ratio=0.5),
                                 folder / f"d{d:g}", train, query, orthogonal_block=k) for d in dampings]
        runs = copyruns.run_jobs(jobs, workers=workers)
        return torch.cat([runs[j.tag].train["loss"].flatten() for j in jobs])
    return run


def measure(run, name: str) -> dict:
    times, outs = {1: [], 2: []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        with parallel.single_threaded():   # the first run of a process pays one-time costs (library start-up)
            run(1, Path(tmp) / "warm-up")
        for i, w in enumerate((1, 2, 2, 1)):
            t0 = time.perf_counter()
            outs[w] = run(w, Path(tmp) / f"run{i}")   # a fresh folder: nothing is read back
            times[w].append(time.perf_counter() - t0)
    t1, t2 = sum(times[1]) / 2, sum(times[2]) / 2
    row = {"job": name, "seconds_1_worker": round(t1, 1), "seconds_2_workers": round(t2, 1),
           "speedup": round(t1 / t2, 2), "efficiency": round(t1 / t2 / 2, 2),
           "identical_outputs": bool(torch.equal(outs[1], outs[2]))}
    print(row, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--retrains", type=int, default=4)
    ap.add_argument("--sets", type=int, default=4)
    ap.add_argument("--k", type=int, default=64)
    args = ap.parse_args()
    rows = [measure(ground_truth_job(args.retrains), f"ground truth: {args.retrains} ResNet retrains"),
            measure(copy_sets_job(args.sets, args.k), f"sets of copies: {args.sets} x K = {args.k}, logistic regression")]
    mean_eff = sum(r["efficiency"] for r in rows) / len(rows)
    notes = (f"The same work with 1 and 2 workers (`daunce.parallel.fork_map`), measured in one run on "
             f"{parallel.available_cores()} cores. Mean efficiency {mean_eff:.2f}: "
             "`.venv/bin/python benchmarks/parallel_efficiency.py` reproduces it.")
    _common.write("parallel_efficiency", "Parallel efficiency: 1 against 2 workers", notes, rows,
                  ["job", "seconds_1_worker", "seconds_2_workers", "speedup", "efficiency", "identical_outputs"])
    (_common.RESULTS / "parallel_efficiency.json").write_text(json.dumps(
        {"machine": _common.machine(), "cores": parallel.available_cores(), "rows": rows, "mean_efficiency": mean_eff},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
