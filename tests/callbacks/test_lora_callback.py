"""LoRAInjectionCallback through a real Trainer: fit, resume, validate/test/predict, precisions, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.toy import ToyModule, loader, trainer

from lightning_adapt.adapters.checkpoint import FINGERPRINT_KEY, BaseMismatchError
from lightning_adapt.adapters.lora import LoRALinear, lora_modules
from lightning_adapt.adapters.targeting import TargetingError
from lightning_adapt.callbacks.lora import LoRAInjectionCallback


def _frozen_snapshot(module: ToyModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}


def _lora(**kwargs: Any) -> LoRAInjectionCallback:
    kwargs.setdefault("r", 4)
    kwargs.setdefault("alpha", 8)
    kwargs.setdefault("dropout", 0.0)
    kwargs.setdefault("modules_to_save", ["classifier"])
    return LoRAInjectionCallback(**kwargs)


def test_fresh_adapter_leaves_outputs_unchanged() -> None:
    module = ToyModule()
    x = torch.randn(8, 64)
    before = module(x)
    _lora().apply(module)
    assert len(lora_modules(module)) == 4, "q_proj and v_proj of both blocks by default"
    assert torch.equal(module(x), before)


@pytest.mark.parametrize("build_in", ["init", "configure_model"])
def test_fit_trains_only_adapters_and_keeps_base_bit_identical(build_in: str) -> None:
    module = ToyModule(build_in=build_in)
    callback = _lora()
    t = trainer(callbacks=[callback], max_steps=3)
    seen: dict[str, Any] = {}

    original_fit_start = callback.on_fit_start

    def spy(trainer_: Any, pl_module: Any) -> None:
        seen["frozen"] = _frozen_snapshot(pl_module)
        seen["adapters"] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        optimizer = trainer_.optimizers[0]
        seen["opt_params"] = {id(p) for g in optimizer.param_groups for p in g["params"]}
        original_fit_start(trainer_, pl_module)

    callback.on_fit_start = spy  # type: ignore[method-assign]
    t.fit(module, loader())
    frozen_after = _frozen_snapshot(module)
    assert frozen_after.keys() == seen["frozen"].keys() and frozen_after
    assert all(torch.equal(frozen_after[k], v) for k, v in seen["frozen"].items()), "base changed"
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert {id(p) for p in trainable.values()} == seen["opt_params"], "optimizer holds exactly the trainables"
    assert all(("lora_" in n) or n.startswith("net.classifier") for n in trainable)
    for name in ("lora_A", "lora_B"):
        changed = [n for n in trainable if name in n and not torch.equal(trainable[n], seen["adapters"][n])]
        assert changed, f"{name} did not train"


def test_repeated_trainer_calls_are_idempotent() -> None:
    module = ToyModule()
    callback = _lora()
    t = trainer(callbacks=[callback], max_steps=2)
    t.fit(module, loader())
    count = len(lora_modules(module))
    t.validate(module, loader())
    t.test(module, loader())
    predictions = t.predict(module, loader())
    assert predictions is not None and predictions[0].shape == (16, 4)
    trainer(callbacks=[callback], max_steps=4).fit(module, loader())
    assert len(lora_modules(module)) == count
    assert not any(isinstance(m.base_layer, LoRALinear) for _, m in lora_modules(module)), "no double wrap"
    assert "configure_model" not in module.__dict__, "teardown restored the module's own hook"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_precisions(precision: str) -> None:
    module = ToyModule()
    t = trainer(callbacks=[_lora()], max_steps=2, precision=precision)
    t.fit(module, loader())
    assert lora_modules(module) and torch.isfinite(t.callback_metrics["train_loss"]).all()


def _ckpt_run(tmp_path: Path, steps: int, ckpt_path: str | None = None, seed: int = 0, **lora: Any) -> Any:
    module = ToyModule(seed=seed)
    t = trainer(tmp_path, callbacks=[_lora(**lora)], max_epochs=steps, limit_train_batches=2)
    torch.manual_seed(123)
    t.fit(module, loader(), ckpt_path=ckpt_path)
    path = tmp_path / f"steps{steps}-{seed}.ckpt"
    t.save_checkpoint(path)
    return module, path


def test_adapter_only_checkpoint_is_small_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    straight, _ = _ckpt_run(tmp_path / "a", steps=4)
    _, half = _ckpt_run(tmp_path / "b", steps=2)
    resumed, _ = _ckpt_run(tmp_path / "c", steps=4, ckpt_path=str(half))
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    state = torch.load(half, weights_only=False)["state_dict"]
    assert FINGERPRINT_KEY in state
    assert not any(k.endswith("base_layer.weight") or ".norm." in k for k in state)
    full = sum(p.numel() for p in straight.parameters())
    saved = sum(v.numel() for k, v in state.items() if k != FINGERPRINT_KEY)
    assert saved < 0.2 * full


def test_resume_on_another_base_fails_clearly(tmp_path: Path) -> None:
    _, ckpt = _ckpt_run(tmp_path / "a", steps=1)
    with pytest.raises(BaseMismatchError, match="different base model"):
        _ckpt_run(tmp_path / "b", steps=2, ckpt_path=str(ckpt), seed=1)
    with pytest.raises(BaseMismatchError, match="adapter shapes"):
        _ckpt_run(tmp_path / "c", steps=2, ckpt_path=str(ckpt), r=8)


def test_full_checkpoint_when_asked(tmp_path: Path) -> None:
    _, ckpt = _ckpt_run(tmp_path, steps=1, adapter_only_checkpoint=False)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert FINGERPRINT_KEY not in state and any(k.endswith("base_layer.weight") for k in state)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"r": 0}, "r=0"), ({"alpha": 0}, "alpha=0"), ({"dropout": 1.0}, "dropout=1.0"), ({"r": -2}, "r=-2")],
)
def test_invalid_arguments_fail_at_construction(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        LoRAInjectionCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_modules": ["qq_proj"]}, "match no module"),
        ({"target_modules": ["norm"]}, "cannot wrap"),
        ({"modules_to_save": ["head"]}, "modules_to_save"),
    ],
)
def test_bad_targets_fail_before_training(kwargs: dict[str, Any], match: str) -> None:
    module = ToyModule()
    before = _frozen_snapshot(module)
    t = trainer(callbacks=[_lora(**kwargs)], max_steps=1)
    with pytest.raises(TargetingError, match=match):
        t.fit(module, loader())
    assert t.global_step == 0
    assert before.keys() <= {n for n, _ in module.named_parameters()}


def test_trainable_table_is_printed(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO)
    trainer(callbacks=[_lora(target_modules="all-linear")], max_steps=1).fit(ToyModule(), loader())
    text = caplog.text
    assert "lora: q_proj" in text and "lora: o_proj" in text and "trainable:" in text
    assert "full: net.classifier" in text


def test_bf16_true_keeps_adapters_fp32_so_small_updates_are_not_lost() -> None:
    module = ToyModule(lr=1e-4)
    t = trainer(callbacks=[_lora(modules_to_save=[])], max_steps=3, precision="bf16-true")
    t.fit(module, loader())
    layers = lora_modules(module)
    assert all(layer.base_layer.weight.dtype == torch.bfloat16 for _, layer in layers)
    assert all(p.dtype == torch.float32 for _, layer in layers for p in layer.adapter_params())
    assert all(layer.lora_B.weight.abs().max() > 0 for _, layer in layers)


def test_a_trainable_head_frozen_by_the_injection_is_named_with_the_fix() -> None:
    with pytest.warns(
        UserWarning, match=r"LoRA froze net\.classifier, an output head.*modules_to_save=\['net\.classifier'\]"
    ):
        trainer(callbacks=[LoRAInjectionCallback(r=4, target_modules=["q_proj"])], max_steps=1).fit(
            ToyModule(), loader()
        )
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*LoRA froze")
        lora = LoRAInjectionCallback(r=4, target_modules=["q_proj"], modules_to_save=["classifier"])
        trainer(callbacks=[lora], max_steps=1).fit(ToyModule(), loader())
