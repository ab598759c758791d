"""The README's first example, copied as is (with and without its QLoRA line) onto a module that builds its
network in ``__init__``: it fits and exports a merged model equal to the full-precision base plus the trained
adapter; an export setting that cannot work fails before the first step."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adapt.adapters.lora import lora_modules
from lightning_adapt.errors import ExportError
from lightning_adapt.quantize import QuantConfig, quantize_model

README = Path(__file__).resolve().parents[2] / "README.md"
pytest.importorskip("bitsandbytes")


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.o_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / 4, dim=-1)
        return x + self.o_proj(attention @ self.v_proj(x))


class MyModule(L.LightningModule):
    """What most Lightning projects look like: the network is built (here: "pretrained") in ``__init__``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(Block(64), Block(64))
        self.head = nn.Linear(64, 3)
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class MyData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader[Any]:
        g = torch.Generator().manual_seed(1)
        return DataLoader(
            TensorDataset(torch.randn(16, 8, 64, generator=g), torch.randint(0, 3, (16,), generator=g)), 8
        )


def _run_readme_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qlora: bool) -> dict[str, Any]:
    """Run the README's block as written, in ``tmp_path``, shortened to 3 steps on the CPU; returns its namespace."""
    block = re.search(r"<!-- first-example:.*?-->\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "the README keeps its first example between its markers"
    code = block.group(1)
    assert 'QuantizeBaseCallback(mode="nf4")' in code
    if not qlora:
        code = "\n".join(line for line in code.splitlines() if "drop this line for LoRA" not in line)
    monkeypatch.chdir(tmp_path)
    shorter = {"max_steps": 3, "accelerator": "cpu", "logger": False, "enable_progress_bar": False}
    namespace: dict[str, Any] = {"__name__": "readme", "MyModule": MyModule, "MyData": MyData}
    real_trainer = L.Trainer
    monkeypatch.setattr(L, "Trainer", lambda **kwargs: real_trainer(**kwargs, **shorter))
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("qlora", [True, False], ids=["qlora", "lora"])
def test_the_first_example_fits_and_exports_the_trained_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qlora: bool
) -> None:
    original = MyModule().state_dict()  # the full-precision base the user's __init__ builds
    namespace = _run_readme_block(tmp_path, monkeypatch, qlora)
    trainer: L.Trainer = namespace["trainer"]
    module = trainer.lightning_module
    assert module.steps == 3
    adapted = dict(lora_modules(module))
    assert sorted(adapted) == [f"blocks.{i}.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    merged = load_file(str(tmp_path / "out/export/merged/model.safetensors"))
    for name, layer in adapted.items():
        assert layer.lora_B.weight.abs().sum() > 0, "the adapter trained"
        expected = original[name + ".weight"] + layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight).detach()
        torch.testing.assert_close(merged[name + ".weight"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged["blocks.0.k_proj.weight"], original["blocks.0.k_proj.weight"], rtol=0, atol=0)
    spill = tmp_path / "original_weights.safetensors"  # the run's directory (no logger: the root dir)
    assert spill.is_file() == qlora
    if qlora:  # every quantized layer's original, and only those
        assert sorted(load_file(str(spill))) == sorted(
            f"blocks.{i}.{p}.weight" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        )


def _qlora_trainer(tmp_path: Path) -> L.Trainer:
    from lightning_adapt import LoRAInjectionCallback, MergeOnSaveCallback, QuantizeBaseCallback

    callbacks = [
        QuantizeBaseCallback(mode="nf4", compute_dtype="float32"),
        LoRAInjectionCallback(r=4, target_modules=["q_proj", "v_proj"]),
        MergeOnSaveCallback(dirpath=str(tmp_path / "export")),
    ]
    options: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False}
    return L.Trainer(max_steps=3, callbacks=callbacks, default_root_dir=tmp_path, **options)


class PreQuantized(MyModule):
    """A module whose layers its own code quantized: no full-precision weights remain anywhere."""

    def __init__(self) -> None:
        super().__init__()
        quantize_model(self.blocks, QuantConfig(mode="nf4", compute_dtype=torch.float32), include_default_skips=False)


def test_an_export_that_cannot_merge_into_the_originals_fails_before_the_first_step(tmp_path: Path) -> None:
    trainer = _qlora_trainer(tmp_path)
    module = PreQuantized()
    with pytest.raises(ExportError, match=r"merge_base='original'.*merge_base='dequantized'"):
        trainer.fit(module, datamodule=MyData())
    assert module.steps == 0
    assert not (tmp_path / "export").exists()


def test_no_room_for_the_originals_fails_before_the_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    trainer = _qlora_trainer(tmp_path)
    module = MyModule()
    with pytest.raises(ExportError, match=r"original_weights=.*needs about .*merge_base='dequantized'"):
        trainer.fit(module, datamodule=MyData())
    assert module.steps == 0 and not (tmp_path / "original_weights.safetensors").exists()
