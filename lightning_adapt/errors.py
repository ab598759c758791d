"""The project's user-facing errors. Imports nothing of the project (only the standard library): every layer may
raise them.

Every error a user can fix by changing a configuration value derives from :class:`ConfigError`
(a ``ValueError``). The ``lightning-adapt`` command prints such an error as one line and exits 2; any
other exception keeps its traceback, since it is a bug (ours or a library's), not a bad setting.
Each message names the setting, the value, what is allowed and the fix.

The setting is named through the error, not by the code that checks it: a function that checks one of its own
parameters raises with that parameter's name in :attr:`ConfigError.setting` (its message writes :data:`SETTING`
where the name goes), and the layer that took the value from the user renames it on the way out
(:class:`setting_names`). So ``export_model(dirpath=...)`` says ``dirpath='out'``, ``lightning-adapt export``
says ``--output='out'``, and nothing below the CLI knows the flag::

    raise ExportError(f"{SETTING}={str(target)!r} is a file. Fix: choose a directory path.", setting="dirpath")

    with setting_names(dirpath="--output"):
        export_model(module, output)
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType, TracebackType
from typing import Any

__all__ = [
    "SETTING",
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
    "setting_names",
]

#: Where a message names its setting; read as :attr:`ConfigError.setting`.
SETTING = "{setting}"


class ConfigError(ValueError):
    """A configuration value the user can fix; the message says which, what is allowed and how.

    Args:
        message: the whole message; :data:`SETTING` in it reads as ``setting``.
        setting: the name of the value at fault, as the raising code knows it (its parameter's name); the layer
            that took the value from the user may rename it (:class:`setting_names`). ``None``: the message
            names everything itself.
    """

    def __init__(self, message: str = "", *, setting: str | None = None) -> None:
        if setting is None and SETTING in message:
            raise TypeError(f"{type(self).__name__}: the message names its setting ({SETTING}) but none is given")
        super().__init__(message)
        self.setting = setting

    def __str__(self) -> str:
        text = super().__str__()
        return text if self.setting is None else text.replace(SETTING, self.setting)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled (a rank's error sent to the others) with its setting
        return _restore, (type(self), self.args[0] if self.args else "", self.setting), self.__dict__


def _restore(kind: type[ConfigError], message: str, setting: str | None) -> ConfigError:
    return kind(message, setting=setting)


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


class setting_names(contextlib.ContextDecorator):
    """Within the block (or the decorated function), a :class:`ConfigError` about a setting in ``names`` names it
    as the user knows it: ``with setting_names(dirpath="--output"):``. Renames nest (inner first)."""

    def __init__(self, **names: str) -> None:
        self.names = names

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if isinstance(error, ConfigError) and error.setting in self.names:
            error.setting = self.names[error.setting]


def require(module: str, fix: str) -> ModuleType:
    """Import and return the optional dependency ``module``; a :class:`MissingDependencyError` saying ``fix``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(fix) from err
