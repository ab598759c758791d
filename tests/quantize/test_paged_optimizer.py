"""PagedOptimizerPlugin through a real Trainer on a tiny CPU model, plus the pure helpers in optim.py."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adapt.callbacks.paged_optimizer import PagedOptimizerFallbackWarning, PagedOptimizerPlugin
from lightning_adapt.errors import ConfigError
from lightning_adapt.optim import (
    OPTIMIZERS,
    optimizer_state_bytes,
    rebuild_param_groups,
    state_report,
)

OptimizerFactory = Callable[["TinyModel"], Any]


def adamw_all(model: TinyModel) -> Any:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


class TinyModel(pl.LightningModule):
    """``head(big(frozen(x)))``; ``frozen`` is frozen in ``setup``; ``big`` has 16384 weight elements."""

    def __init__(self, configure: OptimizerFactory = adamw_all) -> None:
        super().__init__()
        self.frozen = nn.Linear(128, 128)
        self.big = nn.Linear(128, 128)
        self.head = nn.Linear(128, 2)
        self.configure = configure

    def setup(self, stage: str) -> None:
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.big(self.frozen(x))))
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return self.configure(self)

    def train_dataloader(self) -> DataLoader[Any]:
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(12, 128, generator=gen), torch.randn(12, 2, generator=gen))
        return DataLoader(data, batch_size=4)  # 3 steps per epoch, fixed order


def make_model(configure: OptimizerFactory = adamw_all) -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(configure)


def fit(model: TinyModel, plugin: PagedOptimizerPlugin, ckpt_path: str | None = None, **kw: Any) -> pl.Trainer:
    kw.setdefault("max_epochs", 1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[plugin],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        **kw,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def the_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    (optimizer,) = trainer.strategy.optimizers
    return optimizer


def param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_only_trainable_parameters_are_optimized() -> None:
    model = make_model()
    frozen_before = model.frozen.weight.detach().clone()
    big_before = model.big.weight.detach().clone()
    optimizer = the_optimizer(fit(model, PagedOptimizerPlugin("AdamW8bit")))
    assert type(optimizer).__name__ == "AdamW8bit"
    assert type(optimizer).__module__.startswith("bitsandbytes.optim")
    assert param_ids(optimizer) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not param_ids(optimizer) & {id(model.frozen.weight), id(model.frozen.bias)}
    assert torch.equal(model.frozen.weight, frozen_before)
    assert not torch.equal(model.big.weight, big_before)


def test_parameters_missing_from_the_users_optimizer_join_the_first_group() -> None:
    # The user's optimizer was built over a partial list, as when adapters are injected afterwards.
    model = make_model(lambda m: torch.optim.AdamW(m.head.parameters(), lr=1e-2))
    big_before = model.big.weight.detach().clone()
    optimizer = the_optimizer(fit(model, PagedOptimizerPlugin("AdamW")))
    assert len(optimizer.param_groups) == 1
    assert {id(model.big.weight), id(model.big.bias)} <= {id(p) for p in optimizer.param_groups[0]["params"]}
    assert not torch.equal(model.big.weight, big_before)


def two_groups(model: TinyModel) -> Any:
    return torch.optim.AdamW(
        [
            {"params": model.big.parameters(), "lr": 1e-2, "weight_decay": 0.05, "name": "body"},
            {"params": model.head.parameters(), "lr": 3e-3, "weight_decay": 0.0, "name": "head"},
        ],
        betas=(0.8, 0.9),
        eps=1e-6,
    )


def test_hyperparameters_are_carried_over() -> None:
    optimizer = the_optimizer(fit(make_model(two_groups), PagedOptimizerPlugin("AdamW"), max_steps=1))
    body, head = optimizer.param_groups
    assert (body["lr"], body["weight_decay"], body["name"]) == (1e-2, 0.05, "body")
    assert (head["lr"], head["weight_decay"], head["name"]) == (3e-3, 0.0, "head")
    assert body["betas"] == head["betas"] == (0.8, 0.9)
    assert body["eps"] == head["eps"] == 1e-6


def test_overrides_win() -> None:
    plugin = PagedOptimizerPlugin("AdamW", lr=1e-4, betas=(0.5, 0.6), eps=1e-5, weight_decay=0.2)
    optimizer = the_optimizer(fit(make_model(two_groups), plugin, max_steps=1))
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
            1e-4,
            (0.5, 0.6),
            1e-5,
            0.2,
        )
    assert [g["name"] for g in optimizer.param_groups] == ["body", "head"]


def with_scheduler(make: Callable[[torch.optim.Optimizer], Any]) -> OptimizerFactory:
    def configure(model: TinyModel) -> Any:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": make(optimizer), "interval": "step"}}

    return configure


@pytest.mark.parametrize(
    ("make", "override", "expected"),
    [
        (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), None, 0.1 * 0.5**3),
        (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (s + 1)), None, 0.1 / 4),
        (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (s + 1)), 0.02, 0.02 / 4),
    ],
)
def test_lr_scheduler_drives_the_new_optimizer(
    make: Callable[[torch.optim.Optimizer], Any], override: float | None, expected: float
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(make_model(with_scheduler(make)), PagedOptimizerPlugin("AdamW", lr=override), max_steps=3)
    optimizer = the_optimizer(trainer)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert not [w for w in caught if "lr_scheduler" in str(w.message) or "optimizer.step()" in str(w.message)]


@pytest.mark.parametrize(("name", "expected"), [("PagedAdamW", 8.0), ("AdamW", 8.0), ("AdamW8bit", 2.0)])
def test_state_bytes_per_parameter(name: str, expected: float) -> None:
    # Only big.weight (16384 elements, above min_8bit_size) is trainable.
    model = make_model(lambda m: torch.optim.AdamW([m.big.weight], lr=1e-2))
    model.big.bias.requires_grad_(False)
    model.head.requires_grad_(False)
    plugin = PagedOptimizerPlugin(name)  # type: ignore[arg-type]
    trainer = fit(model, plugin, max_steps=2)
    report = plugin.last_report
    assert report is not None
    assert report.trainable_params == 128 * 128
    assert report.bytes_per_param == pytest.approx(expected, abs=0.2)
    assert report.total_bytes == optimizer_state_bytes(the_optimizer(trainer))
    assert trainer.callback_metrics["optimizer_state/bytes"].item() == report.total_bytes


def test_state_line_is_printed_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(make_model(), PagedOptimizerPlugin("AdamW"), max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if "bytes/parameter" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("AdamW optimizer state:")


def test_constructor_is_a_cli_schema() -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(PagedOptimizerPlugin, "paged_optimizer")
    args = ["--paged_optimizer.optimizer=AdamW8bit", "--paged_optimizer.betas=[0.9, 0.95]"]
    plugin = parser.instantiate(parser.parse_args(args)).paged_optimizer
    assert (plugin.optimizer, plugin.overrides["betas"]) == ("AdamW8bit", (0.9, 0.95))
    with pytest.raises(SystemExit):
        parser.parse_args(["--paged_optimizer.optimizer=AdamW4bit"])


def test_8bit_state_stays_32bit_below_min_8bit_size() -> None:
    model = make_model(lambda m: torch.optim.AdamW([m.big.weight], lr=1e-2))
    model.big.bias.requires_grad_(False)
    model.head.requires_grad_(False)
    plugin = PagedOptimizerPlugin("AdamW8bit", min_8bit_size=128 * 128 + 1)
    fit(model, plugin, max_steps=1)
    assert plugin.last_report is not None
    assert plugin.last_report.bytes_per_param == pytest.approx(8.0)


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    def plugin() -> PagedOptimizerPlugin:
        return PagedOptimizerPlugin("PagedAdamW8bit", min_8bit_size=1024)

    configure = with_scheduler(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5))
    straight = make_model(configure)
    fit(straight, plugin(), max_epochs=2)

    first = make_model(configure)
    trainer = fit(first, plugin(), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = make_model(configure)
    trainer = fit(resumed, plugin(), ckpt_path=str(tmp_path / "epoch1.ckpt"), max_epochs=2)

    assert trainer.global_step == 6
    # The checkpointed bitsandbytes state was loaded into the new optimizer, not rebuilt from zero.
    assert the_optimizer(trainer).state[resumed.big.weight]["step"] == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_paged_on_cpu_warns_exactly_once() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(make_model(), PagedOptimizerPlugin("PagedAdamW8bit"), max_epochs=2)
    ours = [w for w in caught if issubclass(w.category, PagedOptimizerFallbackWarning)]
    assert len(ours) == 1
    assert "non-paged" in str(ours[0].message)
    assert not [w for w in caught if "Paged optimizers are not supported" in str(w.message)]


def test_non_paged_on_cpu_does_not_warn() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(make_model(), PagedOptimizerPlugin("AdamW8bit"), max_steps=2)
    assert not [w for w in caught if issubclass(w.category, PagedOptimizerFallbackWarning)]


def test_no_user_optimizer_gets_one_with_defaults() -> None:
    model = make_model(lambda m: None)
    before = model.big.weight.detach().clone()
    optimizer = the_optimizer(fit(model, PagedOptimizerPlugin("Lion8bit", lr=1e-3), max_steps=2))
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert param_ids(optimizer) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not torch.equal(model.big.weight, before)


def test_unknown_optimizer_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="PagedAdamW8bit") as err:
        PagedOptimizerPlugin("AdamW4bit", lr=-1.0)  # type: ignore[arg-type]
    message = str(err.value)
    assert "'AdamW4bit' is unknown" in message
    assert all(name in message for name in OPTIMIZERS)
    assert "lr=-1.0" in message  # every problem is reported at once


def test_eps_is_refused_for_lion() -> None:
    with pytest.raises(ValueError, match="eps"):
        PagedOptimizerPlugin("PagedLion8bit", eps=1e-8)


class DeepSpeedStrategy(SingleDeviceStrategy):
    """Stands in for Lightning's DeepSpeedStrategy (deepspeed is not installed); matched by class name."""


def test_deepspeed_is_refused() -> None:
    trainer = pl.Trainer(
        strategy=DeepSpeedStrategy(device=torch.device("cpu")),
        callbacks=[PagedOptimizerPlugin()],
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(ConfigError, match="DeepSpeed"):
        trainer.fit(make_model())


class TwoOptimizers(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.big.parameters()), torch.optim.AdamW(self.head.parameters())


def test_more_than_one_optimizer_is_refused() -> None:
    with pytest.raises(ConfigError, match="single optimizer"):
        fit(TwoOptimizers(), PagedOptimizerPlugin(), max_steps=1)


def test_rebuild_param_groups_is_pure_and_keeps_group_positions() -> None:
    a, b, frozen = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    frozen.requires_grad_(False)
    orphan = nn.Parameter(torch.zeros(3))
    groups = [{"params": [a, frozen, a], "lr": 0.1, "initial_lr": 0.2}, {"params": [frozen], "lr": 0.3}]
    rebuilt = rebuild_param_groups(groups, [a, b, frozen, orphan], {"lr": 0.4, "eps": None})
    assert [len(g["params"]) for g in rebuilt] == [3, 0]
    assert rebuilt[0]["params"][0] is a and rebuilt[0]["params"][1:] == [b, orphan]
    # A scheduler factor already applied (lr / initial_lr = 0.5) is kept under the override.
    assert (rebuilt[0]["lr"], rebuilt[0]["initial_lr"]) == pytest.approx((0.2, 0.4))
    assert rebuilt[1]["lr"] == 0.4 and "eps" not in rebuilt[1]
    assert groups[0]["params"] == [a, frozen, a] and groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="No trainable"):
        rebuild_param_groups([{"params": [frozen]}], [frozen], {})


def test_optimizer_state_bytes_counts_shared_tensors_once() -> None:
    p, q = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(10))
    optimizer = torch.optim.SGD([p, q], lr=0.1)
    shared = torch.zeros(256)
    optimizer.state[p] = {
        "m": torch.zeros(10),
        "qmap": shared,
        "nested": {"x": torch.zeros(5, dtype=torch.uint8)},
    }
    optimizer.state[q] = {"m": torch.zeros(10, dtype=torch.float16), "qmap": shared, "step": 3}
    assert optimizer_state_bytes(optimizer) == 40 + 1024 + 5 + 20
    assert state_report(optimizer).trainable_params == 20
