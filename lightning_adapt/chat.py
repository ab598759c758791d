"""Talk to a fine-tuned causal LM: chat template, streamed tokens, greedy or sampled (no Lightning import).

``lightning-adapt chat`` (:meth:`lightning_adapt.cli.AdaptTrainer.chat`) builds the model from a recipe and a
checkpoint, or loads a merged directory, and hands it to :func:`run_chat`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from lightning_adapt.errors import ConfigError

#: Lines of the interactive loop that end it (besides end of input and Ctrl-C).
EXIT_WORDS = ("/exit", "/quit")
#: The line that clears the conversation history.
RESET_WORD = "/reset"


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate a reply: greedy when ``temperature`` is 0, else sampling with ``top_p``."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens={self.max_new_tokens} must be >= 1. Fix: --max_new_tokens=256.")
        if self.temperature < 0:
            raise ConfigError(
                f"--temperature={self.temperature} must be >= 0 (0: greedy). Fix: --temperature=0 or 0.7."
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p={self.top_p} must be in (0, 1]. Fix: --top_p=0.9 (1: no nucleus cut).")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``generate`` (greedy overrides any sampling default of the model)."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
                    "top_k": None}  # fmt: skip
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


class _Streamer:
    """A ``generate`` streamer that writes each finished piece of text to ``out`` and keeps the reply."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        from transformers import TextStreamer

        outer = self

        class _Text(TextStreamer):  # type: ignore[misc]
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                outer.pieces.append(text)
                out.write(text)
                out.flush()

        self.pieces: list[str] = []
        self.streamer = _Text(tokenizer, skip_prompt=True, skip_special_tokens=True)


def reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], options: GenerationOptions, out: TextIO) -> str:
    """Generate the assistant's answer to ``messages`` with the chat template, streaming it to ``out``."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:  # a tokenizer without a template: the plain concatenation of the turns
        encoded = tokenizer("\n".join(m["content"] for m in messages) + "\n", return_tensors="pt")
    device = next(model.parameters()).device
    encoded = {k: v.to(device) for k, v in encoded.items()}
    if options.seed is not None:
        torch.manual_seed(options.seed)
    stream = _Streamer(tokenizer, out)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        with torch.inference_mode():
            model.generate(**encoded, **options.generate_kwargs(), streamer=stream.streamer, pad_token_id=pad)
    except KeyboardInterrupt:  # Ctrl-C during a reply stops the reply, keeps what came so far
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return "".join(stream.pieces).strip()


def run_chat(
    model: Any,
    tokenizer: Any,
    options: GenerationOptions,
    prompt: str | None = None,
    system: str | None = None,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
) -> list[str]:
    """One reply to ``prompt``, or an interactive loop over the lines of ``stdin``; returns the replies.

    The loop keeps the conversation (``/reset`` clears it) and ends at end of input, ``/exit`` or Ctrl-C.
    """
    stdin = sys.stdin if stdin is None else stdin
    out = sys.stdout if out is None else out
    model.eval()
    start = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        return [reply(model, tokenizer, [*start, {"role": "user", "content": prompt}], options, out)]
    interactive = stdin.isatty()
    if interactive:
        out.write(f"Chat ({' or '.join(EXIT_WORDS)} or Ctrl-D to leave, {RESET_WORD} to start over)\n")
    history: list[dict[str, str]] = list(start)
    replies: list[str] = []
    while True:
        try:
            if interactive:
                out.write(">>> ")
                out.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        text = line.strip()
        if not line or text in EXIT_WORDS:
            out.write("\n" if interactive else "")
            return replies
        if not text:
            continue
        if text == RESET_WORD:
            history = list(start)
            continue
        history.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, history, options, out)
        history.append({"role": "assistant", "content": answer})
        replies.append(answer)
