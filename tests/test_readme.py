"""The README cannot rot: its Python examples run as written, its results are what
`python -m daunce.experiments.report` writes from papermill_runs/, and it shows every figure."""

import json
import re
from pathlib import Path

import pytest

from daunce.experiments import report

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_python_blocks_run():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_readme_results_match_the_runs():
    """Fails when the committed README differs from what the generator writes from papermill_runs/
    (run `make readme` after a notebook run)."""
    text = README.read_text()
    generated = report.render(text, ROOT)
    if generated != text:
        import difflib

        diff = "".join(list(difflib.unified_diff(text.splitlines(True), generated.splitlines(True),
                                                 "README.md", "generated"))[:60])
        pytest.fail("README.md is out of date with papermill_runs/; run `make readme`:\n" + diff)


def test_readme_has_a_results_section_per_notebook_and_every_figure():
    text = README.read_text()
    for nb in report.NOTEBOOKS:
        body = re.search(rf"<!-- results:{nb[:2]} start -->(.*?)<!-- results:{nb[:2]} end -->", text, flags=re.S)
        assert body and body.group(1).strip(), f"README has no results for {nb}"
    for png in sorted((ROOT / "figures").glob("*.png")):
        assert f"figures/{png.name}" in text, f"README does not show figures/{png.name}"


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
    """Every number with three or four decimals in the README's Results section is a value of the
    metrics JSON, rounded (numbers typed by hand, or left from an older run, are not)."""
    text = README.read_text()
    section = text[text.index("## Results"):]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    values = [x for p in (ROOT / "papermill_runs").glob("[0-9]*.json")
              for x in _json_numbers(json.loads(p.read_text()))]
    allowed = {f"{x:.{d}f}" for x in values for d in (3, 4)} | {f"{abs(x):.{d}f}" for x in values for d in (3, 4)}
    stray = [m for m in re.findall(r"(?<![\d.])\d+\.\d{3,4}(?![\d])", section) if m not in allowed]
    assert not stray, f"numbers in the README's results that no JSON in papermill_runs/ holds: {sorted(set(stray))}"


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


def test_render_keeps_text_outside_the_markers_and_needs_every_block(tmp_path):
    (tmp_path / "papermill_runs").mkdir()
    page = "intro 0.123\n" + "\n".join(f"{report.marker(b, 'start')}\nold\n{report.marker(b, 'end')}"
                                       for b in report.BLOCKS) + "\noutro\n"
    out = report.render(page, tmp_path)
    assert out.startswith("intro 0.123\n") and out.endswith("\noutro\n") and "\nold\n" not in out
    assert report.render(out, tmp_path) == out
    with pytest.raises(ValueError, match="03"):
        report.render(page.replace("<!-- results:03 end -->", ""), tmp_path)
