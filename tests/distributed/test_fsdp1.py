"""FSDP1 (Lightning's ``FSDPStrategy``) for QLoRA: 4-bit codes stored in the compute dtype and sharded with the
rest, adapters in fp32 units of their own (issue 12, item 4).

Lightning refuses ``FSDPStrategy`` without CUDA; torch's FSDP1 runs on CPU over gloo, so the sharding itself is
proven here by ``tests/helpers/fsdp1_run.py`` wrapping the model exactly as ``FSDPStrategy`` does with our policy. The
Lightning run itself needs CUDA and skips elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import fsdp1_run
from helpers.multiprocess import launch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import MixedPrecision

from lightning_adapt.callbacks._fsdp1 import fsdp1_param_dtype, fsdp1_quant_storage, fsdp1_wrap_policy
from lightning_adapt.errors import ConfigError

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "fsdp1_run.py"


def _clean(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("_fsdp_wrapped_module.", ""): v for k, v in state.items()}


def _reference(dtype: torch.dtype) -> dict[str, Any]:
    """The same steps without FSDP, on the whole global batch."""
    model = fsdp1_run.build(dtype)
    record = fsdp1_run.train(model, fsdp1_run.batches(1, 0))
    record["adapters"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return record


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("fsdp1")
    found = {}
    for name, devices, dtype in (("one", 1, "fp32"), ("two", 2, "fp32"), ("two-bf16", 2, "bf16")):
        launch(SCRIPT, root / name, devices, "--dtype", dtype)
        found[name] = [torch.load(root / name / f"rank{r}.pt", weights_only=True) for r in range(devices)]
    return found


def test_two_sharded_ranks_train_as_one_process_with_twice_the_batch(runs: dict[str, list[dict[str, Any]]]) -> None:
    reference = _reference(torch.float32)
    one, two = runs["one"][0], runs["two"]
    assert one["losses"] == pytest.approx(reference["losses"], abs=1e-6)
    mean = torch.tensor([r["losses"] for r in two]).mean(dim=0)  # each rank: its half of every batch
    torch.testing.assert_close(mean, torch.tensor(reference["losses"]), atol=1e-5, rtol=0)
    for record in (one, *two):
        adapters = _clean(record["adapters"])
        assert adapters.keys() == reference["adapters"].keys()
        for name, value in reference["adapters"].items():
            torch.testing.assert_close(adapters[name], value, atol=1e-5, rtol=0, msg=name)
    assert reference["adapters"]["model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max() > 0


def test_each_rank_keeps_half_of_the_frozen_base_4bit_codes_included(runs: dict[str, list[dict[str, Any]]]) -> None:
    whole = runs["one"][0]["frozen_bytes"]
    for record in runs["two"]:
        assert abs(record["frozen_bytes"] - whole / 2) <= 64 * 4, (record["frozen_bytes"], whole)  # padding only


def test_bf16_codes_sharded_by_fsdp1_give_the_unsharded_logits_bit_for_bit(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    reference = fsdp1_run.build(torch.bfloat16)
    tokens = fsdp1_run.batches(1, 0)[0]
    with torch.no_grad():
        expected = reference(tokens).logits.float()
    half = len(tokens) // 2
    for rank, record in enumerate(runs["two-bf16"]):
        assert torch.equal(record["logits"], expected[rank * half : (rank + 1) * half]), rank


def test_quant_storage_follows_the_compute_dtype_and_refuses_what_would_scramble_the_codes() -> None:
    assert fsdp1_quant_storage("nf4", torch.uint8, torch.bfloat16) == torch.bfloat16  # the default: chosen
    assert fsdp1_quant_storage("fp4", torch.bfloat16, torch.bfloat16) == torch.bfloat16
    with pytest.raises(ConfigError, match=r"quant_storage=torch.float16 .* random weights.*bfloat16"):
        fsdp1_quant_storage("nf4", torch.float16, torch.bfloat16)
    with pytest.raises(ConfigError, match=r"mode='int8' with strategy fsdp.*Fix: mode nf4"):
        fsdp1_quant_storage("int8", torch.uint8, torch.bfloat16)
    assert fsdp1_param_dtype(FSDPStrategy(), "bf16-true") == torch.bfloat16
    assert fsdp1_param_dtype(FSDPStrategy(), "32-true") == torch.float32
    explicit = FSDPStrategy(mixed_precision=MixedPrecision(param_dtype=torch.float16))
    assert fsdp1_param_dtype(explicit, "bf16-true") == torch.float16
    with pytest.raises(ConfigError, match=r"trainer\.precision='64-true'"):
        fsdp1_param_dtype(FSDPStrategy(), "64-true")


def test_the_callbacks_prepare_fsdp_strategy_before_the_model_is_built() -> None:
    pytest.importorskip("bitsandbytes")
    import lightning as L

    from lightning_adapt import QuantizeBaseCallback

    strategy = FSDPStrategy()
    trainer: Any = SimpleNamespace(strategy=strategy, precision="bf16-true")
    callback = QuantizeBaseCallback(mode="nf4")
    callback.setup(trainer, L.LightningModule(), "fit")
    assert callback.config.quant_storage == torch.bfloat16 and callback.spec.config.quant_storage == torch.bfloat16
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.kwargs["auto_wrap_policy"] is not None
    own = FSDPStrategy(auto_wrap_policy={torch.nn.Linear})
    QuantizeBaseCallback(mode="nf4").setup(
        SimpleNamespace(strategy=own, precision="bf16-true"), L.LightningModule(), "fit"
    )  # type: ignore[arg-type]
    assert own.kwargs["auto_wrap_policy"]._module_classes == {torch.nn.Linear}, "the user's own policy wins"


def test_wrap_policy_puts_adapters_in_fp32_units_and_blocks_in_units_of_their_own() -> None:
    from helpers.toy import tiny_llama

    from lightning_adapt.adapters.inject import LoRASpec, inject_lora

    model = tiny_llama().to(torch.bfloat16)
    inject_lora(model, LoRASpec(r=2, target_modules=("q_proj",), use_dora=True))
    decide = fsdp1_wrap_policy(model)._lambda_fn
    modules = dict(model.named_modules())
    layer = "model.layers.0"
    assert decide(modules[layer]) is True and decide(modules["model"]) is False
    for name in ("self_attn.q_proj.lora_A", "self_attn.q_proj.lora_B", "self_attn.q_proj"):  # DoRA magnitude
        unit = decide(modules[f"{layer}.{name}"])
        assert isinstance(unit, dict) and unit["mixed_precision"].param_dtype == torch.float32, name
    assert decide(modules[f"{layer}.self_attn.q_proj.base_layer"]) is True, "the frozen base beside the magnitude"
    assert decide(modules[f"{layer}.self_attn.k_proj"]) is False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs CUDA")
def test_lightning_fsdp_strategy_trains_qlora_on_a_gpu_like_one_process(tmp_path: Path) -> None:
    import lightning as L
    from helpers.toy import ToyModule, loader

    from lightning_adapt import LoRAInjectionCallback, QuantizeBaseCallback

    class Recorded(ToyModule):
        losses: list[float]

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.losses = [*getattr(self, "losses", []), float(loss)]
            return loss

    def fit(strategy: Any) -> list[float]:
        targets = ["q_proj", "v_proj"]
        callbacks = [QuantizeBaseCallback(mode="nf4"), LoRAInjectionCallback(r=4, dropout=0.0, target_modules=targets)]
        trainer = L.Trainer(
            accelerator="cuda", devices=1, strategy=strategy, precision="bf16-true", max_steps=3,
            callbacks=callbacks, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
        )  # fmt: skip
        module = Recorded()
        trainer.fit(module, loader())
        return module.losses

    torch.testing.assert_close(torch.tensor(fit(FSDPStrategy())), torch.tensor(fit("auto")), atol=1e-2, rtol=0)
