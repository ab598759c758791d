"""Writes the chat example files of recipes/own-data/ from chatterbot-corpus (BSD), the packaged demo corpus:
the same conversations in three of the formats the field uses, so that each recipe reads a real file.

    .venv/bin/python recipes/own-data/data/derive_chat.py
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from lightning_adapt.data._common import packaged_path
from lightning_adapt.data.conversation import as_messages, read_chat_conversations

HERE = Path(__file__).parent
SYSTEM = "You are a friendly assistant. Answer briefly."

folder = packaged_path("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data/english", "data")
conversations = [as_messages(turns) for turns in read_chat_conversations(str(folder), None)]
conversations = [c for c in conversations if sum(len(m["content"]) for m in c) < 600]

# OpenAI messages, multi-turn, a system message on every fourth conversation
with (HERE / "chat-messages.jsonl").open("w") as f:
    for i, c in enumerate(conversations[:600]):
        messages = ([{"role": "system", "content": SYSTEM}] if i % 4 == 0 else []) + c
        f.write(json.dumps({"messages": messages}) + "\n")

# ShareGPT, a JSON array
roles = {"system": "system", "user": "human", "assistant": "gpt"}
sharegpt = [{"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in c]} for c in conversations[:600]]
(HERE / "chat-sharegpt.json").write_text(json.dumps(sharegpt, indent=0))

# TRL prompt/completion (strings), parquet: the first exchange of each conversation
pairs = [{"prompt": c[0]["content"], "completion": c[1]["content"]} for c in conversations[:600]]
datasets.Dataset.from_list(pairs).to_parquet(str(HERE / "chat-prompt-completion.parquet"))
print(len(conversations), "conversations")
