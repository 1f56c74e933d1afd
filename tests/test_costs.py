"""daunce.experiments.costs: cost records written when measured and read back by a resumed run."""

import json

from daunce.experiments.costs import CostLog


def test_cost_record_survives_resume(tmp_path):
    path = tmp_path / "work" / "costs.json"
    costs = CostLog(path)
    assert costs.get("theta0") is None and "theta0" not in costs
    costs.record("theta0", seconds=12.5, fine_tunes=1, forward_passes=480)
    assert json.loads(path.read_text())["theta0"] == {"seconds": 12.5, "fine_tunes": 1, "forward_passes": 480}
    assert not list(path.parent.glob("*.tmp*"))  # written atomically
    resumed = CostLog(path)  # a new run on the same work folder measures nothing and still reports the cost
    assert "theta0" in resumed
    assert resumed.get("theta0") == {"seconds": 12.5, "fine_tunes": 1, "forward_passes": 480}


def test_cost_items_accumulate_across_runs(tmp_path):
    path = tmp_path / "costs.json"
    first = CostLog(path)
    first.add("retrain", "math|daunce|5|0", seconds=4.0, forward_passes=86)
    first.add("retrain", "math|random|5|0", seconds=6.0, forward_passes=86)
    # an interrupted run resumes: the items measured before are kept, new ones are added
    second = CostLog(path)
    second.add("retrain", "math|daunce|5|1", seconds=5.0, forward_passes=86)
    assert CostLog(path).total("retrain", "seconds") == 15.0
    assert CostLog(path).total("retrain", "forward_passes") == 258
    assert CostLog(path).total("missing", "seconds") is None
    # recording a key again replaces it (a measurement taken again)
    second.record("gradients", seconds=1.0)
    second.record("gradients", seconds=2.0)
    assert CostLog(path).get("gradients") == {"seconds": 2.0}
    assert set(CostLog(path).as_dict()) == {"retrain", "gradients"}
