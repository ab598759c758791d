"""The tokenizer of a GGUF file, read from a Hugging Face ``tokenizer.json`` (pure standard library + ``gguf``).

llama.cpp tokenizes by itself from what the file holds::

    tokenizer.ggml.model       "gpt2": byte-level BPE (SmolLM2, Qwen2, Llama 3)
    tokenizer.ggml.pre         which pre-tokenizer regex llama.cpp applies (chosen from tokenizer.json's own)
    tokenizer.ggml.tokens      one string per embedding row (rows past the tokenizer: ``[PAD<id>]``, unused)
    tokenizer.ggml.token_type  normal / control (special added tokens) / user-defined (other added tokens)
    tokenizer.ggml.merges, the bos/eos/unk/pad ids, add_bos/add_eos, tokenizer.chat_template
                               through ``gguf.SpecialVocab`` (tokenizer.json, tokenizer_config.json,
                               chat_template.jinja, config.json)

SentencePiece-style tokenizers (Llama 2, Mistral: BPE with byte fallback) are refused with one line: llama.cpp
needs their piece scores, which ``tokenizer.json`` does not hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_adapt.errors import ExportError

if TYPE_CHECKING:
    import gguf

__all__ = ["add_tokenizer", "pre_tokenizer_name"]

_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

#: tokenizer.json's pre-tokenizer steps -> the llama.cpp pre-tokenizer that splits text the same way
_PRE_TOKENIZERS: dict[tuple[tuple[str, object], ...], str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # gguf.TokenType's values


def _step(pre: dict[str, Any]) -> tuple[str, object]:
    kind = str(pre.get("type"))
    if kind == "ByteLevel":
        return kind, bool(pre.get("use_regex", True))
    if kind == "Digits":
        return kind, bool(pre.get("individual_digits", False))
    if kind == "Split":
        return kind, (pre.get("pattern") or {}).get("Regex")
    return kind, None


def pre_tokenizer_name(tokenizer: dict[str, Any], file: Path) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the pre-tokenizer of the parsed ``tokenizer.json``.

    Raises:
        ExportError: a pre-tokenizer llama.cpp has no equivalent for here, naming the supported ones.
    """
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = tuple(_step(p) for p in (pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]))
    if steps not in _PRE_TOKENIZERS:
        raise ExportError(
            f"source_dir: {file} splits text with a pre-tokenizer llama.cpp is not told about here "
            f"({[kind for kind, _ in steps]}); supported: byte-level BPE as in GPT-2, SmolLM2, Llama 3 and Qwen2 "
            f"({sorted(set(_PRE_TOKENIZERS.values()))}). Fix: export --format safetensors and convert it with "
            "llama.cpp's convert_hf_to_gguf.py."
        )
    return _PRE_TOKENIZERS[steps]


def _read_tokenizer(source_dir: Path) -> tuple[dict[str, Any], Path]:
    file = source_dir / "tokenizer.json"
    if not file.is_file():
        raise ExportError(
            f"source_dir={str(source_dir)!r} has no tokenizer.json: a GGUF file carries its tokenizer (vocab, merges, "
            "special tokens, chat template). Fix: save the tokenizer beside the weights "
            "(tokenizer.save_pretrained(source_dir)), or export from the base model's own directory."
        )
    tokenizer: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (tokenizer.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise ExportError(
            f"source_dir: {file} is a {model.get('type')} tokenizer"
            f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}; the GGUF export "
            "writes byte-level BPE tokenizers (SmolLM2, Qwen2, Llama 3). Fix: export --format safetensors and convert "
            "it with llama.cpp's convert_hf_to_gguf.py."
        )
    return tokenizer, file


def token_table(tokenizer: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    """``(tokens, token types)`` for ids ``0..n_vocab-1``: the BPE vocabulary, the added tokens over it (special:
    control, others: user-defined), ``[PAD<id>]`` (unused) for embedding rows the tokenizer never produces."""
    tokens: dict[int, str] = {int(i): text for text, i in tokenizer["model"]["vocab"].items()}
    types = dict.fromkeys(tokens, _NORMAL)
    for added in tokenizer.get("added_tokens") or []:
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = _CONTROL if added.get("special") else _USER_DEFINED
    beyond = sorted(i for i in tokens if i >= n_vocab)
    if beyond:
        raise ExportError(
            f"source_dir: the tokenizer has token ids {beyond[:5]} beyond the embedding's {n_vocab} rows. Fix: export "
            "with the tokenizer the model was trained with (resize the embeddings when adding tokens)."
        )
    ids = range(n_vocab)
    return [tokens.get(i, f"[PAD{i}]") for i in ids], [types.get(i, _UNUSED) for i in ids]


def add_tokenizer(writer: gguf.GGUFWriter, source_dir: Path, n_vocab: int) -> None:
    """Add the tokenizer of ``source_dir`` to ``writer`` (see the module docstring) for ``n_vocab`` embedding rows.

    Raises:
        ExportError: no ``tokenizer.json``, or one llama.cpp cannot be told how to reproduce.
    """
    import gguf

    tokenizer, file = _read_tokenizer(source_dir)
    pre = pre_tokenizer_name(tokenizer, file)
    tokens, types = token_table(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source_dir, load_merges=True, n_vocab=n_vocab)
    special.add_special_token.setdefault("bos", False)  # what the Hugging Face tokenizer does when nothing says
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
