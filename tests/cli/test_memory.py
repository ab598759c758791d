"""The memory estimator: exact parameter counts against real (meta-device) models, the article's figures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

from lightning_adapt.memory.cli import estimate_command, main
from lightning_adapt.memory.estimator import (
    ADAM8_QMAP_BYTES,
    ARTICLE_ASSUMPTIONS,
    PRESETS,
    QUANT_TABLE_BYTES,
    Assumptions,
    LinearSpec,
    ModelShape,
    activation_bytes,
    estimate,
    format_table,
    linear_shapes,
    load_model_shape,
    quantized_bytes,
    smallest_gpu,
)

BERT = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=500,
    max_position_embeddings=128,
)  # fmt: skip
HEADS = ("classifier", "score")
GQA = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=1000,
)  # fmt: skip


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _meta_numel(model_cls: Any, config: Any) -> int:
    with torch.device("meta"):
        return _numel(model_cls(config))


@pytest.mark.parametrize(
    ("cfg", "model_cls", "config_cls"),
    [
        (PRESETS["llama-2-7b"], LlamaForCausalLM, LlamaConfig),
        (PRESETS["llama-2-70b"], LlamaForCausalLM, LlamaConfig),
        (GQA, LlamaForCausalLM, LlamaConfig),
        ({**GQA, "tie_word_embeddings": True}, LlamaForCausalLM, LlamaConfig),
        ({**GQA, "head_dim": 64, "attention_bias": True, "mlp_bias": True}, LlamaForCausalLM, LlamaConfig),
        ({**GQA, "model_type": "qwen2", "tie_word_embeddings": True}, Qwen2ForCausalLM, Qwen2Config),
        (
            dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=128),
            GPT2LMHeadModel,
            GPT2Config,
        ),
        (
            dict(
                model_type="bert",
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=500,
                max_position_embeddings=128,
            ),
            BertModel,
            BertConfig,
        ),
    ],
    ids=["llama-2-7b", "llama-2-70b-gqa", "gqa", "gqa-tied", "head_dim-bias", "qwen2-tied", "gpt2", "bert"],
)
def test_parameter_count_matches_model_built_from_config(cfg: dict[str, Any], model_cls: Any, config_cls: Any) -> None:
    fields = {k: v for k, v in cfg.items() if k != "model_type"}
    assert ModelShape.from_config(cfg).total_params == _meta_numel(model_cls, config_cls(**fields))


def _tensor_count(shape: ModelShape) -> int:
    """Parameter tensors as the estimator counts them: a 1-byte optimizer scalar per trainable tensor."""
    probe = Assumptions(base_dtype="fp32", optimizer="adamw-fp32", state_bytes_per_tensor=1)
    return estimate(shape, "full", probe).optimizer_bytes - 8 * shape.total_params


@pytest.mark.parametrize(
    ("model_cls", "config"),
    [
        (BertForSequenceClassification, BertConfig(**BERT, num_labels=3)),
        (BertModel, BertConfig(**BERT)),
        (LlamaForSequenceClassification, LlamaConfig(**GQA, num_labels=5)),
        (LlamaForSequenceClassification, LlamaConfig(**GQA, num_labels=2, tie_word_embeddings=True)),
        (LlamaModel, LlamaConfig(**GQA)),
        (Qwen2ForSequenceClassification, Qwen2Config(**GQA, num_labels=4)),
        (GPT2ForSequenceClassification, GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, num_labels=3)),
        (GPT2LMHeadModel, GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500)),
        (LlamaForCausalLM, LlamaConfig(**GQA)),
    ],
    ids=[
        "bert-cls",
        "bert",
        "llama-cls",
        "llama-cls-tied",
        "llama-base",
        "qwen2-cls",
        "gpt2-cls",
        "gpt2-lm",
        "llama-lm",
    ],
)
def test_architectures_pick_the_head_exactly(model_cls: Any, config: Any) -> None:
    """Parameters and parameter tensors of the model the callback sees: ``to_dict()`` keeps ``id2label``,
    not ``num_labels``, and the live class stands for ``architectures``."""
    with torch.device("meta"):
        model = model_cls(config)
    shape = ModelShape.from_config({**config.to_dict(), "architectures": [model_cls.__name__]}, model_cls.__name__)
    assert shape.total_params == _numel(model)
    assert _tensor_count(shape) == len(list(model.parameters()))
    heads = {n: (m.in_features, m.out_features, m.bias is not None) for n, m in model.named_modules() if n in HEADS}
    assert {s.name: (s.in_features, s.out_features, s.bias) for s in shape.heads} == heads


def test_task_heads_are_trained_through_modules_to_save_and_never_quantized() -> None:
    shape = ModelShape.from_config({**BERT, "model_type": "bert", "architectures": ["BertForSequenceClassification"]})
    assert shape.heads == (LinearSpec("classifier", 64, 2, 1, True),)  # no num_labels, no id2label: 2
    head = 64 * 2 + 2
    for method in ("lora", "qlora"):
        plain = estimate(shape, method, Assumptions(base_dtype="fp32", targets=("query", "value")))
        saved = estimate(
            shape, method, Assumptions(base_dtype="fp32", targets=("query", "value"), modules_to_save=("classifier",))
        )
        assert saved.trainable_params - plain.trainable_params == head
        assert (saved.gradient_bytes - plain.gradient_bytes, saved.optimizer_bytes - plain.optimizer_bytes) == (
            4 * head,
            8 * head,
        )
        assert saved.weights_bytes == plain.weights_bytes  # the head stays fp32 either way
    full = estimate(shape, "full", Assumptions(base_dtype="fp32"))
    assert full.trainable_params == shape.total_params
    # all-linear: every block linear and the pooler, not the head; naming the head adapts it
    all_linear = estimate(shape, "lora", Assumptions(rank=2, targets=("all-linear",))).trainable_params
    assert all_linear == 2 * sum((i + o) * c for n, (i, o, c) in linear_shapes(shape).items() if n != "classifier")
    assert estimate(shape, "lora", Assumptions(rank=2, targets=("classifier",))).trainable_params == 2 * (64 + 2)


def test_modules_to_save_naming_a_linear_trains_it_unquantized() -> None:
    shape = ModelShape.from_config({**BERT, "model_type": "bert"})
    fp32 = Assumptions(base_dtype="fp32", quant_compute_dtype="fp32", targets=("query",))
    plain = estimate(shape, "qlora", fp32)
    saved = estimate(shape, "qlora", replace(fp32, modules_to_save=("dense",)))
    dense = [s for s in shape.linears if s.name.endswith("dense")]  # attention.output, intermediate, output, pooler
    assert len(dense) == 4
    numel = sum((s.in_features + 1) * s.out_features * s.count for s in dense)
    assert saved.trainable_params - plain.trainable_params == numel
    packed = sum(quantized_bytes(s.in_features, s.out_features, "nf4-dq") * s.count for s in dense)
    assert plain.quantized_weights_bytes - saved.quantized_weights_bytes == packed
    weights = sum(s.in_features * s.out_features * s.count for s in dense)
    assert saved.base_weights_bytes - plain.base_weights_bytes == 4 * weights - packed


def test_llama_2_7b_figures_match_the_article() -> None:
    shape = load_model_shape("llama-2-7b")
    assert shape.total_params == 6_738_415_616
    full, lora, qlora = (estimate(shape, m) for m in ("full", "lora", "qlora"))
    assert full.weights_bytes == 2 * 6_738_415_616  # 13.5 GB bf16
    assert lora.trainable_params == qlora.trainable_params == 16 * (4096 + 4096) * 4 * 32  # 16.8M
    assert 0.0024 <= lora.trainable_params / lora.total_params < 0.0025
    assert lora.optimizer_bytes == 8 * lora.trainable_params  # 134 MB fp32 Adam
    assert lora.gradient_bytes == lora.adapter_bytes == 2 * lora.trainable_params  # 34 MB bf16
    embeddings_and_head = 2 * 2 * 32000 * 4096  # stay bf16 under QLoRA
    assert qlora.base_weights_bytes > embeddings_and_head
    assert 3.5e9 <= qlora.base_weights_bytes <= 3.9e9
    assert full.total_bytes == full.weights_bytes + full.optimizer_bytes + full.gradient_bytes
    assert full.optimizer_bytes == 8 * full.trainable_params


def test_article_assumptions_reproduce_each_cell_up_to_its_7b_rounding() -> None:
    shape = load_model_shape("llama-2-7b")
    scale = 7e9 / shape.total_params  # the article rounds 6.74B to 7B
    full, lora, qlora = (estimate(shape, m, ARTICLE_ASSUMPTIONS[m]) for m in ("full", "lora", "qlora"))
    assert (qlora.optimizer_bytes, qlora.gradient_bytes) == (lora.optimizer_bytes, lora.gradient_bytes)
    # the article's 3.5 GB is 7B × 4 bits flat; ours adds block constants and keeps embeddings/head bf16
    assert 7e9 * 4 / 8 < qlora.base_weights_bytes * scale < 4.1e9
    assert full.optimizer_bytes * scale == pytest.approx(28e9, rel=0.01)
    assert full.gradient_bytes * scale == pytest.approx(14e9, rel=0.01)
    assert full.total_bytes * scale == pytest.approx(56e9, rel=0.01)
    assert lora.optimizer_bytes == pytest.approx(130e6, rel=0.05)
    assert lora.gradient_bytes == pytest.approx(34e6, rel=0.02)
    sixteen = estimate(shape, "full", Assumptions(master_weights=True))  # the text's ~16 B/param
    assert sixteen.total_bytes == 16 * shape.total_params


def test_llama_65b_qlora_fits_48_gb() -> None:
    e = estimate(load_model_shape("llama-65b"), "qlora")
    assert e.weights_bytes + e.optimizer_bytes + e.gradient_bytes < 48e9
    assert e.smallest_gpu is not None and e.smallest_gpu.startswith("40 GB")


@pytest.mark.parametrize(
    ("quant", "bits"), [("nf4-dq", 4 + 8 / 64 + 32 / (64 * 256)), ("nf4", 4.5), ("int8", 8 + 32 / 4096)]
)
def test_quantized_bits_per_weight(quant: Any, bits: float) -> None:
    per_weight = quantized_bytes(4096, 4096, quant) - QUANT_TABLE_BYTES[quant]  # tables are per layer
    assert per_weight * 8 / 4096**2 == pytest.approx(bits, rel=1e-6)


@pytest.mark.parametrize(
    ("mode", "double_quant", "quant"), [("nf4", True, "nf4-dq"), ("nf4", False, "nf4"), ("int8", False, "int8")]
)
@pytest.mark.parametrize(("in_features", "out_features", "blocksize"), [(64, 32, 64), (200, 333, 64), (128, 4160, 128)])
def test_quantized_bytes_equal_a_real_bitsandbytes_layer(
    mode: Any, double_quant: bool, quant: Any, in_features: int, out_features: int, blocksize: int
) -> None:
    """Block counts not divisible by 256 (nested constants) and odd element counts included."""
    pytest.importorskip("bitsandbytes")
    from lightning_adapt.quantize import QuantConfig, quant_storage_bytes, quantize_linear

    blocksize = 64 if mode == "int8" else blocksize
    layer = quantize_linear(
        torch.nn.Linear(in_features, out_features, bias=False), QuantConfig(mode, double_quant, blocksize)
    )
    assert quantized_bytes(in_features, out_features, quant, blocksize) == quant_storage_bytes(layer)


def test_optimizer_kinds_and_master_copy() -> None:
    shape = load_model_shape("llama-2-7b")
    n = estimate(shape, "lora").trainable_params
    per_param = {
        k: estimate(shape, "lora", Assumptions(optimizer=k)).optimizer_bytes / n
        for k in ("adamw-fp32", "adamw-16bit", "adamw-8bit")
    }
    per_param["adamw-8bit"] -= ADAM8_QMAP_BYTES / n  # two shared code tables, once per optimizer
    assert per_param == pytest.approx({"adamw-fp32": 8, "adamw-16bit": 4, "adamw-8bit": 2 + 8 / 256}, rel=1e-12)
    torch_adamw = Assumptions(state_bytes_per_tensor=4)  # torch keeps an fp32 `step` per parameter tensor
    assert estimate(shape, "lora", torch_adamw).optimizer_bytes == 8 * n + 4 * 2 * 4 * 32  # A and B, 4 targets
    master = estimate(shape, "lora", Assumptions(master_weights=True)).optimizer_bytes
    assert master == 12 * n
    fp32_adapters = Assumptions(master_weights=True, adapter_dtype="fp32")  # already fp32: no copy
    assert estimate(shape, "lora", fp32_adapters).optimizer_bytes == 8 * n


def test_modules_to_save_are_trained_fully_in_base_dtype() -> None:
    shape = ModelShape.from_config(GQA)  # untied: embed_tokens and lm_head are separate tensors
    plain = estimate(shape, "qlora", Assumptions(base_dtype="fp32"))
    saved = estimate(shape, "qlora", Assumptions(base_dtype="fp32", modules_to_save=("lm_head", "norm")))
    extra = 1000 * 256 + 256  # the head and the final norm (not the per-layer norms: whole names only)
    assert saved.trainable_params - plain.trainable_params == extra
    assert (saved.gradient_bytes - plain.gradient_bytes, saved.optimizer_bytes - plain.optimizer_bytes) == (
        4 * extra,
        8 * extra,
    )
    assert saved.weights_bytes == plain.weights_bytes  # already counted, never quantized
    with pytest.raises(ValueError, match=r"modules_to_save='mlp': mlp not a module .*Allowed: q_proj.*embed_tokens"):
        estimate(shape, "lora", Assumptions(modules_to_save=("mlp",)))


def test_targets_all_linear_and_suffix_matching() -> None:
    shape = load_model_shape("llama-2-70b")
    assert linear_shapes(shape)["k_proj"] == (8192, 1024, 80)  # GQA: 8 kv heads × 128
    rank = 8
    expected = sum(rank * (i + o) * c for i, o, c in linear_shapes(shape).values())
    assert estimate(shape, "lora", Assumptions(rank=rank, targets=("all-linear",))).trainable_params == expected
    gpt2 = ModelShape.from_config(dict(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=128))
    both = estimate(gpt2, "lora", Assumptions(rank=4, targets=("c_proj",))).trainable_params
    assert both == 4 * (64 + 64) * 2 + 4 * (256 + 64) * 2  # attn.c_proj and mlp.c_proj


def test_activations_only_when_asked_and_checkpointing_shrinks_them() -> None:
    shape = load_model_shape("llama-2-7b")
    assert estimate(shape, "lora").activation_bytes == 0
    e = estimate(shape, "lora", Assumptions(batch_size=2, seq_len=1024))
    per_block = 6 * 4096 + 2 * 4096 + 4 * 11008
    assert e.activation_bytes == 2 * 2048 * 32 * per_block + 6 * 2048 * 32000
    assert e.total_bytes == e.weights_bytes + e.optimizer_bytes + e.gradient_bytes + e.activation_bytes
    assert activation_bytes(shape, 2, 1024, True) < e.activation_bytes / 5


def test_smallest_gpu_boundaries() -> None:
    assert smallest_gpu(24 * 2**30) == "24 GB (RTX 4090, L4, A10G)"
    assert smallest_gpu(24 * 2**30 + 1) == "40 GB (A100 40GB)"
    assert smallest_gpu(8 * 2**30 + 1) == "12 GB (RTX 3060, RTX 4070)"
    assert smallest_gpu(12 * 2**30 + 1) == "16 GB (T4, V100 16GB, RTX 4080)"
    assert smallest_gpu(80 * 2**30 + 1) == "94 GB (H100 NVL)"
    assert smallest_gpu(192 * 2**30 + 1) is None


def test_config_json_path_and_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**GQA, "model_type": "mistral"}))
    folder, file = load_model_shape(str(tmp_path)), load_model_shape(str(tmp_path / "config.json"))
    assert folder.linears == file.linears and folder.others == file.others
    assert load_model_shape(str(tmp_path)).total_params == _meta_numel(LlamaForCausalLM, LlamaConfig(**GQA))


@pytest.mark.parametrize(
    ("call", "needles"),
    [
        (lambda: load_model_shape("llama-99b"), ["model='llama-99b'", "llama-2-7b", "Fix"]),
        (lambda: ModelShape.from_config({"hidden_size": 8}), ["intermediate_size", "num_hidden_layers"]),
        (lambda: Assumptions(rank=0, batch_size=4), ["rank=0", "batch_size and seq_len"]),
        (lambda: Assumptions(optimizer="sgd"), ["optimizer='sgd'", "adamw-8bit"]),  # type: ignore[arg-type]
        (
            lambda: estimate(load_model_shape("llama-2-7b"), "lora", Assumptions(targets=("query", "q_proj"))),
            ["targets=", "query", "gate_proj", "all-linear"],
        ),
        (
            lambda: ModelShape.from_config({**BERT, "model_type": "bert", "architectures": ["BertForMaskedLM"]}),
            ["architectures=['BertForMaskedLM']", "*ForSequenceClassification, *Model", "Fix"],
        ),
        (
            lambda: ModelShape.from_config(
                {**BERT, "model_type": "roberta", "architectures": ["RobertaForSequenceClassification"]}
            ),
            ["RobertaForSequenceClassification", "roberta", "(modeled: *Model)"],
        ),
        (lambda: Assumptions(quant_blocksize=100), ["quant_blocksize=100", "32, 64"]),
    ],
    ids=["preset", "config-fields", "rank-and-batch", "optimizer", "target", "architecture", "roberta", "blocksize"],
)
def test_errors_name_argument_value_and_allowed(call: Any, needles: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        call()
    assert all(n in str(err.value) for n in needles), str(err.value)


def test_cli_prints_table_and_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--model", "llama-2-7b"])
    out = capsys.readouterr().out
    assert "| component | full | lora r=16 | qlora r=16 |" in out
    assert "| trainable params | 6.74B (100%) | 16.8M (0.249%) | 16.8M (0.249%) |" in out
    assert "nf4-dq" in out and "Smallest GPU for qlora: 8 GB" in out
    qlora_line = next(line for line in out.splitlines() if line.startswith("Smallest GPU for qlora"))
    assert "16 GB" in qlora_line  # issue 17: a T4 holds a 7B QLoRA (4.07 GB)
    assert "| optimizer states | 53.91 GB | 134.2 MB | 134.2 MB |" in out
    assert format_table([estimate(load_model_shape("llama-2-7b"), "lora")]).startswith("| component | lora r=16 |")


def test_cli_json_integer_fields(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--method", "qlora", "--json"])
    one = json.loads(capsys.readouterr().out)
    for key in ("weights_bytes", "trainable_params", "optimizer_bytes", "gradient_bytes", "total_bytes"):
        assert type(one[key]) is int, key
    assert one["assumptions"]["quant"] == "nf4-dq"
    estimate_command(method="all", json=True)
    every = json.loads(capsys.readouterr().out)
    assert set(every) == {"full", "lora", "qlora"} and every["lora"]["trainable_params"] == 16_777_216


def test_cli_errors_exit_with_one_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--targets", "qkv"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2  # as every other lightning-adapt subcommand
    assert "targets='qkv'" in err and "all-linear" in err and len(err.strip().splitlines()) == 1


def test_cli_quant_blocksize_and_modules_to_save(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = BertConfig(**BERT, num_labels=3).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    args = ["--model", str(tmp_path), "--targets", "query,value", "--base_dtype", "fp32"]
    main([*args, "--method", "qlora", "--quant_blocksize", "128", "--modules_to_save", "classifier", "--json"])
    out = json.loads(capsys.readouterr().out)
    shape = load_model_shape(str(tmp_path))
    expected = estimate(
        shape,
        "qlora",
        Assumptions(
            targets=("query", "value"), base_dtype="fp32", quant_blocksize=128, modules_to_save=("classifier",)
        ),
    )
    assert out == expected.to_json()
    assert out["assumptions"]["quant_blocksize"] == 128 and out["assumptions"]["modules_to_save"] == "classifier"
    assert out["trainable_params"] == 16 * (64 + 64) * 2 * 2 + 64 * 3 + 3  # r=16 on q and v in 2 layers; the head
    blocks64 = estimate(shape, "qlora", Assumptions(targets=("query", "value"), base_dtype="fp32"))
    assert out["quantized_weights_bytes"] < blocks64.quantized_weights_bytes  # half the absmax constants
    main([*args, "--modules_to_save", "classifier,LayerNorm", "--quant_blocksize", "128"])
    text = capsys.readouterr().out
    assert "modules_to_save classifier,LayerNorm trained fully" in text
    assert "nf4-dq (4 + 8/128 + 32/(128·256) ≈ 4.063 bits)" in text
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--modules_to_save", "pooler"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "modules_to_save='pooler'" in err and "pooler.dense" in err


def test_fsdp_divides_float_weights_gradients_and_optimizer_state_per_rank_ddp_divides_nothing() -> None:
    shape = load_model_shape("llama-2-7b")
    for method in ("full", "lora", "qlora"):
        one = estimate(shape, method, Assumptions())
        ddp = estimate(shape, method, Assumptions(world_size=8, strategy="ddp"))
        fsdp = estimate(shape, method, Assumptions(world_size=8, strategy="fsdp"))
        assert ddp == replace(one, assumptions=ddp.assumptions)
        quantized = one.quantized_weights_bytes
        # the packed 4-bit codes (half a byte per weight of the 7 projections of 32 blocks) are sharded too
        codes = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) // 2 if method == "qlora" else 0
        kept = quantized - codes  # block constants and code tables: whole on every rank
        assert fsdp.base_weights_bytes == -(-(one.base_weights_bytes - kept) // 8) + kept
        assert fsdp.optimizer_bytes == -(-one.optimizer_bytes // 8)
        assert fsdp.gradient_bytes == -(-one.gradient_bytes // 8)
        assert fsdp.total_bytes < one.total_bytes
        replicated = estimate(shape, method, Assumptions(world_size=8, strategy="fsdp", shard_quantized=False))
        assert replicated.base_weights_bytes == -(-(one.base_weights_bytes - quantized) // 8) + quantized
        assert fsdp.quantized_weights_bytes == kept + -(-codes // 8)
    assert estimate(shape, "qlora", Assumptions(world_size=8, strategy="fsdp")).quantized_weights_bytes < 0.6e9
    with pytest.raises(ValueError, match="world_size=0"):
        Assumptions(world_size=0)


def test_cli_states_the_per_rank_figures(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--world_size", "4", "--strategy", "fsdp", "--method", "full"])
    out = capsys.readouterr().out
    assert "Per rank of 4 (fsdp)" in out
    full_one = estimate(load_model_shape("llama-2-7b"), "full", Assumptions())
    full_four = estimate(load_model_shape("llama-2-7b"), "full", Assumptions(world_size=4, strategy="fsdp"))
    assert f"{full_four.total_bytes / 1e9:.2f}" in out and full_four.total_bytes * 3 < full_one.total_bytes
