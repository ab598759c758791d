"""``compare --project MODEL``: what each recipe's settings would need on another model, by the estimator.

A run's settings are the :class:`~lightning_adapt.memory.Assumptions` its ``MemoryReportCallback`` estimated it
with (read off the live run: method, rank, targets, ``modules_to_save``, quantization, optimizer, dtypes, the
batch's shape). They carry over as they are, except the names, which are translated by the role a layer plays:
BERT's ``query`` is Llama's ``q_proj`` and part of GPT-2's fused ``c_attn``; ``intermediate.dense`` is
``gate_proj`` + ``up_proj``; a classification head (``classifier``, ``score``) is the projected model's head,
and is dropped (with a note) where that model has none (a causal LM preset). The projection is exactly
:func:`lightning_adapt.memory.estimate` for the translated settings: with the article's settings (r=16 on
q, k, v, o, bf16, AdamW) at ``llama-2-7b`` it is ``lightning-adapt estimate --model llama-2-7b``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, cast, get_args

from lightning_adapt.errors import ConfigError, setting_names
from lightning_adapt.memory.estimator import Assumptions, Dtype, Estimate, Method, ModelShape, estimate
from lightning_adapt.memory.shapes import linear_shapes, load_model_shape

__all__ = ["Projection", "load_projection_shape", "project", "project_row", "translate"]

#: The role each known layer name plays, across the families the estimator models.
ROLES: dict[str, str] = {
    "q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v", "c_attn": "qkv",
    "o_proj": "o", "attention.output.dense": "o", "attn.c_proj": "o",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "intermediate.dense": "mlp_in", "c_fc": "mlp_in",
    "down_proj": "mlp_out", "output.dense": "mlp_out", "mlp.c_proj": "mlp_out", "pooler.dense": "pooler",
    "classifier": "head", "score": "head",
    "embed_tokens": "embed", "word_embeddings": "embed", "wte": "embed", "lm_head": "lm_head",
}  # fmt: skip
#: Roles a fused layer covers (GPT-2's ``c_attn`` is q, k and v in one matrix).
_FUSED = {"qkv": ("q", "k", "v")}


@dataclass(frozen=True)
class Projection:
    """A recipe's settings at another model's size: the estimate and what had to be translated or dropped."""

    estimate: Estimate
    notes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"estimate": self.estimate.to_json(), "notes": list(self.notes)}


def load_projection_shape(model: str) -> ModelShape:
    """The shape ``--project`` names (a preset, a config.json or a folder holding one); one-line error."""
    with setting_names(model="--project"):  # the estimator's message, naming this command's option
        return load_model_shape(model)


def _names_by_role(shape: ModelShape) -> dict[str, list[str]]:
    known = [*linear_shapes(shape), *(name for name, _, _ in shape.others)]
    by_role: dict[str, list[str]] = {}
    for name in known:
        role = ROLES.get(name)
        if role is not None:
            for part in _FUSED.get(role, (role,)):
                by_role.setdefault(part, []).append(name)
    return by_role


def translate(names: tuple[str, ...], shape: ModelShape, what: str) -> tuple[tuple[str, ...], list[str]]:
    """``names`` of another model's layers as the names of ``shape`` playing the same roles, and notes on
    each one without an equivalent (dropped)."""
    if names == ("all-linear",):
        return names, []
    own = set(linear_shapes(shape)) | {name for name, _, _ in shape.others}
    by_role, out, notes = _names_by_role(shape), [], []
    for name in names:
        if name in own:
            out.append(name)
            continue
        roles = _FUSED.get(ROLES.get(name, ""), (ROLES.get(name, ""),))
        found = [target for role in roles if role for target in by_role.get(role, [])]
        if not found:
            notes.append(f"{what} {name!r}: no layer of {shape.name} plays its role; left out")
        out += [target for target in found if target not in out]
    return tuple(dict.fromkeys(out)), notes


def _assumptions(settings: dict[str, Any]) -> Assumptions:
    args = {f.name: settings[f.name] for f in fields(Assumptions) if f.name in settings}
    for key in ("targets", "modules_to_save"):
        if isinstance(args.get(key), str):
            args[key] = tuple(name for name in args[key].split(",") if name)
    return Assumptions(**args)


def project(run_estimate: dict[str, Any], shape: ModelShape, dtype: str | None = None) -> Projection:
    """The estimate for ``run_estimate``'s settings (an :meth:`Estimate.to_json` of the measured run) on
    ``shape``; ``dtype`` replaces the base, adapter and compute dtypes (e.g. ``bf16`` for a GPU projection of
    a 32-bit CPU run)."""
    method = cast(Method, run_estimate["method"])
    a = _assumptions(run_estimate["assumptions"])
    targets, notes = translate(a.targets, shape, "target")
    saved, more = translate(a.modules_to_save, shape, "modules_to_save")
    if method == "full":  # targets mean nothing to full fine-tuning: only the names are translated
        a, notes = replace(a, targets=targets or Assumptions().targets, modules_to_save=saved), []
    elif not targets:
        raise ConfigError(f"--project={shape.name!r}: none of the targets {list(a.targets)} has an equivalent.")
    else:
        a, notes = replace(a, targets=targets, modules_to_save=saved), notes + more
    if dtype is not None:
        if dtype not in get_args(Dtype):
            raise ConfigError(f"--project_dtype={dtype!r} is not one of {', '.join(get_args(Dtype))}. Fix: e.g. bf16.")
        d = cast(Dtype, dtype)
        a = replace(a, base_dtype=d, adapter_dtype=d, quant_compute_dtype=d)
    return Projection(estimate(shape, method, a), tuple(notes))


def project_row(row: dict[str, Any], shape: ModelShape, dtype: str | None) -> dict[str, Any]:
    """A report row's projection as JSON, or ``{"error": why}`` (a failed run, a run the estimator cannot
    describe, targets without an equivalent)."""
    if row.get("estimate") is None:
        return {"error": f"no estimate of the measured run: {row.get('no_estimate_reason') or row.get('error')}"}
    try:
        return project(row["estimate"], shape, dtype).to_json()
    except ConfigError as err:
        return {"error": str(err)}
