"""The GPU check: what a borrowed accelerator should answer about Daunce, in one run of under 8 minutes.

Five measurements, each written to one JSON file and one markdown table under ``--out``
(default ``benchmarks/results/gpu_check/``):

1. **Trainers.** Seconds per copy of the sequential loop and of the vmap trainer at K = 64 on two
   workloads with generated data: the MLP 784-64-10 on 5,000 Fashion-MNIST-shaped examples (100 full-batch
   Adam steps, notebook 02's default MLP setting) and ``small_cnn`` on 5,000 CIFAR-shaped images
   (3 x 32 x 32, the data size of the ``paper`` profile's ResNet-9; 30 full-batch steps). The vmap trainer
   refuses ResNet-9 itself (BatchNorm running statistics), so the conv workload is the vectorisable CNN.
   Sequential seconds are measured on the first ``seq_copies`` copies (copies are independent, so the
   cost is linear in K) and scaled to K. Check: the two trainers' signals and scores on those copies are
   equal (copy k is the same whatever K; the vmap copies are read back from its workdir).
2. **LoRA signals.** Seconds of ``Daunce.signals`` for K = 4 / 16 / 64 LoRA copies: one pass per copy
   (``signal_path="sequential"``, measured on ``seq_copies`` copies and scaled to K) against peft
   mixed-adapter batches (``signal_path="multi-adapter"``). The model is a ``LlamaConfig`` of
   Qwen2.5-0.5B's size (the ``paper`` profile of notebook 03: 24 layers, hidden 896, MLP 4864, vocabulary
   151,936) with random weights (nothing is downloaded), rank-8 LoRA on the MLP of every layer, float32;
   32 generated examples of 256 tokens (the second half is the response), eval batch 16. Check: equal
   signals.
3. **ResNet-9 copy.** One copy of the ``paper`` profile's recipe (notebook 02: ResNet-9, 5,000 training
   and 500 query images, ``variant="if"``, 200 full-batch Adam steps at lr 1e-2 on half the data,
   orthogonal perturbations) on generated CIFAR-shaped data: seconds per copy, peak GPU memory
   (``torch.cuda.max_memory_allocated``) and the projected time of K = 100 copies at 50,000 images.
   Seconds per copy come from two runs with few and with more steps (a + b * steps, extrapolated to 200
   when the budget does not allow 200), with i.i.d. perturbations (the same training work); what the
   orthogonal design adds, one QR per block of copies, is timed at block 64 and projected to the
   notebook's block of 512.
4. **"auto".** What ``trainer="auto"`` and ``signal_path="auto"`` choose on the device for the four
   models (``trainer_used`` / ``trainer_reason``, ``signal_path_used`` / ``signal_path_reason``).
5. **Shared-input trainer.** Seconds of K = 64 full-batch copies (50 Adam steps, signals of the training set and
   the queries recorded) with the vmap trainer and with the shared-input trainer (``daunce.engines.stacked``) on
   5,000 generated 784-dimensional examples, for notebook 02's MLP written as a class (``models.MLPModule``:
   the trainer reads its ``forward`` with ``torch.fx``) and for the logistic regression; the two trainers are
   timed in interleaved rounds, each keeping its fastest. Check: equal scores; and what ``"auto"`` picks there.

    benchmarks/gpu_check.sh                                    # on a GPU machine (or: python benchmarks/gpu_check.py)
    .venv/bin/python benchmarks/gpu_check.py --dry-run --device cpu --out /tmp/gpu_check   # toy sizes, CPU

Without a CUDA device the script stops with a message, unless ``--device cpu`` is given. ``--dry-run``
runs the same code paths at toy sizes (seconds on a CPU). Data stay on the CPU, as in the notebooks; the
model is moved to the device.

Sizing of the real mode, on paper (one H200). bf16 matrix work would reach ~400 TFLOP/s effective in
models like these (~790 on large square products), but the notebooks run float32: matrix products
without TF32 (PyTorch's default) have ~60 TFLOP/s peak, ~30-40 effective; cuDNN convolutions use TF32 by
default, ~150-250 TFLOP/s effective at these sizes. Data move over PCIe at ~10-25 GB/s after a gather
on the CPU:

* Section 1. MLP: 100 steps x 2,500 examples x 6 x 51k MACs ~ 0.08 TFLOP per copy: the steps are
  overhead-bound (~2-3 ms: kernel launches, gathering 7.8 MB on the CPU and copying it to the device),
  ~0.3 s per sequential copy, 16 measured ~ 5 s; the vmap block of 64 gathers 64 x 7.8 MB = 0.5 GB per
  step (~0.1 s) ~ 10 s. CNN: ~8 GFLOP per step, again transfer-bound: 31 MB per sequential step
  (~15 ms, 16 copies ~ 10 s), 2 GB per vmap step (~0.5-1 s, 30 steps ~ 15-30 s), ~20 GB of activations.
  Warm-ups and the workdirs ~ 10 s. Planned share 100 s.
* Section 2. One signal pass of one copy: 32 x 256 tokens x 2 x 358M non-embedding parameters ~ 5.9 TFLOP,
  plus the head at the response tokens (32 x 127 x 2 x 136M ~ 1.1 TFLOP): ~7 TFLOP, ~0.2 s. Multi-adapter
  K = 4 + 16 + 64 = 84 copy-passes ~ 17 s; sequential 4 copy-passes ~ 1 s; training the 64 copies (one
  Adam step on 2 examples each, 13 MB of adapters written per copy) ~ 10 s; building the model and
  importing transformers/peft ~ 15 s. A block of 64 copies x 16 rows x 256 tokens holds ~ 5 GB per MLP
  activation (a few live at once). Planned share 110 s.
* Section 3. ResNet-9 forward 0.76 GFLOP per image (counted by the script: 6.6M parameters); a copy is
  200 steps x 2,500 images x 3 (forward and backward) ~ 1.1 PFLOP, ~5-8 s with TF32 convolutions (~25 s
  at plain fp32), plus 200 gathers of 31 MB on the CPU and their copies to the device (~3 s);
  full-batch activations ~ 20-30 GB. Four runs of two copies each: one step (warm-up), 5 steps, up to
  200 steps, and 5 steps with the orthogonal design (a float64 QR of a 6.6M x 64 matrix on the CPU,
  3.4 GB, a few seconds). The third run is shortened to what the share allows; planned share 150 s.
* Section 4: two copies of one step per model ~ 10 s (share 30 s). Start-up (imports, CUDA context) ~ 20 s.
* Section 5: a copy is 50 steps x 2,500 examples x 6 x 51k MACs ~ 0.04 TFLOP (the MLP), overhead-bound like
  section 1's: a block of 64 copies ~ 3-5 s per trainer and round, two rounds of two trainers on two models
  ~ 20-40 s with the warm-ups. Planned share 60 s.

Planned total 470 s, expected ~ 290 s (a section that would start after ``--budget-s`` is skipped). A guard checks the wall clock before every section and between
the units inside one: once ``--budget-s`` (default 420 s) has passed, what is left is skipped and the
JSON says so; the longest unit that can start before the limit is about 30 s. Should one run far longer
than planned, a watchdog writes the results so far at ``--budget-s`` + 50 s, marks the section it
interrupted, and ends the process: the run stays under 8 minutes. Every section runs under try/except:
an error is recorded in the JSON and the next section runs. The JSON and the markdown are rewritten
after every section, so a crash keeps what was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check"

# Tolerances of the equality checks (relative to the largest value compared): the two paths do the same
# arithmetic in another order or batch shape, so they agree up to float32 rounding, which training steps
# amplify a little; scores are differences of signals across copies, so they get a looser bound.
WATCHDOG_S = 50  # the watchdog ends the run this long after --budget-s
SIGNAL_RTOL = 1e-3
SCORE_RTOL = 1e-2
SCORE_MIN_CORR = 0.999

REAL = {
    "mlp": {"n_train": 5000, "n_query": 100, "d_in": 784, "hidden": 64, "steps": 100, "K": 64, "seq_copies": 16,
            "vmap_block": 64},
    "cnn": {"n_train": 5000, "n_query": 100, "channels": 3, "image": 32, "width": 8, "steps": 30, "K": 64,
            "seq_copies": 16, "vmap_block": 64},
    "lora": {"preset": "qwen2.5-0.5b", "n_eval": 32, "n_fit": 4, "seq_len": 256, "eval_batch": 16,
             "ks": [4, 16, 64], "seq_copies": 4, "lora_r": 8},
    "resnet9": {"n_train": 5000, "n_query": 500, "width": 64, "image": 32, "steps": 200, "probe_steps": 5,
                "ortho_block": 64, "paper_ortho_block": 512, "project_n": 50000, "project_k": 100},
    "shared": {"n_train": 5000, "n_query": 100, "d_in": 784, "hidden": 64, "steps": 50, "K": 64, "rounds": 2},
}
DRY = {
    "mlp": {"n_train": 96, "n_query": 16, "d_in": 32, "hidden": 16, "steps": 4, "K": 8, "seq_copies": 2,
            "vmap_block": 8},
    "cnn": {"n_train": 48, "n_query": 8, "channels": 3, "image": 8, "width": 2, "steps": 3, "K": 8,
            "seq_copies": 2, "vmap_block": 8},
    "lora": {"preset": "tiny", "n_eval": 6, "n_fit": 4, "seq_len": 12, "eval_batch": 3, "ks": [2, 4],
             "seq_copies": 2, "lora_r": 2},
    "resnet9": {"n_train": 24, "n_query": 8, "width": 2, "image": 32, "steps": 3, "probe_steps": 1,
                "ortho_block": 2, "paper_ortho_block": 512, "project_n": 50000, "project_k": 100},
    "shared": {"n_train": 96, "n_query": 16, "d_in": 32, "hidden": 16, "steps": 3, "K": 4, "rounds": 2},
}
# LlamaConfig sizes (random weights; nothing is downloaded). Qwen2.5 adds biases to q/k/v, which
# changes nothing measurable here.
LLAMA_PRESETS = {
    "qwen2.5-0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                     "max_position_embeddings": 32768},
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 1e5, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 8192},
    "tiny": {"vocab_size": 128, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64},
}
# (key, title, planned seconds); the order is the order of the run
SECTIONS = [
    ("1_trainers", "sequential vs vmap trainer", 100),
    ("2_lora_signals", "LoRA signals: one pass per copy vs multi-adapter", 110),
    ("3_resnet9_copy", "one ResNet-9 copy of the paper profile", 150),
    ("4_auto", "what \"auto\" chooses", 30),
    ("5_shared", "vmap vs shared-input trainer (class-defined MLP, logistic regression)", 60),
]


# ------------------------------------------------------------------------------------------ helpers
class Clock:
    """Wall clock of the run against ``--budget-s``."""

    def __init__(self, budget_s: float, t0: float):
        self.t0 = t0
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def over(self) -> bool:
        return self.left() <= 0


class Run:
    """Device, sizes, clock, the models and data built so far, and a scratch folder for workdirs."""

    def __init__(self, args, torch, t0: float):
        self.args, self.torch = args, torch
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.sizes = copy.deepcopy(DRY if args.dry_run else REAL)
        if args.lora_preset:
            self.sizes["lora"]["preset"] = args.lora_preset
        self.clock = Clock(args.budget_s, t0)
        self.cache: dict = {}  # models and data built once, shared by the sections
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def timed(self, fn, *args, **kw):
        """``(result, wall seconds)`` of ``fn(*args, **kw)``, with the device synchronised around it."""
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.sync()
        return out, time.perf_counter() - t0

    def workdir(self, name: str) -> Path:
        path = self.tmp / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> tuple[int, str]:
        """Peak memory since ``reset_peak``: the device's allocator on CUDA, else the process's peak RSS."""
        if self.cuda:
            return int(self.torch.cuda.max_memory_allocated(self.device)), "torch.cuda.max_memory_allocated"
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "process peak RSS (CPU run)"

    def free(self):
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def compare(a, b) -> dict:
    """Largest absolute and relative difference of two tensors (relative to the largest |a|)."""
    a, b = a.double().cpu(), b.double().cpu()
    diff = float((a - b).abs().max())
    scale = float(a.abs().max())
    return {"max_abs_diff": diff, "rel_diff": diff / scale if scale > 0 else diff}


def corr(a, b) -> float:
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 1.0


def linear_flops(torch, model, run) -> int:
    """FLOPs (2 x multiply-adds) of the ``Linear`` and ``Conv2d`` layers of ``model`` during ``run()``
    (attention products and elementwise work are not counted)."""
    total = [0]

    def hook(m, inputs, out):
        if isinstance(m, torch.nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total[0] += 2 * out.numel() * k
        else:
            total[0] += 2 * out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower()


def fmt_s(x) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    if x >= 3600:
        return f"{x / 3600:.2f} h"
    return f"{x:.3g} s" if x < 100 else f"{x:.0f} s"


def gib(x) -> str:
    return f"{x / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------------------ workloads
def generated_classification(torch, n: int, shape: tuple, seed: int):
    """``(x, y)``: Gaussian inputs labelled by a random linear teacher (10 classes), float32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    w = torch.randn(math.prod(shape), 10, generator=g)
    return x, (x.flatten(1) @ w).argmax(1)


def vision_workload(run: Run, name: str):
    """``(model on the device, train, query, sizes)`` of the MLP, the small CNN or ResNet-9 (built once)."""
    if name in run.cache:
        return run.cache[name]
    torch = run.torch
    from torch.utils.data import TensorDataset

    from daunce.experiments import models

    s = run.sizes[name]
    if name == "mlp":
        shape = (s["d_in"],)
        model = models.seeded(models.mlp, 0, s["d_in"], 10, hidden=s["hidden"])
    elif name == "cnn":
        shape = (s["channels"], s["image"], s["image"])
        model = models.seeded(models.small_cnn, 0, s["channels"], 10, s["width"], s["image"])
    else:
        shape = (3, s["image"], s["image"])
        model = models.seeded(models.resnet9, 0, 10, width=s["width"])
    x, y = generated_classification(torch, s["n_train"] + s["n_query"], shape, seed=1)
    if name == "resnet9":  # BatchNorm statistics of the data, as a trained model would have them
        model.train()
        with torch.no_grad():
            for xb in x[: min(len(x), 2048)].split(256):
                model(xb)
    model.eval()
    model = model.to(run.device)
    n = s["n_train"]
    out = (model, TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), s)
    run.cache[name] = out
    return out


class TokenDataset:
    """Generated chat-like examples of a causal LM: ``T`` random tokens, the first half prompt (no loss),
    the second half response; items are dicts as ``daunce.llm.TextDataset`` gives them. ``tag`` only
    changes the dataset's content hash, so that each timed ``signals`` call computes its signals afresh."""

    def __init__(self, torch, n: int, T: int, vocab: int, seed: int, ignore: int, tag: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, T), generator=g)
        self.labels = self.ids.clone()
        self.labels[:, : T // 2] = ignore  # the label of tokens without loss
        self.mask = torch.ones(n, T, dtype=torch.long)
        self.tag = torch.tensor(tag)

    def retagged(self, tag: int) -> TokenDataset:
        new = copy.copy(self)
        new.tag = self.tag.new_tensor(tag)
        return new

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i], "tag": self.tag}


def lora_workload(run: Run):
    """``(peft LoRA model on the device, fit set, eval set, sizes, description)`` (built once)."""
    if "lora" in run.cache:
        return run.cache["lora"]
    torch = run.torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from daunce import llm

    s = run.sizes["lora"]
    cfg = LlamaConfig(**LLAMA_PRESETS[s["preset"]], tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if run.cuda else []):
        torch.manual_seed(0)
        with run.device:  # random initialisation directly on the device
            base = LlamaForCausalLM(cfg)
    base.requires_grad_(False)
    base.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = llm.add_lora(base, r=s["lora_r"], alpha=2 * s["lora_r"], seed=0)
    model.to(run.device)
    n_base = sum(p.numel() for p in base.parameters())
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fit = TokenDataset(torch, s["n_fit"], s["seq_len"], cfg.vocab_size, seed=2, ignore=llm.IGNORE)
    evalset = TokenDataset(torch, s["n_eval"], s["seq_len"], cfg.vocab_size, seed=3, ignore=llm.IGNORE)
    desc = (f"LlamaConfig {s['preset']}-like ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, MLP "
            f"{cfg.intermediate_size}, vocabulary {cfg.vocab_size}; {n_base / 1e6:.1f}M parameters, random), "
            f"LoRA r={s['lora_r']} on the MLP of every layer ({n_lora:,} trainable), float32")
    out = (model, fit, evalset, s, desc)
    run.cache["lora"] = out
    return out


def daunce_objects():
    from daunce import ClassificationTask, Daunce, DaunceConfig

    return Daunce, DaunceConfig, ClassificationTask


# ------------------------------------------------------------------------------------------ section 1
def vmap_fit(run: Run, make, block: int, *data):
    """``make(vmap_block=block).fit(*data)`` timed, halving the block on out-of-memory."""
    retries = 0
    while True:
        try:
            d, sec = run.timed(make(vmap_block=block).fit, *data)
            return d, sec, block, retries
        except RuntimeError as e:
            if not (run.cuda and is_oom(e)) or block == 1:
                raise
            retries += 1
            block //= 2
            run.free()


def section_trainers(run: Run, deadline: float) -> dict:
    Daunce, DaunceConfig, ClassificationTask = daunce_objects()
    task = ClassificationTask()
    rows, skipped = [], []
    for name in ("mlp", "cnn"):
        if run.clock.elapsed() > deadline:
            skipped.append(f"{name}: the section's share of the budget was used")
            continue
        model, train, query, s = vision_workload(run, name)
        K, m = s["K"], min(s["seq_copies"], s["K"])
        cfg = DaunceConfig(variant="if", n_models=K, subset_ratio=0.5, rho=0.3, damping=1e-2, lr=1e-2,
                           steps=s["steps"], seed=0)
        # warm-up of both trainers (kernels, cuDNN/cuBLAS handles, vmap): two copies of two steps
        warm = cfg.replace(n_models=2, steps=2)
        for trainer in ("sequential", "vmap"):
            Daunce(model, task, warm, progress=False, trainer=trainer, vmap_block=2).fit(train)
        seq_dir, vm_dir = run.workdir(f"{name}_seq"), run.workdir(f"{name}_vmap")
        d_seq = Daunce(model, task, cfg.replace(n_models=m), seq_dir, progress=False, trainer="sequential")
        _, t_seq = run.timed(d_seq.fit, train, query)
        run.reset_peak()
        make = functools.partial(Daunce, model, task, cfg, vm_dir, progress=False, trainer="vmap")
        d_vm, t_vm, block, retries = vmap_fit(run, make, s["vmap_block"], train, query)
        peak, peak_kind = run.peak_memory()
        assert d_seq.trainer_used == "sequential" and d_vm.trainer_used == "vmap", d_vm.trainer_reason
        # equality: the first m copies of both trainers (the vmap ones read back from its workdir)
        sig = compare(d_seq.signals(train), d_vm.signals(train)[:m])
        sig_q = compare(d_seq.signals(query), d_vm.signals(query)[:m])
        back = Daunce(model, task, cfg.replace(n_models=m), vm_dir, progress=False, trainer="vmap", vmap_block=block)
        back.fit(train, query)
        S_seq, S_vm = d_seq.attribute(train, query), back.attribute(train, query)
        sc = compare(S_seq, S_vm)
        rho = corr(S_seq, S_vm)
        seq_per_copy, vm_per_copy = t_seq / m, t_vm / K
        rows.append({
            "workload": name, "K": K, "n_train": len(train), "n_query": len(query), "steps": s["steps"],
            "input_shape": list(train.tensors[0].shape[1:]), "sequential_copies_measured": m,
            "sequential_s_per_copy": seq_per_copy, "sequential_s_at_K": seq_per_copy * K,
            "vmap_s_per_copy": vm_per_copy, "vmap_s_at_K": t_vm, "speedup": seq_per_copy / vm_per_copy,
            "vmap_block": block, "vmap_oom_retries": retries, "vmap_peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "signals_rel_diff": max(sig["rel_diff"], sig_q["rel_diff"]),
            "signals_max_abs_diff": max(sig["max_abs_diff"], sig_q["max_abs_diff"]),
            "scores_rel_diff": sc["rel_diff"], "scores_corr": rho,
            "signals_equal": max(sig["rel_diff"], sig_q["rel_diff"]) <= SIGNAL_RTOL,
            "scores_equal": sc["rel_diff"] <= SCORE_RTOL and rho >= SCORE_MIN_CORR,
        })
        print(f"  {name}: {rows[-1]}", flush=True)
        del d_seq, d_vm, back
        run.free()
    return {"results": rows, "skipped": skipped,
            "config": "DaunceConfig(variant='if', subset_ratio=0.5, rho=0.3, damping=1e-2, lr=1e-2, steps=<steps>) "
                      "full batch, fit(train, query) with a workdir; seconds include recording the signals"}


# ------------------------------------------------------------------------------------------ section 2
def section_lora(run: Run, deadline: float) -> dict:
    Daunce, DaunceConfig, _ = daunce_objects()
    from daunce import llm

    torch = run.torch
    model, fit, evalset, s, desc = lora_workload(run)
    task = llm.CausalLMTask()
    ks, m, eb = s["ks"], s["seq_copies"], s["eval_batch"]
    kmax = max(max(ks), m)
    cfg = DaunceConfig(subset_ratio=0.5, rho=0.3, damping=1e-3, lr=1e-2, batch_size=2, steps=1, seed=0,
                       n_models=kmax)
    work = run.workdir("lora")
    # the copies: one Adam step on 2 of the fit examples each (only their weights matter here, and they differ)
    trainer = Daunce(model, task, cfg, work, progress=False, trainer="sequential", eval_batch_size=eb)
    _, t_fit = run.timed(trainer.fit, fit)
    del trainer
    probe = evalset.retagged(-1)
    batch = task.collate([probe[i] for i in range(min(eb, len(probe)))])
    batch = {k: v.to(run.device) for k, v in batch.items()}

    def one_batch():
        task.signal(task.outputs(model, batch), batch)

    flops = linear_flops(torch, model, one_batch) * len(evalset) / len(batch["input_ids"])

    def timed_signals(path: str, K: int, tag: int, block=None):
        kw = {"adapter_block": block} if block else {}
        d = Daunce(model, task, cfg.replace(n_models=K), work, progress=False, trainer="sequential",
                   eval_batch_size=eb, signal_path=path, **kw)
        S, sec = run.timed(d.signals, evalset.retagged(tag))
        if d.signal_path_used != path:
            raise RuntimeError(f"signal_path={path!r} ran as {d.signal_path_used!r}: {d.signal_path_reason}")
        out = (S, sec, getattr(d, "adapter_block_used", block or 1))
        del d
        run.free()
        return out

    timed_signals("multi-adapter", 2, tag=-2, block=2)  # warm-up: adapter slots, routed kernels
    S_seq, t_seq, _ = timed_signals("sequential", m, tag=1)
    per_copy = t_seq / m
    rows, skipped = [], []
    for j, K in enumerate(ks):
        if run.clock.elapsed() > deadline:
            skipped.append(f"K={K}: the section's share of the budget was used")
            continue
        run.reset_peak()
        S, t, block = timed_signals("multi-adapter", K, tag=2 + j, block=min(K, 64))
        peak, peak_kind = run.peak_memory()
        c = min(K, m)
        cmp = compare(S_seq[:c], S[:c])
        spread = float(S.double().std(0).mean()) if K > 1 else 0.0
        rows.append({
            "K": K, "adapter_block": block, "sequential_s": per_copy * K, "sequential_copies_measured": m,
            "multi_adapter_s": t, "speedup": per_copy * K / t, "max_abs_diff": cmp["max_abs_diff"],
            "rel_diff": cmp["rel_diff"], "between_copy_spread": spread, "signals_equal": cmp["rel_diff"] <= SIGNAL_RTOL,
            "linear_tflop_per_copy_pass": flops / 1e12,
            "sequential_tflops_achieved": flops / per_copy / 1e12,
            "multi_adapter_tflops_achieved": flops * K / t / 1e12,
            "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        })
        print(f"  K={K}: {rows[-1]}", flush=True)
    return {"model": desc, "n_eval": len(evalset), "seq_len": int(evalset.ids.shape[1]), "eval_batch": eb,
            "fit_seconds": t_fit, "copies_trained": kmax, "results": rows, "skipped": skipped}


# ------------------------------------------------------------------------------------------ section 3
def section_resnet(run: Run, deadline: float) -> dict:
    Daunce, DaunceConfig, ClassificationTask = daunce_objects()
    torch = run.torch
    task = ClassificationTask()
    model, train, query, s = vision_workload(run, "resnet9")
    n, q = len(train), len(query)
    # notebook 02, paper profile: base_config(steps=200, lr=1e-2, subset_ratio=0.5), the chosen (rho, damping,
    # isotropic noise) from its grid (0.3, 1e-2, True), orthogonal perturbations
    cfg = DaunceConfig(variant="if", n_models=2, subset_ratio=0.5, rho=0.3, damping=1e-2, isotropic_noise=True,
                       lr=1e-2, steps=s["steps"], seed=0)
    x0 = train.tensors[0][:1].to(run.device)
    fwd_flops = linear_flops(torch, model, lambda: model(x0))
    n_params = sum(p.numel() for p in model.parameters())

    def fit_two(steps: int, perturbation: str = "iid", **kw):
        d = Daunce(model, task, cfg.replace(steps=steps, perturbation=perturbation), run.workdir("resnet9"),
                   progress=False, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "auto" says why it trains ResNet-9 sequentially (BatchNorm)
            return run.timed(d.fit, train, query)

    fit_two(1)  # warm-up (cuDNN algorithms, allocator)
    p = s["probe_steps"]
    d, t_probe = fit_two(p)
    trainer = (d.trainer_used, d.trainer_reason)
    # the longer run: 200 steps if the section's time allows, else as many as fit (then extrapolated)
    per_step = t_probe / (2 * p)
    reserve = 2.5 * t_probe + 10  # the orthogonal-design run and some slack
    avail = min(deadline, run.clock.budget_s) - run.clock.elapsed() - reserve
    steps = int(max(2 * p, min(s["steps"], avail / (2 * per_step)))) if per_step > 0 else s["steps"]
    steps = min(steps, s["steps"])
    run.reset_peak()
    base_mem = int(torch.cuda.memory_allocated(run.device)) if run.cuda else 0
    _, t_main = fit_two(steps)
    peak, peak_kind = run.peak_memory()
    b = max(0.0, (t_main - t_probe) / (2 * (steps - p))) if steps > p else per_step  # seconds per step, one copy
    a = t_probe / 2 - b * p  # the rest of one copy (base cache share, signals of n + q examples, saving)
    per_copy = a + b * s["steps"]
    # the orthogonal design: one QR of an (n + d) x block float64 matrix per block of copies, on the CPU
    ob = s["ortho_block"]
    try:
        _, t_ortho = fit_two(p, "orthogonal", orthogonal_block=ob)
        qr, qr_error = max(0.0, t_ortho - t_probe), None
    except Exception as e:  # noqa: BLE001 - the copy's own numbers above still count
        qr, qr_error = 0.0, f"{type(e).__name__}: {e}"[:500]
    D = n + n_params
    scale_n = s["project_n"] / n
    per_copy_50k = per_copy * scale_n  # full batch of r * n examples at every step, signals of n: linear in n
    pb = s["paper_ortho_block"]
    qr_512_low, qr_512_high = qr * pb / ob, qr * (pb / ob) ** 2  # random draws scale with the block, QR with its square
    projected_peak = base_mem + (peak - base_mem) * scale_n if run.cuda else None
    total_mem = int(torch.cuda.get_device_properties(run.device).total_memory) if run.cuda else None
    train_flops = fwd_flops * (3 * s["steps"] * round(cfg.subset_ratio * n) + n + q)
    res = {
        "model": f"ResNet-9 width {s['width']} ({n_params:,} parameters), input 3x{s['image']}x{s['image']}",
        "trainer_used": trainer[0], "trainer_reason": trainer[1],
        "n_train": n, "n_query": q, "steps": s["steps"], "steps_measured": steps, "probe_steps": p,
        "extrapolated": steps < s["steps"],
        "seconds_per_copy": per_copy, "seconds_per_step": b, "seconds_per_copy_besides_steps": a,
        "forward_gflop_per_image": fwd_flops / 1e9, "tflop_per_copy": train_flops / 1e12,
        "tflops_achieved": train_flops / per_copy / 1e12 if per_copy > 0 else 0.0,
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind, "memory_before_fit_bytes": base_mem,
        "orthogonal_block_measured": ob, "orthogonal_block_seconds": qr,
        "orthogonal_block_host_bytes": D * ob * 8,
        "orthogonal_block_paper": pb, "orthogonal_block_paper_seconds_low": qr_512_low,
        "orthogonal_block_paper_seconds_high": qr_512_high, "orthogonal_block_paper_host_bytes": D * pb * 8,
        "projected_n": s["project_n"], "projected_K": s["project_k"],
        "projected_seconds_per_copy": per_copy_50k,
        "projected_seconds_K": s["project_k"] * per_copy_50k + qr_512_high,
    }
    if qr_error is not None:
        res["orthogonal_error"] = qr_error
    if run.cuda:
        res["projected_peak_memory_bytes"] = projected_peak
        res["device_memory_bytes"] = total_mem
        res["projected_full_batch_fits"] = bool(projected_peak < total_mem)
    print(f"  {res}", flush=True)
    return {"results": res, "notes": (
        "seconds per copy = a + b * steps from two runs of two copies (probe_steps and steps_measured), "
        "with fit(train, query) and a workdir; projection to 50,000 images assumes every per-copy cost is linear "
        "in n (full batch of r * n examples, 200 steps, signals of n examples) and adds one orthogonal block of "
        "512; the block's time is given between linear and quadratic scaling from the measured block; peak "
        "memory at 50,000 images scales the activations (peak minus what was allocated before) by n")}


# ------------------------------------------------------------------------------------------ section 4
def section_auto(run: Run, deadline: float) -> dict:
    Daunce, DaunceConfig, ClassificationTask = daunce_objects()
    rows, skipped = [], []
    cfg = DaunceConfig(variant="if", n_models=2, subset_ratio=0.5, rho=0.3, damping=1e-2, lr=1e-2, steps=1, seed=0)
    for name in ("mlp", "cnn", "resnet9", "lora"):
        if run.clock.elapsed() > deadline:
            skipped.append(f"{name}: the section's share of the budget was used")
            continue
        try:
            if name == "lora":
                from daunce import llm

                model, train, other, s, _ = lora_workload(run)
                task, kw = llm.CausalLMTask(), {"eval_batch_size": s["eval_batch"]}
                c = cfg.replace(batch_size=2)
                other = other.retagged(-3)
            else:
                model, train, other, _ = vision_workload(run, name)
                task, kw, c = ClassificationTask(), {}, cfg
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                d = Daunce(model, task, c, progress=False, trainer="auto", signal_path="auto", **kw)
                d.fit(train)
                d.signals(other)  # signals not recorded during fit: decides the signal path
            row = {"model": name, "trainer_used": d.trainer_used, "trainer_reason": d.trainer_reason,
                   "signal_path_used": d.signal_path_used, "signal_path_reason": d.signal_path_reason}
            for attr in ("vmap_block_used", "adapter_block_used"):
                if isinstance(getattr(d, attr, None), int):
                    row[attr] = getattr(d, attr)
            del d
        except Exception as e:  # noqa: BLE001 - one model's failure is a result, the others still run
            row = {"model": name, "error": f"{type(e).__name__}: {e}"[:500]}
        rows.append(row)
        print(f"  {row}", flush=True)
        run.free()
    return {"results": rows, "skipped": skipped}


# ------------------------------------------------------------------------------------------ section 5
def section_shared(run: Run, deadline: float) -> dict:
    Daunce, DaunceConfig, ClassificationTask = daunce_objects()
    from torch.utils.data import TensorDataset

    from daunce.experiments import models

    torch, task, s = run.torch, ClassificationTask(), run.sizes["shared"]
    x, y = generated_classification(torch, s["n_train"] + s["n_query"], (s["d_in"],), seed=1)
    n, K = s["n_train"], s["K"]
    train, query = TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])
    cfg = DaunceConfig(variant="if", n_models=K, subset_ratio=0.5, rho=0.3, damping=1e-2, lr=1e-2, steps=s["steps"],
                       seed=0)
    rows, skipped = [], []
    for name in ("mlp_class", "lr"):
        if run.clock.elapsed() > deadline:
            skipped.append(f"{name}: the section's share of the budget was used")
            continue
        if name == "mlp_class":  # notebook 02's MLP written as a class: the trainer traces forward with torch.fx
            model = models.MLPModule.from_sequential(models.seeded(models.mlp, 0, s["d_in"], 10, hidden=s["hidden"]))
        else:
            model = models.seeded(models.logistic_regression, 0, s["d_in"], 10)
        model = model.eval().to(run.device)
        for trainer in ("vmap", "shared"):  # warm-up: kernels, cuBLAS handles, vmap, the fx trace
            Daunce(model, task, cfg.replace(n_models=2, steps=2), progress=False, trainer=trainer).fit(train)
        seconds: dict = {"vmap": [], "shared": []}
        fitted: dict = {}
        for r in range(s["rounds"]):  # interleaved: whatever else loads the machine falls on both
            for trainer in ("vmap", "shared"):
                if r > 0 and run.clock.elapsed() > deadline:
                    break
                d = Daunce(model, task, cfg, progress=False, trainer=trainer, vmap_block=K)
                _, sec = run.timed(d.fit, train, query)
                seconds[trainer].append(sec)
                fitted[trainer] = d
        d_vm, d_sh = fitted["vmap"], fitted["shared"]
        assert d_vm.trainer_used == "vmap" and d_sh.trainer_used == "shared", d_sh.trainer_reason
        S_vm, S_sh = d_vm.attribute(train, query), d_sh.attribute(train, query)
        sc, rho = compare(S_vm, S_sh), corr(S_vm, S_sh)
        auto = Daunce(model, task, cfg, progress=False)
        auto.choose_trainer(train)
        t_vm, t_sh = min(seconds["vmap"]), min(seconds["shared"])
        rows.append({
            "workload": name, "K": K, "n_train": n, "n_query": len(query), "steps": s["steps"], "d_in": s["d_in"],
            "trainable_parameters": d_sh.context.n_params, "vmap_s_at_K": t_vm, "shared_s_at_K": t_sh,
            "vmap_s_per_copy": t_vm / K, "shared_s_per_copy": t_sh / K, "speedup": t_vm / t_sh,
            "vmap_rounds_s": seconds["vmap"], "shared_rounds_s": seconds["shared"],
            "shared_reason": d_sh.trainer_reason, "auto_trainer": auto.trainer_used,
            "shared_layout": d_sh.trainer_reason.split("; layout ")[1].split(":")[0]
            if "; layout " in d_sh.trainer_reason else "",
            "auto_reason": auto.trainer_reason, "scores_rel_diff": sc["rel_diff"], "scores_corr": rho,
            "scores_equal": sc["rel_diff"] <= SCORE_RTOL and rho >= SCORE_MIN_CORR,
        })
        print(f"  {name}: {rows[-1]}", flush=True)
        del d_vm, d_sh, fitted
        run.free()
    return {"results": rows, "skipped": skipped,
            "config": "DaunceConfig(variant='if', subset_ratio=0.5, rho=0.3, damping=1e-2, lr=1e-2, steps=<steps>) "
                      "full batch, fit(train, query) in memory (signals recorded), vmap block = K; each trainer's "
                      "fastest of <rounds> interleaved rounds"}


FUNCS = {"1_trainers": section_trainers, "2_lora_signals": section_lora, "3_resnet9_copy": section_resnet,
         "4_auto": section_auto, "5_shared": section_shared}


# ------------------------------------------------------------------------------------------ report
def markdown_rows(report: dict) -> list[dict]:
    """One table for all sections: section, case, baseline seconds, measured seconds, speed-up, check, notes."""
    rows = []
    for key, title, _ in SECTIONS:
        sec = report["sections"].get(key)
        if sec is None:
            continue
        if sec["status"] != "ok":
            why = sec.get("error", sec.get("reason", ""))
            rows.append({"section": key, "case": title, "notes": f"{sec['status']}: {why}"[:300]})
            continue
        res = sec["results"]
        if key == "1_trainers":
            for r in res:
                rows.append({"section": key, "case": f"{r['workload']} {'x'.join(map(str, r['input_shape']))}, "
                             f"n={r['n_train']}, K={r['K']}",
                             "baseline": f"sequential {fmt_s(r['sequential_s_at_K'])}",
                             "measured": f"vmap {fmt_s(r['vmap_s_at_K'])}", "speed-up": f"{r['speedup']:.2f}x",
                             "check": f"scores equal: {r['scores_equal']} (rel {r['scores_rel_diff']:.1e}); "
                                      f"signals equal: {r['signals_equal']} (rel {r['signals_rel_diff']:.1e})",
                             "notes": f"vmap block {r['vmap_block']}, peak {gib(r['vmap_peak_memory_bytes'])}; "
                                      f"sequential from {r['sequential_copies_measured']} copies"})
        elif key == "2_lora_signals":
            for r in res:
                rows.append({"section": key, "case": f"LoRA signals, K={r['K']}, n={sec['n_eval']} x "
                             f"{sec['seq_len']} tokens",
                             "baseline": f"one pass per copy {fmt_s(r['sequential_s'])}",
                             "measured": f"multi-adapter {fmt_s(r['multi_adapter_s'])}",
                             "speed-up": f"{r['speedup']:.2f}x",
                             "check": f"signals equal: {r['signals_equal']} (max diff {r['max_abs_diff']:.1e}, "
                                      f"spread {r['between_copy_spread']:.1e})",
                             "notes": f"block {r['adapter_block']}; {r['multi_adapter_tflops_achieved']:.1f} vs "
                                      f"{r['sequential_tflops_achieved']:.1f} TFLOP/s (linear layers)"})
        elif key == "3_resnet9_copy":
            r = res
            fits = r.get("projected_full_batch_fits")
            mem = (f"; at {r['projected_n']:,}: {gib(r['projected_peak_memory_bytes'])} "
                   f"({'fits' if fits else 'does not fit'} full batch)") if "projected_peak_memory_bytes" in r else ""
            rows.append({"section": key, "case": f"ResNet-9 copy, n={r['n_train']}, {r['steps']} full-batch steps",
                         "measured": f"{fmt_s(r['seconds_per_copy'])} per copy"
                                     + (" (extrapolated)" if r["extrapolated"] else ""),
                         "check": f"K={r['projected_K']} at {r['projected_n']:,} images: "
                                  f"{fmt_s(r['projected_seconds_K'])}",
                         "notes": f"peak {gib(r['peak_memory_bytes'])}{mem}; {r['tflops_achieved']:.1f} TFLOP/s; "
                                  f"orthogonal block of {r['orthogonal_block_paper']}: "
                                  f"{fmt_s(r['orthogonal_block_paper_seconds_low'])}-"
                                  f"{fmt_s(r['orthogonal_block_paper_seconds_high'])}, "
                                  f"{gib(r['orthogonal_block_paper_host_bytes'])} float64 on the host"})
        elif key == "5_shared":
            for r in res:
                rows.append({"section": key, "case": f"{r['workload']} {r['d_in']} inputs, n={r['n_train']}, "
                             f"K={r['K']}, {r['steps']} steps",
                             "baseline": f"vmap {fmt_s(r['vmap_s_at_K'])}", "measured": f"shared {fmt_s(r['shared_s_at_K'])}",
                             "speed-up": f"{r['speedup']:.2f}x",
                             "check": f"scores equal: {r['scores_equal']} (rel {r['scores_rel_diff']:.1e}, "
                                      f"corr {r['scores_corr']:.6f})",
                             "notes": f"{r['shared_reason'].split('; ')[0]}; layout {r['shared_layout']}; "
                                      f"auto picks {r['auto_trainer']}"})
        else:
            for r in res:
                if "error" in r:
                    rows.append({"section": key, "case": f"auto: {r['model']}", "notes": r["error"][:300]})
                    continue
                rows.append({"section": key, "case": f"auto: {r['model']}",
                             "measured": f"trainer {r['trainer_used']}, signals {r['signal_path_used']}",
                             "notes": f"trainer: {r['trainer_reason'][:200]}; signals: {r['signal_path_reason'][:200]}"})
        for why in sec.get("skipped", []):
            rows.append({"section": key, "case": "skipped", "notes": why})
    return rows


def write(report: dict, out: Path) -> str:
    cols = ["section", "case", "baseline", "measured", "speed-up", "check / projection", "notes"]
    rows = markdown_rows(report)
    table = "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    table += "".join("| " + " | ".join(str(r.get(c.split(" ")[0], "")).replace("|", "/") for c in cols) + " |\n"
                     for r in rows)
    env = report["environment"]
    text = (f"# GPU check ({report['mode']})\n\n"
            f"Device: {env['device_name']}; torch {env['torch']}; {env['cpu_count']} CPU cores; "
            f"{report['finished_at']}; wall {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget. "
            f"Command: `{report['command']}`. Every number is in `gpu_check.json`; `benchmarks/gpu_check.py` "
            f"says what each section measures.\n\n{table}")
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (("gpu_check.json", json.dumps(report, indent=1, sort_keys=True)), ("gpu_check.md", text)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, out / name)
    return text


def environment(run: Run) -> dict:
    torch = run.torch
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(run.device),
           "device_name": platform.processor() or platform.machine()}
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        env.update(device_name=props.name, device_memory_bytes=int(props.total_memory),
                   cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    for mod in ("transformers", "peft"):
        with contextlib.suppress(Exception):
            env[mod] = __import__(mod).__version__
    return env


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto: the CUDA device, or stop when there is none; cpu: run on the CPU anyway")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes: the same code paths in seconds")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"folder of gpu_check.json and gpu_check.md (default {DEFAULT_OUT.relative_to(ROOT)}; "
                         "with --dry-run a new temporary folder)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock limit: sections (and units inside them) that would start later are skipped")
    ap.add_argument("--sections", nargs="+", default=[k for k, _, _ in SECTIONS], metavar="SECTION",
                    help=f"sections to run (default all): {', '.join(k for k, _, _ in SECTIONS)}")
    ap.add_argument("--lora-preset", choices=sorted(LLAMA_PRESETS), default=None,
                    help="size of section 2's LlamaConfig (default qwen2.5-0.5b; tiny with --dry-run)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --dry-run, "
                                                              "else torch's default)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.sections if s not in FUNCS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {list(FUNCS)}")
    return args


def main(argv=None) -> int:
    t0 = time.perf_counter()  # the budget counts from here: imports and start-up included
    args = parse_args(argv)
    import torch

    if args.device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            print(f"gpu_check: no CUDA accelerator found (torch {torch.__version__}, built with CUDA "
                  f"{torch.version.cuda}; torch.cuda.is_available() is False). This check measures GPU speed: run it "
                  "on a GPU machine, or pass --device cpu to run it on the CPU anyway (e.g. with --dry-run).",
                  file=sys.stderr)
            return 2
        args.device = "cuda"
    threads = args.threads or (1 if args.dry_run else None)
    if threads:
        torch.set_num_threads(threads)
    if str(ROOT) not in sys.path:  # the project's own files, wherever the script is started from
        sys.path.insert(0, str(ROOT))
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry_run else DEFAULT_OUT
    run = Run(args, torch, t0)
    report = {"mode": "dry-run" if args.dry_run else "real", "budget_s": args.budget_s,
              "command": " ".join(["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "environment": environment(run), "sizes": run.sizes, "sections": {}, "elapsed_s": 0.0,
              "finished_at": "", "tolerances": {"signals_rel": SIGNAL_RTOL, "scores_rel": SCORE_RTOL,
                                                "scores_min_corr": SCORE_MIN_CORR}}
    print(f"gpu_check ({report['mode']}) on {report['environment']['device_name']}, budget {args.budget_s:.0f} s, "
          f"out {args.out}", flush=True)
    planned = 20.0  # start-up: imports, CUDA context
    current = {}
    lock = threading.Lock()

    def watchdog():
        with lock:
            key = current.get("key")
            if key is not None:
                report["sections"][key] = {"status": "error", "title": current["title"], "error": (
                    f"interrupted by the watchdog at {run.clock.elapsed():.0f} s (--budget-s {args.budget_s:.0f} "
                    f"+ {WATCHDOG_S} s)")}
            report["elapsed_s"] = run.clock.elapsed()
            report["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            print(write(report, args.out), flush=True)
            print(f"gpu_check: stopped by the watchdog; wrote {args.out}", file=sys.stderr, flush=True)
            shutil.rmtree(run.tmp, ignore_errors=True)
            os._exit(3)

    timer = threading.Timer(max(0.0, args.budget_s + WATCHDOG_S - run.clock.elapsed()), watchdog)
    timer.daemon = True
    timer.start()
    try:
        for key, title, share in SECTIONS:
            if key not in args.sections:
                continue
            planned += share if not args.dry_run else 0.0
            start = run.clock.elapsed()
            if run.clock.over():
                report["sections"][key] = {"status": "skipped", "title": title, "reason": (
                    f"the wall clock ({start:.0f} s) passed --budget-s {args.budget_s:.0f} before this section")}
                print(f"[{key}] skipped: budget", flush=True)
                continue
            # a section may run until its planned end (or, when earlier ones were quick, its share from now)
            deadline = min(args.budget_s, max(planned, start + share)) if not args.dry_run else args.budget_s
            print(f"[{key}] {title} (at {start:.0f} s, until {deadline:.0f} s)", flush=True)
            current.update(key=key, title=title)
            try:
                body = FUNCS[key](run, deadline)
                entry = {"status": "ok", **body}
            except Exception as e:  # noqa: BLE001 - record the error, go on with the next section
                entry = {"status": "error", "error": f"{type(e).__name__}: {e}"[:1000],
                         "traceback": traceback.format_exc()[-3000:]}
                print(f"[{key}] error: {entry['error']}", flush=True)
            entry.update(title=title, seconds=run.clock.elapsed() - start, planned_seconds=share)
            with lock:
                current.clear()
                report["sections"][key] = entry
                report["elapsed_s"] = run.clock.elapsed()
                report["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                write(report, args.out)  # after every section: a crash keeps what was measured
            run.free()
    finally:
        timer.cancel()
        shutil.rmtree(run.tmp, ignore_errors=True)
    report["elapsed_s"] = run.clock.elapsed()
    report["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(write(report, args.out), flush=True)
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} in {report['elapsed_s']:.0f} s",
          flush=True)
    return 1 if any(s["status"] == "error" for s in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
