"""Export: the PEFT-format adapter and the merged model, written as safetensors. Pure torch + safetensors.

* :mod:`.exporter`: :func:`export_model`, options, the QLoRA merge report (the entry point);
* :mod:`.merged_state`: the merged tensors, computed lazily, under the original keys;
* :mod:`.peft_format`: PEFT's adapter layout, written and read back;
* :mod:`.safetensors_io`: the streaming sharded writer, the source reader, atomic directories.
"""

from lightning_adapt.export.exporter import *  # noqa: F403 - the exporter is this package's public face
from lightning_adapt.export.exporter import __all__ as _exporter_all
from lightning_adapt.export.peft_format import load_adapter_weights, read_adapter, resolve_adapter_settings

__all__ = [*_exporter_all, "load_adapter_weights", "read_adapter", "resolve_adapter_settings"]
