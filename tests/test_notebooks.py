"""Headless smoke runs of every numbered notebook (papermill, profile="smoke").

Each run writes its figures and metrics JSON under a temporary folder, never into the repository's
figures/ or papermill_runs/. The metrics file must exist and hold finite numbers."""

import json
import math
import re
import sys
from pathlib import Path

import pytest

from daunce.experiments import baselines

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _finite_numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


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
    metrics = sorted(p for p in out.rglob("*.json") if "work" not in p.relative_to(out).parts)
    assert metrics, "the notebook wrote no metrics JSON under out_dir"
    data = json.loads(metrics[0].read_text())
    numbers = list(_finite_numbers(data))
    assert numbers, "the metrics JSON holds no numbers"
    assert all(math.isfinite(x) or math.isnan(x) for x in numbers)
    assert list(out.rglob("*.png")), "the notebook saved no figure under out_dir"
    if exercised:
        assert data["exercises"] and all(v is True for v in data["exercises"].values()), data.get("exercises")
    if notebook.stem == "02_vision_lds":
        _check_vision_rows(data)
    if notebook.stem == "03_llm_subset_removal":
        check_removal_contract(data, min_seeds=2, min_K=3)
    if notebook.stem == "04_blackbox_backdoor":
        check_backdoor_contract(data, min_K=3)


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


def check_removal_contract(data, min_seeds, min_K):
    """Notebook 03's contract: every retraining seed in the intervals (random removal one draw per seed), the
    copies' stopping tests recorded, the three controls and a library baseline retrained, and paired verdicts on
    two-level intervals with each seed's difference."""
    seeds = data["seeds"]
    assert len(seeds) >= min_seeds and data["random_draws"] == len(seeds) and data["K"] >= min_K
    assert "two-level" in data["interval"]
    for c in data["copies"].values():
        assert len(c["steps"]) == len(c["converged"]) == data["K"] and c["damping"] > 0 and c["top_curvature"] > 0
    assert data["libraries"]["LoGra (dattri)"]["library"] == "dattri" and data["libraries"]["LoGra (dattri)"]["version"]
    for name, rows in data["removal"].items():
        assert {"daunce-if", "random", "θ0 loss", "gradient norm", "MiniLM similarity", "LoGra (dattri)"} <= set(rows)
        for by_m in data["paired"][name].values():
            assert set(by_m) == set(rows) - {"daunce-if"}
            for pr in by_m.values():
                assert len(pr["per_seed"]) == len(seeds) and pr["verdict"] in ("ahead", "tied", "behind")
                assert pr["lo"] <= pr["diff"] <= pr["hi"] or pr["verdict"] == "tied"


def check_backdoor_contract(data, min_K):
    """Notebook 04's contract: one signal (the mean NLL) for both Daunce variants in the main rows, the summed NLL
    and a seed per copy as ablations, the copy-seed design recorded, both targets measured for every method, and
    an AUPRC-against-K curve that reaches K in every seed."""
    main, white = "black-box Daunce", "white-box Daunce (if)"
    assert data["signal"][main] == data["signal"][white] == "mean"
    assert data["signal"]["black-box Daunce, summed NLL"] == "sum"
    assert data["copy_seed_design"][main] == "common"
    assert data["copy_seed_design"]["black-box Daunce, per-copy seeds"] == "per-copy"
    assert data["K"] >= min_K and set(data["targets"]) == {"says the spam", "carries the backdoor"}
    for tg in data["targets"]:
        assert {main, white, "TF-IDF", "BM25", "MiniLM embedding", "grad-cos (white-box)", "random"} <= set(
            data["metrics"][tg])
    for seed in data["seeds"]:
        reached = {g["method"]: g["K"] for g in data["growth_with_K"] if g["seed"] == seed}
        assert reached and all(K >= data["K"] for K in reached.values())


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
# the retirements a notebook's prose has not caught up with yet: notebook 02's prose is rewritten after the issues
# that change its experiments (issue #32); it still writes A_S, m(C − 1) and "S seeds"
NOT_YET = {"02_vision_lds": ("S for a subset (D_k a copy's, T a retraining subset; S is a score)",
                             "C for the number of classes (n_c; C is a curvature)",
                             "S for a number of seeds (in words; S is a score)")}


def retired_symbols(text: str, exempt=()) -> list[str]:
    """What each retired symbol in ``text`` should have been (``RETIRED``'s explanations), except ``exempt``."""
    return [why for pat, why in RETIRED.items() if why not in exempt and re.search(pat, text)]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_share_one_notation(notebook):
    """Every notebook points at the notation table of docs/method.md, and its prose uses none of the symbols that table
    retired (one symbol per concept across the four notebooks and the docs)."""
    cells = json.loads(notebook.read_text())["cells"]
    assert "docs/method.md" in "".join(cells[0]["source"]), f"{notebook.name}: no pointer to the notation table"
    prose = {i: "".join(c["source"]) for i, c in enumerate(cells) if c["cell_type"] == "markdown"}
    found = [(i, why) for i, text in prose.items() for why in retired_symbols(text, NOT_YET.get(notebook.stem, ()))]
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
