"""Seconds of the K copies' signal pass of a LoRA model: one pass per copy against peft mixed-adapter batches.

The setting of notebooks/03_llm_subset_removal.ipynb (default profile): SmolLM2-135M-Instruct with rank-8
LoRA adapters on the MLP of its top 4 decoder layers, the 26 layers below cached as features
(``llm.split_model`` + ``llm.bottom_features``), CHAMP math examples of at most 128 tokens, eval batch 16.
K copies are trained with a cheap configuration (one Adam step on 2 of 4 examples: only their
weights matter here, and they differ), then ``Daunce.signals`` is timed on ``--n`` other examples,
on a fresh ``Daunce`` object per measurement (so nothing is cached), with
``signal_path="sequential"`` (load each copy, one pass each) and ``signal_path="multi-adapter"``
(blocks of copies as adapters of one model, each batch repeated once per copy of the block and routed
with peft's ``adapter_names``). Both timings include the one-off costs of a call (the working copy of
the model; for multi-adapter, the routing check and creating the adapter slots).

The sequential pass costs the same for every copy, so it is measured on ``--seq-copies`` copies and
reported per copy; the multi-adapter pass is measured at every K.

    .venv/bin/python benchmarks/lora_signals.py                       # SmolLM2, K = 4 8 16
    .venv/bin/python benchmarks/lora_signals.py --model tiny --ks 4 8 16 --tag _tiny
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import _common
import torch

import daunce
from daunce import llm
from daunce.experiments import textdata


def setup(name: str, n: int, n_top: int, r: int, max_length: int, eval_batch: int):
    """(LoRA model on the top layers, training set of 4, evaluation set of n), as notebook 03 builds them."""
    if name == "smollm2":
        base, tok = llm.load_smollm2()
    else:
        base, tok = llm.tiny_llama(seed=0, num_layers=2)
        n_top = min(n_top, 1)
    n_layers = len(llm.backbone_and_head(base)[0].layers)
    model = llm.add_lora(llm.split_model(base, n_top), r=r, alpha=2 * r, seed=0)
    examples = llm.fitting(tok, textdata.champ_math(), max_length)
    if len(examples) < n + 4:
        raise SystemExit(f"only {len(examples)} CHAMP examples fit max_length={max_length}; lower --n")
    sets = []
    for part in (examples[:4], examples[4 : 4 + n]):
        ds = llm.TextDataset(tok, part, max_length)
        sets.append(ds.with_features(llm.bottom_features(base, ds, n_layers - n_top, eval_batch)))
    return model, sets[0], sets[1], n_layers


def timed_signals(model, cfg, workdir: Path, evalset, path: str, K: int, eval_batch: int):
    """(CPU seconds, wall seconds, signals, block) of ``Daunce.signals(evalset)`` for the first K copies."""
    shutil.rmtree(workdir / "signals", ignore_errors=True)  # signals stored by an earlier measurement
    c0, t0 = time.process_time(), time.perf_counter()
    d = daunce.Daunce(model, llm.CausalLMTask(), cfg.replace(n_models=K), workdir=workdir, progress=False,
                      eval_batch_size=eval_batch, signal_path=path)
    S = d.signals(evalset)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    assert d.signal_path_used == path, d.signal_path_reason
    return cpu, wall, S, getattr(d, "adapter_block_used", 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--ks", nargs="+", type=int, default=[4, 8, 16])
    ap.add_argument("--n", type=int, default=40, help="examples whose signals are computed")
    ap.add_argument("--n-top", type=int, default=4, help="decoder layers with LoRA (the rest cached)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--seq-copies", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    importlib.import_module("torch._dynamo")  # torch.optim imports it on first use: keep it out of the timings
    warnings.simplefilter("ignore")

    model, train, evalset, n_layers = setup(args.model, args.n, args.n_top, args.lora_r, args.max_length,
                                            args.eval_batch)
    n_top = min(args.n_top, 1) if args.model == "tiny" else args.n_top
    cfg = daunce.DaunceConfig(subset_ratio=0.5, rho=0.3, damping=1e-3, lr=2e-3, batch_size=2, steps=1, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        Kmax = max(max(args.ks), args.seq_copies)
        daunce.Daunce(model, llm.CausalLMTask(), cfg.replace(n_models=Kmax), workdir=work, progress=False,
                      eval_batch_size=args.eval_batch).fit(train)
        seq_cpu, seq_wall, S_seq, _ = timed_signals(model, cfg, work, evalset, "sequential", args.seq_copies,
                                                    args.eval_batch)
        seq_cpu, seq_wall = seq_cpu / args.seq_copies, seq_wall / args.seq_copies
        for K in args.ks:
            cpu, wall, S, block = timed_signals(model, cfg, work, evalset, "multi-adapter", K, args.eval_batch)
            m = min(K, args.seq_copies)
            diff = float((S[:m] - S_seq[:m]).abs().max())
            rows.append({"model": args.model, "K": K, "block": block, "sequential CPU s": f"{seq_cpu * K:.1f}",
                         "multi-adapter CPU s": f"{cpu:.1f}", "speed-up (CPU)": f"{seq_cpu * K / cpu:.2f}x",
                         "sequential wall s": f"{seq_wall * K:.1f}", "multi-adapter wall s": f"{wall:.1f}",
                         "max abs diff": f"{diff:.1e}"})
            print(rows[-1], flush=True)
    T = evalset.enc["input_ids"].shape[1]
    command = (f".venv/bin/python benchmarks/lora_signals.py --model {args.model} --ks {' '.join(map(str, args.ks))} "
               f"--n {args.n} --n-top {args.n_top} --lora-r {args.lora_r} --max-length {args.max_length} "
               f"--eval-batch {args.eval_batch} --seq-copies {args.seq_copies} --threads {args.threads}"
               + (f" --tag {args.tag}" if args.tag else ""))
    _common.write(
        f"lora_signals{args.tag}", "Signals of K LoRA copies: one pass per copy vs peft mixed-adapter batches",
        f"{args.model}: LoRA r={args.lora_r} on the MLP of the top {n_top} of {n_layers} decoder layers "
        f"(the bottom ones cached as features, as in notebook 03); `Daunce.signals` on {args.n} CHAMP math "
        f"examples (padded length {T}), eval batch {args.eval_batch}, for the first K stored copies. "
        f"Sequential: one pass per copy, measured on {args.seq_copies} copies and scaled to K. Multi-adapter: "
        f"`block` copies per pass (the default 2 GiB activation budget), every batch repeated once per copy. "
        f"Seconds include the one-off costs of a call (working copy of the model; routing check and adapter "
        f"slots). `max abs diff`: largest difference between the two paths' signals (mean response NLL) on "
        f"the copies both computed. CPU seconds of this process ({args.threads} torch thread(s)) are the fair "
        f"measure on this shared machine. Command: `{command}`.",
        rows, ["model", "K", "block", "sequential CPU s", "multi-adapter CPU s", "speed-up (CPU)",
               "sequential wall s", "multi-adapter wall s", "max abs diff"])


if __name__ == "__main__":
    main()
