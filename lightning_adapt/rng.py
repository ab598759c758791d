"""The process's global random streams as a checkpoint-safe value: capture them, put them back.

Dropout masks, random augmentations and anything else drawn from the global generators of torch (CPU and
every CUDA device), NumPy and Python's :mod:`random` continue where they stood only if these states travel
with the checkpoint. Lightning saves none of them. The captured value holds only tensors, ints, floats and
strings (NumPy's key array becomes an int64 tensor), so a checkpoint holding it still loads with
``torch.load(..., weights_only=True)``. Imports nothing else of ours.

Example:
    >>> state = capture_rng_states()
    >>> a = torch.rand(2)
    >>> restore_rng_states(state)
    >>> torch.equal(torch.rand(2), a)
    True
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["capture_rng_states", "restore_rng_states"]


def capture_rng_states() -> dict[str, Any]:
    """The global random states: ``torch`` (CPU byte tensor), ``cuda`` (one per visible device, empty without
    CUDA), ``python`` (:func:`random.getstate`, as lists) and ``numpy`` (the legacy MT19937 state, if NumPy is
    installed)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def restore_rng_states(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_states` captured. CUDA states are restored per device when the
    process sees as many devices as were saved (a resume on another device count keeps the current ones)."""
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda", []))
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    np = _numpy()
    if np is not None and "numpy" in state:
        saved = state["numpy"]
        keys = saved["keys"].numpy().astype("uint32")
        np.random.set_state((saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # NumPy is optional for torch; without it there is no NumPy stream to keep
        return None
    return numpy
