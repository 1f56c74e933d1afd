"""Headless smoke runs of every numbered notebook (papermill, profile="smoke").

Each run writes its figures and metrics JSON under a temporary folder, never into the repository's
figures/ or papermill_runs/. The metrics file must exist and pass ``check_metrics`` (finite numbers, key fields in
range), the checks the committed full runs pass too (tests/test_executed_notebooks.py)."""

import json
import math
import re
import sys
from pathlib import Path

import pytest

from daunce.experiments import baselines

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _leaves(obj, path=""):
    """``(path, value)`` for every leaf of a JSON document; paths like ``models.lr.results[3].lds``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _in_unit(x, lo=-1.0) -> bool:
    """A finite number in [lo, 1] (a Pearson, an LDS, a rate), with rounding slack."""
    return _is_number(x) and lo - 1e-9 <= x <= 1 + 1e-9


@pytest.mark.notebook
@pytest.mark.timeout(900)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke_run(notebook, tmp_path):
    papermill = pytest.importorskip("papermill")
    out = tmp_path / "out"
    parameters = {"profile": "smoke", "out_dir": str(out)}
    exercised = "answers" in _parameters_cell(notebook)
    if exercised:  # the exercises' solutions filled in: each check must pass
        parameters["answers"] = True
    papermill.execute_notebook(
        str(notebook), str(tmp_path / notebook.name), kernel_name="python3", cwd=str(ROOT),
        parameters=parameters, progress_bar=False)
    found = [p for p in out.rglob(f"{notebook.stem}.json") if "work" not in p.relative_to(out).parts]
    assert len(found) == 1, f"the notebook wrote {len(found)} {notebook.stem}.json under out_dir (outside work/)"
    data = json.loads(found[0].read_text())
    assert data["profile"] == "smoke"
    check_metrics(notebook.stem, data)
    assert list(out.rglob("*.png")), "the notebook saved no figure under out_dir"
    if exercised:
        assert data["exercises"] and all(v is True for v in data["exercises"].values()), data.get("exercises")
    if notebook.stem != "01_theory":   # the cores a run had and the workers it used (daunce.parallel.describe)
        par = data["parallel"]
        assert par["cores"] >= 1 and 1 <= par["workers"] and par["torch_threads"] >= 1, par


def check_metrics(stem: str, data: dict):
    """The checks every run of notebook ``stem`` passes, smoke or full (the committed runs in papermill_runs/ are
    checked by tests/test_executed_notebooks.py): numbers everywhere finite (the writers turn what may be undefined
    into null: 01's diverged sweep points, 02's undefined values through its ``clean``; 03 and 04 write no NaN by
    design), and the notebook's key fields present and in range."""
    leaves = list(_leaves(data))
    assert any(_is_number(v) for _, v in leaves), f"{stem}: the metrics JSON holds no numbers"
    bad = [p for p, v in leaves if _is_number(v) and not math.isfinite(v)]
    assert not bad, f"{stem}: NaN or infinite values at {bad[:10]}"
    CHECKS[stem](data)


def check_theory(data):
    """Notebook 01: the derivation's identities hold to rounding, the Fisher-form limit is the Fisher-form IF, the
    copies approach it as K grows, and every Pearson is one."""
    S = data["settings"]
    # null marks a diverged setting in the sweeps, the swept knob itself in sweep_settings (the subset-ratio sweep's
    # ratio), and an exercise the reader has not answered (a run without answers=True)
    allowed = ("sweeps.", "rho_check.", "exercises.", "sweep_settings.subset_ratio.subset_ratio")
    nulls = [p for p, v in _leaves(data) if v is None and not p.startswith(allowed)]
    assert not nulls, f"01: null outside the sweeps, the swept knob and the unanswered exercises: {nulls}"
    assert all(v in (None, True, False) for v in data.get("exercises", {}).values()), data.get("exercises")
    for p, v in _leaves(data):
        if ("pearson" in p.rsplit(".", 1)[-1] or p.endswith("_if")) and v is not None:
            assert _in_unit(v), f"01: {p} = {v} is no correlation"
    # the derivation and the sandwich: closed forms equal exact.daunce_limit, in float64
    for key, v in data["derivation"].items():
        assert v < 1e-10, f"01: derivation.{key} = {v}"
    lr = data["sandwich"]["logistic_regression"]
    assert lr["formula_vs_daunce_limit_rel_diff"] < 1e-10 and lr["gn_vs_hessian_rel_diff"] < 1e-4, lr
    for model in ("logistic_regression", "mlp"):
        q = data["sandwich"][model]["middle_eig_quantiles_5_50_95"]
        assert 0 < q[0] <= q[1] <= q[2], (model, q)
    # the copies: every K recorded, closer to the IF and to their limit at the largest K than at the smallest (the
    # smoke profile's six runs, measured: Pearson with the IF up by 0.23 to 0.36 from K = 4 to 32); the Fisher form's
    # limit is the Fisher-form IF up to scale
    Ks = [str(K) for K in S["Ks"]]
    runs = {f"logistic_regression.{k}": v for k, v in data["logistic_regression"].items()}
    runs.update({f"mlp.{k}": v for k, v in data["mlp"].items()})
    assert set(data["logistic_regression"]) == {"efim_iid", "efim_orthogonal", "if_iid", "if_orthogonal"}
    assert set(data["mlp"]) == {"efim", "if"}
    for name, res in runs.items():
        ks = Ks if name.startswith("logistic") else [K for K in Ks if int(K) <= S["mlp_Kmax"]]
        assert all(K in res for K in ks), (name, ks, list(res))
        assert all(res[K]["rel_error"] > 0 for K in ks) and res["seconds"] > 0, name
        assert res[ks[-1]]["pearson_if"] > res[ks[0]]["pearson_if"] + 0.1, f"01: {name} does not approach the IF"
        assert res[ks[-1]]["rel_error"] < res[ks[0]]["rel_error"], f"01: {name} does not approach its limit"
        if ".efim" in name:
            assert res["limit_vs_if"] > 0.9999, f"01: {name}: the Fisher-form limit is not the Fisher-form IF"
            assert all(abs(res[K]["pearson_if"] - res[K]["pearson_limit"]) < 1e-6 for K in ks), name
    if max(S["Ks"]) >= 1024:  # the full profile's agreement at K = 1024 (measured 0.997 and 0.956)
        assert data["logistic_regression"]["efim_orthogonal"]["1024"]["pearson_if"] > 0.99
        assert data["logistic_regression"]["efim_iid"]["1024"]["pearson_if"] > 0.9
    # ridge regression: the IF predicts leave-one-out, the bootstrap its own first-order limit (measured, smoke and
    # full: 0.998 and 0.9995; 0.988 and 0.9995)
    lin = data["linear_regression"]
    assert lin["pearson_if_vs_loo"] > 0.99 and lin["pearson_bootstrap_vs_limit"] > 0.9 and lin["K"] == S["lin_K"], lin
    # the sweeps: rho = 0.1 and r = 1 are the main efim/iid run's first sweep_K copies (copy k does not depend on K)
    main = data["logistic_regression"]["efim_iid"][str(S["sweep_K"])]["pearson_if"]
    assert data["sweeps"]["rho"]["0.1"] == pytest.approx(main, abs=1e-6)
    assert data["sweeps"]["subset_ratio"]["1.0"] == pytest.approx(main, abs=1e-6)
    assert data["rho_check"]["0.1"]["pearson_with_rho_0.1"] == pytest.approx(1.0, abs=1e-9)
    for knob, points in data["sweeps"].items():  # a Pearson with the exact IF, or null where the copies diverged
        assert all(v is None or _in_unit(v) for v in points.values()), (knob, points)
    # tau_i, the loss spread over the copies, follows the limit's diagonal (measured, smoke and full: 0.96, 0.999)
    assert data["cov_vs_corr"]["spearman_sigma_vs_limit"] > 0.8, data["cov_vs_corr"]
    sub = data["subset_limit"]
    assert sub["K"] == S["subset_K"] and sub["rel_sem"] > 0 and 0 <= sub["unconverged_copies"] <= sub["K"], sub
    assert data["seconds_total"] > 0


def check_vision(data):
    """Notebook 02: its contract, and per model every row's LDS inside its interval, every paired difference the
    difference of the two rows' LDS with the verdict its interval gives."""
    _check_vision_rows(data)
    for name, m in data["models"].items():
        assert _in_unit(m["theta0_query_accuracy"], 0) and m["K"] >= 2 and m["n_train"] > 0, name
        assert m["ground_truth"]["subsets"] >= 2 and m["ground_truth"]["seeds"] >= 1, name
        rows = {r["method"]: r for r in m["results"]}
        for r in m["results"]:
            assert _in_unit(r["lds"]), f"02: {name}/{r['method']}: LDS {r['lds']}"
            assert r["lo"] - 1e-9 <= r["lds"] <= r["hi"] + 1e-9, (name, r["method"], r["lds"], r["lo"], r["hi"])
            assert r["seconds"] >= 0, (name, r["method"])
        best = rows["daunce-best"]
        for p in m["paired"]:
            other = rows[p["method"]]
            assert p["other_lds"] == pytest.approx(other["lds"]), (name, p["method"])
            assert p["diff"] == pytest.approx(best["lds"] - other["lds"], abs=1e-9), (name, p["method"])
            assert p["lo"] <= p["hi"] and p["verdict"] == ("ahead" if p["lo"] > 0 else "behind" if p["hi"] < 0
                                                           else "tied"), (name, p)


def check_removal(data):
    """Notebook 03: its contract (at the profile's size), and the removal table's means the mean of the per-seed
    means, each paired difference the mean of its per-seed differences, overlaps fractions. A smoke run must write
    the LDS block, the attribution draws and the effect shares; a committed run from before them is checked on what
    it has (``check_removal_contract`` checks them wherever present)."""
    if data["profile"] == "smoke":
        assert "lds" in data and data["attribution_draws"] >= 2 and "behind_every_seed" in data, sorted(data)
    check_removal_contract(data, min_seeds=2, min_K=3, min_lds_subsets=6, min_lds_repeat=3)
    for name, rows in data["removal"].items():
        for method, by_k in rows.items():
            for k, v in by_k.items():
                assert len(v["per_seed_mean"]) == len(data["seeds"]), (name, method, k)
                assert v["mean"] == pytest.approx(sum(v["per_seed_mean"]) / len(data["seeds"])), (name, method, k)
                assert v["lo"] <= v["hi"], (name, method, k)
        for k, by_m in data["paired"][name].items():
            for method, pr in by_m.items():
                assert pr["diff"] == pytest.approx(sum(pr["per_seed"]) / len(pr["per_seed"])), (name, k, method)
        assert data["base_query_nll"][name] > 0
        assert all(_in_unit(x, 0) for by_k in data["removal_overlap"][name].values() for x in by_k.values()), name


def check_backdoor(data):
    """Notebook 04: its contract, and every rate a fraction, each mean the mean of its per-seed values (one per seed
    that ran the row), the positive rate of each target the share of its positives among the training examples, the
    paired verdicts consistent with the per-seed values, and the removal block's rates fractions."""
    check_backdoor_contract(data, min_K=3, min_seeds=2)
    positives = {tg: sum(data["sizes"]["n_poison" if kind == "poison" else f"n_{kind}s"] for kind in t["positives"])
                 for tg, t in data["targets"].items()}
    for tg, by_m in data["metrics"].items():
        for method, v in by_m.items():
            for metric in ("auprc", "positive_rate", *(c for c in v if c.startswith("precision@"))):
                x = v[metric]
                assert _in_unit(x["mean"], 0) and all(_in_unit(s, 0) for s in x["per_seed"]), (tg, method, metric)
                assert x["lo"] - 1e-9 <= x["mean"] <= x["hi"] + 1e-9, (tg, method, metric, x)
                assert len(x["per_seed"]) == len(data["seeds_of"][method]), (tg, method, metric)
                assert x["mean"] == pytest.approx(sum(x["per_seed"]) / len(x["per_seed"])), (tg, method, metric)
            assert v["positive_rate"]["mean"] == pytest.approx(positives[tg] / data["n_train"]), (tg, method)
        for a, by_b in data["paired"][tg].items():
            for b, pr in by_b.items():
                d = [x - y for x, y in zip(by_m[a]["auprc"]["per_seed"], by_m[b]["auprc"]["per_seed"])]
                assert pr["diff"] == pytest.approx(sum(d) / len(d)), (tg, a, b)
                assert pr["wins"] == sum(x > 1e-12 for x in d) and pr["losses"] == sum(x < -1e-12 for x in d)
    assert all(_in_unit(g[tg], 0) for g in data["growth_with_K"] for tg in data["targets"])
    for by_m in data["removal"]["per_method"].values():
        for v in by_m.values():
            assert all(_in_unit(x, 0) for c in ("with_trigger", "without_trigger") for x in v[c])
            assert all(0 <= x <= data["n_poison"] for x in v["poisons_removed"])
    for s, by in data["attack_success"].items():
        assert all(_in_unit(v["with_trigger"], 0) and _in_unit(v["without_trigger"], 0) for v in by.values()), s


CHECKS = {"01_theory": check_theory, "02_vision_lds": check_vision, "03_llm_subset_removal": check_removal,
          "04_blackbox_backdoor": check_backdoor}


def _parameters_cell(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))


def test_notebooks_with_exercises_check_them():
    """A notebook with exercises declares the papermill parameter ``answers`` and has one check cell per answer
    variable (``answer_<n> = None`` in one cell, ``exercises.check(..., answer_<n>, ...)`` in a later one)."""
    for notebook in NOTEBOOKS:
        cells = ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
        asked = {m for c in cells for m in re.findall(r"^(answer_\d+) = None", c, flags=re.M)}
        if not asked:
            continue
        assert re.search(r"^answers = False", _parameters_cell(notebook), flags=re.M), notebook.name
        for name in sorted(asked):
            first = next(i for i, c in enumerate(cells) if re.search(rf"^{name} = None", c, flags=re.M))
            assert any(re.search(rf"exercises\.check\([^)]*\b{name}\b", c) for c in cells[first + 1:]), (
                f"{notebook.name}: {name} has no check cell after it")


def check_removal_contract(data, min_seeds, min_K, min_lds_subsets=50, min_lds_repeat=20):
    """Notebook 03's contract: every retraining seed in the intervals (random removal one draw per seed), the
    copies' stopping tests recorded, the three controls and a library baseline retrained, and paired verdicts on
    two-level intervals with each seed's difference. Where the run wrote them (issue 31; runs before it did not):
    the LDS block per set (``check_lds_block``), the attribution draws named in the interval's label, each removal's
    effect share with its noise-floor flag, and the lists of identical removed sets and of settings where Daunce is
    behind in every seed, each consistent with the overlaps and the per-seed differences."""
    seeds = data["seeds"]
    main = data.get("main_method", "daunce-if")
    assert len(seeds) >= min_seeds and data["random_draws"] == len(seeds) and data["K"] >= min_K
    assert "two-level" in data["interval"]
    for c in data["copies"].values():
        assert len(c["steps"]) == len(c["converged"]) == data["K"] and c["damping"] > 0 and c["top_curvature"] > 0
    assert data["libraries"]["LoGra (dattri)"]["library"] == "dattri" and data["libraries"]["LoGra (dattri)"]["version"]
    for name, rows in data["removal"].items():
        assert {main, "random", "θ0 loss", "gradient norm", "MiniLM similarity", "LoGra (dattri)"} <= set(rows)
        for by_m in data["paired"][name].values():
            assert set(by_m) == set(rows) - {main}
            for pr in by_m.values():
                assert len(pr["per_seed"]) == len(seeds) and pr["verdict"] in ("ahead", "tied", "behind")
                assert pr["lo"] <= pr["diff"] <= pr["hi"] or pr["verdict"] == "tied"
        for m, by_k in rows.items():
            for k, v in by_k.items():
                if "share" in v:   # the whole fine-tune lowers the query NLL, so a share has the sign of its mean
                    assert _is_number(v["share"]) and (v["share"] > 0) == (v["mean"] > 0), (name, m, k, v)
                    assert v["share_ci"][0] <= v["share_ci"][1] and isinstance(v["at_noise_floor"], bool)
                    assert v["at_noise_floor"] or not v["lo"] <= 0 <= v["hi"], (name, m, k, v)
    if "attribution_draws" in data:
        draws = data["attribution_draws"]
        assert 1 <= draws <= len(seeds) and data["attribution_seeds"] == seeds[:draws]
        assert "attribution draw" in data["interval"] and f"{draws} attribution draw" in data["interval"]
    if "same_removed_sets" in data:
        same = {(c["set"], str(c["k"]), c["method"]) for c in data["same_removed_sets"]}
        assert same == {(s, k, m) for s, by_k in data["removal_overlap"].items() for k, by_m in by_k.items()
                        for m, v in by_m.items() if v == 1.0}
    if "behind_every_seed" in data:
        behind = {(c["set"], str(c["k"]), c["method"]) for c in data["behind_every_seed"]}
        assert behind == {(s, k, m) for s, by_k in data["paired"].items() for k, by_m in by_k.items()
                          for m, pr in by_m.items() if all(x < 0 for x in pr["per_seed"])}
    if "lds" in data:
        for name, block in data["lds"].items():
            check_lds_block(name, block, data["sizes"][name]["n_query"], min_lds_subsets, min_lds_repeat)


def check_lds_block(name, block, n_query, min_subsets, min_repeat):
    """One set's LLM LDS (notebook 03): at least ``min_subsets`` half-subsets, ``min_repeat`` of them with a second
    seed and the noise ceiling from them; tuning and report queries disjoint and covering the queries; every row an
    LDS in [-1, 1] on the report queries with an interval; Daunce, LoGra, EK-FAC, the metagradient reference and the
    controls present, the tuned rows with their knob; Daunce's chosen setting and each baseline's chosen damping the
    best of the candidates by the tuning LDS."""
    assert block["subsets"] >= min_subsets and block["repeated"] >= min_repeat and block["seeds_on_repeated"] >= 2
    assert _in_unit(block["noise_ceiling"]["between_seeds"]), (name, block["noise_ceiling"])
    tune, report = set(block["tuning_queries"]), set(block["report_queries"])
    assert not tune & report and tune | report == set(range(n_query)), name
    rows = block["methods"]
    assert {"daunce", "daunce-if", "metagradient", "LoGra (dattri)", "EK-FAC (kronfluence)", "θ0 loss",
            "gradient norm", "random"} <= set(rows), (name, sorted(rows))
    for m, r in rows.items():
        assert _in_unit(r["lds"]) and r["ci"][0] <= r["ci"][1] and r["n_queries"] == len(report), (name, m, r)
    assert rows["daunce"]["knob"] == block["daunce_tuning"]["chosen"], name
    for m in ("LoGra (dattri)", "EK-FAC (kronfluence)"):
        assert rows[m]["knob"] == f"damping {block['baseline_tuning'][m]['chosen']}", (name, m)
    for choice in (block["daunce_tuning"], *block["baseline_tuning"].values()):
        ok = {k: v for k, v in choice["tune_lds"].items() if v is not None}
        assert ok[choice["chosen"]] == max(ok.values()), (name, choice)   # one knob at a time keeps the best so far


def check_backdoor_contract(data, min_K, min_seeds):
    """Notebook 04's contract: the attack success with and without the trigger per seed; black-box Daunce with the
    mean NLL and one fine-tuning seed at K >= ``min_K`` in every one of >= ``min_seeds`` seeds, with its split-half
    reliability against K; the summed NLL, a seed per copy and white-box Daunce (named for its fixed-step copies) as
    ablations; both targets measured for every method with paired per-seed verdicts between every two rows run in
    all seeds; and a removal block (per method and k: attack success after retraining, clean loss) with verdicts."""
    main, white = "black-box Daunce", "white-box Daunce (if, fixed steps)"
    seeds = data["seeds"]
    assert len(seeds) >= min_seeds and data["K"] >= min_K
    assert data["signal"][main] == data["signal"][white] == "mean"
    assert data["signal"]["black-box Daunce, summed NLL"] == "sum"
    assert data["copy_seed_design"][main] == "common"
    assert data["copy_seed_design"]["black-box Daunce, per-copy seeds"] == "per-copy"
    assert set(data["targets"]) == {"says the spam", "carries the backdoor"}
    assert sorted(data["attack_success"]) == sorted(map(str, seeds))
    for by in data["attack_success"].values():
        assert {"with_trigger", "without_trigger", "clean_nll"} <= set(by["theta0"]) and "base" in by
    everywhere = {m for m, s in data["seeds_of"].items() if s == seeds}
    assert {main, "TF-IDF", "BM25", "MiniLM embedding", "grad-cos (white-box)", "random"} <= everywhere
    assert white in data["seeds_of"] and data["seeds_of"][white]
    for tg in data["targets"]:
        assert set(data["seeds_of"]) == set(data["metrics"][tg])
        assert set(data["paired"][tg]) == everywhere
        for a, by_b in data["paired"][tg].items():
            assert set(by_b) == everywhere - {a}
            assert all(pr["verdict"] in ("ahead", "tied", "behind") for pr in by_b.values())
    for seed in seeds:
        reached = {g["method"]: g["K"] for g in data["growth_with_K"] if g["seed"] == seed}
        assert reached.get(main, 0) >= data["K"]
        rel = [r for r in data["reliability"] if r["seed"] == seed]
        assert max(r["K"] for r in rel) == data["K"] and all(-1 <= r["queries"] <= 1 for r in rel)
    rm = data["removal"]
    assert rm["ks"] and set(rm["per_method"]) == {str(k) for k in rm["ks"]}
    for k, by_m in rm["per_method"].items():
        assert {main, "random", "the poisoned examples", "none (θ0)"} <= set(by_m)
        for v in by_m.values():
            assert all(len(v[c]) == len(seeds) for c in ("with_trigger", "without_trigger", "clean_nll"))
        assert rm["winner"][k]["method"] in by_m and set(rm["paired"][k]) == set(by_m) - {"the poisoned examples"}


def _check_vision_rows(data):
    """Notebook 02's contract: per model the tuned Daunce row (with its options, its tuning rows at the same K and
    its convergence check), "auto", the authors' recipe as written and at the authors' step count, and a paired
    comparison of the tuned row with every other row."""
    for name, m in data["models"].items():
        rows = {r["method"]: r for r in m["results"]}
        for method in ("daunce-best", "daunce-auto", "daunce-authors-recipe", "daunce-authors-recipe-one-epoch"):
            assert method in rows, f"{name}: no {method} row"
            r = rows[method]
            assert r["K"] >= 2 and r["steps_per_copy"] and ("converged" in r or "linear_response_r" in r), (name, r)
        best = rows["daunce-best"]
        assert set(best["chosen"]) >= {"damping", "isotropic_noise", "signal"}
        eligible_K = {t["K"] for t in m["tuning"] if t["eligible"]}
        if best["passed_convergence_check"]:  # chosen among converged candidates measured at the reported K
            assert best["K"] == m["K"] and eligible_K == {m["K"]}
        else:  # no candidate converged (the toy ResNet of the smoke profile): flagged, and none called eligible
            assert not eligible_K and best["converged"] is False
        assert rows["daunce-authors-recipe"]["steps_per_copy"]["mean"] >= 100
        assert {p["method"] for p in m["paired"]} == set(rows) - {"daunce-best"}
        assert m["auto_proxy"]["proxy_lds"] is not None and "proxy_lds" in rows["daunce-auto"]
        for r in rows.values():  # every baseline records the training-side function it was tuned to
            if r["method"] in baselines.METHODS:
                assert r["train_signal"] in ("loss", "margin"), (name, r["method"])
        if m["batchnorm"]:  # the paper's regime: a BatchNorm network trained from scratch, its recipe recorded
            rec = m["theta0_recipe"]
            assert rec["batchnorm"] and rec["optimizer"] == "sgd" and m["copies_batchnorm"]
    assert any(m["batchnorm"] for m in data["models"].values()), "no BatchNorm model in notebook 02"
    if all("n_models" in r for m in data["models"].values() for r in m["results"]):
        _check_vision_models_and_modes(data)


#: the models of notebook 02 whose rows of Daunce, TRAK and kronfluence's EK-FAC run on 1 and on M trained models
ENSEMBLE_MODELS = ("cnn", "resnet")


def _check_vision_models_and_modes(data):
    """Notebook 02's contract for runs that record the trained models of every row (``n_models``; the committed run
    before them does not): the chosen form and its copies' converged share, the form among the candidates, the tuned
    black-box row, on the CNN and the ResNet Daunce, TRAK and kronfluence's EK-FAC at M = 1 and M (at least 3 in the
    default profile) with paired verdicts at matched M, on the BatchNorm network the tuned and the authors' rows in
    both BatchNorm modes and the authors' ``rn9``, and the successive-halving check."""
    min_M = 3 if data["profile"] == "default" else 2
    for name, m in data["models"].items():
        rows = {r["method"]: r for r in m["results"]}
        chosen = rows["daunce-best"]["chosen"]
        assert chosen["variant"] in ("if", "efim") and 0 <= chosen["converged_fraction"] <= 1, (name, chosen)
        assert {t["variant"] for t in m["tuning"]} == {"if", "efim"}, f"{name}: efim is not among the candidates"
        assert all(0 <= t["converged_fraction"] <= 1 for t in m["tuning"]), name
        bb = rows["daunce-blackbox"]
        assert bb["variant"] == "bootstrap" and m["blackbox_tuning"], (name, bb)
        # tuned at the reported K, or (no candidate converged, the toy ResNet of the smoke profile) flagged
        assert bb["K"] == m["K"] if bb["passed_convergence_check"] else bb["converged"] is False, (name, bb)
        assert all(t["variant"] == "bootstrap" for t in m["blackbox_tuning"]), name
        h = m["successive_halving"]
        assert 2 <= h["k0"] < m["K"] and h["entered"] <= h["candidates"] and isinstance(h["kept_chosen"], bool), h
        assert h["chosen"][:2] == [chosen["variant"], chosen["damping"]], (name, h["chosen"], chosen)
        assert all(r["n_models"] >= 1 for r in m["results"]), name
        if name in ENSEMBLE_MODELS:
            M = m["n_ensemble"]
            assert M >= min_M and m["K"] % M == 0, f"{name}: M = {M} trained models for K = {m['K']}"
            for base in ("daunce-best", "trak", "kronfluence-ekfac"):
                ms = {r["n_models"] for r in m["results"] if r["method"].split(" (M = ")[0] == base}
                assert {1, M} <= ms, f"{name}: {base} has rows on {sorted(ms)} trained models, not on 1 and {M}"
            for r in m["results"]:  # the extra models' training is charged to every row that uses them
                if r["n_models"] > 1:
                    assert r["seconds"] >= m["ensemble_seconds"], (name, r["method"])
            matched = {(x["n_models"], x["method"].split(" (M = ")[0]) for x in m["matched_M"]}
            assert matched == {(k, b) for k in (1, M) for b in ("trak", "kronfluence-ekfac")}, (name, matched)
            for x in m["matched_M"]:
                assert x["diff"] == pytest.approx(x["daunce_lds"] - x["other_lds"], abs=1e-9), (name, x)
                assert x["verdict"] == ("ahead" if x["lo"] > 0 else "behind" if x["hi"] < 0 else "tied"), (name, x)
        if m["batchnorm"]:
            assert m["architecture"]["name"] == "rn9" and m["architecture"]["weights"] > 0, m["architecture"]
            for base in ("daunce-best", "daunce-authors-recipe"):
                modes = {r.get("copies_batchnorm") for r in m["results"] if r["method"].startswith(base)}
                assert {"train", "eval"} <= modes, f"{name}: {base} rows in BatchNorm modes {modes}"
            assert m["tuning_train_mode"] and m["daunce_chosen_train_mode"]["copies_batchnorm"] == "train", name
            tm = rows["daunce-authors-recipe, train mode"]["recipe"]
            assert tm["augment"] == "shift-flip" and tm["variant"] == "efim" and tm["momentum"] == 0.9, tm


def test_every_notebook_has_a_parameters_cell():
    import nbformat

    assert NOTEBOOKS, "no notebooks found"
    for nb_path in NOTEBOOKS:
        nb = nbformat.read(nb_path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb_path.name}: exactly one cell must be tagged 'parameters'"
        for name in ("profile", "out_dir", "work_dir"):
            assert name in tagged[0].source, f"{nb_path.name}: parameters cell lacks {name}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_code_cell_is_a_wall(notebook):
    """A code cell a reader can follow: at most 45 lines (longer work goes into the package or into cells that each
    do one thing)."""
    cells = json.loads(notebook.read_text())["cells"]
    long = {i: len("".join(c["source"]).splitlines()) for i, c in enumerate(cells) if c["cell_type"] == "code"}
    long = {i: n for i, n in long.items() if n > 45}
    assert not long, f"{notebook.name}: code cells over 45 lines (cell index: lines): {long}"


# symbols the notation table of docs/method.md retired, with the one that replaced them
RETIRED = {r"\$F\b|\(F\s*\+|\\hat F|empirical Fisher\s+`?F\b": "F for the empirical Fisher (G)",
           r"K_\\lambda": "K for a kernel (M_λ; K counts copies)",
           r"σ_i|\\sigma_i|sigma_i": "σ for a signal's spread (τ_i; σ² is the perturbation's variance)",
           r"\br_S\b": "r for a reliability (r is the subset ratio)",
           r"LoRA \(r\s*=": "r for a LoRA rank (r is the subset ratio)",
           r"Pearson \$?r\b|\br\s*=\s*[−-]?0\.\d{3}": "r for a Pearson correlation (r is the subset ratio)",
           r"[(|]\s*C\s*[−-]\s*1\s*\)|\bC classes": "C for the number of classes (n_c; C is a curvature)",
           r"\bc classes|\$c\$ classes|\(c\s*[−-]\s*1\)": "c for the number of classes (n_c, apart from C)",
           r"[A-Za-z]_S\b|[A-Za-z]_\{S\}|\|S\||∈\s*S\b|\\in S\b|\\mid S\b|halves \$?S\b":
               "S for a subset (D_k a copy's, T a retraining subset; S is a score)",
           r"\bS seeds|\$S\$ seeds": "S for a number of seeds (in words; S is a score)"}
def retired_symbols(text: str) -> list[str]:
    """What each retired symbol in ``text`` should have been (``RETIRED``'s explanations)."""
    return [why for pat, why in RETIRED.items() if re.search(pat, text)]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_share_one_notation(notebook):
    """Every notebook points at the notation table of docs/method.md, and its prose uses none of the symbols that table
    retired (one symbol per concept across the four notebooks and the docs)."""
    cells = json.loads(notebook.read_text())["cells"]
    assert "docs/method.md" in "".join(cells[0]["source"]), f"{notebook.name}: no pointer to the notation table"
    prose = {i: "".join(c["source"]) for i, c in enumerate(cells) if c["cell_type"] == "markdown"}
    found = [(i, why) for i, text in prose.items() for why in retired_symbols(text)]
    assert not found, f"{notebook.name}: retired symbols in markdown cells {found}"


def test_retired_symbols_are_caught():
    """The patterns catch the double meanings they retire and leave the symbols' own meanings alone."""
    assert retired_symbols("the Pearson correlation reaches $r=0.956$") == [
        "r for a Pearson correlation (r is the subset ratio)"]
    assert retired_symbols("a subset's curvature $C_S$, of rank at most $m(C-1)$") == [
        "C for the number of classes (n_c; C is a curvature)",
        "S for a subset (D_k a copy's, T a retraining subset; S is a score)"]
    assert retired_symbols("retrain on M half-subsets × S seeds") == [
        "S for a number of seeds (in words; S is a score)"]
    assert retired_symbols("subset ratio $r=0.5$, curvature $C$ with $A=C+\\lambda I$, score $S(i,q)$, "
                           "rank at most $m(n_c-1)$, $\\sum_{i\\in T} S(i,q)$, copy $k$'s $C_k$") == []


def notation_symbols(table: str) -> dict[str, list[str]]:
    """Each symbol of a markdown notation table (first column; several per row separated by commas outside
    parentheses and braces; ``g_i = ∇ℓ_i(θ0)`` names g_i, ``S(i, q)`` names S) with the meanings given to it."""
    out: dict[str, list[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not line.startswith("| ") or len(cells) < 2 or cells[0] in ("symbol", "") or set(cells[0]) <= set("-|"):
            continue
        symbols = [x.strip() for x in re.split(r",\s*(?![^({]*[)}])", cells[0])]
        for sym in symbols:
            name = re.sub(r"\(.*?\)$", "", sym.split(" = ")[0]).strip()
            out.setdefault(name, []).append(cells[1])
    return out


def test_a_symbol_with_two_meanings_fails():
    table = "| symbol | meaning |\n|---|---|\n| C | curvature |\n| r, D_k, m | subset ratio |\n| C, c | classes |\n"
    symbols = notation_symbols(table)
    assert symbols["C"] == ["curvature", "classes"] and symbols["D_k"] == ["subset ratio"]
    assert notation_symbols("| S(i, q), S_∞ | score |\n| g_i = ∇ℓ_i(θ0) | gradient |") == {
        "S": ["score"], "S_∞": ["score"], "g_i": ["gradient"]}


def test_the_notation_table_defines_every_symbol_the_notebooks_lean_on():
    text = (ROOT / "docs" / "method.md").read_text()
    table = text[text.index("## Notation"):text.index("## The influence function")]
    for symbol in ("| G |", "| Ĝ |", "| C |", "| A |", "| K |", "| τ_i |", "| M_λ |", "| d_λ |", "| λ |", "| γ |",
                   "| ξ_i^k |", "| IF(i, q) |", "| n_c |", "| T |"):
        assert symbol in table, f"docs/method.md's notation table lacks {symbol}"
    twice = {sym: meanings for sym, meanings in notation_symbols(table).items() if len(meanings) > 1}
    assert not twice, f"docs/method.md's notation table gives these symbols two meanings: {twice}"
    found = retired_symbols(text)           # and the page itself uses the symbols it defines
    assert not found, f"docs/method.md uses retired symbols: {found}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
