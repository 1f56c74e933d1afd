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
