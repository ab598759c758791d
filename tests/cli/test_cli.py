"""The lightning-adapt CLI: every recipe runs, --print_config round-trips, bad input exits cleanly."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch  # noqa: F401  (its log handler binds sys.stderr on import: not one test's capsys stream)
import pytest
import yaml

from lightning_adapt.entry import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml"))


def _tiny_budget(tmp_path: Path) -> list[str]:
    return [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--data.init_args.batch_size=2",
        "--data.init_args.max_length=48",  # the chat template fills ~30 tokens before a response
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.val_size=8",
        "--data.init_args.train_size=16",
    ]


#: the SmolLM2 recipes fit on ``tiny_llama_dir`` (a 2-layer Llama with SmolLM2's tokenizer and chat template: the
#: same architecture, module names and data), each in seconds instead of 1-2 min; SmolLM2 itself trains through
#: these recipes in tests/export/test_merge_eval.py (chat QLoRA to its merged export), tests/cli/test_chat.py and
#: tests/tasks/test_preference.py, and `make figures` runs them whole
TINY_FOR = "smollm2-135m-instruct"


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_fits(recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path) -> None:
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / recipe).read_text())
    tiny = config["model"]["init_args"]["model_name_or_path"] == TINY_FOR
    model = [f"--model.init_args.model_name_or_path={tiny_llama_dir}"] if tiny else []
    full = Path(recipe).stem.startswith("full") and not tiny  # MiniLM's full checkpoint (with AdamW) is ~270 MB
    merges = "merge" in config
    # The merge evaluation (3 validation runs) is tested in tests/export/test_merge_eval.py; not again here.
    no_eval = ["--merge.init_args.evaluate=false"] if merges else []
    no_ckpt = ["--trainer.enable_checkpointing=false", "--trainer.callbacks=[]"] if full else []
    main(["fit", "--config", recipe, *_tiny_budget(tmp_path), *no_ckpt, *no_eval, *model])
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert metrics, "the CSV logger wrote metrics"
    assert "val_loss" in metrics[0].read_text().splitlines()[0]
    assert full or list(tmp_path.rglob("checkpoints/last.ckpt")), "a last checkpoint was written (--ckpt_path last)"
    if merges:
        exported = list(tmp_path.rglob("export/adapter/adapter_config.json"))
        assert exported and (exported[0].parents[1] / "merged" / "config.json").is_file()


def test_recipes_of_a_task_differ_only_in_adapter_keys() -> None:
    """A task's folder (one with full.yaml: chat, sentiment, preference) trains one model on one dataset;
    recipes/own-data/ holds one recipe per kind of data."""
    for task_dir in {Path(r).parent for r in RECIPES if (ROOT / Path(r).parent / "full.yaml").is_file()}:
        configs = {p.stem: yaml.safe_load((ROOT / p).read_text()) for p in (ROOT / task_dir).glob("*.yaml")}
        full = configs["full"]
        for name, config in configs.items():
            assert config["model"]["class_path"] == full["model"]["class_path"], name
            assert config["data"] == full["data"], f"{task_dir}/{name}.yaml uses other data than full.yaml"


@pytest.mark.parametrize("recipe", RECIPES)
def test_print_config_round_trips(
    recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", recipe, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    assert capsys.readouterr().out == printed
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"].startswith("lightning_adapt.tasks.")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--model.init_args.model_name_or_path=not-a-model", "model.model_name_or_path='not-a-model'"),
        ("--data.init_args.csv_path=/nonexistent/tweets.csv", "data.csv_path='/nonexistent/tweets.csv'"),
        ("--model.init_args.learning_rate=-1", "model.learning_rate=-1.0"),
        ("--lora.init_args.r=0", "r=0"),
    ],
)
def test_bad_input_exits_with_one_clear_message(
    override: str,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "recipes/sentiment/qlora.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", recipe, override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Fix" in err
    assert "Traceback" not in err
    assert "Does not validate against any of the Union subtypes" not in err, "the parser's noise is cut"
    message = err[err.index("lightning-adapt: error:") :]  # after the model loader's progress bar
    assert expected in message
    assert not list(tmp_path.rglob("*")), "nothing was written"


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the project's ConfigError family becomes a one-line message: a ValueError from deep inside a run
    (here: the training step) is a bug and reaches the user with its traceback."""
    from lightning_adapt.tasks import SequenceClassificationTask

    def broken(self: object, batch: object, batch_idx: int) -> None:
        raise ValueError("a bug inside the training step")

    monkeypatch.setattr(SequenceClassificationTask, "training_step", broken)
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="a bug inside the training step"):
        main(["fit", "--config", "recipes/sentiment/lora.yaml", *_tiny_budget(tmp_path)])


def test_help_documents_recipe_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--model",
                "lightning_adapt.tasks.SequenceClassificationTask",
                "--model.help",
                "lightning_adapt.tasks.SequenceClassificationTask",
            ]
        )
    assert "num_labels" in capsys.readouterr().out


def test_estimate_subcommand_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    main(["estimate", "--model", "llama-2-7b", "--method", "qlora", "--rank", "16", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == 16_777_216
    for key in ("weights_bytes", "optimizer_bytes", "gradient_bytes", "total_bytes"):
        assert isinstance(report[key], int)
    assert report["total_bytes"] == report["weights_bytes"] + report["optimizer_bytes"] + report["gradient_bytes"]


def test_estimate_starts_without_lightning_or_torch() -> None:
    """The console script plans a run in a fraction of a second: neither Lightning nor torch is imported."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys; from lightning_adapt.entry import main; "
        "main(['estimate', '--model', 'llama-2-7b', '--method', 'qlora', '--json']); "
        "print(json.dumps(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    *report, loaded = done.stdout.strip().splitlines()
    assert json.loads("\n".join(report))["trainable_params"] > 0
    assert json.loads(loaded) == []


def test_adapter_checkpoint_validates_and_predicts_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_adapt.cli import AdaptCLI

    monkeypatch.chdir(ROOT)
    recipe = "recipes/sentiment/qlora.yaml"
    fit = AdaptCLI(args=["fit", "--config", recipe, *_tiny_budget(tmp_path), "--model.init_args.learning_rate=0.01"])
    trained = float(fit.trainer.callback_metrics["val_loss"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert ckpt.stat().st_size < 5_000_000, "adapter-only: far below MiniLM's 90 MB of weights"
    budget = [a for a in _tiny_budget(tmp_path) if "limit_train_batches" not in a]
    validate = AdaptCLI(args=["validate", "--config", recipe, f"--ckpt_path={ckpt}", *budget])
    assert float(validate.trainer.callback_metrics["val_loss"]) == pytest.approx(trained, abs=1e-5)
    fresh = AdaptCLI(args=["validate", "--config", recipe, *budget])
    assert float(fresh.trainer.callback_metrics["val_loss"]) != pytest.approx(trained, abs=1e-3)
    predict = AdaptCLI(args=["predict", "--config", recipe, f"--ckpt_path={ckpt}", *budget])
    assert predict.trainer.predict_loop.predictions
    # `fit --ckpt_path last` in a new version folder resumes the first fit's last.ckpt (global_step continues)
    steps = fit.trainer.global_step
    resumed = AdaptCLI(
        args=["fit", "--config", recipe, *_tiny_budget(tmp_path), "--trainer.max_epochs=2", "--ckpt_path=last"]
    )
    assert resumed.trainer.global_step == 2 * steps > 0
    assert resumed.trainer.ckpt_path == str(next(tmp_path.rglob("version_0/checkpoints/last.ckpt")))


def test_the_cli_hides_the_libraries_noise_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import warnings

    from lightning_adapt.checks import NOISE, quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        quiet_libraries()
        quiet_libraries()  # idempotent: one filter each
        for logger, start in NOISE:
            if logger is None:
                warnings.warn(f"{start} (as the library says it)", UserWarning, stacklevel=1)
            else:
                logging.getLogger(logger).warning("%s: as the library says it", start)
        warnings.warn("lightning-adapt: a warning of the project's own", UserWarning, stacklevel=1)
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes message")
    assert [str(w.message) for w in caught] == ["lightning-adapt: a warning of the project's own"]
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes message"]
    assert len(logging.getLogger("bitsandbytes.backends.cpu.ops").filters) == 1
