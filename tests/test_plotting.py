"""The plotting helper gives each method one style everywhere, and stable distinct styles to unknown names."""
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from daunce.experiments import plotting

matplotlib.use("Agg")


def test_same_method_same_colour_in_two_calls_and_spellings():
    assert plotting.method_style("daunce-if") == plotting.method_style("daunce-if")
    # the spellings used by notebooks 01-04 for one method share its style
    assert plotting.method_color("white-box Daunce (if)") == plotting.method_color("daunce-if")
    assert plotting.method_color("daunce-if K=512") == plotting.method_color("daunce-if")
    assert plotting.method_color("black-box Daunce") == plotting.method_color("daunce-bootstrap")
    assert plotting.method_color("grad-cos (white-box)") == plotting.method_color("grad-cos")
    assert plotting.method_color("exact: IF, Gauss-Newton") == plotting.method_color("exact IF")


@pytest.mark.parametrize("name, key", [
    ("daunce-efim", "daunce-efim"), ("daunce-trak", "daunce-trak"), ("trak", "trak"), ("tracin", "tracin"),
    ("kronfluence-ekfac", "kronfluence-ekfac"), ("if-ekfac", "if-ekfac"), ("if-arnoldi", "arnoldi"),
    ("if-explicit", "if-explicit"), ("if-cg", "if-cg"), ("if-lissa", "if-lissa"), ("datainf", "datainf"),
    ("exact: Daunce-if limit (K→∞)", "daunce-if limit"), ("daunce-if+ridge (extension)", "ridge extension"),
    ("grad-IF (LoGra-style)", "logra"), ("MiniLM embedding", "minilm"), ("TF-IDF", "tfidf"), ("BM25", "bm25"),
    ("random", "random"), ("grad-dot (white-box)", "grad-dot"),
])
def test_notebook_names_map_onto_the_table(name, key):
    assert plotting.canonical_method(name) == key


def test_table_keys_are_canonical_and_styles_unique():
    for key in plotting.METHOD_STYLES:
        assert plotting.canonical_method(key) == key
    styles = list(plotting.METHOD_STYLES.values())
    assert len(set(styles)) == len(styles)                 # (colour, marker) identifies a method
    colours = [c.lower() for c, _ in styles]
    assert len(set(colours)) == len(colours)               # no two methods in one figure share a colour
    ablations = ["black-box Daunce", "black-box Daunce, summed NLL", "black-box Daunce, per-copy seeds", "θ0 loss",
                 "gradient norm", "LoGra (dattri)", "MiniLM similarity"]
    assert len({plotting.method_color(m) for m in ablations}) == len(ablations)
    daunce = {plotting.method_color(m) for m in ["daunce-if", "daunce-efim", "daunce-trak", "daunce-bootstrap"]}
    assert len(daunce) == 4


def test_figure_colors_keep_a_family_in_one_hue_and_never_repeat():
    import colorsys

    import matplotlib.colors as mc
    rows = ["daunce-best", "daunce-best, training margin", "daunce-best, correlation",
            "daunce-best, i.i.d. perturbations", "trak", "if-ekfac", "if-ekfac-stock", "grad-cos"]
    c = plotting.figure_colors(rows)
    assert set(c) == set(rows) and len(set(c.values())) == len(rows)
    assert c["daunce-best"] == plotting.method_color("daunce-if")       # the shortest name of a family keeps its colour
    hue = colorsys.rgb_to_hls(*mc.to_rgb(c["daunce-best"]))[0]
    for m in rows[1:4]:                                                  # its ablations are shades of that hue
        assert abs(colorsys.rgb_to_hls(*mc.to_rgb(c[m]))[0] - hue) < 0.02, m
    assert c["trak"] == plotting.method_color("trak")
    assert plotting.figure_colors(rows[::-1]) == c                      # the order of the rows changes nothing


def _executed(name):
    path = Path(__file__).resolve().parents[1] / "papermill_runs" / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path.name} has not been produced")
    return json.loads(path.read_text())


def test_no_two_methods_in_one_figure_share_a_colour():
    """The methods each executed notebook draws in one figure, with the colours its cells give them: 02 colours a
    model's rows with ``figure_colors``, 03 and 04 each method with ``method_color``."""
    for name, m in _executed("02_vision_lds")["models"].items():
        rows = [r["method"] for r in m["results"]]
        assert len(set(plotting.figure_colors(rows).values())) == len(rows), name
    for by_set in _executed("03_llm_subset_removal")["removal"].values():
        assert len({plotting.method_color(m) for m in by_set}) == len(by_set), list(by_set)
    for target, by_method in _executed("04_blackbox_backdoor")["metrics"].items():
        assert len({plotting.method_color(m) for m in by_method}) == len(by_method), target


def test_unknown_names_get_stable_distinct_styles():
    names = [f"new method {i}" for i in range(8)]
    first = [plotting.method_style(n) for n in names]
    again = [plotting.method_style(n) for n in reversed(names)][::-1]
    assert first == again                                  # stable, whatever the order of the calls
    colours = [s["color"] for s in first]
    assert len(set(colours)) == len(colours)               # distinct
    known = {c for c, _ in plotting.METHOD_STYLES.values()}
    assert not known & set(colours)
    assert plotting.method_style("Some Method") == plotting.method_style("some method")


def test_point_with_interval_and_labels_draw():
    plotting.use_style()
    assert matplotlib.rcParams["legend.fontsize"] >= 9
    fig, ax = plt.subplots()
    c = plotting.point_with_interval(ax, [1.0, 2.0], [0.5, 0.6], [0.4, np.nan], [0.55, 0.7], "trak")
    assert c.lines[0].get_color() == plotting.method_color("trak")
    texts = plotting.label_points(ax, [1.0, 1.01, 1.02], [0.5, 0.5, 0.5], ["trak", "tracin", "grad-dot"])
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in texts]
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(3) for j in range(i + 1, 3))
    plt.close(fig)


def test_gradient_norms_retrace_a_converged_copy(digits_lr):
    """The figure of a copy's gradient norms (the paper's Figure 3) shows the stored copy, and on a convex model
    its whole objective's gradient ends far below the risk and perturbation terms it balances."""
    from daunce import ClassificationTask, Daunce, DaunceConfig
    from daunce.experiments import diagnostics

    model, train, query = digits_lr
    cfg = DaunceConfig(variant="if", n_models=2, rho=0.3, damping=3e-3, isotropic_noise=False, steps=200, lr=1e-2)
    d = Daunce(model, ClassificationTask(), cfg, progress=False).fit(train)
    gn = diagnostics.gradient_norms(d, train, k=1)
    assert float((gn["signals"] - d.signals(train)[1].double()).abs().max()) < 1e-4
    assert len(gn["objective"]) == 200
    assert gn["objective"][-1] < 0.05 * min(gn["risk"][-1], gn["perturbation"][-1])
    assert gn["objective"][-1] < 0.1 * gn["objective"][0]
