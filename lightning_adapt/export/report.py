"""What an export reports: QLoRA's original-vs-dequantized merge gap, and the memory it took. Pure torch.

* :func:`merge_report` (a live model): max ``|W'_original - W'_dequantized|`` over its quantized layers and,
  with a probe batch, the output difference;
* :class:`RequantizedGap` (no live model): the same max ``|ΔW|`` over the adapted layers a
  :class:`~lightning_adapt.quantize.QuantPlan` quantizes, each re-quantized from its original weight while
  it streams by; the probe needs a live model;
* :func:`merged_weights` / :func:`dense_layers` (a live model): one merge's weights, swapped in for the
  quantized layers (with their adapters) for a while: the probe here and the validation of each merge
  (:class:`~lightning_adapt.export.merge_eval.MergeEvaluation`, in :class:`ExportResult`);
* :class:`MemoryMeter` / :class:`ExportMemory`: peak resident memory above the export's start, next to the
  largest tensor (fp32) and the model size.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_adapt.adapters.lora import LoRALinear, merged_weight
from lightning_adapt.export.merge_eval import MergeEvaluation, available_bytes
from lightning_adapt.export.original import quantized_bases
from lightning_adapt.export.safetensors_io import SourceWeights
from lightning_adapt.layers import OUTPUT_HEAD_NAMES, as_stored, base_weight
from lightning_adapt.naming import under
from lightning_adapt.quantize import QuantPlan, quantize_linear

__all__ = [
    "ExportMemory",
    "ExportResult",
    "MemoryMeter",
    "MergeReport",
    "RequantizedGap",
    "dense_bytes",
    "dense_layers",
    "memory_meter",
    "merge_report",
    "merged_weights",
]


@dataclass(frozen=True)
class MergeReport:
    """How far merging into the original weights is from merging into the dequantized ones."""

    layers: int
    max_abs_dw: float
    worst_layer: str
    output_max_abs_diff: float | None = None
    scope: str = "quantized layers"
    probe_note: str | None = None

    def format(self) -> str:
        out = "" if self.output_max_abs_diff is None else f"; probe output max |Δy| = {self.output_max_abs_diff:.3e}"
        out += f"; {self.probe_note}" if self.probe_note else ""
        return (
            f"merge base original vs dequantized over {self.layers} {self.scope}: max |ΔW| = "
            f"{self.max_abs_dw:.3e} (worst {self.worst_layer}){out}"
        )


def _merged_pair(root: nn.Module, source: SourceWeights) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, original merge, dequantized merge)`` per quantized layer, one at a time, on the CPU."""
    pairs = zip(merged_weights(root, source), merged_weights(root, None), strict=True)
    for (name, original), (_, dequantized) in pairs:
        yield name, original.cpu(), dequantized.cpu()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _quantized(root: nn.Module, name: str) -> nn.Module:
    """The quantized layer ``name`` of ``root``: the layer itself, or the base of the adapter wrapping it."""
    layer = root.get_submodule(name)
    return layer.base_layer if isinstance(layer, LoRALinear) else layer


def _dense_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the quantized layer computes in (bitsandbytes' ``compute_dtype``), else fp32."""
    dtype = getattr(layer, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


@torch.no_grad()
def merged_weights(root: nn.Module, source: SourceWeights | None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, W')`` per quantized layer of ``root``, one at a time, on the layer's device, fp32: its adapter
    (if any) merged into the original weight read from ``source``, or into the dequantized weight when
    ``source`` is ``None``. A quantized layer without an adapter yields its original / dequantized weight."""
    for name, layer in quantized_bases(root):
        wrapper = root.get_submodule(name)
        device = _device(wrapper)
        base = as_stored(layer, source.get(name + ".weight").to(device)) if source is not None else None
        if isinstance(wrapper, LoRALinear) and base is not None and wrapper.changes_base:
            yield name, wrapper.merged_weight_from_original(base)  # W + s(BA - B0A0): PiSSA / OLoRA / LoftQ
        elif isinstance(wrapper, LoRALinear):
            yield name, wrapper.merged_weight(base)
        else:
            yield name, (base if base is not None else base_weight(layer)).float()


class _Dense(nn.Linear):
    """A quantized layer's dense stand-in: computes in its weight's dtype (the layer's compute dtype) and returns the
    input's dtype, as bitsandbytes' layers do (an fp32-compute layer in a bf16-true run gets and gives bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


@contextmanager
def dense_layers(root: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[None]:
    """Replace each named layer of ``root`` (an adapter wrapper included) by an ``nn.Linear`` holding the given
    ``(out, in)`` weight in the layer's compute dtype, frozen, with the layer's bias; restore them on exit.
    ``weights`` is consumed lazily, so only the dense copies are held, not the intermediates."""
    saved: dict[str, nn.Module] = {}
    try:
        for name, weight in weights:
            layer, base = root.get_submodule(name), _quantized(root, name)
            bias = getattr(base, "bias", None)
            dense = _Dense(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            dtype = _dense_dtype(base)
            dense.weight = nn.Parameter(weight.to(_device(layer), dtype), requires_grad=False)
            if bias is not None:
                dense.bias = nn.Parameter(bias.detach().to(_device(layer), dtype), requires_grad=False)
            dense.train(layer.training)
            saved[name] = layer
            root.set_submodule(name, dense)
        yield
    finally:
        for name, layer in saved.items():
            root.set_submodule(name, layer)


def dense_bytes(root: nn.Module) -> int:
    """Bytes the dense copies of ``root``'s quantized layers take (:func:`dense_layers`), plus the fp32
    intermediates of the largest one."""
    sizes = [
        (int(layer.out_features) * int(layer.in_features), _dense_dtype(layer).itemsize)
        for _, layer in quantized_bases(root)
    ]
    return sum(n * size for n, size in sizes) + 3 * 4 * max((n for n, _ in sizes), default=0)


def _probe_difference(
    root: nn.Module,
    probe: Callable[[], torch.Tensor],
    originals: dict[str, torch.Tensor],
    dequantized: dict[str, torch.Tensor],
) -> float:
    """Max ``|probe()|`` difference with the quantized layers replaced by each set of dense weights (eval mode)."""
    modes = [m.training for m in root.modules()]
    root.eval()
    try:
        with dense_layers(root, originals.items()):
            y_original = probe().float()
        with dense_layers(root, dequantized.items()):
            y_dequant = probe().float()
    finally:
        for module, mode in zip(root.modules(), modes, strict=True):
            module.training = mode
    return float((y_original - y_dequant).abs().max())


@torch.no_grad()
def merge_report(
    root: nn.Module, source: SourceWeights, probe: Callable[[], torch.Tensor] | None = None
) -> MergeReport:
    """Max ``|W'_original - W'_dequantized|`` over quantized layers and, with ``probe`` (a forward on a
    fixed batch), the max output difference. The probe holds both dense copies of the quantized layers (in their
    compute dtype) for a moment: without that memory free it is skipped, and the report says so. ``root`` is
    restored (modules and modes)."""
    need, free = 2 * dense_bytes(root), available_bytes(_device(root))
    note = None
    if probe is not None and free and need > 0.9 * free:
        probe, note = (
            None,
            f"probe skipped: both merges of the quantized layers need {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free",
        )
    worst, worst_name, count = 0.0, "", 0
    originals: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, original, dequant in _merged_pair(root, source):
        count += 1
        diff = float((original - dequant).abs().max())
        worst, worst_name = (diff, name) if diff >= worst else (worst, worst_name)
        if probe is not None:  # held in the dense layers' dtype, as dense_layers would convert them
            dtype = _dense_dtype(_quantized(root, name))
            originals[name], dequantized[name] = original.to(dtype), dequant.to(dtype)
    output = _probe_difference(root, probe, originals, dequantized) if probe is not None and count else None
    return MergeReport(count, worst, worst_name, output, probe_note=note)


class RequantizedGap:
    """An ``on_merge`` hook of :func:`~lightning_adapt.export.stream_merge.stream_merge`: for each adapted layer
    ``plan`` quantizes, re-quantize the original weight as the loader did (``quantize_linear`` of it in fp32),
    merge the adapter into its dequantized copy and keep the max ``|ΔW|`` to the original merge. Costs a few
    copies of one layer at a time; the un-adapted quantized layers and the probe need a live model."""

    def __init__(self, plan: QuantPlan) -> None:
        self.plan = plan
        self.worst, self.worst_name, self.count = 0.0, "", 0

    def selects(self, name: str) -> bool:
        """Whether ``plan`` quantizes layer ``name`` (its skips; output heads when it keeps the default skips)."""
        head = self.plan.include_default_skips and any(p in OUTPUT_HEAD_NAMES for p in name.split("."))
        return not head and not under(name, set(self.plan.skip_modules))

    @torch.no_grad()
    def __call__(self, name: str, original: torch.Tensor, layer: Any, merged: torch.Tensor) -> None:
        """``layer``: the :class:`~lightning_adapt.export.stream_merge.LayerAdapter` of ``name``."""
        if not self.selects(name):
            return
        weight = original.float().T if layer.conv1d else original.float()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        dequantized = base_weight(quantize_linear(linear, self.plan.config))
        del linear, weight
        redone = merged_weight(dequantized, layer.lora_A, layer.lora_B, layer.scaling, layer.magnitude)
        diff = float((redone - (merged.T if layer.conv1d else merged)).abs().max())
        self.count += 1
        self.worst, self.worst_name = (diff, name) if diff >= self.worst else (self.worst, self.worst_name)

    def report(self) -> MergeReport:
        return MergeReport(
            self.count, self.worst, self.worst_name, None, "adapted quantized layers (re-quantized one at a time)",
            "probe output difference: needs a live model (MergeOnSaveCallback at the end of fit)",
        )  # fmt: skip


# --------------------------------------------------------------------------- memory and the result


def _rss_kib(field_name: str) -> int:
    with contextlib.suppress(OSError, StopIteration, ValueError, IndexError):
        lines = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in lines if line.startswith(field_name + ":")).split()[1])
    return 0


@dataclass(frozen=True)
class ExportMemory:
    """Resident memory an export took, next to the sizes that bound it."""

    baseline_bytes: int
    peak_above_bytes: int
    largest_key: str = ""
    largest_fp32_bytes: int = 0
    model_bytes: int = 0
    exact: bool = True  # False: sampled every few ms (the process had peaked higher before)

    def format(self) -> str:
        mb = 1e6
        peak = f"{self.peak_above_bytes / mb:.1f} MB" + ("" if self.exact else " (sampled)")
        parts = [f"memory: peak RSS +{peak} above the export's start"]
        if self.largest_key:
            parts.append(f"largest tensor {self.largest_key} {self.largest_fp32_bytes / mb:.1f} MB in fp32")
        if self.model_bytes:
            parts.append(f"merged model {self.model_bytes / mb:.1f} MB")
        return "; ".join(parts)


def memory_meter(enabled: bool) -> contextlib.AbstractContextManager[MemoryMeter | None]:
    """A :class:`MemoryMeter` when ``enabled`` (``ExportOptions.measure_memory``), else nothing to measure."""
    return MemoryMeter() if enabled else contextlib.nullcontext()


class MemoryMeter:
    """Peak resident memory above the moment it is created, without touching the process's own peak (a
    memory report of the training run may still read it): when the export raises the process's high-water
    mark (``VmHWM``) the peak is exact; when an earlier peak was higher, a thread samples the RSS every
    few milliseconds instead (a lower bound, marked as sampled). Use it as a context manager."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.baseline, self.hwm_before = _rss_kib("VmRSS"), _rss_kib("VmHWM")
        self.sampled = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.sampled = max(self.sampled, _rss_kib("VmRSS"))

    def __enter__(self) -> MemoryMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.sampled = max(self.sampled, _rss_kib("VmRSS"))

    def result(self, largest_key: str = "", largest_fp32_bytes: int = 0, model_bytes: int = 0) -> ExportMemory:
        self.stop()
        hwm = _rss_kib("VmHWM")
        exact = hwm > self.hwm_before  # the export set the process's peak: VmHWM is its peak
        peak = hwm if exact else self.sampled
        return ExportMemory(
            1024 * self.baseline,
            1024 * max(0, peak - self.baseline),
            largest_key,
            largest_fp32_bytes,
            model_bytes,
            exact,
        )


@dataclass
class ExportResult:
    """What an export wrote, and how: ``streamed`` from the source files (a checkpoint's adapters), or merged
    from a live model."""

    dirpath: Path
    adapter: Path | None = None
    merged: Path | None = None
    gguf: list[Path] = field(default_factory=list)  # format='gguf': the model's file (and the adapter's)
    dropped_tied: list[str] = field(default_factory=list)
    report: MergeReport | None = None
    memory: ExportMemory | None = None
    streamed: bool = False
    evaluation: MergeEvaluation | None = None  # the trained model and both merges on the validation data
