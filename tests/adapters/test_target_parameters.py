"""``target_parameters``: LoRA on parameters read outside a Linear's forward, as transformers 5's fused MoE experts
(Mixtral, Qwen2-MoE: 3-D ``experts.gate_up_proj`` / ``experts.down_proj``) and a 2-D parameter of a toy module, on
tiny fp32 CPU models: identity when fresh, a gradient for every adapter tensor, base untouched by a step, merge ==
unmerged, adapter-only state dicts, the in-memory export reloaded by transformers, PEFT loading our adapter, QLoRA
beside it, a Lightning fit, and the errors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers.toy import trainer
from safetensors.torch import load_file
from torch import nn

from lightning_adapt.adapters.checkpoint import install_adapter_only_state
from lightning_adapt.adapters.inject import LoRASpec, inject_lora
from lightning_adapt.adapters.lora import merge_lora
from lightning_adapt.adapters.parameters import LoRAParameters
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.errors import TargetingError
from lightning_adapt.export.exporter import export_model
from lightning_adapt.export.stream_export import checkpoint_streaming_unavailable
from lightning_adapt.layers import adapter_param_ids

V = 128
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
SIZES = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SIZES |= {
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
    ),
}


def _base(name: str, directory: Path) -> nn.Module:
    """The tiny random model saved as a Hugging Face directory and loaded back from it, in eval mode."""
    import transformers as tf

    config, model_class, extra = MODELS[name]
    torch.manual_seed(0)
    model = getattr(tf, model_class)(getattr(tf, config)(**SIZES, **extra))
    model.save_pretrained(directory)
    return type(model).from_pretrained(directory, local_files_only=True).eval()  # type: ignore[no-any-return]


def _spec(dropout: float = 0.0) -> LoRASpec:
    return LoRASpec(r=4, alpha=8.0, dropout=dropout, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)


def _ids(seed: int = 7) -> torch.Tensor:
    return torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def _train(model: nn.Module, steps: int = 2) -> list[str]:
    """``steps`` AdamW steps; the adapter tensors without a (nonzero) gradient in the last one (B is 0 in the first)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    ids_ = adapter_param_ids(model)
    return [n for n, p in model.named_parameters() if id(p) in ids_ and (p.grad is None or not p.grad.abs().sum() > 0)]


@pytest.fixture(params=list(MODELS))
def adapted(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[nn.Module, Path]:
    """A tiny MoE model with q/v and both expert parameters adapted and trained two steps; its base directory."""
    model = _base(request.param, tmp_path / "base")
    before = _logits(model, _ids())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_lora(model, _spec())
    assert torch.equal(_logits(model, _ids()), before), "a fresh adapter changes nothing"
    assert _train(model) == [], "every adapter tensor receives a gradient"
    state = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if not p.requires_grad}
    assert sorted(state) == sorted(frozen) and all(torch.equal(state[n], frozen[n]) for n in frozen), "base unchanged"
    return model, tmp_path / "base"


def test_expert_parameters_get_one_pair_per_expert_in_pefts_layout(adapted: tuple[nn.Module, Path]) -> None:
    model, _ = adapted
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(experts, LoRAParameters) and experts.parameter_names == ("gate_up_proj", "down_proj")
    e, out, inp = experts.base_layer.gate_up_proj.shape
    assert experts.lora_A["gate_up_proj"].shape == (4 * e, inp) and experts.lora_B["gate_up_proj"].shape == (out, 4 * e)
    delta = experts.delta("gate_up_proj")
    a, b = experts.lora_A["gate_up_proj"], experts.lora_B["gate_up_proj"]
    for i in range(e):  # expert i: B[:, r·k + i] @ A[r·i + k]
        expected = experts.scaling * b[:, i::e] @ a[4 * i : 4 * i + 4]
        torch.testing.assert_close(delta[i], expected, atol=1e-6, rtol=0)
    assert experts.num_experts == e, "the owner's attributes read through the wrapper"


def test_merge_equals_unmerged_and_state_round_trips(adapted: tuple[nn.Module, Path]) -> None:
    model, base = adapted
    live = _logits(model, _ids())
    torch.testing.assert_close(_logits(merge_lora(copy.deepcopy(model)), _ids()), live, atol=1e-5, rtol=0)
    install_adapter_only_state(model)
    state = model.state_dict()
    assert "model.layers.0.mlp.experts.lora_A.gate_up_proj" in state
    assert not any(k.endswith("base_layer.gate_up_proj") for k in state), "the frozen experts are not saved"
    fresh = type(model).from_pretrained(base, local_files_only=True).eval()
    inject_lora(fresh, _spec())
    install_adapter_only_state(fresh)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(_logits(fresh, _ids()), live)


def test_in_memory_export_reloads_and_peft_loads_the_adapter(adapted: tuple[nn.Module, Path], tmp_path: Path) -> None:
    model, base = adapted
    live = _logits(model, _ids())
    from helpers.hf import Holder

    from lightning_adapt.adapters.checkpoint import FINGERPRINT_KEY

    setup = checkpoint_streaming_unavailable(Holder(model, base), {FINGERPRINT_KEY: None}, [_spec()], "original")
    assert setup is not None and "lora: target_parameters" in setup, "FSDP2's merge: is refused at setup (no keys yet)"
    state = {FINGERPRINT_KEY: "x", **{f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}}
    why = checkpoint_streaming_unavailable(Holder(model, base), state, [_spec()], "original")
    assert why is not None and "target_parameters" in why, "lightning-adapt export rebuilds the model instead"
    plain = LoRASpec(r=4, alpha=8.0, target_modules=["q_proj"])  # the same checkpoint, recipe without the key
    why = checkpoint_streaming_unavailable(Holder(model, base), state, [plain], "original")
    assert why is not None and "experts.lora_A." in why, "the adapter keys alone say so too"
    export_model(model, tmp_path / "out")
    merged = load_file(tmp_path / "out/merged/model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in merged and not any("lora_" in k for k in merged)
    reloaded = type(model).from_pretrained(tmp_path / "out/merged", local_files_only=True).eval()
    torch.testing.assert_close(_logits(reloaded, _ids()), live, atol=1e-5, rtol=0)
    peft = pytest.importorskip("peft")
    plain = type(model).from_pretrained(base, local_files_only=True).eval()
    with_adapter = peft.PeftModel.from_pretrained(plain, tmp_path / "out/adapter").eval()
    torch.testing.assert_close(_logits(with_adapter, _ids()), live, atol=1e-5, rtol=0)


def test_dropout_writes_no_peft_adapter_and_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _base("mixtral", tmp_path / "base")
    inject_lora(model, _spec(dropout=0.05))
    export_model(model, tmp_path / "out")
    assert not (tmp_path / "out/adapter").exists() and (tmp_path / "out/merged").is_dir()
    assert "refuses lora_dropout > 0 with target_parameters" in capsys.readouterr().out


class ProjOwner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight.T)


def test_a_2d_parameter_is_w_plus_scaled_ba() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ProjOwner(), nn.Linear(6, 2))
    x = torch.randn(3, 5)
    before = model(x).detach()
    inject_lora(model, LoRASpec(r=2, alpha=4.0, target_modules=[], target_parameters=["0.weight"]))
    wrapper = model[0]
    assert isinstance(wrapper, LoRAParameters) and torch.equal(model(x), before)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_A.weight", "0.lora_B.weight"]
    with torch.no_grad():
        wrapper.lora_B["weight"].normal_()
    a, b = wrapper.lora_A["weight"], wrapper.lora_B["weight"]
    expected = torch.tanh(x @ (wrapper.base_layer.weight + 2.0 * b @ a).T)
    torch.testing.assert_close(model[0](x), expected)
    model(x).sum().backward()
    assert a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0
    torch.testing.assert_close(merge_lora(copy.deepcopy(model))(x), model(x), atol=1e-6, rtol=0)


class TransposedExperts(nn.Module):
    """Experts stored (E, in, out), as transformers flags with ``is_transposed``: expert e computes ``x @ W[e]``."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ei,eio->eo", x, self.weight)


def test_a_transposed_3d_parameter_adapts_each_expert_as_in_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(TransposedExperts())
    inject_lora(model, LoRASpec(r=2, alpha=2.0, target_modules=[], target_parameters=["weight"]))
    wrapper = model[0]
    assert isinstance(wrapper, LoRAParameters)
    a, b = wrapper.lora_A["weight"], wrapper.lora_B["weight"]
    assert a.shape == (6, 5) and b.shape == (4, 6), "A (r·E, in), B (out, r·E)"
    with torch.no_grad():
        b.normal_()
    x = torch.randn(3, 5)
    expected = torch.stack(
        [x[e] @ (wrapper.base_layer.weight[e] + (b[:, e::3] @ a[2 * e : 2 * e + 2]).T) for e in range(3)]
    )
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(merge_lora(copy.deepcopy(model))(x), model(x), atol=1e-6, rtol=0)


def test_qlora_layers_keep_working_beside_full_precision_experts(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_adapt.layers import quantized_layers
    from lightning_adapt.quantize import QuantConfig, quantize_model

    model = _base("mixtral", tmp_path / "base")
    quantize_model(model, QuantConfig(mode="nf4", compute_dtype=torch.float32))
    before = _logits(model, _ids())
    inject_lora(model, _spec())
    assert quantized_layers(model), "the attention projections are 4-bit"
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(experts, LoRAParameters) and experts.base_layer.gate_up_proj.dtype == torch.float32
    assert torch.equal(_logits(model, _ids()), before)
    assert _train(model) == []
    torch.testing.assert_close(
        _logits(merge_lora(copy.deepcopy(model)), _ids()), _logits(model, _ids()), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"target_parameters": ["experts.nope"]}, "match no parameter in the model. Candidates: leaf names [down_proj, gate_up_proj"),
        ({"target_parameters": [r".*\.q_proj\.weight"]}, "its module is adapted by target_modules"),
        ({"target_parameters": ["input_layernorm.weight"]}, "only 2-D (out, in) and 3-D (experts, out, in)"),
    ],
)  # fmt: skip
def test_bad_target_parameters_are_one_clear_error(spec: dict[str, Any], message: str, tmp_path: Path) -> None:
    model = _base("mixtral", tmp_path / "base")
    with pytest.raises(TargetingError, match="target_parameters") as caught:
        inject_lora(model, LoRASpec(target_modules=["q_proj", "v_proj"], **spec))
    assert message in str(caught.value)
    assert not adapter_param_ids(model), "nothing was changed"


class CausalLM(L.LightningModule):
    def __init__(self, build: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.model = build().train()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _fit(tmp_path: Path, ckpt_path: str | None = None) -> tuple[CausalLM, L.Trainer, LoRAInjectionCallback]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_adapt.callbacks.merge import MergeOnSaveCallback

    module = CausalLM(lambda: _base("qwen2-moe", tmp_path / "base"))
    lora = LoRAInjectionCallback(
        r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS
    )
    callbacks = [lora, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
    if ckpt_path is None:
        callbacks.append(MergeOnSaveCallback(dirpath=str(tmp_path / "export")))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(3, V, (4, 8))), batch_size=2)
    fit = trainer(tmp_path, max_steps=2, callbacks=callbacks, enable_checkpointing=True)
    fit.fit(module, data, ckpt_path=ckpt_path)
    return module, fit, lora


def test_a_lightning_fit_checkpoint_resume_and_export_through_the_callbacks(tmp_path: Path) -> None:
    module, _, callback = _fit(tmp_path)
    experts = module.model.model.layers[0].mlp.experts
    assert isinstance(experts, LoRAParameters) and "model.model.layers.0.mlp.experts" in callback.adapted
    assert experts.lora_B["down_proj"].abs().sum() > 0, "the experts' adapters trained"
    plain = _base("qwen2-moe", tmp_path / "base")
    assert torch.equal(experts.base_layer.down_proj, plain.model.layers[0].mlp.experts.down_proj), "base unchanged"
    live = _logits(module.model.eval(), _ids())
    checkpoint = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=True)["state_dict"]
    assert "model.model.layers.0.mlp.experts.lora_A.gate_up_proj" in checkpoint
    assert not any(k.endswith("experts.base_layer.gate_up_proj") for k in checkpoint), "adapter-only"
    resumed, _, _ = _fit(tmp_path, str(tmp_path / "ckpt/last.ckpt"))
    assert torch.equal(_logits(resumed.model.eval(), _ids()), live), "the adapters came back from the checkpoint"
    merged = type(plain).from_pretrained(tmp_path / "export/merged", local_files_only=True).eval()
    torch.testing.assert_close(_logits(merged, _ids()), live, atol=1e-5, rtol=0)
    assert (tmp_path / "export/adapter/adapter_config.json").is_file()
