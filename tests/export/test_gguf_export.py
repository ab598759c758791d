"""``format: gguf`` through the export (MergeOnSaveCallback, ``lightning-adapt export``): llama.cpp's files replace
``merged/`` inside the atomic export, the model's GGUF holds exactly what the writer makes of the merged safetensors,
and what cannot become GGUF is refused before anything is written. The writer itself: tests/export/test_gguf.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.hf import Holder
from helpers.toy import ToyModule
from test_gguf import tiny_model, tokenizer  # noqa: F401 - the module-scoped tokenizer fixture

from lightning_adapt.adapters.lora import lora_modules
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.merge import MergeOnSaveCallback
from lightning_adapt.errors import ExportError
from lightning_adapt.export.gguf import write_gguf
from lightning_adapt.export.safetensors_io import TensorEntry, read_index

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.slow


def _adapted(path: Path, **lora: Any) -> Holder:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    holder = Holder(model, path)
    LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, **lora).apply(holder)
    with torch.no_grad():
        for _, layer in lora_modules(holder):
            layer.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return holder.eval()


def _tensors(file: Path) -> dict[str, Any]:
    return {t.name: t.data.copy() for t in gguf.GGUFReader(file).tensors}


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_format_gguf_writes_llama_cpps_files_in_place_of_merged(gguf_type: str, tokenizer: Any, tmp_path: Path) -> None:  # noqa: F811
    holder = _adapted(tiny_model(tmp_path / "base", tokenizer), target_modules=["q_proj", "v_proj"])
    out = tmp_path / "export"
    result = MergeOnSaveCallback(str(out), evaluate=False, format="gguf", gguf_type=gguf_type).export(None, holder)  # type: ignore[arg-type]
    assert result is not None and result.merged is None
    assert result.gguf == [out / f"gguf/model-{gguf_type}.gguf", out / "gguf/adapter-f32.gguf"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "gguf"]  # merged/ was the GGUF's source, removed
    MergeOnSaveCallback(str(tmp_path / "plain"), evaluate=False).export(None, holder)  # type: ignore[arg-type]
    merged = tmp_path / "plain/merged"
    entries = [TensorEntry(k, s.shape, s.dtype, s.read, s) for k, s in read_index(merged).items()]
    write_gguf(tmp_path / "direct.gguf", merged, entries, gguf_type)  # type: ignore[arg-type]
    ours, direct = _tensors(out / f"gguf/model-{gguf_type}.gguf"), _tensors(tmp_path / "direct.gguf")
    assert sorted(ours) == sorted(direct) and all((ours[k] == direct[k]).all() for k in ours)
    adapter = gguf.GGUFReader(out / "gguf/adapter-f32.gguf")
    assert len([t for t in adapter.tensors if t.name.endswith(".lora_a")]) == 4  # q and v of 2 blocks


def test_what_cannot_become_gguf_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    callback = MergeOnSaveCallback(str(tmp_path / "out"), evaluate=False, format="gguf")
    toy = ToyModule()
    LoRAInjectionCallback(r=2, target_modules=["q_proj"]).apply(toy)
    with pytest.raises(ExportError, match=r"format='gguf': .* holds no Hugging Face model.*Fix: format: safetensors"):
        callback.export(None, toy)  # type: ignore[arg-type]
    gpt2 = Holder(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), tmp_path)
    LoRAInjectionCallback(r=2, target_modules=["c_attn"]).apply(gpt2)
    with pytest.raises(ExportError, match=r"format='gguf': architecture 'gpt2' has no GGUF export; supported: \["):
        callback.export(None, gpt2)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match=r"gguf_type='q4': allowed \['f32', 'f16', 'bf16', 'q8_0'\]"):
        MergeOnSaveCallback(format="gguf", gguf_type="q4")  # type: ignore[arg-type]
