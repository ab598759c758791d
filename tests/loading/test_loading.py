"""Streaming, quantize-while-loading checkpoints (lightning_adapt.loading) against from_pretrained + quantize_model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

pytestmark = pytest.mark.slow

bnb = pytest.importorskip("bitsandbytes")

from lightning_adapt import loading  # noqa: E402
from lightning_adapt.errors import LoadError  # noqa: E402
from lightning_adapt.layers import dequantize_weight, is_quantized, quantized_layers  # noqa: E402
from lightning_adapt.loading import (  # noqa: E402
    QuantPlan,
    WeightSource,
    attach_quant_plan,
    empty_weights,
    load_pretrained,
    quant_plan,
)
from lightning_adapt.quantize import QuantConfig, quantize_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
CONFIGS = {
    "nf4+dq": QuantConfig(mode="nf4", double_quant=True),
    "nf4": QuantConfig(mode="nf4", double_quant=False),
    "int8": QuantConfig(mode="int8", double_quant=False),
}
IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 8]])


def _empty(path: Path, dtype: torch.dtype = FP32, auto: Any = None) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    with empty_weights():
        return (auto or AutoModelForCausalLM).from_config(AutoConfig.from_pretrained(path), dtype=dtype)


def _pretrained(path: Path, dtype: torch.dtype = FP32, auto: Any = None, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return (auto or AutoModelForCausalLM).from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)


def _resave(src: Path, dst: Path, dtype: torch.dtype | None = None, shard: str | None = None) -> Path:
    """``src``'s model saved again into ``dst``, in ``dtype`` and/or sharded."""
    model = _pretrained(src)
    model.to(dtype or FP32).save_pretrained(dst, **({"max_shard_size": shard} if shard else {}))
    return dst


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True)) | {n: b for n, b in model.named_buffers()}


def _assert_same_tensors(ours: nn.Module, ref: nn.Module) -> None:
    a, b = _state(ours), _state(ref)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, key
        assert torch.equal(a[key], b[key]), key


def _quant_tensors(layer: Any) -> dict[str, torch.Tensor]:
    """Every stored tensor of a quantized layer: codes and quantization state."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return {"codes": layer.weight.data, "scales": layer.weight.SCB}
    state = layer.weight.quant_state
    out = {"codes": layer.weight.data, "absmax": state.absmax, "code": state.code}
    if state.nested:
        out |= {"offset": state.offset, "absmax2": state.state2.absmax, "code2": state.state2.code}
    return out


@pytest.fixture(scope="module")
def bf16_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _resave(tiny_llama_dir, tmp_path_factory.mktemp("bf16"), BF16)


# --------------------------------------------------------------------------- quantized while loading


@pytest.mark.parametrize("file_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_layers_are_bit_identical_to_load_then_quantize(
    name: str, file_dtype: str, tiny_llama_dir: Path, bf16_dir: Path
) -> None:
    path = tiny_llama_dir if file_dtype == "fp32" else bf16_dir
    config = CONFIGS[name]
    ref = _pretrained(path)
    quantize_model(ref, config)
    ours = _empty(path)
    report = load_pretrained(ours, WeightSource(path), plan=QuantPlan(config), dtype=FP32)
    layers, ref_layers = dict(quantized_layers(ours)), dict(quantized_layers(ref))
    assert list(layers) == list(ref_layers) and len(layers) == report.quantized_layers == 14
    for layer_name, layer in layers.items():
        expected = ref_layers[layer_name]
        assert type(layer) is type(expected)
        got, want = _quant_tensors(layer), _quant_tensors(expected)
        for part in want:
            assert got[part].dtype == want[part].dtype and torch.equal(got[part], want[part]), (layer_name, part)
        assert torch.equal(dequantize_weight(layer), dequantize_weight(expected)), layer_name
        if hasattr(expected.weight, "quant_state"):
            s, r = layer.weight.quant_state, expected.weight.quant_state
            assert (s.dtype, s.blocksize, s.quant_type, s.shape) == (r.dtype, r.blocksize, r.quant_type, r.shape)
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, ref(IDS).logits)


def test_gpt2_conv1d_layers_quantize_while_loading_as_after_loading(tmp_path: Path) -> None:
    """GPT-2 keeps its linear weights (in, out) in ``Conv1D``: they quantize (as the Linear on Wᵀ they compute),
    bit-identically while loading and after, and the export knows to write them back (in, out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    ref = _pretrained(tmp_path)
    dense = {name: module.weight.detach().clone() for name, module in ref.named_modules() if hasattr(module, "nf")}
    quantize_model(ref, CONFIGS["nf4"])
    ours = _empty(tmp_path)
    report = load_pretrained(ours, WeightSource(tmp_path), plan=QuantPlan(CONFIGS["nf4"]), dtype=FP32)
    layers = dict(quantized_layers(ours))
    assert list(layers) == list(dict(quantized_layers(ref))) == list(dense) and report.quantized_layers == 8
    for name, layer in layers.items():
        assert torch.equal(dequantize_weight(layer), dequantize_weight(dict(quantized_layers(ref))[name]))
        error = (dequantize_weight(layer) - dense[name].T).abs().max()  # the NF4 copy of Wᵀ, not of W
        assert error <= dense[name].abs().max() / 7, name
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS % 256).logits, ref(IDS % 256).logits)


def test_a_plan_never_quantizes_the_tied_lm_head(tiny_llama_dir: Path) -> None:
    model = _empty(tiny_llama_dir)
    load_pretrained(model, WeightSource(tiny_llama_dir), plan=QuantPlan(CONFIGS["nf4+dq"]))
    assert type(model.lm_head) is nn.Linear and not is_quantized(model.lm_head)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "still one tensor: tied"
    assert is_quantized(model.model.layers[0].mlp.up_proj)


def test_the_compute_dtype_follows_the_load_dtype_and_codes_do_not(tiny_llama_dir: Path) -> None:
    ref = _empty(tiny_llama_dir)
    load_pretrained(ref, WeightSource(tiny_llama_dir), plan=QuantPlan(CONFIGS["nf4+dq"]), dtype=FP32)
    ours = _empty(tiny_llama_dir, BF16)
    load_pretrained(ours, WeightSource(tiny_llama_dir), plan=QuantPlan(CONFIGS["nf4+dq"]), dtype=BF16)
    layer, expected = ours.model.layers[1].self_attn.q_proj, ref.model.layers[1].self_attn.q_proj
    assert layer.weight.quant_state.dtype == BF16 and expected.weight.quant_state.dtype == FP32
    assert torch.equal(layer.weight.data, expected.weight.data), "quantized from the same fp32 values"
    assert layer.original_dtype == BF16 and ours.model.norm.weight.dtype == BF16


# --------------------------------------------------------------------------- plain loading


@pytest.mark.parametrize(
    ("file_dtype", "dtype"), [(FP32, FP32), (FP32, BF16), (BF16, BF16), (BF16, FP32), (FP16, FP32)]
)
def test_tensors_come_in_the_requested_dtype_equal_to_from_pretrained(
    file_dtype: torch.dtype, dtype: torch.dtype, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    path = tiny_llama_dir if file_dtype == FP32 else _resave(tiny_llama_dir, tmp_path, file_dtype)
    ours, ref = _empty(path, dtype), _pretrained(path, dtype)
    report = load_pretrained(ours, WeightSource(path), dtype=dtype)
    _assert_same_tensors(ours, ref)  # every parameter and buffer, rotary inv_freq included
    assert ours.model.embed_tokens.weight.dtype == dtype and ours.model.rotary_emb.inv_freq.dtype == FP32
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    assert ours.config._attn_implementation == ref.config._attn_implementation
    assert report.tensors_loaded == len(load_file(path / "model.safetensors")) and report.quantized_layers == 0
    assert report.weight_bytes == sum(p.nbytes for p in ours.parameters()) + sum(b.nbytes for b in ours.buffers())


def test_a_streamed_fp32_model_computes_the_same_logits(tiny_llama_dir: Path) -> None:
    ours, ref = _empty(tiny_llama_dir), _pretrained(tiny_llama_dir)
    load_pretrained(ours, WeightSource(tiny_llama_dir))
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, ref(IDS).logits)


def test_a_sharded_checkpoint_loads(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = _resave(tiny_llama_dir, tmp_path, shard="200KB")
    ours = _empty(path)
    report = load_pretrained(ours, WeightSource(path), plan=QuantPlan(CONFIGS["nf4"]))
    assert len(report.files) >= 3 and (path / "model.safetensors.index.json").is_file()
    ref = _pretrained(tiny_llama_dir)
    quantize_model(ref, CONFIGS["nf4"])
    for (name, layer), (_, expected) in zip(quantized_layers(ours), quantized_layers(ref), strict=True):
        assert torch.equal(layer.weight.data, expected.weight.data), name
    assert torch.equal(ours.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_a_single_file_path_and_a_prefix_into_a_wrapper(tiny_llama_dir: Path) -> None:
    wrapper = nn.Module()
    wrapper.model = _empty(tiny_llama_dir)
    load_pretrained(wrapper, WeightSource(tiny_llama_dir / "model.safetensors", prefix="model"))
    _assert_same_tensors(wrapper.model, _pretrained(tiny_llama_dir))


def test_base_model_prefix_added_for_a_base_model_from_a_head_checkpoint(tiny_llama_dir: Path) -> None:
    from transformers import AutoModel

    ours = _empty(tiny_llama_dir, auto=AutoModel)
    report = load_pretrained(ours, WeightSource(tiny_llama_dir))
    assert type(ours).__name__ == "LlamaModel"
    _assert_same_tensors(ours, _pretrained(tiny_llama_dir, auto=AutoModel))
    assert report.ignored_keys == (), "a tied checkpoint has no lm_head key"


def test_a_new_head_is_initialized_only_when_listed(tiny_bert_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification
    with pytest.raises(LoadError, match=r"lacks tensor 'classifier.weight'.*\n.*lacks tensor 'classifier.bias'"):
        load_pretrained(_empty(tiny_bert_dir, auto=auto), WeightSource(tiny_bert_dir))
    ours = _empty(tiny_bert_dir, auto=auto)
    report = load_pretrained(ours, WeightSource(tiny_bert_dir), init_missing=["classifier"])
    assert set(report.initialized) == {"classifier.weight", "classifier.bias"}
    ref = _pretrained(tiny_bert_dir, auto=auto)
    mine, theirs = _state(ours), _state(ref)
    for key in theirs:
        if not key.startswith("classifier."):
            assert torch.equal(mine[key], theirs[key]), key  # "bert." stripped to read a BertModel file
    std = ours.config.initializer_range
    assert 0.5 * std < float(ours.classifier.weight.detach().std()) < 1.5 * std, "Hugging Face's _init_weights ran"
    assert torch.equal(ours.classifier.bias, torch.zeros_like(ours.classifier.bias))


def test_bert_linears_with_biases_quantize_bit_identically(tiny_bert_dir: Path) -> None:
    from transformers import AutoModel

    ref = _pretrained(tiny_bert_dir, auto=AutoModel)
    quantize_model(ref, CONFIGS["nf4+dq"])
    ours = _empty(tiny_bert_dir, auto=AutoModel)
    load_pretrained(ours, WeightSource(tiny_bert_dir), plan=QuantPlan(CONFIGS["nf4+dq"]), dtype=FP32)
    pairs = list(zip(quantized_layers(ours), quantized_layers(ref), strict=True))
    assert len(pairs) == 13  # 6 per layer + the pooler
    for (name, layer), (_, expected) in pairs:
        assert torch.equal(layer.weight.data, expected.weight.data) and torch.equal(layer.bias, expected.bias), name


# --------------------------------------------------------------------------- errors


def _never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(stored: Any) -> torch.Tensor:
        raise AssertionError(f"read {stored.key} before every header was checked")

    monkeypatch.setattr(loading, "_read", fail)


def _rewrite(src: Path, dst: Path, edit: Any) -> Path:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_a_missing_file_is_one_error_naming_it(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    with pytest.raises(LoadError, match=r"source=.*empty.*no model.safetensors"):
        load_pretrained(_empty(tiny_llama_dir), WeightSource(tmp_path / "empty"))
    path = _resave(tiny_llama_dir, tmp_path / "sharded", shard="200KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    lost = index["model.layers.1.mlp.down_proj.weight"]
    first = next(key for key, file in index.items() if file == lost)
    (path / lost).unlink()
    _never_read(monkeypatch)
    with pytest.raises(LoadError, match=rf"{lost}: missing or not a valid safetensors file .*should hold '{first}'"):
        load_pretrained(_empty(path), WeightSource(path))


def test_a_corrupt_file_is_one_error_naming_it(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    path = _rewrite(tiny_llama_dir, tmp_path / "cut", lambda t: None)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])  # the last tensor's bytes are cut short
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    _never_read(monkeypatch)
    with pytest.raises(
        LoadError, match=rf"cut.model.safetensors: missing or not a valid safetensors file \(tensor '{last}'"
    ):
        load_pretrained(_empty(path), WeightSource(path))
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(LoadError, match=r"not a valid safetensors file .*should hold 'model.embed_tokens.weight'"):
        load_pretrained(_empty(path), WeightSource(path))


def test_a_wrong_shape_is_one_error_naming_file_and_tensor(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:100].clone()
        t["model.norm.weight"] = t["model.norm.weight"][:10].clone()

    path = _rewrite(tiny_llama_dir, tmp_path / "shape", shrink)
    _never_read(monkeypatch)
    with pytest.raises(LoadError) as err:
        load_pretrained(_empty(path), WeightSource(path), plan=QuantPlan(CONFIGS["nf4"]))
    message = str(err.value)
    assert "shape/model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has shape [100, 64]" in message
    assert "'model.norm.weight' has shape [10], but the model's 'model.norm.weight' is [64]" in message


def test_a_missing_or_unexpected_tensor_is_one_error(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t["model.layers.1.self_attn.k_proj.weight"]
        t["model.layers.0.extra.weight"] = torch.zeros(2)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # stale, known-ignorable

    path = _rewrite(tiny_llama_dir, tmp_path / "keys", edit)
    _never_read(monkeypatch)
    with pytest.raises(LoadError) as err:
        load_pretrained(_empty(path), WeightSource(path))
    lines = str(err.value).splitlines()
    assert len(lines) == 3, lines
    assert "keys/model.safetensors' lacks tensor 'model.layers.1.self_attn.k_proj.weight'" in lines[1]
    assert "keys/model.safetensors: unexpected tensor 'model.layers.0.extra.weight'" in lines[2]
    monkeypatch.undo()
    fine = _rewrite(tiny_llama_dir, tmp_path / "stale", lambda t: t.update({"a.rotary_emb.inv_freq": torch.ones(2)}))
    report = load_pretrained(_empty(fine), WeightSource(fine))
    assert report.ignored_keys == ("a.rotary_emb.inv_freq",)


def test_tensors_left_on_meta_are_one_error(tiny_llama_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # buffers on meta too: inv_freq is in no checkpoint
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    with pytest.raises(LoadError, match=r"model.safetensors'.*still on meta: 'model.rotary_emb.inv_freq'"):
        load_pretrained(model, WeightSource(tiny_llama_dir))


# --------------------------------------------------------------------------- memory


def test_empty_weights_puts_parameters_on_meta_and_keeps_buffers(tiny_llama_dir: Path) -> None:
    model = _empty(tiny_llama_dir)
    assert all(p.is_meta for p in model.parameters()) and model.lm_head.weight is model.model.embed_tokens.weight
    ref = _pretrained(tiny_llama_dir)
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert not nn.Linear(4, 4).weight.is_meta, "the patch is undone"


def test_each_source_tensor_is_freed_before_the_next_is_read(tiny_llama_dir: Path, monkeypatch: Any) -> None:
    """fp32 file into bf16 with an nf4 plan: no source storage (an fp32 copy) outlives its own step."""
    sources: list[weakref.ref[Any]] = []
    real_read = loading._read

    def read(stored: Any) -> torch.Tensor:
        alive = [ref for ref in sources if ref() is not None]
        assert not alive, f"{len(alive)} earlier source tensors still alive when reading {stored.key}"
        tensor = real_read(stored)
        sources.append(weakref.ref(tensor.untyped_storage()))
        return tensor

    monkeypatch.setattr(loading, "_read", read)
    model = _empty(tiny_llama_dir, BF16)
    report = load_pretrained(model, WeightSource(tiny_llama_dir), plan=QuantPlan(CONFIGS["nf4+dq"]), dtype=BF16)
    assert len(sources) == report.tensors_loaded == 20
    assert all(ref() is None for ref in sources), "every fp32 source is gone: the model holds bf16 and nf4 only"


class _Fp32Allocations(TorchDispatchMode):
    """Tracks every fp32 tensor an op creates, by storage, and the most bytes of them alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, tuple[weakref.ref[Any], int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == FP32 and not t.is_meta:
                storage = t.untyped_storage()
                self.alive[storage.data_ptr()] = (weakref.ref(storage), storage.nbytes())
        self.alive = {k: v for k, v in self.alive.items() if v[0]() is not None}
        self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
        return out


@pytest.mark.parametrize("plan", [None, "nf4+dq"])
def test_a_bf16_load_never_holds_an_fp32_copy(plan: str | None, bf16_dir: Path) -> None:
    model = _empty(bf16_dir, BF16)
    largest_linear = 4 * max(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head
    )
    with _Fp32Allocations() as mode:
        load_pretrained(model, WeightSource(bf16_dir), plan=QuantPlan(CONFIGS[plan]) if plan else None, dtype=BF16)
    embedding = 4 * model.model.embed_tokens.weight.numel()
    if plan is None:
        assert mode.peak == 0, "nothing was ever converted to fp32"
    else:
        assert 0 < mode.peak <= 4 * largest_linear < embedding / 10, "one layer's fp32 weight and its temporaries"


RSS_SCRIPT = """
import json, sys, torch, bitsandbytes, transformers, transformers.models.llama.modeling_llama
from lightning_adapt.loading import QuantPlan, WeightSource, current_rss_bytes, empty_weights, load_pretrained
from lightning_adapt.quantize import QuantConfig
from transformers import AutoConfig, AutoModelForCausalLM

path, mode = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(path)
baseline = current_rss_bytes()
with empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
plan = QuantPlan(QuantConfig(mode="nf4")) if mode == "nf4" else None
report = load_pretrained(model, WeightSource(path), plan=plan, dtype=torch.bfloat16, baseline_rss=baseline)
print(json.dumps({"peak": report.peak_rss_bytes - baseline, "final": report.weight_bytes,
                  "largest": report.largest_tensor_fp32_bytes, "read": report.bytes_read}))
"""


def _write_llama(path: Path, hidden: int, layers: int, inter: int, vocab: int) -> int:
    """A random Llama-shaped bf16 checkpoint written tensor by tensor; returns its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_adapt.export.safetensors_io import TensorEntry, write_safetensors

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False)  # fmt: skip
    config.save_pretrained(path)
    with empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=BF16)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    entries = [TensorEntry(k, s, BF16, lambda s=s: torch.randn(s, dtype=BF16) * 0.02) for k, s in shapes.items()]
    write_safetensors(path, entries, BF16, 2**40)
    return sum(torch.Size(s).numel() for s in shapes.values())


@pytest.mark.parametrize("mode", ["bf16", "nf4"])
def test_peak_rss_of_a_56m_model_stays_within_the_bound_and_below_its_fp32_size(mode: str, tmp_path: Path) -> None:
    params = _write_llama(tmp_path, hidden=512, layers=8, inter=1408, vocab=32000)
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RSS_SCRIPT), str(tmp_path), mode],
        capture_output=True, text=True, cwd=ROOT, check=True, timeout=300,
    )  # fmt: skip
    got = json.loads(run.stdout.strip().splitlines()[-1])
    fp32 = 4 * params
    assert got["read"] == 2 * params and got["largest"] == 4 * 32000 * 512, "the embedding is the largest tensor"
    # The bound: final weights (+10% allocator slack) + one fp32 tensor. A load that made an fp32 copy of the
    # model (or kept the read bf16 sources of quantized layers) would exceed the fp32 size of the model.
    assert got["peak"] < 1.1 * got["final"] + got["largest"], got
    assert got["peak"] < fp32, (got, fp32)


# --------------------------------------------------------------------------- the seam and the ready task


def test_a_plan_is_attached_and_withdrawn() -> None:
    module = nn.Linear(2, 2)
    assert quant_plan(module) is None
    plan = QuantPlan(CONFIGS["nf4"])
    attach_quant_plan(module, plan)
    assert quant_plan(module) is plan and "plan" not in dict(module.named_modules())
    attach_quant_plan(module, None)
    assert quant_plan(module) is None


def test_the_task_builds_its_model_in_configure_model(tiny_llama_dir: Path) -> None:
    from lightning_adapt.tasks import CausalLMTask

    task = CausalLMTask(str(tiny_llama_dir), activation_checkpointing=True)
    assert task.model is None and task.load_report is None
    task.configure_model()
    model = task.model
    assert type(model).__name__ == "LlamaForCausalLM" and model.training and model.is_gradient_checkpointing
    _assert_same_tensors(model, _pretrained(tiny_llama_dir))
    assert task.load_report is not None and task.load_report.tensors_loaded == 20
    task.configure_model()
    assert task.model is model, "a second configure_model does nothing"


def test_the_task_quantizes_while_loading_when_a_plan_is_attached(tiny_llama_dir: Path) -> None:
    from lightning_adapt.tasks import CausalLMTask

    task = CausalLMTask(str(tiny_llama_dir))
    attach_quant_plan(task, QuantPlan(CONFIGS["nf4+dq"]))
    task.configure_model()
    ref = _pretrained(tiny_llama_dir)
    quantize_model(ref, CONFIGS["nf4+dq"])
    ours = dict(quantized_layers(task.model))
    assert len(ours) == 14 and not is_quantized(task.model.lm_head)
    for name, expected in quantized_layers(ref):
        assert torch.equal(ours[name].weight.data, expected.weight.data), name


def test_under_bf16_true_the_task_loads_bf16_weights(tiny_llama_dir: Path) -> None:
    from helpers.toy import trainer

    from lightning_adapt.tasks import CausalLMTask

    task = CausalLMTask(str(tiny_llama_dir))
    rows = [{"input_ids": IDS[0], "attention_mask": torch.ones_like(IDS[0]), "labels": IDS[0]}]
    trainer(precision="bf16-true").validate(task, DataLoader(rows, batch_size=1))  # type: ignore[arg-type]
    params = sum(p.numel() for p in task.model.parameters())
    buffers = 4 * sum(b.numel() for b in task.model.buffers())  # RoPE inv_freq, computed in fp32
    assert task.load_report is not None
    assert task.load_report.weight_bytes == 2 * params + buffers, "loaded in bf16 inside configure_model"
