"""Checks of what a user hands the CLI before anything runs: a ``--ckpt_path``, and the parser's own errors.

:func:`read_checkpoint` is the one way the CLI opens a checkpoint: it refuses a missing path, a directory,
a file that is not a (complete) PyTorch zip archive, a pickle that needs arbitrary Python objects (loaded
with ``weights_only=True``, so nothing in it runs) and a file without a ``state_dict``, each with one
:class:`~lightning_adapt.errors.CheckpointError`. :func:`parser_error` turns the config parser's report
(a union-type error around the real problem) into one :class:`~lightning_adapt.errors.ArgumentError`.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from lightning_adapt.errors import ArgumentError, CheckpointError, ConfigError, MissingDependencyError

__all__ = [
    "SUBCOMMANDS",
    "check_strategy",
    "last_checkpoint",
    "mesh_sizes",
    "missing_roots",
    "parser_error",
    "quiet_libraries",
    "read_checkpoint",
    "remove_created",
]

#: What ``lightning-adapt`` takes first (LightningCLI's four, the project's own, and the ones main() dispatches).
SUBCOMMANDS = ("fit", "validate", "test", "predict", "export", "chat", "estimate", "inspect", "compare")

_CKPT_FIX = (
    " Fix: pass a .ckpt file written by `lightning-adapt fit` with this recipe "
    "(e.g. <log dir>/checkpoints/epoch=0-step=200.ckpt)."
)


def read_checkpoint(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``; tensors memory-mapped) or raise one clear error.

    Args:
        path: the checkpoint file.
        mmap: map the tensors instead of reading them (a full checkpoint's frozen base is never read in).

    Raises:
        CheckpointError: missing, a directory, not a complete PyTorch zip archive, holding Python objects
            that would need arbitrary code to unpickle, or no ``state_dict``.
    """
    where = f"--ckpt_path={str(path)!r}"
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
    import torch  # here: the parser's messages (``lightning-adapt estimate``) need no torch

    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        detail = f"it would call {found.group(1)}" if found else (str(err).strip().splitlines() or ["?"])[0]
        raise CheckpointError(
            f"{where} holds Python objects that only arbitrary code could rebuild ({detail}); it is refused "
            f"and nothing in it was run (checkpoints load with weights_only=True).{_CKPT_FIX}"
        ) from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{where} is a damaged PyTorch checkpoint ({err}).{_CKPT_FIX}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        kind = f"keys {sorted(map(str, checkpoint))[:5]}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{where} is a PyTorch file but not a Lightning checkpoint (no 'state_dict'; it holds {kind}).{_CKPT_FIX}"
        )
    return checkpoint


def last_checkpoint(folders: Iterable[Path]) -> Path:
    """What ``--ckpt_path last`` means in ``lightning-adapt``: the newest ``last*.ckpt`` in ``folders`` (the checkpoint
    folders of every earlier version of the run: each ``fit`` logs to a new version folder, where Lightning's
    own lookup finds nothing); none there: one :class:`CheckpointError` instead of a silent fresh run."""
    searched = sorted({folder.absolute() for folder in folders})
    found = [f for folder in searched if folder.is_dir() for f in folder.glob("last*.ckpt") if f.is_file()]
    if found:
        return max(found, key=lambda f: (f.stat().st_mtime_ns, str(f)))
    where = ", ".join(str(f) for f in searched[:3]) + (f" (+{len(searched) - 3} more)" if len(searched) > 3 else "")
    raise CheckpointError(
        f"--ckpt_path='last': there is no last checkpoint (last.ckpt) to resume from in {where or 'no folder'}. "
        "Fix: pass a checkpoint file (<log dir>/checkpoints/*.ckpt), or leave --ckpt_path out to start afresh; "
        "a run saves last.ckpt with trainer.callbacks ModelCheckpoint save_last: true (the shipped recipes do)."
    )


#: What other libraries print on every run and the CLI hides, by logger (``None``: a warning) and message start:
#: Lightning's advertising, bitsandbytes' optional CPU kernel (its "Set trust_remote_code=True" advice is wrong
#: here: nothing loads remote code), a deprecation inside Lightning, and LightningCLI's note that ``args`` and
#: ``sys.argv`` are both given (``compare`` parses each recipe's options in-process on purpose).
NOISE: tuple[tuple[str | None, str], ...] = (
    *(
        (name, "💡 Tip: For seamless cloud")
        for name in (
            "lightning.pytorch.utilities.rank_zero",
            "lightning.fabric.utilities.rank_zero",
            "lightning_utilities.core.rank_zero",
        )
    ),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    (None, "`isinstance(treespec, LeafSpec)` is deprecated"),
    (None, "LightningCLI's args parameter is intended to run from within Python"),
)


class _Hide(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_libraries() -> None:
    """Hide :data:`NOISE` (and only it: each by its logger or warning text) for the rest of this CLI process."""
    for logger, start in NOISE:
        if logger is None:
            warnings.filterwarnings("ignore", message=re.escape(start))
        elif not any(isinstance(f, _Hide) and f.start == start for f in logging.getLogger(logger).filters):
            logging.getLogger(logger).addFilter(_Hide(start))


def missing_roots(paths: Iterable[str | Path | None]) -> list[Path]:
    """The topmost folder of each of ``paths`` that does not exist yet: what a run writing there creates."""
    roots = set()
    for given in paths:
        path = Path(given).absolute() if given else None
        if path is None or path.exists():
            continue
        while not path.parent.exists():
            path = path.parent
        roots.add(path)
    return sorted(roots)


def remove_created(roots: Iterable[Path]) -> None:
    """Remove the folders (from :func:`missing_roots`) that a refused run created, so it leaves nothing behind;
    a folder that holds a checkpoint is kept (the run trained before it stopped)."""
    for root in roots:
        if root.is_dir() and not any(root.rglob("*.ckpt")):
            shutil.rmtree(root, ignore_errors=True)


def check_strategy(strategy: str, recipe_keys: Collection[str]) -> None:
    """Refuse, before anything is built, a ``trainer.strategy`` that cannot work with the recipe or this install.

    Args:
        strategy: the strategy's name or class path (``deepspeed_stage_2``, ``lightning.pytorch.strategies...``).
        recipe_keys: the recipe keys set (``paged_optimizer``, ``shard``...).
    """
    if "deepspeed" not in strategy.lower():
        return
    if "paged_optimizer" in recipe_keys:
        raise ConfigError(
            f"paged_optimizer with trainer.strategy={strategy!r}: DeepSpeed builds and owns its optimizer. Fix: "
            "remove paged_optimizer (DeepSpeed's own offload saves optimizer memory), or use strategy ddp or fsdp."
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise MissingDependencyError(
            f"trainer.strategy={strategy!r} needs the deepspeed package, which is not installed. "
            "Fix: `pip install deepspeed`, or use strategy ddp or fsdp."
        )


def mesh_sizes(data_parallel: int | str, tensor_parallel: int | str, devices: int, nodes: int) -> tuple[int, int]:
    """``ModelParallelStrategy``'s two sizes for ``devices`` x ``nodes`` processes: a size left ``"auto"`` is what the
    other leaves (so ``--trainer.devices N`` alone works when ``tensor_parallel_size`` is 1); both ``"auto"``:
    Lightning's own rule (``nodes`` x ``devices``). Raises one :class:`ConfigError` when no whole sizes fit.
    """
    world = devices * nodes
    if data_parallel == "auto" and tensor_parallel == "auto":
        return nodes, devices
    dp = world // max(int(tensor_parallel), 1) if data_parallel == "auto" else int(data_parallel)
    tp = world // max(int(data_parallel), 1) if tensor_parallel == "auto" else int(tensor_parallel)
    if dp > 0 and tp > 0 and dp * tp == world:
        return dp, tp
    raise ConfigError(
        f"trainer.strategy: ModelParallelStrategy needs data_parallel_size x tensor_parallel_size = devices x "
        f"num_nodes = {devices} x {nodes} = {world} processes, got data_parallel_size={data_parallel!r}, "
        f"tensor_parallel_size={tensor_parallel!r}. Fix: pass --trainer.strategy.init_args.data_parallel_size=auto "
        f"(derived: {world} / tensor_parallel_size; FSDP2 with shard: needs tensor_parallel_size=1), or sizes "
        f"whose product is {world}."
    )


_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS = re.compile(r"Problem with given class_path '([^']+)':\n\s*(.*)")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"Expected a (.+?)(?:\. Got value: (.*))?$")
_GIVEN = re.compile(r"^\s*Given value: (.*)$", re.MULTILINE)
_NESTED = re.compile(r"NestedArg\(key='[^']*', val=(.*)\)")
_LITERAL = re.compile(r"typing\.Literal\[(.*)\]")


def parser_error(text: str, subcommand: str | None) -> ArgumentError:
    """One line for the config parser's report ``text``: the dotted key, the value, what is allowed and the fix.

    The parser wraps a recipe key's problem in the report of each type the key could have (``<class 'NoneType'>``
    included); this keeps the innermost key, the value given and the allowed values, and drops the rest.
    """
    helper = f"`lightning-adapt {subcommand or 'fit'} --help` lists every option"
    keys = [k for k in _KEY.findall(text) if k != "init_args"]
    name = ".".join(keys)
    for rule in (_subcommand, _required, _unrecognized, _config_file, _not_accepted, _class_problem, _not_allowed):
        message = rule(text, name, subcommand)
        if message is not None:
            return ArgumentError(f"{message} Fix: {_FIXES[rule]}; {helper}.")
    useful = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(" ")]
    return ArgumentError(f"{'; '.join(useful[:2]).rstrip('.')}. Fix: check the spelling and the value; {helper}.")


def _subcommand(text: str, name: str, subcommand: str | None) -> str | None:
    found = re.search(r"invalid choice: '([^']*)'", text)
    if found is None and not text.startswith('expected "subcommand"'):
        return None
    given = f"{found.group(1)!r} is not a subcommand" if found else "no subcommand given"
    return f"{given}: lightning-adapt takes {', '.join(SUBCOMMANDS)}."


def _required(text: str, name: str, subcommand: str | None) -> str | None:
    found = re.search(r"the following arguments are required: (.*)", text)
    if found is None:
        return None
    flags = ", ".join("--" + flag.strip().split(".", 1)[-1] for flag in found.group(1).split(","))
    return f"`lightning-adapt {subcommand}` needs {flags}."


def _unrecognized(text: str, name: str, subcommand: str | None) -> str | None:
    found = re.search(r"unrecognized arguments: (.*)", text) or re.search(r"does not accept option '([^']+)'", text)
    if found is None:
        return None
    return f"{found.group(1)} is not an option of `lightning-adapt {subcommand or ''}`.".replace(" `.", "`.")


def _config_file(text: str, name: str, subcommand: str | None) -> str | None:
    if name == "config":
        return f"--config: {text.split(':', 1)[1].strip().rstrip('.')}."
    if text.startswith("Problems parsing config"):
        detail = " ".join(text.split(":", 1)[1].split())
        return f"--config is not valid YAML ({detail})."
    return None


def _not_accepted(text: str, name: str, subcommand: str | None) -> str | None:
    option, owner = _NOT_ACCEPTED.search(text), _CLASS.search(text)
    if option is None:
        return None
    where = f" of {owner.group(1)}" if owner else ""
    return f"{name}.{option.group(1)} is not an option{where}.".lstrip(".")


def _class_problem(text: str, name: str, subcommand: str | None) -> str | None:
    owner = _CLASS.search(text)
    if owner is None or owner.group(2).startswith("Parser key"):
        return None
    return f"{name}: class_path {owner.group(1)!r} cannot be used ({owner.group(2).strip().rstrip('.')})."


def _not_allowed(text: str, name: str, subcommand: str | None) -> str | None:
    found = [m for line in text.splitlines() if (m := _EXPECTED.search(line.strip().lstrip("- ")))]
    types = [m.group(1) for m in found if "NoneType" not in m.group(1) and not m.group(1).startswith("path but")]
    if not types:
        return None
    literals = [lit.group(1) for t in types if (lit := _LITERAL.fullmatch(t))]
    names = [re.sub(r"<class '([\w.]+)'>", r"\1", t) for t in types if not _LITERAL.fullmatch(t)]
    allowed = " or ".join([*names, *(["one of " + ", ".join(literals)] if literals else [])])
    value = next((m.group(2) for m in found if m.group(2) is not None), None)
    if value is None:
        given = _GIVEN.findall(text)
        value = given[0].strip() if given else "?"
        nested = _NESTED.fullmatch(value)
        value = nested.group(1).strip("'\"") if nested else value
    return f"{name or 'a value'}={value!r} is not allowed: expected {allowed}."


_FIXES = {
    _subcommand: "e.g. `lightning-adapt fit --config recipes/sentiment/lora.yaml`",
    _required: "pass it (for --ckpt_path: a .ckpt written by `lightning-adapt fit` with this recipe)",
    _unrecognized: "check the spelling (nested keys are dotted, e.g. --lora.init_args.r=8)",
    _config_file: "pass an existing recipe YAML, e.g. --config recipes/sentiment/lora.yaml",
    _not_accepted: "remove it or correct its spelling",
    _class_problem: "give an importable class (e.g. lightning_adapt.LoRAInjectionCallback)",
    _not_allowed: "use one of the allowed values",
}
