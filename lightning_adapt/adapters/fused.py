"""Fused LoRA input projections: sibling layers that read the same tensor share one ``A`` matmul.

The q/k/v projections of an attention block (gate/up of a gated MLP) apply their own ``A`` to the same
input. Fused, the first of them to run computes every sibling's projection at once and the others take
their slice::

    [x A_q^T | x A_k^T | x A_v^T] = x @ [A_q; A_k; A_v]^T            (tokens, r_q + r_k + r_v)

One ``(tokens, in) x (in, 3r)`` matmul instead of three ``(in, r)`` ones, in backward one ``(3r, in)``
matmul for ``dx`` and none of the sums of three ``dx`` terms. Weights, state-dict keys, checkpoints and
the PEFT export are unchanged: each layer keeps its own ``lora_A`` / ``lora_B``; only the computation is
shared, and autograd splits the gradients back per layer.

Which layers are siblings is decided twice: statically by name (children of one module whose leaf names form
a group of :data:`DEFAULT_GROUPS`) and at run time by identity: a slice is reused only for the *same tensor
object* (same version, same grad / autocast mode, unchanged ``A`` weights); any other call computes afresh,
so cross-attention (``q`` reads another tensor than ``k``/``v``) stays correct. The stored slices are
dropped once every sibling has taken its own, and whenever the parent module is entered (a forward
pre-hook), so no slice outlives the parent's forward pass that made it (activation checkpointing reruns
that forward, and so recomputes them). A group whose ``lora_A`` is wrapped or hooked (FSDP1 gives each
``lora_A`` a unit of its own) runs unfused, since the fused matmul reads the weights without calling them.

Exactness: with inactive dropout (``p = 0``, or eval) the values equal the unfused ones up to the
summation order of one matmul (measured bit-identical forward on this CPU, gradients within 1e-6). With
active dropout, ``dropout="per_layer"`` (default) runs each layer unfused, drawing its own mask as before;
``dropout="shared"`` draws one mask per group for all its layers (faster, but not the unfused distribution
jointly: q/k/v see the same dropped features). Under ``torch.compile`` the plain per-layer path is traced
(the identity cache is an eager-mode optimisation; the compiler sees a static graph without graph breaks).

Example:
    >>> groups = fuse_lora_projections(model)  # doctest: +SKIP
    >>> groups[0]  # doctest: +SKIP
    ('model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj')
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapt.layers import is_plain_linear

__all__ = [
    "DEFAULT_GROUPS",
    "FusableLayer",
    "FusedDropout",
    "SharedProjection",
    "fuse_lora_projections",
    "fused_groups",
]

#: Leaf names of sibling layers that read one input in the common architectures.
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, OPT, Phi-3 (separate q/k/v)
    ("gate_proj", "up_proj"),  # gated MLPs (Llama, Mistral, Qwen)
    ("query", "key", "value"),  # BERT, RoBERTa, ViT
    ("wq", "wk", "wv"),  # Meta-style Llama
    ("w1", "w3"),  # Meta-style and Mixtral gated MLPs
    ("to_q", "to_k", "to_v"),  # diffusers attention
    ("q", "k", "v"),  # T5
)
FusedDropout = Literal["per_layer", "shared"]


@runtime_checkable
class FusableLayer(Protocol):
    """What fusion needs of a layer: :class:`~lightning_adapt.adapters.lora.LoRALinear`'s interface. (A protocol,
    not an import: :mod:`.inject` imports this module, and the import chain must stay short.)"""

    lora_A: nn.Linear
    lora_dropout: nn.Module
    r: int
    merged: bool
    training: bool
    shared_projection: Any

    @property
    def use_dora(self) -> bool: ...

    @property
    def in_features(self) -> int: ...

    def own_projection(self, x: torch.Tensor) -> torch.Tensor: ...


def _fusable(model: nn.Module) -> list[tuple[str, FusableLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FusableLayer)]


@dataclass
class _Entry:
    """The shared projections of one input, until every sibling has taken its slice."""

    source: weakref.ref[torch.Tensor]
    modes: tuple[Any, ...]
    weights: list[torch.Tensor]  # the A weights the slices were made from, and their versions then
    versions: list[int]
    slices: tuple[torch.Tensor, ...]
    pending: set[int] = field(default_factory=set)

    def serves(self, x: torch.Tensor, modes: tuple[Any, ...], index: int) -> bool:
        """Whether the slices are what ``x`` would give now: same tensor object and version, same grad /
        autocast / train mode, ``A`` not stepped or loaded since (both bump ``_version``), slice not taken."""
        if self.source() is not x or index not in self.pending or self.modes != modes:
            return False
        return [w._version for w in self.weights] == self.versions


class SharedProjection:
    """The fused ``A`` projections of sibling LoRA layers that read the same input.

    Installed on each member as ``layer.shared_projection``; ``LoRALinear.lora_input`` asks it for its
    slice. Holds no parameters and no state that a checkpoint would need; pickling and ``deepcopy`` drop the
    cached slices.

    Args:
        members: The sibling layers, in the order their slices are laid out (plain LoRA, one input width).
        parent: Their common parent; a forward pre-hook on it drops the cached slices at each of its calls.
        dropout: ``"per_layer"``: with active dropout each layer runs unfused with its own mask (exact);
            ``"shared"``: one mask per group (one draw of the first member's dropout) for all members.
    """

    def __init__(
        self, members: Sequence[FusableLayer], parent: nn.Module | None = None, dropout: FusedDropout = "per_layer"
    ) -> None:
        self.members = list(members)
        self.dropout = dropout
        self._entry: _Entry | None = None
        self._hook = None if parent is None else parent.register_forward_pre_hook(self.forget)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_entry": None}  # a cached slice belongs to one forward pass

    def forget(self, *_: object) -> None:
        """Drop the cached slices (run before each forward of the parent module)."""
        self._entry = None

    def remove(self) -> None:
        """Detach from the parent module; the members run unfused once their ``shared_projection`` is unset."""
        if self._hook is not None:
            self._hook.remove()
        self._entry = None

    def project(self, layer: FusableLayer, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s ``A · dropout(x)``: its slice of the group's projection of ``x``."""
        if torch.compiler.is_compiling() or layer not in self.members or self._unfused(layer) or not self._plain():
            return layer.own_projection(x)
        index = self.members.index(layer)
        modes = self._modes(x)
        entry = self._entry
        if entry is None or not entry.serves(x, modes, index):
            entry = self._entry = self._compute(x, modes)
        entry.pending.discard(index)
        if not entry.pending:  # every sibling has its slice: keep nothing past this forward pass
            self._entry = None
        return entry.slices[index]

    def _plain(self) -> bool:
        # The fused matmul reads each lora_A.weight without calling lora_A: only sound while lora_A is a plain
        # Linear without hooks (FSDP1 wraps lora_A in a unit of its own; FSDP2 on lora_A would gather in a hook).
        return all(is_plain_linear(m.lora_A) for m in self.members)

    def _unfused(self, layer: FusableLayer) -> bool:
        dropout = layer.lora_dropout
        active = layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0
        return active and self.dropout == "per_layer"

    def _modes(self, x: torch.Tensor) -> tuple[Any, ...]:
        device = x.device.type
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        version = -1 if x.is_inference() else x._version  # inference tensors have no version counter
        return (version, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, self.members[0].training)

    def _compute(self, x: torch.Tensor, modes: tuple[Any, ...]) -> _Entry:
        first = self.members[0]
        weights = [m.lora_A.weight for m in self.members]
        x_lora = x.to(weights[0].dtype)
        if self.dropout == "shared":
            x_lora = first.lora_dropout(x_lora)
        projected = F.linear(x_lora, torch.cat(weights))
        slices = tuple(projected.split([m.r for m in self.members], dim=-1))
        active = {i for i, m in enumerate(self.members) if not m.merged}
        return _Entry(weakref.ref(x), modes, weights, [w._version for w in weights], slices, active)


def _eligible(layer: FusableLayer) -> bool:
    return not layer.use_dora  # DoRA's update needs W x and its own A x: it keeps its own path


def fuse_lora_projections(
    model: nn.Module, groups: Sequence[Sequence[str]] = DEFAULT_GROUPS, dropout: FusedDropout = "per_layer"
) -> list[tuple[str, ...]]:
    """Fuse the ``A`` projections of sibling LoRA layers of ``model`` (in place; replaces any earlier fusion).

    Siblings are plain-LoRA children of one module whose leaf names form one of ``groups`` (at least two
    present, same input width, same adapter dtype). ``groups=()`` removes every fusion.

    Args:
        model: A model holding :class:`~lightning_adapt.adapters.lora.LoRALinear` layers.
        groups: Leaf-name groups of layers that read the same input.
        dropout: See :class:`SharedProjection`.

    Returns:
        The dotted names of each fused group, in model order.
    """
    for _, layer in _fusable(model):
        if isinstance(layer.shared_projection, SharedProjection):
            layer.shared_projection.remove()
        layer.shared_projection = None
    fused: list[tuple[str, ...]] = []
    for parent_name, parent in model.named_modules():
        children = {name: child for name, child in parent.named_children() if isinstance(child, FusableLayer)}
        for group in groups:
            names = [n for n in group if n in children and _eligible(children[n])]
            layers = [children[n] for n in names]
            if len(layers) < 2 or len({(m.in_features, m.lora_A.weight.dtype) for m in layers}) > 1:
                continue
            shared = SharedProjection(layers, parent, dropout)
            for layer in layers:
                layer.shared_projection = shared
            fused.append(tuple(f"{parent_name}.{n}" if parent_name else n for n in names))
    return fused


def fused_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The dotted names of each fused group of ``model`` (empty when nothing is fused)."""
    names = {id(layer): name for name, layer in _fusable(model)}
    seen: dict[int, tuple[str, ...]] = {}
    for _, layer in _fusable(model):
        shared = layer.shared_projection
        if isinstance(shared, SharedProjection) and id(shared) not in seen:
            seen[id(shared)] = tuple(names.get(id(m), "?") for m in shared.members)
    return list(seen.values())
