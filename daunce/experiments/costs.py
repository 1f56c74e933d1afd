"""What each method cost, kept next to the cached work so that a resumed run still reports it.

A notebook that resumes from its work folder skips the fine-tunes, copies and retrains it finds
there, so it cannot time them again. ``CostLog`` records a cost the moment it is measured (seconds,
fine-tunes, forward passes: any JSON fields) in a JSON file of the work folder, written atomically
(``daunce.store.atomic_write_json``), and reads it back on the next run::

    costs = CostLog(work / "costs.json")
    if not adapter_path.exists():
        with llm.Timer() as t:
            ...                                  # the work
        costs.record("theta0", seconds=t.seconds, fine_tunes=1, forward_passes=n * epochs)
    costs.get("theta0")                          # measured now, or in the run that did the work

``add`` accumulates items measured piecewise (one retrain at a time, one copy at a time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from ..store import atomic_write_json


class CostLog:
    """Cost records ``{key: {field: value}}`` in a JSON file, written when measured, read back when resumed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._data: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def record(self, key: str, **fields: Any) -> dict:
        """Store ``fields`` as the cost of ``key`` (replacing an earlier record of the same key) and
        write the file at once."""
        self._data[key] = dict(fields)
        atomic_write_json(self._data, self.path)
        return self._data[key]

    def add(self, key: str, item: str, **fields: Any) -> dict:
        """Store the cost of one ``item`` of ``key`` (e.g. one retrain), keeping the other items."""
        self._data.setdefault(key, {})[str(item)] = dict(fields)
        atomic_write_json(self._data, self.path)
        return self._data[key]

    def get(self, key: str, default: Optional[dict] = None) -> Optional[dict]:
        """The stored record of ``key`` (``default`` when nothing was measured yet)."""
        return self._data.get(key, default)

    def total(self, key: str, field: str) -> Optional[float]:
        """Sum of ``field`` over the items ``add``-ed under ``key``; ``None`` when there are none."""
        items = [v[field] for v in self._data.get(key, {}).values() if isinstance(v, dict) and field in v]
        return float(sum(items)) if items else None

    def as_dict(self) -> dict:
        return json.loads(json.dumps(self._data))
