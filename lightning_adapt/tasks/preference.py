"""Preference tuning of a causal LM on (prompt, chosen, rejected) pairs: DPO, IPO and ORPO.

The losses are plain functions of per-example log-probabilities (``policy_chosen`` ... ``reference_rejected``:
shape ``(B,)``), so they can be checked by hand; :class:`PreferenceTask` computes those from the model and calls
them. With ``h = (πc - rc) - (πr - rr)`` (log-probabilities of the policy π and the reference r):

* ``sigmoid`` (DPO, Rafailov et al. 2023; ``label_smoothing`` ε: conservative DPO, as TRL)::

      loss = -log σ(β·h)·(1 - ε) - log σ(-β·h)·ε               log-probabilities summed over response tokens

* ``ipo`` (Azar et al. 2023, as TRL)::  ``loss = (h - 1/(2β))²``  with log-probabilities averaged per token;
* ``orpo`` (Hong et al. 2024, as TRL; no reference), with ``p = exp(mean per-token log-probability)``::

      loss = NLL(chosen) - β·log σ(log(pc/(1-pc)) - log(pr/(1-pr)))

Rewards (logged): ``β·(πc - rc)`` and ``β·(πr - rr)`` (ORPO: ``β·πc`` and ``β·πr``, per-token means); a pair is
counted right when the chosen reward is higher (TRL's ``rewards/accuracies``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_adapt.adapters.switch import adapters_disabled, base_is_original, has_adapters
from lightning_adapt.errors import ConfigError
from lightning_adapt.layers import adapter_param_ids
from lightning_adapt.loading import WeightSource, empty_weights, load_pretrained
from lightning_adapt.tasks.base import AS_RECIPE
from lightning_adapt.tasks.causal_lm import CausalLMTask
from lightning_adapt.tasks.reference_cache import ReferenceCache, pair_keys, reference_fingerprint

__all__ = ["LOSSES", "PreferenceLoss", "PreferenceOutput", "PreferenceTask", "preference_loss", "sequence_logps"]

IGNORE_INDEX = -100  # labels of prompt and padding tokens (lightning_adapt.data's)
PreferenceLoss = Literal["sigmoid", "ipo", "orpo"]
LOSSES: tuple[str, ...] = get_args(PreferenceLoss)


class PreferenceOutput(NamedTuple):
    """Per-example losses and rewards, shape ``(B,)``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of log p(token), number of tokens)`` over each row's labelled tokens (``labels != -100``), fp32.

    ``logits`` ``(N, T, V)`` predict the next token: position ``t`` scores ``labels[:, t + 1]``.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logps, 2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (picked * mask).sum(dim=1), mask.sum(dim=1)


def preference_loss(
    loss: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None,
    reference_rejected: torch.Tensor | None,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """The per-example loss and rewards of ``loss`` (see the module docstring). The caller passes log-probabilities
    summed (``sigmoid``) or averaged per token (``ipo``, ``orpo``); ``orpo`` takes no reference and its NLL term is
    the caller's (it is a mean over the batch's tokens)."""
    if loss == "orpo":
        log_odds = (policy_chosen - policy_rejected) - (
            torch.log1p(-torch.exp(policy_chosen)) - torch.log1p(-torch.exp(policy_rejected))
        )
        return PreferenceOutput(-beta * F.logsigmoid(log_odds), beta * policy_chosen, beta * policy_rejected)
    if reference_chosen is None or reference_rejected is None:
        raise ValueError(f"loss={loss!r} needs the reference log-probabilities")
    chosen, rejected = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    h = chosen - rejected
    if loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    return PreferenceOutput(losses, beta * chosen, beta * rejected)


def _check(loss: str, beta: float, label_smoothing: float) -> None:
    problems = []
    if loss not in LOSSES:
        problems.append(
            f"model.loss={loss!r} is not a preference loss; allowed: {list(LOSSES)}. Fix: 'sigmoid' (DPO), 'ipo', "
            "or 'orpo' (no reference model)"
        )
    if not beta > 0:
        problems.append(f"model.beta={beta} must be > 0. Fix: 0.1 (DPO's usual value; ORPO's paper uses 0.1 too)")
    if not 0 <= label_smoothing < 0.5:
        problems.append(f"model.label_smoothing={label_smoothing} must satisfy 0 <= it < 0.5. Fix: 0.0 (plain DPO)")
    elif label_smoothing and loss != "sigmoid":
        problems.append(
            f"model.label_smoothing={label_smoothing} applies to loss='sigmoid' only, not {loss!r}. Fix: 0.0"
        )
    if problems:
        raise ConfigError("; ".join(problems))


class PreferenceTask(CausalLMTask):
    """DPO / IPO / ORPO on batches of ``PreferenceDataModule``: ``input_ids``, ``attention_mask``, ``labels`` of
    ``2B`` rows, the ``B`` chosen responses first, then the ``B`` rejected ones (prompt and padding at -100).

    The reference (``sigmoid``, ``ipo``) is the model with its adapters off (:func:`adapters_disabled`) when LoRA
    or QLoRA adapters are the only trained parameters: one copy of the base serves both. Otherwise (full
    fine-tuning, ``modules_to_save``, an initialisation that changes the base: PiSSA, OLoRA, LoftQ) a frozen copy is loaded from ``model_name_or_path`` on first use, in the
    policy's dtype and device, and kept outside the module's state dict (:attr:`reference_model`; the memory
    report counts it). Starting from an adapter (``lora.adapter_path``), the reference is the base without it,
    as TRL's default with a PEFT model.

    Logs per step ``train_loss``, ``train_reward_margin``, ``train_reward_acc``, ``train_chosen_logps`` and
    ``train_rejected_logps``; per validation epoch the same as ``val_*`` and ``val_acc``: the share of held-out pairs
    whose chosen response the policy gives the higher mean per-token log-probability (no reference involved, so it
    is meaningful before training). ``predict`` generates a response to each prompt, as :class:`CausalLMTask`.
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m-instruct",
        loss: PreferenceLoss = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_new_tokens: int = 32,
        activation_checkpointing: bool = False,
        reference_cache: str | None = None,
        revision: str | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: a Hugging Face Hub id (``org/name``), a local Hugging Face directory or a packaged
                model (``smollm2-135m-instruct``).
            loss: ``sigmoid`` (DPO), ``ipo`` or ``orpo`` (odds ratio plus the chosen responses' NLL; no reference).
            beta: DPO/IPO: the strength of the tie to the reference (higher: closer); ORPO: the odds-ratio weight.
            label_smoothing: ``sigmoid`` only: the assumed share of wrong labels (conservative DPO); 0 <= it < 0.5.
            learning_rate: AdamW learning rate (typical: 5e-7 to 5e-6 full fine-tuning, 5e-5 to 5e-4 LoRA).
            weight_decay: AdamW weight decay.
            warmup_steps: linear learning-rate warmup steps, then constant.
            max_new_tokens: tokens generated per prompt in ``predict``.
            activation_checkpointing: recompute activations in the backward pass to save memory.
            reference_cache: a directory where each pair's reference log-probabilities are kept once computed
                (:mod:`lightning_adapt.tasks.reference_cache`): later epochs, a resumed run and a rerun skip its
                reference forward; ``None``: computed every step.
            revision: with a Hub id: the branch, tag or commit sha to load (``None``: the default branch).
        """
        _check(loss, beta, label_smoothing)
        super().__init__(
            model_name_or_path,
            learning_rate,
            weight_decay,
            warmup_steps,
            max_new_tokens,
            activation_checkpointing,
            revision,
        )
        self.save_hyperparameters()
        self.loss, self.beta, self.label_smoothing = loss, beta, label_smoothing
        self._val: list[dict[str, torch.Tensor]] = []
        self.reference_cache = reference_cache
        self._cache: ReferenceCache | None = None

    @property
    def reference_model(self) -> nn.Module | None:
        """The frozen reference copy, once loaded (never for adapters-only training or ORPO); not a submodule."""
        reference: nn.Module | None = self.__dict__.get("_reference")
        return reference

    @override
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """The model's output (logits) on a padded batch; no KV cache, no loss."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    def adapters_are_the_only_trained_weights(self) -> bool:
        """Whether the model with its adapters off is the untrained model (then it is the reference)."""
        if not has_adapters(self.model) or not base_is_original(self.model):
            return False
        adapters = adapter_param_ids(self.model)
        return all(id(p) in adapters for p in self.model.parameters() if p.requires_grad)

    @torch.no_grad()
    def reference_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's logits on ``batch``: the model with its adapters off, or the frozen copy."""
        if self.adapters_are_the_only_trained_weights():
            with adapters_disabled(self.model):
                logits: torch.Tensor = self(batch).logits
            return logits
        reference = self.reference_model or self._load_reference()
        out = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits  # type: ignore[no-any-return]

    def reference_totals(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's summed log-probabilities of the ``2B`` rows, from the cache when it holds every pair."""
        cache = self._reference_cache()
        keys = pair_keys(batch) if cache is not None else []
        cached = cache.lookup(keys, batch["labels"].device) if cache is not None else None
        if cached is not None:
            return cached
        total, _ = sequence_logps(self.reference_logits(batch), batch["labels"])
        if cache is not None:
            cache.store(keys, total)
        return total

    def _reference_cache(self) -> ReferenceCache | None:
        if self.reference_cache is None or self._cache is not None:
            return self._cache
        how = "adapters-off" if self.adapters_are_the_only_trained_weights() else "copy"
        fingerprint = reference_fingerprint(self.source_path, self.model, how)
        directory = Path(self.reference_cache)
        world = getattr(self._trainer, "world_size", 1) if self._trainer is not None else 1
        self._cache = ReferenceCache(directory / f"rank{self.global_rank}" if world > 1 else directory, fingerprint)
        return self._cache

    def save_reference_cache(self) -> None:
        """Write the cached reference log-probabilities (at checkpoints, epoch ends and the end of fit)."""
        if self._cache is not None:
            self._cache.save()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.save_reference_cache()

    @override
    def on_train_epoch_end(self) -> None:
        self.save_reference_cache()

    @override
    def on_fit_end(self) -> None:
        super().on_fit_end()
        self.save_reference_cache()

    def _load_reference(self) -> nn.Module:
        """The pretrained model again, from its files (not a copy of the policy: after a resume that is trained)."""
        from transformers import AutoModelForCausalLM

        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        holder = nn.Module()
        with empty_weights():
            reference: nn.Module = AutoModelForCausalLM.from_config(copy.deepcopy(self.hf_config), dtype=dtype)
        holder.model = reference
        source = WeightSource(self.source_path, prefix="model")
        with AS_RECIPE:
            load_pretrained(holder, source, dtype=dtype, device=self.device)
        reference = holder.model.requires_grad_(False).eval()
        self.__dict__["_reference"] = reference
        return reference

    def step_outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss (a scalar) and per-example rewards and log-probabilities of one batch."""
        labels, half = batch["labels"], batch["labels"].shape[0] // 2
        total, count = sequence_logps(self(batch).logits, labels)
        mean = total / count.clamp(min=1)
        policy = mean if self.loss in ("ipo", "orpo") else total
        reference: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if self.loss != "orpo":
            ref_total = self.reference_totals(batch)
            ref = ref_total / count.clamp(min=1) if self.loss == "ipo" else ref_total
            reference = ref[:half], ref[half:]
        out = preference_loss(self.loss, policy[:half], policy[half:], *reference, self.beta, self.label_smoothing)
        loss = out.losses.mean()
        if self.loss == "orpo":  # + the chosen responses' NLL, per token over the batch
            loss = loss - total[:half].sum() / count[:half].sum().clamp(min=1)
        return {
            "loss": loss,
            "margin": (out.chosen_rewards - out.rejected_rewards).detach(),
            "reward_acc": (out.chosen_rewards > out.rejected_rewards).float(),
            "chosen_logps": total[:half].detach(),
            "rejected_logps": total[half:].detach(),
            "acc": (mean[:half] > mean[half:]).float(),
        }

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.step_outputs(batch)
        size = len(out["margin"])
        self.log("train_loss", out["loss"], prog_bar=True, batch_size=size)
        for key in ("reward_margin", "reward_acc", "chosen_logps", "rejected_logps"):
            self.log(f"train_{key}", out["margin" if key == "reward_margin" else key].mean(), batch_size=size)
        return out["loss"]

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.step_outputs(batch)
        out["loss"] = out["loss"].detach().expand(len(out["margin"]))  # weighted by the batch's pairs
        self._val.append(out)

    @override
    def on_validation_epoch_start(self) -> None:
        self._val = []

    @override
    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        pooled = {key: torch.cat([o[key] for o in self._val]).float().mean() for key in self._val[0]}
        self._val = []
        self.save_reference_cache()
        names = {"loss": "val_loss", "acc": "val_acc", "reward_acc": "val_reward_acc", "margin": "val_reward_margin"}
        metrics = {names.get(key, f"val_{key}"): value for key, value in pooled.items()}
        self.record_validation(metrics)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.step_outputs(batch)
        self.log("test_loss", out["loss"], batch_size=len(out["margin"]))
        self.log("test_acc", out["acc"].mean(), batch_size=len(out["margin"]))
