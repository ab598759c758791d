"""What the parent of a ``compare`` run and its children agree on: the record's environment variable and the
atomic JSON writer. A leaf module (imports nothing of ours), so the runner never imports the recorder's
Lightning callbacks."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["RECORD_ENV", "write_json"]

#: Environment variable naming the JSON file a child run's ``CompareRecorder`` writes.
RECORD_ENV = "LIGHTNING_ADAPT_COMPARE_RECORD"


def write_json(path: str | Path, payload: object) -> None:
    """Write ``payload`` as JSON atomically (temporary file in the same folder, then ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=target.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 is meant for secrets, not reports
    os.replace(tmp, target)
