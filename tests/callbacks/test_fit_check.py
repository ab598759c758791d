"""The fit check: the verdict's arithmetic, a meta-device LLaMA-2-7B at 24 GB (full refused, QLoRA allowed), and
``FitCheckCallback`` through a real Trainer, before any weight is read."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers.toy import ToyModule, loader, trainer
from torch.utils.data import DataLoader

from lightning_adapt.callbacks import fit_check
from lightning_adapt.callbacks.fit_check import FitCheckCallback, plan_fit
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.memory_report import MemoryReportCallback
from lightning_adapt.errors import ConfigError
from lightning_adapt.memory.estimator import PRESETS, Assumptions, estimate, load_model_shape
from lightning_adapt.memory.fit import REFUSAL_MARGIN, Device, check_fit, on_device
from lightning_adapt.tasks import CausalLMTask

GIB = 2**30
SHAPE = load_model_shape("llama-2-7b")


def _room(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    """The device has ``available`` bytes free, whatever this machine has."""
    monkeypatch.setattr(fit_check, "available_memory_bytes", lambda device: (available, "patched free memory"))


# --------------------------------------------------------------------------- the verdict


def test_the_verdict_turns_on_the_exact_part_and_the_activations_are_the_margin() -> None:
    a = Assumptions(optimizer="adamw-16bit", batch_size=1, seq_len=512)
    est = estimate(SHAPE, "full", a)
    certain, need = on_device(est, paged=False)
    assert certain == est.weights_bytes + est.gradient_bytes + est.optimizer_bytes
    assert need == certain + est.activation_bytes > certain
    edge = math.ceil(certain / (1 + REFUSAL_MARGIN))  # weights, gradients and moments exceed it by 5% at most
    verdicts = {
        room: check_fit(SHAPE, "full", a, Device("cpu", room, "RAM")).verdict
        for room in (edge - 1, edge, certain, need - 1, need)
    }
    assert verdicts == {
        edge - 1: "does not fit",
        edge: "may not fit",
        certain: "may not fit",
        need - 1: "may not fit",
        need: "fits",
    }


def test_a_paged_optimizer_leaves_a_gpu_but_not_the_cpu() -> None:
    a = Assumptions(optimizer="adamw-8bit")
    est = estimate(SHAPE, "full", a)
    gpu = check_fit(SHAPE, "full", a, Device("cuda:0", 80 * GIB, "free", pages=True), paged=True)
    cpu = check_fit(SHAPE, "full", a, Device("cpu", 80 * GIB, "RAM"), paged=True)
    assert gpu.certain == est.weights_bytes + est.gradient_bytes
    assert cpu.certain == gpu.certain + est.optimizer_bytes
    assert "optimizer state paged out" in gpu.summary() and "paged out" not in cpu.summary()


def test_the_largest_batch_that_fits_is_suggested_and_only_changes_that_fit() -> None:
    a = Assumptions(rank=8, targets=("q_proj", "v_proj"), adapter_dtype="fp32", batch_size=8, seq_len=1024)
    fits = {b: on_device(estimate(SHAPE, "qlora", replace(a, batch_size=b)), False)[1] for b in range(1, 9)}
    room = (fits[3] + fits[4]) // 2  # batch 3 fits, 4 does not
    check = check_fit(SHAPE, "qlora", a, Device("cuda:0", room, "free", pages=True))
    assert check.verdict == "may not fit"
    settings = [change.setting for change in check.changes]
    assert settings[0] == (
        "data.init_args.batch_size: 3 (with trainer.accumulate_grad_batches: 3, 9 sequences per optimizer step; now 8)"
    )
    assert settings[1].startswith("activation checkpointing")
    assert all(change.fits for change in check.changes), "only the changes that fit, when some do"
    assert not any(s.startswith("paged_optimizer") for s in settings), "8-bit state of 8M adapter values: not enough"


def test_when_no_change_fits_alone_each_is_listed_and_all_together() -> None:
    a = Assumptions(optimizer="adamw-16bit", batch_size=4, seq_len=2048)
    check = check_fit(SHAPE, "full", a, Device("cuda:0", 24 * GIB, "free", pages=True))
    assert check.verdict == "does not fit"
    assert not any(change.fits for change in check.changes[:-1])
    together = check.changes[-1]
    assert together.setting == "all of these together" and together.fits
    assert together.estimate.method == "qlora" and together.estimate.assumptions.batch_size == 1
    assert together.estimate.assumptions.activation_checkpointing
    assert "No change fits alone; each, estimated:" in check.message()


# --------------------------------------------------------------------------- LLaMA-2-7B on the meta device


class _Meta7B(L.LightningModule):
    """LLaMA-2-7B's shape on the meta device (no weight exists), trained with torch AdamW."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        fields = {k: v for k, v in PRESETS["llama-2-7b"].items() if k != "model_type"}
        with torch.device("meta"):
            self.model = LlamaForCausalLM(LlamaConfig(**fields))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


@pytest.fixture(scope="module")
def llama_7b() -> _Meta7B:
    return _Meta7B()


def _qlora() -> list[L.Callback]:
    pytest.importorskip("bitsandbytes")
    from lightning_adapt.callbacks.quantize import QuantizeBaseCallback

    return [
        QuantizeBaseCallback(mode="nf4", double_quant=True),
        LoRAInjectionCallback(r=16, target_modules="all-linear"),
    ]


def test_llama_7b_full_fine_tuning_is_refused_at_24_gb_and_qlora_allowed(
    llama_7b: _Meta7B, monkeypatch: pytest.MonkeyPatch
) -> None:
    _room(monkeypatch, 24 * GIB)
    params = list(llama_7b.parameters())
    numel = sum(p.numel() for p in params)
    assert numel == 6_738_415_616 and all(p.is_meta for p in params)
    full, why = plan_fit(trainer(precision="bf16-true"), llama_7b)
    assert full is not None, why
    # bf16 weights and gradients, torch AdamW's bf16 moments and a 4-byte step per tensor: 53.91 GB
    assert full.certain == numel * (2 + 2 + 4) + 4 * len(params) == 53_907_326_092
    assert full.verdict == "does not fit"
    message = full.message()
    assert message.startswith("fit_check: the run does not fit: full fine-tuning of LlamaForCausalLM (bf16 base")
    assert "weights 13.48 GB + gradients 13.48 GB + optimizer state 26.95 GB" in message
    assert "patched free memory: 25.77 GB" in message and "Fix: " in message
    fitting = [change.setting.split(":")[0] for change in full.changes]
    assert fitting == ["lora", "quantize"] and all(change.fits for change in full.changes)

    qlora, why = plan_fit(trainer(precision="bf16-true", callbacks=_qlora()), llama_7b)
    assert qlora is not None, why
    assert (qlora.estimate.method, qlora.verdict) == ("qlora", "fits")
    assert round(qlora.certain / 1e7) == 451, "3.87 GB of 4-bit weights and bf16 embeddings, 40M fp32 adapters + AdamW"
    with_tokens = replace(qlora.estimate.assumptions, batch_size=1, seq_len=4096)  # + 20.9 GB of activations
    allowed = check_fit(SHAPE, "qlora", with_tokens, qlora.device)
    assert allowed.verdict == "fits" and round(allowed.need / 1e7) == 2542 < qlora.device.available / 1e7
    assert check_fit(
        SHAPE, "full", replace(full.estimate.assumptions, batch_size=1, seq_len=4096), full.device
    ).verdict == ("does not fit")
    assert all(p.is_meta for p in llama_7b.parameters()), "nothing was materialised"


def test_llama_7b_full_fine_tuning_fits_an_80_gb_gpu_in_bf16_but_not_in_fp32(
    llama_7b: _Meta7B, monkeypatch: pytest.MonkeyPatch
) -> None:
    _room(monkeypatch, 80 * GIB)
    bf16, _ = plan_fit(trainer(precision="bf16-true"), llama_7b)
    fp32, _ = plan_fit(trainer(precision="bf16-mixed"), llama_7b)  # fp32 weights: 2 x 4 + 8 B/param = 107.8 GB
    assert bf16 is not None and fp32 is not None
    assert bf16.verdict == "fits" and fp32.verdict == "does not fit"
    assert fp32.certain == 6_738_415_616 * 16 + 4 * 291


# --------------------------------------------------------------------------- through a Trainer


def _tokens(n: int = 4, seq: int = 16) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 1000, (seq,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids})
    return DataLoader(rows, batch_size=2)  # type: ignore[arg-type]  # a list is a map-style dataset


class _Data(L.LightningDataModule):
    """A data module that says its batch size and longest sequence, as the project's do."""

    batch_size, max_length = 2, 16

    def train_dataloader(self) -> DataLoader[Any]:
        return _tokens(seq=self.max_length)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_plan_equals_what_the_run_then_measures(lora: bool, tiny_llama_dir: Path) -> None:
    """Weights + gradients + optimizer state predicted before the load equal the memory report's measurements after
    the first step, to the byte."""
    check, report = FitCheckCallback(), MemoryReportCallback()
    module = CausalLMTask(model_name_or_path=str(tiny_llama_dir), learning_rate=1e-3)
    callbacks = [LoRAInjectionCallback(r=4)] if lora else []
    trainer(callbacks=[*callbacks, check, report], max_steps=1).fit(module, _tokens())
    assert check.check is not None and check.check.verdict == "fits", check.skipped
    rows = report.reports["first_step"]
    measured = sum(rows[c][0] or 0 for c in ("weights", "gradients", "optimizer state"))
    assert check.check.certain == measured == (12_907_808 if lora else 51_516_496)


def test_a_run_that_cannot_fit_is_refused_before_any_weight_is_read(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _room(monkeypatch, 1_000_000)
    module = CausalLMTask(model_name_or_path=str(tiny_llama_dir), learning_rate=1e-3)
    with pytest.raises(ConfigError) as caught:
        trainer(callbacks=[FitCheckCallback()], max_steps=1).fit(module, datamodule=_Data())
    text = str(caught.value)
    assert text.startswith(
        "fit_check: the run does not fit: full fine-tuning of LlamaForCausalLM (fp32 base, adamw-fp32) on cpu needs an "
        "estimated "
    )
    assert "(weights 12.9 MB + gradients 12.9 MB + optimizer state 25.8 MB = 51.5 MB, + activations " in text
    assert "(batch 2 x 16 tokens)); patched free memory: 1.0 MB." in text
    assert "  - lora: r: 16, target_modules: all-linear: " in text and text.endswith("fit_check: off skips this check.")
    assert module.model is None and module.load_report is None, "refused before the base was read"
    _room(monkeypatch, 10**12)  # the plan left nothing behind: the same module then loads and trains
    t = trainer(callbacks=[FitCheckCallback()], max_steps=1)
    t.fit(module, datamodule=_Data())
    assert t.global_step == 1 and module.load_report is not None
    assert not any(p.is_meta for p in module.parameters())


def test_warn_goes_on_and_activations_alone_never_refuse(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = CausalLMTask(model_name_or_path=str(tiny_llama_dir), learning_rate=1e-3)
    _room(monkeypatch, 1_000_000)
    warned = FitCheckCallback("warn")
    with pytest.warns(UserWarning, match="fit_check: the run does not fit"):
        trainer(callbacks=[LoRAInjectionCallback(r=4), warned], max_steps=1).fit(module, datamodule=_Data())
    assert warned.check is not None and warned.check.verdict == "does not fit"
    _room(monkeypatch, warned.check.certain)  # weights, gradients and optimizer state fit; the activations do not
    error = FitCheckCallback("error")
    with pytest.warns(UserWarning, match="fit_check: the run may not fit"):
        t = trainer(callbacks=[LoRAInjectionCallback(r=4), error], max_steps=1)
        t.fit(CausalLMTask(model_name_or_path=str(tiny_llama_dir), learning_rate=1e-3), datamodule=_Data())
    assert error.check is not None and error.check.verdict == "may not fit" and t.global_step == 1


def test_off_checks_nothing_and_a_module_without_a_config_is_skipped_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _room(monkeypatch, 1)
    off = FitCheckCallback("off")
    trainer(callbacks=[off], max_steps=1).fit(ToyModule(), loader())
    assert off.check is None and off.skipped is None
    on = FitCheckCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[on], max_steps=1).fit(ToyModule(), loader())
    assert not [w for w in caught if "fit_check" in str(w.message)], "a skipped check is said, not warned"
    assert on.check is None and on.skipped == (
        "ToyModule holds no Hugging Face PreTrainedModel, so there is no config to estimate from"
    )
    with pytest.raises(ConfigError, match=r"fit_check='maybe' is not one of error, warn, off\. Fix: "):
        FitCheckCallback("maybe")  # type: ignore[arg-type]


def test_the_free_memory_of_the_cpu_is_memavailable_or_a_smaller_cgroup_room(tmp_path: Path) -> None:
    from lightning_adapt.resources import available_memory_bytes

    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo")
    plain = available_memory_bytes("cpu", cgroup=tmp_path / "none")
    assert plain is not None and plain[0] > 0 and plain[1] == "available RAM (MemAvailable)"
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    assert available_memory_bytes("cpu", cgroup=tmp_path) == (600_000, "the cgroup's memory.max less memory.current")
    (tmp_path / "memory.max").write_text("max\n")  # no limit: the machine's figure
    unlimited = available_memory_bytes("cpu", cgroup=tmp_path)
    assert unlimited is not None and unlimited[1] == "available RAM (MemAvailable)"
    assert available_memory_bytes("mps") is None, "a device it cannot read: the check is skipped, not guessed"


def test_the_first_optimizer_of_anything_configure_optimizers_may_return() -> None:
    from lightning_adapt.callbacks.fit_check import _first_optimizer

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    shapes: list[Any] = [opt, {"optimizer": opt}, [opt], ([opt], []), [{"optimizer": opt, "lr_scheduler": None}]]
    assert all(_first_optimizer(conf) is opt for conf in shapes)
    assert _first_optimizer(None) is None and _first_optimizer([]) is None
