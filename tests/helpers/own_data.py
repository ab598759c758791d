"""Users' own data and models as tests build them: chat conversations in every format the data modules read, and
Hub caches on disk (the ``models--org--name/snapshots/<sha>/`` + ``refs/<ref>`` layout), so nothing is fetched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "89abcdef0123456789abcdef0123456789abcdef"


def hub_snapshot(
    home: Path, repo_id: str, files_from: Path, sha: str = SHA, ref: str = "main", kind: str = "models"
) -> Path:
    """``files_from``'s files as the snapshot ``sha`` of ``repo_id`` in the Hub cache under ``home`` (``refs/<ref>``)."""
    repo = home / "hub" / f"{kind}--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    return snapshot


SYSTEMLESS = [
    [("user", "Hello there"), ("assistant", "Hi! How can I help?")],
    [("user", "What is the boiling point of water?"), ("assistant", "100 degrees Celsius at sea level.")],
    [("user", "Tell me a joke"), ("assistant", "Why did the chicken cross the road?")],
    [("user", "Who wrote Hamlet?"), ("assistant", "William Shakespeare.")],
    [("user", "Name a prime number"), ("assistant", "Seven.")],
    [("user", "Translate cat to French"), ("assistant", "Chat.")],
]
MULTI_TURN = [
    [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "How are you?"),
        ("assistant", "Fine."),
    ],
    [("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"), ("assistant", "6")],
    [("user", "Capital of France?"), ("assistant", "Paris."), ("user", "Of Italy?"), ("assistant", "Rome.")],
    [("system", "You are kind."), ("user", "Thanks"), ("assistant", "You're welcome!")],
    [("user", "Color of the sky?"), ("assistant", "Blue."), ("user", "At night?"), ("assistant", "Black.")],
]
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def as_format(conversation: list[tuple[str, str]], fmt: str) -> dict[str, Any]:
    """One conversation as a record of ``fmt``."""
    if fmt == "messages":
        return {"messages": [{"role": r, "content": c} for r, c in conversation]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": SHAREGPT[r], "value": c} for r, c in conversation]}
    if fmt == "prompt_completion":
        (_, prompt), (_, completion) = conversation
        return {"prompt": prompt, "completion": completion}
    if fmt == "prompt_completion_messages":
        *prompt, last = conversation
        return {
            "prompt": [{"role": r, "content": c} for r, c in prompt],
            "completion": [{"role": last[0], "content": last[1]}],
        }
    assert fmt == "alpaca"
    (_, prompt), (_, output) = conversation
    return {"instruction": prompt, "input": "", "output": output}


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        raise AssertionError(path)
    return path
