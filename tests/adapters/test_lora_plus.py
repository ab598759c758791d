"""LoRA+ (``lora: lora_plus_ratio``): every ``B`` trains with ``ratio ×`` the learning rate of its ``A``, through the
optimizer the module configures (torch's AdamW via Lightning) and through ``PagedOptimizerPlugin``'s bitsandbytes ones,
LR schedulers included, whatever the callback order."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers.toy import ToyModule, loader, trainer

from lightning_adapt.adapters.lora import lora_modules
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.paged_optimizer import PagedOptimizerPlugin
from lightning_adapt.optim import LORA_PLUS, extend_scheduler, rebuild_param_groups, split_lora_plus

RATIO, LR = 4.0, 0.05


class _Scheduled(ToyModule):
    """ToyModule with a per-step warm-up schedule, as the ready tasks configure."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_split_moves_b_into_its_own_group_once_and_extends_the_schedule() -> None:
    a, b, other = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    optimizer = torch.optim.AdamW([a, b, other], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    added = split_lora_plus(optimizer, [b], RATIO)
    extend_scheduler(schedule, added, RATIO)
    assert added == {0: 1}
    assert [g["params"] for g in optimizer.param_groups] == [[a, other], [b]]
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.05 * RATIO]
    assert schedule.base_lrs == [0.1, 0.1 * RATIO] and len(schedule.lr_lambdas) == 2
    schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.05 * RATIO]
    assert split_lora_plus(optimizer, [b], RATIO) == {}, "idempotent"
    groups = rebuild_param_groups(optimizer.param_groups, [a, b, other], {"lr": 1.0})  # a paged optimizer's override
    assert [g["initial_lr"] for g in groups] == [1.0, RATIO] and groups[1][LORA_PLUS] == RATIO


def _fit(callbacks: list[Any], module: ToyModule, steps: int = 1) -> torch.optim.Optimizer:
    t = trainer(callbacks=callbacks, max_steps=steps)
    t.fit(module, loader())
    return t.strategy.optimizers[0]


def _moved(module: ToyModule) -> tuple[float, float]:
    """How far the first step moved ``A`` and ``B`` (PiSSA keeps their start as ``lora_A0`` / ``lora_B0``)."""
    layers = [layer for _, layer in lora_modules(module)]
    a = max(float((layer.lora_A.weight - layer.lora_A0).abs().max()) for layer in layers)  # type: ignore[operator]
    b = max(float((layer.lora_B.weight - layer.lora_B0).abs().max()) for layer in layers)  # type: ignore[operator]
    return a, b


def _lora(**kwargs: Any) -> LoRAInjectionCallback:
    return LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], **kwargs)


@pytest.mark.parametrize(
    ("optimizer", "order"),
    [("torch", "-"), ("AdamW", "lora-first"), ("AdamW", "paged-first"), ("PagedAdamW8bit", "paged-first")],
)
def test_b_learns_ratio_times_faster_in_a_real_step(optimizer: str, order: str) -> None:
    torch.manual_seed(0)
    module = ToyModule(lr=LR)
    lora = _lora(init="pissa", lora_plus_ratio=RATIO)  # A and B both get gradients at the first step
    callbacks: list[Any] = [lora]
    if optimizer != "torch":  # the module's own AdamW, else a bitsandbytes one replacing it
        paged = PagedOptimizerPlugin(optimizer, weight_decay=0.0)  # type: ignore[arg-type]
        callbacks = [lora, paged] if order == "lora-first" else [paged, lora]
    used = _fit(callbacks, module)
    lrs = sorted({g["lr"] for g in used.param_groups if g["params"]})
    assert lrs == [LR, LR * RATIO]
    b_groups = [g for g in used.param_groups if g.get(LORA_PLUS)]
    b_ids = {id(layer.lora_B.weight) for _, layer in lora_modules(module)}
    assert {id(p) for g in b_groups for p in g["params"]} == b_ids
    # Adam's first step moves every weight with a gradient by about its learning rate
    moved_a, moved_b = _moved(module)
    assert moved_b == pytest.approx(LR * RATIO, rel=0.03) and moved_a == pytest.approx(LR, rel=0.03)


def test_the_schedule_keeps_the_ratio() -> None:
    module = _Scheduled(lr=LR)
    used = _fit([_lora(lora_plus_ratio=RATIO)], module, steps=2)
    a_lr, b_lr = (g["lr"] for g in used.param_groups)
    assert b_lr == pytest.approx(RATIO * a_lr) and a_lr == pytest.approx(LR)  # warmed up to 3/3 after two steps


def test_paged_lr_override_keeps_the_ratio() -> None:
    used = _fit([PagedOptimizerPlugin("AdamW", lr=0.01), _lora(lora_plus_ratio=RATIO)], ToyModule())
    assert [g["lr"] for g in used.param_groups] == pytest.approx([0.01, 0.01 * RATIO])


def test_resume_restores_the_split_optimizer_exactly(tmp_path: Any) -> None:
    def run(epochs: int, ckpt: str | None, root: Any) -> ToyModule:
        module = _Scheduled(lr=LR)
        t = trainer(root, callbacks=[_lora(lora_plus_ratio=RATIO)], max_epochs=epochs, limit_train_batches=2)
        t.fit(module, loader(), ckpt_path=ckpt)
        t.save_checkpoint(root / "last.ckpt")
        return module

    straight = run(2, None, tmp_path / "a")
    run(1, None, tmp_path / "b")
    resumed = run(2, str(tmp_path / "b" / "last.ckpt"), tmp_path / "c")
    for (name, layer), (_, other) in zip(lora_modules(straight), lora_modules(resumed), strict=True):
        assert torch.equal(layer.lora_B.weight, other.lora_B.weight), name
