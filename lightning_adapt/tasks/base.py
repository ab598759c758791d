"""What the ready tasks share: AdamW with warmup, a before/after metric summary, the source model path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_adapt.errors import ConfigError
from lightning_adapt.models import resolve_model


class TaskModule(L.LightningModule):
    """Base of the ready tasks. Subclasses build ``self.model`` (a Hugging Face model) in ``__init__``.

    With ``num_sanity_val_steps: -1`` in the trainer config, the sanity check evaluates the untrained model
    on the whole validation set; the summary at the end of ``fit`` prints each validation metric before and
    after training, and where the logs and checkpoints are.
    """

    def __init__(self, model_name_or_path: str, learning_rate: float, weight_decay: float, warmup_steps: int) -> None:
        super().__init__()
        problems = []
        if learning_rate <= 0:
            problems.append(
                f"model.learning_rate={learning_rate} must be > 0. Fix: use e.g. 5e-5 for full fine-tuning, 2e-4 for LoRA"
            )
        if weight_decay < 0:
            problems.append(f"model.weight_decay={weight_decay} must be >= 0. Fix: use 0 or a positive value")
        if warmup_steps < 0:
            problems.append(f"model.warmup_steps={warmup_steps} must be >= 0. Fix: use 0 or a positive value")
        if problems:
            raise ConfigError("; ".join(problems))
        self.model_name_or_path = model_name_or_path
        self.source_path: Path = resolve_model(model_name_or_path, "model.model_name_or_path")
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.baseline: dict[str, float] = {}
        self.last_val: dict[str, float] = {}

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        warmup = self.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self(batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def record_validation(self, metrics: dict[str, torch.Tensor]) -> None:
        """Log epoch-level validation metrics; remember the sanity-check pass as the untrained baseline."""
        values = {k: float(v) for k, v in metrics.items()}
        if self.trainer.sanity_checking:
            self.baseline = values
            return
        self.last_val = values
        self.log_dict(metrics, prog_bar=True, sync_dist=True)

    @override
    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        lines = [
            "",
            f"=== lightning-adapt: fine-tuned {self.model_name_or_path} ({type(self.model).__name__})",
        ]
        if not self.last_val:
            lines.append("  no validation ran after training (end on an epoch boundary or set val_check_interval)")
        for key, after in self.last_val.items():
            before = self.baseline.get(key)
            start = f"{before:.4f} before training -> " if before is not None else ""
            lines.append(f"  {key}: {start}{after:.4f} after {self.trainer.global_step} steps")
        ckpt = self.trainer.checkpoint_callback
        best = str(getattr(ckpt, "best_model_path", "") or "")
        if best:
            lines.append(f"  checkpoint: {best}")
        if self.trainer.log_dir:
            lines.append(f"  logs: {self.trainer.log_dir}")
        rank_zero_info("\n".join(lines))
