"""A zoo of architectures, each a tiny random instance built from its config (no download): LoRA and QLoRA train
two steps with every adapter tensor receiving a gradient, merged == unmerged, the trained tensors streamed into the
saved files (``lightning-adapt export``) equal the live model's export bit for bit, and transformers reloads the
merged model. ``docs/zoo.md`` is this suite's table
(``python tests/adapters/test_zoo.py`` rewrites it; a test fails when it differs)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_adapt.adapters.delta import lora_layers
from lightning_adapt.adapters.inject import LoRASpec, inject_lora
from lightning_adapt.adapters.lora import lora_modules, merge_lora
from lightning_adapt.adapters.parameters import LoRAParameters
from lightning_adapt.errors import ExportError
from lightning_adapt.export.exporter import ExportOptions, export_model
from lightning_adapt.export.original import spill_originals
from lightning_adapt.layers import adapter_param_ids, quantized_layers
from lightning_adapt.quantize import QuantConfig, QuantPlan, quantize_model

pytestmark = pytest.mark.slow

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "docs" / "zoo.md"
V = 128  # vocabulary
_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _decoder(config: str, model: str, **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        sizes = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, **_IDS)  # fmt: skip
        return getattr(tf, model)(getattr(tf, config)(**(sizes | extra)))

    return build


def _hf(model: str, config: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        return getattr(tf, model)(getattr(tf, config)(**kwargs))

    return build


_TEXT = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_VISION = {"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
_T5 = {"vocab_size": V, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, **_IDS}
_WHISPER = {
    "vocab_size": V, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_mel_bins": 8,
    "max_source_positions": 16, "max_target_positions": 32, "decoder_start_token_id": 1, **_IDS,
}  # fmt: skip
_GPT2 = {
    "vocab_size": V,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_CLIP_TEXT = _TEXT | {"max_position_embeddings": 32, "bos_token_id": 1, "eos_token_id": 2}
_CLIP = {"projection_dim": 16, "text_config": _CLIP_TEXT, "vision_config": _VISION | {"num_attention_heads": 4}}

#: name -> (builder, inputs kind)
ZOO: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "llama": (_decoder("LlamaConfig", "LlamaForCausalLM"), "ids"),
    "mistral": (_decoder("MistralConfig", "MistralForCausalLM"), "ids"),
    "qwen2": (_decoder("Qwen2Config", "Qwen2ForCausalLM"), "ids"),
    "qwen2-moe": (_decoder("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_MOE), "ids"),
    "mixtral": (_decoder("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2), "ids"),
    "phi3": (_decoder("Phi3Config", "Phi3ForCausalLM"), "ids"),
    "gemma": (_decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8), "ids"),
    "gpt2": (_hf("GPT2LMHeadModel", "GPT2Config", **_GPT2), "ids"),
    "bert": (_hf("BertForSequenceClassification", "BertConfig", **_TEXT, num_labels=3), "ids"),
    "t5": (_hf("T5ForConditionalGeneration", "T5Config", **_T5, decoder_start_token_id=0), "seq2seq"),
    "vit": (_hf("ViTForImageClassification", "ViTConfig", **_VISION, num_attention_heads=4, num_labels=3), "pixels"),
    "whisper": (_hf("WhisperForConditionalGeneration", "WhisperConfig", **_WHISPER), "audio"),
    "clip": (_hf("CLIPModel", "CLIPConfig", **_CLIP), "text+pixels"),
}
#: parameters read outside a Linear's forward, adapted besides `all-linear` (transformers 5's fused 3-D experts)
TARGET_PARAMETERS: dict[str, tuple[str, ...]] = {
    "qwen2-moe": ("experts.gate_up_proj", "experts.down_proj"),
    "mixtral": ("experts.gate_up_proj", "experts.down_proj"),
}
#: where a checkpoint's adapters cannot stream into the saved files, and why: transformers 5 converts some
#: checkpoints on load (fused MoE experts saved per expert, ViT's and CLIP's renamed modules), so the live model's
#: keys are not the file's. Their export merges the live model (checked here, and reloaded).
NOT_STREAMED = {
    "qwen2-moe": "fused experts are saved per expert",
    "mixtral": "fused experts are saved per expert",
    "vit": "transformers renames its modules on load",
    "clip": "transformers renames its parameters on load",
    "t5": "its tied embeddings are saved under another of their names",
}


def _inputs(kind: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 8), generator=g)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    return {
        "ids": {"input_ids": ids},
        "seq2seq": {"input_ids": ids, "decoder_input_ids": ids},
        "pixels": {"pixel_values": pixels},
        "audio": {"input_features": torch.randn(2, 8, 32, generator=g), "decoder_input_ids": ids},
        "text+pixels": {"input_ids": ids, "pixel_values": pixels},
    }[kind]


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.logits_per_image  # CLIP


def _base(name: str, directory: Path) -> nn.Module:
    """The architecture's tiny random model, saved as a Hugging Face directory and loaded back from it (so that
    the export can stream from its files), in eval mode (no dropout: outputs are deterministic)."""
    torch.manual_seed(0)
    model = ZOO[name][0]()
    model.save_pretrained(directory)
    return type(model).from_pretrained(directory, local_files_only=True).eval()


def _spec(name: str) -> LoRASpec:
    return LoRASpec(r=4, alpha=8.0, target_modules="all-linear", target_parameters=TARGET_PARAMETERS.get(name, ()))


def _adapt(model: nn.Module, method: str, name: str) -> None:
    if method == "qlora":
        quantize_model(model, QuantConfig(mode="nf4", compute_dtype=torch.float32))
    inject_lora(model, _spec(name))


def _train_two_steps(model: nn.Module, kind: str) -> list[str]:
    """Two AdamW steps; returns the adapter tensors that got no gradient in the second (B is 0 in the first)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        _output(model, _inputs(kind, step)).float().pow(2).mean().backward()
        optimizer.step()
    ids = adapter_param_ids(model)
    return [n for n, p in model.named_parameters() if id(p) in ids and (p.grad is None or not p.grad.abs().sum())]


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("name", list(ZOO))
def test_the_zoo_trains_merges_exports_and_reloads(name: str, method: str, tmp_path: Path) -> None:
    kind = ZOO[name][1]
    model = _base(name, tmp_path / "base")
    probe = _inputs(kind, 7)
    if method == "qlora":  # as QuantizeBaseCallback does with MergeOnSaveCallback: originals no file holds, kept
        plan = QuantPlan(QuantConfig(mode="nf4", compute_dtype=torch.float32))
        spill_originals(model, plan.selected(model), tmp_path / "run")
        quantize_model(model, plan.config)
    with torch.no_grad():
        before = _output(model, probe)
    inject_lora(model, _spec(name))
    with torch.no_grad():
        assert torch.equal(_output(model, probe), before), "a fresh adapter changes nothing"
    assert _train_two_steps(model, kind) == [], "every adapter tensor receives a gradient"
    with torch.no_grad():
        live = _output(model, probe)
        merged = _output(merge_lora(copy.deepcopy(model)), probe)
    torch.testing.assert_close(merged, live, atol=1e-4 if method == "qlora" else 1e-5, rtol=0)
    options = ExportOptions()
    export_model(model, tmp_path / "memory", options)
    memory = load_file(tmp_path / "memory/merged/model.safetensors")
    if name not in NOT_STREAMED:  # `lightning-adapt export`: the trained tensors streamed into the saved files
        _export_checkpoint(model, tmp_path, [_spec(name), *([plan] if method == "qlora" else [])])
        streamed = load_file(tmp_path / "streamed/merged/model.safetensors")
        assert sorted(memory) == sorted(streamed) and all(torch.equal(memory[k], streamed[k]) for k in memory)
    else:  # refused with the reason before anything is written, never written wrong
        with pytest.raises(ExportError, match="adapter"):
            _export_checkpoint(model, tmp_path, [_spec(name), *([plan] if method == "qlora" else [])])
        assert not (tmp_path / "streamed").exists()
    reloaded = type(model).from_pretrained(tmp_path / "memory/merged", local_files_only=True).eval()
    with torch.no_grad():
        again = _output(reloaded, probe)
    if method == "lora":
        torch.testing.assert_close(again, live, atol=1e-5, rtol=0)
    else:  # merged into the original full-precision weights: the trained adapter on the unquantized base
        name_, layer = lora_modules(model)[0]
        spill = tmp_path / "run/original_weights.safetensors"
        original = load_file(tmp_path / "base/model.safetensors") | (load_file(spill) if spill.is_file() else {})
        key = name_ + ".weight"
        delta = layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight).detach()
        delta = delta if delta.shape == original[key].shape else delta.T  # GPT-2's Conv1D stores (in, out)
        torch.testing.assert_close(memory[key], original[key] + delta, atol=1e-6, rtol=0)


def _export_checkpoint(model: nn.Module, tmp_path: Path, specs: list[object]) -> None:
    """Export the trained tensors of ``model`` (its adapter-only checkpoint) into ``tmp_path / "base"``'s files."""
    from helpers.hf import Holder

    from lightning_adapt.callbacks.merge import MergeOnSaveCallback

    holder = Holder(model, tmp_path / "base")
    state = {name: p.detach() for name, p in holder.named_parameters() if p.requires_grad}
    MergeOnSaveCallback(str(tmp_path / "streamed"), evaluate=False).export_checkpoint(holder, state, specs)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (torchvision has no build for this project's CPU torch wheel)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (layers 2-2-2-2, 64..512 channels), as torchvision builds it, at width 1/8."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, cout in enumerate(width * 2**k for k in range(4)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))  # type: ignore[no-any-return]


def _transformer() -> nn.Module:
    return nn.Transformer(32, 4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64, batch_first=True)


#: torch modules (not Hugging Face): name -> (builder, inputs, target_modules)
TORCH_ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], tuple[torch.Tensor, ...]], Any]] = {
    "resnet18": (ResNet18, lambda g: (torch.randn(2, 3, 32, 32, generator=g),), ["conv1", "conv2"]),
    "nn.Transformer": (
        _transformer,
        lambda g: (torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, 32, generator=g)),
        "all-linear",
    ),
}


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("name", list(TORCH_ZOO))
def test_torch_modules_train_merge_and_export(name: str, method: str, tmp_path: Path) -> None:
    build, inputs, targets = TORCH_ZOO[name]
    torch.manual_seed(0)
    model = build().eval()
    if method == "qlora":  # every Linear that is no output head: the Transformer's FFNs (its attention stays fp)
        quantize_model(model, QuantConfig(mode="nf4", compute_dtype=torch.float32))
    probe = inputs(torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(*probe)
    inject_lora(model, LoRASpec(r=4, alpha=8.0, target_modules=targets))
    with torch.no_grad():
        # W + 0·BA holds W's values at another address, and CPU GEMMs round by alignment and thread count: the
        # nn.Transformer's attentions then differ by ulps (8e-7 on one thread, 1.1e-6 on two); an adapter with B != 0
        # at step 0 would move it by ~1e-1
        torch.testing.assert_close(model(*probe), before, atol=1e-5, rtol=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        model(*inputs(torch.Generator().manual_seed(step))).pow(2).mean().backward()
        optimizer.step()
    ids = adapter_param_ids(model)
    assert ids and all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if id(p) in ids)
    with torch.no_grad():
        live = model(*probe)
        merged = merge_lora(copy.deepcopy(model))
        torch.testing.assert_close(merged(*probe), live, atol=1e-4 if method == "qlora" else 1e-5, rtol=0)
    if method == "qlora":
        return  # the in-memory export of a module without a source merges into the originals: see the callbacks
    export_model(model, tmp_path / "memory", ExportOptions())
    reloaded = build().eval()
    reloaded.load_state_dict(load_file(tmp_path / "memory/merged/model.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*probe), live, atol=1e-5, rtol=0)


def _torch_row(name: str) -> str:
    build, _, targets = TORCH_ZOO[name]
    counts = []
    for method in ("lora", "qlora"):
        torch.manual_seed(0)
        model = build()
        if method == "qlora":
            quantize_model(model, QuantConfig(mode="nf4", compute_dtype=torch.float32))
        inject_lora(model, LoRASpec(r=4, alpha=8.0, target_modules=targets))
        counts.append((len(list(adapter_param_ids(model))) // 2, len(quantized_layers(model))))
    (lora, _), (_, quantized) = counts
    return f"| {name} | `{type(model).__name__}` | {lora} | – | {quantized} | ✓ | ✓ | in memory (no source files) |"


def _row(name: str) -> str:
    counts = []
    for method in ("lora", "qlora"):
        torch.manual_seed(0)
        model = ZOO[name][0]()
        _adapt(model, method, name)
        counts.append((len(lora_modules(model)), len(quantized_layers(model))))
    cls = type(model).__name__
    (lora, _), (_, quantized) = counts
    export = f"live model only: {NOT_STREAMED[name]}" if name in NOT_STREAMED else "= live model"
    adapted = [p for _, m in lora_layers(model) if isinstance(m, LoRAParameters) for p in m.parameter_names]
    params = f"{len(adapted)} ({', '.join(sorted(set(adapted)))})" if adapted else "–"
    return f"| {name} | `{cls}` | {lora} | {params} | {quantized} | ✓ | ✓ | {export} |"


def render() -> str:
    lines = [
        "| architecture | class | LoRA layers (`all-linear`) | `target_parameters` | QLoRA: 4-bit layers | LoRA | QLoRA "
        "| export |",
        "|---|---|---:|---|---:|---|---|---|",
    ]
    rows = [*(_row(name) for name in ZOO), *(_torch_row(name) for name in TORCH_ZOO)]
    return "\n".join([*lines, *rows]) + "\n"


BEGIN, END = "<!-- zoo: generated by tests/adapters/test_zoo.py -->", "<!-- end of zoo -->"


def test_docs_zoo_md_is_the_suites_table() -> None:
    text = TABLE.read_text()
    assert text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n" == render(), (
        "run `python tests/adapters/test_zoo.py`"
    )


if __name__ == "__main__":
    head, rest = TABLE.read_text().split(BEGIN, 1)
    TABLE.write_text(head + BEGIN + "\n" + render() + END + rest.split(END, 1)[1])
    print(f"{TABLE}: {len(ZOO)} architectures", file=sys.stderr)
