"""Exact parameter layouts from a model config (pure Python): the input of :mod:`lightning_adapt.memory.estimator`.

Every linear layer is ``in × out`` (+ ``out`` bias); grouped-query attention gives k/v an output of
``num_key_value_heads · head_dim``; a gated MLP has three matrices; tied embeddings count once. Every
other tensor (embeddings, norms, an untied head) is listed by its Hugging Face name (a dotted suffix).
The config's ``architectures`` picks what sits on the backbone: a language-model head (``*ForCausalLM``,
``*LMHeadModel``), a sequence-classification head of ``num_labels`` (or ``len(id2label)``) outputs
(``*ForSequenceClassification``: BERT's ``classifier`` with bias over the pooler, ``score`` without bias
for Llama-family and GPT-2), or nothing (``*Model``).

Example:
    >>> load_model_shape("llama-2-7b").total_params
    6738415616
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_adapt.errors import SETTING, ConfigError
from lightning_adapt.naming import matches

_LLAMA_FIELDS: tuple[str, ...] = ("hidden_size", "intermediate_size", "num_hidden_layers")
_LLAMA_FIELDS += ("num_attention_heads", "num_key_value_heads", "vocab_size")
PRESETS: dict[str, dict[str, Any]] = {
    name: {"model_type": "llama", **dict(zip(_LLAMA_FIELDS, row, strict=True))}
    for name, row in {  # the published config.json values of each model
        "llama-2-7b": (4096, 11008, 32, 32, 32, 32000),
        "llama-2-13b": (5120, 13824, 40, 40, 40, 32000),
        "llama-2-70b": (8192, 28672, 80, 64, 8, 32000),
        "llama-65b": (8192, 22016, 80, 64, 64, 32000),
        "mistral-7b": (4096, 14336, 32, 32, 8, 32000),
        "llama-3-8b": (4096, 14336, 32, 32, 8, 128256),
    }.items()
}


@dataclass(frozen=True)
class LinearSpec:
    """``count`` linears named ``name`` (a dotted suffix of the module name), ``in_features → out_features``."""

    name: str
    in_features: int
    out_features: int
    count: int
    bias: bool = False


@dataclass(frozen=True)
class ModelShape:
    """Exact parameter layout: linears, task heads and every other tensor.

    ``linears`` are what QLoRA quantizes and ``"all-linear"`` adapts (block linears, BERT's pooler);
    ``heads`` are linear task heads kept in ``base_dtype`` and left out of ``"all-linear"`` (``classifier``,
    ``score``), as :mod:`lightning_adapt.quantize` and :mod:`lightning_adapt.adapters.targeting` treat them. ``others``
    rows are ``(name, numel, count)``, ``count`` tensors of ``numel`` each: embeddings, norms (weight and
    bias are two tensors), an untied ``lm_head``. ``lm_vocab`` is the language-model head's vocabulary
    (0 without one).
    """

    name: str
    family: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    kv_dim: int
    gated_mlp: bool
    lm_vocab: int
    linears: tuple[LinearSpec, ...]
    others: tuple[tuple[str, int, int], ...]
    heads: tuple[LinearSpec, ...] = ()

    @property
    def total_params(self) -> int:
        lin = sum((s.in_features + s.bias) * s.out_features * s.count for s in (*self.linears, *self.heads))
        return lin + sum(numel * count for _, numel, count in self.others)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str = "config") -> ModelShape:
        """Build from a Hugging Face ``config.json`` dict (Llama/Mistral/Qwen2, GPT-2 or BERT names); its
        ``architectures`` (absent: a causal LM, a bare BERT) selects the head, see the module docstring."""
        family = _detect_family(cfg)
        need = _REQUIRED[family]
        missing = [f for f in need if cfg.get(f) is None]
        if missing:
            raise ConfigError(
                f"{SETTING}={name!r}: config lacks {', '.join(missing)}, needed for a {family} shape "
                f"(requires {', '.join(need)}). Fix: pass a Hugging Face config.json of a "
                f"Llama/Mistral/Qwen2, GPT-2 or BERT model, or a preset: {', '.join(PRESETS)}.",
                setting="model",
            )
        if cfg.get("num_local_experts") or cfg.get("num_experts"):
            raise ConfigError(
                f"{SETTING}={name!r}: mixture-of-experts configs are not supported; use a dense one.", setting="model"
            )
        return _BUILDERS[family](cfg, name, _task(cfg, family, name))


def _detect_family(cfg: Mapping[str, Any]) -> str:
    model_type = str(cfg.get("model_type", ""))
    if model_type == "gpt2" or "n_embd" in cfg:
        return "gpt2"
    return "bert" if model_type in ("bert", "roberta") else "llama"


#: Architecture-name suffix → head, checked in this order (``LMHeadModel`` before ``Model``).
_TASK_SUFFIXES: tuple[tuple[str, str], ...] = (("ForSequenceClassification", "classify"), ("ForCausalLM", "lm"))
_TASK_SUFFIXES += (("LMHeadModel", "lm"), ("Model", "base"))
#: The heads modeled per family; the first is the default when a config has no ``architectures``.
#: RoBERTa's classifier is a two-layer module (dense + out_proj) with no pooler: not modeled.
_TASKS: dict[str, tuple[str, ...]] = {"llama": ("lm", "classify", "base"), "gpt2": ("lm", "classify", "base")}
_TASKS.update(bert=("base", "classify"), roberta=("base",))
_TASK_WORDS = {"lm": "a causal language model", "base": "the bare backbone", "classify": "a classifier"}


def _task(cfg: Mapping[str, Any], family: str, name: str) -> str:
    """``lm``, ``classify`` or ``base`` from the first of the config's ``architectures``."""
    tasks = _TASKS["roberta" if cfg.get("model_type") == "roberta" else family]
    archs = cfg.get("architectures") or []
    if not archs:
        return tasks[0]
    task = next((t for suffix, t in _TASK_SUFFIXES if str(archs[0]).endswith(suffix)), None)
    if task not in tasks:
        modeled = ", ".join(f"*{suffix}" for suffix, t in _TASK_SUFFIXES if t in tasks)
        raise ConfigError(
            f"{SETTING}={name!r}: architectures={list(archs)!r} is not modeled for a "
            f"{cfg.get('model_type', family)} config (modeled: {modeled}). Fix: name one of those in "
            f"architectures, or drop the field to estimate the default ({_TASK_WORDS[tasks[0]]}).",
            setting="model",
        )
    return task


def _num_labels(cfg: Mapping[str, Any]) -> int:
    """Hugging Face's rule: ``num_labels``, else ``len(id2label)`` (``to_dict()`` keeps only that), else 2."""
    return int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2)


def _llama(cfg: Mapping[str, Any], name: str, task: str) -> ModelShape:
    d, i, n_layers, heads = (int(cfg[k]) for k in _REQUIRED["llama"][:4])
    vocab = int(cfg["vocab_size"])
    head_dim = int(cfg.get("head_dim") or d // heads)
    kv = int(cfg.get("num_key_value_heads") or heads) * head_dim
    qkv_bias = bool(cfg.get("attention_bias", str(cfg.get("model_type")) == "qwen2"))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    linears = (
        LinearSpec("q_proj", d, heads * head_dim, n_layers, qkv_bias),
        LinearSpec("k_proj", d, kv, n_layers, qkv_bias),
        LinearSpec("v_proj", d, kv, n_layers, qkv_bias),
        LinearSpec("o_proj", heads * head_dim, d, n_layers, bool(cfg.get("attention_bias", False))),
        LinearSpec("gate_proj", d, i, n_layers, mlp_bias),
        LinearSpec("up_proj", d, i, n_layers, mlp_bias),
        LinearSpec("down_proj", i, d, n_layers, mlp_bias),
    )
    others = [("embed_tokens", vocab * d, 1), ("input_layernorm", d, n_layers)]
    others += [("post_attention_layernorm", d, n_layers), ("norm", d, 1)]
    if task == "lm" and not cfg.get("tie_word_embeddings", False):
        others.append(("lm_head", vocab * d, 1))
    score = (LinearSpec("score", d, _num_labels(cfg), 1),) if task == "classify" else ()
    lm_vocab = vocab if task == "lm" else 0
    return ModelShape(name, "llama", d, n_layers, i, kv, True, lm_vocab, linears, tuple(others), score)


def _gpt2(cfg: Mapping[str, Any], name: str, task: str) -> ModelShape:
    d, n_layers, vocab, positions = (int(cfg[k]) for k in _REQUIRED["gpt2"])
    i = int(cfg.get("n_inner") or 4 * d)
    rows = (("c_attn", d, 3 * d), ("attn.c_proj", d, d), ("c_fc", d, i), ("mlp.c_proj", i, d))
    linears = tuple(LinearSpec(*row, n_layers, True) for row in rows)
    others: tuple[tuple[str, int, int], ...] = (("wte", vocab * d, 1), ("wpe", positions * d, 1))  # head tied
    others += (("ln_1", d, 2 * n_layers), ("ln_2", d, 2 * n_layers), ("ln_f", d, 2))
    heads = (LinearSpec("score", d, _num_labels(cfg), 1),) if task == "classify" else ()
    lm_vocab = vocab if task == "lm" else 0
    return ModelShape(name, "gpt2", d, n_layers, i, d, False, lm_vocab, linears, others, heads)


def _bert(cfg: Mapping[str, Any], name: str, task: str) -> ModelShape:
    d, i, n_layers, _, vocab = (int(cfg[k]) for k in _REQUIRED["bert"][:5])
    positions, types = int(cfg["max_position_embeddings"]), int(cfg.get("type_vocab_size", 2))
    rows = [(name, d, d) for name in ("query", "key", "value", "attention.output.dense")]
    rows += [("intermediate.dense", d, i), ("output.dense", i, d)]
    linears = tuple(LinearSpec(*row, n_layers, True) for row in rows)
    linears += (LinearSpec("pooler.dense", d, d, 1, True),)  # quantized and adapted like a block linear
    sizes = (("word_embeddings", vocab), ("position_embeddings", positions), ("token_type_embeddings", types))
    others = tuple((n, size * d, 1) for n, size in sizes)
    norms = (("embeddings.LayerNorm", 1), ("attention.output.LayerNorm", n_layers), ("output.LayerNorm", n_layers))
    others += tuple((n, d, 2 * count) for n, count in norms)  # weight and bias
    heads = (LinearSpec("classifier", d, _num_labels(cfg), 1, True),) if task == "classify" else ()
    return ModelShape(name, "bert", d, n_layers, i, d, False, 0, linears, others, heads)


_REQUIRED: dict[str, tuple[str, ...]] = {
    "llama": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
    "gpt2": ("n_embd", "n_layer", "vocab_size", "n_positions"),
    "bert": (*_LLAMA_FIELDS[:4], "vocab_size", "max_position_embeddings"),
}
_Builder = Callable[[Mapping[str, Any], str, str], "ModelShape"]
_BUILDERS: dict[str, _Builder] = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def load_model_shape(name_or_path: str) -> ModelShape:
    """A preset name (see :data:`PRESETS`), a ``config.json`` path, or a directory holding one."""
    if name_or_path in PRESETS:
        return ModelShape.from_config(PRESETS[name_or_path], name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{SETTING}={name_or_path!r} is neither a preset nor a config.json (or a folder holding one). "
            f"Presets: {', '.join(PRESETS)}. Fix: pick a preset or pass a Hugging Face config.json path.",
            setting="model",
        )
    return ModelShape.from_config(json.loads(path.read_text()), name_or_path)


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int, int]]:
    """Per LoRA target name (linears, then heads): ``(in_features, out_features, count)``."""
    return {s.name: (s.in_features, s.out_features, s.count) for s in (*shape.linears, *shape.heads)}


def resolve_targets(shape: ModelShape, targets: tuple[str, ...]) -> tuple[LinearSpec, ...]:
    """Linears (or heads) matched by whole name or dotted suffix (``c_proj`` matches ``attn.c_proj``), or
    ``("all-linear",)``: every linear, no head."""
    if targets == ("all-linear",):
        return shape.linears
    specs = (*shape.linears, *shape.heads)
    unknown = [t for t in targets if not any(matches(s.name, t) for s in specs)]
    if unknown:
        raise ConfigError(
            f"targets={','.join(targets)!r}: {', '.join(unknown)} not a linear layer of {shape.name!r} "
            f"({shape.family}). Allowed: {', '.join(linear_shapes(shape))} or 'all-linear'."
        )
    return tuple(s for s in specs if any(matches(s.name, t) for t in targets))


def saved_linears(shape: ModelShape, modules: tuple[str, ...]) -> tuple[LinearSpec, ...]:
    """The linears and heads that ``modules`` (LoRA's ``modules_to_save``) name; see :func:`resolve_saved`."""
    return tuple(s for s in (*shape.linears, *shape.heads) if any(matches(s.name, m) for m in modules))


def resolve_saved(shape: ModelShape, modules: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """The tensors ``(name, numel, count)`` that ``modules`` (LoRA's ``modules_to_save``) train fully.

    Matched like targets (whole name or dotted suffix) against every name the shape knows: linears and
    heads (``classifier``, ``score``, ``query``, ``pooler.dense``: weight and bias rows) and
    :attr:`ModelShape.others` (``embed_tokens``, ``norm``, ``lm_head``, ``LayerNorm``, ...). Each tensor
    is counted once however many entries match it.
    """
    names = [*linear_shapes(shape), *(n for n, _, _ in shape.others)]
    unknown = [m for m in modules if not any(matches(name, m) for name in names)]
    if unknown:
        raise ConfigError(
            f"modules_to_save={','.join(modules)!r}: {', '.join(unknown)} not a module of {shape.name!r} "
            f"({shape.family}). Allowed: {', '.join(names)} (whole names or dotted suffixes)."
        )
    rows = [(f"{s.name}.weight", s.in_features * s.out_features, s.count) for s in saved_linears(shape, modules)]
    rows += [(f"{s.name}.bias", s.out_features, s.count) for s in saved_linears(shape, modules) if s.bias]
    return (*rows, *(row for row in shape.others if any(matches(row[0], m) for m in modules)))
