"""Exact-math tests for lightning_adapt.adapters.lora on tiny CPU layers and models (PEFT parity: test_peft_parity.py)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from helpers.toy import IDS, adapt_randomly, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_adapt.adapters.lora import LoRALinear, lora_modules, merge_lora
from lightning_adapt.layers import AdapterModule, base_weight

IN, OUT = 12, 6


def _linear() -> nn.Module:
    return nn.Linear(IN, OUT)


def _conv1d() -> nn.Module:
    layer = Conv1D(OUT, IN)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


BASES: dict[str, Callable[[], nn.Module]] = {"linear": _linear, "conv1d": _conv1d}
# (base, kwargs) covering plain LoRA, rsLoRA, DoRA, gaussian init and dropout
VARIANTS = [
    ("linear", {}),
    ("linear", {"use_rslora": True}),
    ("linear", {"use_dora": True}),
    ("linear", {"use_dora": True, "use_rslora": True, "init": "gaussian"}),
    ("conv1d", {}),
    ("conv1d", {"use_dora": True}),
]


def _wrapped(base: str, r: int = 4, alpha: float = 8.0, randomize: bool = True, **kwargs: object) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(BASES[base](), r=r, alpha=alpha, **kwargs)  # type: ignore[arg-type]
    if randomize:  # a trained-looking adapter: B != 0, magnitude != ||W||
        with torch.no_grad():
            nn.init.normal_(layer.lora_B.weight, std=0.3)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(torch.rand(OUT) + 0.5)
    return layer


def _x() -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("base", "kwargs"), [*VARIANTS, ("linear", {"dropout": 0.5, "use_dora": True})])
def test_fresh_adapter_is_identity(base: str, kwargs: dict[str, object]) -> None:
    layer = _wrapped(base, randomize=False, **kwargs).train()
    assert torch.equal(layer(_x()), layer.base_layer(_x()))


def test_attributes_and_state_dict_layout() -> None:
    layer = _wrapped("linear", r=4, alpha=8.0, use_dora=True, dropout=0.1)
    assert (layer.in_features, layer.out_features, layer.r, layer.scaling) == (IN, OUT, 4, 2.0)
    assert layer.lora_A.weight.shape == (4, IN) and layer.lora_B.weight.shape == (OUT, 4)
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.1
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.weight",
        "lora_B.weight",
        "lora_magnitude_vector",
    }
    assert _wrapped("linear", r=4, alpha=8.0, use_rslora=True).scaling == 8.0 / math.sqrt(4)
    assert isinstance(_wrapped("linear").lora_dropout, nn.Identity)


def test_dora_magnitude_initialised_to_row_norms() -> None:
    for base in BASES:
        layer = _wrapped(base, randomize=False, use_dora=True)
        assert layer.lora_magnitude_vector is not None
        torch.testing.assert_close(layer.lora_magnitude_vector, base_weight(layer.base_layer).norm(dim=1))


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_params_are_exactly_the_trainable_ones(use_dora: bool) -> None:
    layer = _wrapped("linear", use_dora=use_dora)
    assert isinstance(layer, AdapterModule)
    trainable = {id(p) for p in layer.parameters() if p.requires_grad}
    assert {id(p) for p in layer.adapter_params()} == trainable
    assert len(trainable) == (3 if use_dora else 2)


@pytest.mark.parametrize(("base", "kwargs"), VARIANTS)
def test_step_changes_adapter_only(base: str, kwargs: dict[str, object]) -> None:
    layer = _wrapped(base, randomize=False, **kwargs)
    frozen = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    before = [p.detach().clone() for p in layer.adapter_params()]
    opt = torch.optim.SGD(layer.adapter_params(), lr=0.1)
    for _ in range(2):  # B = 0 gives A no gradient on the first step
        opt.zero_grad()
        layer(_x()).pow(2).sum().backward()
        opt.step()
    for key, value in layer.base_layer.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    for old, new in zip(before, layer.adapter_params(), strict=True):
        assert not torch.equal(old, new)


@pytest.mark.parametrize(("base", "kwargs"), VARIANTS)
def test_merged_weight_and_merge_match_forward(base: str, kwargs: dict[str, object]) -> None:
    layer = _wrapped(base, **kwargs)
    expected = layer(_x())
    assert not torch.allclose(expected, layer.base_layer(_x()), atol=1e-3)  # the adapter does something
    dense = nn.functional.linear(_x(), layer.merged_weight(), layer.base_layer.bias)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=0)
    original = base_weight(layer.base_layer).clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(_x()), expected, atol=1e-5, rtol=0)
    layer.merge()  # idempotent: must not add the update twice
    torch.testing.assert_close(layer(_x()), expected, atol=1e-5, rtol=0)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base_weight(layer.base_layer), original, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(_x()), expected, atol=1e-5, rtol=0)


def test_delta_weight_is_scaled_b_at_a() -> None:
    layer = _wrapped("linear", r=4, alpha=6.0, use_dora=True)
    torch.testing.assert_close(layer.delta_weight(), 1.5 * layer.lora_B.weight @ layer.lora_A.weight)


def test_adapter_path_runs_in_fp32_and_returns_base_dtype() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(IN, OUT).to(torch.bfloat16), r=4, alpha=8.0)
    assert layer.lora_A.weight.dtype == torch.float32
    out = layer(_x().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


# (kwargs, argument name expected in the message)
INVALID = [
    ({"r": 0}, "r=0"),
    ({"r": 2.0}, "r=2.0"),
    ({"alpha": 0}, "alpha=0"),
    ({"alpha": -1.0}, "alpha=-1.0"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"dropout": -0.1}, "dropout=-0.1"),
    ({"init": "xavier"}, "init='xavier'"),
    ({"base_layer": nn.Embedding(4, 4)}, "base_layer=Embedding"),
]


@pytest.mark.parametrize(("override", "needle"), INVALID)
def test_validation_names_the_argument(override: dict[str, object], needle: str) -> None:
    kwargs: dict[str, object] = {"base_layer": nn.Linear(4, 4), "r": 2, "alpha": 4.0, **override}
    with pytest.raises(ValueError, match="Invalid LoRALinear arguments") as info:
        LoRALinear(**kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_validation_collects_every_problem() -> None:
    with pytest.raises(ValueError) as info:
        LoRALinear(nn.Conv2d(1, 1, 1), r=0, alpha=0.0, dropout=1.0)
    message = str(info.value)
    assert all(s in message for s in ("r=0", "alpha=0.0", "dropout=1.0", "base_layer=Conv2d"))


def _llama() -> nn.Module:
    return tiny_llama().eval()


def _gpt2() -> nn.Module:
    return tiny_gpt2().eval()


_adapt = adapt_randomly


@pytest.mark.parametrize(
    ("factory", "targets", "kwargs"),
    [
        (_llama, "all-linear", {}),
        (_llama, ["q_proj", "v_proj"], {"use_dora": True}),
        (_gpt2, "all-linear", {"use_rslora": True}),
        (_gpt2, ["c_attn"], {"use_dora": True}),
    ],
)
def test_merge_lora_round_trip(factory: Callable[[], nn.Module], targets: list[str], kwargs: object) -> None:
    plain = factory()
    types = {n: type(m) for n, m in plain.named_modules()}
    model = _adapt(copy.deepcopy(plain), targets, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        expected = model(IDS).logits
        assert not torch.allclose(expected, plain(IDS).logits, atol=1e-3)
        assert merge_lora(model) is model
        assert lora_modules(model) == []
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)
        assert merge_lora(model) is model  # a second call is a no-op
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)
    assert {n: type(m) for n, m in model.named_modules()} == types  # Linear stays Linear, Conv1D stays Conv1D
    fresh = factory()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, expected, atol=1e-5, rtol=0)


def test_merge_lora_on_a_single_wrapper_returns_the_base() -> None:
    layer = _wrapped("linear")
    expected = layer(_x())
    plain = merge_lora(layer)
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(_x()), expected, atol=1e-5, rtol=0)


def _quantized_linear() -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("lightning_adapt.quantize")
    torch.manual_seed(0)
    dense = nn.Linear(64, 16)
    layer = bnb.nn.Linear4bit(64, 16, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("use_dora", [False, True])
def test_quantized_base(use_dora: bool) -> None:
    layer = LoRALinear(_quantized_linear(), r=4, alpha=8.0, use_dora=use_dora)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(layer(x), layer.base_layer(x))
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    with pytest.raises(TypeError, match="merge_lora"):
        layer.merge()
    with torch.no_grad():
        expected = layer(x)
        model = merge_lora(nn.Sequential(layer))
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


def test_adapters_stay_fp32_when_the_module_is_cast_down_and_follow_up_casts() -> None:
    layer = LoRALinear(nn.Linear(IN, OUT), r=4, alpha=8.0, use_dora=True)
    before = [p.detach().clone() for p in layer.adapter_params()]
    layer.to(torch.bfloat16)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in layer.adapter_params())
    assert all(torch.equal(p, q) for p, q in zip(layer.adapter_params(), before, strict=True)), "no bf16 round trip"
    out = layer(_x().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    layer.double()
    assert layer.base_layer.weight.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in layer.adapter_params())


def test_inject_lora_twice_with_the_same_spec_is_a_no_op_and_another_spec_is_refused() -> None:
    from lightning_adapt.adapters.inject import LoRASpec, inject_lora
    from lightning_adapt.errors import ConfigError

    model = tiny_llama()
    spec = LoRASpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    names = inject_lora(model, spec)
    layers = {name: model.get_submodule(name) for name in names}
    assert inject_lora(model, LoRASpec(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"))) == names
    assert all(model.get_submodule(name) is layer for name, layer in layers.items()), "nothing re-wrapped"
    with pytest.raises(ConfigError) as info:
        inject_lora(model, LoRASpec(r=16, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    assert "r=4" in str(info.value) and "r=16" in str(info.value) and "Fix" in str(info.value)
    with pytest.raises(ConfigError, match="k_proj"):
        inject_lora(model, LoRASpec(r=4, alpha=8.0, target_modules=["k_proj"]))
    assert all(layer.r == 4 for layer in layers.values())


def test_inject_lora_on_hand_made_adapters_compares_their_rank() -> None:
    from lightning_adapt.adapters.inject import LoRASpec, inject_lora
    from lightning_adapt.errors import ConfigError

    model = nn.Sequential(LoRALinear(nn.Linear(IN, OUT), r=4, alpha=8.0))
    assert inject_lora(model, LoRASpec(r=4, alpha=8.0, target_modules=["0"])) == ["0"]
    with pytest.raises(ConfigError, match=r"r=\[4\]"):
        inject_lora(model, LoRASpec(r=8, alpha=8.0, target_modules=["0"]))
