"""Sequence classification with a Hugging Face encoder and a new classification head."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from lightning_adapt.errors import ConfigError
from lightning_adapt.models import read_hf_config
from lightning_adapt.tasks.base import AS_RECIPE, TaskModule


class SequenceClassificationTask(TaskModule):
    """Fine-tune ``AutoModelForSequenceClassification`` on batches of ``input_ids``/``attention_mask``/``labels``.

    Logs ``train_loss`` per step and ``val_loss``, ``val_acc`` (micro accuracy) and ``val_f1`` (macro F1)
    per validation epoch. ``predict`` returns text, predicted label, class probabilities and gold label
    per example. ``self.model`` is ``None`` until
    ``configure_model`` (see :class:`TaskModule`).

    The class names come from the DataModule's ``label_names`` where it has them (read in ``configure_model``,
    which Lightning runs after ``DataModule.setup``): they give ``num_labels`` and the model config's
    ``id2label``/``label2id``, so the exported ``config.json`` names the classes.
    """

    def __init__(
        self,
        model_name_or_path: str = "minilm",
        num_labels: int | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        revision: str | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: a Hugging Face Hub id (``org/name``, e.g. ``sentence-transformers/all-MiniLM-L6-v2``),
                a local Hugging Face directory or a packaged model (``minilm``).
            num_labels: number of classes of the new head; ``None``: the number of the DataModule's
                ``label_names`` (given, it must equal it).
            learning_rate: AdamW learning rate (typical: 5e-5 full fine-tuning, 5e-4 LoRA).
            weight_decay: AdamW weight decay.
            warmup_steps: linear learning-rate warmup steps, then constant.
            revision: with a Hub id: the branch, tag or commit sha to load (``None``: the default branch).
        """
        if num_labels is not None and num_labels < 2:
            raise ConfigError(f"model.num_labels={num_labels} must be >= 2. Fix: set it to the number of classes.")
        super().__init__(model_name_or_path, learning_rate, weight_decay, warmup_steps, revision)
        self.save_hyperparameters()
        with AS_RECIPE:
            self.hf_config = read_hf_config(self.source_path, **({"num_labels": num_labels} if num_labels else {}))
        self.num_labels = num_labels
        self.label_names: list[str] | None = None
        if num_labels is not None:
            self._make_metrics(num_labels)

    def _make_metrics(self, num_labels: int) -> None:
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes=num_labels, average="macro")

    def _take_label_names(self) -> None:
        """``num_labels`` and the config's ``id2label``/``label2id`` from the DataModule's ``label_names``."""
        try:
            names = getattr(getattr(self.trainer, "datamodule", None), "label_names", None)
        except RuntimeError:  # not attached to a trainer
            names = None
        if names is None:
            if self.num_labels is None:
                raise ConfigError(
                    "model.num_labels is not set and the DataModule has no label_names to take it from. Fix: set "
                    "model.num_labels to the number of classes, or use a DataModule that names its labels."
                )
            return
        names = [str(n) for n in names]
        if self.num_labels is not None and self.num_labels != len(names):
            raise ConfigError(
                f"model.num_labels={self.num_labels} but the data has {len(names)} labels ({names}). Fix: set "
                f"model.num_labels to {len(names)}, or leave it out to take it from the data."
            )
        if self.num_labels is None:
            self._make_metrics(len(names))
        self.num_labels = self.hparams["num_labels"] = len(names)  # a checkpoint rebuilds the same head
        self.label_names = names
        self.hf_config.id2label = dict(enumerate(names))
        self.hf_config.label2id = {name: i for i, name in enumerate(names)}

    @override
    def configure_model(self) -> None:
        """Take the class names from the DataModule, then build the encoder and its new head on meta, stream the
        encoder's checkpoint in and initialise the head, once (:meth:`TaskModule.build_pretrained`)."""
        from transformers import AutoModelForSequenceClassification

        if self.model is None:
            self._take_label_names()

        def build(dtype: torch.dtype) -> Any:
            return AutoModelForSequenceClassification.from_config(copy.deepcopy(self.hf_config), dtype=dtype)

        self.build_pretrained(build, init_missing=["classifier"])

    @override
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**batch)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch)
        preds = out.logits.argmax(-1)
        self.val_acc.update(preds, batch["labels"])
        self.val_f1.update(preds, batch["labels"])
        self._val_loss.append(out.loss.detach().float() * len(preds))
        self._val_count += len(preds)

    @override
    def on_validation_epoch_start(self) -> None:
        self._val_loss: list[torch.Tensor] = []
        self._val_count = 0

    @override
    def on_validation_epoch_end(self) -> None:
        metrics = {
            "val_loss": torch.stack(self._val_loss).sum() / max(self._val_count, 1),
            "val_acc": self.val_acc.compute(),
            "val_f1": self.val_f1.compute(),
        }
        self.val_acc.reset()
        self.val_f1.reset()
        self.record_validation(metrics)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch)
        preds = out.logits.argmax(-1)
        self.log("test_acc", (preds == batch["labels"]).float().mean(), batch_size=len(preds))
        self.log("test_loss", out.loss, batch_size=len(preds))

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One ``{"text", "label", "probabilities", "gold"}`` dict per example (``text``/``gold`` when the
        batch has ``text``/``labels``; label ids, named by :class:`~lightning_adapt.PredictionWriter`)."""
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
        probabilities = torch.softmax(self.model(**inputs).logits.float(), dim=-1)
        rows: list[dict[str, Any]] = [{"label": int(p.argmax()), "probabilities": p.tolist()} for p in probabilities]
        texts, gold = batch.get("text"), batch.get("labels")
        for i, row in enumerate(rows):
            if texts is not None:
                rows[i] = {"text": texts[i], **row}
            if gold is not None:
                rows[i]["gold"] = int(gold[i])
        return rows
