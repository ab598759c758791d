"""The README's "load big models straight into 4-bit" module, run as written: QLoRA fit, resume, validate,
predict on a user module that opted into the streaming load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adapt import LoRAInjectionCallback, QuantizeBaseCallback
from lightning_adapt.layers import is_quantized, quantized_layers
from lightning_adapt.quantize import QuantConfig, quantize_model

README = Path(__file__).resolve().parents[2] / "README.md"
pytest.importorskip("bitsandbytes")


def _readme_module() -> type[L.LightningModule]:
    text = README.read_text()
    block = re.search(r"<!-- own-module:.*?-->\n```python\n(.*?)```", text, re.S)
    assert block, "the README keeps the example between its markers"
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(block.group(1), str(README), "exec"), namespace)
    module: type[L.LightningModule] = namespace["MyModule"]
    return module


def _pretrained(path: Path) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()}, str(path))
    return net


def _data() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(32, 64, generator=g), torch.randint(0, 4, (32,), generator=g)), 8)


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    callbacks = [
        QuantizeBaseCallback(mode="nf4", compute_dtype="fp32"),
        LoRAInjectionCallback(r=4, dropout=0.0, target_modules=["0"]),  # exact resume: no random masks
    ]
    options: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False}
    options |= {"enable_model_summary": False, "default_root_dir": tmp_path, "callbacks": callbacks}
    return L.Trainer(**(options | kwargs))


def test_readme_module_loads_into_4bit_and_trains_resumes_validates_predicts(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    _pretrained(weights)
    cls = _readme_module()
    module = cls(weights=str(weights))
    assert module.net is None
    L.seed_everything(0)  # the adapters' random init, as in the uninterrupted run below
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.fit(module, _data(), _data())
    assert [name for name, _ in quantized_layers(module)] == ["net.0.base_layer", "net.2"]
    assert not any(p.is_meta for p in module.parameters())

    reference = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))  # load, then quantize
    from safetensors.torch import load_file

    reference.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    quantize_model(reference, QuantConfig(mode="nf4", compute_dtype=torch.float32), include_default_skips=False)
    assert torch.equal(module.net[2].weight.data, reference[2].weight.data), "same packed bytes as load-then-quantize"
    assert torch.equal(module.net[2].weight.quant_state.absmax, reference[2].weight.quant_state.absmax)

    checkpoint = tmp_path / "after4.ckpt"
    trainer.save_checkpoint(checkpoint)
    uninterrupted = cls(weights=str(weights))
    L.seed_everything(0)
    _trainer(tmp_path, max_steps=8).fit(uninterrupted, _data(), _data())
    resumed = cls(weights=str(weights))
    _trainer(tmp_path, max_steps=8).fit(resumed, _data(), _data(), ckpt_path=str(checkpoint))
    trained = {n: p for n, p in uninterrupted.named_parameters() if p.requires_grad}
    assert trained and all(torch.equal(p, dict(resumed.named_parameters())[n]) for n, p in trained.items())

    fresh = cls(weights=str(weights))
    validated = _trainer(tmp_path).validate(fresh, _data(), ckpt_path=str(checkpoint), verbose=False)
    assert validated[0]["val_loss"] > 0 and is_quantized(fresh.net[2])
    predictions = _trainer(tmp_path).predict(cls(weights=str(weights)), _data(), ckpt_path=str(checkpoint))
    assert predictions is not None and torch.cat(predictions).shape == (32,)  # type: ignore[arg-type]


def test_a_missing_tensor_names_the_file_and_the_tensor(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    net = _pretrained(weights)
    save_file({k: v.contiguous() for k, v in net.state_dict().items() if k != "2.bias"}, str(weights))
    module = _readme_module()(weights=str(weights))
    with pytest.raises(ValueError, match=r"2\.bias") as info:  # not hidden by Lightning's teardown
        _trainer(tmp_path, max_steps=1).fit(module, _data())
    assert "model.safetensors" in str(info.value) and module.net is None


def test_readme_module_with_qlora_exports_into_the_weights_it_loaded(tmp_path: Path) -> None:
    """``load_pretrained`` remembers where each layer it quantized lies: the export merges into those originals
    (no copy written), so the merged layer is the file's weight plus the trained adapter."""
    from safetensors.torch import load_file

    from lightning_adapt import MergeOnSaveCallback
    from lightning_adapt.adapters.lora import lora_modules

    weights = tmp_path / "model.safetensors"
    _pretrained(weights)
    module = _readme_module()(weights=str(weights))
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.callbacks.append(MergeOnSaveCallback(dirpath=str(tmp_path / "export"), dtype="fp32", evaluate=False))  # type: ignore[attr-defined]
    trainer.fit(module, _data())
    layer = dict(lora_modules(module))["net.0"]
    original = load_file(str(weights))["0.weight"].float()
    merged = load_file(str(tmp_path / "export/merged/model.safetensors"))
    delta = layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight).detach()
    assert delta.abs().max() > 0
    torch.testing.assert_close(merged["net.0.weight"], original + delta, rtol=0, atol=1e-6)
    assert not (tmp_path / "original_weights.safetensors").exists(), "no spill: the loaded file is the original"
