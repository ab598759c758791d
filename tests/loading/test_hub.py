"""Hub ids (``org/name``) resolve from a Hub cache built on disk, offline, as ``transformers`` resolves them; nothing
is ever fetched (``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from helpers.own_data import OTHER_SHA, hub_snapshot

from lightning_adapt.errors import ModelNotFoundError
from lightning_adapt.hub import MODEL_FILES, is_hub_id, resolve_hub
from lightning_adapt.models import resolve_model


@pytest.fixture
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_a_hub_id_resolves_to_its_cached_snapshot(hub_home: Path, tiny_llama_dir: Path) -> None:
    snapshot = hub_snapshot(hub_home, "org/tiny-llama", tiny_llama_dir)
    assert resolve_model("org/tiny-llama") == snapshot
    assert (resolve_model("org/tiny-llama") / "config.json").is_file()


def test_a_revision_picks_its_own_snapshot(hub_home: Path, tiny_llama_dir: Path, tiny_bert_dir: Path) -> None:
    main = hub_snapshot(hub_home, "org/model", tiny_llama_dir)
    tagged = hub_snapshot(hub_home, "org/model", tiny_bert_dir, sha=OTHER_SHA, ref="v2")
    assert resolve_model("org/model") == main
    assert resolve_model("org/model", revision="v2") == tagged
    assert resolve_model("org/model", revision=OTHER_SHA) == tagged


def test_hub_cache_follows_the_environment_at_each_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere" / "hub"))
    snapshot = hub_snapshot(tmp_path / "elsewhere", "org/tiny", tiny_llama_dir)
    assert resolve_model("org/tiny") == snapshot


def test_an_uncached_id_offline_is_one_error_naming_the_id_the_cache_and_the_fix(hub_home: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("org/not-there")
    message = str(info.value)
    assert "'org/not-there'" in message and str(hub_home / "hub") in message and "HF_HUB_OFFLINE=1 is set" in message
    assert "Fix:" in message
    with pytest.raises(ModelNotFoundError, match="revision 'v9'"):
        resolve_model("org/not-there", revision="v9")


def test_a_hub_repository_without_config_is_refused(hub_home: Path, tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "README.md").write_text("# not a model")
    hub_snapshot(hub_home, "org/readme-only", tmp_path / "files")
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        resolve_model("org/readme-only")


def test_only_load_files_are_fetched_never_pickles() -> None:
    def fetched(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES)

    wanted = [
        "config.json",
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "tokenizer.model",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
    ]
    refused = [
        "pytorch_model.bin",
        "model.pth",
        "model.pt",
        "training_args.bin",
        "modeling_evil.py",
        "model.gguf",
        "model.onnx",
        "flax_model.msgpack",
        "tf_model.h5",
    ]
    assert [n for n in wanted if not fetched(n)] == []
    assert [n for n in refused if fetched(n)] == []


def test_what_counts_as_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_hub_id("minilm") and not is_hub_id("a/b/c") and not is_hub_id("/abs/path") and not is_hub_id("./x")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert not is_hub_id("org/name"), "an existing local path is a path"


def test_ranks_resolving_together_download_one_at_a_time(
    hub_home: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock beside the cache: while one resolver downloads, the others wait, then read the snapshot it left."""
    import threading
    import time

    import huggingface_hub

    snapshot = hub_snapshot(hub_home, "org/shared", tiny_llama_dir)
    active, most, calls = [0], [0], []
    real = huggingface_hub.snapshot_download

    def slow(*args: object, **kwargs: object) -> object:
        active[0] += 1
        most[0] = max(most[0], active[0])
        calls.append(kwargs["local_files_only"])
        time.sleep(0.05)
        active[0] -= 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", slow)
    found: list[Path] = []

    def resolve() -> None:
        found.append(resolve_hub("org/shared", repo_type="model", revision=None, setting="s"))

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == [snapshot] * 3 and calls == [True] * 3
    assert most[0] == 1, "never two downloads of one repository at once"


def test_a_task_trains_from_a_hub_id(hub_home: Path, tiny_llama_dir: Path) -> None:
    from lightning_adapt.tasks import CausalLMTask

    snapshot = hub_snapshot(hub_home, "org/tiny-llama", tiny_llama_dir)
    task = CausalLMTask(model_name_or_path="org/tiny-llama")
    assert task.source_path == snapshot
    task.configure_model()
    assert task.load_report is not None and task.load_report.tensors_loaded > 0
