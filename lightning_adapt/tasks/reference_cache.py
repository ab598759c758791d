"""Reference log-probabilities kept per pair on disk: each pair's reference forward runs once, across epochs and runs.

DPO's reference never changes, so its summed log-probability of a pair's chosen and rejected responses is a fixed
number per pair. :class:`ReferenceCache` keeps them in a JSON file named after a fingerprint of what the reference
is (the source files' names, sizes and modification times, the frozen weights' names, shapes and dtypes, how the
reference is run); a pair's key hashes its tokens and labels. The file is rewritten atomically whenever asked
(the task does at each checkpoint, epoch end and fit end), so a killed run loses at most what it computed since,
and a resumed or repeated run computes only the pairs it lacks. Values are stored as the fp32 sums they were
(a float64 JSON number holds an fp32 value exactly), so a cached step computes the same loss as an uncached one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from lightning_adapt.atomic import write_text_atomic

__all__ = ["ReferenceCache", "pair_keys", "reference_fingerprint"]


def reference_fingerprint(source: Path, model: nn.Module, how: str) -> str:
    """16 hex digits naming the reference: ``source``'s files (name, size, mtime), ``model``'s frozen tensors (name,
    shape, dtype) and ``how`` (e.g. ``adapters-off`` or ``copy``)."""
    digest = hashlib.sha256(how.encode())
    files = sorted(source.iterdir()) if source.is_dir() else [source]
    for path in files:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
    return digest.hexdigest()[:16]


def pair_keys(batch: dict[str, torch.Tensor]) -> list[str]:
    """One key per pair of a ``2B``-row batch (chosen rows first): a hash of both rows' unpadded tokens and labels."""
    ids, labels, mask = batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].cpu().bool()
    half = ids.shape[0] // 2
    keys = []
    for i in range(half):
        digest = hashlib.sha256()
        for row in (i, i + half):
            digest.update(ids[row][mask[row]].numpy().tobytes() + b"|" + labels[row][mask[row]].numpy().tobytes())
        keys.append(digest.hexdigest())
    return keys


class ReferenceCache:
    """``{pair key: (chosen sum, rejected sum)}`` in memory, loaded from and saved to ``directory``.

    Args:
        directory: where the file lives (created on the first save).
        fingerprint: :func:`reference_fingerprint` of the reference these values come from.
    """

    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.path = Path(directory) / f"reference-logps-{fingerprint}.json"
        self.values: dict[str, list[float]] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.loaded = len(self.values)
        self.dirty = False

    def lookup(self, keys: list[str], device: torch.device) -> torch.Tensor | None:
        """The ``2B`` reference sums (chosen, then rejected) of ``keys``, fp32; ``None`` unless every pair is cached."""
        if not all(key in self.values for key in keys):
            return None
        pairs = torch.tensor([self.values[key] for key in keys], dtype=torch.float32, device=device)
        return torch.cat([pairs[:, 0], pairs[:, 1]])

    def store(self, keys: list[str], totals: torch.Tensor) -> None:
        """Remember the ``2B`` sums ``totals`` (chosen, then rejected) of ``keys``."""
        values = totals.detach().float().cpu().tolist()
        half = len(keys)
        for i, key in enumerate(keys):
            self.values[key] = [values[i], values[i + half]]
        self.dirty = True

    def save(self) -> None:
        """Write the file atomically, when anything is new."""
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.values))
            self.dirty = False
