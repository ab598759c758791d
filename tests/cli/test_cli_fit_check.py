"""``fit_check:`` through the CLI: every recipe is checked before its base is read, a run that cannot fit exits with
one message and writes nothing, ``--fit_check off`` trains anyway."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch  # noqa: F401  (its log handler binds sys.stderr on import: not one test's capsys stream)
import pytest
import yaml

from lightning_adapt.callbacks import fit_check
from lightning_adapt.callbacks.fit_check import plan_fit
from lightning_adapt.cli import AdaptCLI
from lightning_adapt.entry import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml"))
TINY_FOR = "smollm2-135m-instruct"  # as tests/cli/test_cli.py: the SmolLM2 recipes run on the tiny Llama


def _room(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    monkeypatch.setattr(fit_check, "available_memory_bytes", lambda device: (available, "patched free memory"))


def _budget(tmp_path: Path) -> list[str]:
    return [
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.init_args.batch_size=2",
        "--data.init_args.max_length=48",
        "--data.init_args.val_size=8",
        "--data.init_args.train_size=16",
    ]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_gets_a_verdict_before_its_base_is_read(
    recipe: str, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path
) -> None:
    """The check describes each shipped recipe (no recipe is skipped), reading no weight: refused with 1 kB free,
    and with 1 TB free it fits."""
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / recipe).read_text())
    tiny = config["model"]["init_args"]["model_name_or_path"] == TINY_FOR
    model = [f"--model.init_args.model_name_or_path={tiny_llama_dir}"] if tiny else []
    cli = AdaptCLI(args=["--config", recipe, *model], run=False)
    if "num_labels" not in config["model"]["init_args"] and "Classification" in config["model"]["class_path"]:
        # the head's size comes from the data's label names: set the data up first, as fit does before the check
        cli.trainer.strategy.connect(cli.model)
        cli.trainer._data_connector.attach_data(cli.model, datamodule=cli.datamodule)
        cli.datamodule.setup("fit")
    _room(monkeypatch, 1000)
    small, why = plan_fit(cli.trainer, cli.model, cli.datamodule)
    _room(monkeypatch, 10**12)
    large, _ = plan_fit(cli.trainer, cli.model, cli.datamodule)
    assert small is not None and large is not None, why
    assert (small.verdict, large.verdict) == ("does not fit", "fits")
    assert small.estimate.method == ("qlora" if "quantize" in config else "lora" if "lora" in config else "full")
    assert small.estimate.activation_bytes > 0, "the data module's batch_size and max_length"
    assert getattr(cli.model, "model", None) is None, "no model was kept, no weight read"


def test_a_run_that_cannot_fit_exits_with_one_message_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _room(monkeypatch, 10**8)  # MiniLM's full fine-tuning: 363.4 MB of weights, gradients and AdamW moments
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "recipes/sentiment/full.yaml"), *_budget(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err[err.index("lightning-adapt: error: ") :]
    assert message.startswith(
        "lightning-adapt: error: fit_check: the run does not fit: full fine-tuning of BertForSequenceClassification "
        "(fp32 base, adamw-fp32) on cpu needs an estimated "
    )
    assert (
        "(weights 90.9 MB + gradients 90.9 MB + optimizer state 181.7 MB = 363.4 MB, + activations 7.1 MB " in message
    )
    assert "patched free memory: 100.0 MB" in message and "Changes that fit, each with its estimate:" in message
    assert "  - quantize: nf4, double_quant (QLoRA) with lora: r: 16, target_modules: all-linear, " in message
    assert "modules_to_save: [classifier]" in message, "the new head trains under LoRA too"
    assert "loaded" not in err, "refused before the base was read"
    assert not list(tmp_path.rglob("*")), "nothing was written"


def test_fit_check_off_trains_and_a_bad_value_is_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_llama_dir: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    _room(monkeypatch, 1000)
    recipe = [str(ROOT / "recipes/chat/lora.yaml"), f"--model.init_args.model_name_or_path={tiny_llama_dir}"]
    main(["fit", "--config", *recipe, *_budget(tmp_path), "--fit_check=off", "--trainer.callbacks=[]"])
    assert list(tmp_path.rglob("metrics.csv")), "it trained"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", *recipe, "--fit_check=maybe"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lightning-adapt: error: fit_check='maybe' is not allowed" in err and "Fix" in err
