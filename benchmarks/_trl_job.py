"""The TRL side of ``bench_vs_trl.py``: one whole fine-tuning job through TRL's ``SFTTrainer`` and a PEFT
``LoraConfig``, in this process, from a spec written by the driver.

    python benchmarks/_trl_job.py SPEC.json     # what bench_vs_trl.py runs; not meant to be run by hand

What it does, in order (each step what a TRL user writes, with the recipe's settings):

1. loads the pre-tokenized rows the driver took from ``ChatDataModule`` (``input_ids`` and ``completion_mask``:
   1 on the tokens whose label the recipe keeps) with ``datasets.load_from_disk``;
2. builds ``SFTTrainer(model=<model dir>, peft_config=LoraConfig(...), ...)`` (TRL loads the model in fp32, or
   NF4 through ``BitsAndBytesConfig`` with ``--qlora``), batches in dataset order (``train_sampling_strategy=
   "sequential"``: the driver wrote the rows in the order of the recipe's batches), no gradient clipping, no
   gradient checkpointing, no bf16 autocast (TRL's ``SFTConfig`` defaults to both; the recipe runs neither);
3. gives it the recipe's optimizer and schedule (``AdamW`` — ``bitsandbytes`` ``AdamW8bit`` with ``--qlora`` —
   over the trainable parameters, ``LambdaLR(min(1, (step + 1) / (warmup + 1)))`` stepped per optimizer step);
4. refuses to train unless its first collated batch equals the recipe's first batch token for token (ids,
   attention mask, labels);
5. trains ``steps`` steps, saving one checkpoint at the last (adapter, optimizer, scheduler: as the recipe's one
   ``.ckpt``);
6. computes the validation loss of the held-out rows with TRL's own loss kernel (the fused LM head SFTTrainer uses
   for training): the sum of ``-log p`` over every response token of the set over their count — what
   ``CausalLMTask`` logs as ``val_loss`` (the log of torchmetrics' perplexity over the same tokens). TRL's own
   ``evaluate()`` reports the mean of per-batch means instead, a different average, so it is not used.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from typing_extensions import override

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_trl import batch_digest, memory_now, recipe_lambda, response_tokens, start_profile, stop_profile


class StepClock(TrainerCallback):
    """Record the end of every optimizer step (``perf_counter``, ``process_time``, wall clock): transformers calls
    ``on_step_end`` after the optimizer step, the scheduler step and ``zero_grad``."""

    def __init__(self, profile_step: int | None = None, profile_out: Path | None = None) -> None:
        self.step_begins: list[float] = []
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []
        self.step_walls: list[float] = []
        self.memory_start: dict[str, int] = {}
        self.profile_step, self.profile_out = profile_step, profile_out
        self.profiler: Any = None

    @override
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.step_ends and not self.memory_start:
            self.memory_start = memory_now()
        if state.global_step == self.profile_step:
            self.profiler = start_profile()
        self.step_begins.append(time.perf_counter())

    @override
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_ends.append(time.perf_counter())
        self.step_cpu.append(time.process_time())
        self.step_walls.append(time.time())
        if self.profiler is not None and self.profile_out is not None:
            stop_profile(self.profiler, self.profile_out)
            self.profiler = None


class DigestingCollator:
    """``collate`` unchanged, with a digest of every batch it returns appended to ``digests``."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collate = collate
        self.digests: list[str] = []

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(rows)
        self.digests.append(batch_digest(batch))
        return batch


def check_first_batch(batch: dict[str, Any], reference: dict[str, torch.Tensor]) -> None:
    """Raise unless ``batch`` holds the reference's ids, attention mask and labels exactly (the loss masks agree)."""
    problems = []
    for key, want in reference.items():
        got = batch.get(key)
        if got is None:
            problems.append(f"{key}: missing (TRL's batch has {sorted(batch)})")
        elif tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key}: shape {tuple(got.shape)} vs the recipe's {tuple(want.shape)}")
        elif not torch.equal(got.cpu().long(), want.long()):
            where = (got.cpu().long() != want.long()).nonzero()[0].tolist()
            problems.append(f"{key}: differs first at {where}: {got[tuple(where)]} vs {want[tuple(where)]}")
    if problems:
        raise SystemExit("TRL's first batch is not the recipe's: " + "; ".join(problems))


def trainer_settings(spec: dict[str, Any]) -> Any:
    from trl import SFTConfig  # type: ignore[attr-defined]

    steps = spec["steps"]
    return SFTConfig(
        output_dir=spec["output_dir"],
        max_steps=steps,
        per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],  # the optimizer below is the recipe's; recorded here for the logs
        weight_decay=spec["weight_decay"],
        max_grad_norm=0.0,  # the recipe does not clip (Lightning's gradient_clip_val: None)
        activation_checkpointing=False,  # SFTConfig's default is True (transformers 5: gradient_checkpointing)
        bf16=False,  # SFTConfig's default is True; the recipe trains in fp32 (precision 32-true)
        fp16=False,
        use_cpu=True,
        max_length=spec["max_length"],
        completion_only_loss=True,
        train_sampling_strategy="sequential",
        eval_strategy="no",
        save_strategy="steps",
        save_steps=steps,
        logging_steps=spec["log_every_n_steps"],
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
    )


def build_trainer(spec: dict[str, Any], clock: StepClock) -> Any:
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTTrainer  # type: ignore[attr-defined]

    data = Path(spec["data_dir"])
    quantization = None
    if spec["qlora"]:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=spec["double_quant"],
            bnb_4bit_compute_dtype=torch.float32,
        )
    lora = spec["lora"]
    return SFTTrainer(
        model=spec["model_dir"],
        args=trainer_settings(spec),
        train_dataset=datasets.load_from_disk(str(data / "train")),
        eval_dataset=datasets.load_from_disk(str(data / "val")),
        processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
        peft_config=LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=list(lora["target_modules"]),
            bias="none",
            task_type="CAUSAL_LM",
        ),
        quantization_config=quantization,
        callbacks=[clock],
    )


def recipe_optimizer(trainer: Any, spec: dict[str, Any]) -> None:
    """The recipe's optimizer and schedule, over the parameters PEFT left trainable (set before ``train``: the
    Trainer then creates neither)."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    if spec["qlora"]:
        import bitsandbytes as bnb

        optimizer: torch.optim.Optimizer = bnb.optim.AdamW8bit(  # type: ignore[attr-defined]
            params, lr=spec["lr"], weight_decay=spec["weight_decay"]
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"])
    trainer.optimizer = optimizer
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe_lambda(spec["warmup_steps"]))


@torch.no_grad()
def validation_loss(trainer: Any) -> tuple[float, int, list[str]]:
    """Per-token mean of ``-log p`` over every response token of the held-out rows, through TRL's fused LM head;
    the token count and each batch's digest."""
    model = trainer.model
    model.eval()
    total, count, digests = torch.zeros((), dtype=torch.float64), 0, []
    for batch in trainer.get_eval_dataloader():
        digests.append(batch_digest(batch))
        out = model(**batch, use_cache=False, fused_lm_head=True)
        scored, expected = int(out.label_mask.sum()), response_tokens(batch["labels"])
        if scored != expected:
            raise SystemExit(
                f"TRL's fused head scored {scored} tokens of a validation batch; its labels hold {expected}"
            )
        total += -out.log_probs.double()[out.label_mask].sum()
        count += scored
    return float(total / count), count, digests


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(spec["seed"])
    clock = StepClock(spec["profile_step"], Path(spec["out"]).with_name("profile.txt"))
    trainer = build_trainer(spec, clock)
    if trainer.args.gradient_checkpointing or getattr(trainer.model, "is_gradient_checkpointing", False):
        raise SystemExit("TRL turned gradient checkpointing on; the recipe runs without it")
    recipe_optimizer(trainer, spec)
    check_first_batch(next(iter(trainer.get_train_dataloader())), torch.load(spec["reference"]))
    collator = DigestingCollator(trainer.data_collator)
    trainer.data_collator = collator
    trainer.train()
    trainer.data_collator = collator.collate  # validation batches are digested by validation_loss
    val_loss, val_tokens, val_digests = validation_loss(trainer)
    record = {
        "step_begins": clock.step_begins,
        "step_ends": clock.step_ends,
        "step_cpu": clock.step_cpu,
        "step_walls": clock.step_walls,
        "train_digests": collator.digests,
        "val_digests": val_digests,
        "val_tokens": val_tokens,
        "val_loss": val_loss,
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "memory_start": clock.memory_start,
        "memory_end": memory_now(),
        "fit_end_wall": time.time(),
    }
    Path(spec["out"]).write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
