"""QLoRA on a ≥1B-parameter model, through the CLI, on this machine: the run never holds the model in 16 or 32 bits.

1. A random-initialised Llama with real shapes (default: TinyLlama's layers with SmolLM2's 49,152-token
   vocabulary, 1.17B parameters) is written as a bf16 safetensors directory in a temp dir, one tensor at a
   time, with SmolLM2's tokenizer and chat template.
2. ``lightning-adapt fit --config recipes/chat/qlora.yaml --trainer.precision bf16-true`` fine-tunes it for a
   few steps in a fresh process (NF4 base quantized while loading, fp32 LoRA adapters, 8-bit AdamW), with
   an adapter-only checkpoint.
3. The run's peak resident memory (VmHWM of the training process: the parent imports no torch) is printed
   beside the checkpoint's size on disk; the demo fails unless the peak is below it.

Example:
    .venv/bin/python benchmarks/big_qlora_demo.py                 # ~1.17B params, 2.3 GB bf16; a few minutes
    .venv/bin/python benchmarks/big_qlora_demo.py --layers 2      # a quick look (small model)
    .venv/bin/python benchmarks/big_qlora_demo.py --init loftq    # LoftQ computed layer by layer while loading
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK = "import atexit, re, pathlib; atexit.register(lambda: print('VMHWM', re.search(r'VmHWM:\\s+(\\d+)', pathlib.Path('/proc/self/status').read_text()).group(1), flush=True)); from lightning_adapt.cli import main; main()"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="bf16-true", help="trainer.precision: bf16-true, or 32-true (fp32 compute)")
    p.add_argument("--init", default="kaiming", help="lora.init: kaiming (plain QLoRA), pissa, olora or loftq")
    p.add_argument("--loftq-iterations", type=int, default=1)
    p.add_argument("--dir", type=Path, default=None, help="where to write the model (default: a temp dir)")
    p.add_argument("--log", type=Path, default=None, help="keep the training run's output here")
    p.add_argument("--reuse", action="store_true", help="--dir holds the model already")
    return p.parse_args(argv)


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def write_model(args: argparse.Namespace, path: Path) -> dict[str, int]:
    """The random bf16 model and SmolLM2's tokenizer, in a worker process (this one stays small)."""
    shape = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--intermediate", str(args.intermediate)]
    shape += ["--vocab", "49152", "--heads", "32", "--kv-heads", "4"]
    path.mkdir(parents=True, exist_ok=True)
    gen = [sys.executable, str(Path(__file__).parent / "bench_load.py"), "--worker", "generate", str(path), "2"]
    gen.append(json.dumps(shape))
    info = json.loads(_run(gen).strip().splitlines()[-1])
    tokenizer = ["-c", "from transformers import AutoTokenizer; from lightning_adapt.models import resolve_model; "
                 f"AutoTokenizer.from_pretrained(resolve_model('smollm2-135m-instruct')).save_pretrained({str(path)!r})"]  # fmt: skip
    _run([sys.executable, *tokenizer])
    return info  # type: ignore[no-any-return]


def _info(path: Path) -> dict[str, int]:
    worker = [sys.executable, str(Path(__file__).parent / "bench_load.py"), "--worker", "generate-info", str(path)]
    return json.loads(_run(worker).strip().splitlines()[-1])  # type: ignore[no-any-return]


def fit(path: Path, out: Path, args: argparse.Namespace) -> tuple[int, str]:
    """Peak resident bytes of the training process, and its output."""
    cmd = [sys.executable, "-c", PEAK, "fit", "--config", "recipes/chat/qlora.yaml"]
    cmd += [f"--lora.init_args.init={args.init}", f"--lora.init_args.loftq_iterations={args.loftq_iterations}"]
    cmd += [f"--model.init_args.model_name_or_path={path}", f"--trainer.precision={args.precision}"]
    cmd += [f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0"]
    cmd += ["--data.init_args.batch_size=2", "--data.init_args.max_length=48", "--data.init_args.val_size=4"]
    cmd += [f"--trainer.logger.init_args.save_dir={out}", "--trainer.enable_progress_bar=false"]
    cmd += [
        "--model.init_args.activation_checkpointing=true"
    ]  # as QLoRA is run: block inputs kept, not every activation
    cmd += ["--merge=null"]  # export is issue 16's streaming path: measured by benchmarks/bench_export.py
    text = _run(cmd)
    return int(re.findall(r"VMHWM (\d+)", text)[-1]) * 1024, text


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="big-qlora-"))
    path = args.dir or work / "model"
    try:
        start = time.perf_counter()
        info = _info(path) if args.reuse else write_model(args, path)
        print(f"wrote {info['params'] / 1e9:.2f}B parameters, {info['bytes'] / 1e9:.2f} GB of bf16 safetensors "
              f"in {time.perf_counter() - start:.0f}s")  # fmt: skip
        start = time.perf_counter()
        peak, text = fit(path, work / "logs", args)
        seconds = time.perf_counter() - start
        ckpts = sorted((work / "logs").rglob("*.ckpt"))
        (work / "fit.log").write_text(text)
        if args.log:
            shutil.copy(work / "fit.log", args.log)
        for line in text.splitlines():
            if "lightning-adapt: loaded" in line or ("quantized" in line and "layers" in line) or "val_ppl" in line:
                print("  " + line.strip())
        print(f"QLoRA fit (init {args.init}, {args.steps} steps, {args.precision}) in {seconds:.0f}s: peak resident memory "
              f"{peak / 1e9:.2f} GB vs the bf16 checkpoint on disk {info['bytes'] / 1e9:.2f} GB "
              f"(ratio {peak / info['bytes']:.2f}); adapter-only checkpoint {ckpts[-1].stat().st_size / 1e6:.1f} MB")  # fmt: skip
        if peak >= info["bytes"]:
            raise SystemExit("FAILED: the run's peak resident memory is not below the bf16 checkpoint's size")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a --dir model is kept


if __name__ == "__main__":
    main()
