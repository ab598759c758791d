"""benchmarks/bench_vs_trl.py compares like with like, checked without training: TRL's schedule is the task's, the
``lightning-adapt fit`` command the benchmark runs parses to the recipe with its overrides, and (with trl installed:
the ``bench`` extra, not in CI, so skipped there) TRL gets the recipe's batches token for token and its validation
loss is the one ``CausalLMTask`` logs, on a tiny random model."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_vs_trl

ROOT = Path(__file__).resolve().parents[2]


def test_trls_schedule_is_the_tasks() -> None:
    from lightning_adapt.tasks.base import TaskModule

    param = torch.nn.Parameter(torch.zeros(1))
    task = types.SimpleNamespace(parameters=lambda: [param], learning_rate=1.0, weight_decay=0.0, warmup_steps=5)
    configured = TaskModule.configure_optimizers(task)  # type: ignore[arg-type]
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(9):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == [bench_vs_trl.recipe_lambda(5)(step) for step in range(9)]


def test_the_fit_command_is_the_recipe_with_its_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_adapt.entry import main

    monkeypatch.chdir(ROOT)
    recipe = bench_vs_trl.read_recipe("lora")
    command = bench_vs_trl.ours_command(recipe, 7, tmp_path)
    assert command[:2] == ["lightning-adapt", "fit"]
    with pytest.raises(SystemExit) as done:
        main([*command[1:], "--print_config"])
    assert done.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    trainer = config["trainer"]
    assert (trainer["max_steps"], trainer["limit_train_batches"], trainer["num_sanity_val_steps"]) == (7, 7, 0)
    assert [c["class_path"] for c in trainer["callbacks"]] == [
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_clock_lightning.StepClock",
    ]
    assert trainer["callbacks"][0]["init_args"]["save_last"] is False
    assert config["merge"] is None and config["memory_report"] is None and config["predictions"] is None
    assert config["lora"]["init_args"]["r"] == recipe.lora["r"] == 16
    assert config["data"]["init_args"]["batch_size"] == 4


def tiny_model(path: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer (the recipe's token ids fit it)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lightning_adapt.models import resolve_model

    smollm2 = resolve_model("smollm2-135m-instruct")
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(path)
    return path


@pytest.mark.slow
def test_trl_gets_the_recipes_batches_and_computes_the_same_validation_loss(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    import _trl_job
    from torchmetrics.text import Perplexity

    recipe = bench_vs_trl.read_recipe("lora")
    prepared = bench_vs_trl.prepare(recipe, 3, tmp_path, model_dir=tiny_model(tmp_path / "tiny"))
    spec = json.loads(bench_vs_trl.trl_spec(recipe, prepared, 3, tmp_path).read_text())
    trainer = _trl_job.build_trainer(spec, _trl_job.StepClock())
    _trl_job.recipe_optimizer(trainer, spec)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(recipe.lr / (recipe.warmup_steps + 1))

    first = next(iter(trainer.get_train_dataloader()))
    reference = torch.load(prepared.reference)
    _trl_job.check_first_batch(first, reference)
    assert [bench_vs_trl.batch_digest(b) for b in trainer.get_train_dataloader()] == prepared.train_digests
    one_less = {**reference, "labels": reference["labels"].clone()}
    one_less["labels"][0, (one_less["labels"][0] != -100).nonzero()[-1]] = -100  # one response token unlearned
    with pytest.raises(SystemExit, match="labels: differs first at"):
        _trl_job.check_first_batch(first, one_less)

    loss, tokens, digests = _trl_job.validation_loss(trainer)
    assert (digests, tokens) == (prepared.val_digests, prepared.val_tokens)
    perplexity = Perplexity(ignore_index=-100)  # CausalLMTask.validation_step on the same model and batches
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            perplexity.update(logits[:, :-1].float(), batch["labels"][:, 1:])
    assert float(torch.log(perplexity.compute())) == pytest.approx(loss, rel=1e-5)
