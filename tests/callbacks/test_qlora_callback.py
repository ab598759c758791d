"""QuantizeBaseCallback with LoRAInjectionCallback through a real Trainer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.toy import ToyModule, loader, trainer

from lightning_adapt.adapters.lora import LoRALinear, lora_modules
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.quantize import QuantizeBaseCallback
from lightning_adapt.layers import base_weight, dequantize_weight, is_quantized, quantized_layers


def _callbacks(order: str, **quant: Any) -> list[Any]:
    quant.setdefault("compute_dtype", "fp32")
    q = QuantizeBaseCallback(**quant)
    lora = LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules="all-linear", modules_to_save=["classifier"])
    return [q, lora] if order == "quantize-first" else [lora, q]


@pytest.mark.parametrize("order", ["quantize-first", "lora-first"])
@pytest.mark.parametrize("build_in", ["init", "configure_model"])
def test_base_is_quantized_before_injection_whatever_the_order(order: str, build_in: str) -> None:
    module = ToyModule(build_in=build_in)
    trainer(callbacks=_callbacks(order), max_steps=2).fit(module, loader())
    adapted = lora_modules(module)
    assert len(adapted) == 8
    for _, layer in adapted:
        assert is_quantized(layer.base_layer), "the base under each adapter is 4-bit"
        assert not is_quantized(layer.lora_A) and not is_quantized(layer.lora_B), "adapters stay float"
        assert layer.lora_A.weight.dtype == torch.float32
    assert not is_quantized(module.net.classifier), "the output head stays full precision"
    assert len(quantized_layers(module)) == 8


def test_qlora_forward_equals_lora_on_dequantized_weights() -> None:
    module = ToyModule()
    q, lora = _callbacks("quantize-first")
    q.apply(module)
    lora.apply(module)
    with torch.no_grad():
        for _, layer in lora_modules(module):
            layer.lora_B.weight.normal_()
    x = torch.randn(8, 64)
    got = module(x)
    for _, layer in lora_modules(module):
        base = layer.base_layer
        plain = torch.nn.Linear(layer.in_features, layer.out_features)
        plain.weight.data = dequantize_weight(base)
        plain.bias.data = base.bias.detach().float()
        layer.base_layer = plain
    torch.testing.assert_close(module(x), got, rtol=0, atol=1e-5)


def test_base_storage_bit_identical_after_training_and_eval_train_agree() -> None:
    module = ToyModule()
    callbacks = _callbacks("quantize-first")
    t = trainer(callbacks=callbacks, max_steps=1)
    t.fit(module, loader())
    packed = {n: m.weight.detach().clone() for n, m in quantized_layers(module)}
    dense = {n: dequantize_weight(m) for n, m in quantized_layers(module)}
    trainer(callbacks=callbacks, max_steps=4).fit(module, loader())
    x = torch.randn(4, 64)
    module.train()
    train_out = module(x)
    module.eval()
    with torch.no_grad():
        eval_out = module(x)
    module.train()
    torch.testing.assert_close(module(x), train_out, rtol=0, atol=0)
    torch.testing.assert_close(eval_out, train_out, rtol=0, atol=0)
    for name, layer in quantized_layers(module):
        assert torch.equal(layer.weight, packed[name]), f"{name}: packed storage changed"
        assert torch.equal(dequantize_weight(layer), dense[name]), f"{name}: dequantized weight drifted"


def test_quantizing_twice_is_a_no_op() -> None:
    module = ToyModule()
    q = QuantizeBaseCallback(compute_dtype="fp32")
    first = q.apply(module)
    packed = {n: m.weight.detach().clone() for n, m in quantized_layers(module)}
    second = q.apply(module)
    assert first.layers == second.layers == 9 - 1
    assert all(torch.equal(m.weight, packed[n]) for n, m in quantized_layers(module))


def test_qlora_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    def run(steps: int, ckpt: str | None, root: Path) -> tuple[ToyModule, Path]:
        module = ToyModule()
        t = trainer(root, callbacks=_callbacks("lora-first"), max_epochs=steps, limit_train_batches=2)
        t.fit(module, loader(), ckpt_path=ckpt)
        path = root / "last.ckpt"
        t.save_checkpoint(path)
        return module, path

    straight, _ = run(4, None, tmp_path / "a")
    _, half = run(2, None, tmp_path / "b")
    resumed, _ = run(4, str(half), tmp_path / "c")
    for (name, layer), (_, other) in zip(lora_modules(straight), lora_modules(resumed), strict=True):
        assert torch.equal(layer.lora_B.weight, other.lora_B.weight), name
    state = torch.load(half, weights_only=False)["state_dict"]
    assert not any("absmax" in k or k.endswith("base_layer.weight") for k in state)


@pytest.mark.parametrize(
    ("mode", "double_quant", "bits"),
    [("nf4", None, 4.127), ("nf4", False, 4.5), ("fp4", None, 4.127), ("int8", None, 8.0)],
)
def test_memory_line_reports_bits_per_parameter(
    mode: str, double_quant: bool | None, bits: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    callbacks = _callbacks("quantize-first", mode=mode, double_quant=double_quant)
    trainer(callbacks=callbacks, max_steps=1).fit(ToyModule(width=256), loader(width=256))
    summary = callbacks[0].summary
    assert summary is not None and abs(summary.bits_per_param - bits) / bits < 0.05
    assert "bits/param" in caplog.text


def test_unsupported_combinations_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="double_quant"):
        QuantizeBaseCallback(mode="int8", double_quant=True)
    with pytest.raises(ValueError, match="blocksize"):
        QuantizeBaseCallback(blocksize=100)


def test_skip_name_matching_nothing_fails_before_training() -> None:
    t = trainer(callbacks=[QuantizeBaseCallback(skip_modules=["nope"])], max_steps=1)
    with pytest.raises(ValueError, match="nope"):
        t.fit(ToyModule(), loader())
    assert t.global_step == 0


def test_base_weight_of_wrapped_quantized_layer_matches_bitsandbytes() -> None:
    module = ToyModule()
    q, lora = _callbacks("quantize-first")
    q.apply(module)
    lora.apply(module)
    layer = module.net.layers[0].q_proj
    assert isinstance(layer, LoRALinear)
    assert torch.equal(base_weight(layer.base_layer), dequantize_weight(layer.base_layer))


@pytest.mark.parametrize(
    ("precision", "compute_dtype"), [("32-true", "bf16"), ("bf16-mixed", "bf16"), ("bf16-true", "bf16")]
)
def test_qlora_fit_validate_predict_under_precisions(precision: str, compute_dtype: str) -> None:
    module = ToyModule()
    callbacks = _callbacks("lora-first", compute_dtype=compute_dtype)
    t = trainer(callbacks=callbacks, max_steps=2, precision=precision)
    t.fit(module, loader())
    layers = len(quantized_layers(module))
    assert layers == 8
    assert torch.isfinite(t.callback_metrics["train_loss"]).all()
    t.validate(module, loader())
    predictions = t.predict(module, loader())
    assert predictions is not None and torch.isfinite(predictions[0]).all()  # type: ignore[arg-type]
    assert len(quantized_layers(module)) == layers and len(lora_modules(module)) == 8


def test_checkpoint_drops_quantized_layers_without_adapters_too() -> None:
    module = ToyModule()
    QuantizeBaseCallback(compute_dtype="fp32").apply(module)
    LoRAInjectionCallback(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["classifier"]).apply(module)
    keys = set(module.state_dict())
    assert not any("k_proj" in k or "absmax" in k or "base_layer" in k for k in keys), sorted(keys)
    assert {k for k in keys if "lora_" in k} and "net.classifier.weight" in keys


def test_modules_to_save_are_never_quantized_and_train(caplog: pytest.LogCaptureFixture) -> None:
    """A Linear named in modules_to_save would otherwise be quantized (``o_proj`` is no output head): it stays an
    nn.Linear, trains, and the quantization line says so."""
    module = ToyModule()
    before = module.net.layers[0].o_proj.weight.detach().clone()  # type: ignore[union-attr]
    lora = LoRAInjectionCallback(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["layers.0.o_proj"])
    with caplog.at_level(logging.INFO):
        trainer(callbacks=[QuantizeBaseCallback(compute_dtype="fp32"), lora], max_steps=2).fit(module, loader())
    kept = module.net.layers[0].o_proj  # type: ignore[union-attr]
    assert type(kept) is torch.nn.Linear and kept.weight.requires_grad
    assert not torch.equal(kept.weight, before), "it trained"
    assert is_quantized(module.net.layers[1].o_proj), "the other o_proj is quantized"  # type: ignore[union-attr]
    assert "kept in full precision for modules_to_save: net.layers.0.o_proj" in caplog.text


@pytest.mark.parametrize(
    ("value", "expected"),
    [(torch.bfloat16, torch.bfloat16), ("bfloat16", torch.bfloat16), ("float32", torch.float32),
     ("torch.float16", torch.float16), ("fp32", torch.float32)],
)  # fmt: skip
def test_compute_dtype_takes_torch_dtypes_and_the_usual_names(value: Any, expected: torch.dtype) -> None:
    assert QuantizeBaseCallback(compute_dtype=value).config.compute_dtype == expected


def test_an_unknown_compute_dtype_names_the_argument_and_the_choices() -> None:
    from lightning_adapt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"compute_dtype='float8'.*'bf16', 'fp16', 'fp32'.*Fix"):
        QuantizeBaseCallback(compute_dtype="float8")  # type: ignore[arg-type]
