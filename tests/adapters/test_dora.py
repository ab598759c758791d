"""DoRA without materialising W + ΔW (adapters/dora.py): the same outputs and gradients as the direct formula
(the previous implementation, kept here as the reference) and as PEFT's DoRA, for nn.Linear, Conv1D and 4-bit
bases, with and without dropout; merged == unmerged; the cached ‖W‖²_row follows every change of the base."""

from __future__ import annotations

import copy
import types
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_adapt import layers
from lightning_adapt.adapters import dora
from lightning_adapt.adapters.lora import LoRALinear, merge_lora
from lightning_adapt.layers import base_weight, is_conv1d

peft_dora = pytest.importorskip("peft.tuners.lora.dora")
IN, OUT, R = 64, 32, 4


def direct_dora_delta(self: LoRALinear, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """The previous ``LoRALinear._dora_delta``: materialises ``W + s·B A`` for its row norm."""
    assert self.lora_magnitude_vector is not None
    weight = base_weight(self.base_layer).to(x.dtype)
    delta = self.scaling * (self.lora_B.weight @ self.lora_A.weight)
    scale = self.lora_magnitude_vector / torch.linalg.vector_norm(weight + delta.detach(), dim=1).detach()
    if isinstance(self.lora_dropout, nn.Identity) or not self.training:
        bias = getattr(self.base_layer, "bias", None)
        base_result = base_out.to(x.dtype) - (0 if bias is None else bias.to(x.dtype))
    else:
        x = self.lora_dropout(x)
        base_result = F.linear(x, weight)
    lora_result: torch.Tensor = self.lora_B(self.lora_A(x))
    return (scale - 1) * base_result + scale * lora_result * self.scaling


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        conv = Conv1D(OUT, IN)
        nn.init.normal_(conv.bias, std=0.1)
        return conv
    linear = nn.Linear(IN, OUT)
    if kind == "linear":
        return linear
    from lightning_adapt.quantize import QuantConfig, quantize_linear

    pytest.importorskip("bitsandbytes")
    return quantize_linear(linear, QuantConfig("nf4", double_quant=True, compute_dtype=torch.float32))


def make_layer(kind: str, dropout: float) -> LoRALinear:
    layer = LoRALinear(make_base(kind), r=R, alpha=8.0, dropout=dropout, use_dora=True)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B != 0, m != ‖W‖_row
        layer.lora_B.weight.normal_(std=0.2)
        assert layer.lora_magnitude_vector is not None
        layer.lora_magnitude_vector.mul_(torch.rand(OUT) + 0.5)
    return layer.train()


def peft_forward(layer: LoRALinear) -> Callable[[torch.Tensor], torch.Tensor]:
    """PEFT's DoRA (``DoraLinearLayer`` and its Linear variant's dropout rule) on copies of ``layer``'s weights."""
    base = layer.base_layer
    lora_A, lora_B = copy.deepcopy(layer.lora_A), copy.deepcopy(layer.lora_B)
    module = peft_dora.DoraLinearLayer(fan_in_fan_out=is_conv1d(base))
    module.update_layer(base_layer=base, lora_A=lora_A.weight, lora_B=lora_B.weight, scaling=layer.scaling)
    assert layer.lora_magnitude_vector is not None
    module.weight = nn.Parameter(layer.lora_magnitude_vector.detach().clone())

    def forward(x: torch.Tensor) -> torch.Tensor:
        result = base(x)
        x_lora, base_result = x.float(), result
        if isinstance(layer.lora_dropout, nn.Dropout):
            x_lora, base_result = layer.lora_dropout(x_lora), None
        kwargs = {"lora_A": lora_A, "lora_B": lora_B, "scaling": layer.scaling, "base_layer": base}
        out: torch.Tensor = result + module(x_lora, base_result=base_result, **kwargs)
        return out

    forward.params = [lora_A.weight, lora_B.weight, module.weight]  # type: ignore[attr-defined]
    return forward


def run(forward: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Output, then the gradients of ``params`` and of the input, for one fixed input and dropout mask."""
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(2)).requires_grad_()
    torch.manual_seed(3)
    out = forward(x)
    out.pow(2).sum().backward()
    return [out.detach(), *(p.grad for p in params), x.grad]  # type: ignore[list-item]


def ours(layer: LoRALinear) -> list[torch.Tensor]:
    return run(layer, layer.adapter_params())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
def test_equal_to_direct_formula_and_to_peft(kind: str, dropout: float) -> None:
    layer = make_layer(kind, dropout)
    direct = copy.deepcopy(layer)
    direct._dora_delta = types.MethodType(direct_dora_delta, direct)  # type: ignore[method-assign]
    theirs = peft_forward(layer)
    mine = ours(layer)
    for reference in (run(direct, direct.adapter_params()), run(theirs, theirs.params)):  # type: ignore[attr-defined]
        for a, b in zip(mine, reference, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
def test_merged_equals_unmerged(kind: str) -> None:
    layer = make_layer(kind, 0.1).eval()
    x = torch.randn(3, IN)
    with torch.no_grad():
        unmerged = layer(x)
        merged = merge_lora(copy.deepcopy(layer))(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_row_norm_is_exact() -> None:
    gen = torch.Generator().manual_seed(4)
    weight, a, b = (
        torch.randn(40, 30, generator=gen),
        torch.randn(6, 30, generator=gen),
        torch.randn(40, 6, generator=gen),
    )
    row_sq = weight.pow(2).sum(1)
    expected = torch.linalg.vector_norm(weight + 0.7 * b @ a, dim=1)
    torch.testing.assert_close(dora.dora_row_norm(weight, row_sq, a, b, 0.7), expected, atol=1e-5, rtol=1e-5)


def fresh_output(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    dora.clear_dora_cache(layer.base_layer)
    return layer(x)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_cache_follows_the_base(kind: str) -> None:
    layer = make_layer(kind, 0.0).eval()
    base = layer.base_layer
    x = torch.randn(3, IN)
    with torch.no_grad():
        layer(x)
        cached = dora._ROW_SQ[base][1]
        layer(x)
        assert dora._ROW_SQ[base][1] is cached  # a hit: the frozen norm is not recomputed
        layer.merge()
        layer.unmerge()  # the writes bump the version: recomputed from the unmerged (rounded) weight
        torch.testing.assert_close(layer(x), fresh_output(layer, x), atol=0, rtol=0)
        state = {k: v * 1.5 for k, v in base.state_dict().items()}
        base.load_state_dict(state)
        torch.testing.assert_close(layer(x), fresh_output(layer, x), atol=0, rtol=0)
        layer.double()  # new storage, new dtype
        torch.testing.assert_close(layer(x.double()), fresh_output(layer, x.double()), atol=0, rtol=0)
        assert dora._ROW_SQ[base][1].dtype == torch.float64
        expected = direct_dora_delta(layer, x.double(), base(x.double()))
        torch.testing.assert_close(layer(x.double()) - base(x.double()), expected, atol=1e-10, rtol=0)


def test_one_dequantization_per_step_for_a_4bit_base(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer("4bit", 0.3)
    calls = []
    real = layers.dequantize_weight
    monkeypatch.setattr(layers, "dequantize_weight", lambda m: calls.append(1) or real(m))
    layer(torch.randn(3, IN)).sum().backward()
    assert len(calls) == 1  # the norm and W · dropout(x) share it (bitsandbytes' own matmul aside)
