"""Will LLaMA-2-7B fit? The fit check refuses its full fine-tuning before a weight is read (not in CI; trains nothing).

1. A random bf16 Llama of LLaMA-2-7B's shape (32 layers, hidden 4096, MLP 11008, 32 heads, 32,000-token vocabulary:
   6.74B parameters, 13.5 GB) is written into a temp dir one tensor at a time, with SmolLM2's tokenizer.
2. The fit check (``callbacks/fit_check.plan_fit``) judges ``recipes/chat/full.yaml`` and ``recipes/chat/qlora.yaml``
   on it at ``--trainer.precision bf16-true``, in this process, starting no fit: the estimate by component against
   this machine's free memory (a GPU's, or the available RAM on CPU).
3. Where full fine-tuning does not fit, ``lightning-adapt fit --config recipes/chat/full.yaml`` runs on it in a fresh
   process: it exits 2 with the check's message before the base is read; the script prints the message, the
   seconds it took and that process's peak resident memory (none of the 13.5 GB read). Where it would fit, the
   fit is not started (this script trains nothing).

Example:
    .venv/bin/python benchmarks/scale_7b.py               # ~3 min on 2 CPU cores, 13.5 GB of disk in a temp dir
    .venv/bin/python benchmarks/scale_7b.py --layers 2    # a quick look (0.9B parameters)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _models import write_random_llama  # the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
PEAK = (
    "import atexit, re, pathlib; atexit.register(lambda: print('VMHWM', re.search(r'VmHWM:\\s+(\\d+)', "
    "pathlib.Path('/proc/self/status').read_text()).group(1), flush=True)); from lightning_adapt.cli import main; main()"
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (LLaMA-2-7B: 32)")
    p.add_argument("--batch", type=int, default=1, help="data.batch_size")
    p.add_argument("--seq", type=int, default=4096, help="data.max_length (LLaMA-2's context: 4096)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the model (default: a temp dir, removed)")
    p.add_argument("--reuse", action="store_true", help="--dir holds the model already")
    return p.parse_args(argv)


def write_model(path: Path, layers: int) -> None:
    from transformers import AutoTokenizer

    from lightning_adapt.models import resolve_model

    write_random_llama(path, 4096, 11008, layers, 32, 32, 32000, max_shard_size=5 * 10**9)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct")).save_pretrained(path)  # vocabulary unused


def options(path: Path, args: argparse.Namespace) -> list[str]:
    return [
        f"--model.init_args.model_name_or_path={path}",
        "--trainer.precision=bf16-true",
        f"--data.init_args.batch_size={args.batch}",
        f"--data.init_args.max_length={args.seq}",
    ]


def verdicts(path: Path, args: argparse.Namespace) -> dict[str, str]:
    """Each recipe's verdict and its one-line summary, from the fit check before a fit (none is started)."""
    from lightning_adapt.callbacks.fit_check import plan_fit
    from lightning_adapt.checks import quiet_libraries
    from lightning_adapt.cli import AdaptCLI

    quiet_libraries()
    found = {}
    for recipe in ("full", "qlora"):
        cli = AdaptCLI(args=["--config", f"recipes/chat/{recipe}.yaml", *options(path, args)], run=False)
        check, why = plan_fit(cli.trainer, cli.model, cli.datamodule)
        found[recipe] = f"{check.verdict}: {check.summary()}" if check is not None else f"not checked: {why}"
    return found


def refuse(path: Path, args: argparse.Namespace, work: Path) -> None:
    cmd = [sys.executable, "-c", PEAK, "fit", "--config", "recipes/chat/full.yaml", *options(path, args)]
    cmd += [f"--trainer.logger.init_args.save_dir={work / 'logs'}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    text = done.stdout + done.stderr
    message = text[text.index("lightning-adapt: error:") :] if "lightning-adapt: error:" in text else text[-3000:]
    peak = int(re.findall(r"VMHWM (\d+)", text)[-1]) * 1024
    print(f"\n$ lightning-adapt fit --config recipes/chat/full.yaml {' '.join(options(path, args))}")
    print(message.split("\nVMHWM")[0].rstrip())
    print(
        f"exit {done.returncode} after {seconds:.1f}s; that process's peak RSS {peak / 1e9:.2f} GB (the weights: 13.5 GB)"
    )
    if done.returncode != 2 or "lightning-adapt: loaded" in text or (work / "logs").exists():
        raise SystemExit("FAILED: the run was not refused with one message before its base was read, writing nothing")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="scale-7b-"))
    path = args.dir or work / "model"
    try:
        if not args.reuse:
            start = time.perf_counter()
            write_model(path, args.layers)
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            print(f"wrote {size / 1e9:.2f} GB of random bf16 weights to {path} in {time.perf_counter() - start:.0f}s")
        found = verdicts(path, args)
        for recipe, verdict in found.items():
            print(f"{recipe}: {verdict}")
        if found["full"].startswith("does not fit"):
            refuse(path, args, work)
        else:
            print("full fine-tuning fits this machine: no fit started (this script trains nothing)")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a --dir model is kept


if __name__ == "__main__":
    main()
