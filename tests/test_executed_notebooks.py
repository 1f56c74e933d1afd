"""The executed notebooks in papermill_runs/ are what most people read: their outputs must hold no
traceback, no warning and no progress bar.

`make reproduce` runs the notebooks with progress bars and the known third-party warnings turned off
(see the Makefile's HEADLESS variables); interactive sessions keep their bars. A notebook that fails
here was executed some other way, or prints something new that should be fixed where it comes from."""

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = sorted((ROOT / "papermill_runs").glob("[0-9]*.ipynb"))

# "path/to/file.py:123: SomeWarning: message", the format of warnings.showwarning
WARNING_LINE = re.compile(r"^\S.*:\d+: \w*Warning: ", re.M)
# tqdm's meter: "45%|████▌     |", "12/272 [00:01<00:15, 16.24it/s]", "5.86s/it"
PROGRESS = re.compile(r"\d+%\||\d(?:\.\d+)?\s*(?:it/s|s/it)\b|\|\s*\d+/\d+\s*\[")


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def noise(output: dict) -> list[str]:
    """What is wrong with one cell output (a Jupyter output dict): ``[]`` when it is clean."""
    problems = []
    kind = output.get("output_type")
    if kind == "error":
        problems.append(f"traceback ({output.get('ename')}: {output.get('evalue', '')[:80]})")
        return problems
    if kind == "stream":
        text, name = _text(output.get("text")), output.get("name")
    else:
        text, name = _text(output.get("data", {}).get("text/plain")), None
    if "Traceback (most recent call last)" in text:
        problems.append("traceback")
    if WARNING_LINE.search(text) or (name == "stderr" and "Warning" in text):
        problems.append("warning")
    if kind == "stream" and ("\r" in text or PROGRESS.search(text)):
        problems.append("progress bar")
    return problems


def notebook_noise(path: Path) -> list[str]:
    """One line per noisy output of an executed notebook: cell number, what, and the start of the text."""
    nb = json.loads(path.read_text())
    found = []
    for i, cell in enumerate(nb.get("cells", [])):
        for output in cell.get("outputs", []):
            for problem in noise(output):
                snippet = _text(output.get("text") or output.get("data", {}).get("text/plain") or output.get("ename"))
                found.append(f"cell {i}: {problem}: {snippet.strip()[:120]!r}")
    return found


def test_the_check_catches_noise():
    """The checker flags each kind of noise seen in earlier runs and passes ordinary output."""
    bar = {"output_type": "stream", "name": "stderr",
           "text": "\rtheta0 math:  10%|█         | 1/10 [00:05<00:52,  5.86s/it]"}
    empty_bar = {"output_type": "stream", "name": "stderr", "text": "\r                                        "}
    gguf = {"output_type": "stream", "name": "stderr",
            "text": "Converting and de-quantizing GGUF tensors...: 100%|██████████| 272/272 [00:05<00:00, 45.43it/s]\n"}
    tqdm_warning = {"output_type": "stream", "name": "stderr",
                    "text": ".venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found.\n"
                            "  from .autonotebook import tqdm as notebook_tqdm\n"}
    future = {"output_type": "stream", "name": "stdout",
              "text": "/x/torch/jit/_script.py:1491: FutureWarning: `torch.jit.script` is deprecated.\n"}
    error = {"output_type": "error", "ename": "ValueError", "evalue": "boom", "traceback": []}
    clean = [{"output_type": "stream", "name": "stdout", "text": "math: query NLL 2.337 (base) -> 1.967 (theta0)\n"},
             {"output_type": "execute_result", "data": {"text/plain": "   K  auprc\n0  2  0.113"}},
             {"output_type": "stream", "name": "stdout", "text": "attack success rate: 25% with the trigger\n"}]
    assert noise(bar) == ["progress bar"]
    assert noise(empty_bar) == ["progress bar"]
    assert noise(gguf) == ["progress bar"]
    assert noise(tqdm_warning) == ["warning"]
    assert noise(future) == ["warning"]
    assert noise(error)[0].startswith("traceback")
    assert all(noise(o) == [] for o in clean)


@pytest.mark.parametrize("path", EXECUTED, ids=[p.stem for p in EXECUTED])
def test_executed_notebook_is_clean(path):
    found = notebook_noise(path)
    assert not found, f"{path.name} has noisy outputs:\n" + "\n".join(found)


def test_every_notebook_has_an_executed_copy():
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
    assert notebooks == [p.name for p in EXECUTED], "papermill_runs/ should hold one executed copy per notebook"


def test_executed_llm_runs_meet_their_contracts():
    """The committed default runs of notebooks 03 and 04 hold what their issues asked of them: five retraining
    seeds and K >= 16 converged-copy records in 03; eight seeds with K >= 64 in every one of them in 04."""
    from test_notebooks import check_backdoor_contract, check_removal_contract

    runs = ROOT / "papermill_runs"
    r03 = json.loads((runs / "03_llm_subset_removal.json").read_text())
    r04 = json.loads((runs / "04_blackbox_backdoor.json").read_text())
    assert r03["profile"] == r04["profile"] == "default"
    check_removal_contract(r03, min_seeds=5, min_K=16, min_lds_subsets=50, min_lds_repeat=20)   # LDS: where present
    check_backdoor_contract(r04, min_K=64, min_seeds=8)


@pytest.mark.parametrize("path", EXECUTED, ids=[p.stem for p in EXECUTED])
def test_executed_metrics_pass_the_smoke_runs_checks(path):
    """The committed full runs' metrics JSON pass the checks the smoke runs of tests/test_notebooks.py apply."""
    from test_notebooks import check_metrics

    data = json.loads(path.with_suffix(".json").read_text())
    assert data["profile"] in ("default", "paper")
    check_metrics(path.stem, data)


def test_the_metrics_checks_refuse_nan_and_out_of_range_values():
    """A NaN anywhere, a derivation identity that fails, a Pearson above 1 or a paired difference that is not the
    difference of its rows' LDS, each planted in a copy of a committed run, fails the checks."""
    from test_notebooks import check_metrics

    runs = ROOT / "papermill_runs"
    theory = json.loads((runs / "01_theory.json").read_text())
    vision = json.loads((runs / "02_vision_lds.json").read_text())

    def planted(data, change):
        copy = json.loads(json.dumps(data))
        change(copy)
        return copy

    with pytest.raises(AssertionError, match=r"NaN or infinite values at \['cov_vs_corr.corr.pearson_if'\]"):
        check_metrics("01_theory", planted(theory, lambda d: d["cov_vs_corr"]["corr"].update(pearson_if=math.nan)))
    with pytest.raises(AssertionError, match="derivation.if_formula_vs_daunce_limit_rel_diff"):
        check_metrics("01_theory", planted(theory, lambda d: d["derivation"].update(
            if_formula_vs_daunce_limit_rel_diff=1e-3)))
    with pytest.raises(AssertionError, match="no correlation"):
        check_metrics("01_theory", planted(theory, lambda d: d["mlp"]["if"]["8"].update(pearson_if=1.5)))
    with pytest.raises(AssertionError, match="null outside the sweeps"):
        check_metrics("01_theory", planted(theory, lambda d: d["linear_regression"].update(pearson_if_vs_loo=None)))
    with pytest.raises(AssertionError, match="NaN or infinite"):
        check_metrics("02_vision_lds", planted(vision, lambda d: d["models"]["mlp"].update(theta0_seconds=math.inf)))

    def shift_diff(d):
        d["models"]["lr"]["paired"][0]["diff"] += 0.01
    with pytest.raises(AssertionError, match="lr"):
        check_metrics("02_vision_lds", planted(vision, shift_diff))
    check_metrics("01_theory", theory)
    check_metrics("02_vision_lds", vision)


@pytest.mark.parametrize("path", EXECUTED, ids=[p.stem for p in EXECUTED])
def test_every_saved_figure_is_shown_in_the_executed_notebook(path):
    """A cell that saves a figure (``plotting.save``) shows it too: a reader of the notebook sees every figure the
    README links, not ``<Figure size ... with 0 Axes>``."""
    nb = json.loads(path.read_text())
    missing = [i for i, c in enumerate(nb["cells"])
               if c["cell_type"] == "code" and "plotting.save(" in "".join(c["source"])
               and not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert not missing, f"{path.name}: cells {missing} save a figure that their outputs do not show"


@pytest.mark.parametrize("path", EXECUTED, ids=[p.stem for p in EXECUTED])
def test_numbers_in_markdown_are_printed_by_the_run(path):
    """A 3-4-decimal number in a notebook's prose is one its outputs print: prose that types a result goes stale on
    the next run, prose that points at a printed result does not."""
    nb = json.loads(path.read_text())
    printed = ""
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            data = o.get("data", {})
            printed += "".join(o.get("text", "")) + "".join(data.get("text/plain", ""))
            printed += "".join(data.get("text/html", ""))
    typed = {n for c in nb["cells"] if c["cell_type"] == "markdown"
             for n in re.findall(r"(?<![\d.])\d+\.\d{3,4}(?!\d)", "".join(c["source"]))}
    missing = sorted(n for n in typed if n not in printed)
    assert not missing, f"{path.name}: the prose types {missing}, which no output prints"
