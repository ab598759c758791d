"""``lightning-adapt chat`` with SmolLM2 end to end: adapter and merged checkpoints (issue 17); chat from a QLoRA
checkpoint is tested on the chat QLoRA fit of ``tests/export/test_merge_eval.py``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from lightning_adapt.chat import GenerationOptions
from lightning_adapt.entry import main
from lightning_adapt.errors import ConfigError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(recipe: str, save_dir: Path) -> Path:
    """A one-step fit and its checkpoint (learning rate 2e-3: the adapters change the greedy answer yet keep
    it an answer; at 2e-2 the model stops at once)."""
    main(
        [
            "fit", "--config", recipe, *QUIET,
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=2", "--data.init_args.max_length=64",
            "--data.init_args.train_size=4", "--data.init_args.val_size=2", "--model.init_args.learning_rate=0.002",
            "--model.init_args.warmup_steps=0",
            f"--trainer.logger.init_args.save_dir={save_dir}",
        ]
    )  # fmt: skip
    return next(save_dir.rglob("*.ckpt"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        return _fit("recipes/chat/lora.yaml", tmp_path_factory.mktemp("chat-lora"))


def _chat(capsys: pytest.CaptureFixture[str], recipe: str, ckpt: Path | None, *extra: str) -> list[str]:
    capsys.readouterr()
    checkpoint = [] if ckpt is None else [f"--ckpt_path={ckpt}"]
    main(["chat", "--config", recipe, *checkpoint, "--max_new_tokens=8", *QUIET, *extra])
    return [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("lightning-adapt:")]


def test_one_shot_reply_is_deterministic_and_the_loop_reads_stdin(
    lora_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    recipe = "recipes/chat/lora.yaml"
    first = _chat(capsys, recipe, lora_run, "--prompt=Hello")
    assert first == _chat(capsys, recipe, lora_run, "--prompt=Hello") and len(first) == 1 and first[0].strip()
    base = _chat(capsys, recipe, None, "--prompt=Hello")  # the untrained base answers otherwise
    assert base != first
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\n/reset\nHello\n/exit\nnever read\n"))
    assert _chat(capsys, recipe, lora_run) == first * 2  # /reset: the second turn starts afresh
    merged = next(lora_run.parents[1].rglob("export/merged"))
    assert _chat(capsys, recipe, merged, "--prompt=Hello") == first  # merged weights answer as the adapters do


def test_bad_options_and_recipes_exit_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert GenerationOptions(temperature=0.7, top_p=0.9).generate_kwargs()["do_sample"] is True
    for bad, needle in (("--top_p=0", "--top_p=0.0 must be in (0, 1]"), ("--temperature=-1", "--temperature=-1.0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["chat", "--config", "recipes/chat/lora.yaml", "--prompt=Hi", bad])
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["chat", "--config", "recipes/sentiment/lora.yaml", "--prompt=Hi"])
    assert "chat needs a causal-LM recipe" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--max_new_tokens=0"):
        GenerationOptions(max_new_tokens=0)
