"""Fused LoRA projections (lightning_adapt.adapters.fused): the same numbers, keys and files as unfused, and
no cached slice that survives a change of input, weights, mode or forward pass."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from toy import IDS, Block, ToyModule, adapt_randomly, loader, tiny_llama, trainer

from lightning_adapt.adapters.fused import SharedProjection, fuse_lora_projections, fused_groups
from lightning_adapt.adapters.inject import LoRASpec, inject_lora
from lightning_adapt.adapters.lora import LoRALinear, lora_modules
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.errors import ConfigError
from lightning_adapt.export.peft_format import adapter_state

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pair(dropout: float = 0.0, **fuse: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    plain = adapt_randomly(tiny_llama(), TARGETS, dropout=dropout)
    fused = copy.deepcopy(plain)
    fuse_lora_projections(fused, **fuse)  # type: ignore[arg-type]
    return plain.train(), fused.train()


def _step(model: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    logits = model(IDS).logits
    logits.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _assert_same_step(a: torch.nn.Module, b: torch.nn.Module, seed: int = 0) -> None:
    (out_a, grads_a), (out_b, grads_b) = _step(a, seed), _step(b, seed)
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys() and sum("lora_" in n for n in grads_a) == 2 * 14  # and the base's
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=0)


def test_groups_are_the_siblings_that_read_one_input() -> None:
    _, fused = _pair()
    assert fused_groups(fused) == [
        tuple(f"model.layers.{i}.{part}.{n}" for n in names)
        for i in range(2)
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
    ]
    fuse_lora_projections(fused, groups=())  # undone: idempotent re-configuration
    assert fused_groups(fused) == [] and not fused.model.layers[0].self_attn._forward_pre_hooks


def test_outputs_and_gradients_equal_unfused() -> None:
    plain, fused = _pair()
    _assert_same_step(plain, fused)
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, fused(IDS).logits)  # measured bit-identical in forward


def test_keys_weights_and_peft_export_are_unchanged() -> None:
    plain, fused = _pair()
    assert list(plain.state_dict()) == list(fused.state_dict())
    exported, reference = adapter_state(fused, []), adapter_state(plain, [])
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    fused.load_state_dict(plain.state_dict(), strict=True)


def test_peft_parity_holds_with_fusion() -> None:
    peft = pytest.importorskip("peft")
    plain = tiny_llama().eval()
    ours = adapt_randomly(copy.deepcopy(plain), TARGETS)
    assert fuse_lora_projections(ours)
    theirs = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, layer in lora_modules(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    (ours_out, ours_grads), (peft_out, peft_grads) = _step(ours), _step(theirs)
    torch.testing.assert_close(ours_out, peft_out, atol=1e-5, rtol=0)
    for name, _ in lora_modules(ours):
        key = f"base_model.model.{name}.lora_A.default.weight"
        torch.testing.assert_close(ours_grads[f"{name}.lora_A.weight"], peft_grads[key], atol=1e-5, rtol=1e-4)


def test_active_dropout_runs_unfused_with_the_same_masks() -> None:
    plain, fused = _pair(dropout=0.3)  # per_layer (default): same draws in the same order as unfused
    out_plain, _ = _step(plain, seed=4)
    out_fused, _ = _step(fused, seed=4)
    assert torch.equal(out_plain, out_fused)


def test_shared_dropout_draws_one_mask_per_group() -> None:
    block = Block(16)
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = LoRALinear(getattr(block, name), r=2, alpha=2.0, dropout=0.5)
        torch.nn.init.normal_(layer.lora_B.weight)
        setattr(block, name, layer)
    fuse_lora_projections(block, groups=[("q_proj", "k_proj", "v_proj")], dropout="shared")
    h = torch.randn(3, 16)
    torch.manual_seed(0)
    slices = [block.q_proj.lora_input(h), block.k_proj.lora_input(h), block.v_proj.lora_input(h)]
    torch.manual_seed(0)
    dropped = block.q_proj.lora_dropout(h)  # the one mask every member saw
    for layer, projected in zip((block.q_proj, block.k_proj, block.v_proj), slices, strict=True):
        torch.testing.assert_close(projected, dropped @ layer.lora_A.weight.T)
    block.eval()  # eval: dropout inactive, the fused result is the plain one
    q = block.q_proj
    torch.testing.assert_close(q(h), q.base_layer(h) + q.lora_B(q.lora_A(h)), atol=1e-6, rtol=0)


def _group(width: int = 8) -> tuple[Block, SharedProjection]:
    block = Block(width)
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(block, name, LoRALinear(getattr(block, name), r=2, alpha=2.0))
    fuse_lora_projections(block, groups=[("q_proj", "k_proj", "v_proj")])
    shared = block.q_proj.shared_projection
    assert isinstance(shared, SharedProjection)
    return block, shared


def test_a_slice_is_reused_only_for_the_same_tensor_weights_and_mode() -> None:
    block, shared = _group()
    h = torch.randn(4, 8)
    first = block.q_proj.lora_input(h)  # k, v pending: the slices are cached
    assert shared._entry is not None
    with torch.no_grad():
        block.k_proj.lora_A.weight.add_(1.0)  # an optimizer step or a load: A's version changes
    torch.testing.assert_close(block.k_proj.lora_input(h), h @ block.k_proj.lora_A.weight.T)
    other = h.clone()  # an equal but different tensor (cross-attention reads another one)
    torch.testing.assert_close(block.v_proj.lora_input(other), other @ block.v_proj.lora_A.weight.T)
    h.mul_(2.0)  # edited in place
    torch.testing.assert_close(block.q_proj.lora_input(h), h @ block.q_proj.lora_A.weight.T)
    with torch.no_grad():
        cached = block.q_proj.lora_input(h)
    assert not cached.requires_grad and block.k_proj.lora_input(h).requires_grad  # grad mode is part of the key
    assert first.requires_grad


def test_the_cache_lives_within_one_forward_of_the_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    block, shared = _group()
    h = torch.randn(4, 8)
    computed = []
    compute = SharedProjection._compute
    monkeypatch.setattr(SharedProjection, "_compute", lambda self, *a: computed.append(1) or compute(self, *a))
    block(h)
    assert len(computed) == 1 and shared._entry is None  # one matmul for three layers, then nothing kept
    block.q_proj(h)  # called alone: cached, then dropped when the parent runs again
    assert shared._entry is not None
    block(h).sum().backward()  # the parent's pre-hook forgets it: a fresh graph, backward works
    block(h).sum().backward()
    assert shared._entry is None


def test_copies_and_pickles_carry_no_cached_slice() -> None:
    block, shared = _group()
    block.q_proj(torch.randn(2, 8))
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        twin = clone.q_proj.shared_projection
        assert isinstance(twin, SharedProjection) and twin is not shared and twin._entry is None
        assert all(a is b for a, b in zip(twin.members, (clone.q_proj, clone.k_proj, clone.v_proj), strict=True))
        x = torch.randn(2, 8)
        torch.testing.assert_close(clone(x), block(x))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_gradients(reentrant: bool) -> None:
    plain, fused = _pair()
    for model in (plain, fused):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _assert_same_step(plain, fused)


def test_inject_lora_fuses_by_default_and_can_be_told_not_to() -> None:
    model = tiny_llama()
    inject_lora(model, LoRASpec(r=4, target_modules=TARGETS))
    assert len(fused_groups(model)) == 4
    inject_lora(model, LoRASpec(r=4, target_modules=TARGETS), fuse_projections=False)
    assert fused_groups(model) == []
    dora = tiny_llama()
    inject_lora(dora, LoRASpec(r=4, target_modules=TARGETS, use_dora=True))
    assert fused_groups(dora) == []  # DoRA keeps its own path


def test_the_callback_option_through_a_trainer(tmp_path: Path) -> None:
    module = ToyModule()
    callback = LoRAInjectionCallback(r=4, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(module, loader())
    assert [g[0] for g in fused_groups(module)] == ["net.layers.0.q_proj", "net.layers.1.q_proj"]
    unfused = ToyModule()
    off = LoRAInjectionCallback(r=4, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"], fuse_projections=False)
    trainer(tmp_path, max_steps=2, callbacks=[off]).fit(unfused, loader())
    assert fused_groups(unfused) == []
    trained = {k: v for k, v in module.state_dict().items() if "lora_" in k}
    assert trained.keys() == {k for k in unfused.state_dict() if "lora_" in k}


def test_the_callback_names_every_bad_mode() -> None:
    with pytest.raises(ConfigError, match=r"fused_dropout='both'.*\n.*compile='yes'"):
        LoRAInjectionCallback(fused_dropout="both", compile="yes")  # type: ignore[arg-type]


def test_a_hooked_or_wrapped_lora_a_runs_unfused() -> None:
    block, shared = _group()
    h = torch.randn(4, 8)
    seen: list[int] = []
    block.k_proj.lora_A.register_forward_pre_hook(lambda *_: seen.append(1))  # e.g. a sharding wrapper's gather
    block(h)
    assert seen == [1] and shared._entry is None  # its hook ran: every layer called its own lora_A
