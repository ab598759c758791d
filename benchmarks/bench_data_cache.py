"""The data step of a recipe, first run against second run: the tokenization cache of ``datasets.map``.

Each run is a fresh process (as a second ``lightning-adapt fit`` of the same recipe is) that builds
``ChatDataModule(source=...)`` with SmolLM2's tokenizer and times ``setup("fit")``: reading the file, tokenizing
(first run) or memory-mapping the cached Arrow file (second run), the split and the response check. The file is
``recipes/own-data/data/chat-messages.jsonl`` repeated ``--repeat`` times (each copy its own records), in a
fresh ``HF_DATASETS_CACHE``; rounds alternate cold and warm.

    .venv/bin/python benchmarks/bench_data_cache.py                 # 600 x 20 = 12,000 conversations
    .venv/bin/python benchmarks/bench_data_cache.py --repeat 2 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "recipes" / "own-data" / "data" / "chat-messages.jsonl"

CHILD = """
import sys, time
from lightning_adapt.data import ChatDataModule
dm = ChatDataModule(tokenizer="smollm2-135m-instruct", source=sys.argv[1], max_length=96, val_size=64,
                    num_proc=int(sys.argv[2]) or None)
start = time.perf_counter()
dm.setup("fit")
print("SECONDS", time.perf_counter() - start, len(dm._splits["train"]))
"""


def one(data: Path, cache: Path, num_proc: int) -> tuple[float, int]:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(num_proc)], env=env, capture_output=True, text=True, check=True
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("SECONDS"))
    _, seconds, rows = line.split()
    return float(seconds), int(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-proc", type=int, default=0)
    args = parser.parse_args()
    lines = SOURCE.read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        records = [json.loads(x) for x in lines]
        with data.open("w") as f:
            for copy in range(args.repeat):
                for r in records:
                    r = {
                        "messages": [
                            *r["messages"][:-1],
                            {**r["messages"][-1], "content": f"{r['messages'][-1]['content']} ({copy})"},
                        ]
                    }
                    f.write(json.dumps(r) + "\n")
        cold, warm = [], []
        for k in range(args.rounds):
            cache = Path(tmp) / f"cache{k}"
            cold.append(one(data, cache, args.num_proc))
            warm.append(one(data, cache, args.num_proc))
    rows = cold[0][1]
    c, w = statistics.median(t for t, _ in cold), statistics.median(t for t, _ in warm)
    ratios = [wt / ct for (ct, _), (wt, _) in zip(cold, warm, strict=True)]
    print(
        f"{len(records) * args.repeat} conversations ({rows} training rows), num_proc={args.num_proc or 1}, "
        f"{args.rounds} rounds: first run {c:.2f}s, second run {w:.2f}s; second/first {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}..{max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
