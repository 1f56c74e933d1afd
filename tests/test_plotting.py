"""The plotting helper gives each method one style everywhere, and stable distinct styles to unknown names."""
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
