"""Copies per second as a fraction of this machine's arithmetic floor, old trainers and new side by side.

For each model of ``notebooks/02_vision_lds.ipynb`` (default profile: its data, its theta0 recipe, its Daunce
copies: "if" form, full batch, r = 0.5, orthogonal perturbations; ``--steps`` fixed Adam steps per copy so that
every trainer does the same work), the seconds of one copy's training and of its signal pass (training set and
queries) with each trainer, the copy's FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` on one copy
of the sequential loop (the arithmetic a copy needs: its own subset at every step, forward and backward), the
achieved GFLOP/s, and this machine's float32 matmul rate measured in the same run, so each line reads as a
fraction of the floor. ``speedup_vs_previous`` compares the trainer ``"auto"`` picks now with the one it picked
before the shared-input trainer existed (vmap for the logistic regression and the MLP, the sequential loop for
the CNN), measured in this run. The copies of every trainer are compared with the previous one's: the largest
relative difference of their scores is printed (float rounding only).

``"auto"``'s resolution (the proxy fine-tunes and Lanczos runs of ``daunce.auto``) is timed as a share of
``fit``'s seconds on the logistic regression and the MLP at K = ``--k``.

    .venv/bin/python benchmarks/copy_throughput.py            # about 10 minutes on one core
    .venv/bin/python benchmarks/copy_throughput.py --models lr --k 64 --steps 10

Results: ``benchmarks/results/copy_throughput.{md,json}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import _common
import torch
from torch.utils.flop_counter import FlopCounterMode

from daunce import ClassificationTask, Daunce, DaunceConfig, scores
from daunce.engines import sequential, stacked, vmap
from daunce.experiments import models, vision

PREVIOUS = {"lr": "vmap", "mlp": "vmap", "cnn": "sequential",  # what trainer="auto" chose before "shared"
            "mlp_class": "vmap"}  # before torch.fx tracing: not an nn.Sequential, so vmap


def matmul_gflops(size: int = 1536, reps: int = 5) -> float:
    """float32 matmul rate of this process (its torch threads), GFLOP/s: the best of ``reps`` products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def copy_bandwidth_gbs(n: int = 2**26, reps: int = 5) -> float:
    """Memory bandwidth of a large float32 copy (bytes read + written), GB/s: the best of ``reps``."""
    a, b = torch.randn(n), torch.empty(n)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4 * n / best / 1e9


def activation_mb(model, train, m: int) -> float:
    """MB of the forward activations (every leaf module's output) of one copy-step on ``m`` training examples."""
    x = train.tensors[0][:m]
    with torch.no_grad():
        return vmap.activation_numel(model, lambda: model(x), in_bytes=True) / 1e6


def setup(name: str):
    """Notebook 02's model ``name`` trained to theta0, its training set and queries; ``"mlp_class"`` is its MLP
    written as a class (``models.MLPModule``, ``torch.tanh`` in ``forward``) with the same weights."""
    s = vision.settings("default")["mlp" if name == "mlp_class" else name]
    train, query = vision.load_data(s)
    model, _ = vision.fit(vision.make_model(s, train), train, s.recipe)
    if name == "mlp_class":
        model = models.MLPModule.from_sequential(model)
    return model, train, query


def copy_flops(d: Daunce, train, query, cache) -> tuple[float, float]:
    """(training, signal) GFLOP of one copy, counted on the sequential loop."""
    cfg = d.training_config()
    ctx = d.context
    with FlopCounterMode(display=False) as fc:
        sequential.train_copy(ctx, cfg, d.plan(0, len(train)), train, cache)
    train_gf = fc.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as fc:
        sequential.signals_now(ctx, train)
        sequential.signals_now(ctx, query)
    return train_gf, fc.get_total_flops() / 1e9


def time_trainer(d: Daunce, trainer: str, K: int, train, query, cache) -> dict:
    """Seconds per copy of training and of the signal passes of ``K`` copies with ``trainer``."""
    cfg, ctx, n = d.training_config(), d.context, len(train)
    plans = [d.plan(k, n) for k in range(K)]
    out: dict = {"trainer": trainer}
    if trainer == "sequential":
        states, sig_train, sig_query, t_train, t_sig = [], [], [], 0.0, 0.0
        for plan in plans:
            t0 = time.process_time()
            states.append(sequential.train_copy(ctx, cfg, plan, train, cache))
            t1 = time.process_time()
            sig_train.append(sequential.signals_now(ctx, train))
            sig_query.append(sequential.signals_now(ctx, query))
            t_train, t_sig = t_train + t1 - t0, t_sig + time.process_time() - t1
        sig_train, sig_query = torch.stack(sig_train), torch.stack(sig_query)
    else:
        if trainer == "vmap":
            vt = vmap.VectorisedTrainer(ctx, cfg)
        else:
            vt = stacked.SharedInputTrainer(ctx, cfg, trainer.split(":")[1])
        t0 = time.process_time()
        stacked_states = vt.train(plans, train, cache)
        t1 = time.process_time()
        sig_train, sig_query = vt.signals(stacked_states, train), vt.signals(stacked_states, query)
        t_train, t_sig = t1 - t0, time.process_time() - t1
        if trainer.startswith("shared"):
            out["layout"] = vt.layout_report.get("chosen", vt.layout)
            out["layout_reason"] = vt.layout_report.get("reason", "")
    out.update(s_train_per_copy=t_train / K, s_signals_per_copy=t_sig / K, signals=(sig_train, sig_query))
    return out


def auto_share(model, train, query, K: int, trainer: str) -> dict:
    """Seconds of ``"auto"``'s resolution and of the whole ``fit`` (resolution included) at K copies."""
    d = Daunce(model, ClassificationTask(), DaunceConfig(n_models=K, perturbation="orthogonal"), progress=False,
               trainer=trainer, orthogonal_block=K)
    t0 = time.process_time()
    d.resolve(train)
    t_resolve = time.process_time() - t0
    d.fit(train, query)
    total = time.process_time() - t0
    return dict(s_resolve=t_resolve, s_fit=total, resolve_share=t_resolve / total, trainer=d.trainer_used,
                mean_steps=sum(d.copy_steps.values()) / len(d.copy_steps))


def lora_rows(rate: float, n_copies: int) -> list:
    """Notebook 03's LoRA copies (SmolLM2-135M-Instruct, rank-8 adapters on the top 4 layers, the bottom 26 cached as
    features; 40 training examples and 30 queries of each of its data sets at its lengths; its Daunce settings):
    seconds of a copy's training and signal passes with consecutive evaluation batches (the former path) and with
    length-sorted ones, and the largest difference of their signals."""
    import daunce
    from daunce import llm
    from daunce.experiments import textdata

    base, tok = llm.load_smollm2()
    n_top = 4
    n_bottom = len(llm.backbone_and_head(base)[0].layers) - n_top
    model = llm.add_lora(llm.split_model(base, n_top), r=8, alpha=16, seed=0)
    sets = {"math": (textdata.split(llm.fitting(tok, textdata.champ_math(), 128), 40, 30, seed=0), 128),
            "instr": (textdata.split(textdata.instruction_following(), 40, 30, seed=0, group_key="topic"), 112)}
    cfg = daunce.DaunceConfig(variant="if", n_models=n_copies, subset_ratio=0.5, rho=0.3, damping=1e-3,
                              isotropic_noise=True, optimizer="adam", lr=2e-3, epochs=1, batch_size=8, seed=0)
    rows = []
    for name, ((tr, qu), length) in sets.items():
        train, query = (llm.TextDataset(tok, x, length) for x in (tr, qu))
        train = train.with_features(llm.bottom_features(base, train, n_bottom, 16))
        query = query.with_features(llm.bottom_features(base, query, n_bottom, 16))
        signals, block = {}, []
        for path, sort in {"previous": False, "current": True}.items():
            d = Daunce(model, llm.CausalLMTask(), cfg, eval_batch_size=16, progress=False)
            ctx = d.context
            ctx.sort_by_length = sort
            cache = sequential.base_cache(ctx, cfg, train)
            if path == "previous":
                gf_train, gf_sig = copy_flops(d, train, query, cache)
            t_train = t_sig = 0.0
            sig = []
            for k in range(n_copies):
                t0 = time.process_time()
                sequential.train_copy(ctx, cfg, d.plan(k, len(train)), train, cache)
                t1 = time.process_time()
                sig.append(torch.cat([sequential.signals_now(ctx, train), sequential.signals_now(ctx, query)]))
                t_train, t_sig = t_train + t1 - t0, t_sig + time.process_time() - t1
            signals[path] = torch.stack(sig)
            s_copy = (t_train + t_sig) / n_copies
            block.append(dict(model=f"lora ({name})", n_train=len(train), d=ctx.n_params, K=n_copies,
                              trainer="sequential", layout="length-sorted" if sort else "consecutive",
                              s_train_per_copy=t_train / n_copies, s_signals_per_copy=t_sig / n_copies,
                              gflop_per_copy=gf_train + gf_sig, gflop_train_per_copy=gf_train,
                              gflops=(gf_train + gf_sig) / s_copy, matmul_gflops=rate,
                              fraction_of_floor=(gf_train + gf_sig) / s_copy / rate,
                              lengths=[int(v) for v in train.lengths]))
        prev = block[0]["s_train_per_copy"] + block[0]["s_signals_per_copy"]
        diff = float((signals["current"] - signals["previous"]).abs().max())
        for r in block:
            r["speedup_vs_previous"] = prev / (r["s_train_per_copy"] + r["s_signals_per_copy"])
            r["max_abs_signal_diff_vs_previous"] = diff
        print("lora", name, [{k: v for k, v in r.items() if k != "lengths"} for r in block], flush=True)
        rows.extend(block)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lr", "mlp", "cnn"])
    ap.add_argument("--k", type=int, default=256, help="copies of the logistic regression and the MLP")
    ap.add_argument("--k-cnn", type=int, default=32, help="copies of the CNN")
    ap.add_argument("--steps", type=int, default=20, help="fixed full-batch Adam steps per copy")
    ap.add_argument("--no-auto", action="store_true", help="skip timing the 'auto' rule's resolution")
    ap.add_argument("--lora-copies", type=int, default=2, help="LoRA copies of notebook 03 timed (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the trainers of a model this many times, interleaved; each keeps its fastest round")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the other models in the existing results and replace only those of "
                         "--models (and of the LoRA copies when --lora-copies > 0)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    importlib.import_module("torch._dynamo")  # torch.optim imports it on first use: keep it out of the timings

    rate, bandwidth = matmul_gflops(), copy_bandwidth_gbs()
    print(f"float32 matmul: {rate:.1f} GFLOP/s; copy bandwidth {bandwidth:.1f} GB/s", flush=True)
    rows, auto_rows = [], []
    for name in args.models:
        model, train, query = setup(name)
        K = args.k_cnn if name == "cnn" else args.k
        cfg = DaunceConfig(variant="if", rho=0.3, damping=1e-3, isotropic_noise=False, steps=args.steps,
                           optimizer="adam", lr=1e-2, subset_ratio=0.5, n_models=K, perturbation="orthogonal")
        d = Daunce(model, ClassificationTask(), cfg, progress=False, orthogonal_block=K)
        ctx = d.context
        cache = sequential.base_cache(ctx, cfg, train)
        gf_train, gf_sig = copy_flops(d, train, query, cache)
        trainers = ["sequential", "vmap", "shared:union", "shared:gather", "shared:auto"]
        if name == "cnn":
            trainers = ["sequential", "shared:union", "shared:gather"]
        if name == "mlp_class":
            trainers = ["sequential", "vmap", "shared:auto"]
            ok, why = stacked.supported(model)
            assert ok, f"the class-defined MLP is not supported by the shared-input trainer: {why}"
        timed = {}
        for r in range(args.rounds):  # the trainers interleaved, round after round: noise from the shared
            for tr in trainers:       # machine falls on all of them; each keeps its fastest round
                if tr == "sequential" and r > 0:
                    continue
                t = time_trainer(d, tr, K if tr != "sequential" or name == "cnn" else min(K, 16), train, query, cache)
                s_copy = t["s_train_per_copy"] + t["s_signals_per_copy"]
                rounds = timed[tr]["s_per_copy_rounds"] if tr in timed else []
                if tr not in timed or s_copy < min(rounds):
                    timed[tr] = t
                timed[tr]["s_per_copy_rounds"] = rounds + [s_copy]
                print(name, f"round {r + 1}/{args.rounds}", tr, {k: v for k, v in t.items() if k != "signals"},
                      flush=True)
        prev = timed[PREVIOUS[name]]
        # the activations are counted at module outputs: the class form's torch.tanh and flatten are functions, so
        # its nn.Sequential form (the same function) counts them
        seq_model = setup("mlp")[0] if name == "mlp_class" else model
        act_mb = activation_mb(seq_model, train, round(cfg.subset_ratio * len(train)))
        for tr, t in timed.items():
            s_copy = t["s_train_per_copy"] + t["s_signals_per_copy"]
            gflops = (gf_train + gf_sig) / s_copy
            kk = t["signals"][0].shape[0]
            agree = min(kk, timed["sequential"]["signals"][0].shape[0])
            S = scores.covariance(*(x[:agree] for x in t["signals"]))
            S_seq = scores.covariance(*(x[:agree] for x in timed["sequential"]["signals"]))
            diff = float((S - S_seq).abs().max() / S_seq.abs().max())
            rows.append(dict(
                model=name, n_train=len(train), d=ctx.n_params, K=kk, trainer=tr, layout=t.get("layout", ""),
                s_train_per_copy=t["s_train_per_copy"], s_signals_per_copy=t["s_signals_per_copy"],
                gflop_per_copy=gf_train + gf_sig, gflop_train_per_copy=gf_train, gflops=gflops,
                matmul_gflops=rate, fraction_of_floor=gflops / rate, copy_bandwidth_gbs=bandwidth,
                activation_mb_per_copy_step=act_mb,
                speedup_vs_previous=(prev["s_train_per_copy"] + prev["s_signals_per_copy"]) / s_copy,
                max_rel_score_diff_vs_sequential=diff, layout_reason=t.get("layout_reason", ""),
                s_per_copy_rounds=t["s_per_copy_rounds"],
                pearson_vs_sequential=float(torch.corrcoef(torch.stack([S.flatten(), S_seq.flatten()]))[0, 1])))
        if name == "mlp_class":  # the class form is the same function: its copies' scores are the nn.Sequential's
            ds = Daunce(seq_model, ClassificationTask(), cfg, progress=False, orthogonal_block=K)
            ref = time_trainer(ds, "sequential", min(K, 16), train, query, sequential.base_cache(ds.context, cfg, train))
            S_ref = scores.covariance(*ref["signals"])
            S_seq = scores.covariance(*timed["sequential"]["signals"])
            for row in rows[-len(timed):]:
                row["max_rel_score_diff_vs_nn_sequential_form"] = float((S_seq - S_ref).abs().max() / S_ref.abs().max())
        if name in ("lr", "mlp") and not args.no_auto:
            for tr in ("shared", PREVIOUS[name]):
                a = auto_share(model, train, query, args.k, tr)
                auto_rows.append(dict(model=name, K=args.k, **a))
                print("auto", name, a, flush=True)

    if args.lora_copies:
        rows.extend(lora_rows(rate, args.lora_copies))
    command = (f".venv/bin/python benchmarks/copy_throughput.py --models {' '.join(args.models)} --k {args.k} "
               f"--k-cnn {args.k_cnn} --steps {args.steps} --lora-copies {args.lora_copies} --threads {args.threads}"
               + (f" --rounds {args.rounds}" if args.rounds > 1 else "") + (" --merge" if args.merge else "")
               + (" --no-auto" if args.no_auto else ""))
    run = dict(models=list(args.models) + (["lora"] if args.lora_copies else []), command=command,
               machine=_common.machine(), matmul_gflops=rate, copy_bandwidth_gbs=bandwidth, steps=args.steps,
               rounds=args.rounds)
    runs = [run]
    if args.merge:
        runs, kept, kept_auto = previous_results(run)
        rows = kept + rows
        rerun = {r["model"] for r in auto_rows}  # "auto"'s timings of a model are replaced only when run again
        auto_rows = [r for r in kept_auto if r["model"] not in rerun] + auto_rows
    for r in rows:
        r.setdefault("run", len(runs))
    write_results(runs, rows, auto_rows)


def previous_results(run: dict) -> tuple[list, list, list]:
    """The runs, rows and "auto" rows of the existing results, less those of ``run``'s models (which it
    replaces), with ``run`` appended to the runs. Results written before runs were recorded are one run, whose
    command is read from the markdown."""
    path = _common.RESULTS / "copy_throughput.json"
    if not path.exists():
        return [run], [], []
    old = json.loads(path.read_text())
    runs = old.get("runs")
    if runs is None:
        md_path = _common.RESULTS / "copy_throughput.md"
        md = md_path.read_text() if md_path.exists() else ""
        cmd = md.split("Command: `")[1].split("`")[0] if "Command: `" in md else "(not recorded)"
        models = list(dict.fromkeys(r["model"].split(" ")[0] for r in old["rows"]))
        runs = [dict(models=models, command=cmd, machine=old["machine"], matmul_gflops=old["matmul_gflops"],
                     copy_bandwidth_gbs=old["copy_bandwidth_gbs"], steps=old["steps"], rounds=1)]
    replaced = set(run["models"])
    rows = [dict(r, run=r.get("run", 1)) for r in old["rows"] if r["model"].split(" ")[0] not in replaced]
    return runs + [run], rows, old.get("auto", [])


def write_results(runs: list, rows: list, auto_rows: list) -> None:
    """``copy_throughput.{md,json}`` from every run's rows (``row["run"]``: its run, counted from 1)."""
    cols = ["model", "n_train", "d", "K", "trainer", "layout", "s_train_per_copy", "s_signals_per_copy",
            "gflop_per_copy", "gflops", "fraction_of_floor", "speedup_vs_previous", "activation_mb_per_copy_step",
            "max_rel_score_diff_vs_sequential", "max_abs_signal_diff_vs_previous"]
    fmt = [{c: (f"{r[c]:.4g}" if isinstance(r.get(c), float) else r.get(c, "")) for c in cols} for r in rows]
    steps = sorted({r["steps"] for r in runs})
    notes = (f"Notebook 02's models and data (default profile), \"if\" copies, full batch, r = 0.5, orthogonal design, "
             f"{'/'.join(map(str, steps))} fixed Adam steps per copy; K = 256 (LR, MLP; the sequential loop timed on 16 "
             f"copies) and 32 (CNN). `mlp_class`: the MLP written as a class (`models.MLPModule`: `torch.tanh` in "
             f"`forward`, the same weights), which the shared-input trainer reads by tracing `forward` with torch.fx. "
             f"Seconds are CPU seconds of this process per copy; FLOPs counted with "
             f"FlopCounterMode on one copy of the sequential loop (training, then signals of the "
             f"training set and the queries); each row is set against the float32 matmul floor of its own run (below). "
             f"`act MB`: the forward activations of one copy-step "
             f"(every layer's output on the copy's subset), what a step streams through memory at least twice. "
             f"`speedup_vs_previous`: against the trainer \"auto\" chose before shared-input passes "
             f"({', '.join(f'{k}: {v}' for k, v in PREVIOUS.items())}), measured in the same run. The last column: the "
             f"largest difference of the covariance scores (training set x queries, from the copies both trainers "
             f"trained) from the sequential loop's, relative to the largest score (float rounding: within 1e-3). "
             f"LoRA rows: notebook 03's copies (SmolLM2-135M-Instruct, adapters on the top 4 layers, 40 training "
             f"examples and 30 queries of each data set, 3 Adam steps of batch 8 and the signal passes), consecutive "
             f"evaluation batches (the former path) against length-sorted ones; the last column is the largest "
             f"difference of their signals. With `--rounds` the trainers of a model are timed in interleaved rounds "
             f"(the machine's load falls on all of them) and each keeps its fastest (every round's seconds are in the "
             f"JSON).\n\nRuns:\n\n"
             + "".join(f"{i}. {', '.join(r['models'])}: {r['machine']}; float32 matmul floor {r['matmul_gflops']:.1f} "
                       f"GFLOP/s, memory bandwidth of a large copy {r['copy_bandwidth_gbs']:.1f} GB/s. Command: "
                       f"`{r['command']}`.\n" for i, r in enumerate(runs, 1)))
    text = _common.write("copy_throughput", "Copy throughput against the arithmetic floor", notes, fmt, cols)
    if auto_rows:
        acols = ["model", "K", "trainer", "s_resolve", "s_fit", "resolve_share", "mean_steps"]
        afmt = [{c: (f"{r[c]:.3g}" if isinstance(r[c], float) else r[c]) for c in acols} for r in auto_rows]
        extra = ("\n## \"auto\"'s resolution as a share of fit\n\nDaunceConfig(n_models=K, perturbation=\"orthogonal\") "
                 "with every other field \"auto\"; CPU seconds of `resolve` (proxy fine-tunes, Lanczos) and of the "
                 "whole `fit` (resolution, copies to their stopping test, signals of training set and queries).\n\n"
                 + _common.table(afmt, acols))
        (_common.RESULTS / "copy_throughput.md").write_text(text + extra)
        print(extra)
    last = runs[-1]
    (_common.RESULTS / "copy_throughput.json").write_text(json.dumps(
        {"machine": last["machine"], "matmul_gflops": last["matmul_gflops"],
         "copy_bandwidth_gbs": last["copy_bandwidth_gbs"], "steps": last["steps"], "runs": runs, "rows": rows,
         "auto": auto_rows},
        indent=1))


if __name__ == "__main__":
    main()
