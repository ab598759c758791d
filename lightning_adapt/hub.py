"""Hugging Face Hub ids (``org/name``) resolved to a local snapshot folder, the way ``transformers`` resolves them.

:func:`resolve_hub` calls :func:`huggingface_hub.snapshot_download` for a model or a dataset repository and
returns the snapshot folder (``<cache>/models--org--name/snapshots/<sha>/``), downloading only the files a
load needs: a model's config, safetensors weights, tokenizer, chat template and generation config (never a
pickled ``*.bin`` / ``*.pth``, which could run code when loaded); a dataset's data files. The environment is
read at each call, not at import: ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), ``HF_TOKEN`` (gated and
private repositories) and ``HF_HUB_OFFLINE=1`` (never contact the Hub: the cached snapshot or one error).

Processes started together (DDP / FSDP ranks on one node) resolve the same id: one downloads while the others
wait on a file lock beside the cache, then read the snapshot it left.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from lightning_adapt.errors import SETTING, ModelNotFoundError

__all__ = ["MODEL_FILES", "hub_cache_dir", "is_hub_id", "resolve_hub"]

RepoType = Literal["model", "dataset"]

#: What a model load reads; everything else in a repository (pickles, ONNX, GGUF, other formats) is not fetched.
MODEL_FILES = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.jinja",
]
#: A dataset's data files in the formats :mod:`lightning_adapt.data.sources` reads, and its card / info.
DATASET_FILES = ["*.json", "*.jsonl", "*.csv", "*.tsv", "*.parquet", "*.txt", "*.arrow", "*.md", "*.gz"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_id(value: str) -> bool:
    """``org/name`` with the Hub's characters only, and not an existing local path."""
    return _ID.fullmatch(value) is not None and not Path(value).expanduser().exists()


def hub_cache_dir() -> Path:
    """The Hub cache, from the environment as it is now (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_hub(repo_id: str, *, repo_type: RepoType, revision: str | None, setting: str) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` (``None``: the default branch).

    Args:
        repo_id: ``org/name`` on the Hub.
        repo_type: ``model`` (only :data:`MODEL_FILES`) or ``dataset`` (its data files).
        revision: a branch, tag or commit sha.
        setting: the name errors give the value.

    Raises:
        ModelNotFoundError: not cached while offline (naming the cache folder and the fix), not on the Hub, gated,
            no such revision, or the Hub unreachable with nothing cached.
    """
    from filelock import FileLock  # huggingface_hub's own lock library
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    patterns = MODEL_FILES if repo_type == "model" else DATASET_FILES
    what = f"{SETTING}={repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    # one process of a node downloads; the others wait here, then find the snapshot cached
    with FileLock(cache / f".lightning-adapt-{repo_type}s--{repo_id.replace('/', '--')}.lock"):
        try:
            path = snapshot_download(
                repo_id,
                repo_type=repo_type,
                revision=revision,
                cache_dir=cache,
                allow_patterns=patterns,
                local_files_only=_offline(),
                token=os.environ.get("HF_TOKEN") or None,
            )
        except (RepositoryNotFoundError, GatedRepoError) as err:
            gated = isinstance(err, GatedRepoError)
            reason = "is gated: its terms must be accepted on the Hub" if gated else "is not on the Hub (or is private)"
            raise ModelNotFoundError(
                f"{what}: the {repo_type} {reason}. Fix: check the id, and for a gated or private repository set "
                "HF_TOKEN to a token that may read it.",
                setting=setting,
            ) from None
        except RevisionNotFoundError:
            raise ModelNotFoundError(
                f"{what}: the {repo_type} has no such revision. Fix: use a branch, tag or commit sha it has.",
                setting=setting,
            ) from None
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            raise _not_cached(what, repo_type, cache, offline=_offline(), setting=setting) from err
    return Path(str(path))


def _not_cached(what: str, repo_type: str, cache: Path, *, offline: bool, setting: str) -> ModelNotFoundError:
    cause = "HF_HUB_OFFLINE=1 is set" if offline else "the Hub could not be reached"
    return ModelNotFoundError(
        f"{what}: the {repo_type} is not in the Hub cache {str(cache)!r} and {cause}. Fix: download it once with "
        "network access (unset HF_HUB_OFFLINE), point HF_HOME / HF_HUB_CACHE at a cache that holds it, or pass a "
        "local folder.",
        setting=setting,
    )
