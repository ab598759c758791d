"""The export of adapters whose init (PiSSA / OLoRA / LoftQ) changed the base: every path writes the model that was
trained, on the original weights, ``W + s·(B·A - B0·A0)``, and a PEFT adapter (the rank-2r ``[A; A0]``, ``[B, -B0]``)
that PEFT loads onto the original base to the same logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.hf import Holder
from helpers.toy import IDS, tiny_llama
from safetensors.torch import load_file

from lightning_adapt.adapters.init import attach_before_quantize
from lightning_adapt.adapters.lora import LoRALinear, lora_modules
from lightning_adapt.adapters.prepare import changed_base_hook
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.merge import MergeOnSaveCallback
from lightning_adapt.export.exporter import ExportOptions, export_model
from lightning_adapt.layers import quantized_layers

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _trained(init: str, directory: Path, quantize: bool) -> tuple[Holder, list[object]]:
    """A tiny Llama saved to ``directory``, loaded back, (quantized,) adapted with ``init``, its adapters moved as
    training would."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tiny_llama(tie_word_embeddings=False).save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    holder, specs = Holder(model, directory), []
    if quantize:
        from lightning_adapt.callbacks.quantize import QuantizeBaseCallback

        quant = QuantizeBaseCallback(compute_dtype="fp32")
        specs.append(quant.spec)
    lora = LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules=TARGETS, init=init)
    if quantize:  # as the callbacks do in fit: the changed base is computed from W just before it is quantized
        attach_before_quantize(holder, changed_base_hook(lora.spec))
        quant.apply(holder)
    lora.apply(holder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_modules(holder):
            layer.lora_A.weight.add_(0.05 * torch.randn(layer.lora_A.weight.shape, generator=g))
            layer.lora_B.weight.add_(0.05 * torch.randn(layer.lora_B.weight.shape, generator=g))
    return holder.eval(), [*specs, lora.spec]


def _expected(layer: LoRALinear, original: torch.Tensor) -> torch.Tensor:
    assert layer.lora_A0 is not None and layer.lora_B0 is not None
    delta = layer.lora_B.weight @ layer.lora_A.weight - layer.lora_B0 @ layer.lora_A0
    return (original + layer.scaling * delta).detach()


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_qlora_with_a_changed_base_exports_the_trained_model_on_the_original_weights(init: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    holder, specs = _trained(init, tmp_path / "base", quantize=True)
    assert len(quantized_layers(holder)) == 14 and len(lora_modules(holder)) == 6
    original = load_file(tmp_path / "base/model.safetensors")
    options = ExportOptions()
    export_model(holder, tmp_path / "memory", options)
    state = holder.state_dict()  # adapter-only: the trained tensors, A0 and B0
    assert any(key.endswith("lora_A0") for key in state)
    MergeOnSaveCallback(str(tmp_path / "ckpt"), evaluate=False).export_checkpoint(holder, state, specs)
    merged = {how: load_file(tmp_path / how / "merged/model.safetensors") for how in ("memory", "ckpt")}
    assert sorted(merged["memory"]) == sorted(original)  # no A0 / B0 among the model's tensors
    for name, layer in lora_modules(holder.model):
        want = _expected(layer, original[name + ".weight"])
        for how, tensors in merged.items():
            torch.testing.assert_close(tensors[name + ".weight"], want, atol=1e-6, rtol=0, msg=f"{how} {name}")
    assert all(torch.equal(merged["memory"][k], merged["ckpt"][k]) for k in original)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "memory/merged", local_files_only=True).eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, local_files_only=True)
    for how in ("memory", "ckpt"):
        peft = PeftModel.from_pretrained(base, tmp_path / how / "adapter").eval()
        assert peft.peft_config["default"].r == 8 and peft.peft_config["default"].lora_alpha == 16
        with torch.no_grad():
            torch.testing.assert_close(peft(IDS).logits, reloaded(IDS).logits, atol=1e-4, rtol=0)
        base = peft.unload()


def test_a_float_base_pissa_merges_to_the_live_model_by_either_path(tmp_path: Path) -> None:
    """From the live model, the residual plus ``s·B·A``; from the checkpoint, streamed, the original plus
    ``s·(B·A - B0·A0)``: the same model."""
    holder, specs = _trained("pissa", tmp_path / "base", quantize=False)
    with torch.no_grad():
        live: Any = holder.model(IDS).logits
    export_model(holder, tmp_path / "memory")
    MergeOnSaveCallback(str(tmp_path / "streamed"), evaluate=False).export_checkpoint(
        holder, holder.state_dict(), specs
    )
    memory, streamed = (load_file(tmp_path / how / "merged/model.safetensors") for how in ("memory", "streamed"))
    assert sorted(memory) == sorted(streamed)
    assert all(torch.allclose(memory[k], streamed[k], atol=1e-5, rtol=0) for k in memory)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed/merged", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, live, atol=1e-4, rtol=0)
