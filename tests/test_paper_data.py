"""Notebook 03's `paper` profile, its data path end to end at the real sizes (data only, no model): stand-in files in
the real formats, MATH's 7,500 training problems in the original release's layout and IFEval's 541 prompts with a
responses file, read and split by the calls the notebook makes (``textdata.paper_sets(textdata.PAPER_DATA)``)."""

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest

from daunce.experiments import textdata

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_llm_subset_removal.ipynb"

#: MATH's training split (Hendrycks et al. 2021): problems per subject folder, 7,500 in all, and each folder's "type"
MATH_SUBJECTS = {"algebra": (1744, "Algebra"), "counting_and_probability": (771, "Counting & Probability"),
                 "geometry": (870, "Geometry"), "intermediate_algebra": (1295, "Intermediate Algebra"),
                 "number_theory": (869, "Number Theory"), "prealgebra": (1205, "Prealgebra"),
                 "precalculus": (746, "Precalculus")}
#: a few of IFEval's instruction types with their kwargs, as input_data.jsonl writes them
IF_TYPES = [("punctuation:no_comma", {}), ("change_case:english_lowercase", {}),
            ("detectable_format:number_bullet_lists", {"num_bullets": 3}),
            ("startend:end_checker", {"end_phrase": "Any other questions?"}),
            ("length_constraints:number_words", {"relation": "at least", "num_words": 300})]


def write_math(root: Path) -> dict[str, str]:
    """MATH/train/<subject>/<id>.json, one {"problem", "level", "type", "solution"} per file at the real counts, and a
    few test-split files; returns solution by problem for the training split."""
    solutions, i = {}, 0
    for subject, (count, kind) in MATH_SUBJECTS.items():
        for split_name, n in (("train", count), ("test", 3)):
            folder = root / split_name / subject
            folder.mkdir(parents=True)
            for j in range(n):
                problem = f"[{split_name}] {kind} problem {j}: what is ${i} + {j}$?"
                solution = f"We add the two numbers: ${i} + {j} = \\boxed{{{i + j}}}$."
                (folder / f"{i}.json").write_text(json.dumps({"problem": problem, "level": f"Level {1 + j % 5}",
                                                              "type": kind, "solution": solution}))
                if split_name == "train":
                    solutions[problem] = solution
                i += 1
    return solutions


def write_ifeval(root: Path, answered: int = textdata.IFEVAL_PROMPTS) -> tuple[Path, Path, dict[str, str]]:
    """input_data.jsonl with IFEval's 541 prompts ({"key", "prompt", "instruction_id_list", "kwargs"}, keys not
    contiguous) and a responses file of {"prompt", "response"} for the first ``answered`` of them, in shuffled order."""
    rows = []
    for i in range(textdata.IFEVAL_PROMPTS):
        types = [IF_TYPES[i % len(IF_TYPES)], IF_TYPES[(i + 2) % len(IF_TYPES)]][: 1 + i % 2]
        rows.append({"key": 1000 + 7 * i, "prompt": f"Write essay number {i} about the sea. Follow the rules.",
                     "instruction_id_list": [t for t, _ in types], "kwargs": [k for _, k in types]})
    responses = {r["prompt"]: f"The sea, essay {r['key']}." for r in rows[:answered]}
    order = list(responses)
    random.Random(0).shuffle(order)
    data, resp = root / "input_data.jsonl", root / "input_response_data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    resp.write_text("".join(json.dumps({"prompt": p, "response": responses[p]}) + "\n" for p in order))
    return data, resp, responses


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_data")
    solutions = write_math(root / "MATH")
    data, resp, responses = write_ifeval(root)
    cfg = dataclasses.replace(textdata.PAPER_DATA, math_source=str(root / "MATH"), ifeval_source=str(data),
                              ifeval_responses=str(resp))
    return dict(root=root, cfg=cfg, solutions=solutions, responses=responses)


def test_paper_profile_sizes_fit_the_real_sets():
    d = textdata.PAPER_DATA
    assert d.n_train + d.n_query <= textdata.IFEVAL_PROMPTS <= textdata.MATH_TRAIN_PROBLEMS
    assert sum(n for n, _ in MATH_SUBJECTS.values()) == textdata.MATH_TRAIN_PROBLEMS
    with pytest.raises(ValueError, match=r"IFEval has 541 prompts: n_train \+ n_query = 1000 \+ 50 = 1050"):
        textdata.PaperData(n_train=1000, n_query=50)  # the sizes the profile used to ask for
    with pytest.raises(ValueError, match="must be positive"):
        textdata.PaperData(n_query=0)
    # the profile says where the responses come from and names a file in that format
    assert Path(d.ifeval_responses).name in textdata.IFEVAL_RESPONSES_ORIGIN


def test_notebook_paper_profile_runs_this_path():
    """Notebook 03's `paper` profile takes its data settings from PAPER_DATA and builds its sets with paper_sets,
    so the test below runs the notebook's own data path."""
    cells = ["".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    settings = next(c for c in cells if "paper=dict(" in c)
    paper = settings[settings.index("paper=dict("):]
    assert "data=textdata.PAPER_DATA" in paper
    assert "n_train=textdata.PAPER_DATA.n_train" in paper and "n_query=textdata.PAPER_DATA.n_query" in paper
    data_cell = next(c for c in cells if 'if profile == "paper":' in c and "sets =" in c)
    branch = data_cell.split("else:")[0]
    assert re.search(r'sets = textdata\.paper_sets\(P\["data"\], seed=SEED\)', branch)


def test_paper_data_path_at_real_sizes(files):
    cfg, solutions, responses = files["cfg"], files["solutions"], files["responses"]
    sets = textdata.paper_sets(cfg, seed=0)
    assert set(sets) == {"math", "instr"}
    for name, (train, query) in sets.items():
        assert (len(train), len(query)) == (textdata.PAPER_DATA.n_train, textdata.PAPER_DATA.n_query), name
        tr, qu = [e["prompt"] for e in train], [e["prompt"] for e in query]
        assert len(set(tr)) == len(tr) and len(set(qu)) == len(qu), name
        assert not set(tr) & set(qu), f"{name}: a query is also a training example"
        assert all(e["response"].strip() for e in train + query), name
    math_train, math_query = sets["math"]
    for e in math_train + math_query:  # the training split only, each problem with its own solution and answer
        assert e["prompt"].startswith("[train]") and e["response"] == solutions[e["prompt"]]
        a, b = re.search(r"\$(\d+) \+ (\d+) =", e["response"]).groups()
        assert e["answer"] == str(int(a) + int(b))
    assert {e["category"] for e in math_train} == {kind for _, kind in MATH_SUBJECTS.values()}
    instr_train, instr_query = sets["instr"]
    for e in instr_train + instr_query:  # joined by prompt (the responses file is in another order)
        assert e["response"] == responses[e["prompt"]]
        assert e["response"] == f"The sea, essay {e['key']}."
        assert len(e["instruction_id_list"]) == len(e["kwargs"]) >= 1
    assert {tuple(e["instruction_id_list"]) for e in instr_train} >= {(t,) for t, _ in IF_TYPES}
    # the split follows the seed
    other = textdata.paper_sets(cfg, seed=1)
    for name, (_, query) in sets.items():
        assert {e["prompt"] for e in other[name][1]} != {e["prompt"] for e in query}, name


def test_missing_or_short_responses_raise_naming_the_file(files, tmp_path, monkeypatch):
    cfg = files["cfg"]
    missing = tmp_path / "nowhere" / "input_response_data_gpt4_20231107_145030.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + r".*\{\"prompt\".*\"response\""):
        textdata.paper_sets(dataclasses.replace(cfg, ifeval_responses=str(missing)))
    # the profile's own relative path is read from the repository's root (here: the working folder, which holds no
    # repository), and the error names where it looked
    monkeypatch.chdir(tmp_path)
    where = tmp_path / textdata.PAPER_DATA.ifeval_responses
    with pytest.raises(FileNotFoundError, match=re.escape(str(where))):
        textdata.paper_sets(dataclasses.replace(cfg, ifeval_responses=textdata.PAPER_DATA.ifeval_responses))
    with pytest.raises(ValueError, match=r"no reference responses: pass responses=<a \.jsonl file"):
        textdata.load_ifeval(cfg.ifeval_source)
    # a file that answers too few of the prompts for the split
    _, short, _ = write_ifeval(tmp_path, answered=450)
    with pytest.raises(ValueError, match=re.escape(f"{short} answers 450 of IFEval's prompts; the split needs 500")):
        textdata.paper_sets(dataclasses.replace(cfg, ifeval_responses=str(short)))
    # a responses file for other prompts, one with empty responses, one whose records lack a field
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Something else entirely.", "response": "Yes."}) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(other)) + " answers none of the 541 prompts"):
        textdata.load_ifeval(cfg.ifeval_source, responses=str(other))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"prompt": p, "response": " "}) + "\n" for p in files["responses"]))
    with pytest.raises(ValueError, match=re.escape(str(empty)) + " answers none"):
        textdata.load_ifeval(cfg.ifeval_source, responses=str(empty))
    bad = tmp_path / "bad.jsonl"
    records = [{"prompt": "a", "response": "b"}, {"prompt": "c", "text": "d"}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r", record 1: no \['response'\] field"):
        textdata.load_ifeval(cfg.ifeval_source, responses=str(bad))
    empty_math = tmp_path / "MATH"
    (empty_math / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds no problem files: expected train/<subject>/<id>\.json"):
        textdata.load_math(str(empty_math))
