"""Where the repository's outputs go, wherever a notebook is run from, and the key that names a cached file by the
settings that decide it (``settings_key``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def repo_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding pyproject.toml."""
    here = (start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").exists() and (p / "daunce").is_dir():
            return p
    return here


def figures_dir() -> Path:
    d = repo_root() / "figures"
    d.mkdir(exist_ok=True)
    return d


def executed_dir() -> Path:
    """``papermill_runs/``: executed notebooks and their metrics JSON (work folders are under ``runs/``)."""
    d = repo_root() / "papermill_runs"
    d.mkdir(exist_ok=True)
    return d


def work_dir(name: str) -> Path:
    """``runs/<name>``: resumable artefacts of long runs (ignored by git)."""
    d = repo_root() / "runs" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def output_dirs(out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``(figures, runs)``: the repository's folders, or both inside ``out_dir`` when it is given
    (smoke runs in the tests write there and leave the repository's results alone)."""
    if out_dir is None:
        return figures_dir(), executed_dir()
    base = Path(out_dir)
    figs, runs = base / "figures", base / "papermill_runs"
    figs.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    return figs, runs


def notebook_work_dir(name: str, profile: str, out_dir=None, work_dir=None) -> Path:
    """Where a notebook keeps its resumable artefacts: ``work_dir`` if given, else ``out_dir/work``,
    else ``runs/<name>/<profile>``."""
    if work_dir is not None:
        d = Path(work_dir)
    elif out_dir is not None:
        d = Path(out_dir) / "work"
    else:
        d = repo_root() / "runs" / name / profile
    d.mkdir(parents=True, exist_ok=True)
    return d


def _plain(value, field: str):
    """``value`` as JSON types for ``settings_key`` (TypeError naming ``field`` for a value without a stable form)."""
    import dataclasses

    if isinstance(value, dict):
        return {str(k): _plain(v, f"{field}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__dataclass__": type(value).__name__, **_plain(dataclasses.asdict(value), field)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"settings_key: {field} is a {type(value).__name__} ({value!r}); give it as JSON types, a tuple, "
                    "a path or a dataclass, so that the key is the same in every run")


def settings_key(settings: dict) -> str:
    """Eight hex digits that name a cached artefact by the settings that decide it (a fine-tuning recipe, a profile's
    sizes, a grid), for a file or folder name: the SHA-1 of ``settings`` as JSON with sorted keys, so the same
    settings in any order give the same key and a change of any value (e.g. AdamW's eps from 1e-8 to 1e-4) another
    one, and a file made under other settings is never read. Values: JSON types, tuples (as lists), paths, dataclasses
    (their fields), numpy scalars and arrays. Raises TypeError naming the field of any other value."""
    import hashlib
    import json

    text = json.dumps(_plain(dict(settings), "settings"), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]
