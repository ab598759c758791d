"""The project's user-facing errors. Imports nothing of the project (only the standard library): every layer may
raise them.

Every error a user can fix by changing a configuration value derives from :class:`ConfigError`
(a ``ValueError``). The ``lightning-adapt`` command prints such an error as one line and exits 2; any
other exception keeps its traceback, since it is a bug (ours or a library's), not a bad setting.
Each message names the argument, the value, what is allowed and the fix.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "ArgumentError",
    "BaseMismatchError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "LoadError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "NonFiniteError",
    "TargetingError",
    "require",
]


class ConfigError(ValueError):
    """A configuration value the user can fix; the message says which, what is allowed and how."""


class TargetingError(ConfigError):
    """A module-name entry that selects nothing, or selects a module that cannot be adapted."""


class ExportError(ConfigError):
    """An export that cannot be written as asked (target not empty, missing source, bad size...)."""


class DataError(ConfigError):
    """A data argument that cannot be used (missing file, unreadable corpus, tokenizer without template)."""


class ModelNotFoundError(ConfigError):
    """A model argument that names neither a packaged model nor a usable local directory."""


class LoadError(ConfigError):
    """Pretrained weights that do not fit the model: missing or corrupt file, missing tensor, wrong shape."""


class BaseMismatchError(ConfigError, RuntimeError):
    """An adapter-only checkpoint made on another base model (or with other adapter shapes)."""


class MissingDependencyError(ConfigError, ImportError):
    """An optional dependency that a chosen setting needs is not installed; the message says what to install."""


class ArgumentError(ConfigError):
    """A command-line flag or recipe value the config parser rejects (unknown key, wrong type, not allowed)."""


class CheckpointError(ConfigError):
    """A ``--ckpt_path`` that is missing, not a file, truncated, not a Lightning checkpoint, or unsafe to load."""


class NonFiniteError(ConfigError, RuntimeError):
    """A NaN/Inf loss or gradient during training (``guard: action: stop``); names the step and the parameter."""


def require(module: str, fix: str) -> ModuleType:
    """Import and return the optional dependency ``module``; a :class:`MissingDependencyError` saying ``fix``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(fix) from err
