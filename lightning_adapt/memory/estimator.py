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

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from lightning_adapt.errors import ConfigError
from lightning_adapt.memory.shapes import (
    PRESETS,
    LinearSpec,
    ModelShape,
    linear_shapes,
    load_model_shape,
    resolve_saved,
    resolve_targets,
    saved_linears,
)

__all__ = [
    "ADAM8_QMAP_BYTES",
    "ARTICLE_ASSUMPTIONS",
    "DTYPE_BYTES",
    "PRESETS",
    "QUANT_TABLE_BYTES",
    "Assumptions",
    "Dtype",
    "Estimate",
    "LinearSpec",
    "Method",
    "ModelShape",
    "Optimizer",
    "Quant",
    "Strategy",
    "activation_bytes",
    "estimate",
    "format_bytes",
    "format_params",
    "format_table",
    "linear_shapes",
    "load_model_shape",
    "optimizer_bytes",
    "quantized_bytes",
    "resolve_saved",
    "resolve_targets",
    "saved_linears",
    "smallest_gpu",
]

Method = Literal["full", "lora", "qlora"]
Dtype = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal["adamw-fp32", "adamw-16bit", "adamw-8bit"]
Quant = Literal["nf4-dq", "nf4", "int8"]
Strategy = Literal["ddp", "fsdp"]

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZER_BYTES_PER_PARAM: dict[str, int] = {"adamw-fp32": 8, "adamw-16bit": 4, "adamw-8bit": 2}
ADAM8_BLOCK, ADAM8_MIN_SIZE = 256, 4096  # bitsandbytes blockwise 8-bit state; smaller tensors stay fp32
ADAM8_QMAP_BYTES = 2 * 256 * 4  # the two fp32 dynamic code tables, shared by every 8-bit tensor
NF4_BLOCK, DQ_BLOCK = 64, 256
NF4_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Per quantized layer: the 16-entry fp32 code table; double quantization adds its 256-entry fp32 table
#: and an fp32 offset. Counted as bitsandbytes holds (and serializes) them, once per layer.
QUANT_TABLE_BYTES: dict[str, int] = {"nf4-dq": 16 * 4 + 256 * 4 + 4, "nf4": 16 * 4, "int8": 0}
GPU_GIB = (8, 12, 16, 24, 40, 48, 80, 94, 141, 192)
GPU_EXAMPLES = {
    8: "RTX 3070, RTX 4060",
    12: "RTX 3060, RTX 4070",
    16: "T4, V100 16GB, RTX 4080",
    24: "RTX 4090, L4, A10G",
    40: "A100 40GB",
    48: "RTX A6000, L40S",
    80: "A100 80GB, H100",
    94: "H100 NVL",
    141: "H200",
    192: "B200, MI300X",
}


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
        quant: QLoRA base storage of the linears (block linears, BERT's pooler): ``nf4-dq`` 4.127 bits,
            ``nf4`` 4.5 bits, ``int8`` 8 bits + one fp32 scale per output row, plus :data:`QUANT_TABLE_BYTES`
            per layer. Embeddings, norms, the LM head and task heads stay ``base_dtype``.
        quant_blocksize: 4-bit weights per absmax constant (64 in QLoRA; 32 to 4096, powers of two).
        quant_compute_dtype: QLoRA: storage of the quantized linears' biases (bitsandbytes keeps them
            in the compute dtype).
        modules_to_save: LoRA/QLoRA: modules trained fully in ``base_dtype``, by name or dotted suffix: a
            task head (``classifier``, ``score``), ``embed_tokens``, ``norm``, an untied ``lm_head``, or any
            linear (see :func:`~lightning_adapt.memory.shapes.resolve_saved`). Under QLoRA a named linear
            stays unquantized (bitsandbytes cannot train 4-bit weights: skip it from quantization).
        state_bytes_per_tensor: Optimizer scalars per trainable tensor (``torch.optim.AdamW`` keeps a
            4-byte fp32 ``step`` tensor per parameter; bitsandbytes a Python int: 0).
        batch_size: With ``seq_len``, adds an activation estimate (see :func:`activation_bytes`).
        seq_len: Tokens per sequence.
        activation_checkpointing: Keep only each block's input; recompute one block at a time.
        world_size: Processes (GPUs) training together; the figures are per rank.
        strategy: ``ddp`` replicates everything (each rank holds the whole estimate); ``fsdp`` (FSDP2 full
            sharding) divides the float weights, gradients and optimizer state by ``world_size``, and the
            packed 4-bit codes too unless ``shard_quantized`` is false; their block constants and code tables,
            and int8 weights, stay whole on every rank. Activations are per rank either way (``batch_size``
            is the per-rank batch).
        shard_quantized: ``fsdp``: the 4-bit codes are sharded (``FullyShardCallback(quantized="shard")``,
            the default) or replicated (``quantized="replicate"``).
    """

    rank: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    base_dtype: Dtype = "bf16"
    adapter_dtype: Dtype = "bf16"
    optimizer: Optimizer = "adamw-fp32"
    master_weights: bool = False
    quant: Quant = "nf4-dq"
    quant_blocksize: int = NF4_BLOCK
    quant_compute_dtype: Dtype = "bf16"
    modules_to_save: tuple[str, ...] = ()
    state_bytes_per_tensor: int = 0
    batch_size: int | None = None
    seq_len: int | None = None
    activation_checkpointing: bool = False
    world_size: int = 1
    strategy: Strategy = "ddp"
    shard_quantized: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.rank <= 0:
            problems.append(f"rank={self.rank} must be a positive integer (e.g. 8, 16, 64)")
        if not self.targets:
            problems.append("targets is empty; name linears like 'q_proj,v_proj' or use 'all-linear'")
        for arg, allowed in _LITERAL_ARGS.items():
            if (value := getattr(self, arg)) not in get_args(allowed):
                problems.append(f"{arg}={value!r} is not one of {', '.join(get_args(allowed))}")
        if self.quant_blocksize not in NF4_BLOCKS:
            problems.append(f"quant_blocksize={self.quant_blocksize} is not one of {', '.join(map(str, NF4_BLOCKS))}")
        if self.state_bytes_per_tensor < 0:
            problems.append(f"state_bytes_per_tensor={self.state_bytes_per_tensor} must be >= 0")
        if self.world_size < 1:
            problems.append(f"world_size={self.world_size} must be >= 1 (the number of processes / GPUs)")
        if (self.batch_size is None) != (self.seq_len is None):
            problems.append("batch_size and seq_len go together: give both (activation estimate) or neither")
        for arg in ("batch_size", "seq_len"):
            if (v := getattr(self, arg)) is not None and v <= 0:
                problems.append(f"{arg}={v} must be a positive integer")
        if problems:
            raise ConfigError("invalid estimate options: " + "; ".join(problems) + ".")


_LITERAL_ARGS = {
    "base_dtype": Dtype,
    "adapter_dtype": Dtype,
    "optimizer": Optimizer,
    "quant": Quant,
    "strategy": Strategy,
}
_LITERAL_ARGS["quant_compute_dtype"] = Dtype


def quantized_bytes(in_features: int, out_features: int, quant: Quant, blocksize: int = NF4_BLOCK) -> int:
    """Storage of one quantized ``out × in`` weight as bitsandbytes holds it: packed codes, block
    constants and the per-layer code tables (:data:`QUANT_TABLE_BYTES`)."""
    n = in_features * out_features
    if quant == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / blocksize)
    constants = blocks + 4 * math.ceil(blocks / DQ_BLOCK) if quant == "nf4-dq" else 4 * blocks
    return math.ceil(n / 2) + constants + QUANT_TABLE_BYTES[quant]


def optimizer_bytes(numel: int, optimizer: Optimizer, master_weights: bool, dtype: Dtype, scalars: int = 0) -> int:
    """AdamW state for one trainable tensor of ``numel`` values (+ fp32 master copy if 16-bit, + ``scalars``
    bytes of per-tensor state such as a ``step`` tensor). 8-bit code tables: :data:`ADAM8_QMAP_BYTES`."""
    master = 4 * numel if master_weights and dtype != "fp32" else 0
    if optimizer == "adamw-8bit" and numel >= ADAM8_MIN_SIZE:
        return master + 2 * numel + 2 * 4 * math.ceil(numel / ADAM8_BLOCK) + scalars
    per_param = 8 if optimizer == "adamw-8bit" else OPTIMIZER_BYTES_PER_PARAM[optimizer]
    return master + per_param * numel + scalars


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
    """Bytes per component for one method; ``weights_bytes`` = base + adapter weights, of which
    ``quantized_weights_bytes`` are the quantized linears' codes, constants and tables (QLoRA)."""

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
    quantized_weights_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: integer byte and parameter counts plus the assumptions."""
        out = asdict(self)
        out["assumptions"]["targets"] = ",".join(self.assumptions.targets)
        out["assumptions"]["modules_to_save"] = ",".join(self.assumptions.modules_to_save)
        return out


def estimate(shape: ModelShape, method: Method, assumptions: Assumptions | None = None) -> Estimate:
    """Weights, optimizer state, gradients (and activations when asked) for ``method`` on ``shape``."""
    a = assumptions or Assumptions()
    if method not in get_args(Method):
        raise ConfigError(f"method={method!r} is not one of {', '.join(get_args(Method))}.")
    dense = shape.total_params * DTYPE_BYTES[a.base_dtype]
    if method == "full":
        linears = (*shape.linears, *shape.heads)
        tensors = [(s.in_features * s.out_features, s.count, a.base_dtype) for s in linears]
        tensors += [(s.out_features, s.count, a.base_dtype) for s in linears if s.bias]
        tensors += [(numel, count, a.base_dtype) for _, numel, count in shape.others]
        return _finish(shape, method, a, dense, 0, 0, tensors)
    adapted = resolve_targets(shape, a.targets)
    tensors = [(a.rank * n, s.count, a.adapter_dtype) for s in adapted for n in (s.in_features, s.out_features)]
    adapter = sum(n * c for n, c, _ in tensors) * DTYPE_BYTES[a.adapter_dtype]
    tensors += [(numel, count, a.base_dtype) for _, numel, count in resolve_saved(shape, a.modules_to_save)]
    if method == "lora":
        return _finish(shape, method, a, dense, 0, adapter, tensors)
    kept = saved_linears(shape, a.modules_to_save)  # trained fully, so not quantized
    quantized = tuple(s for s in shape.linears if s not in kept)
    base, packed, codes = _quantize(quantized, a, dense)
    return _finish(shape, method, a, base, packed, adapter, tensors, codes)


def _quantize(linears: tuple[LinearSpec, ...], a: Assumptions, dense: int) -> tuple[int, int, int]:
    """``dense`` base bytes with ``linears`` quantized (biases in the compute dtype), the quantized part, and
    the packed 4-bit codes in it (the part FSDP2 can shard; 0 for int8)."""
    base_bytes = DTYPE_BYTES[a.base_dtype]
    weights = sum(s.in_features * s.out_features * s.count for s in linears)
    quantized = sum(
        quantized_bytes(s.in_features, s.out_features, a.quant, a.quant_blocksize) * s.count for s in linears
    )
    biases = sum(s.out_features * s.count for s in linears if s.bias)
    base = dense + quantized - weights * base_bytes + biases * (DTYPE_BYTES[a.quant_compute_dtype] - base_bytes)
    codes = 0 if a.quant == "int8" else sum(math.ceil(s.in_features * s.out_features / 2) * s.count for s in linears)
    return base, quantized, codes


def _finish(
    shape: ModelShape, method: Method, a: Assumptions, base: int, quantized: int, adapter: int,
    tensors: list[tuple[int, int, Dtype]], codes: int = 0,
) -> Estimate:  # fmt: skip
    """Sum trainable ``(numel, count, dtype)`` tensors into optimizer state and gradients."""
    trainable = sum(n * c for n, c, _ in tensors)
    scalars = a.state_bytes_per_tensor
    opt = sum(optimizer_bytes(n, a.optimizer, a.master_weights, d, scalars) * c for n, c, d in tensors)
    whole = scalars * sum(c for _, c, _ in tensors)  # per-tensor scalars and code tables: not sharded
    if a.optimizer == "adamw-8bit" and any(n >= ADAM8_MIN_SIZE for n, _, _ in tensors):
        opt, whole = opt + ADAM8_QMAP_BYTES, whole + ADAM8_QMAP_BYTES
    grads = sum(n * c * DTYPE_BYTES[d] for n, c, d in tensors)
    acts = 0
    if a.batch_size is not None and a.seq_len is not None:
        acts = activation_bytes(shape, a.batch_size, a.seq_len, a.activation_checkpointing)
    if a.strategy == "fsdp" and a.world_size > 1:  # per rank: 1/N of every sharded tensor
        kept = quantized - (codes if a.shard_quantized else 0)  # block constants, tables, int8: whole
        base = _per_rank(base - kept, a.world_size) + kept
        quantized = kept + _per_rank(quantized - kept, a.world_size)
        adapter, grads = _per_rank(adapter, a.world_size), _per_rank(grads, a.world_size)
        opt = _per_rank(opt - whole, a.world_size) + whole
    total = base + adapter + opt + grads + acts
    return Estimate(
        shape.name, method, shape.total_params, trainable, base, adapter, base + adapter,
        opt, grads, acts, total, smallest_gpu(total), a, quantized,
    )  # fmt: skip


def _per_rank(n: int, world_size: int) -> int:
    return -(-n // world_size)  # FSDP pads each tensor to a multiple of the world size: round up


def smallest_gpu(total_bytes: int) -> str | None:
    """The smallest common GPU (``GPU_GIB``: 8 to 192 GiB) holding ``total_bytes`` (no CUDA context, fragmentation)."""
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
        ("smallest GPU", lambda e: (e.smallest_gpu or f"> {GPU_GIB[-1]} GB").split(" (")[0]),
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
