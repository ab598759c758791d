"""Run structural model transforms right after ``configure_model``, in a fixed order.

Lightning calls ``Callback.setup`` before ``LightningModule.configure_model`` and restores checkpoint
weights right after it, so the only point where a transform sees the finished network *and* precedes the
weight restore, ``configure_optimizers`` and the precision plugin is the end of ``configure_model``. Each
callback registers a transform with a priority (quantization before LoRA injection, whatever order the
callbacks were listed in); the first registration wraps the instance's ``configure_model`` with a plain
bound method (``functools.wraps`` would set ``__wrapped__``, which makes Lightning's ``is_overridden``
skip the hook) and teardown puts the original back.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch.nn as nn

Transform = Callable[[nn.Module], object]

#: Priorities: lower runs first.
QUANTIZE = 0
INJECT_LORA = 10

_ATTR = "_lightning_adapt_transforms"
_ORIGINAL = "_lightning_adapt_configure_model"


def register_transform(module: nn.Module, name: str, priority: int, fn: Transform) -> None:
    """Run ``fn(module)`` after ``module.configure_model()``; registering ``name`` again replaces it.

    Transforms must be idempotent: Lightning calls ``configure_model`` on every fit/validate/test/predict.
    """
    transforms: dict[str, tuple[int, Transform]] = module.__dict__.setdefault(_ATTR, {})
    transforms[name] = (priority, fn)
    if _ORIGINAL in module.__dict__:
        return
    original: Callable[[], None] = getattr(module, "configure_model")  # noqa: B009
    module.__dict__[_ORIGINAL] = original

    def configure_model(self: Any) -> None:
        original()
        run_transforms(self)

    setattr(module, "configure_model", types.MethodType(configure_model, module))  # noqa: B010


def run_transforms(module: nn.Module) -> None:
    """Apply the registered transforms now, lowest priority first."""
    for _, fn in sorted(module.__dict__.get(_ATTR, {}).values(), key=lambda item: item[0]):
        fn(module)


def unregister_transform(module: nn.Module, name: str) -> None:
    """Forget ``name``; once none is left, restore the module's own ``configure_model``."""
    transforms: dict[str, Any] = module.__dict__.get(_ATTR, {})
    transforms.pop(name, None)
    if not transforms and _ORIGINAL in module.__dict__:
        del module.__dict__[_ORIGINAL]
        module.__dict__.pop("configure_model", None)
        module.__dict__.pop(_ATTR, None)
