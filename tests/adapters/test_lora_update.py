"""The LoRA forward as one ``addmm`` (``add_lora_update``) equals the plain formula it replaced, in values and
gradients, on every base kind; and it edits nothing in place (the base output may be saved by its backward)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_adapt.adapters.lora import LoRALinear, add_lora_update

IN, OUT = 24, 10


def _reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The previous forward: ``base(x) + (B(A(dropout(x))) · scaling)`` cast to the base output dtype."""
    result = layer.base_layer(x)
    update = layer.lora_B(layer.lora_A(layer.lora_dropout(x.to(layer.lora_A.weight.dtype)))) * layer.scaling
    return result + update.to(result.dtype)


def _conv1d() -> nn.Module:
    layer = Conv1D(OUT, IN)
    nn.init.normal_(layer.weight, std=0.2)
    return layer


def _quantized(mode: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        pytest.importorskip("bitsandbytes")
        from lightning_adapt.quantize import QuantConfig, quantize_linear

        config = QuantConfig(mode=mode, double_quant=mode != "int8", compute_dtype=torch.float32)  # type: ignore[arg-type]
        return quantize_linear(nn.Linear(IN, OUT), config)

    return build


BASES: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(IN, OUT),
    "linear-no-bias": lambda: nn.Linear(IN, OUT, bias=False),
    "conv1d": _conv1d,
    "nf4": _quantized("nf4"),
    "int8": _quantized("int8"),
}


def _layer(base: str, alpha: float = 7.0) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(BASES[base](), r=4, alpha=alpha)  # scaling 1.75: not a power of two
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    return layer


def _grads(layer: LoRALinear, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    out = forward(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    layer.zero_grad(set_to_none=True)
    return [out.detach(), *(g for g in grads if g is not None)]


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("shape", [(3, 5, IN), (7, IN), (IN,)])
def test_forward_and_gradients_equal_the_plain_formula(base: str, shape: tuple[int, ...]) -> None:
    layer = _layer(base)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ours, theirs = _grads(layer, layer, x), _grads(layer, lambda t: _reference(layer, t), x)
    assert len(ours) == len(theirs) == 4
    for mine, ref in zip(ours, theirs, strict=True):  # one rounding step apart at most (alpha folded into gemm)
        torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-6)


def test_a_lower_precision_base_takes_the_cast_path_unchanged() -> None:
    layer = _layer("linear").to(torch.bfloat16)  # base bf16, adapters stay fp32
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _reference(layer, x))


def test_under_autocast_both_operands_follow_the_autocast_dtype() -> None:
    layer = _layer("linear")
    x = torch.randn(4, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = layer(x), _reference(layer, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_nothing_is_edited_in_place() -> None:
    result, projected, lora_b = torch.randn(6, OUT), torch.randn(6, 4), torch.randn(OUT, 4)
    before = result.clone()
    summed = add_lora_update(result, projected, lora_b, 0.5)
    assert torch.equal(result, before) and result._version == 0
    torch.testing.assert_close(summed, before + 0.5 * projected @ lora_b.T)


def test_fresh_adapter_is_exactly_the_base() -> None:
    layer = LoRALinear(nn.Linear(IN, OUT), r=4, alpha=7.0)
    x = torch.randn(3, 5, IN)
    assert torch.equal(layer(x), layer.base_layer(x))
