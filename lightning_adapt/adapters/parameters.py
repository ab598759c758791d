"""LoRA on parameters read outside a Linear's forward (PEFT's ``target_parameters``): fused MoE experts. Pure torch.

transformers 5 keeps the experts of Mixtral / Qwen2-MoE as 3-D parameters (``experts.gate_up_proj``
``(E, 2·intermediate, hidden)``, ``experts.down_proj`` ``(E, hidden, intermediate)``) that the experts' own
forward indexes and hands to ``F.linear``: no ``nn.Linear`` runs, so ``target_modules`` cannot reach them.
:class:`LoRAParameters` wraps the module owning such parameters and, for the duration of its forward, lets it
read the adapted tensors under their own names (``torch.func.functional_call``)::

    2-D  W (out, in):      W' = W + scaling · B @ A                     A (r, in),    B (out, r)
    3-D  W (E, out, in):   W'[e] = W[e] + scaling · B_e @ A_e           A (r·E, in),  B (out, r·E)   (PEFT's layout)
         A_e = A.reshape(E, r, in)[e],  B_e = B.reshape(out, r, E)[:, :, e]
         an owner with ``is_transposed`` (transformers' flag) stores W as (E, in, out): W'[e] = W[e] + (B_e A_e)ᵀ

:meth:`merge` writes exactly the tensor the forward reads, so merged == unmerged, and a fresh adapter
(``B = 0``) reads ``W`` bit for bit. Keys: ``<owner>.base_layer.<param>`` (frozen), ``<owner>.lora_A.<param>`` and
``<owner>.lora_B.<param>`` (fp32, trained). Dropout is recorded but not applied (the update acts through the
weight, so there is no adapter input to drop; PEFT refuses dropout there). Quantization (QLoRA) never holds these
parameters: bitsandbytes' ``Linear4bit`` is a 2-D linear layer, so the experts stay in full precision beside the
4-bit layers.

Example:
    >>> experts = LoRAParameters(model.model.layers[0].mlp.experts, ["gate_up_proj"], r=4, alpha=8.0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Unpack, cast

import torch
from torch import nn
from torch.func import functional_call

from lightning_adapt.adapters.delta import InitMethod, init_lora_pair, lora_delta, parameter_problem
from lightning_adapt.adapters.kinds import AdapterOptions, WeightAdapter, _overwrite
from lightning_adapt.errors import ConfigError

__all__ = ["LoRAParameters"]


class LoRAParameters(WeightAdapter):
    """LoRA on named parameters of ``base_layer`` that its forward reads directly (see the module docstring).

    Args:
        base_layer: the module owning the parameters (e.g. a ``MixtralExperts``); it is frozen, not copied.
        names: its parameters to adapt, each 2-D ``(out, in)`` or 3-D ``(experts, out, in)``.
        r, alpha: as :class:`~lightning_adapt.adapters.lora.LoRALinear` (one ``A``/``B`` pair per expert for a 3-D
            parameter, each of rank ``r``).
        options: ``dropout`` (recorded, not applied: see the module docstring), ``init``, ``use_rslora``
            (:class:`~lightning_adapt.adapters.kinds.AdapterOptions`), as
            :class:`~lightning_adapt.adapters.kinds.WeightAdapter`.

    Raises:
        ConfigError: a name is not a 2-D or 3-D floating parameter of ``base_layer``.
    """

    def __init__(
        self, base_layer: nn.Module, names: Sequence[str], r: int, alpha: float, **options: Unpack[AdapterOptions]
    ) -> None:
        problems = [p for n in names if (p := parameter_problem(n, base_layer._parameters.get(n)))]
        if problems or not names:
            raise ConfigError(f"LoRAParameters({type(base_layer).__name__}, {list(names)}): {problems or 'no names'}")
        self.parameter_names = tuple(names)
        super().__init__(base_layer, r, alpha, **options)

    def add_factors(self, init: InitMethod) -> None:
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in self.parameter_names:
            experts, out, inp = self._dims(name)
            device, r = self._base(name).device, self.r
            self.lora_A[name] = nn.Parameter(torch.empty(r * experts, inp, device=device, dtype=torch.float32))
            self.lora_B[name] = nn.Parameter(torch.empty(out, r * experts, device=device, dtype=torch.float32))
            init_lora_pair(self.lora_A[name], self.lora_B[name], init, r)

    def _base(self, name: str) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer._parameters[name])

    def _transposed(self, name: str) -> bool:
        return self._base(name).dim() == 3 and bool(getattr(self.base_layer, "is_transposed", False))

    def _dims(self, name: str) -> tuple[int, int, int]:
        """``(experts, out, in)`` of the parameter ``name`` (``experts = 1`` for a 2-D one)."""
        shape = tuple(self._base(name).shape)
        if len(shape) == 2:
            return 1, shape[0], shape[1]
        return (shape[0], shape[2], shape[1]) if self._transposed(name) else (shape[0], shape[1], shape[2])

    def _factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``A``, ``B`` in ``dtype``: 2-D ``(r, in)``, ``(out, r)``; 3-D per expert ``(E, r, in)``, ``(E, out, r)``."""
        lora_a, lora_b = self.lora_A[name].to(dtype), self.lora_B[name].to(dtype)
        if self._base(name).dim() == 2:
            return lora_a, lora_b
        experts, out, _ = self._dims(name)
        return lora_a.reshape(experts, self.r, -1), lora_b.reshape(out, self.r, experts).permute(2, 0, 1)

    def delta(self, name: str) -> torch.Tensor:
        """``ΔW`` of the parameter ``name`` in its stored shape, fp32, differentiable in ``A`` and ``B``."""
        a, b = self._factors(name, torch.float32)
        if a.dim() == 2:
            return lora_delta(a, b, self.scaling)
        delta = self.scaling * torch.bmm(b, a)  # (E, out, in)
        return delta.transpose(1, 2) if self._transposed(name) else delta

    def merged_parameter(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """``W + ΔW`` of the parameter ``name`` (or of ``base``, same shape) in fp32, on the weight's device."""
        weight = self._base(name) if base is None else base
        if base is None and self.merged:
            return weight.float()
        return weight.float() + self.delta(name).to(weight.device)

    def effective(self, name: str) -> torch.Tensor:
        """What the owner reads as ``name``: ``W + ΔW`` in ``W``'s dtype (the parameter itself once merged).

        One fused ``addmm`` / ``baddbmm`` into a tensor of ``W``'s size and dtype: no fp32 copy of an expert stack
        (for a bf16 base, ``A`` and ``B`` enter in bf16, as autocast would); ``B = 0`` gives ``W`` exactly.
        """
        weight = self._base(name)
        if self.merged:
            return weight
        a, b = self._factors(name, weight.dtype)
        if weight.dim() == 2:
            return torch.addmm(weight, b, a, alpha=self.scaling)
        if self._transposed(name):  # W[e] (in, out) + (B_e A_e)ᵀ
            return torch.baddbmm(weight, a.transpose(1, 2), b.transpose(1, 2), alpha=self.scaling)
        return torch.baddbmm(weight, b, a, alpha=self.scaling)

    def merged_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        raise TypeError(f"LoRAParameters adapts {self.parameter_names}: use merged_parameter(name).")

    def merged_parameters(self) -> dict[str, Callable[[], torch.Tensor]]:
        """Every adapted parameter, merged (fp32), by name (:mod:`lightning_adapt.export.merged_state`)."""
        return {name: (lambda name=name: self.merged_parameter(name)) for name in self.parameter_names}  # type: ignore[misc]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every update into its parameter in place; a no-op if already merged."""
        if not self.merged:
            for name in self.parameter_names:
                _overwrite(self._base(name), self.effective(name))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` in place (``W = W' - ΔW``); a no-op if not merged."""
        if self.merged:
            for name in self.parameter_names:
                weight = self._base(name)
                _overwrite(weight, weight.float() - self.delta(name).to(weight.device))
            self.merged = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged:
            return self.base_layer(*args, **kwargs)
        adapted = {name: self.effective(name) for name in self.parameter_names}
        return functional_call(self.base_layer, adapted, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # What code around the owner reads of it (num_experts, act_fn, or a fused weight itself): the owner's
        # attributes, with the adapted tensors in place of the raw parameters.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith("_"):
                raise
        if name in self.__dict__.get("parameter_names", ()):
            return self.effective(name)
        return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"parameters={list(self.parameter_names)}, {super().extra_repr()}"
