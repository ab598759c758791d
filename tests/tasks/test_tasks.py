"""The ready tasks on real and tiny Hugging Face models, with and without adapters."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.toy import trainer

from lightning_adapt.adapters.lora import lora_modules
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.data import ChatDataModule, TweetSentimentDataModule
from lightning_adapt.tasks import CausalLMTask, SequenceClassificationTask


def test_packaged_smollm2_is_the_real_pretrained_model() -> None:
    task = CausalLMTask("smollm2-135m-instruct")
    assert task.model is None, "nothing is loaded before configure_model"
    task.configure_model()
    tokenizer = task.tokenizer
    prompt = "The capital of France is Paris. The capital of Germany is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = task.model(input_ids=ids, labels=ids).loss
        generated = task.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert float(loss) < 3.0, "a random model scores ~10.8 here; the converted GGUF scores ~2.0"
    assert "Berlin" in tokenizer.decode(generated[0, ids.shape[1] :])


def test_causal_lm_lora_with_activation_checkpointing_trains_and_predicts(tiny_llama_dir: Path) -> None:
    task = CausalLMTask(str(tiny_llama_dir), learning_rate=1e-2, activation_checkpointing=True, max_new_tokens=4)
    data = ChatDataModule(categories=["greetings"], val_size=4, batch_size=4, max_length=48)
    lora = LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    t = trainer(callbacks=[lora], limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=1)
    t.fit(task, datamodule=data)
    assert task.model.is_gradient_checkpointing
    assert lora_modules(task) and all(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora_modules(task)), (
        "every adapter received gradients through the checkpointed, frozen base"
    )
    assert "val_ppl" in task.baseline and "val_ppl" in task.last_val
    predictions = t.predict(task, datamodule=data)
    assert predictions is not None
    rows = [row for batch in predictions for row in batch]  # type: ignore[union-attr]
    assert len(rows) == 4 and all(isinstance(r["response"], str) and r["prompt"] for r in rows)


def test_classification_full_fine_tune_improves_on_a_learnable_split(
    tiny_bert_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv = tmp_path / "tweets.csv"
    rows = ["sentiment,confidence,text"]
    rows += [f"positive,1.0,i love this wonderful great day {i}" for i in range(48)]
    rows += [f"negative,1.0,i hate this awful terrible day {i}" for i in range(48)]
    csv.write_text("\n".join(rows) + "\n")
    L.seed_everything(0)
    task = SequenceClassificationTask(str(tiny_bert_dir), num_labels=2, learning_rate=3e-3)
    data = TweetSentimentDataModule(csv_path=str(csv), labels=("negative", "positive"), val_size=16, batch_size=16)
    caplog.set_level(logging.INFO)
    trainer(max_epochs=8, num_sanity_val_steps=-1).fit(task, datamodule=data)
    assert task.last_val["val_acc"] > task.baseline["val_acc"]
    assert task.last_val["val_acc"] >= 0.9
    summary = caplog.text[caplog.text.index("=== lightning-adapt: fine-tuned") :]  # printed in teardown: last
    before, after = task.baseline["val_acc"], task.last_val["val_acc"]
    assert f"val_acc: {before:.4f} before training -> {after:.4f} after {task.trainer.global_step} steps" in summary


def test_perplexity_is_accumulated_in_fp32_under_bf16_true(tiny_llama_dir: Path) -> None:
    task = CausalLMTask(str(tiny_llama_dir))
    data = ChatDataModule(categories=["greetings"], val_size=8, batch_size=4, max_length=48)
    t = trainer(precision="bf16-true", limit_val_batches=2)
    t.validate(task, datamodule=data)
    assert task.model.lm_head.weight.dtype == torch.bfloat16, "the precision plugin did cast the module"
    assert task.val_ppl.total_log_probs.dtype == torch.float32
    ppl = task.last_val["val_ppl"]
    assert ppl != round(ppl), "a bf16 accumulator rounds perplexities of this size to whole numbers or halves"
