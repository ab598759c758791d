"""Training-memory estimator for full fine-tuning, LoRA and QLoRA (pure Python, no Lightning, no torch).

Parameter counts come exactly from a model config's shapes, never from rules of thumb: every linear layer
is ``in × out`` (+ ``out`` bias), grouped-query attention gives k/v an output of
``num_key_value_heads · head_dim``, a gated MLP has three matrices, tied embeddings count once.
Every byte figure is a sum of ``numel × bytes-per-element`` under the stated :class:`Assumptions`;
``GB`` means 10⁹ bytes (GPU capacities are GiB, 2³⁰). See ``docs/memory.md``.

Example:
    >>> shape = load_model_shape("llama-2-7b")
    >>> estimate(shape, "lora").trainable_params
    16777216
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

Method = Literal["full", "lora", "qlora"]
Dtype = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal["adamw-fp32", "adamw-16bit", "adamw-8bit"]
Quant = Literal["nf4-dq", "nf4", "int8"]

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZER_BYTES_PER_PARAM: dict[str, int] = {"adamw-fp32": 8, "adamw-16bit": 4, "adamw-8bit": 2}
ADAM8_BLOCK, ADAM8_MIN_SIZE = 256, 4096  # bitsandbytes blockwise 8-bit state; smaller tensors stay fp32
NF4_BLOCK, DQ_BLOCK = 64, 256
GPU_GIB = (24, 40, 48, 80)
GPU_EXAMPLES = {24: "RTX 4090, L4, A10G", 40: "A100 40GB", 48: "RTX A6000, L40S", 80: "A100 80GB, H100"}

_LLAMA_FIELDS: tuple[str, ...] = ("hidden_size", "intermediate_size", "num_hidden_layers")
_LLAMA_FIELDS += ("num_attention_heads", "num_key_value_heads", "vocab_size")
PRESETS: dict[str, dict[str, Any]] = {
    name: {"model_type": "llama", **dict(zip(_LLAMA_FIELDS, row, strict=True))}
    for name, row in {  # the published config.json values of each model
        "llama-2-7b": (4096, 11008, 32, 32, 32, 32000),
        "llama-2-13b": (5120, 13824, 40, 40, 40, 32000),
        "llama-2-70b": (8192, 28672, 80, 64, 8, 32000),
        "llama-65b": (8192, 22016, 80, 64, 64, 32000),
        "mistral-7b": (4096, 14336, 32, 32, 8, 32000),
        "llama-3-8b": (4096, 14336, 32, 32, 8, 128256),
    }.items()
}


@dataclass(frozen=True)
class LinearSpec:
    """``count`` linears named ``name`` (dotted suffix inside a block), ``in_features → out_features``."""

    name: str
    in_features: int
    out_features: int
    count: int
    bias: bool = False


@dataclass(frozen=True)
class ModelShape:
    """Exact parameter layout: block linears (quantizable, LoRA targets) and every other tensor.

    ``others`` maps a tensor name to ``(numel, count)``: embeddings, norms, biases outside ``linears``,
    an untied output head. ``lm_vocab`` is the head's vocabulary (0 without a language-model head).
    """

    name: str
    family: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    kv_dim: int
    gated_mlp: bool
    lm_vocab: int
    linears: tuple[LinearSpec, ...]
    others: tuple[tuple[str, int, int], ...]

    @property
    def total_params(self) -> int:
        lin = sum((s.in_features + s.bias) * s.out_features * s.count for s in self.linears)
        return lin + sum(numel * count for _, numel, count in self.others)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str = "config") -> ModelShape:
        """Build from a Hugging Face ``config.json`` dict (Llama/Mistral/Qwen2, GPT-2 or BERT names)."""
        family = _detect_family(cfg)
        need = _REQUIRED[family]
        missing = [f for f in need if cfg.get(f) is None]
        if missing:
            raise ValueError(
                f"model={name!r}: config lacks {', '.join(missing)}, needed for a {family} shape "
                f"(requires {', '.join(need)}). Fix: pass a Hugging Face config.json of a "
                f"Llama/Mistral/Qwen2, GPT-2 or BERT model, or a preset: {', '.join(PRESETS)}."
            )
        if cfg.get("num_local_experts") or cfg.get("num_experts"):
            raise ValueError(f"model={name!r}: mixture-of-experts configs are not supported; use a dense one.")
        return _BUILDERS[family](cfg, name)


def _detect_family(cfg: Mapping[str, Any]) -> str:
    model_type = str(cfg.get("model_type", ""))
    if model_type == "gpt2" or "n_embd" in cfg:
        return "gpt2"
    return "bert" if model_type in ("bert", "roberta") else "llama"


def _llama(cfg: Mapping[str, Any], name: str) -> ModelShape:
    d, i, n_layers, heads = (int(cfg[k]) for k in _REQUIRED["llama"][:4])
    vocab = int(cfg["vocab_size"])
    head_dim = int(cfg.get("head_dim") or d // heads)
    kv = int(cfg.get("num_key_value_heads") or heads) * head_dim
    qkv_bias = bool(cfg.get("attention_bias", str(cfg.get("model_type")) == "qwen2"))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    linears = (
        LinearSpec("q_proj", d, heads * head_dim, n_layers, qkv_bias),
        LinearSpec("k_proj", d, kv, n_layers, qkv_bias),
        LinearSpec("v_proj", d, kv, n_layers, qkv_bias),
        LinearSpec("o_proj", heads * head_dim, d, n_layers, bool(cfg.get("attention_bias", False))),
        LinearSpec("gate_proj", d, i, n_layers, mlp_bias),
        LinearSpec("up_proj", d, i, n_layers, mlp_bias),
        LinearSpec("down_proj", i, d, n_layers, mlp_bias),
    )
    others = [("embed_tokens", vocab * d, 1), ("layer_norms", d, 2 * n_layers), ("norm", d, 1)]
    if not cfg.get("tie_word_embeddings", False):
        others.append(("lm_head", vocab * d, 1))
    return ModelShape(name, "llama", d, n_layers, i, kv, True, vocab, linears, tuple(others))


def _gpt2(cfg: Mapping[str, Any], name: str) -> ModelShape:
    d, n_layers, vocab, positions = (int(cfg[k]) for k in _REQUIRED["gpt2"])
    i = int(cfg.get("n_inner") or 4 * d)
    rows = (("c_attn", d, 3 * d), ("attn.c_proj", d, d), ("c_fc", d, i), ("mlp.c_proj", i, d))
    linears = tuple(LinearSpec(*row, n_layers, True) for row in rows)
    others = (("wte", vocab * d, 1), ("wpe", positions * d, 1), ("layer_norms", d, 4 * n_layers + 2))
    return ModelShape(name, "gpt2", d, n_layers, i, d, False, vocab, linears, others)


def _bert(cfg: Mapping[str, Any], name: str) -> ModelShape:
    d, i, n_layers, _, vocab = (int(cfg[k]) for k in _REQUIRED["bert"][:5])
    positions, types = int(cfg["max_position_embeddings"]), int(cfg.get("type_vocab_size", 2))
    rows = [(name, d, d) for name in ("query", "key", "value", "attention.output.dense")]
    rows += [("intermediate.dense", d, i), ("output.dense", i, d)]
    linears = tuple(LinearSpec(*row, n_layers, True) for row in rows)
    others = tuple((n, size * d, 1) for n, size in (("word", vocab), ("position", positions), ("type", types)))
    others += (("layer_norms", d, 4 * n_layers + 2), ("pooler.weight", d * d, 1), ("pooler.bias", d, 1))
    return ModelShape(name, "bert", d, n_layers, i, d, False, 0, linears, others)


_REQUIRED: dict[str, tuple[str, ...]] = {
    "llama": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
    "gpt2": ("n_embd", "n_layer", "vocab_size", "n_positions"),
    "bert": (*_LLAMA_FIELDS[:4], "vocab_size", "max_position_embeddings"),
}
_Builder = Callable[[Mapping[str, Any], str], "ModelShape"]
_BUILDERS: dict[str, _Builder] = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def load_model_shape(name_or_path: str) -> ModelShape:
    """A preset name (see :data:`PRESETS`), a ``config.json`` path, or a directory holding one."""
    if name_or_path in PRESETS:
        return ModelShape.from_config(PRESETS[name_or_path], name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"model={name_or_path!r} is neither a preset nor a config.json (or a folder holding one). "
            f"Presets: {', '.join(PRESETS)}. Fix: pick a preset or pass a Hugging Face config.json path."
        )
    return ModelShape.from_config(json.loads(path.read_text()), name_or_path)


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int, int]]:
    """Per LoRA target name: ``(in_features, out_features, count)``."""
    return {s.name: (s.in_features, s.out_features, s.count) for s in shape.linears}


def resolve_targets(shape: ModelShape, targets: tuple[str, ...]) -> tuple[LinearSpec, ...]:
    """Linears matched by whole name or dotted suffix (``c_proj`` matches ``attn.c_proj``), or all-linear."""
    if targets == ("all-linear",):
        return shape.linears
    unknown = [t for t in targets if not any(_matches(s.name, t) for s in shape.linears)]
    if unknown:
        raise ValueError(
            f"targets={','.join(targets)!r}: {', '.join(unknown)} not a linear layer of {shape.name!r} "
            f"({shape.family}). Allowed: {', '.join(linear_shapes(shape))} or 'all-linear'."
        )
    return tuple(s for s in shape.linears if any(_matches(s.name, t) for t in targets))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


@dataclass(frozen=True)
class Assumptions:
    """Everything an estimate depends on besides the shape; validated on construction.

    Args:
        rank: LoRA rank r; an adapted ``in → out`` linear gains ``r·(in + out)`` trainable parameters.
        targets: Linear names to adapt, or ``("all-linear",)`` (every block linear, not the head).
        base_dtype: Storage of base weights (full / LoRA) and of the unquantized parts under QLoRA.
        adapter_dtype: Storage (and gradient dtype) of LoRA A and B.
        optimizer: AdamW state per trainable parameter: ``adamw-fp32`` 8 B (two fp32 moments),
            ``adamw-16bit`` 4 B, ``adamw-8bit`` 2 B + an fp32 absmax per 256 values per moment.
        master_weights: Keep an fp32 master copy of 16-bit trainable parameters (+4 B/param).
        quant: QLoRA base storage of block linears: ``nf4-dq`` 4.127 bits, ``nf4`` 4.5 bits, ``int8``
            8 bits + one fp32 scale per output row. Embeddings, norms, biases, head stay ``base_dtype``.
        batch_size: With ``seq_len``, adds an activation estimate (see :func:`activation_bytes`).
        seq_len: Tokens per sequence.
        activation_checkpointing: Keep only each block's input; recompute one block at a time.
    """

    rank: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    base_dtype: Dtype = "bf16"
    adapter_dtype: Dtype = "bf16"
    optimizer: Optimizer = "adamw-fp32"
    master_weights: bool = False
    quant: Quant = "nf4-dq"
    batch_size: int | None = None
    seq_len: int | None = None
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.rank <= 0:
            problems.append(f"rank={self.rank} must be a positive integer (e.g. 8, 16, 64)")
        if not self.targets:
            problems.append("targets is empty; name linears like 'q_proj,v_proj' or use 'all-linear'")
        for arg, allowed in _LITERAL_ARGS.items():
            if (value := getattr(self, arg)) not in get_args(allowed):
                problems.append(f"{arg}={value!r} is not one of {', '.join(get_args(allowed))}")
        if (self.batch_size is None) != (self.seq_len is None):
            problems.append("batch_size and seq_len go together: give both (activation estimate) or neither")
        for arg in ("batch_size", "seq_len"):
            if (v := getattr(self, arg)) is not None and v <= 0:
                problems.append(f"{arg}={v} must be a positive integer")
        if problems:
            raise ValueError("invalid estimate options: " + "; ".join(problems) + ".")


_LITERAL_ARGS = {"base_dtype": Dtype, "adapter_dtype": Dtype, "optimizer": Optimizer, "quant": Quant}


def quantized_bytes(in_features: int, out_features: int, quant: Quant) -> int:
    """Storage of one quantized ``out × in`` weight, block constants included (bitsandbytes layout)."""
    n = in_features * out_features
    if quant == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / NF4_BLOCK)
    constants = blocks + 4 * math.ceil(blocks / DQ_BLOCK) if quant == "nf4-dq" else 4 * blocks
    return math.ceil(n / 2) + constants


def optimizer_bytes(numel: int, optimizer: Optimizer, master_weights: bool, dtype: Dtype) -> int:
    """AdamW state for one trainable tensor of ``numel`` values (+ fp32 master copy if 16-bit)."""
    master = 4 * numel if master_weights and dtype != "fp32" else 0
    if optimizer == "adamw-8bit" and numel >= ADAM8_MIN_SIZE:
        return master + 2 * numel + 2 * 4 * math.ceil(numel / ADAM8_BLOCK)
    per_param = 8 if optimizer == "adamw-8bit" else OPTIMIZER_BYTES_PER_PARAM[optimizer]
    return master + per_param * numel


def activation_bytes(shape: ModelShape, batch_size: int, seq_len: int, checkpointing: bool) -> int:
    """Saved activations for backward, 16-bit, fused (flash/SDPA) attention, no dropout masks.

    Per block and token a Llama block keeps ``6·h + 2·kv_dim + 4·I`` values (norm inputs and outputs,
    q/k/v, attention output, gate, up, silu(gate), their product); a non-gated MLP keeps ``2·I``.
    Checkpointing keeps ``h`` per block plus one block recomputed. A language-model head adds
    ``b·s·V`` 16-bit logits and their fp32 upcast for the loss (6 bytes each).
    """
    tokens = batch_size * seq_len
    h = shape.hidden_size
    per_block = 6 * h + 2 * shape.kv_dim + (4 if shape.gated_mlp else 2) * shape.intermediate_size
    blocks = shape.num_layers * h + per_block if checkpointing else shape.num_layers * per_block
    return 2 * tokens * blocks + 6 * tokens * shape.lm_vocab


@dataclass(frozen=True)
class Estimate:
    """Bytes per component for one method; ``weights_bytes`` = base + adapter weights."""

    model: str
    method: Method
    total_params: int
    trainable_params: int
    base_weights_bytes: int
    adapter_bytes: int
    weights_bytes: int
    optimizer_bytes: int
    gradient_bytes: int
    activation_bytes: int
    total_bytes: int
    smallest_gpu: str | None
    assumptions: Assumptions = field(default_factory=Assumptions)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: integer byte and parameter counts plus the assumptions."""
        out = asdict(self)
        out["assumptions"]["targets"] = ",".join(self.assumptions.targets)
        return out


def estimate(shape: ModelShape, method: Method, assumptions: Assumptions | None = None) -> Estimate:
    """Weights, optimizer state, gradients (and activations when asked) for ``method`` on ``shape``."""
    a = assumptions or Assumptions()
    if method not in get_args(Method):
        raise ValueError(f"method={method!r} is not one of {', '.join(get_args(Method))}.")
    base_bytes = DTYPE_BYTES[a.base_dtype]
    dense = shape.total_params * base_bytes
    if method == "full":
        tensors = [(s.in_features * s.out_features, s.count) for s in shape.linears]
        tensors += [(s.out_features, s.count) for s in shape.linears if s.bias]
        tensors += [(numel, count) for _, numel, count in shape.others]
        return _finish(shape, method, a, dense, 0, tensors, a.base_dtype)
    adapted = resolve_targets(shape, a.targets)
    tensors = [(a.rank * n, s.count) for s in adapted for n in (s.in_features, s.out_features)]
    adapter = sum(n * c for n, c in tensors) * DTYPE_BYTES[a.adapter_dtype]
    if method == "qlora":
        weights = sum(s.in_features * s.out_features * s.count for s in shape.linears)
        quantized = sum(quantized_bytes(s.in_features, s.out_features, a.quant) * s.count for s in shape.linears)
        dense += quantized - weights * base_bytes
    return _finish(shape, method, a, dense, adapter, tensors, a.adapter_dtype)


def _finish(
    shape: ModelShape, method: Method, a: Assumptions, base: int, adapter: int,
    tensors: list[tuple[int, int]], dtype: Dtype,
) -> Estimate:  # fmt: skip
    trainable = sum(n * c for n, c in tensors)
    opt = sum(optimizer_bytes(n, a.optimizer, a.master_weights, dtype) * c for n, c in tensors)
    grads = trainable * DTYPE_BYTES[dtype]
    acts = 0
    if a.batch_size is not None and a.seq_len is not None:
        acts = activation_bytes(shape, a.batch_size, a.seq_len, a.activation_checkpointing)
    total = base + adapter + opt + grads + acts
    return Estimate(
        shape.name, method, shape.total_params, trainable, base, adapter, base + adapter,
        opt, grads, acts, total, smallest_gpu(total), a,
    )  # fmt: skip


def smallest_gpu(total_bytes: int) -> str | None:
    """The smallest common GPU (24/40/48/80 GiB) holding ``total_bytes`` (no CUDA context, fragmentation)."""
    for gib in GPU_GIB:
        if total_bytes <= gib * 2**30:
            return f"{gib} GB ({GPU_EXAMPLES[gib]})"
    return None


def format_bytes(n: int) -> str:
    """Decimal units as the article uses them: ``13.48 GB``, ``134.2 MB``."""
    return _scaled(n, (" TB", " GB", " MB", " kB", " B"))


def format_params(n: int) -> str:
    """``6.74B``, ``16.8M``."""
    return _scaled(n, ("T", "B", "M", "k", ""))


def _scaled(n: int, units: tuple[str, ...]) -> str:
    for power, unit in zip((12, 9, 6, 3), units, strict=False):
        if n >= 10**power:
            return f"{n / 10**power:.{2 if power >= 9 else 1}f}{unit}"
    return f"{n}{units[-1]}"


def format_table(estimates: list[Estimate]) -> str:
    """A components × methods text table (Markdown), GPU capacity in the last row."""
    head = [f"{e.method} r={e.assumptions.rank}" if e.method != "full" else "full" for e in estimates]
    rows: list[tuple[str, Callable[[Estimate], str]]] = [
        ("base weights", lambda e: format_bytes(e.base_weights_bytes)),
        ("adapter weights", lambda e: format_bytes(e.adapter_bytes) if e.adapter_bytes else "-"),
        ("trainable params", lambda e: f"{format_params(e.trainable_params)} ({_pct(e)})"),
        ("optimizer states", lambda e: format_bytes(e.optimizer_bytes)),
        ("gradients", lambda e: format_bytes(e.gradient_bytes)),
    ]
    if any(e.activation_bytes for e in estimates):
        rows.append(("activations", lambda e: format_bytes(e.activation_bytes)))
    rows += [
        ("total", lambda e: format_bytes(e.total_bytes)),
        ("smallest GPU", lambda e: (e.smallest_gpu or "> 80 GB").split(" (")[0]),
    ]
    lines = ["| component | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(e) for e in estimates) + " |" for label, cell in rows]
    return "\n".join(lines)


def _pct(e: Estimate) -> str:
    return f"{100 * e.trainable_params / e.total_params:.3g}%"


ARTICLE_ASSUMPTIONS: dict[Method, Assumptions] = {
    "full": Assumptions(optimizer="adamw-16bit"),  # 28 GB for 7B = 4 B/param
    "lora": Assumptions(optimizer="adamw-fp32"),  # ~130 MB for 16.8M = 8 B/param
    "qlora": Assumptions(optimizer="adamw-fp32", quant="nf4-dq"),
}
"""Options reproducing the article's 7B table; cell by cell in ``docs/memory.md``. The article rounds
6.74B parameters to 7B, so its GB figures are ours × 7/6.74 (≈ +4%)."""
