"""Numerical parity with PEFT, the reference implementation: same init, same logits and gradients.

In its own module so that a missing ``peft`` (a test-only dependency) skips only these tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.toy import IDS, adapt_randomly, tiny_llama
from torch import nn

from lightning_adapt.adapters.lora import LoRALinear, lora_modules

IN, OUT = 12, 6

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_matches_peft(init: str) -> None:
    base = nn.Sequential(nn.Linear(IN, OUT))
    peft_init = True if init == "kaiming" else "gaussian"
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=peft_init)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).base_model.model[0]
    torch.manual_seed(5)
    ours = LoRALinear(copy.deepcopy(base[0]), r=4, alpha=8.0, init=init)  # type: ignore[arg-type]
    assert torch.equal(ours.lora_A.weight, theirs.lora_A["default"].weight)
    assert torch.equal(ours.lora_B.weight, theirs.lora_B["default"].weight)


@pytest.mark.parametrize(
    ("use_dora", "use_rslora", "dropout"),
    [(False, False, 0.0), (False, True, 0.0), (True, False, 0.0), (True, True, 0.0), (True, False, 0.3)],
)
def test_numerically_equal_to_peft(use_dora: bool, use_rslora: bool, dropout: float) -> None:
    plain = tiny_llama().eval()
    targets = ["q_proj", "v_proj", "down_proj"]
    kwargs = {"use_dora": use_dora, "use_rslora": use_rslora, "dropout": dropout}
    ours = adapt_randomly(copy.deepcopy(plain), targets, **kwargs)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        lora_dropout=dropout,
        use_dora=use_dora,
        use_rslora=use_rslora,
    )
    theirs = peft.get_peft_model(copy.deepcopy(plain), config)
    with torch.no_grad():
        for name, layer in lora_modules(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(torch.rand(layer.out_features) + 0.5)
                peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    ours.train()
    theirs.train()
    torch.manual_seed(6)  # same dropout masks: both draw them in the same module order
    ours_logits = ours(IDS).logits
    torch.manual_seed(6)
    theirs_logits = theirs(input_ids=IDS).logits
    torch.testing.assert_close(ours_logits, theirs_logits, atol=1e-5, rtol=0)
    ours_logits.pow(2).mean().backward()
    theirs_logits.pow(2).mean().backward()
    for name, layer in lora_modules(ours):  # gradients agree too (DoRA detaches the norm as PEFT does)
        peft_layer = theirs.base_model.model.get_submodule(name)
        pairs = [(layer.lora_A.weight, peft_layer.lora_A["default"].weight)]
        if layer.lora_magnitude_vector is not None:
            pairs.append((layer.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight))
        for mine, peft_param in pairs:
            torch.testing.assert_close(mine.grad, peft_param.grad, atol=1e-5, rtol=1e-4)
