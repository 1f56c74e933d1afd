"""The generated results page says what the runs say: the baseline-tuning appendix keeps one row per method and
training side and marks the setting the reported row used, the backdoor tables name the top they count, and the
knob sweeps of notebook 01 name the form each ran (``daunce.experiments.report`` from ``papermill_runs/``)."""

import json
import math
import shutil
from pathlib import Path

from daunce.experiments import report

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "papermill_runs"
TUNING_SUMMARY = "Every baseline's LDS on the tuning queries"
MODEL_NAMES = {"lr": "LR", "mlp": "MLP", "cnn": "CNN", "resnet": "ResNet"}


def _table_after(text: str, anchor: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first markdown table after the line that contains ``anchor``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if anchor in line)
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("| "))
    table = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip().strip("|").split("|")])
    return table[0], table[2:]


def _tuning_rows(root: Path) -> tuple[list[str], dict]:
    header, rows = _table_after(report.blocks(root)["02"], TUNING_SUMMARY)
    keyed = {}
    for row in rows:
        key = tuple(row[:3])
        assert key not in keyed, f"the tuning appendix has two rows for {key}"
        keyed[key] = row[3:]
    return header[3:], keyed


def _chosen(header: list[str], cells: list[str]) -> list[tuple[str, float]]:
    return [(col, float(c.split()[0])) for col, c in zip(header, cells) if "(chosen)" in c]


def _reported_column(damping) -> str:
    return "no damping" if damping is None else f"{damping:g}"


def test_baseline_tuning_has_one_row_per_method_and_training_side_and_marks_the_reported_setting():
    j = json.loads((RUNS / "02_vision_lds.json").read_text())
    columns, rows = _tuning_rows(ROOT)
    expected = {(MODEL_NAMES[key.split("/")[0]], key.split("/")[1], v["train_signal"])
                for key, vals in j["baseline_tuning"].items() for v in vals}
    assert set(rows) == expected, f"rows missing: {expected - set(rows)}; rows extra: {set(rows) - expected}"
    for key, vals in j["baseline_tuning"].items():
        name, method = key.split("/")
        rep = next(r for r in j["models"][name]["results"] if r["method"] == method)
        chosen = [(signal, col, lds) for (model, m, signal), cells in rows.items()
                  if (model, m) == (MODEL_NAMES[name], method) for col, lds in _chosen(columns, cells)]
        assert len(chosen) == 1, f"{key}: {len(chosen)} cells marked chosen ({chosen})"
        signal, col, lds = chosen[0]
        assert (signal, col) == (rep["train_signal"], _reported_column(rep["damping"])), (
            f"{key}: chosen {signal} at {col}, reported {rep['train_signal']} at {rep['damping']}")
        tuned = next(v["tune_lds"] for v in vals if v["train_signal"] == signal
                     and _reported_column(v["damping"]) == col)
        assert math.isclose(lds, tuned, abs_tol=5e-4), (key, lds, tuned)


def test_the_chosen_mark_follows_the_reported_row_not_the_damping_alone(tmp_path):
    """CNN TRAK tried loss and minus-margin at the same dampings; report it with the margin at 1e-4 and the mark moves
    there while the loss row at 1e-3 keeps its own number (a table keyed by damping alone loses one of the two)."""
    (tmp_path / "papermill_runs").mkdir()
    j = json.loads((RUNS / "02_vision_lds.json").read_text())
    tried = {(v["train_signal"], v["damping"]): v["tune_lds"] for v in j["baseline_tuning"]["cnn/trak"]}
    assert ("loss", 1e-3) in tried and ("margin", 1e-4) in tried
    row = next(r for r in j["models"]["cnn"]["results"] if r["method"] == "trak")
    row.update(train_signal="margin", damping=1e-4)
    (tmp_path / "papermill_runs" / "02_vision_lds.json").write_text(json.dumps(j))
    columns, rows = _tuning_rows(tmp_path)
    assert _chosen(columns, rows[("CNN", "trak", "margin")]) == [("0.0001", round(tried[("margin", 1e-4)], 3))]
    assert _chosen(columns, rows[("CNN", "trak", "loss")]) == []
    loss = dict(zip(columns, rows[("CNN", "trak", "loss")]))
    assert float(loss["0.001"]) == round(tried[("loss", 1e-3)], 3)


def test_backdoor_tables_name_the_top_they_count():
    j = json.loads((RUNS / "04_blackbox_backdoor.json").read_text())
    text = report.blocks(ROOT)["04"]
    assert "in top in top" not in text
    for target, anchor in (("says the spam", "Which examples make the model say the spam"),
                           ("carries the backdoor", "Which examples carry the backdoor")):
        header, _ = _table_after(text, anchor)
        first = next(iter(j["metrics"][target].values()))
        n_pos = round(first["positive_rate"]["mean"] * j["n_train"])
        decoys = [h for h in header if "decoys" in h]
        assert decoys and all(h.endswith(f"decoys in top {n_pos}") for h in decoys), (target, decoys)


def test_the_knob_sweeps_name_the_form_each_ran(tmp_path):
    """Notebook 01 sweeps rho and r with the Fisher form and gamma with the `if` form at r = 0.5: each row of the
    knob table says so (from the JSON's sweep_settings), and says 'not recorded' where the JSON lacks them."""
    (tmp_path / "papermill_runs").mkdir()
    j = json.loads((RUNS / "01_theory.json").read_text())
    j["sweep_settings"] = {"rho": {"variant": "efim", "subset_ratio": 1.0, "target": "Fisher-form IF"},
                           "subset_ratio": {"variant": "efim", "subset_ratio": None, "target": "Fisher-form IF"},
                           "gamma": {"variant": "if", "subset_ratio": 0.5, "target": "Hessian-form IF"}}
    (tmp_path / "papermill_runs" / "01_theory.json").write_text(json.dumps(j))
    _, rows = _table_after(report.blocks(tmp_path)["01"], "Knobs, one at a time")
    form = {row[0]: row[1] for row in rows}
    assert form["γ"] == "`if`, r = 0.5, against the Hessian-form IF"
    assert form["ρ"] == "`efim`, r = 1, against the Fisher-form IF"
    assert form["subset ratio r"] == "`efim`, against the Fisher-form IF"
    del j["sweep_settings"]
    shutil.rmtree(tmp_path / "papermill_runs")
    (tmp_path / "papermill_runs").mkdir()
    (tmp_path / "papermill_runs" / "01_theory.json").write_text(json.dumps(j))
    _, rows = _table_after(report.blocks(tmp_path)["01"], "Knobs, one at a time")
    assert {row[1] for row in rows} == {"not recorded"}
