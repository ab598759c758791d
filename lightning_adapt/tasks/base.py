"""What the ready tasks share: the streaming build of the pretrained model, AdamW with warmup, a before/after
metric summary, the source model path."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_adapt.errors import ConfigError, LoadError, setting_names
from lightning_adapt.loading import (
    LoadReport,
    WeightSource,
    empty_weights,
    load_pretrained,
    quant_plan,
)
from lightning_adapt.models import resolve_model
from lightning_adapt.resources import current_rss_bytes

#: The tasks' errors about their weights name the recipe key: what resolves, configures or loads
#: ``model_name_or_path`` (setting ``model_name_or_path``, or the ``source`` of ``load_pretrained``) reads
#: ``model.model_name_or_path``.
AS_RECIPE = setting_names(model_name_or_path="model.model_name_or_path", source="model.model_name_or_path")
#: True while :meth:`TaskModule.planned_model` runs ``configure_model``: the model is built, no weight is read.
_PLANNING: ContextVar[bool] = ContextVar("lightning_adapt_planning", default=False)


class TaskModule(L.LightningModule):
    """Base of the ready tasks. ``self.model`` (a Hugging Face model) is ``None`` until ``configure_model`` builds it
    on the meta device and streams the checkpoint into it (:meth:`build_pretrained`): Lightning calls it in every
    ``fit``/``validate``/``test``/``predict``; call it yourself to use a task without a trainer.

    With ``num_sanity_val_steps: -1`` in the trainer config, the sanity check evaluates the untrained model
    on the whole validation set; the summary at the end of ``fit`` prints each validation metric before and
    after training, and where the logs and checkpoints are.
    """

    def __init__(
        self,
        model_name_or_path: str,
        learning_rate: float,
        weight_decay: float,
        warmup_steps: int,
        revision: str | None = None,
    ) -> None:
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
        with AS_RECIPE:
            self.source_path: Path = resolve_model(model_name_or_path, revision)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.model: Any = None
        self.load_report: LoadReport | None = None
        self.baseline: dict[str, float] = {}
        self.last_val: dict[str, float] = {}

    def build_pretrained(self, build: Callable[[torch.dtype], Any], init_missing: Sequence[str] = ()) -> bool:
        """Build ``self.model = build(dtype)`` without allocating weights, then stream the checkpoint into it.

        Floating weights load in ``torch.get_default_dtype()`` (Lightning makes it bf16 in ``configure_model``
        under ``precision="bf16-true"``: no fp32 copy on the way) on the trainer's root device (CPU without a
        trainer). With a ``QuantPlan`` attached (``QuantizeBaseCallback``), the layers it selects are quantized
        as they arrive. ``init_missing`` names new modules (a task head) to initialise. Once only: returns
        ``False`` when the model exists already.
        """
        if self.model is not None:
            return False
        baseline, dtype = current_rss_bytes(), torch.get_default_dtype()
        try:
            device = self.trainer.strategy.root_device
        except RuntimeError:  # not attached to a trainer
            device = torch.device("cpu")
        with empty_weights():
            try:
                self.model = build(dtype)
            except ValueError as err:  # transformers: no such head for this architecture
                raise LoadError(
                    f"model.model_name_or_path={self.model_name_or_path!r}: {type(self).__name__} cannot build its "
                    f"model from this config.json ({str(err).splitlines()[0]}). Fix: use a model of an architecture "
                    "transformers has that head for."
                ) from None
        if _PLANNING.get():  # planned_model: the structure on the meta device, nothing read
            return True
        source = WeightSource(self.source_path, prefix="model")
        plan = quant_plan(self)  # on error the loader resets self.model to None: a later call tries again
        with AS_RECIPE:
            report = load_pretrained(self, source, plan=plan, dtype=dtype, device=device, init_missing=init_missing, baseline_rss=baseline)  # fmt: skip
        self.load_report = report
        self.model.train()  # Lightning keeps submodule modes
        rank_zero_info(
            f"lightning-adapt: loaded {self.model_name_or_path} ({report.tensors_loaded} tensors, "
            f"{report.quantized_layers} layers quantized while loading) into {report.weight_bytes / 1e6:.1f} MB "
            f"of {dtype} weights in {report.seconds:.1f}s; load peak {_mb(report.load_peak_bytes)} "
            "above the resident memory before the build"
        )
        return True

    @contextmanager
    def planned_model(self) -> Iterator[Any]:
        """Within the block ``self.model`` is the model ``configure_model`` builds, on the meta device, with no weight
        read (the class's own ``configure_model``: the transforms registered on the instance do not run); then
        ``None`` again. What the fit check estimates before the base is loaded (``callbacks/fit_check.py``)."""
        if self.model is not None:
            yield self.model
            return
        token = _PLANNING.set(True)
        try:
            try:
                type(self).configure_model(self)
            finally:
                _PLANNING.reset(token)
            yield self.model
        finally:  # never left behind: the real configure_model would take it for a loaded model
            del self.model  # a plain attribute again, as __init__ left it
            self.model = None

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
        self._log_dir = self.trainer.log_dir  # a broadcast: every rank takes part, here, with the ranks in step

    @override
    def teardown(self, stage: str) -> None:
        """The run's summary, last on screen: after the callbacks' teardown (the progress bar's last frame). No
        collective here: a rank that leaves while another still talks can abort gloo at exit."""
        log_dir = self.__dict__.pop("_log_dir", None)
        if stage == "fit" and self.trainer.global_step > 0 and self.trainer.is_global_zero:
            rank_zero_info("\n".join(self._summary(log_dir)))

    def _summary(self, log_dir: str | None) -> list[str]:
        steps = self.trainer.global_step
        lines = ["", f"=== lightning-adapt: fine-tuned {self.model_name_or_path} ({_class_name(self.model)})"]
        callbacks = getattr(self.trainer, "callbacks", [])
        export = next((r for cb in callbacks if (r := getattr(cb, "result", None)) is not None), None)
        evaluation = getattr(export, "evaluation", None)
        after, source = self.last_val, f"after {steps} steps"
        if not after and evaluation is not None:  # the merge evaluation validated the trained model
            after, source = evaluation.metrics.get("trained", {}), f"after {steps} steps (merge evaluation)"
        if not after:
            lines.append("  no validation ran after training (end on an epoch boundary or set val_check_interval)")
        for key, value in after.items():
            before = self.baseline.get(key)
            start = f"{before:.4f} before training -> " if before is not None else ""
            lines.append(f"  {key}: {start}{value:.4f} {source}")
        best = str(getattr(self.trainer.checkpoint_callback, "best_model_path", "") or "")
        lines += [f"  checkpoint: {best}"] if best else []
        exported = getattr(export, "dirpath", None)
        lines += [f"  export: {exported} (adapter/, merged/)"] if exported else []
        lines += [f"  logs: {log_dir}"] if log_dir else []
        return lines


def _class_name(model: Any) -> str:
    """The model's own class name, not FSDP2's wrapper class (``FSDPLlamaForCausalLM``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c.__name__ for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
