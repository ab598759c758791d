"""Safetensors files: a streaming sharded writer, atomic directories, and the one reader (loading's too).

Pure torch + safetensors: nothing here knows about LoRA, quantization or Lightning.

:func:`write_safetensors` takes :class:`TensorEntry` lists whose keys, shapes and dtypes are known before
any tensor exists. Each file's header (shapes and byte offsets) is written first; then every tensor is
computed (``entry.load()``), cast, written and released before the next, so the peak is the caller's
model plus one tensor. Above ``max_shard`` bytes the output is sharded as Hugging Face does::

    model.safetensors                                                   one shard
    model-00001-of-0000n.safetensors, ..., model.safetensors.index.json n shards

The trees are written inside :func:`lightning_adapt.atomic.atomic_directory`, which makes them take the
target's place atomically (previous complete tree or new complete one; a second writer of one target refused).

Example:
    >>> entry = TensorEntry("w", (2, 3), torch.float32, lambda: torch.zeros(2, 3))
    >>> with atomic_directory(Path("out/merged")) as tmp:  # doctest: +SKIP
    ...     write_safetensors(tmp, [entry], torch.bfloat16, parse_size("5GB"))
    ['model.safetensors']
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lightning_adapt.errors import SETTING, ExportError

__all__ = [
    "DTYPE_OF_NAME",
    "SMALLER_DTYPE_FIX",
    "ExportError",
    "SourceWeights",
    "StoredTensor",
    "TensorEntry",
    "base_prefix_rule",
    "model_keys",
    "parse_size",
    "read_header",
    "read_index",
    "safetensors_files",
    "weight_files",
    "write_safetensors",
    "written_bytes",
]

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB`` / ``200MB`` / ``1GiB`` / ``1000`` (decimal units as Hugging Face; ``iB`` binary).

    Raises:
        ExportError: ``size`` is neither an int nor such a string.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if match is None:
        raise ExportError(f"max_shard_size={size!r}: expected bytes or e.g. '5GB', '500MB', '1GiB'.")
    return int(float(match.group(1)) * _UNITS[match.group(2) or "B"])


# --------------------------------------------------------------------------- streaming, sharded writer


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: ``load()`` must return a tensor of ``shape`` (any dtype; it is cast on write).
    ``stored``: where its bytes already lie, as written; they are copied file to file (``copy_file_range``,
    never through this process's memory) when no cast is needed, and ``load`` is not called."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    stored: StoredTensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _out_dtype(entry: TensorEntry, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` for floating entries (when given); integer and bool entries keep their own."""
    return dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype


def _nbytes(entry: TensorEntry, dtype: torch.dtype | None) -> int:
    return entry.numel * torch.empty((), dtype=_out_dtype(entry, dtype)).element_size()


def stream_safetensors(out: Path | BinaryIO, entries: list[TensorEntry], dtype: torch.dtype | None) -> int:
    """Write one safetensors file (a path, or an open binary file) tensor by tensor, header first; returns the
    data size in bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        nbytes = _nbytes(entry, dtype)
        header[entry.key] = {
            "dtype": _ST_DTYPES[_out_dtype(entry, dtype)],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(out, "wb") if isinstance(out, Path) else contextlib.nullcontext(out) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for entry in entries:
            out_dtype = _out_dtype(entry, dtype)
            if entry.stored is not None and (entry.stored.dtype, entry.stored.shape) == (out_dtype, entry.shape):
                _copy_stored(entry.stored, f)
                continue
            tensor = entry.load().to(out_dtype).contiguous()
            if tuple(tensor.shape) != entry.shape:
                raise ExportError(f"{entry.key}: computed shape {tuple(tensor.shape)}, expected {entry.shape}.")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)  # a buffer view: no extra copy
            del tensor  # released before the next one is computed: one tensor at a time
            if _nbytes(entry, dtype) >= 1 << 20:
                _trim_heap()
    return offset


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


def _trim_heap() -> None:
    """Give freed heap memory back to the system: glibc keeps freed chunks below its (self-raising) mmap
    threshold in the heap, so transients of a few tens of MB would otherwise stay resident tensor after tensor."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _copy_stored(stored: StoredTensor, out: BinaryIO) -> None:
    """Append ``stored``'s bytes to ``out`` file to file: the kernel copies them (``copy_file_range``), else
    8 MB at a time through one buffer."""
    out.flush()
    offset, left = stored.start, stored.nbytes
    with open(stored.file, "rb", buffering=0) as src:
        with contextlib.suppress(AttributeError, OSError):  # not Linux, or a file system that refuses it
            while left:
                n = os.copy_file_range(src.fileno(), out.fileno(), left, offset)
                if n <= 0:
                    break
                offset, left = offset + n, left - n
        buffer = memoryview(bytearray(min(left, 8 << 20)))
        while left:
            src.seek(offset)
            n = src.readinto(buffer[: min(left, len(buffer))]) or 0
            if not n:
                raise ExportError(f"{stored.file}: tensor {stored.key!r} is cut short. Fix: download the file again.")
            out.write(buffer[:n])
            offset, left = offset + n, left - n
    out.seek(0, os.SEEK_END)  # the kernel moved the file's offset behind the buffered writer's back


#: The free-space refusal's extra fix for an export (see :func:`lightning_adapt.atomic.check_free_space`).
SMALLER_DTYPE_FIX = ", or write a smaller dtype (dtype: bf16)"


def written_bytes(tensors: Iterable[tuple[tuple[int, ...], torch.dtype]], dtype: torch.dtype | None) -> int:
    """Tensor bytes :func:`write_safetensors` writes for ``(shape, stored dtype)`` pairs, floats cast to ``dtype``."""
    return sum(math.prod(shape) * (dtype if dtype and d.is_floating_point else d).itemsize for shape, d in tensors)


def write_safetensors(out: Path, entries: list[TensorEntry], dtype: torch.dtype | None, max_shard: int) -> list[str]:
    """Write ``entries`` into ``out`` in shards of at most ``max_shard`` bytes (a tensor larger than that
    gets a shard of its own); floating tensors are cast to ``dtype`` unless it is ``None``.

    Returns:
        The file names: ``["model.safetensors"]``, or ``model-0000k-of-0000n.safetensors`` (and then
        ``model.safetensors.index.json`` is written too).
    """
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry, dtype)
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards, strict=True):
        total += stream_safetensors(out / name, shard, dtype)
        weight_map.update(dict.fromkeys((e.key for e in shard), name))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


# --------------------------------------------------------------------------- reading single tensors

#: safetensors dtype name -> torch dtype (the reader's side of the format table).
DTYPE_OF_NAME = {name: dtype for dtype, name in _ST_DTYPES.items()}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file (from its header): ``read()`` returns a fresh CPU copy."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data
    nbytes: int

    def read(self, error: type[Exception] = ExportError) -> torch.Tensor:
        """The tensor as stored, read with plain ``readinto`` into new CPU memory: the file is never mapped, so no
        page of it counts in this process's resident memory once the call returns. A short file raises ``error``."""
        buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        view, done = buffer.numpy().data, 0
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.start)
            while done < self.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise error(f"{self.file}: tensor {self.key!r} is cut short. Fix: download the file again.")
                done += n
        return buffer.view(self.dtype).reshape(self.shape)


def _unreadable(file: Path, reason: Exception) -> Exception:
    return ExportError(f"{file}: not a readable safetensors file ({reason}). Fix: download it again.")


def read_header(file: Path, error: Callable[[Path, Exception], Exception] = _unreadable) -> dict[str, StoredTensor]:
    """Every tensor of ``file`` by key, in header order, from its header alone: each one's bytes checked to lie
    inside the file and to hold its dtype and shape. Any problem raises ``error(file, reason)`` (the caller
    words it: what the file should have held)."""
    entries = {}
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header: dict[str, dict[str, Any]] = json.loads(f.read(length))
        for key, meta in ((k, v) for k, v in header.items() if k != "__metadata__"):
            dtype, shape, (begin, end) = DTYPE_OF_NAME[meta["dtype"]], tuple(meta["shape"]), meta["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or 8 + length + end > size:
                raise ValueError(f"tensor {key!r}: bytes [{begin}, {end}) do not hold {dtype} {list(shape)}")
            entries[key] = StoredTensor(file, key, dtype, shape, 8 + length + begin, end - begin)
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise error(file, err) from err
    return entries


def weight_files(path: str | Path) -> dict[Path, list[str]]:
    """The weight files of a checkpoint: the file ``path`` itself, else ``model.safetensors`` in the directory,
    else the shards of its ``model.safetensors.index.json`` (in name order) with the keys the index puts in
    each (``[]`` for a single file); ``{}`` when there is none."""
    path = Path(path)
    if path.is_file() or (path / SINGLE_FILE).is_file():
        return {path if path.is_file() else path / SINGLE_FILE: []}
    files: dict[Path, list[str]] = {}
    if (path / INDEX_FILE).is_file():
        for key, name in json.loads((path / INDEX_FILE).read_text())["weight_map"].items():
            files.setdefault(path / name, []).append(key)
    return dict(sorted(files.items()))


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory (:func:`weight_files`); ``[]`` when it holds none."""
    return list(weight_files(path)) if Path(path).is_dir() else []


def read_index(path: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint directory ``path`` by key, in file order (files by name, then byte
    offset), from the headers alone."""
    return {t.key: t for file in safetensors_files(path) for t in _by_offset(read_header(file))}


def _by_offset(tensors: dict[str, StoredTensor]) -> list[StoredTensor]:
    return sorted(tensors.values(), key=lambda t: t.start)


def base_prefix_rule(base_model_prefix: str, names: Iterable[str], keys: Iterable[str]) -> tuple[str, str]:
    """Hugging Face's ``base_model_prefix`` rule (``from_pretrained``'s): how a model's tensor ``names`` meet a
    checkpoint's ``keys``. Returns ``(strip, add)``: the model's ``name`` is the key ``add + name.removeprefix(strip)``.

    ``("bert.", "")`` when only the names carry the prefix (a model with a head, a bare base checkpoint);
    ``("", "bert.")`` when only the keys do (a bare base model, a checkpoint with a head); else ``("", "")``.
    """
    dot = base_model_prefix + "." if base_model_prefix else ""
    names_have, keys_have = (bool(dot) and any(k.startswith(dot) for k in ks) for ks in (names, keys))
    return (dot, "") if names_have and not keys_have else ("", dot) if keys_have and not names_have else ("", "")


def model_keys(index: Mapping[str, StoredTensor], base_model_prefix: str = "") -> dict[str, StoredTensor]:
    """The checkpoint's tensors under the model's names: a bare base checkpoint (no key under
    ``base_model_prefix``, e.g. BERT's ``encoder...`` for ``bert.encoder...``) gets the prefix added,
    as ``from_pretrained`` does when it loads a base model into a model with a head."""
    strip, _ = base_prefix_rule(base_model_prefix, [base_model_prefix + "."], index)  # a model with a head
    return {strip + key: stored for key, stored in index.items()}


class SourceWeights:
    """Reads single tensors from a safetensors checkpoint directory (``model.safetensors`` or an index).

    Keys are tried as given, then with the ``base_model_prefix`` added or removed, so a task model
    (``bert.encoder...``) reads a bare base checkpoint (``encoder...``) and the other way round.
    Each :meth:`get` reads that one tensor (no memory map): nothing else is held in memory.

    Raises:
        ExportError: ``path`` holds neither ``model.safetensors`` nor ``model.safetensors.index.json``.
    """

    def __init__(
        self, path: str | Path, base_model_prefix: str = "", *,
        files: list[Path] | None = None, tensors: dict[str, StoredTensor] | None = None,
    ) -> None:  # fmt: skip
        self.path = Path(path)
        self.prefix = base_model_prefix
        if tensors is not None or files is not None:  # given tensors (keys as the model's), or given files
            self.tensors = (
                dict(tensors)
                if tensors is not None
                else {t.key: t for f in files or [] for t in _by_offset(read_header(f))}
            )
            return
        if not safetensors_files(self.path):
            raise ExportError(
                f"{SETTING}={str(path)!r}: no model.safetensors (or index) to re-read the original weights from "
                "(pickled .bin checkpoints are not read). Fix: point it at the safetensors directory the model "
                "was loaded from, or use merge_base='dequantized' to merge into the dequantized weights.",
                setting="source_path",
            )
        self.tensors = read_index(self.path)

    def resolve(self, key: str) -> str | None:
        """The checkpoint key holding the model's ``key``, or ``None``."""
        strip, add = base_prefix_rule(self.prefix, [key], self.tensors)
        return next((k for k in (key, add + key.removeprefix(strip)) if k in self.tensors), None)

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The stored shape of the model's ``key`` (read from the header only), or ``None``."""
        found = self.resolve(key)
        return None if found is None else self.tensors[found].shape

    def get(self, key: str) -> torch.Tensor:
        """The stored tensor of the model's ``key``, as stored (dtype unchanged)."""
        found = self.resolve(key)
        if found is None:
            raise ExportError(f"source {self.path}: no tensor for {key!r}.")
        return self.tensors[found].read()
