"""``adapters_disabled``: inside it a model with adapters of any kind computes its base model's outputs bit for bit
(LoRA and QLoRA on a Llama, DoRA, convs, embeddings, nn.MultiheadAttention, target_parameters); outside it the
adapters act again; merged adapters are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.toy import IDS, tiny_llama
from test_layer_kinds import CASES, _adapted, _run
from test_target_parameters import ProjOwner
from torch import nn

from lightning_adapt.adapters.inject import LoRASpec, inject_lora
from lightning_adapt.adapters.switch import adapter_wrappers, adapters_disabled, has_adapters
from lightning_adapt.errors import ConfigError
from lightning_adapt.layers import adapter_param_ids

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize(model: nn.Module) -> None:
    torch.manual_seed(3)
    ids = adapter_param_ids(model)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in ids:
                p.normal_(std=0.3)


def _llama_pair(quantize: bool, dora: bool = False) -> tuple[nn.Module, nn.Module]:
    """The same tiny Llama twice (quantized to NF4 alike with ``quantize``), the second with random adapters."""
    models = []
    for _ in range(2):
        model = tiny_llama().eval()
        if quantize:
            from lightning_adapt.quantize import QuantConfig, quantize_model

            quantize_model(model, QuantConfig(mode="nf4", compute_dtype=torch.float32))
        models.append(model)
    inject_lora(models[1], LoRASpec(r=4, alpha=8, target_modules=LLAMA_TARGETS, use_dora=dora))
    _randomize(models[1])
    return models[0], models[1]


@pytest.mark.parametrize(("quantize", "dora"), [(False, False), (True, False), (False, True)], ids=["lora", "qlora", "dora"])  # fmt: skip
def test_a_llama_with_adapters_off_gives_the_base_logits_bit_for_bit(quantize: bool, dora: bool) -> None:
    base, adapted = _llama_pair(quantize, dora)
    with torch.no_grad():
        expected = base(IDS).logits
        on = adapted(IDS).logits
        with adapters_disabled(adapted):
            off = adapted(IDS).logits
        again = adapted(IDS).logits
    assert torch.equal(off, expected)
    assert not torch.allclose(on, expected), "the random adapters change the output"
    assert torch.equal(again, on), "the adapters act again after the block"


def test_gradients_reach_the_adapters_only_outside_the_block() -> None:
    _, adapted = _llama_pair(quantize=False)
    with adapters_disabled(adapted):
        off = adapted(IDS).logits
    assert not off.requires_grad, "no trainable parameter takes part in the base's forward"
    adapted(IDS).logits.sum().backward()
    grads = [p.grad for p in adapted.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("kind", list(CASES))
def test_every_layer_kind_runs_as_its_base(kind: str) -> None:
    plain, model = _adapted(kind)
    # frozen as the adapted model's base: torch's attention picks its CPU kernel by whether any input needs a
    # gradient, and two kernels may round the same product differently (last bit)
    plain.requires_grad_(False)
    with torch.no_grad():
        assert not torch.equal(_run(model, kind), _run(plain, kind))
        with adapters_disabled(model):
            assert torch.equal(_run(model, kind), _run(plain, kind))
        assert not torch.equal(_run(model, kind), _run(plain, kind))
    with adapters_disabled(model):  # with gradients on too
        assert torch.equal(_run(model, kind), _run(plain, kind))


def test_target_parameters_run_as_the_raw_parameter() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(ProjOwner(), nn.Linear(6, 2))
    model = copy.deepcopy(plain)
    inject_lora(model, LoRASpec(r=2, alpha=4.0, target_modules=[], target_parameters=["0.weight"]))
    _randomize(model)
    x = torch.randn(3, 5)
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(model(x), plain(x))
    assert not torch.equal(model(x), plain(x))


def test_nesting_and_errors_leave_the_flags_as_they_were() -> None:
    _, adapted = _llama_pair(quantize=False)
    with adapters_disabled(adapted), adapters_disabled(adapted):
        pass
    with pytest.raises(RuntimeError), adapters_disabled(adapted):
        raise RuntimeError("inside")
    assert has_adapters(adapted)
    assert all(not m.merged for _, m in adapter_wrappers(adapted))
    assert not has_adapters(tiny_llama())


def test_a_merged_adapter_is_refused_with_the_fix() -> None:
    _, adapted = _llama_pair(quantize=False)
    adapter_wrappers(adapted)[0][1].merge()  # type: ignore[operator]
    with (
        pytest.raises(ConfigError, match=r"merged into their base .*Fix: call unmerge\(\)"),
        adapters_disabled(adapted),
    ):
        pass
