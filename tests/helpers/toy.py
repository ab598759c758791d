"""A tiny LightningModule with attention-style layer names, built in __init__ or in configure_model."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.o_proj(torch.tanh(self.q_proj(h)) * self.v_proj(h) + self.k_proj(h))


class Net(nn.Module):
    def __init__(self, width: int = 64, depth: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.classifier = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)


class ToyModule(L.LightningModule):
    """Classification of random features; ``build_in="configure_model"`` defers building the network."""

    def __init__(self, build_in: str = "init", width: int = 64, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.build_in, self.width, self.lr, self.seed = build_in, width, lr, seed
        self.net: Net | None = self._build() if build_in == "init" else None

    def _build(self) -> Net:
        torch.manual_seed(self.seed)
        return Net(self.width)

    def configure_model(self) -> None:
        if self.net is None:
            self.net = self._build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr)


def loader(n: int = 64, width: int = 64, batch_size: int = 16) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, width, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(tmp_path: Any = None, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer LlamaForCausalLM (hidden 32, GQA, vocab 100) built from its config, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    return LlamaForCausalLM(LlamaConfig(**{**fields, **overrides}))


def tiny_bert() -> nn.Module:
    """A 2-layer BertForSequenceClassification (hidden 32, 3 labels) built from its config, seeded."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def tiny_gpt2() -> nn.Module:
    """A 2-layer GPT2LMHeadModel (Conv1D projections, hidden 32, vocab 100) built from its config, seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
"""Token ids for the tiny models' forward passes."""


def adapt_randomly(model: nn.Module, targets: str | list[str], **kwargs: Any) -> nn.Module:
    """Wrap ``targets`` in LoRA (r=4, alpha=8) with a non-zero B, so adapters change the output."""
    from lightning_adapt.adapters.lora import LoRALinear
    from lightning_adapt.adapters.targeting import find_targets, replace_module

    torch.manual_seed(3)
    for name in find_targets(model, targets):
        layer = LoRALinear(model.get_submodule(name), r=4, alpha=8.0, **kwargs)
        nn.init.normal_(layer.lora_B.weight, std=0.3)
        replace_module(model, name, layer)
    return model
