"""Where the repository's outputs go, wherever a notebook is run from."""

from __future__ import annotations

from pathlib import Path


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


def runs_dir() -> Path:
    """``papermill_runs/``: executed notebooks and their metrics JSON."""
    d = repo_root() / "papermill_runs"
    d.mkdir(exist_ok=True)
    return d


def work_dir(name: str) -> Path:
    """``runs/<name>``: resumable artefacts of long runs (ignored by git)."""
    d = repo_root() / "runs" / name
    d.mkdir(parents=True, exist_ok=True)
    return d
