"""One LoRA or QLoRA fit of the toy module that can SIGKILL itself mid-step, for tests/reliability/test_exact_resume.py.

    python tests/helpers/exact_resume_run.py --method lora [qlora] --root DIR [--kill-at STEP | --kill-in-save STEP] [--resume]

Dropout 0.1 on the adapters, a shuffled ResumableDataLoader (5 batches an epoch), PagedAdamW8bit (8-bit state
for the adapters; non-paged on CPU) with a StepLR stepped every step, a ModelCheckpoint every 3 steps
(mid-epoch included) with ``last.ckpt``. ``--kill-at s`` kills the process with SIGKILL in the middle of step
``s`` (after its forward, before its backward): no clean exit, no final save. ``--kill-in-save s`` kills it
while the checkpoint of step ``s`` is being written, half of its bytes on disk. ``--resume`` starts from
``ckpt_path="last"``. Each method runs in ``DIR/<method>``, one after the other. Every finished step appends
``<step> <loss as float.hex>`` to ``losses.txt`` there; a run that reaches the end writes ``final.pt``
(trainable weights, optimizer and scheduler state).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package when run as a script
from helpers.toy import ToyModule
from lightning_adapt import LoRAInjectionCallback, PagedOptimizerPlugin, QuantizeBaseCallback
from lightning_adapt.data import ResumableDataLoader

MAX_STEPS, EVERY = 14, 3


class ScheduledToy(ToyModule):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Record(L.Callback):
    def __init__(self, path: Path) -> None:
        self.file = path.open("a")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.file.write(f"{trainer.global_step} {float(outputs['loss']).hex()}\n")
        self.file.flush()  # in the kernel before any later SIGKILL


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_backward(self, trainer: L.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillInSave(L.Callback):
    """From step ``step`` on, the next ``torch.save`` writes half of its bytes, then the process is SIGKILLed."""

    def __init__(self, step: int) -> None:
        self.step = step
        real = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if not self.armed:
                real(obj, f, *args, **kwargs)
                return
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        self.armed = False
        torch.save = save

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # runs before ModelCheckpoint's
        self.armed = trainer.global_step == self.step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["lora", "qlora"], nargs="+", required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for method in args.method:
        run(method, args.root / method, args.kill_at, args.resume, args.kill_in_save)


def run(method: str, root: Path, kill_at: int | None, resume: bool, kill_in_save: int | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 64, generator=g), torch.randint(0, 4, (40,), generator=g))
    callbacks: list[L.Callback] = [] if method == "lora" else [QuantizeBaseCallback(compute_dtype="fp32")]
    callbacks += [
        LoRAInjectionCallback(r=4, alpha=8, dropout=0.1, modules_to_save=["classifier"]),
        PagedOptimizerPlugin("PagedAdamW8bit", min_8bit_size=256),
        Record(root / "losses.txt"),
        ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=EVERY, save_last=True),
    ]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    if kill_in_save is not None:
        callbacks.append(KillInSave(kill_in_save))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=MAX_STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,
    )
    module = ScheduledToy(lr=0.01)
    loader = ResumableDataLoader(data, batch_size=8, shuffle=True, seed=3)
    trainer.fit(module, loader, ckpt_path="last" if resume else None)
    final = {
        "trainable": {n: p.detach() for n, p in module.named_parameters() if p.requires_grad},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
    }
    torch.save(final, root / "final.pt")


if __name__ == "__main__":
    main()
