"""``lightning-adapt inspect``: the rank a trained LoRA adapter actually used, per layer and per layer type.

Example::

    lightning-adapt inspect --ckpt_path outputs/sentiment-lora/version_0/export/adapter --plot spectra.png
    lightning-adapt inspect --ckpt_path last.ckpt --config recipes/sentiment/lora.yaml

``--ckpt_path`` is a Lightning checkpoint (adapter-only or full ``state_dict``) or a PEFT adapter directory.
The scale ``alpha / r`` comes from the adapter's ``adapter_config.json``, else from ``--config`` (the recipe's
``lora`` block), else from ``--alpha`` (default 16, the callback's default).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_adapt.adapters.spectrum import ENERGIES, LayerSpectrum, spectra_from_state, suggest_ranks
from lightning_adapt.compare.files import require_plots, write_json
from lightning_adapt.errors import ConfigError, setting_names
from lightning_adapt.export.peft_format import PEFT_PREFIX, read_adapter

__all__ = ["adapter_rank", "inspect_adapter", "main", "rank_report"]


def _recipe_lora(config: str) -> dict[str, Any]:
    path = Path(config)
    if not path.is_file():
        raise ConfigError(
            f"--config={config!r}: no such recipe file. Fix: pass the recipe the adapter was trained with."
        )
    lora = (yaml.safe_load(path.read_text()) or {}).get("lora") or {}
    args: dict[str, Any] = lora.get("init_args", {}) if isinstance(lora, dict) else {}
    return args


def _load_state(ckpt_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state_dict, adapter settings found in the file)`` of a checkpoint file or PEFT directory."""
    path = Path(ckpt_path)
    if path.is_dir():
        with setting_names(adapter_path="--ckpt_path"):
            config, weights = read_adapter(path)
        state = {key.removeprefix(PEFT_PREFIX): value for key, value in weights.items()}
        found = {"alpha": config.get("lora_alpha"), "use_rslora": config.get("use_rslora")}
        return state, {k: v for k, v in found.items() if v is not None}
    if not path.is_file():
        raise ConfigError(
            f"--ckpt_path={ckpt_path!r}: no such file or directory. Fix: pass a Lightning checkpoint (.ckpt) "
            "of a LoRA/QLoRA run or a PEFT adapter directory (<log dir>/export/adapter)."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    return dict(state), {}


def inspect_adapter(
    ckpt_path: str, alpha: float | None = None, use_rslora: bool | None = None, config: str | None = None
) -> list[LayerSpectrum]:
    """The update spectra of every adapted layer in ``ckpt_path`` (settings: file, then recipe, then arguments)."""
    state, found = _load_state(ckpt_path)
    recipe = _recipe_lora(config) if config else {}
    settings = {"alpha": 16.0, "use_rslora": False}
    settings.update({k: recipe[k] for k in ("alpha", "use_rslora") if recipe.get(k) is not None})
    settings.update({k: v for k, v in (("alpha", alpha), ("use_rslora", use_rslora)) if v is not None})
    settings.update(found)
    try:
        with setting_names(ckpt_path="--ckpt_path"):
            return spectra_from_state(state, float(settings["alpha"]), bool(settings["use_rslora"]))
    except ValueError as err:
        raise ConfigError(f"{err} Fix: pass the checkpoint or adapter directory of a LoRA/QLoRA run.") from None


def rank_report(spectra: list[LayerSpectrum]) -> str:
    """Markdown: one row per layer (r, effective ranks, top singular value) and one suggestion per layer type."""
    heads = " | ".join(f"rank@{e * 100:g}%" for e in ENERGIES)
    lines = [f"| layer | r | {heads} | numerical rank | σ₁ |", "|---|---:|" + "---:|" * (len(ENERGIES) + 2)]
    for s in spectra:
        ranks = " | ".join(str(s.effective_rank(e)) for e in ENERGIES)
        top = s.singular_values[0] if s.singular_values else 0.0
        lines.append(f"| {s.name} | {s.r} | {ranks} | {s.numerical_rank} | {top:.3g} |")
    lines += ["", *(f"- {suggestion.sentence()}" for suggestion in suggest_ranks(spectra))]
    return "\n".join(lines) + "\n"


def _payload(spectra: list[LayerSpectrum]) -> dict[str, Any]:
    return {
        "layers": [s.as_dict() for s in spectra],
        "suggestions": [vars(s) | {"sentence": s.sentence()} for s in suggest_ranks(spectra)],
    }


def adapter_rank(row: dict[str, Any]) -> dict[str, Any] | None:
    """The rank diagnostic of a ``compare`` row of an adapter run (``None`` for full fine-tuning): read from its
    exported PEFT adapter, else its checkpoint with the run's recorded ``alpha``; ``{"error": ...}`` if neither
    reads."""
    lora, files = row.get("lora"), row.get("files") or {}
    source = files.get("adapter") or files.get("checkpoint")
    if not lora or not source:
        return None
    try:
        spectra = inspect_adapter(source, float(lora["alpha"]), bool(lora["use_rslora"]))
    except ConfigError as err:
        return {"source": source, "error": str(err)}
    return {"source": source, **_payload(spectra)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-adapt inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint or PEFT adapter directory.")
    parser.add_argument("--config", help="Recipe the adapter was trained with (reads lora.init_args.alpha).")
    parser.add_argument("--alpha", type=float, help="LoRA alpha when neither the file nor --config has it (16).")
    parser.add_argument("--use_rslora", action="store_true", default=None, help="Scale by alpha/sqrt(r).")
    parser.add_argument("--plot", help="Write the spectra as PNG here.")
    parser.add_argument("--json", help="Write layers, spectra and suggestions as JSON here.")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-adapt inspect``: prints the rank report; a bad argument is one line, exit 2."""
    args = _parser().parse_args(argv)
    try:
        if args.plot:
            require_plots()
        spectra = inspect_adapter(args.ckpt_path, args.alpha, args.use_rslora, args.config)
    except ConfigError as err:
        if os.environ.get("LIGHTNING_ADAPT_DEBUG"):
            raise
        print(f"lightning-adapt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(rank_report(spectra), end="")
    if args.plot:
        from lightning_adapt.compare.plots import plot_spectra

        plot_spectra(spectra, args.plot)
        print(f"spectra: {args.plot}")
    if args.json:
        write_json(args.json, _payload(spectra))
        print(f"json: {args.json}")
