"""Checks of what a user hands the CLI before anything runs: a ``--ckpt_path``, and the parser's own errors.

:func:`read_checkpoint` is the one way the CLI opens a checkpoint: it refuses a missing path, a directory,
a file that is not a (complete) PyTorch zip archive, a pickle that needs arbitrary Python objects (loaded
with ``weights_only=True``, so nothing in it runs) and a file without a ``state_dict``, each with one
:class:`~lightning_adapt.errors.CheckpointError`. :func:`parser_error` turns the config parser's report
(a union-type error around the real problem) into one :class:`~lightning_adapt.errors.ArgumentError`.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_adapt.errors import ArgumentError, CheckpointError

__all__ = ["parser_error", "read_checkpoint"]

_CKPT_FIX = (
    " Fix: pass a .ckpt file written by `lightning-adapt fit` with this recipe "
    "(e.g. <log dir>/checkpoints/epoch=0-step=200.ckpt)."
)


def read_checkpoint(path: str | Path, argument: str = "--ckpt_path", mmap: bool = True) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``; tensors memory-mapped) or raise one clear error.

    Args:
        path: the checkpoint file.
        argument: the flag named in messages.
        mmap: map the tensors instead of reading them (a full checkpoint's frozen base is never read in).

    Raises:
        CheckpointError: missing, a directory, not a complete PyTorch zip archive, holding Python objects
            that would need arbitrary code to unpickle, or no ``state_dict``.
    """
    where = f"{argument}={str(path)!r}"
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"{where} does not exist.{_CKPT_FIX}")
    if not file.is_file():
        raise CheckpointError(f"{where} is a directory, not a checkpoint file.{_CKPT_FIX}")
    if not zipfile.is_zipfile(file):
        raise CheckpointError(
            f"{where} is not a PyTorch checkpoint (not a complete zip archive: truncated, empty or another "
            f"format; {file.stat().st_size} bytes).{_CKPT_FIX}"
        )
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        detail = str(err).split("\n\n")[-1].strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{where} holds Python objects that only arbitrary code could rebuild ({detail}); it is refused "
            f"and nothing in it was run (checkpoints load with weights_only=True).{_CKPT_FIX}"
        ) from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{where} is a damaged PyTorch checkpoint ({err}).{_CKPT_FIX}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        kind = f"keys {sorted(checkpoint)[:5]}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{where} is a PyTorch file but not a Lightning checkpoint (no 'state_dict'; it holds {kind}).{_CKPT_FIX}"
        )
    return checkpoint


_KEY = re.compile(r'Parser key "([^"]+)"')
_EXPECTED = re.compile(r"Expected a (.+?)(?:\. Got value: (.*))?$")
_NOISE = ("Expected a <class 'NoneType'>", "Given value", "Subtypes:", "Errors:", "Does not validate", "- Problem")


def parser_error(text: str, subcommand: str | None) -> ArgumentError:
    """One line for the config parser's report ``text``: the dotted key, the value, what is allowed and the fix."""
    helper = f"`lightning-adapt {subcommand or 'fit'} --help` lists every option"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    keys = [k for k in _KEY.findall(text) if k != "init_args"]
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
    for line in lines:
        found = _EXPECTED.search(line.lstrip("- "))
        if found is None or "NoneType" in found.group(1):
            continue
        allowed = found.group(1)
        choices = re.fullmatch(r"typing\.Literal\[(.*)\]", allowed)
        allowed = f"one of {choices.group(1)}" if choices else re.sub(r"<class '([\w.]+)'>", r"\1", allowed)
        value = found.group(2) if found.group(2) is not None else given
        name = ".".join(keys) if keys else "a value"
        return ArgumentError(f"{name}={value!r} is not allowed: expected {allowed}. Fix: set {name} to that; {helper}.")
    useful = [line for line in lines if not any(noise in line for noise in _NOISE)]
    summary = "; ".join(useful[:3]) or text.strip()
    return ArgumentError(f"{summary.rstrip('.')}. Fix: check the spelling and the value; {helper}.")
