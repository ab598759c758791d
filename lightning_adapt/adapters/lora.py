"""The LoRA / DoRA wrapper and its merge math. Pure torch: nothing here imports Lightning.

One wrapper, :class:`LoRALinear`, adapts any linear-like layer (``nn.Linear``, the GPT-2 style
``transformers`` ``Conv1D``, a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) by *wrapping* it:

    y = base_layer(x) + scaling · B(A(dropout(x)))            scaling = alpha / r  (alpha / √r with rsLoRA)

with ``A: (r, in)`` and ``B: (out, r)``. With DoRA (weight-decomposed LoRA) the adapted weight is

    W' = m · (W + ΔW) / ‖W + ΔW‖_row                           ΔW = scaling · B @ A

where ``m`` (``lora_magnitude_vector``, shape ``(out,)``) is trained and the row norm is treated as a
constant (detached), exactly as PEFT does.

Example:
    >>> layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8.0)
    >>> torch.equal(layer(torch.ones(2, 16)), layer.base_layer(torch.ones(2, 16)))  # B = 0 at init
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapt.adapters.delta import (
    Foldable,
    InitMethod,
    LoRAInit,
    init_lora_pair,
    keep_adapter_precision,
    lora_arg_problems,
    lora_delta,
    lora_layers,
    lora_scaling,
    merged_weight,
)
from lightning_adapt.adapters.dora import dora_delta
from lightning_adapt.adapters.init import (
    CHANGED_BASE_INITS,
    Roundtrip,
    compute_init,
    dora_problem,
    merged_from_original,
    original_factors,
    quantized_base_error,
    remember_pair,
    take_pair,
)
from lightning_adapt.errors import ConfigError
from lightning_adapt.layers import (
    base_weight,
    is_linear_like,
    is_plain_linear,
    layer_dims,
    layer_writer,
    linear_like_types,
)

__all__ = [
    "Foldable",
    "InitMethod",
    "LoRALinear",
    "add_lora_update",
    "keep_adapter_precision",
    "lora_delta",
    "lora_layers",
    "lora_modules",
    "lora_scaling",
    "merge_lora",
    "merged_weight",
    "prepare_base",
    "validate_lora_args",
]


def validate_lora_args(
    r: object, alpha: object, dropout: object, init: object = "kaiming", base_layer: nn.Module | None = None
) -> None:
    """Raise one :class:`~lightning_adapt.errors.ConfigError` listing every invalid LoRA argument (argument, value, allowed, fix)."""
    problems = lora_arg_problems(r, alpha, dropout, init)
    if base_layer is not None and not is_linear_like(base_layer):
        allowed = [t.__name__ for t in linear_like_types()]
        problems.append(
            f"base_layer={type(base_layer).__name__}: LoRA wraps linear-like layers only ({allowed}); "
            "target a Linear/Conv1D module instead (see lightning_adapt.adapters.targeting.find_targets)."
        )
    if problems:
        raise ConfigError("Invalid LoRALinear arguments:\n  - " + "\n  - ".join(problems))


def add_lora_update(
    result: torch.Tensor, projected: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``result + scaling · projected @ Bᵀ``, shapes ``(..., out)``, ``(..., r)``, ``(out, r)``; nothing in place.

    When the dtypes agree this is one ``addmm`` with ``alpha = scaling``: besides the output no ``tokens × out``
    tensor is made (the plain formula makes the update, the scaled update and the sum, and scales the
    ``tokens × out`` gradient again in backward); the scale lands on the ``r``-wide operands instead. Values
    agree with the plain formula within one rounding. Otherwise (a bf16 base, fp32 adapters) the update is
    made in the adapters' dtype and cast to ``result``'s, as before.
    """
    if result.dtype != projected.dtype:
        update: torch.Tensor = F.linear(projected, lora_B) * scaling
        return result + update.to(result.dtype)
    out = result.shape[-1]
    summed = torch.addmm(result.reshape(-1, out), projected.reshape(-1, projected.shape[-1]), lora_B.t(), alpha=scaling)
    return summed.view(result.shape)


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling · lora_B(lora_A(lora_dropout(x)))``; DoRA variant when ``use_dora``.

    The base layer is frozen (``requires_grad=False``); only :meth:`adapter_params` train. Adapter
    weights are fp32 on the base layer's device and stay fp32 when the module is cast to a lower
    precision (``module.to(torch.bfloat16)``, Lightning's ``bf16-true``); the adapter path runs in their
    dtype and is cast back to the base output dtype, so the same wrapper serves float, 4-bit and 8-bit bases. State-dict keys
    follow PEFT: ``base_layer.weight``, ``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``.

    Args:
        base_layer: The linear-like layer to adapt (``nn.Linear``, ``Conv1D``, bnb ``Linear4bit`` /
            ``Linear8bitLt``).
        r: Rank of the update ``ΔW = scaling · B @ A``; int >= 1.
        alpha: Scale numerator; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); > 0.
        dropout: Dropout probability on the adapter input only; ``0 <= dropout < 1``.
        init: ``"kaiming"`` (``kaiming_uniform_(A, a=sqrt(5))``) or ``"gaussian"`` (``A ~ N(0, 1/r)``),
            as PEFT: ``B = 0``, a fresh adapter is the identity. ``"pissa"``, ``"olora"``, ``"loftq"``
            (:mod:`.init`): ``A₀``, ``B₀`` from the weight, the base becomes ``W - scaling·B₀A₀`` (:func:`prepare_base`:
            here for a float base; a quantized one before quantization); buffers ``lora_A0``, ``lora_B0`` keep them.
        use_rslora: Rank-stabilised scaling ``alpha / sqrt(r)``.
        use_dora: Weight-decomposed LoRA: learn a per-output magnitude ``m`` initialised to ``‖W‖_row``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: LoRAInit = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        validate_lora_args(r, alpha, dropout, init, base_layer)
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.r = r
        self.alpha = float(alpha)
        self.scaling = lora_scaling(r, self.alpha, use_rslora)
        self.use_rslora = use_rslora
        self.merged = False
        in_features, out_features = layer_dims(base_layer)
        device = next(iter(base_layer.parameters())).device
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_A0: torch.Tensor | None
        self.lora_B0: torch.Tensor | None
        self._init_pair(init, use_dora)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:
            with torch.no_grad():
                # ‖W‖_row as the forward computes n = ‖W + ΔW‖_row (dora.py): a fresh adapter is then exactly the identity
                dense = base_weight(base_layer).to(device)
                wide = torch.float64 if dense.dtype == torch.float64 else torch.float32
                magnitude = dense.to(wide).pow(2).sum(dim=1).sqrt()
            self.lora_magnitude_vector = nn.Parameter(magnitude)
        # Row norm of W + ΔW captured at merge time: the only way to undo a DoRA merge exactly.
        self._merged_norm: torch.Tensor | None = None

    @torch.no_grad()
    def _init_pair(self, init: LoRAInit, use_dora: bool) -> None:
        """Random ``A``, ``B = 0``; or ``A₀``, ``B₀`` from the weight (prepared before quantization, or now)."""
        self.register_buffer("lora_A0", None)
        self.register_buffer("lora_B0", None)
        if init not in CHANGED_BASE_INITS:
            init_lora_pair(self.lora_A.weight, self.lora_B.weight, cast(InitMethod, init), self.r)
            return
        if problem := dora_problem(init, use_dora):
            raise ConfigError(f"Invalid LoRALinear arguments:\n  - {problem}")
        pair = take_pair(self.base_layer) or prepare_base(self.base_layer, init, self.r, self.scaling)
        for param, buffer, value in (
            (self.lora_A.weight, "lora_A0", pair[0]),
            (self.lora_B.weight, "lora_B0", pair[1]),
        ):
            param.copy_(value)
            setattr(self, buffer, value.clone().to(param.device))  # a registered buffer: in state dicts

    @property
    def changes_base(self) -> bool:
        """Whether the base is ``W - scaling·B₀A₀`` (PiSSA / OLoRA / LoftQ), not the original weight ``W``."""
        return self.lora_A0 is not None

    def original_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', B')``, ``B'A' = B A - B₀ A₀``: a rank-``2r`` LoRA on the original weight, same scaling (PEFT:
        ``r: 2r``, ``lora_alpha: 2·alpha``, ``√2·alpha`` with rsLoRA); ``(A, B)`` for an unchanged base."""
        if self.lora_A0 is None or self.lora_B0 is None:
            return self.lora_A.weight, self.lora_B.weight
        return original_factors(self.lora_A.weight, self.lora_B.weight, self.lora_A0, self.lora_B0)

    def merged_weight_from_original(self, original: torch.Tensor) -> torch.Tensor:
        """``W + scaling·(B A - B₀ A₀)``: merged into the original ``(out, in)`` weight (:func:`.init.merged_from_original`)."""
        return merged_from_original(
            original, self.lora_A.weight, self.lora_B.weight, self.lora_A0, self.lora_B0, self.scaling
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LoRALinear:
        keep_precision = keep_adapter_precision(fn)
        if recurse:
            self.base_layer._apply(fn)
            for child in (self.lora_A, self.lora_B, self.lora_dropout):
                child._apply(keep_precision)
        super()._apply(keep_precision, recurse=False)  # lora_magnitude_vector
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: modules that read ``layer.weight`` directly (T5 checks its dtype) keep working,
        as with PEFT's layers. It is the frozen base, not the adapted weight (see :meth:`merged_weight`)."""
        return cast(torch.Tensor, self.base_layer.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (or ``None``)."""
        return cast("torch.Tensor | None", getattr(self.base_layer, "bias", None))

    @property
    def in_features(self) -> int:
        return layer_dims(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return layer_dims(self.base_layer)[1]

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable adapter parameters: ``lora_A.weight``, ``lora_B.weight`` (+ DoRA magnitude)."""
        params = [cast(nn.Parameter, self.lora_A.weight), cast(nn.Parameter, self.lora_B.weight)]
        if self.lora_magnitude_vector is not None:
            params.append(self.lora_magnitude_vector)
        return params

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B @ A`` as an ``(out, in)`` fp32 tensor (plain LoRA update, not DoRA-aware)."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def _row_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # Detached: DoRA §4.3 / PEFT treat ‖W + ΔW‖ as a constant for the gradient.
        norm: torch.Tensor = torch.linalg.vector_norm(weight + delta.detach(), dim=1)
        return norm.detach()

    def merged_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(out, in)`` fp32 weight equivalent to the adapted layer (DoRA-aware).

        Args:
            base: merge into this ``(out, in)`` weight instead of the layer's own (e.g. the original
                full-precision weights of a quantized base); the result is on its device.
        """
        if base is None:
            weight = base_weight(self.base_layer)
            if self.merged:
                return weight
        else:
            weight = base
        return merged_weight(weight, self.lora_A.weight, self.lora_B.weight, self.scaling, self.lora_magnitude_vector)

    def _writer(self, action: str) -> Callable[[nn.Module, torch.Tensor], None]:
        write = layer_writer(self.base_layer)
        if write is None:
            raise TypeError(
                f"LoRALinear.{action}(): the base layer is {type(self.base_layer).__name__} (quantized), "
                "whose weight cannot be updated in place; call lightning_adapt.adapters.lora.merge_lora(model), "
                "which replaces it by an nn.Linear holding dequant(W) + ΔW."
            )
        return write

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the float base weight in place; a no-op if already merged."""
        write = self._writer("merge")
        if self.merged:
            return
        if self.lora_magnitude_vector is not None:
            self._merged_norm = self._row_norm(base_weight(self.base_layer), self.delta_weight())
        write(self.base_layer, self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` in place (``W = W' · ‖W+ΔW‖ / m - ΔW`` for DoRA); a no-op if not merged."""
        write = self._writer("unmerge")
        if not self.merged:
            return
        weight = base_weight(self.base_layer)
        if self.lora_magnitude_vector is not None:
            norm = self._merged_norm
            assert norm is not None  # invariant: merge() stores it for every DoRA layer
            weight = weight * (norm / self.lora_magnitude_vector.float()).view(-1, 1)
            self._merged_norm = None
        write(self.base_layer, weight - self.delta_weight())
        self.merged = False

    def _dora_delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``(m/‖W+ΔW‖ - 1) · W x + m/‖W+ΔW‖ · scaling · B A x`` (PEFT's DoRA, bias excluded); the norm
        without forming ``W + ΔW`` (:func:`lightning_adapt.adapters.dora.dora_delta`)."""
        assert self.lora_magnitude_vector is not None
        weight = base_weight(self.base_layer).to(x.dtype)  # read (dequantized) once per step
        dropout = self.lora_dropout if self.training else None
        adapter = (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scaling)
        return dora_delta(x, base_out, self.base_layer, weight, *adapter, dropout)

    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """``A · dropout(x)``: shape ``(..., r)``, in the adapters' dtype."""
        projected: torch.Tensor = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        return projected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x)
        if self.merged:
            return result
        if self.lora_magnitude_vector is None and is_plain_linear(self.lora_B):
            return add_lora_update(result, self.lora_input(x), self.lora_B.weight, self.scaling)
        if self.lora_magnitude_vector is None:  # lora_B wrapped or hooked (an FSDP1 unit): call it as a module
            update_b: torch.Tensor = self.lora_B(self.lora_input(x)) * self.scaling
            return result + update_b.to(result.dtype)
        update = self._dora_delta(x.to(self.lora_A.weight.dtype), result)
        return result + update.to(result.dtype)

    def merged_module(self) -> nn.Module:  # merge_lora: the float base after merge(), or a new nn.Linear
        return _plain_module(self)

    def extra_repr(self) -> str:
        changed = ", base=W-s·B0A0" if self.changes_base else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dora={self.use_dora}{changed}"


# --------------------------------------------------------------------------- model-level helpers


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(dotted name, module)`` of every :class:`LoRALinear` in ``model``, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def prepare_base(
    layer: nn.Module, method: str, r: int, scaling: float, roundtrip: Roundtrip | None = None, iterations: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute ``method``'s init (:func:`.init.compute_init`) from the full-precision linear-like ``layer``, write the
    changed base into it in place (its dtype) and leave ``(A (r, in), B (out, r))`` on it for the adapter (returned).
    Raises :class:`ConfigError` for a quantized ``layer`` (its full-precision weight is gone), or as ``compute_init``."""
    write = layer_writer(layer)
    if write is None:
        raise quantized_base_error(method, type(layer).__name__)
    init = compute_init(method, base_weight(layer), r, scaling, roundtrip, iterations)
    write(layer, init.base.to(next(iter(layer.parameters())).dtype))
    remember_pair(layer, (init.lora_A, init.lora_B))
    return init.lora_A, init.lora_B


def _compute_dtype(layer: LoRALinear) -> torch.dtype:
    base = layer.base_layer
    dtype, bias = getattr(base, "compute_dtype", None), getattr(base, "bias", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return bias.dtype if isinstance(bias, torch.Tensor) else layer.lora_A.weight.dtype


@torch.no_grad()
def _plain_module(layer: LoRALinear) -> nn.Module:
    """The merged replacement: the float base itself after :meth:`LoRALinear.merge` (type, dtype and
    bias kept), or a new ``nn.Linear`` of the compute dtype holding ``dequant(W) + ΔW``."""
    if layer_writer(layer.base_layer) is not None:
        layer.merge()
        return layer.base_layer
    weight = layer.merged_weight()
    bias = getattr(layer.base_layer, "bias", None)
    dtype = _compute_dtype(layer)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA wrapper (:class:`Foldable`: :class:`LoRALinear`, :mod:`.kinds`) in ``model`` in place by its
    base holding the merged weight (a float base keeps its type and bias, a quantized one becomes an ``nn.Linear`` of
    its compute dtype; keys as un-adapted). Again: a no-op. Returns ``model`` (or the plain module of a wrapper)."""
    if isinstance(model, Foldable):
        return model.merged_module()
    for name, layer in lora_layers(model):  # outermost: an attention's wrapper folds its out_proj's
        model.set_submodule(name, cast(Foldable, layer).merged_module())
    return model
