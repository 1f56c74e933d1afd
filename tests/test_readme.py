"""The README and the generated docs cannot rot: the README's Python examples run as written, its findings and
run times and the pages docs/results.md and docs/benchmarks.md are what `python -m daunce.experiments.report`
writes from papermill_runs/ and benchmarks/results/, docs/results.md shows every figure, and the README stays a
front page (short, the findings near the top)."""

import json
import re
from pathlib import Path

import pytest

from daunce.experiments import report

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


#: the quick start's Pearson with the exact Fisher-form IF must reach this. Measured (seeded model, K = 64): 0.79, a
#: margin of 0.07; broken settings stay below: K = 32 gives 0.64, a damping 100x too small 0.67, the Hessian-form IF as
#: the target 0.62, the scores' rows shuffled 0.01
QUICK_START_PEARSON = 0.72


def test_readme_python_blocks_run(capsys):
    """Every python block runs as written; the quick start prints its top-5 examples and a Pearson with the exact
    Fisher-form IF that is the one its own scores give, and above ``QUICK_START_PEARSON``."""
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    found = re.findall(r"Pearson with the exact Fisher-form IF: (-?\d+\.\d+)", printed)
    assert len(found) == 1, f"the quick start should print its Pearson with the exact IF once; it printed:\n{printed}"
    pearson = float(found[0])
    assert pearson >= QUICK_START_PEARSON, f"quick start: Pearson with the exact IF {pearson} < {QUICK_START_PEARSON}"
    scores, IF = namespace["scores"], namespace["IF"]
    assert scores.shape == IF.shape == (300, 20)
    assert f"{namespace['exact'].pearson(scores, IF):.2f}" == found[0]
    top = [int(i) for i in re.findall(r"\d+", printed.split("Pearson")[0])]
    assert top == scores[:, 0].topk(5).indices.tolist()


@pytest.mark.parametrize("page", list(report.PAGES))
def test_generated_pages_match_the_runs(page):
    """Fails when a committed page differs from what the generator writes from papermill_runs/
    (run `make readme` after a notebook run)."""
    text = (ROOT / page).read_text()
    generated = report.render(text, ROOT, report.PAGES[page])
    if generated != text:
        import difflib

        diff = "".join(list(difflib.unified_diff(text.splitlines(True), generated.splitlines(True),
                                                 page, "generated"))[:60])
        pytest.fail(f"{page} is out of date with papermill_runs/; run `make readme`:\n" + diff)


def test_results_page_has_a_section_per_notebook_and_every_figure():
    text = (ROOT / "docs" / "results.md").read_text()
    for nb in report.NOTEBOOKS:
        body = re.search(rf"<!-- results:{nb[:2]} start -->(.*?)<!-- results:{nb[:2]} end -->", text, flags=re.S)
        assert body and body.group(1).strip(), f"docs/results.md has no results for {nb}"
    for png in sorted((ROOT / "figures").glob("*.png")):
        assert f"../figures/{png.name}" in text, f"docs/results.md does not show figures/{png.name}"
        assert (ROOT / "docs" / f"../figures/{png.name}").resolve().exists()


def test_readme_is_a_front_page():
    """At most 250 lines and 25,000 characters, the findings table in its first 60 lines, links to the full
    results and the method."""
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 250 and len(text) <= 25_000, (len(lines), len(text))
    start = next(i for i, line in enumerate(lines) if line == report.marker("findings", "start"))
    assert start < 60 and lines[start + 1].startswith("| experiment |")
    assert "docs/results.md" in text and "docs/method.md" in text


def _json_numbers(obj):
    """Every number of a JSON document: its values and its numeric keys (e.g. the ρ of a sweep)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            try:
                yield float(k)
            except ValueError:
                pass
            yield from _json_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _json_numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def test_results_numbers_come_from_the_json():
    """Every number with three or four decimals in docs/results.md and in the README's findings is a value of
    the metrics JSON, rounded (numbers typed by hand, or left from an older run, are not)."""
    readme = README.read_text()
    findings = readme[readme.index(report.marker("findings", "start")):readme.index(report.marker("findings", "end"))]
    section = (ROOT / "docs" / "results.md").read_text() + findings
    values = [x for p in (ROOT / "papermill_runs").glob("[0-9]*.json")
              for x in _json_numbers(json.loads(p.read_text()))]
    allowed = {f"{x:.{d}f}" for x in values for d in (3, 4)} | {f"{abs(x):.{d}f}" for x in values for d in (3, 4)}
    stray = [m for m in re.findall(r"(?<![\d.])\d+\.\d{3,4}(?![\d])", section) if m not in allowed]
    assert not stray, f"numbers in the results that no JSON in papermill_runs/ holds: {sorted(set(stray))}"


def _executed(root: Path, name: str, start: str, duration: float):
    nb = {"cells": [], "metadata": {"papermill": {"start_time": start, "end_time": "2030-01-02T03:04:05",
                                                  "duration": duration, "parameters": {"profile": "default"}}},
          "nbformat": 4, "nbformat_minor": 5}
    (root / "papermill_runs" / f"{name}.ipynb").write_text(json.dumps(nb))


def test_run_times_say_cold_or_resumed(tmp_path):
    """The run-time block reads papermill's durations and the cache state `make reproduce` recorded for
    that very execution; a notebook executed again afterwards (another start time) is 'not recorded'."""
    (tmp_path / "papermill_runs").mkdir()
    _executed(tmp_path, "01_theory", "2030-01-01T00:00:00", 30.0)
    _executed(tmp_path, "02_vision_lds", "2030-01-01T01:00:00", 1500.0)
    _executed(tmp_path, "03_llm_subset_removal", "2030-01-01T02:00:00", 600.0)
    report.record_timing(tmp_path, "01_theory", profile="default", wall_seconds=31, cache_existed=False)
    report.record_timing(tmp_path, "02_vision_lds", profile="default", wall_seconds=1502, cache_existed=True)
    report.record_timing(tmp_path, "03_llm_subset_removal", profile="default", wall_seconds=601, cache_existed=True)
    _executed(tmp_path, "03_llm_subset_removal", "2030-01-05T00:00:00", 700.0)   # re-run by hand later
    rows = {line.split("|")[1].strip(" `"): line for line in report.blocks(tmp_path)["runtimes"].splitlines()
            if line.startswith("| `")}
    assert "30 s" in rows["01_theory"] and "| cold |" in rows["01_theory"]
    assert "25.0 min" in rows["02_vision_lds"] and "resumed" in rows["02_vision_lds"]
    assert "11.7 min" in rows["03_llm_subset_removal"] and "not recorded" in rows["03_llm_subset_removal"]
    assert "not run" in rows["04_blackbox_backdoor"]
    timings = json.loads((tmp_path / "papermill_runs" / "timings.json").read_text())
    assert timings["notebooks"]["02_vision_lds"]["wall_seconds"] == 1502
    # a cold run's time survives a resumed run of the same profile after it
    assert "31 s (2030-01-02)" in rows["01_theory"] and rows["02_vision_lds"].rstrip().endswith("| – |")
    _executed(tmp_path, "01_theory", "2030-01-06T00:00:00", 5.0)
    report.record_timing(tmp_path, "01_theory", profile="default", wall_seconds=6, cache_existed=True)
    rows = {line.split("|")[1].strip(" `"): line for line in report.blocks(tmp_path)["runtimes"].splitlines()
            if line.startswith("| `")}
    assert "resumed" in rows["01_theory"] and "31 s (2030-01-02)" in rows["01_theory"]
    # a cold run stopped and resumed: its parts' sum, said to be in parts
    _executed(tmp_path, "02_vision_lds", "2030-01-07T00:00:00", 600.0)
    report.record_timing(tmp_path, "02_vision_lds", profile="default", wall_seconds=600, cache_existed=True,
                         cold_parts=[1200, 1800])
    rows = {line.split("|")[1].strip(" `"): line for line in report.blocks(tmp_path)["runtimes"].splitlines()
            if line.startswith("| `")}
    assert "resumed" in rows["02_vision_lds"] and "60.0 min (2030-01-02, in 3 parts)" in rows["02_vision_lds"]
    with pytest.raises(ValueError, match="cold_parts"):
        report.record_timing(tmp_path, "02_vision_lds", profile="default", wall_seconds=1, cache_existed=True,
                             cold_parts=[-5])


def test_render_keeps_text_outside_the_markers_and_needs_every_block(tmp_path):
    (tmp_path / "papermill_runs").mkdir()
    page = "intro 0.123\n" + "\n".join(f"{report.marker(b, 'start')}\nold\n{report.marker(b, 'end')}"
                                       for b in report.BLOCKS) + "\noutro\n"
    out = report.render(page, tmp_path)
    assert out.startswith("intro 0.123\n") and out.endswith("\noutro\n") and "\nold\n" not in out
    assert report.render(out, tmp_path) == out
    with pytest.raises(ValueError, match="03"):
        report.render(page.replace("<!-- results:03 end -->", ""), tmp_path)


def test_every_finding_has_a_verdict_word():
    """Each row of the README's findings table carries a verdict word in its verdict column, and the word follows
    from the paired verdicts by the stated rule."""
    readme = README.read_text()
    table = readme[readme.index(report.marker("findings", "start")):readme.index(report.marker("findings", "end"))]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    col = header.index("verdict")
    rows = lines[2:]
    assert len(rows) == len(report.NOTEBOOKS), rows
    for line in rows:
        cell = [c.strip() for c in line.strip("|").split("|")][col]
        assert re.match(r"(not reproduced|reproduced|tied|undecided)\b", cell), line[:120]
    verdict = report._claim_verdict
    assert verdict(["ahead", "ahead"]) == "reproduced"
    assert verdict(["ahead", "tied", "behind"]) == "not reproduced"
    assert verdict(["tied", "tied"]) == "tied"
    assert verdict(["ahead", "tied"]) == "undecided" and verdict([]) == "undecided"


def test_cold_runs_from_before_the_retrains_fanned_out_are_named(tmp_path):
    """A notebook whose last cold run was recorded before its retrains fanned out over the cores (no
    ``retrains_fanned_out`` in the record) is named as slower than a cold run now; one recorded since is not."""
    (tmp_path / "papermill_runs").mkdir()
    bench = tmp_path / report.PARALLEL_JSON
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text(json.dumps({"mean_efficiency": 0.8}))
    for i, nb in enumerate(report.NOTEBOOKS):
        _executed(tmp_path, nb, f"2030-01-01T0{i}:00:00", 60.0)
        report.record_timing(tmp_path, nb, profile="default", wall_seconds=61, cache_existed=False)
    assert "predate" not in report.blocks(tmp_path)["runtimes"]
    path = tmp_path / "papermill_runs" / "timings.json"
    timings = json.loads(path.read_text())
    del timings["notebooks"]["02_vision_lds"]["last_cold"]["retrains_fanned_out"]   # a record from before the field
    del timings["notebooks"]["01_theory"]["last_cold"]["retrains_fanned_out"]       # 01 has no retrains to fan out
    path.write_text(json.dumps(timings))
    text = report.blocks(tmp_path)["runtimes"]
    sentence = text[text.index("The last cold"):]
    assert sentence.startswith("The last cold run of `02_vision_lds` predates the fan-out of its retrains")
    assert "a cold run of it is now faster" in sentence
    assert "01_theory" not in sentence
    # a resumed run keeps the old cold record, and its mark
    _executed(tmp_path, "02_vision_lds", "2030-01-08T00:00:00", 10.0)
    report.record_timing(tmp_path, "02_vision_lds", profile="default", wall_seconds=11, cache_existed=True)
    assert "`02_vision_lds` predates" in report.blocks(tmp_path)["runtimes"]
