"""Seconds per perturbed copy: the sequential trainer against the vmap trainer.

Fashion-MNIST (5,000 training images, 100 queries), ``DaunceConfig(batch_size=256, epochs=1)`` (the
default subset ratio 0.5, so 10 Adam steps per copy), each copy's signals on all 5,100 examples
recorded, as ``Daunce.fit(train, query)`` does. Models: the MLP 784-64-10 and ``small_cnn``.
Sequential time per copy is measured on ``--seq-copies`` copies (copies are independent, so its
cost is linear in K); vmap is measured at every K, in one block.

A second regime, ``--regime small-batch`` (batch 32, 100 steps per copy), shows where vmap helps most:
many small steps, where the sequential loop is dominated by per-step overhead.

    .venv/bin/python benchmarks/trainers.py                      # both models, K = 8 32 64 128
    .venv/bin/python benchmarks/trainers.py --models mlp --ks 64 --regime small-batch
"""

from __future__ import annotations

import argparse
import importlib
import time

import _common
import torch

from daunce import ClassificationTask, Daunce, DaunceConfig
from daunce.experiments import data, models

REGIMES = {
    "epoch": dict(batch_size=256, epochs=1, lr=1e-3),
    "small-batch": dict(batch_size=32, steps=100, lr=1e-3),
}


def setup(name: str, n_train: int, hidden: int = 64):
    train, query = data.fashion_mnist(n_train, 100, seed=0)
    if name == "mlp":
        model = models.seeded(models.mlp, 0, 784, 10, hidden=hidden)
    else:
        model = models.seeded(models.small_cnn, 0)
        train = torch.utils.data.TensorDataset(train.tensors[0].view(-1, 1, 28, 28), train.tensors[1])
        query = torch.utils.data.TensorDataset(query.tensors[0].view(-1, 1, 28, 28), query.tensors[1])
    return model, train, query


def seconds_per_copy(model, train, query, cfg, trainer, **kw):
    """(CPU seconds per copy, wall seconds per copy, vmap block) of ``Daunce.fit(train, query)``.

    CPU time of this process is the headline number: on a shared machine wall time mostly measures
    the other users' load; with one torch thread CPU time is the work done."""
    c0, t0 = time.process_time(), time.perf_counter()
    d = Daunce(model, ClassificationTask(), cfg, trainer=trainer, progress=False, **kw).fit(train, query)
    assert d.trainer_used == trainer, d.trainer_reason
    K = cfg.n_models
    return (time.process_time() - c0) / K, (time.perf_counter() - t0) / K, getattr(d, "vmap_block_used", 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--ks", nargs="+", type=int, default=[8, 32, 64, 128])
    ap.add_argument("--seq-copies", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--hidden", type=int, default=64, help="hidden width of the MLP")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--regime", choices=list(REGIMES), default="epoch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    importlib.import_module("torch._dynamo")  # torch.optim imports it on first use: keep it out of the timings

    rows = []
    for name in args.models:
        model, train, query = setup(name, args.n_train, args.hidden)
        base = DaunceConfig(**REGIMES[args.regime])
        Daunce(model, ClassificationTask(), base.replace(n_models=2, steps=2, epochs=1), progress=False).fit(train)  # warm-up
        seq, seq_wall, _ = seconds_per_copy(model, train, query, base.replace(n_models=args.seq_copies), "sequential")
        for K in args.ks:
            vm, vm_wall, block = seconds_per_copy(model, train, query, base.replace(n_models=K), "vmap")
            rows.append({"model": name, "n_train": args.n_train, "K": K, "vmap block": block, "sequential CPU s/copy": f"{seq:.3f}",
                         "vmap CPU s/copy": f"{vm:.3f}", "speed-up (CPU)": f"{seq / vm:.1f}x",
                         "sequential wall s/copy": f"{seq_wall:.3f}", "vmap wall s/copy": f"{vm_wall:.3f}"})
            print(rows[-1], flush=True)
    cfg_text = ", ".join(f"{k}={v}" for k, v in REGIMES[args.regime].items())
    _common.write(f"trainers_{args.regime}{args.tag}", f"Sequential vs vmap trainer ({args.regime} regime)",
                  f"Fashion-MNIST, {args.n_train} training images + 100 queries; DaunceConfig({cfg_text}); "
                  f"seconds per copy include training and recording the signals of all examples (fit(train, query)). "
                  f"Sequential measured on {args.seq_copies} copies; vmap blocks from the default 2 GiB memory budget. CPU seconds of this process (1 torch thread) are the fair measure on this shared machine; wall seconds are inflated by other users' load. Command: `.venv/bin/python benchmarks/trainers.py "
                  f"--regime {args.regime} --models {' '.join(args.models)} --ks {' '.join(map(str, args.ks))} "
                  f"--n-train {args.n_train} --hidden {args.hidden} --seq-copies {args.seq_copies}`. MLP hidden width {args.hidden}.",
                  rows, ["model", "n_train", "K", "vmap block", "sequential CPU s/copy", "vmap CPU s/copy", "speed-up (CPU)",
                         "sequential wall s/copy", "vmap wall s/copy"])


if __name__ == "__main__":
    main()
