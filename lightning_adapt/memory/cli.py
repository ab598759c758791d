"""``lightning-adapt estimate``: will this fine-tuning fit on my GPU? (No Lightning import.)

Example:
    python -m lightning_adapt.memory.cli --model llama-2-7b --method qlora --json true
"""

from __future__ import annotations

import json as _json
import sys
from dataclasses import fields
from typing import Literal, get_args

from lightning_adapt.memory.estimator import (
    DTYPE_BYTES,
    GPU_GIB,
    Assumptions,
    Dtype,
    Estimate,
    Method,
    Optimizer,
    Quant,
    Strategy,
    estimate,
    format_table,
    load_model_shape,
)


def estimate_command(
    model: str = "llama-2-7b",
    method: Literal["full", "lora", "qlora", "all"] = "all",
    rank: int = 16,
    targets: str = "q_proj,k_proj,v_proj,o_proj",
    optimizer: Optimizer = "adamw-fp32",
    quant: Quant = "nf4-dq",
    quant_blocksize: int = 64,
    modules_to_save: str = "",
    base_dtype: Dtype = "bf16",
    adapter_dtype: Dtype = "bf16",
    master_weights: bool = False,
    batch_size: int | None = None,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    world_size: int = 1,
    strategy: Strategy = "ddp",
    json: bool = False,
) -> None:
    """Estimate training memory for full fine-tuning, LoRA and QLoRA from a model config.

    Prints a components × methods table (GB = 10^9 bytes), the assumptions behind each figure and the
    smallest common GPU (8/12/16/24/40/48/80/94/141/192 GB) that holds the total. See docs/memory.md.

    Args:
        model: Preset (llama-2-7b, llama-2-13b, llama-2-70b, llama-65b, mistral-7b, llama-3-8b), or a
            Hugging Face config.json path or a folder holding one (Llama/Mistral/Qwen2, GPT-2, BERT). Its
            "architectures" picks the head: *ForCausalLM, *ForSequenceClassification (num_labels or
            id2label outputs: BERT's classifier, a Llama/GPT-2 score), or *Model (none).
        method: Which method to estimate; "all" prints full, lora and qlora side by side.
        rank: LoRA rank r (> 0); an adapted in→out linear gains r·(in+out) trainable parameters.
        targets: Comma-separated linear names to adapt (e.g. q_proj,v_proj), or "all-linear".
        optimizer: AdamW state per trainable parameter: adamw-fp32 = 8 B (two fp32 moments),
            adamw-16bit = 4 B (two 16-bit moments), adamw-8bit = 2 B + fp32 absmax per 256 values.
        quant: QLoRA storage of the block linears: nf4-dq ≈ 4.127 bits, nf4 = 4.5 bits (block 64),
            int8 = 8 bits + an fp32 scale per row. Embeddings, norms and heads stay base_dtype.
        quant_blocksize: 4-bit weights per absmax constant (QLoRA: 64; one of 32, 64, ..., 4096). Larger
            blocks store fewer constants (nf4: 4 + 32/blocksize bits per weight).
        modules_to_save: Comma-separated modules LoRA/QLoRA train fully (gradients and optimizer state in
            base_dtype), by name or dotted suffix: a task head (classifier, score), embed_tokens, norm,
            lm_head, LayerNorm, or a linear (kept unquantized under QLoRA). Empty: adapters only.
        base_dtype: Storage dtype of the base weights (and of full fine-tuning's gradients).
        adapter_dtype: Storage and gradient dtype of the LoRA A and B matrices.
        master_weights: Add an fp32 master copy of 16-bit trainable parameters (+4 B/param).
        batch_size: Sequences per step; with seq_len adds an activation estimate.
        seq_len: Tokens per sequence; with batch_size adds an activation estimate.
        activation_checkpointing: Estimate activations with per-block checkpointing.
        world_size: Processes (GPUs) training together; figures are per rank.
        strategy: ddp (every rank holds everything) or fsdp (FSDP2: float weights, gradients and optimizer
            state divided by world_size, and the packed 4-bit codes; their block constants and int8
            weights replicated).
        json: Print one JSON object (integer byte counts and assumptions) instead of the table.
    """
    given = locals()  # the options named like Assumptions' fields, as given
    names = {f.name for f in fields(Assumptions)} & set(given)
    listed = {"targets": _names(targets), "modules_to_save": _names(modules_to_save)}
    assumptions = Assumptions(**({name: given[name] for name in names} | listed))
    if method != "all" and method not in get_args(Method):
        raise ValueError(f"method={method!r} is not one of {', '.join(get_args(Method))}, all.")
    shape = load_model_shape(model)
    methods: tuple[Method, ...] = get_args(Method) if method == "all" else (method,)
    estimates = [estimate(shape, m, assumptions) for m in methods]
    if json:
        payload = {e.method: e.to_json() for e in estimates} if method == "all" else estimates[0].to_json()
        print(_json.dumps(payload, indent=2))
        return
    print(_report(estimates, assumptions))


def _names(csv: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in csv.split(",") if name.strip())


def describe(a: Assumptions, method: Method) -> list[str]:
    """One line per assumption that changes ``method``'s figures, with its bytes per parameter."""
    opt = f"{a.optimizer}: {_OPTIMIZER_NOTE[a.optimizer]}"
    opt += " + fp32 master copy 4 B" if a.master_weights else ""
    base = f"block linears {a.quant} ({_quant_note(a.quant, a.quant_blocksize)}), rest {a.base_dtype}"
    if method != "qlora":
        base = f"base weights {a.base_dtype} ({DTYPE_BYTES[a.base_dtype]} B/param)"
    lines = [f"{method}: {base}"]
    if method != "full":
        lines.append(f"  LoRA r={a.rank} on {','.join(a.targets)}, adapters {a.adapter_dtype}")
        if a.modules_to_save:
            lines.append(f"  modules_to_save {','.join(a.modules_to_save)} trained fully in {a.base_dtype}")
    lines.append(f"  optimizer {opt}; gradients in the trainable params' dtype")
    return lines


_OPTIMIZER_NOTE = {
    "adamw-fp32": "two fp32 moments, 8 B/trainable param",
    "adamw-16bit": "two 16-bit moments, 4 B/trainable param",
    "adamw-8bit": "two 8-bit moments + fp32 absmax per 256, ~2.03 B/trainable param",
}


def _quant_note(quant: Quant, blocksize: int) -> str:
    """Bits per weight of ``quant`` (the per-layer code tables aside)."""
    if quant == "nf4-dq":
        return f"4 + 8/{blocksize} + 32/({blocksize}·256) ≈ {4 + 8 / blocksize + 32 / (blocksize * 256):.3f} bits"
    if quant == "nf4":
        return f"4 + 32/{blocksize} = {4 + 32 / blocksize:.4g} bits"
    return "8 bits + fp32 row scale"


def _report(estimates: list[Estimate], assumptions: Assumptions) -> str:
    e0 = estimates[0]
    lines = [f"Training memory for {e0.model} ({e0.total_params:,} parameters; GB = 10^9 bytes)", ""]
    if assumptions.world_size > 1:
        what = (
            "weights, gradients and optimizer state sharded (FSDP2; of 4-bit weights the packed codes, their "
            "block constants replicated)"
            if assumptions.strategy == "fsdp"
            else "everything replicated (DDP)"
        )
        lines[-1:] = [f"Per rank of {assumptions.world_size} ({assumptions.strategy}): {what}.", ""]
    lines += [format_table(estimates), "", "Assumptions:"]
    for e in estimates:
        lines += describe(assumptions, e.method)
    if not any(e.activation_bytes for e in estimates):
        lines.append("Activations not included: pass --batch_size and --seq_len to add them.")
    lines.append("GPU capacity is GiB as marketed; leave ~1 GB for the CUDA context and fragmentation.")
    lines.append(
        "Article's 7B table: its 28 GB Adam state is --optimizer adamw-16bit (4 B/param); its ~16 B/param "
        "text is adamw-fp32 with --master_weights true. It rounds 6.74B to 7B (docs/memory.md)."
    )
    for e in estimates:
        gpu = e.smallest_gpu or f"none up to {GPU_GIB[-1]} GB: shard across GPUs or change the method"
        enough = [f"{g} GB" for g in GPU_GIB if e.total_bytes <= g * 2**30]
        lines.append(f"Smallest GPU for {e.method}: {gpu}" + (f"; enough: {', '.join(enough)}" if enough else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run :func:`estimate_command` from the command line; option errors exit with a one-line message."""
    from jsonargparse import ArgumentError, auto_cli

    from lightning_adapt.checks import parser_error

    args = sys.argv[1:] if argv is None else argv
    try:
        auto_cli(estimate_command, args=_bare_flags_to_true(args), exit_on_error=False)
    except ArgumentError as err:  # the parser's report (unknown flag, wrong type): one line, not the usage text
        print(f"lightning-adapt: error: {parser_error(str(err), 'estimate')}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as err:  # the estimator's own checks (one message each); exit 2 like the other subcommands
        print(f"lightning-adapt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


_BOOL_FLAGS = ("--json", "--master_weights", "--activation_checkpointing")


def _bare_flags_to_true(argv: list[str]) -> list[str]:
    """Let ``--json`` mean ``--json true`` (jsonargparse booleans otherwise need a value)."""
    out = []
    for i, arg in enumerate(argv):
        following = argv[i + 1].lower() if i + 1 < len(argv) else ""
        bare = arg in _BOOL_FLAGS and following not in ("true", "false", "yes", "no", "1", "0")
        out.append(f"{arg}=true" if bare else arg)
    return out


if __name__ == "__main__":
    main()
