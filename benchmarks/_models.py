"""The Llama-shaped models the benchmarks build: one config factory, so every benchmark's model reads the same."""

from __future__ import annotations

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
