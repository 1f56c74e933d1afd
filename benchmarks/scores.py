"""Time and peak memory of ``daunce.scores.covariance`` from random signal matrices.

Each size runs in a fresh subprocess so that its peak resident set size (``ru_maxrss``) is its own.
"extra" is the peak minus the resident size just before the call, when the two signal matrices
``A (K, n)`` and ``B (K, m)`` (float32) already exist; the output ``(n, m)`` float32 is allocated by
the call, so extra / output close to 1 means nothing but the output (and a block's temporaries) was
held.

    .venv/bin/python benchmarks/scores.py                          # n x m up to 60,000 x 10,000, K = 256
    .venv/bin/python benchmarks/scores.py --sizes 5000x1000 --ks 64 256 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(n: int, m: int, K: int, dtype: str, threads: int) -> dict:
    import torch

    from daunce import scores

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(K, n, generator=g)
    B = torch.randn(K, m, generator=g)
    before = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    c0, t0 = time.process_time(), time.perf_counter()
    S = scores.covariance(A, B, dtype=getattr(torch, dtype))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert S.shape == (n, m) and S.dtype == torch.float32
    return {"n": n, "m": m, "K": K, "dtype": dtype, "cpu_s": cpu, "wall_s": wall,
            "extra": max(peak, peak_before) - before, "output": S.numel() * S.element_size(),
            "signals": (A.numel() + B.numel()) * A.element_size()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["5000x1000", "20000x5000", "60000x10000"])
    ap.add_argument("--ks", nargs="+", type=int, default=[256])
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        n, m, K, dtype = args.one.split(",")
        print(json.dumps(one(int(n), int(m), int(K), dtype, args.threads)))
        return
    import _common

    rows = []
    for size in args.sizes:
        n, m = map(int, size.split("x"))
        for K in args.ks:
            for dtype in args.dtypes:
                out = subprocess.run([sys.executable, __file__, "--one", f"{n},{m},{K},{dtype}", "--threads",
                                      str(args.threads)], check=True, capture_output=True, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                mib = 2**20
                rows.append({"n_train x n_query": f"{n:,} x {m:,}", "K": K, "accumulate": dtype,
                             "CPU s": f"{r['cpu_s']:.1f}", "wall s": f"{r['wall_s']:.1f}",
                             "GFLOP/s (CPU)": f"{2 * n * m * K / r['cpu_s'] / 1e9:.1f}",
                             "output MiB": f"{r['output'] / mib:.0f}", "signals MiB": f"{r['signals'] / mib:.0f}",
                             "peak extra MiB": f"{r['extra'] / mib:.0f}",
                             "extra / output": f"{r['extra'] / r['output']:.2f}"})
                print(rows[-1], flush=True)
    _common.write("scores", "Scoring: covariance of K x n training and K x m query signals",
                  "`daunce.scores.covariance(A, B)` with its default block of 4,096 training examples; random "
                  "float32 signal matrices; each row in a fresh process. 'peak extra' = peak RSS during the call "
                  "minus RSS before it (signals already allocated), so it counts the float32 output plus the "
                  "block temporaries. Command: `.venv/bin/python benchmarks/scores.py`.",
                  rows, ["n_train x n_query", "K", "accumulate", "CPU s", "wall s", "GFLOP/s (CPU)", "output MiB",
                         "signals MiB", "peak extra MiB", "extra / output"])


if __name__ == "__main__":
    main()
