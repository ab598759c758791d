"""``FullyShardCallback``: shard any LightningModule with FSDP2 (``fully_shard``) under ``ModelParallelStrategy``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from typing_extensions import override

from lightning_adapt.callbacks._transform import SHARD, ModelTransformCallback, check_same_base, transform_specs
from lightning_adapt.errors import ConfigError
from lightning_adapt.layers import quantized_layers
from lightning_adapt.shard4bit import is_4bit, make_shardable


@dataclass(frozen=True)
class ShardSpec:
    """How the model is sharded: ``layer_classes`` (class names) each get their own FSDP2 unit; ``None``:
    the children of the largest ``nn.ModuleList`` whose children share one class (none: no block units, each
    top-level submodule is one unit)."""

    layer_classes: tuple[str, ...] | None = None
    quantized: Literal["shard", "replicate"] = "shard"


class FullyShardCallback(ModelTransformCallback):
    """Shard parameters, gradients and optimizer state over the data-parallel ranks with FSDP2.

    Runs right after LoRA injection (FSDP2 must see the adapters it shards) and before the strategy
    sets up the optimizer: ``fully_shard`` is applied to every repeated block, then to each top-level
    submodule of the LightningModule that still holds unsharded parameters (the embeddings, the head).
    Each rank keeps ``1/N`` of every sharded tensor, frozen base included; a block's full weights exist
    only while it runs. Adapter-only checkpoints keep working: the state-dict hooks drop the frozen keys
    before FSDP2 gathers anything, and the base fingerprint is computed from the full values.

    QLoRA: the packed 4-bit codes are sharded too (``quantized="shard"``, bit-identical to one process; see
    :mod:`lightning_adapt.shard4bit`), or kept whole on every rank (``quantized="replicate"``; int8 always).

    Requires ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``. Outside a trainer (``lightning-adapt export`` rebuilding the model) it does nothing.

    Example::

        Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2,
                callbacks=[LoRAInjectionCallback(r=8), FullyShardCallback()])
    """

    name = "shard"
    priority = SHARD

    def __init__(
        self, layer_classes: list[str] | None = None, quantized: Literal["shard", "replicate"] = "shard"
    ) -> None:
        """
        Args:
            layer_classes: class names of the blocks that become one FSDP2 unit each (e.g.
                ``[LlamaDecoderLayer]``). ``None`` (default): the children of the largest ``nn.ModuleList``
                whose children share one class (the transformer layers of common models).
            quantized: QLoRA: ``shard`` (default) splits the packed 4-bit codes over the ranks like any other
                weight (their small quantization state stays whole on every rank); ``replicate`` keeps every
                quantized weight whole on every rank (no all-gather of the base: more memory, less traffic).
                int8 weights are always replicated.
        """
        super().__init__()
        if layer_classes is not None and (
            not layer_classes or not all(isinstance(c, str) and c for c in layer_classes)
        ):
            raise ConfigError(
                f"layer_classes={layer_classes!r}: expected a non-empty list of class names, e.g. "
                "[LlamaDecoderLayer]. Fix: list the block classes, or leave it unset to detect them."
            )
        if quantized not in ("shard", "replicate"):
            raise ConfigError(f"quantized={quantized!r}: expected 'shard' or 'replicate'. Fix: quantized: shard.")
        self._spec = ShardSpec(None if layer_classes is None else tuple(layer_classes), quantized)
        self._mesh: Any = None
        self._device = torch.device("cpu")
        self.sharded: list[str] = []

    @property
    @override
    def spec(self) -> ShardSpec:
        return self._spec

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, ModelParallelStrategy):
            raise ConfigError(
                f"shard: FullyShardCallback needs ModelParallelStrategy, got {type(strategy).__name__}. Fix: set "
                "trainer.strategy to lightning.pytorch.strategies.ModelParallelStrategy with "
                "data_parallel_size=<number of processes> and tensor_parallel_size=1, or remove shard:."
            )
        problems = _setup_problems(trainer, strategy)
        if problems:
            raise ConfigError("shard: " + " ".join(problems))
        self._mesh = strategy.device_mesh["data_parallel"]
        self._device = strategy.root_device
        super().setup(trainer, pl_module, stage)
        original = type(strategy).load_checkpoint.__get__(strategy)

        def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            path = Path(strategy.broadcast(checkpoint_path))
            if path.is_dir():  # a distributed checkpoint: keyed by name, loaded through the module's hooks
                loaded: dict[str, Any] = original(path, weights_only=weights_only)
                return loaded
            return _load_full_checkpoint(path, pl_module, strategy.optimizers, weights_only)

        # Lightning's own single-file loader bypasses the module's state-dict hooks (see _load_full_checkpoint);
        # an instance attribute, removed in teardown, like the configure_model wrapper of the transforms.
        strategy.__dict__["load_checkpoint"] = load_checkpoint

    @override
    def apply(self, module: nn.Module) -> list[str]:
        """Shard ``module`` in place (idempotent); returns the names of the FSDP2 units."""
        if self._mesh is None or any(isinstance(m, FSDPModule) for m in module.modules()):
            return self.sharded
        _check_shardable(module)
        _check_same_base(module, self._mesh)
        blocks = _blocks(module, self.spec.layer_classes)
        replicated = _prepare_quantized(module, self.spec.quantized, self._device)
        roots = [(n, m) for n, m in module.named_children() if _has_unsharded_params(m, blocks, replicated)]
        for _, unit in blocks + roots:
            fully_shard(unit, mesh=self._mesh, ignored_params=replicated or None)
        self.sharded = [name for name, _ in blocks + roots]
        return self.sharded

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A single-file save numbers the optimizer's parameters by their place in ``module.parameters()``,
        # frozen ones included; renumber them as a plain optimizer does, so any strategy can resume the file.
        order = {id(p): i for i, p in enumerate(pl_module.parameters())}
        for state, optimizer in zip(checkpoint.get("optimizer_states", []), trainer.optimizers, strict=False):
            if _numbered(state):
                _renumber(state, {order[id(p)]: i for i, p in enumerate(_params(optimizer))})
                for group in state["param_groups"]:  # a group's numbers count up in its own order
                    group["params"].sort()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        trainer.strategy.__dict__.pop("load_checkpoint", None)
        self._mesh = None


def _load_full_checkpoint(
    path: Path, module: nn.Module, optimizers: list[torch.optim.Optimizer], weights_only: bool | None
) -> dict[str, Any]:
    """Load a single-file checkpoint into the sharded ``module`` through its own ``load_state_dict``.

    Lightning's loader sets each parameter separately, so the module's state-dict hooks never run (an
    adapter-only file then fails strict loading on the frozen keys and skips the base check), and it maps
    a plain optimizer's parameter numbers onto ``module.parameters()``, frozen ones included (the wrong
    parameters as soon as one is frozen). Every rank reads the file: the base check runs on all of them.
    """
    checkpoint: dict[str, Any] = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
    strict = bool(getattr(module, "strict_loading", True))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(module, checkpoint.pop("state_dict"), options=options)
    names = {id(p): name for name, p in module.named_parameters()}
    for state, optimizer in zip(checkpoint.get("optimizer_states", []), optimizers, strict=False):  # none: validate
        if _numbered(state):
            _renumber(state, [names[id(p)] for p in _params(optimizer)])
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)
    return checkpoint


def _params(optimizer: torch.optim.Optimizer) -> list[Any]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _numbered(state: dict[str, Any]) -> bool:
    groups = state.get("param_groups") or [{}]
    return bool(groups[0].get("params")) and isinstance(groups[0]["params"][0], int)


def _renumber(state: dict[str, Any], new: Mapping[int, Any] | Sequence[Any]) -> None:
    """Re-key an optimizer state dict in place: ``new[old]`` for every parameter number."""
    state["state"] = {new[i]: value for i, value in state["state"].items()}
    for group in state["param_groups"]:
        group["params"] = [new[i] for i in group["params"]]


def _setup_problems(trainer: L.Trainer, strategy: ModelParallelStrategy) -> list[str]:
    """Every reason the run cannot be sharded as configured, each with its fix."""
    problems = []
    tp = strategy.device_mesh["tensor_parallel"].size()
    if tp > 1:
        problems.append(
            f"ModelParallelStrategy has tensor_parallel_size={tp}, but FullyShardCallback shards over the "
            "data_parallel dimension only and applies no tensor parallelism (ModelParallelStrategy() defaults to "
            "data_parallel_size=<nodes>, tensor_parallel_size=<devices per node>). Fix: "
            f"ModelParallelStrategy(data_parallel_size={strategy.world_size}, tensor_parallel_size=1)."
        )
    return problems


def _check_shardable(module: nn.Module) -> None:
    """Refuse what FSDP2 cannot shard or would silently break: 4-bit layers, a base left on the meta device
    (the strategy would re-initialise it randomly), trainable parameters of the LightningModule itself."""
    problems = []
    meta = [n for n, p in module.named_parameters() if p.is_meta]
    if meta:
        problems.append(
            f"{len(meta)} parameters are still on the meta device after configure_model (e.g. {meta[0]}); "
            "ModelParallelStrategy would re-initialise them randomly. Fix: load the weights in configure_model"
        )
    direct = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if direct:
        problems.append(
            f"trainable parameters registered on the LightningModule itself ({direct}) would not be synchronised "
            "(FSDP2 shards its submodules). Fix: move them into a submodule"
        )
    if problems:
        raise ConfigError("shard: " + "; ".join(problems) + ".")


def _check_same_base(module: nn.Module, mesh: Any) -> None:
    """Every rank shards its own copy of the frozen base, so the copies must be identical: compare checksums
    (before sharding: afterwards the mix of two bases would be one consistent-looking model)."""

    def gather(local: torch.Tensor) -> list[torch.Tensor]:
        local = local.to(mesh.device_type)
        gathered = [torch.empty_like(local) for _ in range(mesh.size())]
        dist.all_gather(gathered, local, group=mesh.get_group())
        return gathered

    check_same_base(module, gather, "FSDP2 shards each rank's own copy")


def _blocks(module: nn.Module, layer_classes: tuple[str, ...] | None) -> list[tuple[str, nn.Module]]:
    """The modules that become one FSDP2 unit each, innermost first (FSDP2 shards children before parents)."""
    if layer_classes is None:
        return _largest_uniform_list(module)
    found = [(n, m) for n, m in module.named_modules() if n and type(m).__name__ in layer_classes]
    missing = sorted(set(layer_classes) - {type(m).__name__ for _, m in found})
    if missing:
        counts = Counter(
            type(m).__name__ for n, m in module.named_modules() if n and next(m.parameters(), None) is not None
        )
        common = [name for name, count in counts.most_common() if count > 1][:8]
        raise ConfigError(
            f"shard: layer_classes {missing} match no module of {type(module).__name__}. Allowed: class names "
            f"of its modules; repeated ones: {common}. Fix: pick from those, or leave layer_classes unset."
        )
    return found[::-1]


def _largest_uniform_list(module: nn.Module) -> list[tuple[str, nn.Module]]:
    lists = [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1
    ]
    if not lists:
        return []
    name, best = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return [(f"{name}.{i}", child) for i, child in enumerate(best)]


def _has_unsharded_params(child: nn.Module, blocks: list[tuple[str, nn.Module]], replicated: set[nn.Parameter]) -> bool:
    inside = {id(p) for _, block in blocks for p in block.parameters()} | {id(p) for p in replicated}
    return any(id(p) not in inside for p in child.parameters())


def _prepare_quantized(module: nn.Module, how: str, device: torch.device) -> set[nn.Parameter]:
    """Make the 4-bit layers shardable (:mod:`lightning_adapt.shard4bit`) and return the quantized weights every
    rank keeps whole (``ignored_params``): int8 ones, and all of them when ``how`` is ``replicate``. FSDP2 would
    otherwise turn a bitsandbytes parameter into a plain one and lose its quantization state."""
    replicated: set[nn.Parameter] = set()
    for _, layer in quantized_layers(module):
        if how == "shard" and is_4bit(layer):
            make_shardable(layer, device)
        else:
            replicated.add(layer.get_parameter("weight"))
    return replicated


def estimate_sharding(trainer: L.Trainer) -> dict[str, Any]:
    """The estimator's per-rank settings for ``trainer``: FSDP2 when the model is sharded (``shard:``), else
    replicated (:class:`~lightning_adapt.memory.Assumptions` ``world_size``, ``strategy``, ``shard_quantized``)."""
    shard = next((spec for spec in transform_specs(trainer) if isinstance(spec, ShardSpec)), None)
    return {
        "world_size": trainer.world_size,
        "strategy": "ddp" if shard is None else "fsdp",
        "shard_quantized": shard is None or shard.quantized == "shard",
    }
