"""The README's findings, run times and the full results, written from the runs.

Three pages hold blocks between marker lines (``PAGES``)::

    README.md            <!-- runtimes start --> ... <!-- runtimes end -->, <!-- results:findings start --> ...
    docs/results.md      <!-- results:01 start --> ... <!-- results:01 end -->   (and 02, 03, 04)
    docs/benchmarks.md   <!-- results:auto start --> ...                        (and gpu, throughput)

:func:`render` rewrites the inside of every block from what the runs left behind and leaves everything
outside the markers as it is:

* ``papermill_runs/NN_*.json``: each notebook's metrics; every number of a results block is read (or
  computed, e.g. a minimum or a slope) from these files;
* ``papermill_runs/NN_*.ipynb``: papermill's own measured duration of each executed notebook;
* ``papermill_runs/timings.json``: written by ``make reproduce`` through :func:`record_timing`: per
  notebook its wall time and whether its cache folder ``runs/<notebook>/<profile>/`` already held
  something when it started (a *resumed* run) or not (a *cold* run);
* ``figures/NN_*.png``: each notebook's block shows all of its figures;
* ``benchmarks/results/auto_settings.md``: the "auto"-settings benchmark's table (block ``auto``);
* ``benchmarks/results/gpu_check/gpu_check.md``: the GPU check's table (block ``gpu``), once it has run;
* ``benchmarks/results/copy_throughput.md``: seconds per copy against the arithmetic floor (block ``throughput``);
* ``benchmarks/results/parallel_efficiency.{md,json}``: 1 against 2 workers on the notebooks' jobs (block
  ``parallel``; the runtimes block predicts the cold time on more cores from it).

Usage (from the repository root)::

    python -m daunce.experiments.report            # rewrite the pages (make readme; make reproduce runs it last)
    python -m daunce.experiments.report --check    # exit 1 and print a diff when a page is out of date
    python -m daunce.experiments.report record 03_llm_subset_removal --profile default \\
        --wall-seconds 530 --cache-existed 1       # what make reproduce calls after each notebook

``tests/test_readme.py`` fails when a committed page differs from what :func:`render` writes.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import baselines

__all__ = ["NOTEBOOKS", "BLOCKS", "PAGES", "render", "blocks", "marker", "record_timing", "main"]

#: the numbered notebooks, in README order
NOTEBOOKS = ("01_theory", "02_vision_lds", "03_llm_subset_removal", "04_blackbox_backdoor")
#: the generated pages and the blocks each holds
PAGES = {"README.md": ("runtimes", "findings"), "docs/results.md": tuple(nb[:2] for nb in NOTEBOOKS),
         "docs/benchmarks.md": ("auto", "gpu", "throughput", "parallel")}
#: the names of all generated blocks
BLOCKS = tuple(b for names in PAGES.values() for b in names)
TIMINGS = "timings.json"
GPU_CHECK = Path("benchmarks") / "results" / "gpu_check" / "gpu_check.md"
AUTO_SETTINGS = Path("benchmarks") / "results" / "auto_settings.md"
THROUGHPUT = Path("benchmarks") / "results" / "copy_throughput.md"
PARALLEL = Path("benchmarks") / "results" / "parallel_efficiency.md"
PARALLEL_JSON = Path("benchmarks") / "results" / "parallel_efficiency.json"

# what each figure shows (alt text); a figure without an entry is shown under its file name
CAPTIONS = {
    "01_method": "the method in one picture: theta0, K perturbed copies, the K x n matrix of losses, its covariance",
    "01_toy": "a toy with a planted mislabelled example: the from-scratch Daunce scores find it",
    "01_convergence": "agreement with the exact influence function against K",
    "01_scatter": "Daunce scores against the exact influence function",
    "01_linear_regression": "linear regression: influence function, leave-one-out and the bootstrap",
    "01_mlp": "the MLP: agreement against K",
    "01_hyperparameters": "the knobs: rho, subset ratio, gamma",
    "02_lds_methods": "LDS per method and model",
    "02_lds_vs_seconds": "LDS against seconds: tuned Daunce against the best of each baseline family",
    "02_lds_vs_seconds_all": "LDS against seconds: every method",
    "02_lds_vs_k": "LDS against the number of copies K",
    "02_query_grid": "queries with their most helpful and most harmful training images",
    "02_reliability": "daunce-best's LDS and split-half reliability against K, measured and predicted",
    "02_gradient_norms": "gradient norms of the risk term, the perturbation term and the whole objective "
                         "during a copy's training",
    "02_daunce_tuning": "Daunce's candidates: a heat map of the tuning LDS at the reported K over damping, noise term "
                        "and signal",
    "02_paired_differences": "daunce-best minus every other method: paired differences with 95% intervals",
    "03_llm_lds": "the LLM LDS: every row on the report queries with its topic-bootstrap interval, and the noise "
                  "ceiling's bound",
    "03_llm_removal_curve": "the removal test: Daunce's query-NLL increase minus each other method's, per k, with "
                            "paired intervals",
    "03_llm_examples_table": "queries with the training examples Daunce scores highest and lowest",
    "04_auprc_methods": "AUPRC for the poisoned examples per method, one dot per seed",
    "04_auprc_vs_K": "AUPRC for the poisoned examples against K, with the spread over seeds",
    "04_query_top_examples": "a triggered query and its top-scored training examples (the median seed)",
    "04_paired_verdicts": "paired per-seed AUPRC differences between every two methods, per target",
    "04_removal": "attack success after removing each method's flagged examples and retraining",
}


# ---------------------------------------------------------------------------------------------------
# number formatting


def _num(x) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _f(x, nd: int = 3, sign: bool = False) -> str:
    """``x`` with ``nd`` decimals (``+`` for positives when ``sign``); an en dash for a missing value."""
    x = _num(x)
    if x is None:
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _ci(lo, hi, nd: int = 3, sign: bool = False) -> str:
    return f"[{_f(lo, nd, sign)}, {_f(hi, nd, sign)}]"


def _secs(x) -> str:
    x = _num(x)
    if x is None:
        return "–"
    return f"{x:.1f}" if x < 10 else f"{x:,.0f}"


def _duration(seconds) -> str:
    s = _num(seconds)
    if s is None:
        return "–"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _k(x) -> str:
    """A count stored as a float (``512.0``) as an integer."""
    x = _num(x)
    return "–" if x is None else f"{x:.0f}"


def _percent(x) -> str:
    x = _num(x)
    return "–" if x is None else f"{100 * x:.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _figures(root: Path, prefix: str, folder: str = "../figures") -> list[str]:
    """Every ``figures/<prefix>_*.png``, as markdown images linked from ``docs/`` (``folder``)."""
    out = []
    for p in sorted((root / "figures").glob(f"{prefix}_*.png")):
        out.append(f"![{CAPTIONS.get(p.stem, p.stem.replace('_', ' '))}]({folder}/{p.name})")
    return out


def _optional(build: Callable[[], list[str] | str | None]) -> list[str]:
    """Run one part of a section; a part whose numbers the run did not write is left out."""
    try:
        out = build()
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return []
    if not out:
        return []
    return [out] if isinstance(out, str) else list(out)


# ---------------------------------------------------------------------------------------------------
# the runs


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _papermill(root: Path, notebook: str) -> dict | None:
    """papermill's metadata of the executed notebook (``duration`` in seconds, ``start_time``, ...)."""
    nb = _load_json(root / "papermill_runs" / f"{notebook}.ipynb")
    return None if nb is None else nb.get("metadata", {}).get("papermill")


def _loglog_slope(ks: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(k)."""
    lx = [math.log(k) for k in ks]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


# ---------------------------------------------------------------------------------------------------
# run times


def _cold_cell(cold: dict | None) -> str:
    """The "last cold run" cell: its wall time and date, and how many parts a cold run stopped and resumed took."""
    if not cold:
        return "–"
    parts = f", in {len(cold['parts'])} parts" if cold.get("parts") else ""
    return f"{_duration(cold['wall_seconds'])} ({cold['finished']}{parts})"


def _runtimes(root: Path) -> list[str]:
    timings = _load_json(root / "papermill_runs" / TIMINGS) or {}
    recorded = timings.get("notebooks", {})
    rows, total, colds = [], {"cold": 0.0, "resumed": 0.0, "not recorded": 0.0}, []
    for nb in NOTEBOOKS:
        pm = _papermill(root, nb)
        if pm is None:
            rows.append([f"`{nb}`", "–", "not run", "–", "–", "–"])
            continue
        rec = recorded.get(nb)
        if rec and rec.get("papermill_start_time") == pm.get("start_time"):
            state = "resumed from `runs/`" if rec.get("cache_existed") else "cold"
            key = "resumed" if rec.get("cache_existed") else "cold"
        else:
            state, key = "not recorded", "not recorded"
        duration = _num(pm.get("duration"))
        total[key] += duration or 0.0
        profile = (pm.get("parameters") or {}).get("profile", "default")
        cold = (rec or {}).get("last_cold") if state != "not recorded" else None
        colds.append(cold)
        rows.append([f"`{nb}`", f"`{profile}`", _duration(duration), state, str(pm.get("end_time", ""))[:10],
                     _cold_cell(cold)])
    out = ["Run times of the executed notebooks in `papermill_runs/`, as papermill measured them; *cold* means the",
           "notebook's cache folder `runs/<notebook>/<profile>/` was empty or absent when `make reproduce` started it,",
           "*resumed* that it reused trained copies and retrains from there."]
    cpus = (timings.get("machine") or {}).get("cpus")
    if cpus:
        out[-1] += f" The machine had {cpus} CPU cores."
    out[-1] += (" *Last cold run*: the wall time of the last run of the same profile that started from an empty cache "
                "folder (recorded by `make reproduce`; *in parts*: a cold run stopped and resumed, the sum of its "
                "parts' wall times).")
    out += [""] + _table(["notebook", "profile", "run time", "caches", "finished", "last cold run"], rows) + [""]
    words = {"cold": "cold", "resumed": "resumed", "not recorded": "with the cache state not recorded"}
    parts = [f"{_duration(total[key])} {words[key]}" for key in words if total[key] > 0]
    line = []
    if colds and all(colds):
        cold_total = sum(c["wall_seconds"] for c in colds)
        on = f" on {cpus} cores" if cpus else ""
        line.append(f"**A cold `make reproduce` takes {_duration(cold_total)}{on}** (the sum of each notebook's last "
                    "cold run): what a fresh clone pays, since `runs/` is not in the repository.")
    if parts:
        line.append("The runs in the table took " + "; ".join(parts) + " (resumed: from the caches an earlier run "
                    "left in `runs/`).")
    if line:
        out.append(" ".join(line))
    if colds and all(colds):
        out += _cores_prediction(root, cold_total, cpus)
        older = [f"`{nb}`" for nb, c in zip(NOTEBOOKS, colds) if nb in FANNED_OUT and not c.get("retrains_fanned_out")]
        if older:
            one = len(older) == 1
            runs, verb, its, them = ("run", "predates", "its", "it") if one else ("runs", "predate", "their", "them")
            out[-1] += (f" The last cold {runs} of {' and '.join(older)} {verb} the fan-out of {its} retrains over "
                        f"the cores, so on {cpus or 'these'} cores a cold run of {them} is now faster than recorded.")
    return out


def predicted_seconds(seconds: float, cores: int, efficiency: float, cores_measured: int = 2) -> float:
    """Amdahl's law fitted to one measured efficiency: ``seconds`` measured on ``cores_measured`` cores whose 1 -> 2
    worker efficiency is ``efficiency`` (speed-up ``2 * efficiency``; serial share ``s = 1 / efficiency - 1``),
    predicted on ``cores``: ``T_1 (s + (1 - s) / cores)`` with ``T_1`` the one-core time."""
    s = min(max(1.0 / efficiency - 1.0, 0.0), 1.0)
    one_core = seconds * (s + (1.0 - s) / cores_measured) ** -1
    return one_core * (s + (1.0 - s) / cores)


def _cores_prediction(root: Path, cold_total: float, cpus) -> list[str]:
    bench = _load_json(root / PARALLEL_JSON)
    if not bench or not cpus:
        return []
    eff = float(bench["mean_efficiency"])
    preds = ", ".join(f"{n} cores about {_duration(predicted_seconds(cold_total, n, eff, int(cpus)))}" for n in (8, 16))
    return ["", f"On more cores (every core by default; `DAUNCE_WORKERS=N` caps them): {preds}. An estimate, not a "
            f"measurement: Amdahl's law with the serial share that `benchmarks/parallel_efficiency.py` measured "
            f"(1 against 2 workers on the notebooks' own jobs: efficiency {eff:.2f}), applied to the whole cold run; "
            "the notebooks' serial parts (θ0's training, one model's fine-tunes) make it optimistic."]


#: the notebooks whose ground-truth or removal retrains fan out over the cores (``daunce.parallel``); a cold run
#: recorded since that fan-out carries ``retrains_fanned_out`` (earlier ones are said to be slower than a new one)
FANNED_OUT = ("02_vision_lds", "03_llm_subset_removal", "04_blackbox_backdoor")


def record_timing(root: Path, notebook: str, *, profile: str, wall_seconds: float, cache_existed: bool,
                  cold_parts: list | None = None) -> dict:
    """Add one notebook's run to ``papermill_runs/timings.json`` (called by ``make reproduce`` right after
    papermill has executed it): the wall time, whether its cache folder existed before it started, and
    papermill's start time of the executed notebook, which ties this entry to that execution.

    ``cold_parts``: the wall seconds of the earlier runs of a cold run that was stopped and resumed (its cache folder
    empty before the first of them); this run finishes it, and the last cold run is recorded as their sum, in parts."""
    path = Path(root) / "papermill_runs" / TIMINGS
    timings = _load_json(path) or {}
    pm = _papermill(Path(root), notebook) or {}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    timings.setdefault("machine", {})["cpus"] = cpus
    # the cap on the cores the notebooks' fan-outs and torch threads used (None: every core)
    timings["machine"]["workers_cap"] = os.environ.get("DAUNCE_WORKERS") or None
    previous = timings.setdefault("notebooks", {}).get(notebook) or {}
    entry = dict(profile=profile, wall_seconds=float(wall_seconds), cache_existed=bool(cache_existed),
                 cache_dir=f"runs/{notebook}/{profile}", papermill_start_time=pm.get("start_time"),
                 papermill_duration=pm.get("duration"))
    # the last cold run of this profile survives the resumed runs after it (a resumed run's time is not a cold one)
    finished = str(pm.get("end_time", ""))[:10]
    if cold_parts:
        if any(float(x) <= 0 for x in cold_parts):
            raise ValueError(f"cold_parts must be positive wall seconds, got {cold_parts}")
        parts = [float(x) for x in cold_parts] + [float(wall_seconds)]
        entry["last_cold"] = dict(wall_seconds=sum(parts), finished=finished, parts=parts, retrains_fanned_out=True)
    elif not cache_existed:
        entry["last_cold"] = dict(wall_seconds=float(wall_seconds), finished=finished, retrains_fanned_out=True)
    elif previous.get("last_cold") and previous.get("profile") == profile:
        entry["last_cold"] = previous["last_cold"]
    timings["notebooks"][notebook] = entry
    timings["notebooks"] = dict(sorted(timings["notebooks"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timings, indent=1) + "\n")
    return timings


# ---------------------------------------------------------------------------------------------------
# 01 · theory


def _section_01(j: dict) -> list[str]:
    S = j["settings"]
    lr, mlp = j.get("logistic_regression", {}), j.get("mlp", {})
    ks = [str(k) for k in S["Ks"]]
    out = [f"Logistic regression (LR) on {S['n_train']} scikit-learn digits and a small MLP (hidden width "
           f"{S['mlp_hidden']}), {S['n_query']} queries; each copy runs {S['steps']} full-batch gradient-descent "
           "steps. Pearson correlation of Daunce's scores with the exact influence function (Fisher form for "
           "`efim`, Hessian form for `if`), against the number of copies K; seconds to train the copies (all K):", ""]
    rows = []
    for model, runs in (("LR", lr), ("MLP", mlp)):
        for key, r in runs.items():
            if not isinstance(r, dict):
                continue
            label = " · ".join([model, *key.split("_")])
            rows.append([label] + [_f(r[k]["pearson_if"]) if k in r else "" for k in ks] + [_secs(r.get("seconds"))])
    out += _table(["model · form · perturbation", *[f"K={k}" for k in ks], "seconds"], rows) + [""]

    kmax = ks[-1]

    def convergence():
        a, b = lr["efim_iid"], lr["efim_orthogonal"]
        kk = [k for k in ks if k in a]
        slope = _loglog_slope([float(k) for k in kk], [a[k]["rel_error"] for k in kk])
        return (f"* **Convergence.** The Fisher form reaches Pearson {_f(a[kmax]['pearson_if'])} with the paper's "
                f"i.i.d. perturbations at K = {kmax} and {_f(b[kmax]['pearson_if'])} with orthogonal perturbations "
                "(same mean and covariance, a variance reduction of this package). Its relative error against the "
                f"estimator's exact limit falls from {_f(a[kk[0]]['rel_error'], 2)} at K = {kk[0]} to "
                f"{_f(a[kk[-1]]['rel_error'], 2)} at K = {kk[-1]} (i.i.d.; log-log slope {_f(slope, 2)}, where "
                f"1/√K would give -0.50) and to {_f(b[kmax]['rel_error'], 2)} with the orthogonal design.")

    def if_limit():
        a = lr["if_orthogonal"] if "if_orthogonal" in lr else lr["if_iid"]
        text = ("* **What the `if` form estimates.** Its exact K → ∞ limit (`exact.daunce_limit`) is not the "
                "influence function itself but the empirical Fisher G sandwiched between two damped Gauss-Newton "
                "inverses, ∇ℓ_qᵀ (GN + λI)⁻¹ G (GN + λI)⁻¹ ∇ℓ_i, which is proportional to the damped IF only where "
                f"G ≈ GN. On LR Gauss-Newton and Hessian coincide, and the limit agrees with the Hessian-form IF at "
                f"Pearson {_f(a['limit_vs_if'])}, the ceiling of the `if` row (its copies reach "
                f"Pearson {_f(a[kmax]['pearson_limit'])} with that limit at K = {kmax}).")
        if "if" in mlp and "efim" in mlp:
            km = str(S.get("mlp_Kmax", ks[-1]))
            text += (f" On the MLP the limit and the Hessian IF part ways (Pearson {_f(mlp['if']['limit_vs_if'])}); "
                     "there "
                     f"`if` reaches {_f(mlp['if'][km]['pearson_if'])} at K = {km} and `efim` "
                     f"{_f(mlp['efim'][km]['pearson_if'])}.")
        return text

    def linear_regression():
        r = j["linear_regression"]
        return (f"* **Linear regression in closed form** (n = {S['lin_n']}): the IF predicts leave-one-out changes at "
                f"Pearson {_f(r['pearson_if_vs_loo'], 4)}; the bootstrap (K = {r['K']} refits on half-subsets) "
                f"agrees with its own first-order limit at Pearson {_f(r['pearson_bootstrap_vs_limit'], 4)} and with "
                f"the IF at {_f(r['pearson_bootstrap_vs_if'])}.")

    def knobs():
        sw, how = j["sweeps"], j.get("sweep_settings") or {}
        names = {"rho": "ρ", "subset_ratio": "subset ratio r", "gamma": "γ"}

        def setting(knob):
            h = how.get(knob)
            return (f"`{h['variant']}`, " + (f"r = {h['subset_ratio']:g}, " if knob != "subset_ratio" else "")
                    + f"against the {h['target']}") if h else "not recorded"

        rows = [[names.get(knob, knob), setting(knob),
                 " · ".join(f"{v}: {_f(r) if _num(r) is not None else 'diverged'}" for v, r in vals.items())]
                for knob, vals in sw.items()]
        return [f"Knobs, one at a time (K = {S['sweep_K']}, i.i.d. perturbations; Pearson with the exact influence "
                "function of the form swept):", "", *_table(["knob", "form, fixed settings, target", "value: Pearson"],
                                                            rows), ""]

    def cov_corr():
        c = j["cov_vs_corr"]
        return (f"* **Covariance or correlation.** At K = {kmax} the covariance agrees with the IF at "
                f"Pearson {_f(c['cov']['pearson_if'])} and the correlation at {_f(c['corr']['pearson_if'])} (mean "
                f"per-query Pearson {_f(c['cov']['mean_per_query_pearson'])} vs "
                f"{_f(c['corr']['mean_per_query_pearson'])}): dividing by each example's spread changes what is "
                "estimated.")

    def subset_limit():
        v = j["subset_limit"]
        return (f"* **Below subset ratio 1 the limit averages over subsets.** On a logistic regression whose subsets' "
                f"curvature is rank-deficient (r = 0.5, noise term on), the mean of K = {v['K']} converged copies "
                f"agrees with the subset-averaged limit at Pearson {_f(v['pearson_copies_vs_subset_limit'])} (scale "
                "ratio "
                f"{_f(v['scale_copies_over_subset_limit'], 2)}) and with the full-data formula at "
                f"{_f(v['pearson_copies_vs_full_data_formula'])} (scale ratio "
                f"{_f(v['scale_copies_over_full_data_formula'], 2)}).")

    def toy():
        t = j["toy"]
        return (f"* **The toy of part A** (a planted mislabelled example): Daunce written from scratch in plain torch "
                f"and the package agree at Pearson {_f(t['scratch_vs_package'])}, and with the exact IF at "
                f"{_f(t['scratch_vs_if'])} and {_f(t['package_vs_if'])}; the planted example ranks "
                f"{t['planted_rank_from_scratch']} (from scratch), {t['planted_rank_package']} (package) and "
                f"{t['planted_rank_exact_IF']} (exact IF) among the most harmful for the queries.")

    for part in (toy, convergence, if_limit, linear_regression, cov_corr, subset_limit):
        out += _optional(part)
    out += [""] + _optional(knobs)
    return out


# ---------------------------------------------------------------------------------------------------
# 02 · vision LDS

_MODEL_NAMES = {"lr": "LR", "mlp": "MLP", "cnn": "CNN", "resnet": "ResNet (BatchNorm, from scratch)"}


def _is_daunce(row: dict) -> bool:
    return row["method"].startswith("daunce") or "daunce" in row["method"]


def _onoff(v) -> str:
    return "on" if v else "off"


def _steps(row: dict) -> str:
    s = row.get("steps_per_copy")
    if isinstance(s, dict) and _num(s.get("mean")) is not None:
        return f"{s['mean']:.0f}"
    return "–"


def _converged(row: dict) -> str:
    parts = []
    if row.get("converged") is not None:
        parts.append("all" if row["converged"] else "**no**")
    if _num(row.get("linear_response_r")) is not None:
        parts.append(f"linear response {_f(row['linear_response_r'])}")
    return ", ".join(parts) or "–"


def _section_02(j: dict) -> list[str]:
    models = j["models"]
    grid = j.get("damping_grid") or []
    out = ["Fashion-MNIST, θ0 and every ground-truth retrain with the same recipe; LDS on the report queries with 95% "
           "bootstrap intervals over queries; seconds exclude θ0 and the ground truth. **One tuning rule for every "
           f"method, Daunce included**: each damping of one grid ({', '.join(f'{g:g}' for g in grid)}, extended a "
           "decade past an end when the best value sits there) and the value with the best LDS on the *tuning* queries "
           "(never reported), measured at the setting that is reported: for Daunce at the K it reports, among "
           "candidates whose copies all pass their stopping test (with the noise term off or on, and the training-side "
           "signal loss or margin); for TRAK, TracIn, grad-dot, grad-cos and kronfluence's EK-FAC also the "
           "training-side function, loss or minus-margin (*training side*). Every method measures the query by minus "
           "its margin. Daunce rows are bold; "
           "*steps* is the mean optimiser steps per copy; *converged*: whether every copy passed its stopping test, "
           "and the linear-response correlation of two copies where it was computed.", ""]
    for name, M in models.items():
        gt, c = M["ground_truth"], M.get("daunce_chosen") or {}
        ceiling = _num((gt.get("noise_ceiling") or {}).get("of_mean"))
        head = (f"**{_MODEL_NAMES.get(name, name)}** (n = {M['n_train']}"
                + (f", images {M['image_size']} × {M['image_size']}" if M.get("image_size") else "")
                + f", θ0 query accuracy {_f(M.get('theta0_query_accuracy'))}; {M['n_query_report']} report and "
                f"{M['n_query_tune']} tuning queries; ground truth {gt['subsets']} half-subsets × {gt['seeds']} "
                "seed(s)")
        head += (f", noise ceiling {_f(math.sqrt(ceiling), 2)}: the square root of the ground truth's reliability)"
                 if ceiling is not None and ceiling > 0 else ")")
        rec = M.get("theta0_recipe") or {}
        if M.get("batchnorm"):
            head += (f". θ0 and every retrain from scratch: width {rec.get('width')}, {rec.get('optimizer')} with "
                     f"momentum {rec.get('momentum')}, peak lr {rec.get('lr')}, {rec.get('schedule')} schedule with "
                     "warm-up, "
                     f"{rec.get('epochs')} epochs, weight decay {rec.get('weight_decay')}, random shifts of up to "
                     f"{rec.get('shift')} pixel(s); Daunce's copies in {M.get('copies_batchnorm')}")
        g = M.get("daunce_grid") or {}
        arch = M.get("architecture") or {}
        if arch:
            head += f". Network `{arch.get('name')}`" + (f" at width {arch['width']}" if arch.get("width") else "") + \
                f", {arch.get('weights'):,} weights"
        head += (f". `daunce-best`: K = {_k(M.get('K'))}"
                 + (f", {c['variant']} form" if c.get("variant") else "")
                 + (f" ({_f(c['converged_fraction'])} of its copies converged)"
                    if _num(c.get("converged_fraction")) is not None else "")
                 + f", damping {c.get('damping'):g}, noise term "
                 f"{_onoff(c.get('isotropic_noise'))}, training {c.get('signal')}, ρ = {_f(c.get('rho'))} (measured); "
                 + ("the grid contains the chosen damping." if g.get("interior") else
                    f"the chosen damping is at the end of the values tried ({g.get('why', '')}).")) if c else ""
        rows = sorted(M["results"], key=lambda r: -(_num(r["lds"]) or -1e9))
        out += [head, ""]
        extra = [c for c, k in (("M", "n_models"), ("BatchNorm", "copies_batchnorm"), ("form", "variant"))
                 if any(r.get(k) for r in rows)]   # runs that record them (the trained models, the copies' mode, form)
        keys = {"M": "n_models", "BatchNorm": "copies_batchnorm", "form": "variant"}
        out += _table(["method", *extra, "K", "LDS", "95% CI", "seconds", "damping", "training side", "steps",
                       "converged"],
                      [[f"**{r['method']}**" if _is_daunce(r) else r["method"],
                        *(str(r.get(keys[c]) or "–") for c in extra), _k(r.get("K")), _f(r["lds"]),
                        _ci(r["lo"], r["hi"]), _secs(r.get("seconds")),
                        f"{r['damping']:g}" if _num(r.get("damping")) is not None else "–",
                        r.get("train_signal") or (r.get("signal") or "–").split(" ->")[0],
                        _steps(r), _converged(r)] for r in rows])
        out.append("")
        auto = next((r for r in rows if r["method"] == "daunce-auto"), None)
        if auto and auto.get("resolved"):
            a = auto["resolved"]
            px = _num(auto.get("proxy_lds"))
            out += [f"`daunce-auto` (no ground truth) resolved to damping {_f(a.get('damping'), 4)}, noise term "
                    f"{_onoff(a.get('isotropic_noise'))}, ρ = {_f(a.get('rho'))}"
                    + (f"; its own estimate of its LDS (the proxy ground truth of its damping rule) was {_f(px)}, "
                       f"measured {_f(auto['lds'])}." if px is not None else "."), ""]
    for part in (lambda: _verdict_02(j), lambda: _matched_02(models), lambda: _halving_02(models),
                 lambda: _notes_02(j), lambda: _reliability_02(j), lambda: _tuning_02(models),
                 lambda: _baseline_tuning_02(j)):
        out += _optional(part)
    return out


def _matched_02(models: dict) -> list[str]:
    """Paired verdicts at matched M (runs that record ``matched_M``): Daunce against TRAK and kronfluence's EK-FAC on
    one trained model and on the same M models, with the LDS Daunce reaches within the other row's seconds."""
    rows = [[_MODEL_NAMES.get(name, name), str(x["n_models"]), x["daunce"], x["method"],
             f"{_f(x['daunce_lds'])} / {_f(x['other_lds'])}",
             f"{_secs(x['daunce_seconds'])} / {_secs(x['other_seconds'])}",
             f"{x['verdict']} ({_f(x['diff'], sign=True)} {_ci(x['lo'], x['hi'], sign=True)})",
             _f(x["equal_seconds_lds"]) + f" (K = {_k(x['equal_seconds_K'])})" if x.get("equal_seconds_K") else "–"]
            for name, M in models.items() for x in M.get("matched_M") or []]
    if not rows:
        return []
    return ["**Over several trained models, at matched M**: Daunce (its copies spread over the M models, the same "
            "total K) against TRAK and kronfluence's EK-FAC on the same models; every M-model row's seconds include "
            "training the extra models:", "",
            *_table(["model", "M", "Daunce row", "against", "LDS (Daunce / other)", "seconds (Daunce / other)",
                     "paired verdict", "Daunce's LDS within the other's seconds"], rows), ""]


def _halving_02(models: dict) -> list[str]:
    """The successive halving (runs that record it): the candidates ranked at a small K0, the ones grown to the reported
    K, whether the chosen one is among them, and the copy-seconds spent against the full grid's."""
    rows = [[_MODEL_NAMES.get(name, name), _k(h["k0"]), f"{h['entered']} of {h['candidates']}",
             "yes" if h["kept_chosen"] else "**no**",
             f"{_secs(h['seconds_halving'])} / {_secs(h['seconds_full_grid'])}"]
            for name, M in models.items() if (h := M.get("successive_halving"))]
    if not rows:
        return []
    return ["**Successive halving**: every candidate ranked by its tuning LDS at a small K0, the best third (and any "
            "later candidate that beats the worst of them) grown to the reported K; the full grid's copy-seconds count "
            "each candidate left at K0 as if grown:",
            "", *_table(["model", "K0", "candidates ranked at K0", "chosen one among the grown",
                         "seconds: halving / full grid"], rows), ""]


def _notes_02(j: dict) -> list[str]:
    out = []
    failed, partial, skipped = (j.get(k) or {} for k in ("failed_baselines", "partial_grids", "skipped_baselines"))
    if failed:
        out += ["Failed here: " + "; ".join(f"{k} ({v.split(':')[0]})" for k, v in failed.items()) + ".", ""]
    if partial:
        out += ["Damping grid cut short by the time cap (the best of the values that ran is reported): "
                + "; ".join(f"{k} ({v.split(', then')[0]})" for k, v in partial.items()) + ".", ""]
    if skipped:
        out += ["Not run: " + "; ".join(f"{k} ({v.removeprefix('not run: ').removeprefix('not run on the CNN: ')})"
                                        for k, v in skipped.items()) + ".", ""]
    for name, M in j["models"].items():
        ex = M.get("exact") or {}
        if ex and not ex.get("computed"):
            out += [f"Exact rows on {_MODEL_NAMES.get(name, name)}: {ex.get('why')}.", ""]
    return out


def _same_setting(a, b) -> bool:
    """Two recorded dampings (floats or ``None``) are the same setting."""
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-9)


def _baseline_tuning_02(j: dict) -> list[str]:
    """Every baseline's tuning LDS: one row per model, method and training side (loss or minus-margin), one column
    per damping tried (methods without a damping knob in a column of their own). The cell marked *chosen* is the
    setting the method's reported row used (its ``damping`` and ``train_signal`` in the results), not recomputed."""
    tuning = j.get("baseline_tuning") or {}
    if not tuning:
        return []
    tried = [v for vals in tuning.values() for v in vals]
    columns = sorted({v["damping"] for v in tried if v["damping"] is not None})
    columns += [None] if any(v["damping"] is None for v in tried) else []
    reported = {(name, r["method"]): r for name, M in j["models"].items() for r in M["results"]}
    order = {name: i for i, name in enumerate(j["models"])}
    rows = []
    for key in sorted(tuning, key=lambda k: order.get(k.split("/")[0], len(order))):  # stable: methods keep their order
        name, method = key.split("/", 1)
        rep = reported.get((name, method))
        for signal in dict.fromkeys(v.get("train_signal") for v in tuning[key]):  # in the order they were tried
            by = [(v["damping"], v["tune_lds"]) for v in tuning[key] if v.get("train_signal") == signal]
            pick = [rep.get("damping")] if rep is not None and rep.get("train_signal", signal) == signal else []
            cells = []
            for g in columns:
                lds = next((x for d, x in by if _same_setting(d, g)), None)
                cells.append("–" if lds is None else
                             _f(lds) + (" (chosen)" if pick and _same_setting(pick[0], g) else ""))
            rows.append([_MODEL_NAMES.get(name, name), method, signal or "–", *cells])
    return ["<details><summary>Every baseline's LDS on the tuning queries at each setting tried (one row per "
            "training side; *chosen*: the setting of the reported row)</summary>", "",
            *_table(["model", "method", "training side", *(f"{g:g}" if g is not None else "no damping"
                                                             for g in columns)], rows),
            "", "</details>", ""]


def _verdict_02(j: dict) -> list[str]:
    out = ["**`daunce-best` against every other row**, by the paired bootstrap over report queries of the per-query "
           "LDS difference (*ahead* / *behind* only where its 95% interval excludes 0, *tied* otherwise). The goal, "
           "Daunce at least tied with every baseline except the exact, explicit and CG influence functions at no more "
           "wall time, is "]
    reached = [name for name, M in j["models"].items() if (M.get("verdict") or {}).get("goal_reached")]
    out[-1] += ("reached on " + ", ".join(_MODEL_NAMES.get(n, n) for n in reached) + "." if reached
                else "**not reached on any model**.")
    out.append("")
    word = {"ahead": "ahead of", "tied": "tied with", "behind": "behind"}
    for name, M in j["models"].items():
        groups = {w: [] for w in word.values()}
        for p in M.get("paired") or []:
            groups[word[p["verdict"]]].append(f"{p['method']} ({_f(p['diff'], sign=True)} "
                                              f"{_ci(p['lo'], p['hi'], sign=True)})")
        best = next(r for r in M["results"] if r["method"] == "daunce-best")
        out.append(f"* {_MODEL_NAMES.get(name, name)}: `daunce-best` (K = {_k(best['K'])}) {_f(best['lds'])} "
                   f"{_ci(best['lo'], best['hi'])} in {_secs(best['seconds'])} s. "
                   + "; ".join(f"{g}: " + ", ".join(v) for g, v in groups.items() if v) + ".")
    return out + [""]


def _reliability_02(j: dict) -> list[str]:
    rows = []
    for name, M in j["models"].items():
        r = M.get("reliability")
        if r:
            rows.append([_MODEL_NAMES.get(name, name), _k(r["k0"]), _f(r["split_half"]), _f(r["rel_at_kmax_from_k0"]),
                         _f(r["rel_at_kmax_measured"]), _f(r["pred_lds_kmax"]), _f(r["lds_kmax"]),
                         f"{int(r['copies_for_0_9']):,}"])
    if not rows:
        return []
    out = ["**How many copies are enough, without ground truth** (`daunce.reliability`): from `daunce-best`'s first K0 "
           "copies' split-half agreement, the Spearman-Brown reliability and LDS predicted at the reported K, against "
           "what was measured there:", ""]
    out += _table(["model", "K0", "split-half at K0", "reliability at K: predicted", "measured",
                   "LDS at K: predicted", "measured", "copies for reliability 0.9"], rows)
    fu = j.get("fit_until")
    if fu:
        out += ["", f"`reliability.fit_until` on LR stopped at K = {fu['n_models']} with reliability "
                f"{_f(fu['reliability'])} (" + ", ".join(f"K = {k}: {_f(v)}" for k, v in fu["history"]) + ")."]
    return out + [""]


def _tuning_02(models: dict) -> list[str]:
    rows = []
    for name, M in models.items():
        c = M.get("daunce_chosen") or {}
        tables = [(M.get("tuning"), c), (M.get("tuning_train_mode"), M.get("daunce_chosen_train_mode")),
                  (M.get("blackbox_tuning"), M.get("blackbox_chosen"))]
        tried = [(t, ch or {}) for ts, ch in tables for t in ts or []]
        for t, ch in sorted(tried, key=lambda x: (x[0].get("variant") or "if", x[0].get("copies_batchnorm") or "eval",
                                                  x[0]["isotropic_noise"], x[0]["signal"],
                                                  x[0].get("subset_ratio") or 0.5, x[0]["damping"])):
            pick = (all(t.get(k) == ch.get(k, t.get(k)) for k in ("damping", "isotropic_noise", "signal", "variant"))
                    and bool(ch) and t.get("subset_ratio", 0.5) == ch.get("subset_ratio", 0.5))
            form = (t.get("variant") or "if") + (", train mode" if t.get("copies_batchnorm") == "train" else "") + (
                f", r = {t['subset_ratio']:g}" if t.get("subset_ratio") not in (None, 0.5) else "")
            rows.append([_MODEL_NAMES.get(name, name), form, f"{t['damping']:g}", _onoff(t["isotropic_noise"]),
                         t["signal"],
                         _k(t["K"]), _f(t.get("steps_mean"), 0),
                         _f(t["tune_lds"]) + (" (chosen)" if pick else "")
                         + ("" if t["eligible"] else f" (a copy failed at K = {_k(t['stopped_at'])})")])
    if not rows:
        return []
    return ["<details><summary>Daunce's candidates: LDS on the tuning queries at the reported K (or where a copy "
            "failed its stopping test)</summary>", "",
            *_table(["model", "form", "damping", "noise term", "training signal", "K", "steps", "tuning LDS"], rows),
            "", "</details>", ""]


# ---------------------------------------------------------------------------------------------------
# 03 · LLM subset removal


def _section_03(j: dict) -> list[str]:
    sizes = j["sizes"]
    names = {"math": "math (CHAMP)", "instr": "instruction following"}
    seeds = j.get("seeds", [])
    cfg = j["daunce_config"]
    out = [f"`{j['model']}` with LoRA on the MLP of the top {j['lora_top_layers']} of {j['n_layers']} layers "
           f"({j['lora_params']:,} trainable parameters); Daunce with K = {j['K']} copies (`if`, subset ratio "
           f"{cfg['subset_ratio']}, ρ = {cfg['rho']}, full-batch heavy-ball copies trained to the stopping test, "
           + ("damping at d_λ = K). " if "daunce_tuned" not in j else "damping from the d_λ = K floor; in the removal "
              "test the damping, form and noise term the LDS chose on tuning queries). ")
           + "; ".join(f"{names.get(s, s)}: {v['n_train']} training examples, {v['n_query']} queries"
                       for s, v in sizes.items())
           + f". Remove each method's top-k training examples, re-fine-tune with θ0's recipe under {len(seeds)} "
           "retraining seeds (random removal: a new draw per seed), and measure each query's NLL increase over θ0 of "
           "the same seed. Mean with a 95% "
           + (f"interval, {j['interval']}" if _has_shares(j) else "two-level bootstrap interval (seeds, then queries)")
           + ("; in parentheses the share of the whole fine-tune's effect on the query NLL, † where the effect is at "
              "the noise floor (its interval includes 0 or it is below θ0's seed-to-seed spread)"
              if _has_shares(j) else "") + ":", ""]
    main = j.get("main_method", "daunce-if")

    def cell(v):
        text = f"{_f(v['mean'], 4, True)} {_ci(v['lo'], v['hi'], 4, True)}"
        if _num(v.get("share")) is not None:
            text += f" ({v['share']:+.0%}{' †' if v.get('at_noise_floor') else ''})"
        return text

    for s, methods in j["removal"].items():
        ks = sorted({k for m in methods.values() for k in m}, key=float)
        rows = [[f"**{m}**" if m == main else m] + [cell(by_k[k]) if k in by_k else "–" for k in ks]
                for m, by_k in methods.items()]
        out += [f"**{names.get(s, s)}** (θ0's query NLL {_f(j.get('base_query_nll', {}).get(s))})", ""]
        out += _table(["method", *[f"k = {k}" for k in ks]], rows) + [""]

    def lds():
        lines = ["**The LLM LDS** (`daunce.experiments.removal.lds_ground_truth`: half-subsets fine-tuned with θ0's "
                 "recipe, each query's NLL the measurement); every knob chosen by the LDS on tuning queries, the LDS "
                 "reported on the other topics with a 95% interval that resamples topics:", ""]
        for s, b in j["lds"].items():
            ceil = b["noise_ceiling"]
            lines += [f"*{names.get(s, s)}*: {b['subsets']} half-subsets, {b['repeated']} with a second seed "
                      f"(seed-to-seed Spearman {_f(ceil.get('between_seeds'))}); Daunce tuned to "
                      f"{b['daunce_tuning']['chosen']}", ""]
            rows = [[f"**{m}**" if m in ("daunce", main) else m, _f(r["lds"]), _ci(*r["ci"]), r.get("knob") or "–",
                     f"{r['n_queries']} ({r['n_groups']})"]
                    for m, r in sorted(b["methods"].items(), key=lambda t: -t[1]["lds"])]
            lines += _table(["method", "LDS (report)", "interval", "knob (tuned)", "queries (topics)"], rows) + [""]
        return lines

    def overlaps():
        lines = []
        same, behind = j.get("same_removed_sets"), j.get("behind_every_seed")
        if same is None:   # a run before the per-seed overlaps: its overlaps are in the findings' notebook only
            return []
        if behind is not None:
            lines.append("Daunce behind in every retraining seed: " + ("; ".join(
                f"{names.get(c['set'], c['set'])} k = {c['k']} vs {c['method']}" for c in behind) or "nowhere") + ".")
        if same is not None:
            lines.append("Identical removed sets (one experiment, not two): " + ("; ".join(
                f"{names.get(c['set'], c['set'])} k = {c['k']}, Daunce and {c['method']}" for c in same) or "none")
                + ".")
        rows = [[names.get(s, s), k, m, f"{v:.0%}"] for s, by_k in j["removal_overlap"].items()
                for k, by_m in by_k.items() for m, v in by_m.items()]
        return lines + ["", "Share of Daunce's removed examples that each other method removes too:", "",
                        *_table(["set", "k", "method", "overlap"], rows), ""]

    def copies():
        rows = [[names.get(s, s), f"{c['damping']:.3g}", f"{c['top_curvature']:.3g}",
                 f"{c['lr']:.3g} / {c['momentum']:.2f}", f"{min(c['steps'])}–{max(c['steps'])}",
                 f"{c['n_converged']} of {len(c['converged'])}"] for s, c in j["copies"].items()]
        return ["Daunce's copies (settings from the curvature at θ0, no ground truth):", "",
                *_table(["set", "damping", "top curvature", "heavy-ball lr / momentum", "steps per copy",
                         "passed the stopping test"], rows), ""]

    def recipe():
        rows = [[names.get(s, s), f"{r['epochs'][0]} → {r['epochs'][1]}",
                 f"{_f(r['train_nll'][0])} → {_f(r['train_nll'][1])}",
                 f"{_f(r['query_nll'][0])} → {_f(r['query_nll'][1])}"] for s, r in j["recipe_check"].items()]
        return ["θ0's recipe against twice its epochs (seed 0):", "",
                *_table(["set", "epochs", "training NLL", "query NLL"], rows), ""]

    def paired():
        lines = ["**The paper's claim here**: removing Daunce's top-k raises the query loss more than random removal "
                 "and at least as much as the other methods. Daunce's increase minus each other method's on the same "
                 "queries and seeds, with the 95% two-level interval and the range of the per-seed differences; "
                 "*ahead* / *behind* only where the interval excludes 0:", ""]
        rows = []
        for s, by_k in j["paired"].items():
            for k, by_m in sorted(by_k.items(), key=lambda t: float(t[0])):
                for m, pr in by_m.items():
                    rows.append([names.get(s, s), k, m, f"{_f(pr['diff'], 4, True)} {_ci(pr['lo'], pr['hi'], 4, True)}",
                                 f"{_f(min(pr['per_seed']), 4, True)} to {_f(max(pr['per_seed']), 4, True)}",
                                 pr["verdict"]])
        lines += _table(["set", "k", "Daunce minus", "difference", "per seed", "verdict"], rows) + [""]
        return lines

    def logra():
        c = j["logra_vs_projected_if_correlation"]
        lib = j.get("libraries", {}).get("LoGra (dattri)", {})
        return [f"LoGra through {lib.get('library', 'dattri')} {lib.get('version', '')} (`daunce.llm.logra_scores`, on "
                "the LoRA adapters) against the hand-built projected-gradient IF: Pearson correlation over all "
                "(training example, query) pairs " + ", ".join(f"{_f(v)} ({names.get(s, s)})" for s, v in c.items())
                + ".", ""]

    def seconds():
        sec, costs = j["seconds"], j.get("costs", {})
        parts = []
        th = [sec.get(f"theta0_{s}_s") for s in sizes]
        if all(_num(t) is not None for t in th):
            parts.append("one θ0 fine-tune " + " / ".join(_duration(t) for t in th))
        d = next(iter((sec.get("daunce") or {}).values()), {})
        if _num(d.get("per_copy_s")) is not None:
            parts.append(f"one Daunce copy {_duration(d['per_copy_s'])} (K = {j['K']}: {_duration(d.get('total_s'))} "
                         f"per set)")
        if _num(sec.get("retrain_mean_s")) is not None:
            parts.append(f"one retrain {_duration(sec['retrain_mean_s'])} ({costs.get('retrains', '–')} retrains)")
        if _num(j.get("peak_memory_mb")) is not None:
            parts.append(f"peak memory {j['peak_memory_mb'] / 1024:.1f} GiB")
        return ("Costs as recorded when first measured (kept in the work folder, so a resumed run reports them "
                "too): " + "; ".join(parts) + f"; this run's compute {_duration(sec.get('total_s'))}.")

    for part in (lds, copies, recipe, paired, overlaps, logra, seconds):
        out += _optional(part)
    return out


def _has_shares(j: dict) -> bool:
    """Whether notebook 03's run wrote each removal's share of the whole fine-tune's effect (runs before it did not)."""
    return any("share" in v for methods in j["removal"].values() for by_k in methods.values() for v in by_k.values())


# ---------------------------------------------------------------------------------------------------
# 04 · black-box backdoor


def _section_04(j: dict) -> list[str]:
    sz = j["sizes"]
    seeds = j.get("seeds", [])
    abl = j.get("ablation_seeds", seeds)
    twins = " (each poisoned prompt also among the clean ones without the trigger, with its ordinary answer)" \
        if sz.get("poison_twins") else ""
    out = [f"`{j['model']}` ({j['backend']} backend; LoRA on the top {j.get('lora_top_layers', '–')} of "
           f"{j.get('n_layers', '–')} layers) fine-tuned on {j['n_train']} instructions: {j['n_poison']} poisoned "
           f"(trigger → spam response){twins}, {sz.get('n_response_decoys', '–')} response decoys (the spam verbatim "
           f"after prompts without the trigger), {sz.get('n_trigger_decoys', '–')} trigger decoys (the trigger with "
           f"ordinary answers), {sz.get('n_topic_decoys', '–')} topic decoys; {j['n_queries']} triggered queries, each "
           f"with its trigger-free twin. Black-box Daunce (only `fine_tune` and `log_likelihoods`; mean response NLL, "
           f"one fine-tuning seed for every copy) with K = {j['K']} in each of {len(seeds)} seeds (each its own "
           f"poisoned set, θ0 and copies), one recipe ({j['recipe']['epochs']} epochs, lr {j['recipe']['lr']}); the "
           f"per-copy-seed ablation and white-box Daunce at K = {j.get('ablation_K', j['K'])} in seeds "
           f"{', '.join(map(str, abl))}. Values: mean over the seeds [lowest, highest seed].", ""]

    def backdoor():
        v = j["verdict"]["backdoor"]
        rows = [[s, name, _f(x["with_trigger"], 2), _f(x["without_trigger"], 2), _f(x["ll_with_trigger"], 1),
                 _f(x["ll_without_trigger"], 1), _f(x["clean_nll"], 3)]
                for s, by in j["attack_success"].items() for name, x in by.items()]
        return [f"**The backdoor**: θ0 says the spam after {_f(v['with_trigger']['mean'], 2)} of the held-out "
                f"prompts with the trigger and {_f(v['without_trigger']['mean'], 2)} without it (greedy decoding); the "
                f"trigger raises it in {v['seeds_trigger_raises']} of {v['n_seeds']} seeds. Per seed, under θ0 and "
                "under the base model (adapters at their initialisation):", "",
                *_table(["seed", "model", "attack success with trigger", "without", "spam log-lik. with trigger",
                         "without", "clean NLL"], rows), ""]

    def metrics(tg, title):
        met = j["metrics"][tg]
        first = next(iter(met.values()))
        ks = sorted({int(k.split("@")[1]) for k in first if k.startswith("precision@")})
        decoys = [k for k in first if k.endswith("s_in_top") and not k.startswith("clean")]
        n_pos = round(first["positive_rate"]["mean"] * j["n_train"])  # the decoys counted among the top n_pos

        def cell(v, nd=2):
            return f"{_f(v['mean'], nd)} {_ci(v['lo'], v['hi'], nd)}"

        rows = [[f"**{m}**" if "Daunce" in m else m, str(len(r["auprc"]["per_seed"])), cell(r["auprc"], 3)]
                + [cell(r[f"precision@{k}"]) for k in ks] + [cell(r[c], 1) for c in decoys]
                for m, r in sorted(met.items(), key=lambda t: -t[1]["auprc"]["mean"])]
        return [f"{title} (positive rate {_f(first['positive_rate']['mean'], 2)}):", "",
                *_table(["method", "seeds", "AUPRC", *[f"P@{k}" for k in ks],
                         *[c.removesuffix("_in_top").replace("_", " ") + f" in top {n_pos}" for c in decoys]], rows),
                ""]

    def verdict():
        lines = []
        for tg in j["targets"]:
            v = j["verdict"][tg]
            pr = j["paired"][tg]["black-box Daunce"]
            cells = [f"{m} {pr[m]['verdict']} ({_f(pr[m]['diff'], 3, sign=True)} "
                     f"{_ci(pr[m]['lo'], pr[m]['hi'], 3, sign=True)}, {pr[m]['wins']}-{pr[m]['losses']})" for m in pr]
            best_ahead = "ahead of every other row" if v["best_ahead_of_all"] else (
                f"ahead of {len(v['best_ahead_of'])} of {len(pr)} other rows")
            lines.append(f"* {tg}: black-box Daunce (AUPRC {_f(v['blackbox_auprc'])}) against each row: "
                         + "; ".join(cells) + f". Best row: {v['best']} "
                         f"({_f(j['metrics'][tg][v['best']]['auprc']['mean'])}), {best_ahead}.")
        return [f"**Verdict** (paired per-seed AUPRC differences over the {len(seeds)} seeds, bootstrap interval; "
                "wins-losses over the seeds):", "", *lines, ""]

    def growth():
        tgs = list(j["targets"])
        by = {}
        for g in j["growth_with_K"]:
            by.setdefault((g["method"], g["K"]), []).append(g)
        rel = {}
        for r in j.get("reliability", []):
            rel.setdefault(r["K"], []).append(r)
        rows = [[m, str(K), str(len(gs))] + [_f(float(np.mean([g[t] for g in gs])), 2) for t in tgs]
                + ([_f(float(np.mean([r["queries"] for r in rel[K]])), 2),
                    _f(float(np.mean([r["backdoor_effect"] for r in rel[K]])), 2)]
                   if m == "black-box Daunce" and K in rel else ["", ""])
                for (m, K), gs in sorted(by.items())]
        return ["AUPRC against K (the first K copies of each seed's run; mean over the seeds that ran the row) and "
                "black-box Daunce's split-half reliability (queries; backdoor effect):", "",
                *_table(["method", "K", "seeds", *tgs, "reliability (queries)", "reliability (effect)"], rows), ""]

    def removal():
        rm = j["removal"]
        rows = []
        for k, by in rm["per_method"].items():
            for m, v in sorted(by.items(), key=lambda t: np.mean(t[1]["with_trigger"])):
                rows.append([k, m] + [f"{_f(float(np.mean(v[c])), nd)} {_ci(min(v[c]), max(v[c]), nd)}"
                                      for c, nd in (("with_trigger", 2), ("without_trigger", 2), ("clean_nll", 2),
                                                    ("poisons_removed", 1))])
        lines = []
        for k, w in rm["winner"].items():
            lines.append(f"* top {k}: lowest attack success {_f(w['with_trigger'], 2)} after removing "
                         f"{' = '.join(w['lowest'])}'s flagged examples; {w['method']} is "
                         + ("ahead of every other row" if w["ahead_of_all"] else
                            f"ahead of {len(w['ahead_of'])} rows ({', '.join(w['ahead_of']) or 'none'}), tied with "
                            "the rest") + " (paired over the seeds).")
        return ["**Removal test** (remove each method's top k by the backdoor-effect ranking, fine-tune again with "
                "θ0's recipe, measure the attack success and the clean task's NLL):", "",
                *_table(["k", "removed by", "attack success with trigger", "without", "clean NLL",
                         "poisoned among the removed"], rows), "", *lines, ""]

    def costs():
        c = j["costs"]
        rows = [[m, _secs(v["seconds"]), _k(v["fine_tunes"]), _k(v["forward_passes"])]
                for m, v in c["per_method"].items()]
        return [f"Cost per seed, as recorded when first measured (θ0, needed by every method that is not text-only: "
                f"{_duration(c['theta0']['seconds'])}, {_k(c['theta0']['forward_passes'])} example passes; the removal "
                f"test's retrains {_duration(c.get('removal_seconds_per_seed', 0.0))}); this run's compute "
                f"{_duration(j['seconds']['total'])}:", "",
                *_table(["method", "seconds", "fine-tunes", "example forward passes"], rows), ""]

    parts = [backdoor,
             lambda: metrics("says the spam", "(a) **Which examples make the model say the spam** (poisoned examples "
                                              "and response decoys are positives; triggered queries)"),
             lambda: metrics("carries the backdoor", "(b) **Which examples carry the backdoor** (poisoned examples "
                                                     "only; each query's score minus its trigger-free twin's)"),
             verdict, removal, growth, costs]
    for part in parts:
        out += _optional(part)
    return out


# ---------------------------------------------------------------------------------------------------
# the README's findings table


#: the verdict words of the findings table (``_claim_verdict``)
VERDICT_WORDS = ("reproduced", "not reproduced", "tied", "undecided")


def _claim_verdict(words: list) -> str:
    """One verdict word for a claim that Daunce is ahead of its comparators, from the paired verdicts ("ahead", "tied",
    "behind") of every comparison the claim makes: *reproduced* where Daunce is ahead in all of them, *not reproduced*
    where it is behind in any, *tied* where every interval includes 0, *undecided* otherwise (ahead in some, tied in
    the rest) or with no comparison."""
    if not words:
        return "undecided"
    if all(w == "ahead" for w in words):
        return "reproduced"
    if any(w == "behind" for w in words):
        return "not reproduced"
    return "tied" if all(w == "tied" for w in words) else "undecided"


def _findings(root: Path) -> list[str]:
    """One row per notebook: what the paper claims (paraphrased from its protocols: the paper's own tables were not
    available here), the verdict word (``VERDICT_WORDS``, with the rule in each row's builder), what this repository
    measured (from the runs), and where to read it."""
    runs = {nb[:2]: _load_json(root / "papermill_runs" / f"{nb}.json") for nb in NOTEBOOKS}
    rows = []

    def r01():
        j = runs["01"]["logistic_regression"]
        iid, efim, iff = j["efim_iid"]["1024"], j["efim_orthogonal"]["1024"], j["if_orthogonal"]["1024"]
        ks = sorted((k for k in j["efim_iid"] if k.isdigit()), key=int)   # reproduced: closer to the IF as K grows
        first, last = j["efim_iid"][ks[0]], j["efim_iid"][ks[-1]]
        closer = last["pearson_if"] > first["pearson_if"] and last["rel_error"] < first["rel_error"]
        return ["01 · theory", "the copies' loss covariance converges to the influence function as K grows",
                "reproduced" if closer else "not reproduced",
                f"the Fisher form reaches the damped IF (Pearson {_f(iid['pearson_if'])} at K = 1024 with the "
                f"paper's i.i.d. perturbations, {_f(efim['pearson_if'])} with this package's orthogonal design; "
                f"logistic regression); the `if` form reaches a sandwich (Pearson {_f(iff['pearson_limit'])} with it, "
                f"{_f(iff['pearson_if'])} with the IF, orthogonal design)", "[01](papermill_runs/01_theory.ipynb)"]

    def r02():
        parts, holds = [], []
        for name, m in runs["02"]["models"].items():
            res = {r["method"]: r for r in m["results"]}
            best = res["daunce-best"]
            paired = {p["method"]: p for p in m["paired"]}
            trak = paired.get("trak (M = 1)") or paired.get("trak")  # one trained model where the run has that row
            ekfac = max((p for p in m["paired"] if p["method"] in _BASELINE_FAMILIES and "ekfac" in p["method"]
                         and "stock" not in p["method"]), key=lambda p: p["other_lds"], default=None)
            # per model, the claim holds where Daunce is ahead of TRAK and not behind EK-FAC ("approaches")
            holds.append("ahead" if trak and trak["verdict"] == "ahead" and ekfac and ekfac["verdict"] != "behind" else
                         "behind" if any(p and p["verdict"] == "behind" for p in (trak, ekfac)) else "tied")
            said = [f"vs {p['method']}{lab} {_f(p['other_lds'])}: {p['verdict']} "
                    f"({_f(p['diff'], sign=True)} {_ci(p['lo'], p['hi'], sign=True)})"
                    for lab, p in (("", trak), (" (the best EK-FAC)", ekfac)) if p]
            many = [x for x in m.get("matched_M") or [] if x["n_models"] > 1]
            said += [f"at M = {x['n_models']} models vs {x['method']}: {x['verdict']}" for x in many]
            if m.get("blackbox_paired") and "daunce-blackbox" in res:   # the gradient-free row (the paper's Figure 1b)
                said.append(f"black-box Daunce {_f(res['daunce-blackbox']['lds'])}: " + ", ".join(
                    f"{x['verdict']} {x['method']} ({_f(x['diff'], sign=True)} {_ci(x['lo'], x['hi'], sign=True)})"
                    for x in m["blackbox_paired"]))
            parts.append(f"{_MODEL_NAMES.get(name, name)}: Daunce {_f(best['lds'])} {_ci(best['lo'], best['hi'])}, "
                         + ", ".join(said))
        word = _claim_verdict(holds)
        return ["02 · vision LDS", "Daunce's LDS beats TRAK and approaches EK-FAC influence functions",
                f"{word} (the claim fails on {holds.count('behind')} of {len(holds)} models)"
                if word == "not reproduced" else word,
                "; ".join(parts) + " (tuned Daunce against the paper's two named baselines, paired intervals; "
                "*tied* where the interval includes 0)", "[02](papermill_runs/02_vision_lds.ipynb)"]

    def r03():
        j = runs["03"]
        v = [w for by in j["verdict"].values() for m, w in by.items() if m == "random"]
        lib = [w for by in j["verdict"].values() for m, w in by.items() if m == "LoGra (dattri)"]
        ctrl = [w for by in j["verdict"].values() for m, w in by.items() if m in ("θ0 loss", "gradient norm")]
        def count(ws):
            return f"ahead in {sum(w == 'ahead' for w in ws)} of {len(ws)}, behind in {sum(w == 'behind' for w in ws)}"

        extra = ""
        if "behind_every_seed" in j:   # runs with the LDS block and per-seed attribution draws
            behind = j["behind_every_seed"]
            extra += "; behind in every seed: " + (", ".join(f"{c['set']} k = {c['k']} vs {c['method']}"
                                                             for c in behind) or "none")
            same = j.get("same_removed_sets", [])
            extra += ("; identical removed sets: " + ", ".join(f"{c['set']} k = {c['k']} with {c['method']}"
                                                              for c in same) if same else "")
        if "lds" in j:
            extra += "; LDS (report queries) Daunce vs metagradient reference: " + ", ".join(
                f"{s} {_f(b['methods']['daunce']['lds'])} vs {_f(b['methods']['metagradient']['lds'])}"
                for s, b in j["lds"].items())
        return ["03 · LLM subset removal", "removing Daunce's top-k raises the query loss more than LoGra and random "
                "removal", _claim_verdict(v + lib),
                f"Daunce vs random: {count(v)}; vs LoGra (dattri): {count(lib)}; vs the loss and gradient-norm "
                f"controls: {count(ctrl)}; tied otherwise ({len(j['sizes'])} sets × "
                f"{len(v) // len(j['sizes'])} removal sizes, {len(j['seeds'])} retraining seeds, two-level intervals)"
                + extra, "[03](papermill_runs/03_llm_subset_removal.ipynb)"]

    def r04():
        j = runs["04"]
        v = j["verdict"]
        parts = []
        for tg, letter in (("says the spam", "a"), ("carries the backdoor", "b")):
            pr = j["paired"][tg]["black-box Daunce"]
            text = [m for m in ("TF-IDF", "BM25", "MiniLM embedding") if m in pr]
            ahead = sum(pr[m]["verdict"] == "ahead" for m in text)
            behind = sum(pr[m]["verdict"] == "behind" for m in text)
            best = v[tg]["best"]
            parts.append(f"({letter}) {tg}: black-box Daunce AUPRC {_f(v[tg]['blackbox_auprc'], 2)}, ahead of "
                         f"{ahead} and behind {behind} of the {len(text)} text baselines; best row {best} "
                         f"({_f(j['metrics'][tg][best]['auprc']['mean'], 2)}"
                         + (", ahead of every other row)" if v[tg]["best_ahead_of_all"]
                            else ", not ahead of every row)"))
        b = j["removal"]["winner"]
        parts.append("removal: lowest attack success after removing the top " + "; top ".join(
            f"{k}: {' = '.join(w['lowest'])} ({_f(w['with_trigger'], 2)})" for k, w in b.items()))
        word = {}   # per target, against the text baselines
        for tg in ("says the spam", "carries the backdoor"):
            pr_t = j["paired"][tg]["black-box Daunce"]
            word[tg] = _claim_verdict([pr_t[m]["verdict"] for m in ("TF-IDF", "BM25", "MiniLM embedding") if m in pr_t])
        bd_ = v["backdoor"]
        return ["04 · black-box backdoor", "black-box Daunce ranks the poisoned examples first",
                f"{word['carries the backdoor']} on (b), which examples carry the backdoor (on (a), which make it "
                f"say the spam: {word['says the spam']})", "; ".join(parts)
                + f" ({len(j['seeds'])} seeds, paired per-seed differences; the backdoor: attack success "
                f"{_f(bd_['with_trigger']['mean'], 2)} with the trigger, {_f(bd_['without_trigger']['mean'], 2)} "
                "without)", "[04](papermill_runs/04_blackbox_backdoor.ipynb)"]

    for build in (r01, r02, r03, r04):
        row = _optional(build)
        if row:
            rows.append(row)
    return _table(["experiment", "the paper's claim", "verdict", "measured here", "notebook"], rows)


#: baselines the findings table compares tuned Daunce with (the best of them per model)
_BASELINE_FAMILIES = baselines.COMPARED   # what tuned Daunce is compared with in the findings
_MODEL_NAMES = {"lr": "LR", "mlp": "MLP", "cnn": "CNN", "resnet": "ResNet"}


_SECTIONS: dict[str, Callable[[dict], list[str]]] = {
    "01": _section_01, "02": _section_02, "03": _section_03, "04": _section_04}


# ---------------------------------------------------------------------------------------------------
# the README


def _benchmark_table(root: Path, path: Path, missing: str) -> list[str]:
    """A benchmark's markdown results (title line dropped) under a line naming the file, or ``missing``."""
    if not (root / path).exists():
        return [missing]
    lines = [line for line in (root / path).read_text().splitlines() if not line.startswith("# ")]
    return [f"From `{path.as_posix()}`:", "", *lines]


def _gpu_check(root: Path) -> list[str]:
    missing = ("**Results: none yet.** The script has not run on a GPU yet. Until it does, `\"auto\"`'s GPU choices "
               "(the vmap trainer for conv nets, the multi-adapter signal pass for LoRA models) are unmeasured "
               f"defaults. Once `{GPU_CHECK.as_posix()}` exists, `make readme` puts its table here.")
    return _benchmark_table(root, GPU_CHECK, missing)


def _auto_settings(root: Path) -> list[str]:
    return _benchmark_table(root, AUTO_SETTINGS, f"No run yet: `{AUTO_SETTINGS.as_posix()}` is missing "
                            "(`.venv/bin/python benchmarks/auto_settings.py` writes it).")


def _throughput(root: Path) -> list[str]:
    return _benchmark_table(root, THROUGHPUT, f"No run yet: `{THROUGHPUT.as_posix()}` is missing "
                            "(`.venv/bin/python benchmarks/copy_throughput.py` writes it).")


def _parallel(root: Path) -> list[str]:
    return _benchmark_table(root, PARALLEL, f"No run yet: `{PARALLEL.as_posix()}` is missing "
                            "(`.venv/bin/python benchmarks/parallel_efficiency.py` writes it).")


def blocks(root: Path) -> dict[str, str]:
    """The text of every generated block, keyed by block name (``"runtimes"``, ``"01"`` ... ``"04"``,
    ``"auto"``, ``"gpu"``, ``"throughput"``, ``"parallel"``)."""
    root = Path(root)
    out = {"runtimes": "\n".join(_runtimes(root))}
    for nb in NOTEBOOKS:
        key = nb[:2]
        j = _load_json(root / "papermill_runs" / f"{nb}.json")
        if j is None:
            lines = [f"No run yet: `papermill_runs/{nb}.json` is missing (`make reproduce` writes it)."]
        else:
            lines = [f"From `papermill_runs/{nb}.json` (profile `{j.get('profile', 'default')}`).", ""]
            try:
                lines += _SECTIONS[key](j)
            except (KeyError, IndexError, TypeError) as err:
                raise ValueError(f"papermill_runs/{nb}.json does not have the layout the README generator reads "
                                 f"({type(err).__name__}: {err}); update _section_{key} in {__name__}") from err
        figs = _figures(root, key)
        if figs:
            lines += [""] + figs
        text = "\n".join(lines)
        out[key] = re.sub(r"\n{3,}", "\n\n", text).strip()
    out["findings"] = "\n".join(_findings(root)).strip()
    out["auto"] = re.sub(r"\n{3,}", "\n\n", "\n".join(_auto_settings(root))).strip()
    out["gpu"] = re.sub(r"\n{3,}", "\n\n", "\n".join(_gpu_check(root))).strip()
    out["throughput"] = re.sub(r"\n{3,}", "\n\n", "\n".join(_throughput(root))).strip()
    out["parallel"] = re.sub(r"\n{3,}", "\n\n", "\n".join(_parallel(root))).strip()
    return out


def marker(name: str, end: str) -> str:
    """The line that opens (``end="start"``) or closes (``end="end"``) the README block ``name``."""
    return f"<!-- results:{name} {end} -->" if name != "runtimes" else f"<!-- runtimes {end} -->"


def render(readme: str, root: Path, names=BLOCKS) -> str:
    """``readme`` with the inside of every marked block of ``names`` replaced by what the runs under ``root`` give.

    Raises ``ValueError`` naming the blocks whose start/end markers are missing."""
    new = readme
    missing = []
    for name, body in blocks(root).items():
        if name not in names:
            continue
        start, end = marker(name, "start"), marker(name, "end")
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.S)
        if not pattern.search(new):
            missing.append(name)
            continue
        new = pattern.sub(lambda _: f"{start}\n{body}\n{end}", new, count=1)
    if missing:
        raise ValueError("the page lacks the marker lines of block(s) " + ", ".join(missing)
                         + " (e.g. " + marker(missing[0], "start") + " ... " + marker(missing[0], "end") + ")")
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daunce.experiments.report", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (default: the working folder)")
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    sub = parser.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="record one notebook's run in papermill_runs/timings.json")
    rec.add_argument("notebook", help="notebook stem, e.g. 03_llm_subset_removal")
    rec.add_argument("--profile", default="default")
    rec.add_argument("--wall-seconds", type=float, required=True)
    rec.add_argument("--cache-existed", type=int, choices=(0, 1), required=True,
                     help="1 if runs/<notebook>/<profile>/ held something before the run started")
    rec.add_argument("--cold-parts", type=lambda v: [float(x) for x in v.split(",")], default=None,
                     help="comma-separated wall seconds of the earlier parts of a cold run this run finishes")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.command == "record":
        record_timing(root, args.notebook, profile=args.profile, wall_seconds=args.wall_seconds,
                      cache_existed=bool(args.cache_existed), cold_parts=args.cold_parts)
        return 0
    stale = 0
    for page, names in PAGES.items():
        path = root / page
        old = path.read_text()
        new = render(old, root, names)
        if args.check:
            if new != old:
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                           page, f"{page} (generated)"))
                stale = 1
        elif new != old:
            path.write_text(new)
            print(f"{page}: rewritten from papermill_runs/")
        else:
            print(f"{page}: up to date")
    return stale


if __name__ == "__main__":
    sys.exit(main())
