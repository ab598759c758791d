"""MemoryReportCallback through a real Trainer: measured bytes against the estimator, the table, the logger."""

from __future__ import annotations

import csv
import importlib
import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from helpers.toy import ToyModule, loader, trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.memory_report import BEFORE, MemoryReportCallback
from lightning_adapt.errors import ConfigError
from lightning_adapt.memory.estimator import ModelShape, format_bytes
from lightning_adapt.memory.live import _saved
from lightning_adapt.tasks import CausalLMTask, SequenceClassificationTask

COMPARED = ("weights", "trainable params", "gradients", "optimizer state")


def _tokens(vocab: int = 1000, n: int = 4, seq: int = 16) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids})
    return DataLoader(rows, batch_size=2)  # type: ignore[arg-type]  # a list is a map-style dataset


def _labelled(vocab: int = 30522, n: int = 4, seq: int = 16, classes: int = 3) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(0, vocab, (seq,), generator=g),
            "attention_mask": torch.ones(seq, dtype=torch.long),
            "labels": torch.tensor(i % classes),
        }
        for i in range(n)
    ]
    return DataLoader(rows, batch_size=2)  # type: ignore[arg-type]


def _quantize() -> L.Callback:
    pytest.importorskip("bitsandbytes")
    from lightning_adapt.callbacks.quantize import QuantizeBaseCallback

    return QuantizeBaseCallback(mode="nf4", compute_dtype="fp32")


def _adamw8bit() -> L.Callback:
    pytest.importorskip("bitsandbytes")
    from lightning_adapt.callbacks.paged_optimizer import PagedOptimizerPlugin

    return PagedOptimizerPlugin("AdamW8bit")


RUNS: dict[str, tuple[str, Any]] = {
    "full": ("full", list),
    "lora": ("lora", lambda: [LoRAInjectionCallback(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])]),
    "qlora": ("qlora", lambda: [_quantize(), LoRAInjectionCallback(r=8, target_modules="all-linear")]),
    # r=64: the A/B tensors reach bitsandbytes' 4096-element minimum for 8-bit state
    "qlora-adamw8bit": ("qlora", lambda: [_quantize(), LoRAInjectionCallback(r=64, target_modules="all-linear"), _adamw8bit()]),
}  # fmt: skip


@pytest.mark.parametrize("run", list(RUNS))
def test_measured_bytes_agree_with_the_estimate(run: str, tiny_llama_dir: Path) -> None:
    method, callbacks = RUNS[run]
    report = MemoryReportCallback()
    module = CausalLMTask(model_name_or_path=str(tiny_llama_dir), learning_rate=1e-3)
    trainer(callbacks=[*callbacks(), report], max_steps=2).fit(module, _tokens())
    assert report.estimate is not None, report.no_estimate_reason
    assert report.estimate.method == method
    assert set(report.reports) == {"fit_start", "first_step", "fit_end"}
    for stage in ("first_step", "fit_end"):
        rows = report.reports[stage]
        for component in COMPARED:
            measured, estimated = rows[component]
            assert measured is not None and estimated is not None, (stage, component)
            assert measured == pytest.approx(estimated, rel=0.05), (stage, component, rows)
    first = report.reports["first_step"]
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert first["trainable params"][0] == trainable
    assert first["gradients"][0] == 4 * trainable, "fp32 gradients of every trainable parameter, measured once"
    assert report.reports["fit_start"]["gradients"][0] is None, "no gradients before the first backward"
    load_peak, _ = report.reports["fit_start"]["load peak"]
    assert module.load_report is not None and load_peak == (
        module.load_report.peak_rss_bytes - module.load_report.baseline_rss_bytes
    ), "the load peak of the streaming build is reported beside the weights"
    assert module.load_report.quantized_layers == (14 if method == "qlora" else 0), "quantized while loading"
    if method == "qlora":
        (quantized, predicted), (dense, _) = first["weights: quantized"], first["weights: fp32"]
        assert quantized is not None and dense is not None
        assert quantized == pytest.approx(predicted, rel=0.05)
        assert quantized < dense / 50, "block linears are 4-bit, the 49k-token embedding stays fp32"
    if method != "full":
        assert first["adapter weights"][0] == pytest.approx(report.estimate.adapter_bytes, rel=0.05)


def _recipe_callbacks(recipe: str) -> list[L.Callback]:
    """The adapter callbacks of ``recipes/sentiment/<recipe>.yaml`` (quantize, paged optimizer, LoRA), as
    the CLI builds them from the recipe keys."""
    config = yaml.safe_load((Path(__file__).parents[2] / f"recipes/sentiment/{recipe}.yaml").read_text())
    callbacks: list[L.Callback] = []
    for key in ("quantize", "paged_optimizer", "lora"):
        if key in config:
            if key != "lora":
                pytest.importorskip("bitsandbytes")
            module, _, name = config[key]["class_path"].rpartition(".")
            callbacks.append(getattr(importlib.import_module(module), name)(**config[key].get("init_args", {})))
    return callbacks


@pytest.mark.parametrize(("recipe", "method"), [("full", "full"), ("lora", "lora"), ("qlora", "qlora")])
def test_sentiment_recipes_measured_bytes_equal_the_estimate(recipe: str, method: str, tiny_bert_dir: Path) -> None:
    """The sentiment recipes' adapter settings on a tiny BERT loaded with a new 3-label head: to the byte."""
    report = MemoryReportCallback()
    module = SequenceClassificationTask(model_name_or_path=str(tiny_bert_dir), num_labels=3)
    callbacks = _recipe_callbacks(recipe)
    trainer(callbacks=[*callbacks, report], max_steps=2).fit(module, _labelled())
    assert report.estimate is not None, report.no_estimate_reason
    assert (report.estimate.model, report.estimate.method) == ("BertForSequenceClassification", method)
    for stage in ("first_step", "fit_end"):
        rows = report.reports[stage]
        for component in (*COMPARED, "adapter weights", "weights: quantized", "weights: fp32"):
            if component in rows:
                assert rows[component][0] == rows[component][1], (stage, component, rows)
    trainable = report.reports["first_step"]["trainable params"][0]
    assert trainable == sum(p.numel() for p in module.parameters() if p.requires_grad)
    if method != "full":  # the recipes' names (e.g. attention.output.dense), not every "dense"
        lora = next(c for c in callbacks if isinstance(c, LoRAInjectionCallback))
        assert report.estimate.assumptions.targets == tuple(lora.spec.target_modules or ())
        assert report.estimate.assumptions.modules_to_save == ("classifier",)
        assert module.model.classifier.weight.requires_grad
    if method == "qlora":  # the 12 block linears and the pooler packed, the classifier kept in fp32
        assert module.model.classifier.weight.dtype == torch.float32
        assert report.reports["first_step"]["weights: quantized"][0] == report.estimate.quantized_weights_bytes > 0


def test_parameters_outside_the_hf_model_get_no_estimate(tiny_bert_dir: Path) -> None:
    class Tagger(L.LightningModule):  # a BertModel with a head of its own: the config cannot know it
        def __init__(self) -> None:
            super().__init__()
            from transformers import BertModel

            self.encoder = BertModel.from_pretrained(tiny_bert_dir, local_files_only=True)
            self.head = torch.nn.Linear(32, 3)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            hidden = self.encoder(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            return torch.nn.functional.cross_entropy(self.head(hidden[:, 0]), batch["labels"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    report = MemoryReportCallback()
    trainer(callbacks=[report], max_steps=1).fit(Tagger(), _labelled())
    assert report.estimate is None and report.no_estimate_reason is not None
    assert "parameters outside BertModel are not modeled: head.weight, head.bias" in report.no_estimate_reason


@pytest.mark.parametrize(
    ("config", "entries", "expected"),
    [
        (
            {"architectures": ["BertForSequenceClassification"]},
            ["classifier", "bert.pooler.dense"],
            ("classifier", "pooler.dense"),
        ),
        ({"architectures": ["BertModel"]}, ["embeddings.LayerNorm", "pooler"], ("embeddings.LayerNorm", "pooler")),
        ({"model_type": "llama", "tie_word_embeddings": True}, ["model.norm", "lm_head"], ("norm", "embed_tokens")),
    ],
    ids=["head-and-full-name", "unknown-left-for-the-estimator", "llama-tied"],
)
def test_modules_to_save_become_names_the_shape_knows(
    config: dict[str, Any], entries: list[str], expected: tuple[str, ...]
) -> None:
    fields = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10)
    shape = ModelShape.from_config({"model_type": "bert", "max_position_embeddings": 8, **fields, **config})
    assert _saved(entries, shape) == expected
    with pytest.raises(ValueError, match=r"'layer\.0\.output' is a regex or selects single layers"):
        _saved(["layer.0.output"], shape)


def test_table_has_both_columns_and_numbers_reach_the_logger(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    report = MemoryReportCallback(show=["fit_start", "first_step", "fit_end"])
    module = CausalLMTask(model_name_or_path=str(tiny_llama_dir))
    logger = CSVLogger(tmp_path)
    t = trainer(tmp_path, callbacks=[LoRAInjectionCallback(r=4), report], max_steps=2, logger=logger)
    t.fit(module, _tokens())
    text = caplog.text
    assert text.count("| component | measured | estimated | ratio |") == 3
    assert "after the first optimizer step; estimate for LlamaForCausalLM: lora r=4 on q_proj,v_proj" in text
    optimizer_row = next(
        line for line in text.splitlines() if line.startswith("| optimizer state |") and "1.000" in line
    )
    assert optimizer_row.count("|") == 5
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    for name in ("memory/fit_start/weights_measured", "memory/first_step/optimizer_state_estimated"):
        assert name in columns
    assert "memory/fit_end/gradients_measured" in columns


def test_module_without_hf_config_reports_measured_figures_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    report = MemoryReportCallback()
    module = ToyModule()
    trainer(callbacks=[report], max_steps=2).fit(module, loader())  # no logger
    assert report.estimate is None
    assert report.no_estimate_reason is not None and "PreTrainedModel" in report.no_estimate_reason
    rows = report.reports["first_step"]
    params = list(module.parameters())
    numel = sum(p.numel() for p in params)
    assert rows["weights"] == (4 * numel, None)
    assert rows["gradients"] == (4 * numel, None)
    assert rows["optimizer state"] == (8 * numel + 4 * len(params), None), "two fp32 moments + a step per tensor"
    assert rows["peak"][0] is not None and rows["peak"][0] > 0
    assert "no estimate: ToyModule holds no Hugging Face PreTrainedModel" in caplog.text
    assert f"| weights | {format_bytes(4 * numel)} | - | - |" in caplog.text


class _Llama(L.LightningModule):
    """A small LightningModule holding a ``LlamaForCausalLM`` and an optimizer of choice."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
        self.model = LlamaForCausalLM(config)
        self.optimizer = optimizer

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(**batch).loss
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=1e-3)
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_16bit_weights_give_16bit_adam_moments() -> None:
    report = MemoryReportCallback()
    trainer(callbacks=[report], max_steps=2, precision="bf16-true").fit(_Llama("adamw"), _tokens())
    assert report.estimate is not None
    a = report.estimate.assumptions
    assert (a.base_dtype, a.optimizer) == ("bf16", "adamw-16bit")
    for component in COMPARED:
        measured, estimated = report.reports["first_step"][component]
        assert measured == estimated, component


def test_unmodeled_optimizer_is_explained() -> None:
    report = MemoryReportCallback()
    trainer(callbacks=[report], max_steps=1).fit(_Llama("sgd"), _tokens())
    assert report.estimate is None and report.no_estimate_reason is not None
    assert "SGD is not modeled" in report.no_estimate_reason
    assert report.reports["fit_end"]["weights"][0] is not None


def test_invalid_prefix_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="prefix=''"):
        MemoryReportCallback(prefix="")


def test_a_load_peak_of_zero_is_reported_and_empty_rows_are_not() -> None:
    """A load that reuses pages freed earlier peaks 0 B above its baseline: a measurement, kept (an absent 4-bit
    weight row is not)."""
    from lightning_adapt.callbacks.memory_report import _pair

    rows = _pair({"weights": 10, "load peak": 0, "weights: quantized": 0}, {"weights": 10})
    assert rows["load peak"] == (0, None) and "weights: quantized" not in rows


def test_one_table_by_default_and_the_peak_compares_the_process_with_the_process(
    tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """By default only the fit-end table is printed (every stage is still measured). The peak row sets the process's
    measured peak against the process before the model (its own row, no ratio) plus the estimate; the peak is this
    run's, not an earlier job's in the same process."""
    caplog.set_level(logging.INFO)
    report = MemoryReportCallback()
    earlier = torch.ones(250_000_000)  # an earlier job of this process peaked 1 GB higher: not this run's peak
    del earlier
    module = CausalLMTask(model_name_or_path=str(tiny_llama_dir), learning_rate=1e-3)
    trainer(callbacks=[LoRAInjectionCallback(r=4), report], max_steps=2).fit(module, _tokens())
    assert caplog.text.count("| component | measured | estimated | ratio |") == 1
    assert "memory report at fit end" in caplog.text and "at fit start" not in caplog.text
    assert set(report.reports) == {"fit_start", "first_step", "fit_end"}
    rows, est = report.reports["fit_end"], report.estimate
    assert est is not None and module.load_report is not None
    (peak, estimated), (before, nothing) = rows["peak"], rows[BEFORE]
    assert peak is not None and estimated is not None and before is not None and nothing is None
    assert before == module.load_report.baseline_rss_bytes, "measured right before the streaming build"
    assert estimated == before + est.total_bytes, "the estimate on the process's footing"
    assert before < peak < before + 5e8, "this run's peak, not the earlier job's (1 GB above)"
    ratio = f"{peak / estimated:.3f}"
    assert f"| peak | {format_bytes(peak)} | {format_bytes(estimated)} | {ratio} |" in caplog.text
    assert f"| {BEFORE} | {format_bytes(before)} | - | - |" in caplog.text
    assert (
        "peak: the process's peak RSS, against the process before the model (measured at setup) + the " in caplog.text
    )
    with pytest.raises(ConfigError, match=r"show=\['fit_begin'\].*allowed"):
        MemoryReportCallback(show=["fit_begin"])  # type: ignore[list-item]


@pytest.mark.parametrize("with_report", [True, False])
def test_the_export_measures_its_memory_only_when_the_run_reports_memory(with_report: bool, tmp_path: Path) -> None:
    """The export's sampling thread runs for a memory report (whose table its figure joins), not otherwise."""
    from lightning_adapt.callbacks.merge import MergeOnSaveCallback

    merge = MergeOnSaveCallback(str(tmp_path / "export"), evaluate=False)
    callbacks = [LoRAInjectionCallback(r=2, target_modules=["q_proj"]), merge]
    callbacks += [MemoryReportCallback()] if with_report else []
    trainer(tmp_path, max_steps=1, callbacks=callbacks).fit(ToyModule(), loader())
    assert merge.result is not None and (merge.result.memory is not None) == with_report
