"""GGUF export benchmark: ``format: gguf`` on a ≥1B-parameter base, its peak memory against its largest tensor.

Claim checked: the GGUF export (``ExportOptions(format="gguf")``: the merged safetensors streamed into the export's
temporary directory, then each tensor converted and written alone) never holds the model: its peak resident memory
stays within 3x the largest tensor in fp32. The base is bench_export.py's TinyLlama-shaped random Llama (hidden 2048,
22 layers, GQA 32/4, intermediate 5632) with SmolLM2's real tokenizer (so its vocabulary, 49152: 1.17B parameters,
2.3 GB in bf16) and a random PEFT LoRA (r=16 on q/k/v/o). The export runs in a fresh process; its peak is ``VmHWM``
(restarted after the imports) minus the RSS after the imports.

Example:
    .venv/bin/python benchmarks/bench_gguf_export.py                      # ~5 min on 2 CPU cores, 8 GB of disk
    .venv/bin/python benchmarks/bench_gguf_export.py --layers 2 --type q8_0   # a quick, smaller run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_export


def _worker(base: Path, adapter: Path, out: Path, gguf_type: str) -> None:
    import gc

    import torch

    from lightning_adapt.export.adapter_sources import adapters_from_peft
    from lightning_adapt.export.exporter import ExportOptions
    from lightning_adapt.export.safetensors_io import model_keys, read_index
    from lightning_adapt.export.stream_export import export_streamed
    from lightning_adapt.resources import current_rss_bytes, peak_rss_bytes

    torch.set_num_threads(2)
    gc.collect()
    baseline = current_rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    keys = model_keys(read_index(base))
    options = ExportOptions(format="gguf", gguf_type=gguf_type, measure_memory=True)  # type: ignore[arg-type]
    result = export_streamed(base, out, adapters_from_peft(adapter, keys), options, keys=keys)
    seconds = time.perf_counter() - start
    assert result.memory is not None
    report = {"peak": peak_rss_bytes() - baseline, "seconds": seconds, "largest_fp32": result.memory.largest_fp32_bytes}
    report |= {"files": {p.name: p.stat().st_size for p in result.gguf}}
    print("RESULT " + json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(*map(Path, args.worker), args.type)
        return
    from lightning_adapt.models import resolve_model

    tokenizer = Path(resolve_model("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        base, adapter, out = Path(tmp, "base"), Path(tmp, "adapter"), Path(tmp, "out")
        shape = argparse.Namespace(hidden=2048, intermediate=5632, layers=args.layers, heads=32, kv_heads=4,
                                   vocab=49152, max_shard_size="5GB", r=16)  # fmt: skip
        params = bench_export._generate(shape, base, adapter)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer / name).is_file():
                shutil.copy(tokenizer / name, base / name)
        command = [sys.executable, __file__, "--type", args.type, "--worker", str(base), str(adapter), str(out)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if done.returncode or line is None:
            raise SystemExit(f"the export failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        result = json.loads(line.removeprefix("RESULT "))
    mb = 1e6
    print(
        f"{params / 1e9:.2f}B parameters, GGUF {args.type}: peak RSS +{result['peak'] / mb:,.0f} MB above the "
        f"post-import baseline = {result['peak'] / result['largest_fp32']:.2f}x the largest tensor in fp32 "
        f"({result['largest_fp32'] / mb:,.0f} MB; target <= 3); {result['seconds']:.0f} s; files "
        + ", ".join(f"{n} {s / mb:,.0f} MB" for n, s in result["files"].items())
    )


if __name__ == "__main__":
    main()
