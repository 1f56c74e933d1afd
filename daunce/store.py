"""What a long run keeps on disk: atomic writers, dataset fingerprints and the manifest check.

Every resumable artefact of this package (Daunce's copies, the black-box runner's fine-tunes, the
ground-truth retrains) lives in a work folder whose ``manifest.json`` says what produced it. A rerun
with the same manifest reuses what is there; a rerun with another one is refused with the fields
that differ, so a folder never silently mixes two runs. Daunce's manifest binds the folder to the
training set, the configuration, the model (``model_fingerprint``: its architecture and theta0's
weights) and the task (``task_fingerprint``).

A damaged file is never used: a copy file that cannot be read, or whose record is not the copy its
name says, is moved aside (``copy_XXXX.pt.damaged``) with a warning naming it and counts as missing,
so the copy is trained again; a damaged ``manifest.json`` is an error naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from .task import describe


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


def _tensor_bytes(t: torch.Tensor):
    """The raw bytes of a tensor (any dtype, bfloat16 included), on the CPU, as a buffer (no copy on the CPU)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def model_fingerprint(model: torch.nn.Module) -> dict:
    """``{"architecture": hash, "weights": hash}`` (16 hex digits each) of a model, for a work folder's manifest.

    ``architecture``: the module tree (names and classes), every parameter's name, shape, dtype and whether it is
    trainable, every buffer's name, shape and dtype. ``weights``: the values of all parameters and buffers (theta0:
    a copy is a perturbation of exactly these weights). Bytes are read on the CPU, so the same weights on another
    device give the same hash. Costs one read of the weights (about a second per GB)."""
    arch, weights = hashlib.sha1(), hashlib.sha1()
    for name, m in model.named_modules():
        arch.update(f"module {name} {type(m).__module__}.{type(m).__qualname__}\n".encode())
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            trainable = bool(getattr(t, "requires_grad", False)) if kind == "param" else False
            arch.update(f"{kind} {name} {tuple(t.shape)} {t.dtype} {trainable}\n".encode())
            weights.update(f"{kind} {name}\n".encode())
            weights.update(_tensor_bytes(t))
    return {"architecture": arch.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


def task_fingerprint(task: Any) -> str:
    """What a task computes, as a readable string: its ``fingerprint()`` when it has one (``ClassificationTask``,
    ``daunce.llm.CausalLMTask``), else its class name and its public attributes whose values JSON can hold
    (``daunce.task.describe``), e.g. ``"ClassificationTask(signal='loss')"``."""
    fn = getattr(task, "fingerprint", None)
    return str(fn()) if callable(fn) else describe(task)


#: readable names of manifest fields, used when they differ
FIELD_LABELS = {"model_weights": "model weights (theta0) differ", "architecture": "architecture differs",
                "task": "task differs", "train_fingerprint": "training set differs",
                "backend": "backend differs", "model_name": "model name differs"}


def _load_manifest_file(path: Path) -> dict:
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); it says what produced the files of "
                         f"{path.parent}, which cannot be checked without it: use a new folder, or delete "
                         f"{path.parent} (or restore the file) and rerun") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} is damaged (it holds a {type(old).__name__}, not a JSON object); use a new folder, "
                         f"or delete {path.parent} (or restore the file) and rerun")
    return old


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def check_manifest(folder: str | os.PathLike, manifest: dict, what: str = "results",
                   ignore: tuple[str, ...] = (), adopt: tuple[str, ...] = ()) -> None:
    """Claim ``folder`` for the run described by ``manifest`` (a dict; values JSON-able, else stored as str).

    Writes ``folder/manifest.json`` when it is absent; when it is present and differs in a field not in
    ``ignore``, raises a ``ValueError`` naming the fields that differ (stored vs now; ``FIELD_LABELS`` names
    the model, task and training-set fields in words), so a work folder never mixes two runs. Fields in
    ``ignore`` may change (a run that grows, e.g. more ground-truth subsets whose first ones are the same); the
    manifest is then rewritten with their new values. Fields in ``adopt`` that an older manifest does not hold
    (it was written before they were recorded) are added with a warning: the folder is bound to them from then
    on. A damaged manifest is an error naming the file.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    # round-trip through JSON so tuples and lists compare equal to what was stored
    manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))
    if not path.exists():
        atomic_write_json(manifest, path)
        return
    old = _load_manifest_file(path)
    if old == manifest:
        return
    missing = sorted(k for k in adopt if k in manifest and k not in old)
    differ = sorted(k for k in set(old) | set(manifest)
                    if old.get(k) != manifest.get(k) and k not in ignore and k not in missing)
    if differ:
        detail = "; ".join(f"{FIELD_LABELS[k]}: {_show(old.get(k))} stored, {_show(manifest.get(k))} now"
                           if k in FIELD_LABELS else f"{k}: stored {old.get(k)!r}, now {manifest.get(k)!r}"
                           for k in differ)
        raise ValueError(f"{folder} holds {what} of another run ({detail}); use a new folder or delete it")
    if missing:
        warnings.warn(f"{path} was written before its {missing} were recorded: the {what} there are taken to come "
                      f"from this run's, and the folder is bound to them from now on (delete the folder if they "
                      "do not)", RuntimeWarning, stacklevel=3)
    atomic_write_json(manifest, path)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The stored ``folder/manifest.json`` (a dict), or ``None`` when there is none; a damaged one is an error
    naming the file."""
    path = Path(folder) / "manifest.json"
    return _load_manifest_file(path) if path.exists() else None


def update_manifest(folder: str | os.PathLike, **fields) -> None:
    """Set ``fields`` in ``folder/manifest.json`` (atomically): for what a run learns while it runs (e.g.
    which copies did not converge), which a later ``check_manifest`` must be told to ``ignore``."""
    old = read_manifest(folder) or {}
    old.update(json.loads(json.dumps(fields, sort_keys=True, default=str)))
    atomic_write_json(old, Path(folder) / "manifest.json")


def set_aside(path: Path, problem: str, what: str = "file") -> Path:
    """Move a damaged file to ``<name>.damaged`` (kept for inspection, never read again) with a warning naming
    it and the problem; returns the new path."""
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    warnings.warn(f"{path} is damaged ({problem}): moved to {aside.name}; the {what} is made again",
                  RuntimeWarning, stacklevel=3)
    return aside


class CopyStore:
    """Where a Daunce run keeps its finished copies: ``folder/copies/copy_XXXX.pt`` (atomic writes) or,
    without a folder, a dict in memory. A copy's record is ``{"k", "state", "signals", "seconds"}``:
    its trainable tensors, its signals per dataset fingerprint, and the seconds it took; a copy that trained its own
    BatchNorm running statistics (``DaunceConfig.batchnorm="train"``) also holds them, ``"stats"`` (a list of
    tensors in the order of ``ModelContext.stat_names``).
    Signals computed later from the stored weights go to ``folder/signals/<fingerprint>.pt``.

    Every copy file is checked when first asked for (``has``) and on every ``load``: it must be readable and hold
    a record with those keys, whose ``"k"`` is the file's index and whose ``state`` is a list of tensors (of the
    shapes ``state_shapes``, when set). ``has`` moves a damaged file aside (``copy_XXXX.pt.damaged``, with a
    warning naming it) and answers False, so the copy is trained again; ``load`` raises naming it. A damaged
    signals file is moved aside the same way and its signals computed again."""

    KEYS = ("k", "state", "signals", "seconds")

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[int, dict] = {}
        #: shapes of a copy's trainable tensors, checked on load when set
        self.state_shapes: list[tuple] | None = None
        #: shapes of a copy's running statistics, checked on load when set (for a record that holds them)
        self.stats_shapes: list[tuple] | None = None
        self._checked: set[int] = set()  # copy files found sound since they were last written

    def path(self, k: int) -> Path:
        if self.folder is None:
            raise ValueError("this store keeps its copies in memory")
        return self.folder / "copies" / f"copy_{k:04d}.pt"

    def problem(self, k: int, rec: Any) -> str | None:
        """What is wrong with ``rec`` as copy ``k``'s record, or ``None``."""
        if not isinstance(rec, dict):
            return f"holds a {type(rec).__name__}, not a copy record"
        lacking = [key for key in self.KEYS if key not in rec]
        if lacking:
            return f"its record lacks {lacking}"
        if rec["k"] != k:
            return f"it holds the record of copy {rec['k']!r}, not of copy {k}"
        state = rec["state"]
        if not isinstance(state, (list, tuple)) or not all(torch.is_tensor(t) for t in state):
            return "its state is not a list of tensors"
        if self.state_shapes is not None and [tuple(t.shape) for t in state] != [tuple(s) for s in self.state_shapes]:
            return (f"its state has shapes {[tuple(t.shape) for t in state]}, the model's trainable tensors "
                    f"{[tuple(s) for s in self.state_shapes]}")
        if not isinstance(rec["signals"], dict):
            return "its signals are not a dict"
        stats = rec.get("stats")
        if stats is not None:
            if not isinstance(stats, (list, tuple)) or not all(torch.is_tensor(t) for t in stats):
                return "its running statistics are not a list of tensors"
            shapes, model = [tuple(t.shape) for t in stats], [tuple(x) for x in self.stats_shapes or ()]
            if self.stats_shapes is not None and shapes != model:
                return f"its running statistics have shapes {shapes}, the model's {model}"
        return None

    def _read(self, k: int) -> tuple[dict | None, str | None]:
        try:
            rec = torch.load(self.path(k), map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to read the file (truncated zip, EOF, unpickling) is damage
            return None, f"unreadable: {type(e).__name__}: {e}"
        return rec, self.problem(k, rec)

    def has(self, k: int) -> bool:
        """Whether copy ``k`` is finished; a damaged copy file is moved aside (warning) and counts as missing."""
        if self.folder is None:
            return k in self.memory
        path = self.path(k)
        if not path.exists():
            self._checked.discard(k)
            return False
        if k in self._checked:
            return True
        rec, problem = self._read(k)
        if problem is not None:
            set_aside(path, problem, f"copy {k}")
            return False
        self._checked.add(k)
        return True

    def save(self, record: dict) -> None:
        if self.folder is None:
            self.memory[record["k"]] = record
        else:
            atomic_save(record, self.path(record["k"]))
            self._checked.add(record["k"])

    def load(self, k: int) -> dict:
        if self.folder is None:
            return self.memory[k]
        rec, problem = self._read(k)
        if problem is not None:
            self._checked.discard(k)
            raise RuntimeError(f"copy {k}: {self.path(k)} is damaged ({problem}); call fit() to train it again "
                               "(fit moves the file aside)")
        return rec

    def clear(self) -> None:
        """Forget the copies kept in memory (a store with a folder keeps its files)."""
        self.memory.clear()
        self._checked.clear()

    def extra_signals_path(self, fp: str) -> Path | None:
        return None if self.folder is None else self.folder / "signals" / f"{fp}.pt"

    def load_extra_signals(self, fp: str) -> dict:
        """``{k: signals}`` stored for the dataset ``fp``; a damaged file is moved aside (warning): ``{}``."""
        path = self.extra_signals_path(fp)
        if path is None or not path.exists():
            return {}
        try:
            out = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to read the file is damage
            set_aside(path, f"unreadable: {type(e).__name__}: {e}", "signals of its copies")
            return {}
        if not isinstance(out, dict) or not all(isinstance(k, int) and torch.is_tensor(v) for k, v in out.items()):
            set_aside(path, "not a dict of copy index -> signals", "signals of its copies")
            return {}
        return out

    def save_extra_signals(self, fp: str, signals: dict) -> None:
        path = self.extra_signals_path(fp)
        if path is not None:
            atomic_save(signals, path)


__all__ = ["atomic_save", "atomic_write_json", "fingerprint", "model_fingerprint", "task_fingerprint", "check_manifest",
           "read_manifest", "update_manifest", "set_aside", "CopyStore"]
