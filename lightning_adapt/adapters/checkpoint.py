"""Adapter-only state dicts through state-dict hooks: small checkpoints that resume exactly. Pure torch.

:func:`install_adapter_only_state` registers three hooks on a module whose base is frozen:

* a ``state_dict`` post-hook drops the frozen base (frozen parameters and every key of a quantized layer,
  including bitsandbytes' quant-state keys, which ``Linear4bit`` cannot load back) and adds a fingerprint
  of that base under :data:`FINGERPRINT_KEY`;
* a ``load_state_dict`` pre-hook pops the fingerprint and refuses a checkpoint made on another base
  (different frozen names/shapes, or different frozen values), and names adapter shape mismatches;
* a ``load_state_dict`` post-hook removes exactly the known frozen keys from ``missing_keys``, so the
  trainable keys stay strict.

Buffers (e.g. running statistics) are kept: they are small and change during training.
Frozen keys come from ``state_dict(keep_vars=True)``, so wrapper prefixes (activation checkpointing)
are handled.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_adapt.errors import BaseMismatchError
from lightning_adapt.layers import adapter_param_ids, frozen_state_keys

__all__ = [
    "FINGERPRINT_KEY",
    "BaseMismatchError",
    "frozen_keys",
    "full_state_dict",
    "install_adapter_only_state",
]

# No dot: torch.distributed.checkpoint (FSDP2 saves) resolves every dotted key to a module attribute.
FINGERPRINT_KEY = "lightning_adapt_base_fingerprint"
_STATE_ATTR = "_lightning_adapt_adapter_state"


def frozen_keys(module: nn.Module) -> list[str]:
    """State-dict keys of the frozen base: frozen parameters and the weight/quant-state keys of quantized layers."""
    with full_state_dict(module):  # our own save hook must not hide the keys we are looking for
        state = module.state_dict(keep_vars=True)
        quantized = frozen_state_keys(module)
    return [
        key
        for key, value in state.items()
        if (isinstance(value, nn.Parameter) and not value.requires_grad) or key in quantized
    ]


def base_fingerprint(state: dict[str, Any], keys: list[str]) -> torch.Tensor:
    """``[structure hash, value checksum]`` of the frozen tensors (float64, computed on their device).

    A sharded tensor (FSDP2's ``DTensor``) counts with its global shape and the sum of all its shards (one
    scalar all-reduce each), so every rank gets the same value whatever the world size; call it on all ranks.
    """
    structure = hashlib.sha256()
    checksum = 0.0
    for i, key in enumerate(keys):
        tensor = state.get(key)
        if not isinstance(tensor, torch.Tensor):
            continue
        structure.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        checksum += (i + 1) * _sum(tensor.detach())
    return torch.tensor([int(structure.hexdigest()[:13], 16), checksum], dtype=torch.float64)


_CHUNK = 1 << 22  # elements summed in float64 at a time: a 32 MB temporary, not a float64 copy of the tensor


def _sum(tensor: torch.Tensor) -> float:
    if isinstance(tensor, DTensor):
        total: Any = tensor.double().sum()  # a local shard's copy, then one all-reduce
        return float(total.full_tensor())
    flat = tensor.reshape(-1)
    return sum(float(flat[i : i + _CHUNK].double().sum()) for i in range(0, flat.numel(), _CHUNK))


class _AdapterState:
    def __init__(self, module: nn.Module) -> None:
        self.keys = frozen_keys(module)
        self.enabled = True
        # Lambdas, not bound methods: torch tags each hook with an attribute, which a method refuses.
        self.handles = [
            module.register_state_dict_post_hook(lambda *args: self.on_save(*args)),
            module.register_load_state_dict_pre_hook(lambda *args: self.on_load_pre(*args)),
            module.register_load_state_dict_post_hook(lambda *args: self.on_load_post(*args)),
        ]

    def on_save(self, module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if not self.enabled:
            return
        full = {k: state[prefix + k] for k in self.keys if prefix + k in state}
        state[prefix + FINGERPRINT_KEY] = base_fingerprint(full, self.keys)
        for key in self.keys:
            state.pop(prefix + key, None)

    def on_load_pre(self, module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state.pop(prefix + FINGERPRINT_KEY, None)
        if saved is None and self.enabled:
            _refuse_foreign(module, state, prefix)
        if saved is None or not self.enabled:
            return
        self.enabled = False
        try:
            own = module.state_dict(keep_vars=True)
        finally:
            self.enabled = True
        current = base_fingerprint({k: own[k] for k in self.keys if k in own}, self.keys)
        same_structure = int(saved[0]) == int(current[0])
        same_values = math.isclose(float(saved[1]), float(current[1]), rel_tol=1e-6, abs_tol=1e-6)
        if not (same_structure and same_values):
            what = "values" if same_structure else "layer names/shapes/dtypes"
            raise BaseMismatchError(
                f"this adapter-only checkpoint was trained on a different base model (frozen {what} differ). "
                "Fix: resume with the same base model and the same QuantizeBaseCallback/LoRAInjectionCallback "
                "settings (recipe keys quantize:/lora:) it was trained with, or start a new run without ckpt_path."
            )
        bad = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
        ]
        if bad:
            raise BaseMismatchError(
                f"adapter shapes in the checkpoint do not match the model ({'; '.join(bad[:3])}). "
                "Fix: use the lora: settings (r, target_modules) the checkpoint was trained with."
            )

    def on_load_post(self, module: nn.Module, incompatible: Any) -> None:
        frozen = set(self.keys)
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]


def _refuse_foreign(module: nn.Module, state: dict[str, Any], prefix: str) -> None:
    """A state dict without a fingerprint that holds none of the module's adapter weights and keys it does
    not have is from another recipe (typically full fine-tuning, where the adapted layers' weights sit under
    their unwrapped names): say so, instead of torch's list of missing and unexpected keys."""
    given = {k.removeprefix(prefix) for k in state if k.startswith(prefix)}
    ids = adapter_param_ids(module)
    adapters = [name for name, p in module.named_parameters() if id(p) in ids]
    with full_state_dict(module):
        known = set(module.state_dict(keep_vars=True))
    foreign = sorted(given - known)
    if adapters and foreign and not given & set(adapters):
        raise BaseMismatchError(
            f"this checkpoint holds none of the adapters this recipe trains (e.g. {adapters[0]!r}) and weights its "
            f"model does not have (e.g. {foreign[0]!r}): it was saved by another recipe (full fine-tuning saves "
            "every weight under the plain layer names). Fix: use it with the recipe it was trained with, or pass "
            "a checkpoint of this one."
        )


def install_adapter_only_state(module: nn.Module) -> None:
    """Make ``module.state_dict()`` hold only the trainable part plus a base fingerprint (idempotent).

    Call it after the base is frozen/quantized and adapters are injected: the frozen key set is taken then.
    """
    if _STATE_ATTR in module.__dict__:
        module.__dict__[_STATE_ATTR].keys = frozen_keys(module)
        return
    module.__dict__[_STATE_ATTR] = _AdapterState(module)


@contextmanager
def full_state_dict(module: nn.Module) -> Iterator[None]:
    """Temporarily let ``module.state_dict()`` include the frozen base (e.g. for export)."""
    state = module.__dict__.get(_STATE_ATTR)
    if state is None:
        yield
        return
    state.enabled = False
    try:
        yield
    finally:
        state.enabled = True
