"""PiSSA, OLoRA and LoftQ (``lora: init``): each against a reference computation, the base they change (float or
quantized, while loading or after), checkpoints that resume exactly, and the merge into the original weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from helpers.toy import ToyModule, loader, trainer
from safetensors.torch import save_file
from torch import nn

from lightning_adapt.adapters.init import compute_init, loftq, olora, pissa
from lightning_adapt.adapters.inject import LoRASpec, changed_base_layers, inject_lora
from lightning_adapt.adapters.lora import LoRALinear, lora_modules, prepare_base
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.quantize import QuantizeBaseCallback
from lightning_adapt.errors import ConfigError
from lightning_adapt.layers import dequantize_weight, is_quantized
from lightning_adapt.loading import WeightSource, empty_weights, load_pretrained, quant_plan
from lightning_adapt.quantize import QuantConfig, quantization_roundtrip

R, ALPHA = 4, 8.0
SCALE = ALPHA / R


def _weight(out: int = 48, inp: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) / 8


def _nf4(weight: torch.Tensor) -> torch.Tensor:
    """The reference round trip: bitsandbytes' functional NF4 (block 64, double quantization), fp32."""
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnb.functional.dequantize_4bit(packed, state).float()


def test_pissa_is_the_top_r_svd_split_evenly_and_the_rest_stays_in_the_base() -> None:
    w = _weight()
    init = pissa(w, R, SCALE)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    top = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
    torch.testing.assert_close(SCALE * init.lora_B @ init.lora_A, top, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(init.lora_A, torch.diag((s[:R] / SCALE).sqrt()) @ vh[:R])  # PEFT's pissa_init
    torch.testing.assert_close(init.lora_B, u[:, :R] @ torch.diag((s[:R] / SCALE).sqrt()))
    torch.testing.assert_close(init.base, w - top, atol=1e-6, rtol=1e-5)
    assert (init.base + SCALE * init.lora_B @ init.lora_A - w).abs().max() < 1e-6  # fp32 rounding only


def test_olora_is_the_first_r_columns_of_qr() -> None:
    w = _weight()
    init = olora(w, R, SCALE)
    q, upper = torch.linalg.qr(w)
    torch.testing.assert_close(init.lora_B, q[:, :R])
    torch.testing.assert_close(init.lora_A, upper[:R])
    torch.testing.assert_close(init.lora_B.T @ init.lora_B, torch.eye(R), atol=1e-5, rtol=0)  # orthonormal columns
    assert (init.base + SCALE * init.lora_B @ init.lora_A - w).abs().max() < 1e-6


def test_the_roundtrip_is_bitsandbytes_nf4() -> None:
    w = _weight()
    roundtrip = quantization_roundtrip(QuantConfig("nf4", compute_dtype=torch.float32), torch.float32)
    assert torch.equal(roundtrip(w), _nf4(w))


@pytest.mark.parametrize("iterations", [1, 5])
def test_loftq_fits_the_nf4_error_closer_than_nf4_alone(iterations: int) -> None:
    w = _weight(64, 128)
    init = loftq(w, R, SCALE, _nf4, iterations)
    plain = torch.linalg.norm(w - _nf4(w))
    fitted = torch.linalg.norm(w - (_nf4(init.base) + SCALE * init.lora_B @ init.lora_A))
    assert fitted < 0.97 * plain, (float(fitted), float(plain))
    if iterations == 1:  # one iteration: quantize W, then the best rank-r fit of its error
        assert torch.equal(init.base, w)
        u, s, vh = torch.linalg.svd(w - _nf4(w), full_matrices=False)
        torch.testing.assert_close(SCALE * init.lora_B @ init.lora_A, u[:, :R] @ torch.diag(s[:R]) @ vh[:R])


def test_loftq_iterations_fit_closer() -> None:
    w = _weight(64, 128)
    errors = [
        float(torch.linalg.norm(w - _nf4(i.base) - SCALE * i.lora_B @ i.lora_A))
        for i in (loftq(w, R, SCALE, _nf4, n) for n in (1, 5))
    ]
    assert errors[1] < errors[0]


def test_pissa_leaves_a_float_model_unchanged_at_step_0_and_merges_back_to_w() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    w = linear.weight.detach().clone()
    x = torch.randn(5, 64)
    before = linear(x)
    layer = LoRALinear(linear, R, ALPHA, init="pissa")
    assert (layer(x) - before).abs().max() < 1e-5
    assert not torch.equal(layer.base_layer.weight, w), "the base holds the residual"
    assert (layer.merged_weight() - w).abs().max() < 1e-6
    assert (layer.merged_weight_from_original(w) - w).abs().max() < 1e-6  # ΔW from the original: 0 at step 0
    torch.testing.assert_close(layer.lora_A0, layer.lora_A.weight, rtol=0, atol=0)
    with torch.no_grad():
        layer.lora_B.weight.add_(0.1)
    trained = layer.merged_weight()
    torch.testing.assert_close(layer.merged_weight_from_original(w), trained, atol=1e-6, rtol=0)
    lora_a, lora_b = layer.original_factors()  # a rank-2r LoRA on the original W, same scaling
    assert lora_a.shape == (2 * R, 64) and lora_b.shape == (48, 2 * R)
    torch.testing.assert_close(w + SCALE * lora_b @ lora_a, trained, atol=1e-6, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, trained, atol=1e-6, rtol=0)
    layer.unmerge()
    assert torch.allclose(layer(x), linear(x) + SCALE * layer.lora_B(layer.lora_A(x)), atol=1e-5)


def test_pissa_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48))
    reference = peft.get_peft_model(
        nn.Sequential(nn.Linear(64, 48)).requires_grad_(False),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], init_lora_weights="pissa"),
    )
    reference.base_model.model[0].base_layer.load_state_dict(net[0].state_dict())
    reference.base_model.model[0].pissa_init("default", "pissa")
    peft_layer = reference.base_model.model[0]
    ours = LoRALinear(net[0], R, ALPHA, init="pissa")
    torch.testing.assert_close(ours.lora_A.weight, peft_layer.lora_A["default"].weight)
    torch.testing.assert_close(ours.lora_B.weight, peft_layer.lora_B["default"].weight)
    torch.testing.assert_close(ours.base_layer.weight, peft_layer.base_layer.weight)


def _qlora(init: str, order: str = "quantize-first", **lora: Any) -> list[Any]:
    q = QuantizeBaseCallback(compute_dtype="fp32")
    adapt = LoRAInjectionCallback(r=R, alpha=ALPHA, dropout=0.0, target_modules=["q_proj", "v_proj"], init=init, **lora)
    return [q, adapt] if order == "quantize-first" else [adapt, q]


@pytest.mark.parametrize("order", ["quantize-first", "lora-first"])
@pytest.mark.parametrize("build_in", ["init", "configure_model"])
@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_qlora_quantizes_the_changed_base(init: str, build_in: str, order: str) -> None:
    originals = {n: m.weight.detach().clone() for n, m in ToyModule().named_modules() if isinstance(m, nn.Linear)}
    module = ToyModule(build_in=build_in)
    trainer(callbacks=_qlora(init, order), max_steps=1, limit_val_batches=0).validate(module, loader())
    adapted = changed_base_layers(module)
    assert len(adapted) == 4
    for name, layer in adapted:
        w = originals[name]
        assert is_quantized(layer.base_layer)
        a0, b0 = layer.lora_A0, layer.lora_B0
        assert a0 is not None and b0 is not None
        torch.testing.assert_close(layer.lora_A.weight, a0, rtol=0, atol=0)
        expected = {"pissa": pissa, "olora": olora}.get(init)
        q = dequantize_weight(layer.base_layer)
        if expected is not None:  # the base is quant(W - s·B0·A0)
            ref = expected(w, R, SCALE)
            torch.testing.assert_close(b0, ref.lora_B)
            assert torch.equal(q, _nf4(ref.base))
        else:  # LoftQ: Q + s·B0·A0 closer to W than plain NF4
            assert torch.linalg.norm(w - q - SCALE * b0 @ a0) < torch.linalg.norm(w - _nf4(w))


def _saved_net(path: Path) -> dict[str, torch.Tensor]:
    state = {k: v.contiguous() for k, v in ToyModule().net.state_dict().items()}  # type: ignore[union-attr]
    save_file(state, str(path))
    return state


class _Loaded(ToyModule):
    """ToyModule whose network is loaded with ``load_pretrained`` (quantizing while loading)."""

    def __init__(self, path: str = "") -> None:
        super().__init__(build_in="configure_model")
        self.path = path

    def configure_model(self) -> None:
        if self.net is not None:
            return
        with empty_weights():
            self.net = ToyModule(build_in="configure_model")._build()
        load_pretrained(self, WeightSource(self.path, prefix="net"), plan=quant_plan(self))


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_load_pretrained_computes_the_init_while_loading_with_the_same_bits(init: str, tmp_path: Path) -> None:
    _saved_net(tmp_path / "net.safetensors")
    loaded = _Loaded(str(tmp_path / "net.safetensors"))
    trainer(callbacks=_qlora(init), limit_val_batches=0).validate(loaded, loader())
    after = ToyModule()
    trainer(callbacks=_qlora(init), limit_val_batches=0).validate(after, loader())
    pairs = zip(changed_base_layers(loaded), changed_base_layers(after), strict=True)
    for (name, one), (_, other) in pairs:
        assert torch.equal(dequantize_weight(one.base_layer), dequantize_weight(other.base_layer)), name
        assert torch.equal(one.lora_B.weight, other.lora_B.weight) and torch.equal(one.lora_A0, other.lora_A0)


def test_changed_base_checkpoints_carry_a0_b0_and_resume_exactly(tmp_path: Path) -> None:
    def run(steps: int, ckpt: str | None, root: Path) -> tuple[ToyModule, Path]:
        module = ToyModule()
        t = trainer(root, callbacks=_qlora("loftq", "lora-first"), max_epochs=steps, limit_train_batches=2)
        t.fit(module, loader(), ckpt_path=ckpt)
        t.save_checkpoint(root / "last.ckpt")
        return module, root / "last.ckpt"

    straight, _ = run(4, None, tmp_path / "a")
    _, half = run(2, None, tmp_path / "b")
    resumed, _ = run(4, str(half), tmp_path / "c")
    for (name, layer), (_, other) in zip(lora_modules(straight), lora_modules(resumed), strict=True):
        assert torch.equal(layer.lora_B.weight, other.lora_B.weight), name
        assert torch.equal(layer.lora_B0, other.lora_B0), name
    kept = [layer.lora_B.weight.clone() for _, layer in lora_modules(resumed)]
    again = trainer(tmp_path / "c", callbacks=_qlora("loftq", "lora-first"), limit_val_batches=1)
    again.validate(resumed, loader())  # a repeated configure_model changes nothing
    again.predict(resumed, loader())
    assert all(torch.equal(k, layer.lora_B.weight) for k, (_, layer) in zip(kept, lora_modules(resumed), strict=True))
    state = torch.load(half, weights_only=True)["state_dict"]
    assert {k.rsplit(".", 1)[1] for k in state if ".q_proj." in k} >= {"lora_A0", "lora_B0"}
    assert not any(k.endswith("base_layer.weight") for k in state), "the quantized base is not saved"


def test_a_float_base_state_dict_reloads_strictly_with_a0_b0() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    inject_lora(model, LoRASpec(r=R, alpha=ALPHA, target_modules=["0"], init="olora"))
    state = model.state_dict()
    again = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    inject_lora(again, LoRASpec(r=R, alpha=ALPHA, target_modules=["0"], init="kaiming"))
    with pytest.raises(RuntimeError, match="lora_A0"):  # a plain adapter has no A0/B0: strict loading says so
        again.load_state_dict(state)
    fresh = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    inject_lora(fresh, LoRASpec(r=R, alpha=ALPHA, target_modules=["0"], init="olora"))
    fresh.load_state_dict(state)
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), model(x))


def test_bad_inits_name_the_argument_and_the_fix() -> None:
    with pytest.raises(ConfigError, match="init='loftq' fits the adapter"):
        LoRALinear(nn.Linear(16, 16), R, ALPHA, init="loftq")  # a float base: nothing to fit
    with pytest.raises(ConfigError, match="use_dora=True"):
        LoRALinear(nn.Linear(16, 16), R, ALPHA, init="pissa", use_dora=True)
    with pytest.raises(ConfigError, match=r"r=8: the rank must be <= min\(out, in\) = 4"):
        LoRALinear(nn.Linear(16, 4), 8, ALPHA, init="pissa")
    with pytest.raises(ConfigError, match="needs the full-precision weight"):
        prepare_base(_quantized(), "pissa", R, SCALE)
    with pytest.raises(ConfigError, match="applies to linear layers only"):
        inject_lora(nn.Sequential(nn.Embedding(10, 8)), LoRASpec(r=2, target_modules=["0"], init="pissa"))
    with pytest.raises(ConfigError, match="not one of"):
        compute_init("svd", _weight(), R, SCALE)
    with pytest.raises(ConfigError, match="adapter_path: the adapter was trained on the original base"):
        LoRAInjectionCallback(init="olora", adapter_path="any/peft/adapter")
    with pytest.raises(ConfigError) as err:
        LoRAInjectionCallback(init="pissa", loftq_iterations=0, lora_plus_ratio=-1.0)
    assert "lora.loftq_iterations=0" in str(err.value) and "lora.lora_plus_ratio=-1.0" in str(err.value)


def _quantized() -> nn.Module:
    from lightning_adapt.quantize import quantize_linear

    return quantize_linear(nn.Linear(64, 64), QuantConfig(compute_dtype=torch.float32))


def test_loftq_without_quantize_fails_before_training() -> None:
    lora = LoRAInjectionCallback(r=R, alpha=ALPHA, target_modules=["q_proj"], init="loftq")
    module = ToyModule()
    with pytest.raises(ConfigError, match="no quantize:"):
        trainer(callbacks=[lora], max_steps=1).fit(module, loader())
    assert not lora_modules(module), "refused before the model was touched"


def test_merge_on_save_writes_the_trained_model_on_the_original_weights(tmp_path: Path) -> None:
    """Through fit with QLoRA + PiSSA: merged = W + s·(B·A - B0·A0), W the original (spilled) weights."""
    from safetensors.torch import load_file

    from lightning_adapt.callbacks.merge import MergeOnSaveCallback

    originals = {n: m.weight.detach().clone() for n, m in ToyModule().named_modules() if isinstance(m, nn.Linear)}
    module = ToyModule()
    merge = MergeOnSaveCallback(str(tmp_path / "export"), evaluate=False)
    trainer(tmp_path, callbacks=[*_qlora("pissa"), merge], max_steps=2).fit(module, loader())
    merged = load_file(next((tmp_path / "export" / "merged").glob("*.safetensors")))
    for name, layer in changed_base_layers(module):
        a0, b0 = layer.lora_A0, layer.lora_B0
        assert a0 is not None and b0 is not None
        update = layer.lora_B.weight @ layer.lora_A.weight - b0 @ a0
        assert update.abs().max() > 0, "trained"
        want = originals[name] + SCALE * update
        torch.testing.assert_close(merged[name + ".weight"], want.detach(), atol=1e-6, rtol=0)
