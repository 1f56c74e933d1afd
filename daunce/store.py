"""What a long run keeps on disk: atomic writers, dataset fingerprints and the manifest check.

Every resumable artefact of this package (Daunce's copies, the black-box runner's fine-tunes, the
ground-truth retrains) lives in a work folder whose ``manifest.json`` says what produced it. A rerun
with the same manifest reuses what is there; a rerun with another one is refused with the fields
that differ, so a folder never silently mixes two runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + f".tmp{os.getpid()}")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = _temporary(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: str | os.PathLike, **dumps_kw) -> None:
    """Write JSON to a temporary file and rename it over ``path``: never a half-written file."""
    path = Path(path)
    tmp = _temporary(path)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, **dumps_kw))
    os.replace(tmp, path)


def fingerprint(dataset: Dataset) -> str:
    """A content hash (16 hex digits) of a map-style dataset: names cached signals and work folders."""
    h = hashlib.sha1()
    h.update(str(len(dataset)).encode())
    if isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    else:
        for i in range(len(dataset)):
            item = dataset[i]
            buf = io.BytesIO()
            if torch.is_tensor(item) or isinstance(item, (tuple, list, dict)):
                torch.save(item, buf)
            else:
                pickle.dump(item, buf)
            h.update(buf.getvalue())
    return h.hexdigest()[:16]


def check_manifest(folder: str | os.PathLike, manifest: dict, what: str = "results",
                   ignore: tuple[str, ...] = ()) -> None:
    """Claim ``folder`` for the run described by ``manifest`` (a dict; values JSON-able, else stored as str).

    Writes ``folder/manifest.json`` when it is absent; when it is present and differs in a field not in
    ``ignore``, raises a ``ValueError`` naming the fields that differ (stored vs now), so a work folder
    never mixes two runs. Fields in ``ignore`` may change (a run that grows, e.g. more ground-truth
    subsets whose first ones are the same); the manifest is then rewritten with their new values.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    # round-trip through JSON so tuples and lists compare equal to what was stored
    manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))
    if not path.exists():
        atomic_write_json(manifest, path)
        return
    old = json.loads(path.read_text())
    if old == manifest:
        return
    differ = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k) and k not in ignore)
    if differ:
        detail = "; ".join(f"{k}: stored {old.get(k)!r}, now {manifest.get(k)!r}" for k in differ)
        raise ValueError(f"{folder} holds {what} of another run ({detail}); use a new folder or delete it")
    atomic_write_json(manifest, path)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The stored ``folder/manifest.json`` (a dict), or ``None`` when there is none."""
    path = Path(folder) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def update_manifest(folder: str | os.PathLike, **fields) -> None:
    """Set ``fields`` in ``folder/manifest.json`` (atomically): for what a run learns while it runs (e.g.
    which copies did not converge), which a later ``check_manifest`` must be told to ``ignore``."""
    old = read_manifest(folder) or {}
    old.update(json.loads(json.dumps(fields, sort_keys=True, default=str)))
    atomic_write_json(old, Path(folder) / "manifest.json")


class CopyStore:
    """Where a Daunce run keeps its finished copies: ``folder/copies/copy_XXXX.pt`` (atomic writes) or,
    without a folder, a dict in memory. A copy's record is ``{"k", "state", "signals", "seconds"}``:
    its trainable tensors, its signals per dataset fingerprint, and the seconds it took.
    Signals computed later from the stored weights go to ``folder/signals/<fingerprint>.pt``."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[int, dict] = {}

    def path(self, k: int) -> Path:
        if self.folder is None:
            raise ValueError("this store keeps its copies in memory")
        return self.folder / "copies" / f"copy_{k:04d}.pt"

    def has(self, k: int) -> bool:
        return k in self.memory if self.folder is None else self.path(k).exists()

    def save(self, record: dict) -> None:
        if self.folder is None:
            self.memory[record["k"]] = record
        else:
            atomic_save(record, self.path(record["k"]))

    def load(self, k: int) -> dict:
        if self.folder is None:
            return self.memory[k]
        return torch.load(self.path(k), map_location="cpu", weights_only=True)

    def extra_signals_path(self, fp: str) -> Path | None:
        return None if self.folder is None else self.folder / "signals" / f"{fp}.pt"

    def load_extra_signals(self, fp: str) -> dict:
        path = self.extra_signals_path(fp)
        return torch.load(path, weights_only=True) if path is not None and path.exists() else {}

    def save_extra_signals(self, fp: str, signals: dict) -> None:
        path = self.extra_signals_path(fp)
        if path is not None:
            atomic_save(signals, path)


__all__ = ["atomic_save", "atomic_write_json", "fingerprint", "check_manifest", "read_manifest", "update_manifest",
           "CopyStore"]
