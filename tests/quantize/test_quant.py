"""Tests for lightning_adapt.quantize: storage cost, dequantization, forward math, skips, idempotence."""

from __future__ import annotations

import importlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from helpers.toy import tiny_llama  # noqa: E402

from lightning_adapt import quantize as quant  # noqa: E402
from lightning_adapt.layers import (  # noqa: E402
    dequantize_weight,
    frozen_state_keys,
    is_quantized,
    quant_storage_bytes,
    quantized_layers,
    require_bitsandbytes,
)
from lightning_adapt.quantize import (  # noqa: E402
    QuantConfig,
    default_skip_names,
    quantize_linear,
    quantize_model,
)

FP32 = torch.float32
NF4_DQ = QuantConfig(mode="nf4", double_quant=True, compute_dtype=FP32)
NF4 = QuantConfig(mode="nf4", double_quant=False, compute_dtype=FP32)
FP4_DQ = QuantConfig(mode="fp4", double_quant=True, compute_dtype=FP32)
FP4 = QuantConfig(mode="fp4", double_quant=False, compute_dtype=FP32)
INT8 = QuantConfig(mode="int8", double_quant=False, compute_dtype=FP32)
ALL = [NF4_DQ, NF4, FP4_DQ, FP4, INT8]
IDS = ["nf4+dq", "nf4", "fp4+dq", "fp4", "int8"]

# Format figures at blocksize 64: 4-bit codes + absmax per 64 weights (fp32, or 8-bit plus one fp32
# per 256 blocks with double quantization); int8 codes + one fp32 scale per row of IN weights.
IN, OUT = 1024, 1024
DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127
FIGURES = {"nf4+dq": DQ_BITS, "nf4": 4.5, "fp4+dq": DQ_BITS, "fp4": 4.5, "int8": 8 + 32 / IN}
# Per-layer constant tables: 16-entry fp32 4-bit code; with DQ also the 256-entry fp32 8-bit code + offset.
TABLE_BYTES = {"nf4+dq": 64 + 1024 + 4, "nf4": 64, "fp4+dq": 64 + 1024 + 4, "fp4": 64, "int8": 0}


def _linear(in_features: int = 256, out_features: int = 128, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("config", ALL, ids=IDS)
def test_bits_per_param_match_the_format(config: QuantConfig) -> None:
    model = nn.Sequential(_linear(IN, OUT, bias=False))
    summary = quantize_model(model, config)
    label = IDS[ALL.index(config)]
    n = IN * OUT
    assert summary.layers == 1 and summary.params == n and summary.original_bytes == 4 * n
    assert summary.quantized_bytes == round(FIGURES[label] * n / 8) + TABLE_BYTES[label]
    assert summary.bits_per_param == pytest.approx(FIGURES[label], rel=0.01)
    assert summary.saved_bytes == 4 * n - summary.quantized_bytes
    line = summary.format()
    assert f"({label})" in line and f"{summary.bits_per_param:.3f} bits/param" in line and " MB fp32, saves " in line


def test_dequantize_equals_bitsandbytes_and_respects_the_nf4_bound() -> None:
    linear = _linear(512, 256, bias=False)
    layer = quantize_linear(linear, NF4_DQ)
    dense = dequantize_weight(layer)
    reference = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert dense.dtype == FP32 and dense.shape == (256, 512)
    assert torch.equal(dense, reference.float())
    # Rounding to the nearest NF4 level: error ≤ half the widest gap between levels × block absmax
    # (1% slack for the 8-bit double-quantized absmax).
    levels = bnb.functional.get_4bit_type("nf4", device="cpu").sort().values
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    blocks = linear.weight.detach().reshape(-1, 64)
    error = (blocks - dense.reshape(-1, 64)).abs()
    assert (error <= 1.01 * half_gap * blocks.abs().amax(1, keepdim=True)).all()


def test_int8_dequantize_equals_bitsandbytes_and_respects_the_row_bound() -> None:
    linear = _linear(512, 256, bias=False)
    layer = quantize_linear(linear, INT8)
    dense = dequantize_weight(layer)
    reference = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    assert torch.equal(dense, reference)
    weight = linear.weight.detach()
    # half an int8 step of the row absmax, plus the fp16 rounding bitsandbytes quantizes from
    assert ((weight - dense).abs() <= 0.55 / 127 * weight.abs().amax(1, keepdim=True)).all()


@pytest.mark.parametrize("config", ALL, ids=IDS)
def test_forward_equals_linear_of_the_dequantized_weight(config: QuantConfig) -> None:
    linear = _linear()
    layer = quantize_linear(linear, config)
    x = torch.randn(5, 256)
    expected = F.linear(x, dequantize_weight(layer), linear.bias.detach())
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert type(layer) is (bnb.nn.Linear8bitLt if config.mode == "int8" else bnb.nn.Linear4bit)
    assert is_quantized(layer) and not is_quantized(linear)
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.bias is not None and layer.bias.dtype == config.compute_dtype
    assert layer.weight.device == linear.weight.device


def _eval_then_train(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train forward, eval no-grad forward, train forward again; returns (first, eval, last)."""
    first = layer.train()(x).detach()
    with torch.no_grad():
        evaluated = layer.eval()(x)
    return first, evaluated, layer.train()(x).detach()


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, FP32])
def test_eval_forward_does_not_repack_the_weight(compute_dtype: torch.dtype) -> None:
    layer = quantize_linear(_linear(), QuantConfig(compute_dtype=compute_dtype))
    assert layer.support_avx512bf16_for_cpu is False
    before = dequantize_weight(layer).clone()
    first, evaluated, last = _eval_then_train(layer, torch.randn(4, 256))
    assert torch.equal(dequantize_weight(layer), before)
    assert torch.equal(first, evaluated) and torch.equal(first, last)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="CPU has no AVX512-BF16: the trap cannot fire")
def test_the_repack_trap_fires_when_the_guard_is_off() -> None:
    """The guard above is what keeps this machine correct: with it off the same sequence corrupts."""
    layer = quantize_linear(_linear(), QuantConfig(compute_dtype=torch.bfloat16))
    before = dequantize_weight(layer).clone()
    layer.support_avx512bf16_for_cpu = True
    first, _, last = _eval_then_train(layer, torch.randn(4, 256))
    after = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert (after - before).abs().max() > 0.05 and (last - first).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="AVX512-BF16"):
        dequantize_weight(layer)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))


@pytest.mark.parametrize("config", [NF4_DQ, INT8], ids=["nf4+dq", "int8"])
def test_quantizing_twice_is_a_noop(config: QuantConfig) -> None:
    model = _mlp()
    first = quantize_model(model, config)
    layers = dict(quantized_layers(model))
    weights = {name: dequantize_weight(layer).clone() for name, layer in layers.items()}
    second = quantize_model(model, config)
    assert first == second and first.layers == 3
    assert all(layers[name] is layer for name, layer in quantized_layers(model))
    assert all(torch.equal(dequantize_weight(layers[name]), w) for name, w in weights.items())


def _tiny_llama(tied: bool) -> nn.Module:
    return tiny_llama(vocab_size=96, hidden_size=64, intermediate_size=128, tie_word_embeddings=tied).eval()


def test_default_skips_keep_a_tied_lm_head_in_full_precision() -> None:
    model = _tiny_llama(tied=True)
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        reference = model(ids).logits
    assert default_skip_names(model) == {"lm_head"}
    summary = quantize_model(model, NF4_DQ)
    assert summary.layers == 2 * 7  # q, k, v, o, gate, up, down per decoder layer
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and (logits - reference).abs().max() < 0.1


def test_tied_linear_is_skipped_whatever_its_name() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, 64)
            self.body = nn.Linear(64, 64)
            self.unembed = nn.Linear(64, 32, bias=False)
            self.unembed.weight = self.embed.weight

    model = Tied()
    assert default_skip_names(model) == {"unembed"}
    quantize_model(model, NF4_DQ)
    assert is_quantized(model.body) and model.unembed.weight is model.embed.weight


def test_default_skips_keep_the_bert_classifier() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128
    )
    model = transformers.BertForSequenceClassification(config)
    assert default_skip_names(model) == {"classifier"}
    quantize_model(model, NF4_DQ)
    assert type(model.classifier) is nn.Linear and is_quantized(model.bert.encoder.layer[0].attention.self.query)
    without_defaults = quantize_model(transformers.BertForSequenceClassification(config), NF4_DQ, (), False)
    assert without_defaults.layers == 6 + 1 + 1  # q k v o, up, down; pooler; classifier


@pytest.mark.parametrize(
    ("entries", "kept"),
    [
        (["0"], {"0"}),  # exact name
        (["block.fc"], {"block.fc"}),  # dotted suffix
        (["fc"], {"block.fc"}),  # whole-component suffix
        (["block"], {"block.fc", "block.out"}),  # a skipped parent skips its children
        (["c"], None),  # a partial component ("block.fc" ends with "c") is not a match
        (["ock.fc"], None),
    ],
)
def test_skip_modules_match_whole_dotted_names(entries: list[str], kept: set[str] | None) -> None:
    model = nn.Sequential()
    model.add_module("0", nn.Linear(64, 64))
    model.add_module("block", nn.Sequential())
    model.block.add_module("fc", nn.Linear(64, 64))
    model.block.add_module("out", nn.Linear(64, 64))
    if kept is None:
        with pytest.raises(ValueError, match="match no module"):
            quantize_model(model, NF4_DQ, entries)
        return
    quantize_model(model, NF4_DQ, entries)
    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {name for name in names if not is_quantized(model.get_submodule(name))} == kept


def test_skip_name_matching_nothing_raises_with_candidates() -> None:
    model = _mlp()
    with pytest.raises(
        ValueError, match=r"skip_modules.*\['lm_hed'\] match no module.*Candidates: leaf names \[0, 2, 4\]"
    ):
        quantize_model(model, NF4_DQ, ["0", "lm_hed"])
    with pytest.raises(ValueError, match="match no module"):
        quantize_model(model, NF4_DQ, ["4.weight"])  # a parameter, not a module
    assert not quantized_layers(model)  # nothing changed before raising


def test_lora_adapters_are_never_quantized_but_their_base_is() -> None:
    class Wrapper(nn.Module):  # an adapter found by the AdapterModule protocol, whatever its names
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base_layer = base
            self.down = nn.Linear(64, 8, bias=False)
            self.up = nn.Linear(8, 64, bias=False)

        def adapter_params(self) -> list[nn.Parameter]:
            return [self.down.weight, self.up.weight]

    model = nn.Sequential(Wrapper(nn.Linear(64, 64)))
    summary = quantize_model(model, NF4_DQ)
    assert [name for name, _ in quantized_layers(model)] == ["0.base_layer"] and summary.layers == 1
    assert type(model[0].down) is nn.Linear and type(model[0].up) is nn.Linear


@pytest.mark.parametrize("config", [NF4_DQ, INT8], ids=["nf4+dq", "int8"])
def test_frozen_weight_is_bit_identical_after_optimizer_steps(config: QuantConfig) -> None:
    model = _mlp()
    quantize_model(model, config, skip_modules=["4"])
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("4.")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        loss = model(torch.randn(16, 64)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["4.weight", "4.bias"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items() if isinstance(v, torch.Tensor))
    assert not torch.equal(state["4.weight"], _mlp()[4].weight.detach())  # the head did train


def test_layer_by_layer_releases_each_fp_weight_before_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    originals = [weakref.ref(m.weight) for m in model if isinstance(m, nn.Linear)]
    alive_at_call: list[int] = []
    real = quant.quantize_linear

    def spy(linear: nn.Linear, config: QuantConfig) -> nn.Module:
        alive_at_call.append(sum(ref() is not None for ref in originals))
        return real(linear, config)

    monkeypatch.setattr(quant, "quantize_linear", spy)
    quantize_model(model, NF4_DQ, include_default_skips=False)
    # at the k-th call only the k layers not yet visited still hold fp weights: peak ≈ one layer extra
    assert alive_at_call == [3, 2, 1]
    assert all(ref() is None for ref in originals)


def test_frozen_state_keys_cover_exactly_the_quant_state() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    quantize_model(model, NF4_DQ, skip_modules=["2"])
    model[1] = quantize_linear(nn.Linear(64, 64), INT8)
    keys = frozen_state_keys(model)
    nf4 = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"}
    expected = {f"0.{k}" for k in nf4} | {"0.weight.quant_state.bitsandbytes__nf4"}
    expected |= {"1.weight", "1.SCB", "1.weight_format"}
    assert keys == expected
    assert set(model.state_dict()) - keys == {"0.bias", "1.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"mode": "nf3"}, ["mode='nf3'"]),
        ({"blocksize": 100}, ["blocksize=100"]),
        ({"compute_dtype": torch.float64}, ["compute_dtype=torch.float64"]),
        ({"quant_storage": torch.int32}, ["quant_storage=torch.int32"]),
        ({"mode": "int8"}, ["double_quant=True"]),
        (
            {"mode": "int8", "double_quant": False, "quant_storage": torch.bfloat16},
            ["quant_storage=torch.bfloat16"],
        ),
        (
            {"mode": "int8", "double_quant": False, "compute_dtype": torch.float64},
            ["compute_dtype=torch.float64"],
        ),
        (
            {"mode": "int8", "blocksize": 128, "quant_storage": torch.float16},
            ["double_quant", "blocksize", "quant_storage"],
        ),
    ],
)
def test_bad_config_raises_once_naming_every_argument(kwargs: dict[str, object], names: list[str]) -> None:
    with pytest.raises(ValueError, match="Invalid QuantConfig") as info:
        QuantConfig(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert all(name in message for name in names) and "allowed" in message and "Fix" in message
    assert message.count("\n  - ") == len(names)


def test_good_configs_are_accepted() -> None:
    for config in [QuantConfig(), QuantConfig(blocksize=4096, quant_storage=torch.bfloat16), INT8]:
        assert config.mode in ("nf4", "fp4", "int8")


def test_missing_bitsandbytes_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str) -> None:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ImportError, match=r"pip install 'bitsandbytes>=0\.48'"):
        require_bitsandbytes()


def test_storage_bytes_and_meta_weights() -> None:
    assert quant_storage_bytes(nn.Linear(4, 4)) == 0
    with pytest.raises(ValueError, match="meta"):
        quantize_linear(nn.Linear(64, 64, device="meta"), NF4_DQ)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", ALL, ids=IDS)
def test_cuda_quantizes_on_the_device_and_matches(config: QuantConfig) -> None:
    linear = _linear().cuda()
    layer = quantize_linear(linear, config)
    assert layer.weight.device.type == "cuda"
    x = torch.randn(5, 256, device="cuda")
    expected = F.linear(x, dequantize_weight(layer), linear.bias.detach())
    torch.testing.assert_close(layer(x), expected, atol=2e-2, rtol=1e-2)  # CUDA kernels: tf32 / fp16 int8
    cpu = quantize_linear(_linear(), config)
    torch.testing.assert_close(dequantize_weight(layer).cpu(), dequantize_weight(cpu), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_follows_the_weights_unless_given(dtype: torch.dtype) -> None:
    """Default: the dtype the weights are in (the run's precision) on CPU; an explicit value wins."""
    linear = nn.Linear(64, 64).to(dtype)
    layer = quantize_linear(linear, QuantConfig(mode="nf4"))
    assert layer.compute_dtype == dtype and layer.weight.quant_state.dtype == dtype
    assert layer.bias.dtype == dtype
    explicit = quantize_linear(linear, QuantConfig(mode="nf4", compute_dtype=torch.float32))
    assert explicit.compute_dtype == torch.float32


def test_default_compute_dtype_is_bf16_on_cuda_and_fp32_for_other_dtypes() -> None:
    from lightning_adapt.quantize import default_compute_dtype

    assert default_compute_dtype(torch.empty(2, device="meta", dtype=torch.float64)) == torch.float32
    assert default_compute_dtype(torch.empty(2, dtype=torch.float16)) == torch.float16
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        assert default_compute_dtype(torch.empty(2, device="cuda")) == torch.bfloat16
