"""Export: the PEFT-format adapter and the merged model, written as safetensors. Pure torch + safetensors.

* :mod:`.exporter`: :class:`ExportOptions`, :func:`export_model` (a live model merged), :func:`make_probe`, re-exports
  (the entry point);
* :mod:`.stream_export`: :func:`export_streamed`, a checkpoint's adapters merged into the base model's safetensors
  files as they stream by, with no model built, and when that applies;
* :mod:`.stream_merge`: its engine, the per-tensor merge loop and the :class:`Adapters` it folds in;
* :mod:`.adapter_sources`: the same adapters read from an adapter-only Lightning checkpoint or a PEFT directory;
* :mod:`.original`, :mod:`.report`: the original weights a model was loaded
  from; the QLoRA merge report, the memory report and :class:`ExportResult`;
* :mod:`.merged_state`: the in-memory merged tensors, computed lazily, under the original keys;
* :mod:`.peft_format`: PEFT's adapter layout, written and read back;
* :mod:`.safetensors_io`: the streaming sharded writer, the plain-read reader, atomic directories.
"""

from lightning_adapt.export.adapter_sources import adapters_from_checkpoint, adapters_from_peft
from lightning_adapt.export.exporter import *  # noqa: F403 - the exporter is this package's public face
from lightning_adapt.export.exporter import __all__ as _exporter_all
from lightning_adapt.export.peft_format import ModelFiles, load_adapter_weights, read_adapter, resolve_adapter_settings
from lightning_adapt.export.safetensors_io import model_keys
from lightning_adapt.export.stream_export import export_streamed
from lightning_adapt.export.stream_merge import Adapters

__all__ = [
    *_exporter_all,
    "Adapters",
    "ModelFiles",
    "adapters_from_checkpoint",
    "adapters_from_peft",
    "export_streamed",
    "load_adapter_weights",
    "model_keys",
    "read_adapter",
    "resolve_adapter_settings",
]
