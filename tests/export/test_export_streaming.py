"""The streamed export (a checkpoint's adapters merged tensor by tensor into the base's safetensors files, no model
built) writes the same bits as the export of the live trained model and holds one tensor at a time (killed exports:
tests/reliability/test_crash_safety.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.export_kill_run import adapter_state
from helpers.hf import Holder, llama_dir, read_tensors
from helpers.toy import IDS, tiny_bert, tiny_gpt2, tiny_llama

from lightning_adapt.adapters.inject import LoRASpec
from lightning_adapt.adapters.lora import lora_modules
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.merge import MergeOnSaveCallback
from lightning_adapt.errors import ExportError, setting_names
from lightning_adapt.export.adapter_sources import adapters_from_checkpoint, adapters_from_peft
from lightning_adapt.export.exporter import ExportOptions, export_model
from lightning_adapt.export.safetensors_io import (
    StoredTensor,
    model_keys,
    read_index,
)
from lightning_adapt.export.stream_export import checkpoint_streaming_unavailable, export_streamed

ROOT = Path(__file__).resolve().parents[2]


def _save_base(kind: str, path: Path) -> type:
    """Save a tiny base model of ``kind`` to ``path``; returns the Auto class that loads the adapted model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "bert":  # a bare encoder checkpoint (keys "encoder..."), loaded with a new classifier head
        tiny_bert().bert.save_pretrained(path)
        return AutoModelForSequenceClassification  # type: ignore[no-any-return]
    model = tiny_gpt2() if kind == "gpt2" else tiny_llama(tie_word_embeddings=False)  # untied, GQA
    model.save_pretrained(path, max_shard_size="40KB" if kind == "llama-sharded" else "5GB")
    return AutoModelForCausalLM  # type: ignore[no-any-return]


def _adapted(kind: str, path: Path, lora: dict[str, Any], quantize: bool = False) -> tuple[Holder, Any]:
    auto = _save_base(kind, path)
    extra = {"num_labels": 3} if kind == "bert" else {}
    holder = Holder(auto.from_pretrained(path, dtype=torch.float32, local_files_only=True, **extra), path)
    specs: list[object] = []
    if quantize:
        from lightning_adapt.callbacks.quantize import QuantizeBaseCallback

        quant = QuantizeBaseCallback(compute_dtype="fp32")
        quant.apply(holder)
        specs.append(quant.spec)
    callback = LoRAInjectionCallback(**{"r": 4, "alpha": 12, "dropout": 0.0, **lora})  # scaling 3: not exact
    callback.apply(holder)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_modules(holder):
            layer.lora_B.weight.normal_(0, 0.2, generator=g)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=g))
        for name in callback.spec.modules_to_save:
            holder.model.get_submodule(name).weight.normal_(generator=g)  # a "trained" head
    return holder.eval(), [*specs, callback.spec]


def _assert_bitwise_equal(expected: Path, got: Path) -> None:
    a, b = read_tensors(expected), read_tensors(got)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert differ == []


VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"kind": "llama", "lora": {"target_modules": "all-linear"}},
    "lora-bf16-out": {"kind": "llama", "lora": {}, "dtype": "bf16"},
    "rslora": {"kind": "llama", "lora": {"use_rslora": True, "r": 8}},
    "dora": {"kind": "llama", "lora": {"use_dora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}},
    "qlora-original": {"kind": "llama", "lora": {"target_modules": ["q_proj", "v_proj", "up_proj"]}, "quantize": True},
    "sharded-in-and-out": {"kind": "llama-sharded", "lora": {}, "shard": "60KB"},
    "gpt2-conv1d": {"kind": "gpt2", "lora": {"target_modules": ["c_attn", "c_proj"]}},
    "gpt2-square-only": {"kind": "gpt2", "lora": {"target_modules": ["attn.c_proj"]}},
    "gpt2-qlora": {"kind": "gpt2", "lora": {"target_modules": ["c_attn", "c_proj"]}, "quantize": True},
    "bert-classifier": {
        "kind": "bert",
        "lora": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streamed_export_equals_the_live_models_bit_for_bit(variant: str, tmp_path: Path) -> None:
    v = VARIANTS[variant]
    holder, specs = _adapted(v["kind"], tmp_path / "base", v["lora"], v.get("quantize", False))
    options = ExportOptions(dtype=v.get("dtype"), max_shard_size=v.get("shard", "5GB"))
    to_save = [m for spec in specs for m in getattr(spec, "modules_to_save", ())]
    live = export_model(holder, tmp_path / "memory", options, modules_to_save=to_save)  # what fit's end writes
    checkpoint = MergeOnSaveCallback(
        str(tmp_path / "ckpt"), dtype=v.get("dtype"), max_shard_size=options.max_shard_size
    )
    from_ckpt = checkpoint.export_checkpoint(holder, holder.state_dict(), specs)  # adapter-only: trainable keys
    assert not live.streamed and from_ckpt.streamed and from_ckpt.memory is None  # memory: measured only when asked
    _assert_bitwise_equal(tmp_path / "memory/merged", tmp_path / "ckpt/merged")
    _assert_bitwise_equal(tmp_path / "memory/adapter", tmp_path / "ckpt/adapter")
    config = json.loads((tmp_path / "ckpt/adapter/adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "memory/adapter/adapter_config.json").read_text())
    if "shard" in v:
        assert len(read_index(tmp_path / "base")) > 0 and (tmp_path / "base/model.safetensors.index.json").is_file()
        assert len(list((tmp_path / "ckpt/merged").glob("model-*.safetensors"))) > 1
    if v.get("quantize"):
        assert from_ckpt.report is not None and from_ckpt.report.layers == 6 and from_ckpt.report.max_abs_dw > 0
        return  # the adapted model computes on NF4 weights: its logits are not the merged model's
    if v.get("dtype") is None:
        merged = type(holder.model).from_pretrained(tmp_path / "ckpt/merged", local_files_only=True).eval()
        with torch.no_grad():
            expected, got = holder.model(input_ids=IDS).logits, merged(input_ids=IDS).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_requantized_gap_equals_the_live_report_on_adapted_layers(tmp_path: Path) -> None:
    from lightning_adapt.export.original import source_for

    targets = ["q_proj", "v_proj", "up_proj"]
    holder, specs = _adapted("llama", tmp_path / "base", {"target_modules": targets}, quantize=True)
    result = MergeOnSaveCallback(str(tmp_path / "ckpt")).export_checkpoint(holder, holder.state_dict(), specs)
    source = source_for(holder, holder.model, None)
    expected = max(
        float(
            (layer.merged_weight(source.get(name.removeprefix("model.") + ".weight")) - layer.merged_weight())
            .abs()
            .max()
        )
        for name, layer in lora_modules(holder)
    )
    assert result.report is not None and result.report.max_abs_dw == expected > 0
    assert "needs a live model" in result.report.format()


def test_a_peft_directory_streams_into_the_base(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    _save_base("gpt2", tmp_path / "base")
    load = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True).eval()  # noqa: E731
    peft_model = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    keys = model_keys(read_index(tmp_path / "base"))
    adapters = adapters_from_peft(tmp_path / "adapter", keys)
    assert adapters.settings == LoRASpec(4, 8.0, 0.0, use_rslora=False, use_dora=True)
    export_streamed(tmp_path / "base", tmp_path / "out", adapters, keys=keys)
    reference = PeftModel.from_pretrained(load(), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out/merged", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0)


def test_mismatched_adapters_fail_before_writing(tmp_path: Path) -> None:
    holder, _ = _adapted("llama", tmp_path / "base", {})
    state = holder.state_dict()
    keys = model_keys(read_index(tmp_path / "base"))
    shapes = r"--ckpt_path='x': the adapter shapes do not fit.*r=8.*Fix:"
    with pytest.raises(ExportError, match=shapes), setting_names(ckpt_path="--ckpt_path='x'"):  # as the CLI names it
        adapters_from_checkpoint(state, keys, LoRASpec(8, 16.0))
    with pytest.raises(ExportError, match=r"use_dora=True"):
        adapters_from_checkpoint(state, keys, LoRASpec(4, 8.0, use_dora=True))
    other = {k.replace("layers.0", "layers.9"): v for k, v in state.items()}
    with pytest.raises(ExportError, match=r"adapted layers .*layers.9.* have no weight in the base checkpoint"):
        adapters_from_checkpoint(other, keys, LoRASpec(4, 8.0))
    with pytest.raises(ExportError, match=r"tied to another module"):
        adapters_from_checkpoint(state, keys, LoRASpec(4, 8.0), tied_keys=["model.layers.0.self_attn.q_proj.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_when_streaming_is_not_possible_the_reason_is_given(tmp_path: Path) -> None:
    holder, specs = _adapted("llama", tmp_path / "base", {})
    state = holder.state_dict()
    assert checkpoint_streaming_unavailable(holder, state, specs, "original") is None
    reasons = {
        "full fine-tuning": checkpoint_streaming_unavailable(holder, state, [], "original"),
        "not adapter-only": checkpoint_streaming_unavailable(holder, {"x": torch.ones(1)}, specs, "original"),
        "not a Hugging Face directory": checkpoint_streaming_unavailable(
            Holder(holder.model, tmp_path / "nowhere"), state, specs, "original"
        ),
    }
    assert all(r is not None and key in r for key, r in reasons.items()), reasons


# --------------------------------------------------------------------------- memory


def _adapter_state(hidden: int, layers: int) -> dict[str, torch.Tensor]:
    return adapter_state(hidden, layers, seed=1)


def test_at_most_one_base_tensor_is_alive_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor read from the base is released before the next is read (weak references prove it)."""
    llama_dir(tmp_path / "base", hidden=64, layers=4, vocab=256)
    keys = model_keys(read_index(tmp_path / "base"))
    adapters = adapters_from_checkpoint(_adapter_state(64, 4), keys, LoRASpec(8, 16.0))
    refs: list[weakref.ref[torch.Tensor]] = []
    alive_at_read: list[int] = []
    read = StoredTensor.read

    def tracked(self: StoredTensor) -> torch.Tensor:
        alive_at_read.append(sum(ref() is not None for ref in refs))
        tensor = read(self)
        refs.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(StoredTensor, "read", tracked)
    bf16 = ExportOptions(dtype="bf16")  # a cast: every tensor is read (as stored, they are copied file to file)
    export_streamed(tmp_path / "base", tmp_path / "out", adapters, bf16, keys=keys)
    assert len(alive_at_read) == len(keys) == 39 and max(alive_at_read) == 0
    holding: list[torch.Tensor] = []  # the claim can fail: a caller that keeps what it reads

    def hoarding(self: StoredTensor) -> torch.Tensor:
        tensor = tracked(self)
        holding.append(tensor)
        return tensor

    refs.clear()
    alive_at_read.clear()
    monkeypatch.setattr(StoredTensor, "read", hoarding)
    export_streamed(tmp_path / "base", tmp_path / "out2", adapters, bf16, keys=keys)
    assert max(alive_at_read) == len(keys) - 1


def test_stored_tensors_are_copied_file_to_file_or_through_a_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llama_dir(tmp_path / "base", hidden=64, layers=2, vocab=256)
    keys = model_keys(read_index(tmp_path / "base"))
    adapters = adapters_from_checkpoint(_adapter_state(64, 2), keys, LoRASpec(8, 16.0))
    export_streamed(tmp_path / "base", tmp_path / "kernel", adapters, keys=keys)
    monkeypatch.delattr(os, "copy_file_range")  # not Linux: copied 8 MB at a time through one buffer
    export_streamed(tmp_path / "base", tmp_path / "buffer", adapters, keys=keys)
    _assert_bitwise_equal(tmp_path / "kernel/merged", tmp_path / "buffer/merged")
    base, merged = read_tensors(tmp_path / "base"), read_tensors(tmp_path / "kernel/merged")
    same = sorted(k for k in base if torch.equal(base[k], merged[k]))
    assert len(same) == len(base) - 4 and not any("q_proj" in k or "v_proj" in k for k in same)


def test_the_callbacks_export_reads_each_header_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking the source, the merge into the originals and the QLoRA report of a sharded 4-bit base share one
    read of each header."""
    import lightning_adapt.export.safetensors_io as io

    holder, _ = _adapted("llama-sharded", tmp_path / "base", {}, quantize=True)
    reads: list[str] = []
    real = io.read_header

    def counted(file: Path, *args: Any) -> dict[str, StoredTensor]:
        reads.append(Path(file).name)
        return real(file, *args)

    monkeypatch.setattr(io, "read_header", counted)
    result = MergeOnSaveCallback(str(tmp_path / "out"), evaluate=False).export(None, holder)  # type: ignore[arg-type]
    assert result is not None and result.report is not None
    assert len(reads) > 1 and sorted(reads) == sorted(set(reads)), reads  # every shard, each once


def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path: Path) -> None:
    """Measured in a fresh process, every tensor read and cast to bf16: the export's peak RSS stays within 3x
    the largest tensor in fp32, which is less than the model (a merge that held the model could not)."""
    size = llama_dir(tmp_path / "base", hidden=512, layers=8, vocab=12000)  # 133 MB, largest tensor 25 MB
    torch.save({"state_dict": _adapter_state(512, 8)}, tmp_path / "adapter.pt")
    script = textwrap.dedent(f"""
        import torch
        from lightning_adapt.export.adapter_sources import adapters_from_checkpoint
        from lightning_adapt.export.exporter import ExportOptions
        from lightning_adapt.export.safetensors_io import read_index
        from lightning_adapt.export.stream_export import export_streamed
        from lightning_adapt.adapters.inject import LoRASpec
        from lightning_adapt.export.safetensors_io import model_keys
        keys = model_keys(read_index({str(tmp_path / "base")!r}))
        state = torch.load({str(tmp_path / "adapter.pt")!r})["state_dict"]
        adapters = adapters_from_checkpoint(state, keys, LoRASpec(8, 16.0))
        bf16 = ExportOptions(dtype="bf16", measure_memory=True)  # every tensor is read and cast (else most are copied file to file)
        memory = export_streamed({str(tmp_path / "base")!r}, {str(tmp_path / "out")!r}, adapters, bf16, keys=keys).memory
        print("PEAK", memory.peak_above_bytes, memory.largest_fp32_bytes, memory.model_bytes)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    peak, largest, model = map(int, next(ln for ln in done.stdout.splitlines() if ln.startswith("PEAK")).split()[1:])
    assert model == size // 2 and largest == 4 * 12000 * 512
    print(f"peak {peak / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB in fp32, source {size / 1e6:.1f} MB")
    assert 0 < peak <= 3 * largest < size, (peak, largest, size)


def test_a_classification_checkpoint_streams_without_building_the_model(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The CLI's case: the task's model is not built (it would be in ``configure_model``); its ``hf_config``
    carries the new head's labels, the bare encoder checkpoint gets the ``bert.`` prefix, the head is appended."""
    from transformers import AutoModelForSequenceClassification

    from lightning_adapt.tasks import SequenceClassificationTask

    trained = SequenceClassificationTask(model_name_or_path=str(tiny_bert_dir), num_labels=3)
    trained.configure_model()
    callback = LoRAInjectionCallback(r=4, alpha=12, dropout=0.0, modules_to_save=["classifier"])
    callback.apply(trained)
    with torch.no_grad():
        for _, layer in lora_modules(trained):
            layer.lora_B.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
        trained.model.classifier.weight.normal_(generator=torch.Generator().manual_seed(1))
    trained.eval()
    state = trained.state_dict()
    fresh = SequenceClassificationTask(model_name_or_path=str(tiny_bert_dir), num_labels=3)
    assert fresh.model is None or fresh.model.training, "the export must not need the trained module"
    assert checkpoint_streaming_unavailable(fresh, state, [callback.spec], "original") is None
    MergeOnSaveCallback(str(tmp_path / "ckpt")).export_checkpoint(fresh, state, [callback.spec])
    export_model(trained, tmp_path / "memory", modules_to_save=["classifier"])
    _assert_bitwise_equal(tmp_path / "memory/merged", tmp_path / "ckpt/merged")
    _assert_bitwise_equal(tmp_path / "memory/adapter", tmp_path / "ckpt/adapter")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt/merged", local_files_only=True)
    with torch.no_grad():
        expected = trained.model(input_ids=IDS).logits
        torch.testing.assert_close(merged.eval()(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    assert (tmp_path / "ckpt/merged/tokenizer_config.json").is_file()
