"""One tuning rule for every method of a benchmark, and grids that contain their best value.

Every method with a damping knob (Daunce included) is run at each value of one grid and the value with the
highest LDS on the *tuning* queries is kept, measured at the setting that is reported (for Daunce: at the K it
reports, with copies that pass the convergence check). A value at an end of the grid may not be the best one:
``extension`` names the next value past that end (a decade further), the caller runs it, and the rule is
applied again, until the chosen value is inside the values tried, a value past it failed (e.g. Daunce's
copies did not converge), or ``MAX_EXTENSIONS`` values were added. ``grid_status`` says which, for the
metrics JSON.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

#: each extension moves a decade past the end of the grid
EXTEND_FACTOR = 10.0
#: at most this many values are added past either end (a flat LDS curve would otherwise extend for ever)
MAX_EXTENSIONS = 3
#: no damping below this is tried (float32 scores stop resolving it); none above this
LOWEST, HIGHEST = 1e-8, 1e4


def _ok(score) -> bool:
    return score is not None and not (isinstance(score, float) and math.isnan(score))


def choose(rows: list, *, key: str = "tune_lds", eligible: Optional[Callable[[dict], bool]] = None) -> Optional[dict]:
    """The row with the highest ``key`` among the eligible rows with a finite ``key`` (ties: the first), or None."""
    ok = [r for r in rows if _ok(r.get(key)) and (eligible is None or eligible(r))]
    return max(ok, key=lambda r: r[key]) if ok else None


def extension(tried: list, chosen: Optional[float], grid: list) -> Optional[float]:
    """The next value to try past the end of ``tried`` that ``chosen`` sits at, or None: when ``chosen`` lies
    inside ``tried`` (the tried values include ineligible ones: a failed value past the chosen one ends the
    search), when ``MAX_EXTENSIONS`` values beyond ``grid`` were tried at that end, or past the limits."""
    vals = sorted({v for v in tried if v is not None})
    if chosen is None or len(vals) < 2:
        return None
    if chosen == vals[0]:
        below = [v for v in vals if v < min(grid)]
        nxt = float(f"{chosen / EXTEND_FACTOR:.12g}")  # 1e-6, not 1.0000000000000002e-06
        return nxt if len(below) < MAX_EXTENSIONS and nxt >= LOWEST else None
    if chosen == vals[-1]:
        above = [v for v in vals if v > max(grid)]
        nxt = float(f"{chosen * EXTEND_FACTOR:.12g}")
        return nxt if len(above) < MAX_EXTENSIONS and nxt <= HIGHEST else None
    return None


def grid_status(tried: list, chosen: Optional[float], grid: list, failed: Optional[dict] = None) -> dict:
    """What the JSON records about a method's grid: the values tried beyond ``grid`` (``extended``), whether
    the chosen value lies inside the values tried (``interior``), and if not, why the search stopped.
    ``failed``: ``{value: reason}`` for values that were run but are not eligible."""
    vals = sorted({v for v in tried if v is not None})
    extended = [v for v in vals if v < min(grid) or v > max(grid)]
    out = {"grid": list(grid), "tried": vals, "extended": extended, "chosen": chosen}
    if chosen is None:
        return {**out, "interior": False, "why": "no eligible value"}
    if len(vals) < 2:   # ``extension`` needs two values to step a decade past an end
        return {**out, "interior": False, "why": "the only value tried: a grid of one value is not extended"}
    inside = vals[0] < chosen < vals[-1] if len(vals) > 2 else False
    out["interior"] = bool(inside)
    if inside:
        beyond = [v for v in vals if v < chosen] + [v for v in vals if v > chosen]
        failed_beyond = {v: r for v, r in (failed or {}).items() if v in beyond}
        # a chosen value can be inside the values tried only because a value past it failed: say so
        lower_ok = any(v < chosen and v not in (failed or {}) for v in vals)
        upper_ok = any(v > chosen and v not in (failed or {}) for v in vals)
        if not (lower_ok and upper_ok):
            out["interior"] = False
            out["why"] = ("the best eligible value; the values past it failed: "
                          + "; ".join(f"{v:g}: {r}" for v, r in sorted(failed_beyond.items())))
        return out
    side = "smallest" if chosen == vals[0] else "largest"
    n_ext = len([v for v in extended if (v < min(grid)) == (side == "smallest")])
    why = (f"the {side} value tried after {n_ext} extension(s) (the limit)" if n_ext >= MAX_EXTENSIONS
           else f"the {side} value tried; the limit {LOWEST if side == 'smallest' else HIGHEST:g} stops the grid")
    return {**out, "why": why}


__all__ = ["choose", "extension", "grid_status", "EXTEND_FACTOR", "MAX_EXTENSIONS"]
