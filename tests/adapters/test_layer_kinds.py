"""LoRA on nn.MultiheadAttention (nn.TransformerEncoder), Conv1d/2d/3d and nn.Embedding, on tiny fp32 CPU models:
identity when fresh, a gradient for every adapter tensor, merge == unmerged, base untouched by a step, adapter-only
state dicts, PEFT parity, the exports, QLoRA beside them, and a Lightning fit of a TransformerEncoder."""

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
from torch.utils.data import DataLoader, TensorDataset

from lightning_adapt.adapters.attention import LoRAMultiheadAttention
from lightning_adapt.adapters.checkpoint import FINGERPRINT_KEY, install_adapter_only_state
from lightning_adapt.adapters.delta import lora_layers
from lightning_adapt.adapters.inject import LoRASpec, inject_lora
from lightning_adapt.adapters.kinds import LoRAConv, LoRAEmbedding
from lightning_adapt.adapters.lora import merge_lora
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.errors import ConfigError
from lightning_adapt.export.exporter import export_model
from lightning_adapt.export.peft_format import write_adapter
from lightning_adapt.layers import adapter_param_ids


class Encoder(nn.Module):
    """Embedding -> nn.TransformerEncoder (torch's MultiheadAttention) -> mean -> head."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(x if self.batch_first else x.transpose(0, 1), src_key_padding_mask=mask)
        return self.head(h.mean(dim=1 if self.batch_first else 0))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
        self.c3 = nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.c1(x[0]).flatten(1), self.c2(x[1]).flatten(1), self.c3(x[2]).flatten(1)], 1)


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.out = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


def _inputs(kind: str) -> Any:
    g = torch.Generator().manual_seed(7)
    if kind.startswith("mha"):
        return torch.randn(3, 6, 16, generator=g)
    if kind == "conv":
        return (
            torch.randn(2, 3, 9, generator=g),
            torch.randn(2, 3, 8, 8, generator=g),
            torch.randn(2, 2, 2, 5, 5, generator=g),
        )
    ids = torch.randint(0, 20, (3, 7), generator=g)
    ids[0, :2] = 0  # padding rows
    return ids


#: kind -> (plain model, target_modules)
CASES: dict[str, tuple[Callable[[], nn.Module], str | list[str]]] = {
    "mha": (lambda: Encoder(batch_first=True), "all-linear"),
    "mha-seq-first": (lambda: Encoder(batch_first=False), ["self_attn", "linear1"]),
    "conv": (CNN, ["c1", "c2", "c3"]),
    "embedding": (Embedder, ["emb"]),
}
KINDS = list(CASES)


def _plain(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[kind][0]().train()


def _adapted(kind: str, randomize: bool = True) -> tuple[nn.Module, nn.Module]:
    plain = _plain(kind)
    model = copy.deepcopy(plain)
    inject_lora(model, LoRASpec(r=4, alpha=8, target_modules=CASES[kind][1]))
    if randomize:
        torch.manual_seed(3)
        with torch.no_grad():
            for p in _adapter_params(model):
                p.normal_(std=0.3)
    return plain, model


def _adapter_params(model: nn.Module) -> list[nn.Parameter]:
    ids = adapter_param_ids(model)
    return [p for p in model.parameters() if id(p) in ids]


def _embedding_and_q_adapted(model: nn.Module) -> torch.Tensor:
    """Adapt a Llama's embedding and q_proj with random (non-identity) adapters; its logits on ``IDS``."""
    inject_lora(model, LoRASpec(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in _adapter_params(model):
            p.normal_(std=0.3)
        from helpers.toy import IDS

        logits: torch.Tensor = model(IDS).logits
    return logits


def _run(model: nn.Module, kind: str) -> torch.Tensor:
    out: torch.Tensor = model(_inputs(kind))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_is_exactly_the_identity(kind: str) -> None:
    plain, model = _adapted(kind, randomize=False)
    assert torch.equal(_run(model, kind), _run(plain, kind))
    for _, layer in lora_layers(model):  # W + 0: what every path computes with is the base weight, bit for bit
        if isinstance(layer, LoRAMultiheadAttention):
            assert torch.equal(layer.in_proj_weight, layer.attention.in_proj_weight)
            assert torch.equal(layer.out_proj.weight, layer.out_lora.base_layer.weight)
        else:
            assert torch.equal(layer.merged_weight(), layer.base_layer.weight)  # type: ignore[operator]
    plain.eval(), model.eval()
    with torch.no_grad():  # eval without gradients (torch's fused kernels for the plain encoder): same values; CPU
        # kernels there may round differently for a copy of the same weight, hence close, not equal
        torch.testing.assert_close(_run(model, kind), _run(plain, kind), rtol=1e-6, atol=1e-6)


def test_all_linear_adapts_the_attention_as_a_whole() -> None:
    _, model = _adapted("mha", randomize=False)
    names = [name for name, _ in lora_layers(model)]
    layers = [f"encoder.layers.{i}.{leaf}" for i in (0, 1) for leaf in ("self_attn", "linear1", "linear2")]
    assert names == layers, "the head is excluded, out_proj is adapted through its attention"
    attention = model.get_submodule("encoder.layers.0.self_attn")
    assert isinstance(attention, LoRAMultiheadAttention)
    keys = set(attention.state_dict())
    assert {"lora_A.weight", "lora_B.weight", "base_layer.out_proj.lora_A.weight", "base_layer.in_proj_weight"} <= keys


@pytest.mark.parametrize("kind", KINDS)
def test_every_adapter_tensor_gets_a_gradient_and_the_base_none(kind: str) -> None:
    _, model = _adapted(kind)
    _run(model, kind).square().sum().backward()
    adapters = _adapter_params(model)
    assert adapters and all(p.requires_grad for p in adapters)
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names[id(p)] for p in adapters if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"
    assert all(p.grad is None for p in model.parameters() if id(p) not in {id(a) for a in adapters})


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_and_unmerge_restores_the_base(kind: str) -> None:
    plain, model = _adapted(kind)
    with torch.no_grad():
        expected = _run(model, kind)
        assert not torch.allclose(expected, _run(plain, kind), atol=1e-3), "the adapters change the output"
        before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
        for _, layer in lora_layers(model):
            layer.merge()  # type: ignore[operator]
        torch.testing.assert_close(_run(model, kind), expected, rtol=1e-5, atol=1e-5)
        for _, layer in lora_layers(model):
            layer.merge()  # type: ignore[operator]  # idempotent
        torch.testing.assert_close(_run(model, kind), expected, rtol=1e-5, atol=1e-5)
        for _, layer in lora_layers(model):
            layer.unmerge()  # type: ignore[operator]
        for name, p in model.named_parameters():
            if name in before:
                torch.testing.assert_close(p, before[name], rtol=1e-5, atol=1e-5)
        merged = merge_lora(copy.deepcopy(model))
        assert not lora_layers(merged) and set(merged.state_dict()) == set(plain.state_dict())
        assert type(merged.get_submodule(next(iter(_target_names(plain, kind))))) is type(
            plain.get_submodule(next(iter(_target_names(plain, kind))))
        )
        torch.testing.assert_close(_run(merged, kind), expected, rtol=1e-5, atol=1e-5)


def _target_names(plain: nn.Module, kind: str) -> list[str]:
    _, model = _adapted(kind, randomize=False)
    return [name for name, _ in lora_layers(model)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_changes_adapters_only(kind: str) -> None:
    _, model = _adapted(kind)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _run(model, kind).square().sum().backward()
    optimizer.step()
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_only_state_dict_round_trips_strictly(kind: str) -> None:
    _, model = _adapted(kind)
    install_adapter_only_state(model)
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable | {FINGERPRINT_KEY}, "only adapters (and the fingerprint) are saved"
    _, fresh = _adapted(kind, randomize=False)
    install_adapter_only_state(fresh)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(_run(fresh, kind), _run(model, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_in_memory_export_writes_merged_weights_under_the_original_keys(kind: str, tmp_path: Path) -> None:
    plain, model = _adapted(kind)
    export_model(model, tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "merged" / "model.safetensors"))
    restored = copy.deepcopy(plain)
    restored.load_state_dict(merged, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(_run(restored, kind), _run(model, kind), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "embedding"])
def test_peft_loads_the_adapter_and_reproduces_the_outputs(kind: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    plain, model = _adapted(kind)
    write_adapter(model, tmp_path / "adapter", [], None)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "adapter")).train()
    with torch.no_grad():
        torch.testing.assert_close(_run(theirs, kind), _run(model, kind), rtol=1e-5, atol=1e-5)


def test_peft_attention_adds_the_out_proj_update_twice_so_no_peft_adapter_is_exported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PEFT loads our keys, but its MultiheadAttention (experimental) computes W + 2·ΔW for out_proj: if this test
    fails, PEFT fixed it, and ``peft_format.no_peft_layout`` can let attention adapters through."""
    peft = pytest.importorskip("peft")
    plain, model = _adapted("mha")
    write_adapter(model, tmp_path / "adapter", [], None)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "adapter")).train()
    doubled = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in doubled.named_parameters():
            if "out_proj.lora_B" in name:
                p.mul_(2)
        torch.testing.assert_close(_run(theirs, "mha"), _run(doubled, "mha"), rtol=1e-5, atol=1e-5)
    result = export_model(model, tmp_path / "export")
    assert result.adapter is None and not (tmp_path / "export" / "adapter").exists()
    assert "no PEFT adapter written" in capsys.readouterr().out and (tmp_path / "export" / "merged").is_dir()


@pytest.mark.parametrize(("kind", "wrapper"), [("conv", LoRAConv), ("embedding", LoRAEmbedding)])
def test_init_matches_peft(kind: str, wrapper: type[nn.Module]) -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES[kind][1])
    torch.manual_seed(5)
    theirs = peft.get_peft_model(_plain(kind), config).base_model.model
    torch.manual_seed(5)
    ours = _plain(kind)
    inject_lora(ours, LoRASpec(r=4, alpha=8, target_modules=CASES[kind][1]))
    assert lora_layers(ours) and all(isinstance(layer, wrapper) for _, layer in lora_layers(ours))
    own = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if "lora_" in n}
    mine = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    assert mine.keys() == own.keys()
    assert all(torch.equal(p, own[n]) for n, p in mine.items())


def test_attention_with_separate_qkv_weights() -> None:
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)
    wrapper = LoRAMultiheadAttention(copy.deepcopy(plain), r=2, alpha=4.0)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    assert torch.equal(wrapper(q, k, v)[0], plain(q, k, v)[0])
    with torch.no_grad():
        for p in wrapper.adapter_params():
            p.normal_(std=0.3)
    out = wrapper(q, k, v)[0]
    out.square().sum().backward()
    assert len(wrapper.adapter_params()) == 8 and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in wrapper.adapter_params()
    )
    with torch.no_grad():
        wrapper.merge()
        torch.testing.assert_close(wrapper(q, k, v)[0], out, rtol=1e-5, atol=1e-5)


def test_eval_with_a_padding_mask_equals_the_merged_model() -> None:
    """TransformerEncoder's nested-tensor fast path (eval, no grad, padding mask) must not bypass the adapters."""
    _, model = _adapted("mha")
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, -2:] = True
    model.eval()
    merged = merge_lora(copy.deepcopy(model))
    with torch.no_grad():
        ours, reference = model(_inputs("mha"), mask), merged(_inputs("mha"), mask)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "targets", "use_dora", "match"),
    [
        (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), ["0"], False, r"^0 \(Conv2d, groups=2\).*Fix: remove it"),
        (lambda: nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), ["0"], False, r"^0 \(Embedding, max_norm=1.0\).*Fix"),
        (lambda: nn.Sequential(nn.Conv1d(2, 2, 1)), ["0"], True, r"^0 \(Conv1d\): DoRA .*Fix: use_dora=False"),
        (
            lambda: Encoder(),
            ["out_proj"],
            False,
            r"'encoder.layers.0.self_attn.out_proj'.*never get a gradient.*Fix: target",
        ),
    ],
)
def test_layers_whose_adapter_could_not_work_are_refused(
    model: Callable[[], nn.Module], targets: list[str], use_dora: bool, match: str
) -> None:
    instance = model()
    before = copy.deepcopy(instance.state_dict())
    with pytest.raises(ConfigError, match=match) as err:
        inject_lora(instance, LoRASpec(r=2, alpha=4, target_modules=targets, use_dora=use_dora))
    assert "\n" not in str(err.value), "one line"
    assert not lora_layers(instance) and set(instance.state_dict()) == set(before), "nothing was changed"


def test_lora_on_a_quantized_model_keeps_attention_convs_and_embeddings_full_precision() -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_adapt.layers import is_quantized
    from lightning_adapt.quantize import QuantConfig, quantize_model

    torch.manual_seed(0)
    model = nn.ModuleDict({"enc": Encoder(), "cnn": CNN(), "emb": Embedder()})
    quantize_model(model, QuantConfig(mode="nf4", compute_dtype=torch.float32), include_default_skips=False)
    quantized = {name for name, m in model.named_modules() if is_quantized(m)}
    assert "enc.encoder.layers.0.linear1" in quantized and not any("out_proj" in n for n in quantized)
    targets = ["self_attn", "linear1", "c1", "c2", "c3", "emb.emb"]
    inject_lora(model, LoRASpec(r=2, alpha=4, target_modules=targets))
    with torch.no_grad():
        for p in _adapter_params(model):
            p.normal_(std=0.1)
    x = _inputs("mha")
    out = model["enc"](x) + model["emb"](_inputs("embedding")).sum() + model["cnn"](_inputs("conv")).sum()
    out.square().sum().backward()
    assert all(p.grad is not None for p in _adapter_params(model))
    model.eval()
    with torch.no_grad():
        merged = merge_lora(copy.deepcopy(model))
        torch.testing.assert_close(merged["enc"](x), model["enc"](x), rtol=1e-4, atol=1e-4)


class EncoderModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Encoder()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss: torch.Tensor = nn.functional.cross_entropy(self.net(x), y)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05)


def _encoder_data() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _encoder_lora() -> LoRAInjectionCallback:
    return LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules="all-linear", modules_to_save=["net.head"])


def test_trainer_fit_of_a_transformer_encoder_with_all_linear() -> None:
    module = EncoderModule()
    frozen = {n: p.clone() for n, p in module.named_parameters()}
    trainer(callbacks=[_encoder_lora()], max_steps=2).fit(module, _encoder_data())
    assert [type(m) for _, m in lora_layers(module)].count(LoRAMultiheadAttention) == 2
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert any("self_attn.lora_A" in n for n in trained) and any("out_proj.lora_B" in n for n in trained)
    changed = [n for n, p in trained.items() if "lora_B" in n and p.abs().sum() > 0]
    assert any("self_attn.lora_B" in n for n in changed) and any("out_proj.lora_B" in n for n in changed)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            original = name.replace(".base_layer.out_proj.base_layer.", ".out_proj.").replace(".base_layer.", ".")
            assert torch.equal(p, frozen[original]), name


def _encoder_run(epochs: int, save: Path | None = None, ckpt_path: Path | None = None) -> EncoderModule:
    module = EncoderModule()
    t = trainer(callbacks=[_encoder_lora()], max_epochs=epochs, limit_train_batches=2)
    t.fit(module, _encoder_data(), ckpt_path=ckpt_path)
    if save is not None:
        t.save_checkpoint(save)
    return module


def test_an_adapter_only_checkpoint_of_the_encoder_resumes_like_an_uninterrupted_fit(tmp_path: Path) -> None:
    straight = _encoder_run(4)
    _encoder_run(2, save=tmp_path / "half.ckpt")
    state = torch.load(tmp_path / "half.ckpt", weights_only=False)["state_dict"]
    assert FINGERPRINT_KEY in state and not any("in_proj_weight" in k or "base_layer.weight" in k for k in state)
    resumed = _encoder_run(4, ckpt_path=tmp_path / "half.ckpt")
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_hugging_face_model_with_an_adapted_embedding_exports_in_memory(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from helpers.toy import IDS, tiny_llama
    from transformers import LlamaForCausalLM

    model = tiny_llama(tie_word_embeddings=False)
    plain = copy.deepcopy(model)
    expected = _embedding_and_q_adapted(model)
    export_model(model, tmp_path / "out")
    merged = LlamaForCausalLM.from_pretrained(str(tmp_path / "out" / "merged"))
    theirs = peft.PeftModel.from_pretrained(plain, str(tmp_path / "out" / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bf16_cast_keeps_adapters_fp32_and_the_forward_close(kind: str) -> None:
    _, model = _adapted(kind)
    with torch.no_grad():
        expected = _run(model, kind)
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in _adapter_params(model))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    inputs = _inputs(kind)
    cast = tuple(t.bfloat16() for t in inputs) if isinstance(inputs, tuple) else inputs
    cast = cast.bfloat16() if isinstance(cast, torch.Tensor) and cast.is_floating_point() else cast
    with torch.no_grad():
        out = model(cast)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1)


def test_nn_transformer_cross_attention_is_adapted_and_merges_exactly() -> None:
    torch.manual_seed(0)
    plain = nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=True)
    model = copy.deepcopy(plain)
    inject_lora(model, LoRASpec(r=2, alpha=4, target_modules="all-linear"))
    attentions = [n for n, m in lora_layers(model) if isinstance(m, LoRAMultiheadAttention)]
    assert attentions == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn"]
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    assert torch.equal(model(src, tgt), plain(src, tgt))
    with torch.no_grad():
        for p in _adapter_params(model):
            p.normal_(std=0.3)
    out = model(src, tgt)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _adapter_params(model))
    with torch.no_grad():
        torch.testing.assert_close(merge_lora(copy.deepcopy(model))(src, tgt), out, rtol=1e-5, atol=1e-5)


def test_compile_blocks_finds_and_traces_the_new_kinds() -> None:
    from lightning_adapt.adapters.compiled import compile_adapted

    _, model = _adapted("mha")
    expected = _run(model, "mha")
    assert compile_adapted(model, backend="aot_eager") == ["encoder.layers.0", "encoder.layers.1"]
    out = _run(model, "mha")
    out.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _adapter_params(model))
    _, cnn = _adapted("conv")
    assert compile_adapted(cnn, backend="aot_eager") == ["c1", "c2", "c3"], "found by the protocol, not LoRALinear"


@pytest.mark.parametrize("source", ["checkpoint", "peft"])
def test_the_streamed_export_merges_an_embedding_adapter(source: str, tmp_path: Path) -> None:
    """`lightning-adapt export --ckpt_path` (no model built) folds lora_embedding_A/B into the embedding."""
    from helpers.toy import IDS, tiny_llama
    from transformers import LlamaForCausalLM

    from lightning_adapt.export.adapter_sources import adapters_from_checkpoint, adapters_from_peft
    from lightning_adapt.export.safetensors_io import model_keys, read_index
    from lightning_adapt.export.stream_export import export_streamed

    tiny_llama(tie_word_embeddings=False, hidden_size=100, num_attention_heads=2).save_pretrained(
        tmp_path / "base"
    )  # square embedding
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True)
    expected = _embedding_and_q_adapted(model)
    keys = model_keys(read_index(tmp_path / "base"))
    if source == "peft":
        write_adapter(model, tmp_path / "adapter", [], None)
        adapters = adapters_from_peft(tmp_path / "adapter", keys)
    else:
        state = {f"model.{k}": v for k, v in model.state_dict().items() if "lora_" in k}
        adapters = adapters_from_checkpoint(state, keys, LoRASpec(4, 8.0))
    assert adapters.layers["model.embed_tokens"].conv1d, "an embedding is stored (in, out)"
    export_streamed(tmp_path / "base", tmp_path / "out", adapters, keys=keys)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out" / "merged", local_files_only=True)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_the_streamed_export_refuses_a_conv_adapter_by_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from lightning_adapt.errors import ExportError
    from lightning_adapt.export.adapter_sources import adapters_from_checkpoint
    from lightning_adapt.export.safetensors_io import read_index

    plain, model = _adapted("conv")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    with pytest.raises(ExportError, match=r"'c1' holds a convolution adapter, .* Fix: export the trained module in"):
        adapters_from_checkpoint(state, read_index(tmp_path / "base"), LoRASpec(4, 8.0))
