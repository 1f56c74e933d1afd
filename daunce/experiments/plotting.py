"""One look across the notebooks' figures: a fixed colour and marker per method, readable fonts,
points drawn with their intervals, and labels that do not collide.

Every figure of notebooks 01-04 takes a method's style from :func:`method_style`, so ``daunce-if`` has
the same colour and marker in every panel and every figure. Method names are matched through
:func:`canonical_method`, which maps the spellings the notebooks use (``"daunce-if"``,
``"white-box Daunce (if)"``, ``"black-box Daunce"``, ``"grad-cos (white-box)"``,
``"grad-IF (LoGra-style)"``, ``"daunce-if K=512"`` ...) onto one key per method.

Colours come from the colour-blind-safe palettes of Okabe & Ito and of Paul Tol: the Daunce family in
warm colours (vermillion, orange, purple, wine), influence-function and gradient baselines in blues
and greens, the text baselines of the LLM notebooks in the remaining ones, ``random`` in grey. A name
that is not in the table gets a colour and marker derived from a hash of its canonical name: the same
name always gets the same style, in any process, and different names get different colours.

Usage::

    from daunce.experiments import plotting
    plotting.use_style()                                   # fonts: legends >= 9 pt
    ax.plot(k, lds, **plotting.line_kw("daunce-if"))
    plotting.point_with_interval(ax, seconds, lds, lo, hi, "trak")
    plotting.label_points(ax, xs, ys, names, avoid=plotting.interval_points(xs, lo, hi))  # no overlaps
    plotting.save(fig, FIG / "02_lds_vs_seconds.png")
"""
from __future__ import annotations

import colorsys
import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import matplotlib.colors
import matplotlib.ticker
import numpy as np

__all__ = ["FONT", "METHOD_STYLES", "canonical_method", "figure_colors", "interval_points", "k_axis", "label_points",
           "legend", "line_kw", "line_points", "log_axis", "method_color", "method_style", "point_with_interval",
           "save", "text_figure", "use_style", "wrapped"]

# Colour-blind-safe colours (Okabe & Ito 2008; Paul Tol's "muted", "medium-contrast" and "light" schemes).
_VERMILLION, _ORANGE, _REDDISH_PURPLE = "#D55E00", "#E69F00", "#CC79A7"
_BLUE, _SKY_BLUE, _BLUISH_GREEN, _BLACK = "#0072B2", "#56B4E9", "#009E73", "#000000"
_WINE, _ROSE, _OLIVE, _TEAL, _INDIGO = "#882255", "#CC6677", "#999933", "#44AA99", "#332288"
_PURPLE, _CYAN, _GREEN = "#AA4499", "#88CCEE", "#117733"
_OCHRE, _MEDIUM_BLUE, _DARK_BLUE, _DARK_ROSE = "#997700", "#6699CC", "#004488", "#994455"
_PEAR, _MINT, _LIGHT_ORANGE, _GREY, _DARK_GREY = "#AAAA00", "#44BB99", "#EE8866", "#9E9E9E", "#555555"

#: canonical method name -> (colour, marker). Every name used by notebooks 01-04 maps onto one of these.
METHOD_STYLES: dict[str, tuple[str, str]] = {
    # Daunce (this package): warm colours
    "daunce-if": (_VERMILLION, "o"),
    "daunce-efim": (_ORANGE, "s"),
    "daunce-trak": (_REDDISH_PURPLE, "D"),
    "daunce-bootstrap": (_WINE, "^"),           # the black-box form
    "daunce-bootstrap summed NLL": ("#AA3377", "v"),      # its ablations (notebook 04)
    "daunce-bootstrap per-copy seeds": ("#EE3377", "<"),
    "daunce-if limit": (_ROSE, "*"),            # exact K -> infinity limit of the estimator
    "ridge extension": (_OLIVE, "P"),           # ridge regression across copies (beyond the paper)
    "daunce-auto": (_LIGHT_ORANGE, "o"),        # the package's ground-truth-free defaults
    "daunce-authors-recipe": (_DARK_ROSE, "*"),  # the paper's reference recipe
    # influence functions
    "exact IF": (_BLACK, "X"),
    "if-explicit": (_DARK_GREY, "X"),
    "if-cg": (_PURPLE, "d"),
    "if-lissa": (_CYAN, "8"),
    "arnoldi": (_INDIGO, "p"),
    "if-ekfac": (_SKY_BLUE, "<"),
    "kronfluence-ekfac": (_BLUE, "v"),
    "kronfluence-ekfac-ef": (_DARK_BLUE, "^"),  # empirical Fisher
    "if-ekfac-stock": ("#77AADD", "x"),             # dattri's EK-FAC as shipped (two defects)
    "datainf": (_GREEN, "H"),
    # gradient baselines
    "trak": (_BLUISH_GREEN, ">"),
    "tracin": (_TEAL, "h"),
    "grad-dot": (_OCHRE, "d"),
    "grad-cos": (_MEDIUM_BLUE, "s"),
    "logra": ("#4477AA", "v"),                 # projected-gradient influence (LoGra-style)
    # text baselines (LLM notebooks)
    "tfidf": (_PEAR, "<"),
    "bm25": ("#CCBB44", ">"),
    "minilm": (_MINT, "D"),
    "random": (_GREY, "."),
    # controls of the removal test (notebook 03): one score per training example, the same for every query
    "loss control": ("#666633", "p"),
    "gradient-norm control": ("#33BBEE", "h"),
}

#: font sizes in points (legends at least 9 pt)
FONT = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
        "ytick.labelsize": 9, "legend.fontsize": 9, "legend.title_fontsize": 9, "figure.titlesize": 12}

_MARKERS_FOR_UNKNOWN = ["o", "s", "D", "^", "v", "<", ">", "p", "h", "*", "P", "X"]

# ordered rules: the first pattern (searched in the lower-cased name) that matches gives the key
_RULES: list[tuple[str, str]] = [
    (r"limit", "daunce-if limit"),
    (r"θ0 loss|theta0 loss|loss control", "loss control"),
    (r"gradient norm|grad-norm", "gradient-norm control"),
    (r"ridge", "ridge extension"),
    (r"(black-box|bootstrap).*summed", "daunce-bootstrap summed NLL"),
    (r"(black-box|bootstrap).*per-copy", "daunce-bootstrap per-copy seeds"),
    (r"black-box|bootstrap", "daunce-bootstrap"),
    (r"daunce.*auto", "daunce-auto"),
    (r"authors", "daunce-authors-recipe"),
    (r"daunce.*efim", "daunce-efim"),
    (r"daunce.*trak", "daunce-trak"),
    (r"daunce", "daunce-if"),
    (r"kronfluence.*-ef$", "kronfluence-ekfac-ef"),
    (r"kronfluence", "kronfluence-ekfac"),
    (r"ekfac-stock", "if-ekfac-stock"),
    (r"ekfac|ek-fac", "if-ekfac"),
    (r"arnoldi", "arnoldi"),
    (r"^exact\b|exact.*if|cg-if", "exact IF"),
    (r"explicit", "if-explicit"),
    (r"lissa", "if-lissa"),
    (r"^if-cg$|\bcg\b", "if-cg"),
    (r"datainf", "datainf"),
    (r"logra|grad-if|gradient if|^gradient$", "logra"),
    (r"tracin", "tracin"),
    (r"trak", "trak"),
    (r"grad-dot|gradient dot", "grad-dot"),
    (r"grad-cos|gradient cos", "grad-cos"),
    (r"tf-?idf", "tfidf"),
    (r"bm25", "bm25"),
    (r"minilm|embedding", "minilm"),
    (r"^random", "random"),
]


def canonical_method(name: str) -> str:
    """The key of ``METHOD_STYLES`` for a method name as a notebook spells it, or, for a name no rule
    knows, the name itself lower-cased with a trailing ``K=...`` removed.

    >>> canonical_method("white-box Daunce (if)"), canonical_method("grad-cos (white-box)")
    ('daunce-if', 'grad-cos')
    """
    low = re.sub(r"\s+k\s*=\s*\d+\s*$", "", str(name).strip().lower())
    for pattern, key in _RULES:
        if re.search(pattern, low):
            return key
    return low


def _hashed_style(key: str) -> tuple[str, str]:
    """A stable colour and marker for a name outside the table: hue from a hash of the name (golden-ratio
    spread keeps nearby hashes apart), fixed lightness and saturation so it stays readable on white."""
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16)
    hue = ((h % 10_007) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.45, 0.65)
    return mpl.colors.to_hex((r, g, b)), _MARKERS_FOR_UNKNOWN[(h >> 20) % len(_MARKERS_FOR_UNKNOWN)]


def method_style(name: str) -> dict:
    """``dict(color=..., marker=...)`` for a method, the same in every call and every figure; ``random``
    also gets a dashed line style."""
    key = canonical_method(name)
    color, marker = METHOD_STYLES.get(key) or _hashed_style(key)
    style = {"color": color, "marker": marker}
    if key == "random":
        style["linestyle"] = "--"
    return style


def method_color(name: str) -> str:
    """The method's colour as a hex string."""
    return method_style(name)["color"]


def figure_colors(methods: Sequence[str], min_distance: float = 0.08) -> dict[str, str]:
    """One colour per method drawn in one figure, none shared: each method keeps :func:`method_color`, and
    methods that map onto one key of ``METHOD_STYLES`` (``"daunce-best"`` and its ablations ``"daunce-best,
    correlation"`` ...) share it: the shortest name keeps the colour and the others take shades of it, darker and
    lighter in turn, so a method family stays one hue and a method gets the same colour whatever the order of the call.
    A shade is skipped where it lies within ``min_distance`` (RGB, 0-1 scale) of a colour already in the figure.

    >>> c = figure_colors(["daunce-best", "daunce-best, correlation", "trak"])
    >>> c["daunce-best"] == method_color("daunce-if") and len(set(c.values())) == 3
    True
    """
    out: dict[str, str] = {}
    taken: list[np.ndarray] = []

    def free(hex_: str) -> bool:
        rgb = np.array(mpl.colors.to_rgb(hex_))
        return all(np.abs(rgb - t).max() >= min_distance for t in taken)

    ordered = list(dict.fromkeys(methods))
    primary = {}                                   # the shortest name of each key keeps the key's own colour
    for m in sorted(ordered, key=lambda m: (len(m), m)):
        primary.setdefault(canonical_method(m), m)
    rest = sorted(m for m in ordered if primary[canonical_method(m)] != m)    # an order the call cannot change
    firsts = sorted(primary.values())
    for m in firsts + rest:
        base = method_color(m)
        colour = base if free(base) else None
        hue, light, sat = colorsys.rgb_to_hls(*mpl.colors.to_rgb(base))
        step = 1
        while colour is None:
            for sign in (-1, 1):                   # darker, then lighter, further out each round
                cand = mpl.colors.to_hex(colorsys.hls_to_rgb(hue, min(0.9, max(0.12, light + sign * 0.11 * step)), sat))
                if free(cand):
                    colour = cand
                    break
            step += 1
            if step > 8:                           # the hue is exhausted: a hashed colour of the full name
                colour = _hashed_style(m.lower())[0]
        out[m] = colour
        taken.append(np.array(mpl.colors.to_rgb(colour)))
    return out


def line_kw(name: str, label: str | None = None, **overrides) -> dict:
    """Keyword arguments for ``ax.plot`` / ``ax.errorbar``: the method's colour, marker and a label
    (``name`` unless ``label`` is given); ``overrides`` win."""
    return {**method_style(name), "label": name if label is None else label, **overrides}


def use_style() -> None:
    """Set matplotlib's font sizes (``FONT``), a light grid, and tight bounding boxes when saving."""
    mpl.rcParams.update({**FONT, "axes.grid": True, "grid.alpha": 0.25, "savefig.bbox": "tight",
                         "savefig.dpi": 130, "legend.framealpha": 0.85})


def point_with_interval(ax, x, y, lo, hi, method: str, label: str | None = None, horizontal: bool = False,
                        **kw):
    """Draw point(s) ``(x, y)`` with the interval ``[lo, hi]`` around ``y`` (``x`` when ``horizontal``),
    in the method's colour and marker. Scalars or equal-length arrays; NaN intervals draw no bar.

    Returns the ``ErrorbarContainer``; ``label=None`` uses the method name, ``label=""`` no legend entry.
    """
    x, y, lo, hi = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (x, y, lo, hi))
    val = x if horizontal else y
    err = np.vstack([np.clip(val - lo, 0, None), np.clip(hi - val, 0, None)])
    err = np.where(np.isfinite(err), err, 0.0)
    style = method_style(method)
    opts = {"color": style["color"], "marker": style["marker"], "linestyle": kw.pop("linestyle", "none"), "ms": 6,
            "capsize": 3, "elinewidth": 1.2, "label": method if label is None else (label or "_nolegend_")}
    opts.update(kw)
    if horizontal:
        return ax.errorbar(x, y, xerr=err, **opts)
    return ax.errorbar(x, y, yerr=err, **opts)


def label_points(ax, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str],
                 colors: Sequence[str] | None = None, avoid: Sequence[tuple[float, float]] = (),
                 fontsize: float = 9, radii: Sequence[float] = (5, 10, 16, 24, 34, 46, 60, 76, 96, 120)) -> list:
    """Write ``texts[i]`` next to point ``(xs[i], ys[i])`` where it overlaps no other label, no labelled
    point and none of the extra points ``avoid`` (e.g. samples along error bars and curves: see
    :func:`interval_points`, :func:`line_points`), inside the axes.

    Deterministic greedy placement: each label in turn tries offsets on rings of growing radius (in
    points) around its point, in eight directions starting to the right, and takes the first free one;
    a thin leader line joins a label to its point. If no position is free the one with the fewest
    conflicts is kept (an overlap with another label counts as 20 covered points). ``colors`` defaults
    to each text's method colour. Call once the layout is final (axes limits, scales, ``tight_layout``):
    the placement is measured in display space. Returns the annotation artists."""
    if colors is None:
        colors = [method_color(t) for t in texts]
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    obstacles = ax.transData.transform(np.array([(float(x), float(y)) for x, y in zip(xs, ys)]
                                                + [(float(a), float(b)) for a, b in avoid]).reshape(-1, 2))
    obstacles = obstacles[np.isfinite(obstacles).all(1)]
    pad = 3.0 * px_per_pt                                   # keep clear of markers and caps
    directions = [(1, 0), (1, 1), (1, -1), (0, 1), (0, -1), (-1, 1), (-1, -1), (-1, 0)]
    placed, artists = [], []
    for x, y, text, color in zip(xs, ys, texts, colors):
        a = ax.annotate(text, xy=(x, y), xytext=(radii[0], 0), textcoords="offset points", fontsize=fontsize,
                        color=color)
        best = None
        for radius in radii:
            for dx, dy in directions:
                norm = math.hypot(dx, dy)
                a.set_position((radius * dx / norm, radius * dy / norm))
                a.set_horizontalalignment("left" if dx > 0 else "right" if dx < 0 else "center")
                a.set_verticalalignment("bottom" if dy > 0 else "top" if dy < 0 else "center")
                bb = a.get_window_extent(renderer)
                box = (bb.x0 - pad, bb.y0 - pad, bb.x1 + pad, bb.y1 + pad)
                conflicts = int(((obstacles[:, 0] >= box[0]) & (obstacles[:, 0] <= box[2])
                                 & (obstacles[:, 1] >= box[1]) & (obstacles[:, 1] <= box[3])).sum())
                conflicts += 20 * sum(bb.overlaps(other) for other in placed)
                conflicts += 0 if (bb.x0 >= frame.x0 and bb.x1 <= frame.x1 and bb.y0 >= frame.y0
                                   and bb.y1 <= frame.y1) else 100
                if best is None or conflicts < best[0]:
                    best = (conflicts, a.get_position(), a.get_horizontalalignment(), a.get_verticalalignment())
                if conflicts == 0:
                    break
            if best[0] == 0:
                break
        _, pos, ha, va = best
        a.set_position(pos)
        a.set_horizontalalignment(ha)
        a.set_verticalalignment(va)
        placed.append(a.get_window_extent(renderer))
        artists.append(a)
        if math.hypot(*pos) > radii[0] + 1e-9:               # moved away: a leader line back to the point
            ax.annotate("", xy=(x, y), xytext=pos, textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": 2})
    return artists


def interval_points(x, lo, hi, n: int = 7) -> list[tuple[float, float]]:
    """``n`` points along each vertical interval ``[lo, hi]`` at ``x`` (scalars or arrays), for
    :func:`label_points` to keep labels off the error bars; NaN intervals give no points."""
    x, lo, hi = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (x, lo, hi))
    pts = []
    for xi, a, b in zip(x, lo, hi):
        if np.isfinite(a) and np.isfinite(b):
            pts += [(xi, v) for v in np.linspace(a, b, n)]
    return pts


def line_points(xs, ys, n: int = 8, log_x: bool = False) -> list[tuple[float, float]]:
    """``n`` points along each segment of the polyline through ``(xs, ys)`` (interpolated in log x when
    ``log_x``), for :func:`label_points` to keep labels off a curve."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    u = np.log10(xs) if log_x else xs
    pts = []
    for a in range(len(xs) - 1):
        for t in np.linspace(0.0, 1.0, n):
            ui = u[a] + t * (u[a + 1] - u[a])
            pts.append((10**ui if log_x else ui, ys[a] + t * (ys[a + 1] - ys[a])))
    return pts


def log_axis(ax, axis: str = "x") -> None:
    """A log axis ticked at 1, 2 and 5 times the powers of ten, labelled as plain numbers (0.1, 0.2, 0.5, 1, ...),
    without minor-tick labels."""
    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    a.set_major_locator(mpl.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(mpl.ticker.NullFormatter())


def k_axis(ax, ks: Sequence[float], axis: str = "x") -> None:
    """A log2 axis for a number of copies K, ticked at the values ``ks`` with plain integer labels."""
    ks = sorted({int(k) for k in ks})
    if axis == "x":
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_locator(mpl.ticker.NullLocator())
    else:
        ax.set_yscale("log", base=2)
        ax.set_yticks(ks, [str(k) for k in ks])
        ax.yaxis.set_minor_locator(mpl.ticker.NullLocator())


def legend(ax, **kw):
    """A legend with one entry per label (a later artist with a label already shown is skipped)."""
    handles, labels = ax.get_legend_handles_labels()
    seen, keep = set(), []
    for h, lab in zip(handles, labels):
        if lab not in seen:
            seen.add(lab)
            keep.append((h, lab))
    if not keep:
        return None
    return ax.legend(*zip(*keep), **kw)


def save(fig, path: str | Path, dpi: int = 130) -> Path:
    """Save ``fig`` as PNG (tight bounding box, so no label is clipped) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def wrapped(text: str, width: int = 110, limit: int = 330) -> list[str]:
    """``text`` as lines of at most ``width`` characters, whitespace collapsed, cut at ``limit`` characters
    (marked with an ellipsis); continuation lines indented."""
    import textwrap

    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "\u2026"
    return textwrap.wrap(text, width, subsequent_indent="    ")


def text_figure(lines: Sequence[tuple[str, str, str]], width: float = 10.0, line_height: float = 0.21):
    """A figure of monospaced text lines ``(text, colour, weight)`` (the paper's example tables). The text sits
    in an axes with its frame off, so the figure has a size both when saved and when shown inline."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width, line_height * len(lines) + 0.4))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    n = len(lines) + 1
    for r, (text, colour, weight) in enumerate(lines):
        ax.text(0.01, 1 - (r + 1) / n, text, color=colour, fontweight=weight, fontsize=9, family="monospace",
                parse_math=False, transform=ax.transAxes, va="center")
    return fig
