"""The one rule for "which modules does this name select": pure Python, no torch.

An entry (of ``target_modules``, ``exclude_modules``, ``modules_to_save``, ``skip_modules``...) is

* a plain dotted name (``^[\\w.]+$``, e.g. ``"q_proj"`` or ``"layers.0.mlp.up_proj"``): it selects a
  module whose dotted name equals it or ends with ``"." + entry`` (whole components only, so ``"proj"``
  does not select ``q_proj``);
* anything else: a regular expression that must *full-match* the dotted name (``r".*\\.(q|v)_proj"``).

An entry that selects nothing is an error (:func:`check_entries`), with one message for every argument.

Example:
    >>> select(["a.q_proj", "a.k_proj", "b.q_proj"], ["q_proj"], setting="target_modules")
    ['a.q_proj', 'b.q_proj']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from lightning_adapt.errors import SETTING, TargetingError

__all__ = ["check_entries", "matches", "select", "under"]

_PLAIN_NAME = re.compile(r"^[\w.]+$")
_SHOWN = 40


def matches(name: str, entry: str) -> bool:
    """Whether the dotted module ``name`` is selected by ``entry`` (rules: module docstring)."""
    if _PLAIN_NAME.match(entry):
        return name == entry or name.endswith("." + entry)
    return re.fullmatch(entry, name) is not None


def under(name: str, entries: Iterable[str]) -> bool:
    """Whether ``name`` or one of its parents is selected by an entry (a selected module selects its insides)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(matches(prefix, entry) for prefix in prefixes for entry in entries)


def _describe(candidates: Sequence[str]) -> str:
    if not candidates:
        return "none"
    leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    shown = ", ".join(leaves[:_SHOWN]) + (f", ... ({len(leaves)} in all)" if len(leaves) > _SHOWN else "")
    return f"leaf names [{shown}]; e.g. full names {list(candidates[:3])}"


def check_entries(
    entries: Sequence[str], names: Sequence[str], setting: str, candidates: Sequence[str], what: str = "module"
) -> None:
    """Raise one :class:`TargetingError` for the entries of ``setting`` that are not valid or select no name.

    Args:
        entries: the user's entries.
        names: every module name an entry may select.
        setting: the setting the entries come from: the error's :attr:`~lightning_adapt.errors.ConfigError.setting`
            (e.g. ``"target_modules"``).
        candidates: the names worth suggesting (e.g. the linear layers), shown in the message.
        what: what the names are (``"module"``, ``"parameter"``), for the message.
    """
    for entry in entries:
        try:
            re.compile(entry)
        except re.error as err:
            raise TargetingError(
                f"{SETTING}={list(entries)!r}: {entry!r} is not a valid regular expression ({err}). "
                "Fix: use a whole dotted module name, a '.suffix', or a full-match regex.",
                setting=setting,
            ) from err
    unmatched = [entry for entry in entries if not any(matches(name, entry) for name in names)]
    if unmatched:
        raise TargetingError(
            f"{SETTING}={list(entries)!r}: {unmatched!r} match no {what} in the model. Candidates: "
            f"{_describe(candidates)}. Fix: use a whole dotted name (exact or '.suffix') or a full-match regex.",
            setting=setting,
        )


def select(names: Sequence[str], entries: Sequence[str], setting: str) -> list[str]:
    """The ``names`` selected by ``entries``, in order; an entry that selects none is an error."""
    check_entries(entries, names, setting, names)
    return [name for name in names if any(matches(name, entry) for entry in entries)]
