"""Hugging Face-shaped fixtures shared by the export and crash-safety tests: a task-like holder, a Llama-shaped
checkpoint written tensor by tensor, and a directory's safetensors read back."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lightning_adapt.export.safetensors_io import TensorEntry, parse_size, write_safetensors


class Holder(nn.Module):
    """A module holding a Hugging Face model under ``model`` (checkpoint keys ``model.<hf key>``), as the tasks do."""

    def __init__(self, model: nn.Module, source_path: Path) -> None:
        super().__init__()
        self.model = model
        self.source_path = source_path


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors files, by key."""
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def llama_dir(path: Path, hidden: int, layers: int, vocab: int) -> int:
    """A Llama-shaped fp32 checkpoint written tensor by tensor; returns its size in bytes."""
    from transformers import LlamaConfig

    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}.weight", (hidden, hidden)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        shapes += [(p + f"mlp.{n}.weight", (2 * hidden, hidden)) for n in ("gate_proj", "up_proj")]
        shapes += [(p + "mlp.down_proj.weight", (hidden, 2 * hidden)), (p + "input_layernorm.weight", (hidden,))]
        shapes += [(p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    entries = [TensorEntry(k, s, torch.float32, lambda s=s: torch.randn(s, generator=g)) for k, s in shapes]
    write_safetensors(path, entries, None, parse_size("5GB"))
    LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=vocab, tie_word_embeddings=False).save_pretrained(path)  # fmt: skip
    return sum(4 * torch.Size(s).numel() for _, s in shapes)
