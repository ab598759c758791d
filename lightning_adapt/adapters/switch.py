"""Adapters off for a while: the base model's own forward, with nothing moved or copied. Pure torch.

Preference tuning (DPO, IPO) needs the log-probabilities of a frozen reference. With LoRA or QLoRA the reference
is the base itself: :func:`adapters_disabled` switches every LoRA wrapper of ``model`` off, of every kind
(:class:`~lightning_adapt.adapters.lora.LoRALinear` on float, 4-bit and 8-bit bases, DoRA included; convs and
embeddings, :mod:`.kinds`; ``nn.MultiheadAttention`` and its ``out_proj``, :mod:`.attention`;
``target_parameters``, :mod:`.parameters`), so one copy of the base serves both the policy and the reference.

How: every wrapper's forward already skips its update when ``merged`` is set (the base then holds it). The context
sets that flag on the wrappers that are not merged and clears it on exit, so inside it each wrapper computes exactly
its base layer's forward, bit for bit, with no weight written and no module swapped (hooks, FSDP units and
compiled blocks see the same modules). Adapters off is the original model unless an initialisation changed the base
(PiSSA, OLoRA, LoftQ: :func:`base_is_original`). A merged wrapper is refused: its base weight holds ``W + ΔW``, and the
base alone could only come back within rounding.

Example:
    >>> layer = LoRALinear(nn.Linear(4, 2), r=2, alpha=4.0)  # doctest: +SKIP
    >>> with adapters_disabled(layer):  # doctest: +SKIP
    ...     torch.equal(layer(x), layer.base_layer(x))
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightning_adapt.adapters.delta import Foldable
from lightning_adapt.errors import ConfigError

__all__ = ["adapter_wrappers", "adapters_disabled", "base_is_original", "has_adapters"]

_MARK = "_lightning_adapt_adapters_disabled"  # set beside ``merged`` while disabled: not a real merge


def adapter_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(dotted name, wrapper)`` of every LoRA wrapper of any kind in ``model``, inner ones included (an adapted
    attention's ``out_proj``), in registration order."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Module) and isinstance(module, Foldable) and hasattr(module, "merged"):
            found.append((name, module))
    return found


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds at least one LoRA wrapper."""
    return bool(adapter_wrappers(model))


def base_is_original(model: nn.Module) -> bool:
    """Whether every wrapper's base layer is the original weight: not after PiSSA / OLoRA / LoftQ initialisations,
    which store ``W - scaling·B₀A₀`` there (``changes_base``), so that adapters off is not the original model."""
    return not any(getattr(m, "changes_base", False) for _, m in adapter_wrappers(model))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base inside the block: every LoRA wrapper computes its base layer's output alone.

    Mutates only each wrapper's ``merged`` flag, restored on exit (an exception included); re-entering is harmless.
    A model without adapters runs as it is. Gradients still flow where the base has trainable parameters; wrap the
    block in ``torch.no_grad()`` for a reference.

    Raises:
        ConfigError: an adapter of ``model`` is merged into its base (the base weights are not available).
    """
    wrappers = adapter_wrappers(model)
    merged = [name for name, m in wrappers if getattr(m, "merged") and not getattr(m, _MARK, False)]  # noqa: B009
    if merged:
        shown = ", ".join(merged[:3]) + (f" (+{len(merged) - 3} more)" if len(merged) > 3 else "")
        raise ConfigError(
            f"adapters_disabled: {len(merged)} adapter(s) are merged into their base ({shown}), so the base model's "
            "weights are not there to run. Fix: call unmerge() on them first, or use a frozen copy of the base."
        )
    switched = [m for _, m in wrappers if not getattr(m, "merged")]  # noqa: B009
    for module in switched:
        setattr(module, "merged", True)  # noqa: B010
        setattr(module, _MARK, True)
    try:
        yield model
    finally:
        for module in switched:
            setattr(module, "merged", False)  # noqa: B010
            delattr(module, _MARK)
