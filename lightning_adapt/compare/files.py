"""What the parent of a ``compare`` run and its children agree on: the record's environment variable and the
atomic JSON writer. Imports only :mod:`lightning_adapt.atomic` (standard library), so the runner never imports
the recorder's Lightning callbacks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lightning_adapt.atomic import write_text_atomic
from lightning_adapt.errors import MissingDependencyError

__all__ = ["RECORD_ENV", "require_plots", "write_json"]

#: Environment variable naming the JSON file a child run's ``CompareRecorder`` writes.
RECORD_ENV = "LIGHTNING_ADAPT_COMPARE_RECORD"


def require_plots() -> None:
    """Refuse, before anything runs, to draw pictures without matplotlib (the ``plots`` extra)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError(
            "Pictures need matplotlib. Fix: `pip install 'lightning-adapt[plots]'` (or `pip install matplotlib`)."
        )


def write_json(path: str | Path, payload: object) -> None:
    """Write ``payload`` as JSON atomically (temp file beside it, ``fsync``, then rename)."""
    write_text_atomic(path, json.dumps(payload, indent=2))
