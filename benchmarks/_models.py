"""The Llama-shaped models the benchmarks build: one config factory, so every benchmark's model reads the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def llama_config(
    hidden: int, intermediate: int, layers: int, heads: int, vocab: int, seq: int = 128, tied: bool = False
) -> Any:
    """A ``LlamaConfig`` with ``heads`` query and key/value heads (no GQA) and no KV cache."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=max(seq, 128),
        tie_word_embeddings=tied,
        use_cache=False,
    )


def write_random_llama(
    path: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
    max_shard_size: int = 10**12,
) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """A random-initialised bf16 ``LlamaForCausalLM`` checkpoint (untied, real shapes) written into ``path`` one
    tensor at a time (the writer streams, so a 1B model never exists in memory); returns ``{key: shape}``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_adapt.export.safetensors_io import TensorEntry, write_safetensors
    from lightning_adapt.loading import empty_weights

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    with empty_weights():
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def make(shape: tuple[int, ...]) -> Any:
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    entries = [TensorEntry(k, s, torch.bfloat16, lambda s=s: make(s)) for k, s in shapes.items()]
    write_safetensors(path, entries, torch.bfloat16, max_shard_size)
    return shapes
