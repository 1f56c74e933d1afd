"""The README's results, written from the runs.

README.md holds blocks between marker lines::

    <!-- runtimes start -->    ...  <!-- runtimes end -->
    <!-- results:01 start -->  ...  <!-- results:01 end -->      (and 02, 03, 04, gpu)

:func:`render` rewrites the inside of every block from what the runs left behind and leaves everything
outside the markers as it is:

* ``papermill_runs/NN_*.json``: each notebook's metrics; every number of a results block is read (or
  computed, e.g. a minimum or a slope) from these files;
* ``papermill_runs/NN_*.ipynb``: papermill's own measured duration of each executed notebook;
* ``papermill_runs/timings.json``: written by ``make reproduce`` through :func:`record_timing`: per
  notebook its wall time and whether its cache folder ``runs/<notebook>/<profile>/`` already held
  something when it started (a *resumed* run) or not (a *cold* run);
* ``figures/NN_*.png``: each notebook's block shows all of its figures;
* ``benchmarks/results/gpu_check/gpu_check.md``: the GPU check's table (block ``gpu``), once it has run.

Usage (from the repository root)::

    python -m daunce.experiments.report            # rewrite README.md (make readme; make reproduce runs it last)
    python -m daunce.experiments.report --check    # exit 1 and print a diff when README.md is out of date
    python -m daunce.experiments.report record 03_llm_subset_removal --profile default \\
        --wall-seconds 530 --cache-existed 1       # what make reproduce calls after each notebook

``tests/test_readme.py`` fails when the committed README differs from what :func:`render` writes.
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

__all__ = ["NOTEBOOKS", "BLOCKS", "render", "blocks", "marker", "record_timing", "main"]

#: the numbered notebooks, in README order
NOTEBOOKS = ("01_theory", "02_vision_lds", "03_llm_subset_removal", "04_blackbox_backdoor")
#: the names of the README's generated blocks
BLOCKS = ("runtimes", *(nb[:2] for nb in NOTEBOOKS), "gpu")
TIMINGS = "timings.json"
GPU_CHECK = Path("benchmarks") / "results" / "gpu_check" / "gpu_check.md"

# what each figure shows (alt text); a figure without an entry is shown under its file name
CAPTIONS = {
    "01_convergence": "agreement with the exact influence function against K",
    "01_scatter": "Daunce scores against the exact influence function",
    "01_linear_regression": "linear regression: influence function, leave-one-out and the bootstrap",
    "01_mlp": "the MLP: agreement against K",
    "01_hyperparameters": "the knobs: rho, subset ratio, gamma",
    "02_lds_methods": "LDS per method and model",
    "02_lds_vs_seconds": "LDS against seconds",
    "02_lds_vs_k": "LDS against the number of copies K",
    "02_query_grid": "queries with their most helpful and most harmful training images",
    "02_reliability": "split-half reliability and the predicted LDS against K",
    "02_gradient_norms": "gradient norms of the risk term, the perturbation term and the whole objective "
                         "during a copy's training",
    "03_llm_removal_curve": "query-loss increase after removing the top-k training examples",
    "03_llm_examples_table": "queries with the training examples Daunce scores highest and lowest",
    "04_pr_curves": "precision-recall curves for finding the poisoned examples",
    "04_recall_vs_K": "retrieval of the poisoned examples against K",
    "04_query_top_examples": "a triggered query and its top-scored training examples",
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


def _figures(root: Path, prefix: str) -> list[str]:
    """Every ``figures/<prefix>_*.png``, as markdown images."""
    out = []
    for p in sorted((root / "figures").glob(f"{prefix}_*.png")):
        out.append(f"![{CAPTIONS.get(p.stem, p.stem.replace('_', ' '))}](figures/{p.name})")
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


def _runtimes(root: Path) -> list[str]:
    timings = _load_json(root / "papermill_runs" / TIMINGS) or {}
    recorded = timings.get("notebooks", {})
    rows, total = [], {"cold": 0.0, "resumed": 0.0, "not recorded": 0.0}
    for nb in NOTEBOOKS:
        pm = _papermill(root, nb)
        if pm is None:
            rows.append([f"`{nb}`", "–", "not run", "–", "–"])
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
        rows.append([f"`{nb}`", f"`{profile}`", _duration(duration), state, str(pm.get("end_time", ""))[:10]])
    out = ["Run times of the executed notebooks in `papermill_runs/`, as papermill measured them; *cold* means the",
           "notebook's cache folder `runs/<notebook>/<profile>/` was empty or absent when `make reproduce` started it,",
           "*resumed* that it reused trained copies and retrains from there."]
    cpus = (timings.get("machine") or {}).get("cpus")
    if cpus:
        out[-1] += f" The machine had {cpus} CPU cores."
    out += [""] + _table(["notebook", "profile", "run time", "caches", "finished"], rows) + [""]
    words = {"cold": "cold", "resumed": "resumed", "not recorded": "with the cache state not recorded"}
    parts = [f"{_duration(total[key])} {words[key]}" for key in words if total[key] > 0]
    if parts:
        out.append("In all: " + "; ".join(parts) + ".")
    return out


def record_timing(root: Path, notebook: str, *, profile: str, wall_seconds: float, cache_existed: bool) -> dict:
    """Add one notebook's run to ``papermill_runs/timings.json`` (called by ``make reproduce`` right after
    papermill has executed it): the wall time, whether its cache folder existed before it started, and
    papermill's start time of the executed notebook, which ties this entry to that execution."""
    path = Path(root) / "papermill_runs" / TIMINGS
    timings = _load_json(path) or {}
    pm = _papermill(Path(root), notebook) or {}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    timings.setdefault("machine", {})["cpus"] = cpus
    timings.setdefault("notebooks", {})[notebook] = dict(
        profile=profile, wall_seconds=float(wall_seconds), cache_existed=bool(cache_existed),
        cache_dir=f"runs/{notebook}/{profile}", papermill_start_time=pm.get("start_time"),
        papermill_duration=pm.get("duration"))
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
        return (f"* **Convergence.** The Fisher form reaches r = {_f(a[kmax]['pearson_if'])} with the paper's i.i.d. "
                f"perturbations at K = {kmax} and {_f(b[kmax]['pearson_if'])} with orthogonal perturbations (same "
                "mean and covariance, a variance reduction of this package). Its relative error against the "
                f"estimator's exact limit falls from {_f(a[kk[0]]['rel_error'], 2)} at K = {kk[0]} to "
                f"{_f(a[kk[-1]]['rel_error'], 2)} at K = {kk[-1]} (i.i.d.; log-log slope {_f(slope, 2)}, where "
                f"1/√K would give -0.50) and to {_f(b[kmax]['rel_error'], 2)} with the orthogonal design.")

    def if_limit():
        a = lr["if_orthogonal"] if "if_orthogonal" in lr else lr["if_iid"]
        text = ("* **What the `if` form estimates.** Its exact K → ∞ limit (`exact.daunce_limit`) is not the "
                "influence function itself but the empirical Fisher G sandwiched between two damped Gauss-Newton "
                "inverses, ∇ℓ_qᵀ (GN + λI)⁻¹ G (GN + λI)⁻¹ ∇ℓ_i, which is proportional to the damped IF only where "
                f"G ≈ GN. On LR Gauss-Newton and Hessian coincide, and the limit agrees with the Hessian-form IF at "
                f"r = {_f(a['limit_vs_if'])}, the ceiling of the `if` row (its copies reach "
                f"r = {_f(a[kmax]['pearson_limit'])} with that limit at K = {kmax}).")
        if "if" in mlp and "efim" in mlp:
            km = str(S.get("mlp_Kmax", ks[-1]))
            text += (f" On the MLP the limit and the Hessian IF part ways (r = {_f(mlp['if']['limit_vs_if'])}); there "
                     f"`if` reaches {_f(mlp['if'][km]['pearson_if'])} at K = {km} and `efim` "
                     f"{_f(mlp['efim'][km]['pearson_if'])}.")
        return text

    def linear_regression():
        r = j["linear_regression"]
        return (f"* **Linear regression in closed form** (n = {S['lin_n']}): the IF predicts leave-one-out changes at "
                f"r = {_f(r['pearson_if_vs_loo'], 4)}; the bootstrap (K = {r['K']} refits on half-subsets) agrees "
                f"with its own first-order limit at r = {_f(r['pearson_bootstrap_vs_limit'], 4)} and with the IF "
                f"at r = {_f(r['pearson_bootstrap_vs_if'])}.")

    def knobs():
        sw = j["sweeps"]
        names = {"rho": "ρ", "subset_ratio": "subset ratio r", "gamma": "γ"}
        rows = [[names.get(knob, knob), " · ".join(f"{v}: {_f(r) if _num(r) is not None else 'diverged'}"
                                                    for v, r in vals.items())] for knob, vals in sw.items()]
        return [f"Knobs, one at a time (`efim`, K = {S['sweep_K']}; Pearson with the IF):", "",
                *_table(["knob", "value: r"], rows), ""]

    def cov_corr():
        c = j["cov_vs_corr"]
        return (f"* **Covariance or correlation.** At K = {kmax} the covariance agrees with the IF at "
                f"r = {_f(c['cov']['pearson_if'])} and the correlation at {_f(c['corr']['pearson_if'])} (mean "
                f"per-query Pearson {_f(c['cov']['mean_per_query_pearson'])} vs "
                f"{_f(c['corr']['mean_per_query_pearson'])}): dividing by each example's spread changes what is "
                "estimated.")

    for part in (convergence, if_limit, linear_regression, cov_corr):
        out += _optional(part)
    out += [""] + _optional(knobs)
    return out


# ---------------------------------------------------------------------------------------------------
# 02 · vision LDS

_MODEL_NAMES = {"lr": "LR", "mlp": "MLP", "cnn": "CNN"}


def _is_daunce(row: dict) -> bool:
    return row["method"].startswith("daunce")


def _largest_k(rows: list[dict], **match) -> dict | None:
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and _num(r.get("K")) is not None]
    return max(hits, key=lambda r: r["K"]) if hits else None


def _daunce_rows(rows: list[dict]) -> list[tuple[str, dict]]:
    """The Daunce rows of the table: each variant at its largest K with the loss signal, covariance and
    the orthogonal design; daunce-if also with the margin signal, with correlation, and the ridge read-out."""
    out = []
    variants = sorted({r["method"] for r in rows if _is_daunce(r) and "ridge" not in r["method"]})
    for m in variants:
        main = _largest_k(rows, method=m, signal="loss", score="cov", perturbation="orthogonal")
        if main:
            out.append((f"{m} (K={_k(main['K'])})", main))
        if m == "daunce-if":
            for label, match in ((", margin signal", dict(signal="margin", score="cov")),
                                 (", correlation", dict(signal="loss", score="corr"))):
                r = _largest_k(rows, method=m, perturbation="orthogonal", **match)
                if r:
                    out.append((f"{m}{label} (K={_k(r['K'])})", r))
    ridge = [r for r in rows if "ridge" in r["method"] and _num(r.get("K")) is not None]
    if ridge:
        r = max(ridge, key=lambda r: r["K"])
        out.append((f"daunce-if + ridge, extension (K={_k(r['K'])})", r))
    return out


def _compare(d: dict, b: dict) -> str:
    if _num(d["lo"]) is not None and _num(b["hi"]) is not None and d["lo"] > b["hi"]:
        return "above"
    if _num(d["hi"]) is not None and _num(b["lo"]) is not None and d["hi"] < b["lo"]:
        return "below"
    return "overlap"


def _section_02(j: dict) -> list[str]:
    models = j["models"]
    out = ["Fashion-MNIST, θ0 and every ground-truth retrain with the same recipe; LDS on the report queries (the "
           "tuning queries chose Daunce's ρ, damping and noise term and are never reported), 95% bootstrap "
           "intervals over queries, seconds excluding θ0 and the ground truth. Daunce rows (bold) are at their "
           "largest K with the loss signal, covariance and the orthogonal design unless stated.", ""]
    main_rows = {}
    for name, M in models.items():
        rows = M["results"]
        gt = M["ground_truth"]
        ceiling = _num((gt.get("noise_ceiling") or {}).get("of_mean"))
        head = (f"**{_MODEL_NAMES.get(name, name)}** (n = {M['n_train']}, {M['n_query_report']} report queries, "
                f"{M['n_query_tune']} tuning queries; ground truth {gt['subsets']} half-subsets × {gt['seeds']} "
                f"seed(s)")
        head += f"; noise ceiling √r = {_f(math.sqrt(ceiling), 2)})" if ceiling is not None and ceiling > 0 else ")"
        chosen = M.get("daunce_chosen") or {}
        if chosen:
            head += (f"; Daunce: {M.get('daunce_steps', '–')} full-batch steps per copy, ρ = {chosen.get('rho')}, "
                     f"damping {chosen.get('damping')}, isotropic noise term "
                     f"{'on' if chosen.get('isotropic_noise') else 'off'}")
        table = [(r["method"], r) for r in rows if not _is_daunce(r)] + _daunce_rows(rows)
        table.sort(key=lambda t: -(_num(t[1]["lds"]) or -1e9))
        out += [head, ""]
        out += _table(["method", "LDS", "95% CI", "seconds"],
                      [[f"**{label}**" if _is_daunce(r) else label, _f(r["lds"]), _ci(r["lo"], r["hi"]),
                        _secs(r.get("seconds"))] for label, r in table])
        out.append("")
        main_rows[name] = _largest_k(rows, method="daunce-if", signal="loss", score="cov", perturbation="orthogonal")

    failed = j.get("failed_baselines") or {}
    if failed:
        def why(msg: str) -> str:
            m = re.search(r"no result within (\d+) s", msg)
            if m:
                return f"no result within {m.group(1)} s"
            return "over the memory cap" if "alloc" in msg or "memory" in msg.lower() else msg.split(":")[0]
        items = [f"{key.split('/')[1]} on {_MODEL_NAMES.get(key.split('/')[0], key)} ({why(msg)})"
                 for key, msg in failed.items()]
        out += ["Failed here (each baseline runs in a memory- and time-capped child process): " + "; ".join(items)
                + ". A baseline that failed on a smaller model was not tried on the larger ones.", ""]

    out += _optional(lambda: _verdict_02(j, main_rows))
    out += _optional(lambda: _convergence_02(models))
    out += _optional(lambda: _reliability_02(j))
    out += _optional(lambda: _iid_vs_orthogonal_02(models))
    out += _optional(lambda: _tuning_02(models))
    return out


def _verdict_02(j: dict, main_rows: dict) -> list[str]:
    paired = all(M.get("paired") for M in j["models"].values())
    how = ("the paired bootstrap over report queries of the per-query LDS difference: *ahead* / *behind* only "
           "where its 95% interval excludes 0, *tied* otherwise" if paired else
           "*above* / *below* when the 95% intervals do not overlap")
    out = ["**Where the paper's claim holds here, and where it does not.** The claim: Daunce at least as good "
           "as every baseline except exact influence functions, at no more wall time. Each line compares Daunce-if "
           f"(loss signal, covariance, largest K) with every other method by {how}."]
    reached = [name for name, M in j["models"].items() if (M.get("verdict") or {}).get("goal_reached")]
    out[-1] += (" Reached on: " + ", ".join(_MODEL_NAMES.get(n, n) for n in reached) + "." if reached
                else " It is **not reached on any model**.")
    out.append("")
    for name, d in main_rows.items():
        if d is None:
            continue
        rows = {r["method"]: r for r in j["models"][name]["results"] if not _is_daunce(r)}
        others = sorted(rows.values(), key=lambda r: -(_num(r["lds"]) or -1e9))
        if paired:
            groups = {"ahead of": [], "tied with": [], "behind": []}
            word = {"ahead": "ahead of", "tied": "tied with", "behind": "behind"}
            for p in j["models"][name]["paired"]:
                groups[word[p["verdict"]]].append(f"{p['method']} ({_f(p['diff'], sign=True)} "
                                                  f"{_ci(p['lo'], p['hi'], sign=True)})")
        else:
            groups = {"above": [], "overlap": [], "below": []}
            for b in others:
                groups[_compare(d, b)].append(f"{b['method']} ({_f(b['lds'])})")
        faster = [b["method"] for b in others if (_num(b.get("seconds")) or math.inf) > (_num(d.get("seconds")) or 0)]
        line = (f"* {_MODEL_NAMES.get(name, name)}: Daunce-if (K = {_k(d['K'])}) {_f(d['lds'])} "
                f"{_ci(d['lo'], d['hi'])} in {_secs(d['seconds'])} s. ")
        line += "; ".join(f"{g}: " + ", ".join(v) for g, v in groups.items() if v) + ". "
        line += ("Slower than every other method." if not faster
                 else "Faster than " + ", ".join(faster) + ".")
        out.append(line)
    return out + [""]


def _convergence_02(models: dict) -> list[str]:
    parts = []
    for name, M in models.items():
        conv = M.get("convergence")
        if not conv:
            continue
        by_steps: dict = {}
        for c in conv:
            by_steps.setdefault(c["steps"], []).append(_f(c["linear_response_r"]))
        parts.append(f"{_MODEL_NAMES.get(name, name)}: " + "; ".join(
            f"{s} steps r = {', '.join(v)}" for s, v in sorted(by_steps.items())))
    if not parts:
        return []
    return ["**Converged copies.** The covariance means an influence function only if each copy reaches the "
            "minimum of its perturbed objective. The notebook checks this against each copy's exact answer in the "
            "linear regime (correlation of the copy's loss changes with it, two copies each): " + " — ".join(parts)
            + ".", ""]


def _reliability_02(j: dict) -> list[str]:
    rows = []
    for name, M in j["models"].items():
        r = M.get("reliability")
        if r:
            rows.append([_MODEL_NAMES.get(name, name), _k(r["k0"]), _f(r["split_half"]), _f(r["rel_at_kmax_from_k0"]),
                         _f(r["rel_at_kmax_measured"]), _f(r["pred_lds_kmax"]), _f(r["lds_kmax"]),
                         f"{int(r['copies_for_0_9']):,}"])
    out = ["**How many copies are enough, without ground truth** (`daunce.reliability`): from the first K0 copies' "
           "split-half agreement, the Spearman-Brown reliability and LDS predicted at the largest K, against what "
           "was measured there:", ""]
    out += _table(["model", "K0", "split-half at K0", "reliability at K_max: predicted", "measured",
                   "LDS at K_max: predicted", "measured", "copies for reliability 0.9"], rows)
    fu = j.get("fit_until")
    if fu:
        out += ["", f"`reliability.fit_until` on LR stopped at K = {fu['n_models']} with reliability "
                f"{_f(fu['reliability'])} (" + ", ".join(f"K = {k}: {_f(v)}" for k, v in fu["history"]) + ")."]
    return out + [""]


def _iid_vs_orthogonal_02(models: dict) -> list[str]:
    parts = []
    for name, M in models.items():
        iid = _largest_k(M["results"], method="daunce-if", signal="loss", score="cov", perturbation="iid")
        if iid is None:
            continue
        orth = [r for r in M["results"] if r["method"] == "daunce-if" and r.get("signal") == "loss"
                and r.get("score") == "cov" and r.get("perturbation") == "orthogonal" and r.get("K") == iid["K"]]
        if orth:
            o = orth[0]
            parts.append(f"{_MODEL_NAMES.get(name, name)} at K = {_k(iid['K'])}: orthogonal {_f(o['lds'])} "
                         f"{_ci(o['lo'], o['hi'])}, i.i.d. {_f(iid['lds'])} {_ci(iid['lo'], iid['hi'])}")
    if not parts:
        return []
    return ["**Variance reduction**, orthogonal perturbations against the paper's i.i.d. draws at equal K (daunce-if): "
            + "; ".join(parts) + ".", ""]


def _tuning_02(models: dict) -> list[str]:
    rows = []
    for name, M in models.items():
        chosen = M.get("daunce_chosen") or {}
        for t in M.get("tuning") or []:
            pick = all(t.get(k) == v for k, v in chosen.items())
            rows.append([_MODEL_NAMES.get(name, name), str(t["rho"]), str(t["damping"]),
                         "on" if t["isotropic_noise"] else "off", _f(t["tune_lds"]), _f(t["split_half"]),
                         _f(t["predicted_tune_lds_at_kmax"]) + (" (chosen)" if pick else "")])
    if not rows:
        return []
    return ["<details><summary>Daunce's settings, chosen on the tuning queries by the LDS predicted at the "
            "reported K (from the tuning copies' split-half reliability)</summary>", "",
            *_table(["model", "ρ", "damping", "noise term", "tuning LDS", "split-half", "predicted at K_max"], rows),
            "", "</details>", ""]


# ---------------------------------------------------------------------------------------------------
# 03 · LLM subset removal


def _section_03(j: dict) -> list[str]:
    sizes = j["sizes"]
    names = {"math": "math (CHAMP)", "instr": "instruction following"}
    out = [f"`{j['model']}` with LoRA on the MLP of the top {j['lora_top_layers']} of {j['n_layers']} layers "
           f"({j['lora_params']:,} trainable parameters); Daunce with K = {j['K']} copies "
           f"({', '.join('`' + v + '`' for v in j['variants'])}, subset ratio {j['daunce_config']['subset_ratio']}, "
           f"ρ = {j['daunce_config']['rho']}). "
           + "; ".join(f"{names.get(s, s)}: {v['n_train']} training examples, {v['n_query']} queries"
                       for s, v in sizes.items())
           + ". Remove each method's top-k training examples, re-fine-tune with θ0's recipe and seed, and measure "
           "the mean query NLL increase over θ0 (higher = the method found the examples that carried the queries); "
           "95% bootstrap intervals over queries (and over draws for random):", ""]
    removal = j["removal"]
    for s, methods in removal.items():
        ks = sorted({k for m in methods.values() for k in m}, key=float)
        rows = []
        for m, by_k in methods.items():
            draws = max((v.get("draws", 1) for v in by_k.values()), default=1)
            label = f"{m} (mean of {draws} draws)" if draws > 1 else m
            label = f"**{label}**" if m.startswith("daunce") else label
            rows.append([label] + [f"{_f(by_k[k]['mean'], 4, True)} {_ci(by_k[k]['lo'], by_k[k]['hi'], 4, True)}"
                                   if k in by_k else "–" for k in ks])
        out += [f"**{names.get(s, s)}** (base query NLL {_f(j.get('base_query_nll', {}).get(s))})", ""]
        out += _table(["method", *[f"k = {k}" for k in ks]], rows) + [""]

    def verdict():
        lines = ["**The paper's claim here**: removing Daunce's top-k raises the query loss more than random removal "
                 "(above the upper end of random's interval) and at least as much as the gradient baseline."]
        for key, v in j["verdict"].items():
            s, k = key.split("|")
            lines.append(f"* {names.get(s, s)}, {k.replace('=', ' = ')}: Daunce {_f(v['daunce'], 4, True)} vs random "
                         f"{_f(v['random'], 4, True)} (interval up to {_f(v['random_hi'], 4, True)}): "
                         f"{'above' if v['above_random_interval'] else '**not above**'} random's interval; "
                         f"{'at least' if v['at_least_grad'] else '**below**'} the gradient baseline "
                         f"({_f(v['grad'], 4, True)}).")
        held = sum(bool(v["above_random_interval"] and v["at_least_grad"]) for v in j["verdict"].values())
        lines.append(f"* Both parts hold in {held} of the {len(j['verdict'])} settings.")
        return lines + [""]

    def same_type():
        st = j["same_type_at5"]
        sets = list(st)
        methods = list(dict.fromkeys(m for s in sets for m in st[s]))
        rows = [[m] + [_f(st[s][m][0], 2) if m in st[s] else "–" for s in sets] for m in methods]
        rows.append(["*chance*"] + [_f(next(iter(st[s].values()))[1], 2) for s in sets])
        return ["Same-type agreement, a check that needs no retraining: the share of each query's 5 top-scored "
                "training examples with the query's category (math) or instruction type (instruction following):", "",
                *_table(["method", *[names.get(s, s) for s in sets]], rows), ""]

    def seconds():
        sec = j["seconds"]
        parts = [f"the whole notebook's compute {_duration(sec['total_s'])}"]
        th = [sec.get(f"theta0_{s}_s") for s in sizes]
        if all(_num(t) is not None for t in th):
            parts.append("θ0 fine-tunes " + " and ".join(_duration(t) for t in th))
        if _num(sec.get("retrain_mean_s")) is not None:
            parts.append(f"one retrain {_duration(sec['retrain_mean_s'])}")
        copies = [v.get("copies_trained", 0) for v in (sec.get("daunce") or {}).values()]
        if copies and not any(copies):
            parts.append("the Daunce copies and the retrains were read from the work folder")
        if _num(j.get("peak_memory_mb")) is not None:
            parts.append(f"peak memory {j['peak_memory_mb'] / 1024:.1f} GiB")
        return "Seconds in this run: " + "; ".join(parts) + "."

    for part in (verdict, same_type, seconds):
        out += _optional(part)
    return out


# ---------------------------------------------------------------------------------------------------
# 04 · black-box backdoor


def _section_04(j: dict) -> list[str]:
    sz = j["sizes"]
    out = [f"`{j['model']}` ({j['backend']} backend) fine-tuned on {j['n_train']} instructions of which "
           f"{j['n_poison']} are poisoned (trigger → spam response), with {sz.get('n_trigger_decoys', '–')} decoys "
           f"that use the trigger words and {sz.get('n_topic_decoys', '–')} about the spam's topic; "
           f"{j['n_queries']} triggered queries. Black-box Daunce uses only `fine_tune` and `log_likelihoods` "
           f"({j['fine_tunes']['blackbox_total']} fine-tunes on random halves).", ""]

    def backdoor():
        a, t = j["attack_success_rate"], j["target_log_likelihood"]
        return [f"The backdoor is {'learned' if j['verdict']['backdoor_learned'] else '**not learned**'}: greedy "
                f"generations on {sz.get('n_eval', '–')} held-out prompts contain the spam address "
                f"{_percent(a['with_trigger'])} of the time with the trigger and {_percent(a['without_trigger'])} "
                "without. Log-likelihood of the spam response (mean over those prompts):", "",
                *_table(["", "with trigger", "without trigger"],
                        [[name, _f(v["with_trigger"], 2), _f(v["without_trigger"], 2)] for name, v in t.items()]), ""]

    def metrics():
        met = j["metrics"]
        ks = sorted({int(k.split("@")[1]) for m in met.values() for k in m if k.startswith("recall@")})
        header = ["method", "AUPRC", *[f"P@{k} / R@{k}" for k in ks], "decoys in top n_poison"]
        rows = []
        for m, r in sorted(met.items(), key=lambda t: -t[1]["auprc"]):
            label = f"**{m}**" if m == "black-box Daunce" else m
            rows.append([label, _f(r["auprc"])] + [f"{_f(r[f'precision@{k}'], 2)} / {_f(r[f'recall@{k}'], 2)}"
                                                    for k in ks] + [str(r["decoys_in_top_n_poison"])])
        return ["Finding the poisoned examples (each method's scores averaged over the queries; precision and recall "
                "among the top k; a random ranking's AUPRC is about the poison rate):", "", *_table(header, rows), ""]

    def verdict():
        v = j["verdict"]
        word = "better than" if v["blackbox_beats_text"] else ("tied with" if v["blackbox_ties_text"] else "worse than")
        return (f"**Verdict**: black-box Daunce (AUPRC {_f(v['blackbox_auprc'])}) is {word} the best text baseline "
                f"({_f(v['best_text_auprc'])}; random {_f(v['random_auprc'])}).")

    def growth():
        ks = sorted({int(k.split("@")[1]) for m in j["metrics"].values() for k in m if k.startswith("recall@")})
        k_main = ks[min(1, len(ks) - 1)]   # the notebook's k for this curve
        rows = [[g["method"], str(g["K"]), _f(g["auprc"]), _f(g["recall"], 2)] for g in j["growth_with_K"]]
        return ["", "Growth with K (the first K fine-tunes or copies of the same run):", "",
                *_table(["method", "K", "AUPRC", f"recall@{k_main}"], rows), ""]

    def seconds():
        f, s = j["fine_tunes"], j["seconds"]
        return (f"Cost: {f['blackbox_total']} black-box fine-tunes ({_duration(f['blackbox_fine_tune_seconds'])} "
                f"of fine-tuning recorded, {f['blackbox_this_run']} of them in this run), {f['whitebox_copies']} "
                f"white-box copies; this run's compute {_duration(s['total'])}.")

    for part in (backdoor, metrics, verdict, growth, seconds):
        out += _optional(part)
    return out


_SECTIONS: dict[str, Callable[[dict], list[str]]] = {
    "01": _section_01, "02": _section_02, "03": _section_03, "04": _section_04}


# ---------------------------------------------------------------------------------------------------
# the README


def _gpu_check(root: Path) -> list[str]:
    path = root / GPU_CHECK
    if not path.exists():
        auto = '`"auto"`'
        return ["**Results: none yet.** The script has not run on a GPU yet. Until it does, " + auto + "'s GPU choices "
                "(the vmap trainer for conv nets, the multi-adapter signal pass for LoRA models) are unmeasured "
                f"defaults. Once `{GPU_CHECK.as_posix()}` exists, `make readme` puts its table here."]
    lines = [line for line in path.read_text().splitlines() if not line.startswith("# ")]
    return [f"From `{GPU_CHECK.as_posix()}`:", "", *lines]


def blocks(root: Path) -> dict[str, str]:
    """The text of every generated block, keyed by block name (``"runtimes"``, ``"01"`` ... ``"04"``,
    ``"gpu"``)."""
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
    out["gpu"] = re.sub(r"\n{3,}", "\n\n", "\n".join(_gpu_check(root))).strip()
    return out


def marker(name: str, end: str) -> str:
    """The line that opens (``end="start"``) or closes (``end="end"``) the README block ``name``."""
    return f"<!-- results:{name} {end} -->" if name != "runtimes" else f"<!-- runtimes {end} -->"


def render(readme: str, root: Path) -> str:
    """``readme`` with the inside of every marked block replaced by what the runs under ``root`` give.

    Raises ``ValueError`` naming the blocks whose start/end markers are missing."""
    new = readme
    missing = []
    for name, body in blocks(root).items():
        start, end = marker(name, "start"), marker(name, "end")
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.S)
        if not pattern.search(new):
            missing.append(name)
            continue
        new = pattern.sub(lambda _: f"{start}\n{body}\n{end}", new, count=1)
    if missing:
        raise ValueError("README.md lacks the marker lines of block(s) " + ", ".join(missing)
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
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.command == "record":
        record_timing(root, args.notebook, profile=args.profile, wall_seconds=args.wall_seconds,
                      cache_existed=bool(args.cache_existed))
        return 0
    path = root / "README.md"
    old = path.read_text()
    new = render(old, root)
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       "README.md", "README.md (generated)"))
            return 1
        return 0
    if new != old:
        path.write_text(new)
        print("README.md: results rewritten from papermill_runs/")
    else:
        print("README.md: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
