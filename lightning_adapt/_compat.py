"""The first release's module paths, kept importable after the move to a folder per concept.

``import lightning_adapt.lora`` (and recipes naming ``lightning_adapt.plugins.paged_optimizer...``) still
work: each old path is an alias module that reads its names from the new homes, with a
``DeprecationWarning`` saying where the module went. Nothing in the package imports an old path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

#: old module path -> the new modules its names now live in (the first is "the" new home).
MOVED: dict[str, tuple[str, ...]] = {
    "lightning_adapt.lora": ("lightning_adapt.adapters.lora", "lightning_adapt.layers"),
    "lightning_adapt.targeting": ("lightning_adapt.adapters.targeting", "lightning_adapt.naming"),
    "lightning_adapt.inject": ("lightning_adapt.adapters.inject", "lightning_adapt.export.peft_format"),
    "lightning_adapt.checkpoint": ("lightning_adapt.adapters.checkpoint",),
    "lightning_adapt.quant": ("lightning_adapt.quantize", "lightning_adapt.layers"),
    "lightning_adapt.merged_state": ("lightning_adapt.export.merged_state",),
    "lightning_adapt.peft_format": ("lightning_adapt.export.peft_format",),
    "lightning_adapt.safetensors_io": ("lightning_adapt.export.safetensors_io",),
    "lightning_adapt.memory_shapes": ("lightning_adapt.memory.shapes",),
    "lightning_adapt.estimate_cli": ("lightning_adapt.memory.cli",),
    "lightning_adapt.plugins": ("lightning_adapt.callbacks",),
    "lightning_adapt.plugins.paged_optimizer": ("lightning_adapt.callbacks.paged_optimizer",),
}


class _AliasModule(types.ModuleType):
    """A module whose attributes are read from the new homes, in order."""

    def __init__(self, name: str, homes: Sequence[str]) -> None:
        super().__init__(name, f"Moved: see {homes[0]}.")
        self.__path__: list[str] = []  # a package, so that `old.sub` aliases resolve too
        self._homes = tuple(homes)

    def __getattr__(self, attr: str) -> object:
        for home in self._homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {self._homes[0]}) has no attribute {attr!r}")


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        homes = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {homes[0]}; import it from there.", DeprecationWarning, stacklevel=3)
        return _AliasModule(spec.name, homes)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
