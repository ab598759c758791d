"""Which QLoRA merge to ship, measured (issue 17): the export validates the trained model and both merges."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.toy import trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_adapt.adapters.lora import LoRALinear, lora_modules
from lightning_adapt.callbacks._merge_eval import monitored
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.merge import MergeOnSaveCallback
from lightning_adapt.callbacks.quantize import QuantizeBaseCallback
from lightning_adapt.cli import AdaptCLI
from lightning_adapt.entry import main
from lightning_adapt.errors import ConfigError
from lightning_adapt.export.merge_eval import MergeEvaluation
from lightning_adapt.layers import quantized_layers
from lightning_adapt.tasks import CausalLMTask

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.mark.parametrize(
    ("original", "dequantized", "mode", "best"),
    [(2.0, 2.5, "min", "original"), (2.5, 2.0, "min", "dequantized"), (0.7, 0.9, "max", "dequantized"),
     (0.9, 0.7, "max", "original"), (2.0, 2.0, "min", "original"), (None, 2.0, "min", None)],
)  # fmt: skip
def test_recommendation_follows_the_monitored_direction(
    original: float | None, dequantized: float, mode: Any, best: str | None
) -> None:
    metrics = {"trained": {"m": dequantized}, "dequantized": {"m": dequantized}}
    metrics |= {"original": {"m": original}} if original is not None else {}
    evaluation = MergeEvaluation(metrics, "m", mode, merge_base="dequantized")
    assert evaluation.recommended() == best and evaluation.relative_gap() == 0.0
    text = evaluation.format()
    assert ("<- recommended" in text) == (best is not None)
    assert ("To ship it: merge_base: original" in text) == (best == "original")
    assert MergeEvaluation(notes=("no validation data",)).format() == "merge evaluation skipped: no validation data"


def test_monitored_metric_and_bad_option() -> None:
    assert monitored(None) == ("val_loss", "min")
    assert monitored(trainer(logger=False)) == ("val_loss", "min")  # the default ModelCheckpoint monitors nothing
    watched = trainer(enable_checkpointing=True, callbacks=[ModelCheckpoint(monitor="val_acc", mode="max")])
    assert monitored(watched) == ("val_acc", "max")
    with pytest.raises(ConfigError, match="eval_batches=0"):
        MergeOnSaveCallback(eval_batches=0)


def _batches(ids: torch.Tensor) -> DataLoader[Any]:
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    return DataLoader(rows, batch_size=2)  # type: ignore[arg-type]


def _perplexity(model: Any, loader: DataLoader[Any]) -> float:
    from torchmetrics.text import Perplexity

    metric = Perplexity(ignore_index=-100)
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            metric.update(logits[:, :-1].float(), batch["labels"][:, 1:])
    return float(metric.compute())


def test_tiny_qlora_export_measures_the_trained_model_and_both_merges(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoModelForCausalLM

    caplog.set_level(logging.INFO)
    task = CausalLMTask(model_name_or_path=str(tiny_llama_dir), learning_rate=1e-2)
    task.configure_model()
    QuantizeBaseCallback(compute_dtype="fp32").apply(task)
    LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]).apply(task)
    ids = torch.randint(0, 1000, (8, 12), generator=torch.Generator().manual_seed(0))
    merge = MergeOnSaveCallback(str(tmp_path / "export"), eval_batches=3)
    fit = trainer(tmp_path, callbacks=[merge], limit_val_batches=3)
    fit.fit(task, _batches(ids[:2]), _batches(ids[2:]))  # one step; validation after it
    assert merge.result is not None and merge.result.evaluation is not None
    evaluation = merge.result.evaluation
    assert list(evaluation.metrics) == ["trained", "original", "dequantized"] and evaluation.batches == 3
    assert evaluation.metrics["trained"] == task.last_val, "the fit's validation, and the task's summary kept"
    gap = evaluation.relative_gap("dequantized")
    assert gap is not None and gap < 1e-5, "the dequantized merge is the trained model"
    assert evaluation.relative_gap("original") > 1e-4, "merging into the original weights changes the model"
    losses = {k: evaluation.metrics[k]["val_loss"] for k in ("original", "dequantized")}
    assert evaluation.recommended() == min(losses, key=losses.__getitem__)
    shipped = AutoModelForCausalLM.from_pretrained(tmp_path / "export/merged", dtype=torch.float32).eval()
    measured = _perplexity(shipped, _batches(ids[2:]))  # the 'original' figure is the written model's
    assert measured == pytest.approx(evaluation.metrics["original"]["val_ppl"], rel=1e-5)
    assert len(quantized_layers(task)) == 14 and all(isinstance(m, LoRALinear) for _, m in lora_modules(task))
    assert task.trainer is fit and task.device.type == "cpu"
    assert "merge evaluation on the validation data (3 batches; val_loss, lower is better)" in caplog.text
    assert "merge_base=dequantized" in caplog.text and "<- recommended" in caplog.text


def _qlora_fit(save_dir: Path, *extra: str) -> AdaptCLI:
    """The chat QLoRA recipe on a tiny budget (max_length stays 64: shorter truncates every response token)."""
    return AdaptCLI(
        args=[
            "fit", "--config", "recipes/chat/qlora.yaml", *QUIET, "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=2",
            "--data.init_args.max_length=64", "--data.init_args.train_size=4", "--data.init_args.val_size=4",
            "--model.init_args.warmup_steps=0", f"--trainer.logger.init_args.save_dir={save_dir}", *extra,
        ]
    )  # fmt: skip


def test_chat_qlora_export_reports_perplexity_of_each_merge_and_its_checkpoint_chats(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One chat QLoRA fit serves both: its export's merge evaluation, and ``chat`` from its adapter-only QLoRA
    checkpoint (the base quantized again on load), greedy, so the same reply after ``/reset``."""
    monkeypatch.chdir(ROOT)
    caplog.set_level(logging.INFO)
    cli = _qlora_fit(tmp_path)
    merge = next(cb for cb in cli.trainer.callbacks if isinstance(cb, MergeOnSaveCallback))  # type: ignore[attr-defined]
    assert merge.result is not None and merge.result.evaluation is not None
    evaluation = merge.result.evaluation
    ppl = {k: v["val_ppl"] for k, v in evaluation.metrics.items()}
    assert sorted(ppl) == ["dequantized", "original", "trained"] and all(1 < v < 1e4 for v in ppl.values())
    assert evaluation.relative_gap("dequantized") < 1e-3 and evaluation.recommended() in ("original", "dequantized")
    assert "val_ppl" in caplog.text and ("this export: merge_base=original" in caplog.text)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\nHello\n/exit\n"))  # one load, two turns
    main(["chat", "--config", "recipes/chat/qlora.yaml", f"--ckpt_path={ckpt}", "--max_new_tokens=8", *QUIET])
    replies = [
        line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("lightning-adapt:")
    ]
    assert replies and replies[: len(replies) // 2] * 2 == replies and "".join(replies).strip()  # greedy: the same


def _tiny_qlora_recipe(tmp_path: Path, model_dir: Path) -> Path:
    recipe = {
        "seed_everything": 0,
        "model": {"class_path": "lightning_adapt.tasks.CausalLMTask",
                  "init_args": {"model_name_or_path": str(model_dir), "learning_rate": 1e-2}},
        "data": {"class_path": "lightning_adapt.data.ChatDataModule",
                 "init_args": {"max_length": 64, "batch_size": 2, "train_size": 4, "val_size": 4}},
        "trainer": {"logger": False, "accelerator": "cpu", "max_steps": 2, "limit_val_batches": 2,
                    "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path), "enable_progress_bar": False},
        "quantize": {"class_path": "lightning_adapt.QuantizeBaseCallback", "init_args": {"compute_dtype": "fp32"}},
        "lora": {"class_path": "lightning_adapt.LoRAInjectionCallback",
                 "init_args": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "merge": {"class_path": "lightning_adapt.MergeOnSaveCallback"},
    }  # fmt: skip
    path = tmp_path / "qlora.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_export_measures_the_checkpoint_as_the_fit_did(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_adapt.cli as cli

    caplog.set_level(logging.INFO)
    recipe = str(_tiny_qlora_recipe(tmp_path, tiny_llama_dir))
    fit = AdaptCLI(args=["fit", "--config", recipe])
    merge = next(cb for cb in fit.trainer.callbacks if isinstance(cb, MergeOnSaveCallback))  # type: ignore[attr-defined]
    assert merge.result is not None and merge.result.evaluation is not None
    figures = merge.result.evaluation.metrics
    ckpt = str(next(tmp_path.rglob("*.ckpt")))
    caplog.clear()
    main(["export", "--config", recipe, "--ckpt_path", ckpt, "--output", str(tmp_path / "out")])
    assert "(streamed from the source files)" in caplog.text  # then the model is built to measure the merges
    for variant, metrics in figures.items():  # the checkpoint, rebuilt: the figures of the end of fit
        assert all(f"{value:.4f}" in caplog.text for value in metrics.values()), variant
    assert "this export: merge_base=original" in caplog.text
    caplog.clear()
    with monkeypatch.context() as patch:  # evaluate: false: no model built
        patch.setattr(cli, "build_model", lambda *args: pytest.fail("the export built the model"))
        main(
            ["export", "--config", recipe, "--ckpt_path", ckpt, "--output", str(tmp_path / "plain"), "--evaluate=false"]
        )
    assert "merge evaluation" not in caplog.text and (tmp_path / "plain/merged").is_dir()
