"""``LoRASpec``: the one LoRA settings type (and its defaults) of injection, checkpoints and export; light to import."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_adapt.adapters.delta import LoRAInit


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how; the arguments of :class:`~lightning_adapt.adapters.lora.LoRALinear` plus targeting.

    ``target_parameters`` names parameters read outside a Linear's forward (fused MoE experts), adapted by
    :class:`~lightning_adapt.adapters.parameters.LoRAParameters`; with it, ``target_modules=[]`` adapts no module.
    ``init`` ``pissa`` / ``olora`` / ``loftq`` change the base (:mod:`lightning_adapt.adapters.init`; LoftQ alternates
    ``loftq_iterations`` times). ``lora_plus_ratio`` (LoRA+): the learning rate of every ``B`` is that ratio times the
    one of its optimizer group (:func:`lightning_adapt.optim.split_lora_plus`); ``None``: one rate.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] | None = None
    exclude_modules: Sequence[str] = ()
    modules_to_save: Sequence[str] = ()
    init: LoRAInit = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    target_parameters: Sequence[str] = ()
    loftq_iterations: int = 1
    lora_plus_ratio: float | None = None
