"""Export: PEFT-format adapters and merged models load in PEFT / transformers and reproduce our outputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.toy import ToyModule, trainer
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_adapt.adapters.lora import lora_modules
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.merge import MergeOnSaveCallback
from lightning_adapt.entry import main
from lightning_adapt.errors import ExportError
from lightning_adapt.export.exporter import ExportOptions, export_model, find_tokenizer
from lightning_adapt.tasks import CausalLMTask, SequenceClassificationTask

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 12], [3, 3, 8, 1000, 77, 6, 2]])


def _randomize_adapters(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B (and a perturbed DoRA magnitude) so a wrong scale or key shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(module):
            layer.lora_B.weight.normal_(0, 0.2, generator=g)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=g))


def _task(path: Path) -> CausalLMTask:
    task = CausalLMTask(model_name_or_path=str(path))
    task.configure_model()  # a task that streams its weights in builds its model here (a no-op otherwise)
    return task


def _llama(path: Path, **lora: Any) -> CausalLMTask:
    task = _task(path)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", **lora}
    LoRAInjectionCallback(**lora).apply(task)
    _randomize_adapters(task)
    return task.eval()


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=IDS).logits
    return out


def _peft(base: Any, adapter: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter).eval()


def _causal_lm(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize(
    ("variant", "lora"),
    [("lora", {}), ("dora", {"use_dora": True}), ("rslora-sharded", {"use_rslora": True, "r": 8})],
)
def test_peft_and_transformers_load_our_export(tiny_llama_dir: Path, tmp_path: Path, variant: str, lora: Any) -> None:
    task = _llama(tiny_llama_dir, **lora)
    ours = _logits(task.model)
    shard = "400KB" if variant == "rslora-sharded" else "5GB"
    MergeOnSaveCallback(str(tmp_path / "out"), max_shard_size=shard).export(None, task)
    config = json.loads((tmp_path / "out/adapter/adapter_config.json").read_text())
    assert config["r"] == lora.get("r", 4) and config["task_type"] == "CAUSAL_LM"
    assert config["use_dora"] == ("use_dora" in lora) and config["use_rslora"] == ("use_rslora" in lora)
    peft_logits = _logits(_peft(_causal_lm(tiny_llama_dir), tmp_path / "out/adapter"))
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=0)
    merged_dir = tmp_path / "out/merged"
    merged = _causal_lm(merged_dir)
    torch.testing.assert_close(_logits(merged), ours, atol=1e-5, rtol=0)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight, "tied embeddings re-tied on load"
    assert (merged_dir / "tokenizer_config.json").is_file()
    files = sorted(merged_dir.glob("*.safetensors"))
    keys = {k for f in files for k in safe_open(f, framework="pt").keys()}  # noqa: SIM118
    assert "lm_head.weight" not in keys and not any("lora_" in k or "base_layer" in k for k in keys)
    if variant == "rslora-sharded":
        index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
        assert len(files) > 1 and set(index["weight_map"]) == keys


def test_modules_to_save_with_bert_classifier(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    task = SequenceClassificationTask(model_name_or_path=str(tiny_bert_dir), num_labels=3)
    task.configure_model()  # a no-op where the task builds its model in __init__
    LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, modules_to_save=["classifier"]).apply(task)
    _randomize_adapters(task)
    torch.nn.init.normal_(task.model.classifier.weight)  # "trained" head
    task.eval()
    ours = _logits(task.model)
    export_model(
        task, tmp_path / "out", ExportOptions(), modules_to_save=["classifier"], tokenizer=find_tokenizer(task)
    )
    config = json.loads((tmp_path / "out/adapter/adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    torch.testing.assert_close(_logits(_peft(base, tmp_path / "out/adapter")), ours, atol=1e-5, rtol=0)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out/merged").eval()
    torch.testing.assert_close(_logits(merged), ours, atol=1e-5, rtol=0)


def test_non_hf_module_loads_strict_into_unadapted_module(tmp_path: Path) -> None:
    module = ToyModule()
    LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, use_dora=True, modules_to_save=["classifier"]).apply(module)
    _randomize_adapters(module)
    x = torch.randn(8, 64)
    with torch.no_grad():
        ours = module(x)
    result = export_model(module, tmp_path / "out", ExportOptions(dtype="fp32"), modules_to_save=["classifier"])
    assert result.adapter is not None and result.merged is not None
    plain = ToyModule(seed=1)
    plain.load_state_dict(load_file(result.merged / "model.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ours, atol=1e-5, rtol=0)
    adapter = load_file(result.adapter / "adapter_model.safetensors")
    assert "base_model.model.net.layers.0.q_proj.lora_magnitude_vector" in adapter
    assert "base_model.model.net.classifier.weight" in adapter


def test_merge_callback_every_checkpoint_and_refusal_before_training(tmp_path: Path) -> None:
    from helpers.toy import loader

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/keep.txt").write_text("mine")
    module = ToyModule()
    busy = MergeOnSaveCallback(dirpath=str(tmp_path / "busy"))
    with pytest.raises(ExportError, match=r"dirpath=.*not empty"):
        trainer(tmp_path, callbacks=[_lora_toy(), busy], max_steps=1).fit(module, loader())
    assert not lora_modules(module) and [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    merge = MergeOnSaveCallback(dirpath=str(tmp_path / "export"), every_checkpoint=True, dtype="fp32")
    calls: list[int] = []
    original = merge.export

    def spy(t: Any, m: Any, **kwargs: Any) -> Any:
        calls.append(m.global_step)
        return original(t, m, **kwargs)

    merge.export = spy  # type: ignore[method-assign,assignment]
    module = ToyModule()
    t = trainer(
        tmp_path, callbacks=[_lora_toy(), merge], max_epochs=2, limit_train_batches=2, enable_checkpointing=True
    )
    t.fit(module, loader())
    assert calls == [2, 4, 4], "each epoch-end checkpoint, then fit end (replacing the earlier export)"
    plain = ToyModule(seed=1)
    plain.load_state_dict(load_file(tmp_path / "export/merged/model.safetensors"), strict=True)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), module.eval()(x), atol=1e-5, rtol=0)


def _lora_toy() -> LoRAInjectionCallback:
    return LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, modules_to_save=["classifier"])


def _chat_batches(n: int = 4) -> DataLoader[Any]:
    rows = [
        {"input_ids": IDS[i % 2], "attention_mask": torch.ones(7, dtype=torch.long), "labels": IDS[i % 2]}
        for i in range(n)
    ]
    return DataLoader(rows, batch_size=2)  # type: ignore[arg-type]


def test_imported_peft_adapter_trains_exports_and_reloads(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        _causal_lm(tiny_llama_dir), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    _randomize_adapters_peft(peft_model)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    callback = LoRAInjectionCallback(adapter_path=str(tmp_path / "adapter"), dropout=0.0)
    assert (callback.spec.r, callback.spec.alpha) == (4, 16)
    task = CausalLMTask(model_name_or_path=str(tiny_llama_dir), learning_rate=1e-2)
    task.configure_model()
    callback.apply(task)
    torch.testing.assert_close(_logits(task.model.eval()), _logits(peft_model.eval()), atol=1e-5, rtol=0)
    imported = {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}
    merge = MergeOnSaveCallback(dirpath=str(tmp_path / "export"))
    trainer(tmp_path, callbacks=[callback, merge], max_steps=1, limit_val_batches=0).fit(task.train(), _chat_batches())
    changed = [n for n, p in task.named_parameters() if p.requires_grad and not torch.equal(p, imported[n])]
    assert changed, "one step trained the imported adapter (and it was not re-imported over)"
    ours = _logits(task.model.eval())
    reloaded = _peft(_causal_lm(tiny_llama_dir), tmp_path / "export/adapter")
    torch.testing.assert_close(_logits(reloaded), ours, atol=1e-5, rtol=0)


def _randomize_adapters_peft(model: Any) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=g)


def test_adapter_path_conflicts_are_one_clear_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    task = _llama(tiny_llama_dir, target_modules=["q_proj", "v_proj"])
    export_model(task, tmp_path / "out")
    with pytest.raises(ValueError, match=r"r=8 but the adapter has r=4.*use_dora=True"):
        LoRAInjectionCallback(adapter_path=str(tmp_path / "out/adapter"), r=8, use_dora=True)
    with pytest.raises(ValueError, match=r"adapter_path='.*nowhere'"):
        LoRAInjectionCallback(adapter_path=str(tmp_path / "nowhere"))


def _qlora(path: Path) -> CausalLMTask:
    from lightning_adapt.callbacks.quantize import QuantizeBaseCallback

    task = _task(path)
    QuantizeBaseCallback(compute_dtype="fp32").apply(task)
    LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]).apply(task)
    _randomize_adapters(task)
    return task.eval()


def test_qlora_merges_into_original_weights_and_reports(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    task = _qlora(tiny_llama_dir)
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    result = MergeOnSaveCallback(str(tmp_path / "orig")).export(None, task, probe_batch=batch)
    assert result.report is not None and result.report.max_abs_dw > 0
    assert result.report.output_max_abs_diff is not None and result.report.output_max_abs_diff > 0
    assert "merge base original vs dequantized over 14 quantized layers: max |ΔW|" in caplog.text
    MergeOnSaveCallback(str(tmp_path / "deq"), merge_base="dequantized").export(None, task)
    reference = _task(tiny_llama_dir)  # LoRA on the full-precision base
    LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]).apply(reference)
    adapters = {n: p for n, p in task.named_parameters() if p.requires_grad}
    reference.load_state_dict(adapters, strict=False)
    expected = _logits(reference.model.eval())
    original_error = (_logits(_causal_lm(tmp_path / "orig/merged")) - expected).abs().max()
    dequantized_error = (_logits(_causal_lm(tmp_path / "deq/merged")) - expected).abs().max()
    print(f"vs LoRA-on-original: original-merge {original_error:.2e}, dequantized-merge {dequantized_error:.2e}")
    assert original_error < 1e-4 < dequantized_error
    weights = load_file(tmp_path / "orig/merged/model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values()), "never re-quantized"


def test_missing_source_and_non_empty_target_fail_before_writing(tiny_llama_dir: Path, tmp_path: Path) -> None:
    task = _qlora(tiny_llama_dir)
    task.source_path = tmp_path / "gone"  # type: ignore[assignment]
    task.model.name_or_path = str(tmp_path / "gone")
    task.__dict__.pop("_lightning_adapt_originals")  # nor what load_pretrained recorded: no original anywhere
    with pytest.raises(ExportError, match=r"source_path='.*gone'.*merge_base='dequantized'"):
        export_model(task, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == []
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"dirpath='.*busy' exists and is not empty.*--overwrite true"):
        export_model(task, tmp_path / "busy", ExportOptions(merge_base="dequantized"))
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"], "no temp dir left behind"


def test_interrupted_export_leaves_nothing_and_rerun_succeeds(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_adapt.export.exporter as export

    task = _llama(tiny_llama_dir)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_model_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(task, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_model(task, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter", "merged"]


def test_streamed_shards_cast_floats_only_and_index_every_key(tmp_path: Path) -> None:
    from lightning_adapt.export.safetensors_io import TensorEntry, parse_size, write_safetensors

    assert [parse_size(s) for s in (1000, "2KB", "1 KiB", "1.5mb")] == [1000, 2000, 1024, 1_500_000]
    tensors = {"a": torch.randn(16, 8), "b": torch.arange(6).view(2, 3), "c": torch.randn(32)}
    entries = [TensorEntry(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()]
    names = write_safetensors(tmp_path, entries, torch.bfloat16, max_shard=300)
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": names[0], "b": names[1], "c": names[1]}
    loaded = {k: v for name in names for k, v in load_file(tmp_path / name).items()}
    assert loaded["a"].dtype == torch.bfloat16 and torch.equal(loaded["a"], tensors["a"].bfloat16())
    assert loaded["b"].dtype == torch.int64 and torch.equal(loaded["b"], tensors["b"])
    with pytest.raises(ExportError, match=r"max_shard_size='5 GBs'"):
        ExportOptions(max_shard_size="5 GBs")


# --------------------------------------------------------------------------- the CLI subcommand


def _all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def _recipe(tmp_path: Path, model_dir: Path, r: int) -> Path:
    recipe = {
        "model": {
            "class_path": "lightning_adapt.tasks.CausalLMTask",
            "init_args": {"model_name_or_path": str(model_dir)},
        },
        "data": {"class_path": "lightning_adapt.data.ChatDataModule", "init_args": {"max_length": 32}},
        "trainer": {"logger": False, "accelerator": "cpu"},
        "lora": {
            "class_path": "lightning_adapt.callbacks.lora.LoRAInjectionCallback",
            "init_args": {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        },
        "memory_report": {"class_path": "lightning_adapt.MemoryReportCallback"},  # asks for the export's memory
    }
    path = tmp_path / f"recipe-r{r}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_export_end_to_end(
    tiny_llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lightning_adapt.cli as cli

    caplog.set_level(logging.INFO)
    recipe = str(_recipe(tmp_path, tiny_llama_dir, r=4))
    main(["fit", "--config", recipe, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
          f"--trainer.default_root_dir={tmp_path}", "--data.init_args.train_size=8"])  # fmt: skip
    ckpt = str(next(tmp_path.rglob("*.ckpt")))
    with monkeypatch.context() as patch:  # an adapter-only checkpoint streams: no model is built
        patch.setattr(cli, "build_model", lambda *args: pytest.fail("the export built the model"))
        main(["export", "--config", recipe, "--ckpt_path", ckpt, "--output", str(tmp_path / "out")])
    assert "(streamed from the source files)" in caplog.text and "memory: peak RSS +" in caplog.text
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"].pop("lightning_adapt_base_fingerprint", None)  # now it reads as a full checkpoint
    checkpoint["state_dict"].pop("lightning_adapt.base_fingerprint", None)
    torch.save(checkpoint, tmp_path / "full.ckpt")
    main(["export", "--config", recipe, "--ckpt_path", str(tmp_path / "full.ckpt"), "--output", str(tmp_path / "mem")])
    assert "merges in memory: the checkpoint is not adapter-only" in caplog.text
    for part in ("merged", "adapter"):  # the streamed export and the in-memory one: the same bits
        streamed, in_memory = _all_tensors(tmp_path / "out" / part), _all_tensors(tmp_path / "mem" / part)
        assert sorted(streamed) == sorted(in_memory)
        assert all(torch.equal(streamed[k], in_memory[k]) and streamed[k].dtype == in_memory[k].dtype for k in streamed)
    main(["export", "--config", recipe, "--ckpt_path", ckpt, "--output", str(tmp_path / "bf16"), "--dtype", "bf16"])
    adapter = load_file(tmp_path / "out/adapter/adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items()), "trained adapter"
    merged = _logits(_causal_lm(tmp_path / "out/merged"))
    torch.testing.assert_close(
        _logits(_peft(_causal_lm(tiny_llama_dir), tmp_path / "out/adapter")), merged, atol=1e-5, rtol=0
    )
    assert (tmp_path / "out/merged/tokenizer_config.json").is_file()
    assert load_file(tmp_path / "bf16/merged/model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(_logits(_causal_lm(tmp_path / "bf16/merged")), merged, atol=0.1, rtol=0.05)
    with pytest.raises(SystemExit) as exit_info:  # a checkpoint trained with another recipe
        main(["export", "--config", str(_recipe(tmp_path, tiny_llama_dir, r=8)), "--ckpt_path", ckpt,
              "--output", str(tmp_path / "other")])  # fmt: skip
    assert exit_info.value.code == 2 and not (tmp_path / "other").exists()
    err = capsys.readouterr().err
    assert "--ckpt_path=" in err and "adapter shapes" in err and "Fix:" in err


def test_the_qlora_probe_runs_in_a_bf16_true_model_and_is_skipped_without_memory(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16-true casts the model to bf16 while the 4-bit layers compute in fp32 (``compute_dtype``): the probe's
    dense stand-ins take and give bf16 as bitsandbytes' layers do. Without the memory for both dense copies of the
    quantized layers the probe is skipped and the report says why (a 1.17B model's would need 8.8 GB in fp32)."""
    import lightning_adapt.export.report as report

    task = _qlora(tiny_llama_dir).to(torch.bfloat16)
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    result = MergeOnSaveCallback(str(tmp_path / "bf16"), evaluate=False).export(None, task, probe_batch=batch)
    assert result is not None and result.report is not None
    assert result.report.output_max_abs_diff is not None and result.report.output_max_abs_diff > 0
    need = 2 * report.dense_bytes(task.model)
    monkeypatch.setattr(report, "available_bytes", lambda device: need)  # 0.9 of it is not enough
    result = MergeOnSaveCallback(str(tmp_path / "tight"), evaluate=False).export(None, task, probe_batch=batch)
    assert result is not None and result.report is not None and result.report.output_max_abs_diff is None
    assert result.report.probe_note is not None and "probe skipped" in result.report.format()
    assert result.report.max_abs_dw > 0, "the weight comparison is still made"
