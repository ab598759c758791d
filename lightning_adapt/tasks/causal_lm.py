"""Causal language-model instruction tuning with a Hugging Face decoder."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torchmetrics.text import Perplexity
from typing_extensions import override

from lightning_adapt.errors import ConfigError
from lightning_adapt.models import read_hf_config
from lightning_adapt.tasks.base import AS_RECIPE, TaskModule


class CausalLMTask(TaskModule):
    """Teacher-forced next-token training on ``input_ids``/``attention_mask``/``labels`` (-100 = ignored), or on
    packed rows of ``input_ids``/``position_ids``/``labels`` (``ChatDataModule(batching="pack")``).

    Logs ``train_loss`` per step and ``val_loss`` / ``val_ppl`` (torchmetrics perplexity over response
    tokens) per validation epoch. ``predict`` greedily generates a response for each prompt and returns a
    list of ``{"prompt", "response", "reference"}`` dicts.

    ``self.model`` is ``None`` until ``configure_model`` (see :class:`TaskModule`).
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m-instruct",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_new_tokens: int = 32,
        activation_checkpointing: bool = False,
        revision: str | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: a Hugging Face Hub id (``org/name``, e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``),
                a local Hugging Face directory or a packaged model (``smollm2-135m-instruct``).
            learning_rate: AdamW learning rate (typical: 2e-5 full fine-tuning, 2e-4 LoRA).
            weight_decay: AdamW weight decay.
            warmup_steps: linear learning-rate warmup steps, then constant.
            max_new_tokens: tokens generated per prompt in ``predict``.
            activation_checkpointing: recompute activations in the backward pass (non-reentrant, so it
                works with a frozen base) to save memory.
            revision: with a Hub id: the branch, tag or commit sha to load (``None``: the default branch).
        """
        if max_new_tokens < 1:
            raise ConfigError(f"model.max_new_tokens={max_new_tokens} must be >= 1. Fix: max_new_tokens=32.")
        super().__init__(model_name_or_path, learning_rate, weight_decay, warmup_steps, revision)
        self.save_hyperparameters()
        from transformers import AutoTokenizer

        with AS_RECIPE:
            self.hf_config = read_hf_config(self.source_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source_path, local_files_only=True, trust_remote_code=False)
        self.max_new_tokens = max_new_tokens
        self.activation_checkpointing = activation_checkpointing
        self.val_ppl = Perplexity(ignore_index=-100)

    @override
    def configure_model(self) -> None:
        """Build the model on meta and stream the checkpoint into it, once (:meth:`TaskModule.build_pretrained`)."""
        from transformers import AutoModelForCausalLM, GenerationConfig

        def build(dtype: torch.dtype) -> Any:  # from_config keeps from_pretrained's attention implementation
            return AutoModelForCausalLM.from_config(copy.deepcopy(self.hf_config), dtype=dtype)

        if not self.build_pretrained(build):
            return
        if (self.source_path / "generation_config.json").is_file():  # as from_pretrained does
            self.model.generation_config = GenerationConfig.from_pretrained(
                self.source_path, local_files_only=True, trust_remote_code=False
            )
        if self.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @override
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """The model's output on a padded batch (``attention_mask``) or a packed one (``position_ids`` restarting
        at 0 for each example, no ``attention_mask``: transformers then keeps attention inside each example)."""
        # No KV cache: training needs none, and transformers reads packed positions only without one (with
        # the config's use_cache=True the examples of a packed row would attend to each other).
        packed = "position_ids" in batch
        layout = {"position_ids": batch["position_ids"]} if packed else {"attention_mask": batch["attention_mask"]}
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False, **layout)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch)
        self.val_ppl.update(out.logits[:, :-1].float(), batch["labels"][:, 1:])

    @override
    def on_validation_epoch_start(self) -> None:
        # A bf16-true precision plugin casts metric states to bf16 with the module; perplexity summed in
        # bf16 is too coarse to show progress (it stayed at exactly 60.0 over 3 QLoRA steps).
        self.val_ppl.set_dtype(torch.float32)

    @override
    def on_validation_epoch_end(self) -> None:
        ppl = self.val_ppl.compute()
        self.val_ppl.reset()
        self.record_validation({"val_loss": torch.log(ppl), "val_ppl": ppl})

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self(batch).loss, batch_size=len(batch["input_ids"]))

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        prompt_len = batch["input_ids"].shape[1]
        generated = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )
        texts = self.tokenizer.batch_decode(generated[:, prompt_len:], skip_special_tokens=True)
        return [
            {"prompt": p, "response": t.strip(), "reference": r}
            for p, t, r in zip(batch["prompt"], texts, batch["reference"], strict=True)
        ]
