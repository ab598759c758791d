"""The GGUF writer, read back with ``gguf.GGUFReader`` (no llama.cpp needed): tensor names, shapes and values
(f32 bit-exact, f16/bf16 exactly torch's cast, q8_0 exactly ggml's reference rounding), Llama's q/k rows in
llama.cpp's rotary order, the architecture metadata and the tokenizer arrays; the adapter format; every bad input
as one line; atomic writes; the peak memory of a streamed export. llama.cpp itself:
tests/export/test_gguf_llama_cpp.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_adapt.errors import ExportError
from lightning_adapt.export.gguf import write_gguf, write_gguf_adapter
from lightning_adapt.export.safetensors_io import TensorEntry, model_keys, read_index
from lightning_adapt.export.stream_merge import Adapters, LayerAdapter, _entries

gguf = pytest.importorskip("gguf", reason="the GGUF export needs the gguf package (the gguf extra)")

ROOT = Path(__file__).resolve().parents[2]
HIDDEN, HEADS, KV_HEADS, LAYERS = 64, 4, 2, 2
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from lightning_adapt.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"), local_files_only=True)


def tiny_model(path: Path, tokenizer: Any, kind: str = "llama", **config: Any) -> Path:
    """A 2-layer random Llama (untied, GQA 4/2 heads) or Qwen2 (q/k/v biases) with SmolLM2's real tokenizer; the
    Qwen2 one splits text as Qwen2 does (its pre-tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        kind
    ]
    shape = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 num_key_value_heads=KV_HEADS, max_position_embeddings=256, tie_word_embeddings=False,
                 vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model_class(config_class(**{**shape, **config})).save_pretrained(path)
    tokenizer.save_pretrained(path)
    if kind == "qwen2":
        data = json.loads((path / "tokenizer.json").read_text())
        split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, byte_level]}
        (path / "tokenizer.json").write_text(json.dumps(data))
    return path


def random_adapters(
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj"), r: int = 4, alpha: float = 8.0
) -> Adapters:
    g = torch.Generator().manual_seed(1)
    layers = {}
    for i in range(LAYERS):
        for t in targets:
            out = HIDDEN if t == "q_proj" else HIDDEN // HEADS * KV_HEADS
            a, b = torch.randn(r, HIDDEN, generator=g), torch.randn(out, r, generator=g)
            layers[f"model.layers.{i}.self_attn.{t}"] = LayerAdapter(a, b, alpha / r)
    return Adapters(layers)


def merged(source: Path, adapters: Adapters) -> list[TensorEntry]:
    return _entries(model_keys(read_index(source)), adapters, None)


def llama_cpp_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows in llama.cpp's rotary order, written out index by index: row 2i is Hugging Face's row i,
    row 2i+1 its row i + d/2 (llama.cpp rotates neighbours, Hugging Face the two halves)."""
    d = weight.shape[0] // heads
    order = [h * d + (j // 2 if j % 2 == 0 else d // 2 + j // 2) for h in range(heads) for j in range(d)]
    return weight[order]


def read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, tensors)`` of a GGUF file: values as Python objects, tensors as the reader maps them."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def expected_tensors(entries: list[TensorEntry], permute: bool) -> dict[str, torch.Tensor]:
    """What the file should hold, by GGUF name, computed here independently of the writer's own mapping."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    out = {}
    for entry in entries:
        value = entry.load().float()
        if entry.key in names:
            out[names[entry.key]] = value
            continue
        _, _, i, rest = entry.key.split(".", 3)
        part, kind = rest.rsplit(".", 1)
        if permute and part in ("self_attn.q_proj", "self_attn.k_proj"):
            value = llama_cpp_rows(value, HEADS if part.endswith("q_proj") else KV_HEADS)
        out[f"blk.{i}.{parts[part]}.{kind}"] = value
    return out


# --------------------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def export(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``export(kind, quant)``: the tiny model of ``kind`` (embedding padded 64 rows past the tokenizer, MLP width 80:
    ffn_down's rows are no multiple of 32) with random LoRA on q/k/v merged, written once per module as ``quant``
    and read back: ``(source, merged entries, metadata, tensors)`` (reading a file's 49k-token arrays takes ~8 s)."""
    done: dict[tuple[str, str], tuple[Path, list[TensorEntry], dict[str, Any], dict[str, Any]]] = {}
    root = tmp_path_factory.mktemp("gguf")

    def get(kind: str, quant: str) -> tuple[Path, list[TensorEntry], dict[str, Any], dict[str, Any]]:
        if (kind, quant) not in done:
            source = root / kind
            if not source.is_dir():
                tiny_model(source, tokenizer, kind, vocab_size=len(tokenizer) + 64, intermediate_size=80)
            entries = merged(source, random_adapters())
            result = write_gguf(root / f"{kind}-{quant}.gguf", source, entries, quant)  # type: ignore[arg-type]
            fields, tensors = read(result.path)
            assert result.tensors == len(tensors)
            done[kind, quant] = source, entries, fields, tensors
        return done[kind, quant]

    return get


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_f32_round_trip_is_bit_exact(kind: str, tokenizer: Any, export: Any) -> None:
    """Every merged tensor comes back bit for bit under its llama.cpp name, Llama's q/k rows (and only those)
    reordered to llama.cpp's rotary layout; the metadata is the config's."""
    _, entries, fields, tensors = export(kind, "f32")
    expected = expected_tensors(entries, permute=kind == "llama")
    assert sorted(tensors) == sorted(expected)
    assert (kind == "qwen2") == any(name.endswith(".bias") for name in tensors)  # Qwen2's q/k/v biases
    for name, value in expected.items():
        got = tensors[name]
        assert got.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(got.data).view(np.uint32), value.numpy().view(np.uint32)), name
    q = tensors["blk.0.attn_q.weight"].data
    assert np.array_equal(q[1], (expected_tensors(entries, False)["blk.0.attn_q.weight"][8 if kind == "llama" else 1]))
    assert fields["general.architecture"] == kind and fields["general.type"] == "model"
    assert fields["general.file_type"] == 0
    assert {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith(kind + ".")} == {
        "context_length": 256, "embedding_length": HIDDEN, "feed_forward_length": 80, "block_count": LAYERS,
        "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "rope.dimension_count": HIDDEN // HEADS,
        "attention.layer_norm_rms_epsilon": pytest.approx(1e-6), "vocab_size": len(tokenizer) + 64,
        "rope.freq_base": 10000.0,
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_tokenizer_travels_with_the_model(kind: str, tokenizer: Any, export: Any) -> None:
    source, _, fields, _ = export(kind, "f32")
    n = len(tokenizer)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == {"llama": "gpt-2", "qwen2": "qwen2"}[kind]
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[:n] == tokenizer.convert_ids_to_tokens(list(range(n))) and len(tokens) == n + 64
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 64)] and set(types[n:]) == {5}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert {i for i, t in enumerate(types) if t == 3} == special and set(types[:n]) == {1, 3}
    data = json.loads((source / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in data["model"]["merges"]]
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False  # as the Hugging Face tokenizer: no BOS added
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_reduced_types_are_torch_casts_or_ggml_rounding(quant: str, export: Any) -> None:
    """Matrices in the asked type (f16/bf16: torch's round-to-nearest-even cast; q8_0: ggml's reference
    quantization, error at most half a step of each 32-block plus the step's f16 rounding), vectors f32, a q8_0
    matrix whose rows are no multiple of 32 (ffn_down's 80) f16."""
    _, entries, fields, tensors = export("llama", quant)
    assert fields["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[quant]
    t = gguf.GGMLQuantizationType
    for name, value in expected_tensors(entries, permute=True).items():
        got, data = tensors[name], np.asarray(tensors[name].data)
        if value.dim() == 1:
            assert got.tensor_type == t.F32 and np.array_equal(data, value.numpy())
        elif quant == "f16" or (quant == "q8_0" and value.shape[-1] % 32):
            assert got.tensor_type == t.F16 and np.array_equal(data, value.half().numpy()), name
        elif quant == "bf16":
            assert got.tensor_type == t.BF16
            assert np.array_equal(data.view(np.int16), value.bfloat16().view(torch.int16).numpy()), name
        else:
            assert got.tensor_type == t.Q8_0
            assert np.array_equal(data, gguf.quants.quantize(value.numpy(), t.Q8_0)), name
            blocks = value.reshape(-1, 32)
            step = blocks.abs().amax(1, keepdim=True) / 127
            error = (torch.from_numpy(gguf.quants.dequantize(data, t.Q8_0)).reshape(-1, 32) - blocks).abs()
            assert bool((error <= 0.57 * step).all()), name  # half a step, plus the f16 rounding of the step
    assert ("blk.0.ffn_down.weight" in tensors) and tensors["blk.0.ffn_down.weight"].tensor_type == (
        t.F16 if quant in ("f16", "q8_0") else t.BF16
    )


def test_a_tied_head_and_rotary_buffers_are_left_out(tokenizer: Any, tmp_path: Path) -> None:
    """llama.cpp reads a missing ``output.weight`` as the tied embedding; it has no use for inv_freq buffers."""
    source = tiny_model(tmp_path / "model", tokenizer, tie_word_embeddings=True)
    entries = merged(source, Adapters({}))
    head = TensorEntry("lm_head.weight", (len(tokenizer), HIDDEN), torch.float32, lambda: torch.zeros(1))
    rotary = TensorEntry("model.layers.0.self_attn.rotary_emb.inv_freq", (8,), torch.float32, lambda: torch.zeros(8))
    write_gguf(tmp_path / "model.gguf", source, [*entries, head, rotary], "f32")
    _, tensors = read(tmp_path / "model.gguf")
    assert "output.weight" not in tensors and "token_embd.weight" in tensors and len(tensors) == len(entries)


def test_llama3_rope_scaling_becomes_rope_freqs(tokenizer: Any, tmp_path: Path) -> None:
    """Llama 3.1's rope scaling: llama.cpp divides each rotary frequency by ``rope_freqs``; the frequencies it
    then uses are exactly transformers' own scaled ones."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}  # fmt: skip
    source = tiny_model(tmp_path / "model", tokenizer, rope_parameters=rope)
    write_gguf(tmp_path / "model.gguf", source, merged(source, Adapters({})), "f32")
    fields, tensors = read(tmp_path / "model.gguf")
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data)).double()
    base = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    config = LlamaConfig.from_pretrained(source)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert fields["llama.rope.freq_base"] == 500000.0
    torch.testing.assert_close(base / factors, scaled.double(), rtol=1e-6, atol=0)


def test_a_mapping_of_tensors_is_accepted(tokenizer: Any, tmp_path: Path) -> None:
    source = tiny_model(tmp_path / "model", tokenizer)
    entries = merged(source, Adapters({}))
    write_gguf(tmp_path / "a.gguf", source, entries, "f32")
    write_gguf(tmp_path / "b.gguf", source, {e.key: e.load() for e in entries}, "f32")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


# --------------------------------------------------------------------------- adapters


def test_lora_adapter_gguf_in_llama_cpp_layout(tokenizer: Any, tmp_path: Path) -> None:
    source = tiny_model(tmp_path / "model", tokenizer)
    adapters = random_adapters(r=4, alpha=8.0)
    result = write_gguf_adapter(tmp_path / "adapter.gguf", source, adapters)
    fields, tensors = read(tmp_path / "adapter.gguf")
    assert result.tensors == 2 * len(adapters.layers) == len(tensors)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    for i in range(LAYERS):
        for part, heads in (("q", HEADS), ("k", KV_HEADS), ("v", None)):
            layer = adapters.layers[f"model.layers.{i}.self_attn.{part}_proj"]
            a, b = tensors[f"blk.{i}.attn_{part}.weight.lora_a"], tensors[f"blk.{i}.attn_{part}.weight.lora_b"]
            assert list(a.shape) == [HIDDEN, 4] and list(b.shape) == [4, layer.lora_B.shape[0]]  # ggml order
            assert np.array_equal(a.data, layer.lora_A.numpy())
            rows = layer.lora_B if heads is None else llama_cpp_rows(layer.lora_B, heads)
            assert np.array_equal(b.data, rows.numpy())


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({"q": LayerAdapter(torch.ones(4, 64), torch.ones(64, 4), 2.0, torch.ones(64))}, "DoRA"),
        (
            {"q": LayerAdapter(torch.ones(4, 64), torch.ones(64, 4), 2.0),
             "v": LayerAdapter(torch.ones(8, 64), torch.ones(32, 8), 2.0)},
            "scales",
        ),
    ],
)  # fmt: skip
def test_adapters_llama_cpp_cannot_express_are_refused(
    layers: dict[str, LayerAdapter], message: str, tokenizer: Any, tmp_path: Path
) -> None:
    source = tiny_model(tmp_path / "model", tokenizer)
    named = {f"model.layers.0.self_attn.{k}_proj": v for k, v in layers.items()}
    with pytest.raises(ExportError, match=message) as info:
        write_gguf_adapter(tmp_path / "adapter.gguf", source, Adapters(named))
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)
    assert not (tmp_path / "adapter.gguf").exists()


# --------------------------------------------------------------------------- bad inputs, atomicity


def _break(source: Path, how: str) -> None:
    config = json.loads((source / "config.json").read_text())
    tok = json.loads((source / "tokenizer.json").read_text())
    if how == "architecture":
        config["architectures"] = ["GPT2LMHeadModel"]
    elif how == "rope":
        config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    elif how == "no tokenizer":
        (source / "tokenizer.json").unlink()
        return
    elif how == "sentencepiece":
        tok["model"]["byte_fallback"] = True
    elif how == "pre-tokenizer":
        tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    (source / "config.json").write_text(json.dumps(config))
    (source / "tokenizer.json").write_text(json.dumps(tok))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("architecture", r"architecture 'GPT2LMHeadModel' has no GGUF export; supported: \['LlamaForCausalLM'"),
        ("rope", r"rope scaling 'yarn' is not written to GGUF here; supported"),
        ("no tokenizer", r"has no tokenizer\.json"),
        ("sentencepiece", r"with byte fallback \(SentencePiece style\)"),
        ("pre-tokenizer", r"pre-tokenizer llama\.cpp is not told about here \(\['Metaspace'\]\)"),
        ("quant", r"quant='q4_k' is not a GGUF type written here; allowed: \['f32', 'f16', 'bf16', 'q8_0'\]"),
        ("exists", r"out_file='.*model\.gguf' exists"),
    ],
)
def test_each_bad_input_is_one_line_and_nothing_is_written(
    how: str, message: str, tokenizer: Any, tmp_path: Path
) -> None:
    source = tiny_model(tmp_path / "model", tokenizer)
    entries = merged(source, Adapters({}))
    if how == "exists":
        (tmp_path / "model.gguf").write_bytes(b"old")
    else:
        _break(source, how)
    with pytest.raises(ExportError, match=message) as info:
        write_gguf(tmp_path / "model.gguf", source, entries, "q4_k" if how == "quant" else "f16")  # type: ignore[arg-type]
    text = str(info.value)
    assert "\n" not in text and "Fix:" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", *(["model.gguf"] if how == "exists" else [])]


def test_a_failed_export_leaves_the_previous_file(tokenizer: Any, tmp_path: Path) -> None:
    """An error while tensors stream (here the fifth tensor's read) leaves the old file whole and no temp behind."""
    source = tiny_model(tmp_path / "model", tokenizer)
    entries = merged(source, Adapters({}))
    write_gguf(tmp_path / "model.gguf", source, entries, "f16")
    before = (tmp_path / "model.gguf").read_bytes()

    def broken() -> torch.Tensor:
        raise OSError("disk gone")

    entries[4] = TensorEntry(entries[4].key, entries[4].shape, entries[4].dtype, broken)
    with pytest.raises(OSError, match="disk gone"):
        write_gguf(tmp_path / "model.gguf", source, entries, "f32", overwrite=True)
    assert (tmp_path / "model.gguf").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.gguf"]
    write_gguf(tmp_path / "model.gguf", source, merged(source, Adapters({})), "f32", overwrite=True)
    write_gguf(tmp_path / "again.gguf", source, merged(source, Adapters({})), "f32")
    assert (tmp_path / "model.gguf").read_bytes() == (tmp_path / "again.gguf").read_bytes() != before


# --------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_peak_memory_is_a_few_tensors_not_the_model(tokenizer: Any, tmp_path: Path) -> None:
    """Measured in a fresh process (VmHWM restarted after the entries are planned): each export's peak RSS above
    its start stays within 3x the largest tensor in fp32 (an embedding of 49152 x 256: 50 MB), below the model
    (152 MB). The tokenizer's metadata (parsed tokenizer.json, packed arrays) is in that peak too."""
    source = tiny_model(tmp_path / "model", tokenizer, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                        num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    script = textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from lightning_adapt.export.gguf import write_gguf
        from lightning_adapt.export.safetensors_io import model_keys, read_index
        from lightning_adapt.export.stream_merge import Adapters, LayerAdapter, _entries
        from lightning_adapt.resources import current_rss_bytes, peak_rss_bytes, reset_peak_rss
        source = Path({str(source)!r})
        keys = model_keys(read_index(source))
        layers = {{f"model.layers.{{i}}.self_attn.q_proj": LayerAdapter(torch.randn(8, 256), torch.randn(256, 8), 2.0)
                  for i in range(4)}}
        for quant in ("f16", "q8_0", "f32"):
            entries = _entries(keys, Adapters(layers), None)
            reset_peak_rss()
            start = current_rss_bytes()
            write_gguf(source.parent / (quant + ".gguf"), source, entries, quant)
            print("PEAK", quant, peak_rss_bytes() - start)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    largest = 4 * len(tokenizer) * 256
    model = sum(t.nbytes for t in read_index(source).values())
    for line in (ln for ln in done.stdout.splitlines() if ln.startswith("PEAK")):
        _, quant, peak = line.split()
        print(
            f"{quant}: peak +{int(peak) / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB fp32, model {model / 1e6:.1f} MB"
        )
        assert 0 < int(peak) <= 3 * largest < model, line
    assert done.stdout.count("PEAK") == 3


def test_writing_needs_no_llama_cpp_and_no_lightning() -> None:
    """The writer is pure torch + gguf: importing it pulls in neither Lightning nor llama.cpp."""
    code = "import sys, lightning_adapt.export.gguf; print('lightning' in sys.modules, 'llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["False", "False"]


def test_copy_of_source_dir_without_weights_is_enough_for_metadata(tokenizer: Any, tmp_path: Path) -> None:
    """Only config.json and the tokenizer files are read from ``source_dir``: the tensors come from the stream."""
    source = tiny_model(tmp_path / "model", tokenizer)
    meta = tmp_path / "meta" / "model"  # the same folder name: general.name is it
    meta.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, meta / name)
    write_gguf(tmp_path / "meta.gguf", meta, merged(source, Adapters({})), "f32")
    write_gguf(tmp_path / "model.gguf", source, merged(source, Adapters({})), "f32")
    assert (tmp_path / "meta.gguf").read_bytes() == (tmp_path / "model.gguf").read_bytes()
