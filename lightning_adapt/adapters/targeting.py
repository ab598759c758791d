"""Which modules a target spec selects, and how to swap a child module by dotted name. Pure torch.

Entries of ``target_modules`` / ``exclude_modules`` follow :mod:`lightning_adapt.naming` (whole dotted
names, exact or as a ``.suffix``, or a full-match regex).

``None`` selects :data:`DEFAULT_TARGETS` (the query/value projections of common architectures) and
``"all-linear"`` every linear-like layer except the output heads (:func:`output_head_names`), plus every
``nn.MultiheadAttention`` (its projections are linear; it is adapted as a whole, never its ``out_proj`` alone).
Convolutions and embeddings are adapted when named (:data:`ADAPTABLE_KINDS`), as in PEFT.

Example:
    >>> find_targets(model, ["q_proj", "v_proj"])  # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj', ...]
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_adapt.adapters.delta import parameter_problem
from lightning_adapt.errors import TargetingError
from lightning_adapt.layers import (
    OUTPUT_HEAD_NAMES,
    AdapterModule,
    is_linear_like,
    named_modules_outside_adapters,
    output_head_names,
)
from lightning_adapt.naming import check_entries, matches, under

__all__ = [
    "ADAPTABLE_KINDS",
    "DEFAULT_TARGETS",
    "OUTPUT_HEAD_NAMES",
    "TargetingError",
    "adaptable_kind",
    "find_parameters",
    "find_targets",
    "is_linear_like",
    "matches",
    "output_head_names",
    "replace_module",
]

DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",  # LLaMA, Mistral, Qwen, Gemma, OPT, BART, T5-v1.1 style
    "v_proj",
    "query",  # BERT, RoBERTa, ViT, DeBERTa-v1
    "value",
    "q",  # T5
    "v",
    "q_lin",  # DistilBERT
    "v_lin",
    "c_attn",  # GPT-2 fused QKV (Conv1D)
    "query_key_value",  # Falcon, GPT-NeoX, BLOOM fused QKV
    "Wqkv",  # MPT, ModernBERT fused QKV
    "qkv_proj",  # Phi-3 fused QKV
)
"""The query/value projections users expect by default (QKV-fused layers where Q and V are not separate)."""

ALL_LINEAR = "all-linear"

#: The layer kinds LoRA wraps besides the linear-like ones (looked up along the MRO; the wrappers:
#: :mod:`lightning_adapt.adapters.kinds`, :mod:`lightning_adapt.adapters.attention`).
ADAPTABLE_KINDS: dict[type, str] = {
    nn.MultiheadAttention: "attention",
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.Embedding: "embedding",
}


def adaptable_kind(module: nn.Module) -> str | None:
    """``"linear"`` (linear-like), ``"attention"``, ``"conv"``, ``"embedding"``, or ``None`` (LoRA cannot wrap it)."""
    if is_linear_like(module):
        return "linear"
    return next((ADAPTABLE_KINDS[cls] for cls in type(module).__mro__ if cls in ADAPTABLE_KINDS), None)


def _inside_attention(modules: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """``{name: attention name}`` of the modules inside an ``nn.MultiheadAttention`` (its ``out_proj``)."""
    attention = [n for n, m in modules if isinstance(m, nn.MultiheadAttention)]
    return {n: a for n, _ in modules for a in attention if n.startswith(a + ".")}


def _refuse_inside_attention(selected: list[str], inside: dict[str, str]) -> None:
    bad = [n for n in selected if n in inside]
    if bad:
        raise TargetingError(
            f"target_modules selects {bad[0]!r}, inside the nn.MultiheadAttention {inside[bad[0]]!r}, which reads its "
            f"weight directly: a LoRA on it alone would never get a gradient. Fix: target {inside[bad[0]]!r} "
            "instead (it adapts q/k/v and out_proj)."
        )


def _candidates(linear_names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    return f"linear-like leaf names {leaves}; e.g. full names {linear_names[:3]}"


def _entries(spec: str | Sequence[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] = (),
) -> list[str]:
    """Dotted names of the modules LoRA can wrap selected by ``target_modules`` minus ``exclude_modules``.

    Args:
        model: The model to search; it is not modified.
        target_modules: ``None`` (:data:`DEFAULT_TARGETS`), ``"all-linear"``, or one entry or a list of
            entries (plain dotted names match exactly or as a suffix; anything else is a full-match regex).
        exclude_modules: Entries, with the same rules, removed from the selection.

    Returns:
        Names in ``model.named_modules()`` order, never inside an existing adapter.

    Raises:
        TargetingError: a listed entry matches nothing (the message lists candidate names), a matched
            module cannot be wrapped (or sits inside a ``MultiheadAttention``), or the selection is empty.
    """
    modules = named_modules_outside_adapters(model)
    all_names = [n for n, _ in modules]
    inside = _inside_attention(modules)
    kinds = {n: adaptable_kind(m) for n, m in modules if n not in inside}
    linear = [n for n, kind in kinds.items() if kind == "linear"]
    if target_modules is None:
        selected = [n for n in linear if any(matches(n, t) for t in DEFAULT_TARGETS)]
    elif target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        selected = [n for n, kind in kinds.items() if kind in ("linear", "attention") and n not in heads]
    else:
        targets = _entries(target_modules)
        check_entries(targets, all_names, "target_modules", linear)
        selected = [n for n in all_names if any(matches(n, t) for t in targets)]
        _refuse_inside_attention(selected, inside)
        chosen = set(selected)
        bad = [(n, type(m).__name__) for n, m in modules if n in chosen and kinds[n] is None]
        if bad:
            raise TargetingError(
                f"target_modules={targets} selects modules LoRA cannot wrap: {bad}. "
                f"Only linear-like, Conv1d/2d/3d, Embedding and MultiheadAttention layers can be adapted; target "
                f"their children instead ({_candidates(linear)})."
            )
    excludes = _entries(exclude_modules)
    if excludes:
        check_entries(excludes, all_names, "exclude_modules", linear)
        selected = [n for n in selected if not any(matches(n, e) for e in excludes)]
    if not selected:
        raise TargetingError(
            f"target_modules={target_modules!r} (minus exclude_modules={excludes}) selects no "
            f"linear-like module. Candidates: {_candidates(linear)}. Pass target_modules explicitly."
        )
    return selected


def find_parameters(
    model: nn.Module, target_parameters: str | Sequence[str], module_targets: Sequence[str] = ()
) -> dict[str, list[str]]:
    """``{owner module name: [its parameter names]}`` of the parameters ``target_parameters`` selects.

    Entries follow :mod:`lightning_adapt.naming` on dotted parameter names (``"experts.gate_up_proj"`` selects
    ``model.layers.0.mlp.experts.gate_up_proj`` in every layer); parameters inside existing adapters are not seen.

    Args:
        model: The model to search; it is not modified.
        target_parameters: One entry or a list of entries; empty selects nothing.
        module_targets: The module names ``target_modules`` selected: their parameters cannot be targeted too.

    Raises:
        TargetingError: an entry matches no parameter (the message lists the 2-D/3-D parameters of modules LoRA
            cannot wrap, e.g. fused experts), or selected parameters that cannot be adapted (each named, with why).
    """
    entries = _entries(target_parameters)
    if not entries:
        return {}
    owners = [(n, m) for n, m in named_modules_outside_adapters(model) if not isinstance(m, AdapterModule)]
    params = [(f"{n}.{p}", n, p, t) for n, m in owners for p, t in m._parameters.items() if t is not None]
    names = [full for full, *_ in params]
    kinds = {n: adaptable_kind(m) for n, m in owners}
    direct = [full for full, n, _, t in params if t.dim() in (2, 3) and kinds[n] is None]
    check_entries(entries, names, "target_parameters", direct or names, what="parameter")
    selected: dict[str, list[str]] = {}
    problems: list[str] = []
    for full, owner, leaf, tensor in params:
        if not any(matches(full, entry) for entry in entries):
            continue
        if under(owner, module_targets):
            problems.append(f"{full}: its module is adapted by target_modules; leave one of the two out")
        elif why := parameter_problem(full, tensor):
            problems.append(why)
        else:
            selected.setdefault(owner, []).append(leaf)
    if problems:
        raise TargetingError(
            f"target_parameters={entries} selects parameters LoRA cannot adapt: " + "; ".join(problems)
        )
    return selected


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new`` in place.

    Raises:
        TargetingError: ``name`` is empty or does not exist in ``model``.
    """
    if not name:
        raise TargetingError("replace_module: name must be a non-empty dotted module name.")
    try:
        model.get_submodule(name)
    except AttributeError as err:
        raise TargetingError(f"replace_module: {type(model).__name__} has no submodule {name!r}.") from err
    model.set_submodule(name, new)
