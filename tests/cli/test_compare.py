"""``lightning-adapt compare``: one real comparison (full, LoRA, QLoRA and a recipe that fails) at a tiny budget,
checked against separately known numbers: trainable counts of models built on the meta device, memory components
of a separate in-process fit, the estimator's own output, and the pictures' drawn series."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch
import yaml

from lightning_adapt.adapters.inject import LoRASpec, inject_lora
from lightning_adapt.callbacks.memory_report import MemoryReportCallback
from lightning_adapt.cli import AdaptCLI
from lightning_adapt.compare.command import parse_args
from lightning_adapt.compare.plots import MEMORY_PARTS
from lightning_adapt.compare.project import project
from lightning_adapt.compare.runner import failure
from lightning_adapt.entry import main
from lightning_adapt.memory.cli import main as estimate_main
from lightning_adapt.memory.estimator import Assumptions, estimate, load_model_shape

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RECIPES = [ROOT / f"recipes/sentiment/{name}.yaml" for name in ("full", "lora", "qlora")]
TINY = [
    "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--data.init_args.train_size", "48",
    "--data.init_args.val_size", "16", "--data.init_args.batch_size", "8", "--data.init_args.max_length", "32",
]  # fmt: skip
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One compare of full, lora, qlora and ``broken`` (lora targeting a layer MiniLM lacks: fails in its run)."""
    tmp = tmp_path_factory.mktemp("compare")
    broken = yaml.safe_load(RECIPES[1].read_text())
    broken["lora"]["init_args"]["target_modules"] = ["no_such_layer"]
    (tmp / "broken.yaml").write_text(yaml.safe_dump(broken))
    out = tmp / "out"
    recipes = [*map(str, RECIPES), str(tmp / "broken.yaml")]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        with pytest.raises(SystemExit) as exit_info:  # a run failed: the report is written, exit 1
            main(["compare", *recipes, "--output", str(out), "--project", "llama-2-7b", *TINY])
    assert exit_info.value.code == 1
    report = json.loads((out / "report.json").read_text())
    return {"out": out, "report": report, "rows": {row["name"]: row for row in report["runs"]}, "tmp": tmp}


def test_report_has_a_row_per_recipe_and_the_failed_one_says_why(compared: dict[str, Any]) -> None:
    rows = compared["rows"]
    assert list(rows) == ["full", "lora", "qlora", "broken"]
    assert [rows[n]["ok"] for n in rows] == [True, True, True, False]
    assert "no_such_layer" in rows["broken"]["error"] and rows["broken"]["error"].startswith("exit 2")
    assert [rows[n]["method"] for n in ("full", "lora", "qlora")] == ["full", "lora", "qlora"]
    for name in ("full", "lora", "qlora"):
        row = rows[name]
        assert row["steps"] == 3 and row["metrics_after_step"] == 3, "validated after the last of the 3 steps"
        assert set(row["metrics_before"]) == set(row["metrics_after"]) == {"val_loss", "val_acc", "val_f1"}
        assert row["loss_curve"]["step"] == [1, 2, 3] and len(row["loss_curve"]["loss"]) == 3
        assert row["median_step_s"] > 0 and row["samples_per_s"] > 0 and row["tokens_per_s"] > row["samples_per_s"]
        assert row["peak_kind"] == "peak_rss" and row["peak_bytes"] > row["baseline_bytes"] > 100e6
        assert row["checkpoint_bytes"] == Path(row["files"]["checkpoint"]).stat().st_size
    assert rows["full"]["ratios"]["weights_bytes"] == 1.0
    assert rows["qlora"]["ratios"]["weights_bytes"] == rows["qlora"]["weights_bytes"] / rows["full"]["weights_bytes"]
    assert rows["full"]["adapter_bytes"] is None and rows["full"]["rank"] is None
    for name in ("lora", "qlora"):
        adapter = Path(rows[name]["files"]["adapter"]) / "adapter_model.safetensors"
        assert rows[name]["adapter_bytes"] == adapter.stat().st_size
        assert rows[name]["merged_bytes"] > 80e6  # MiniLM merged back, fp32
    text = (compared["out"] / "report.md").read_text()
    assert "| broken | FAILED: exit 2" in text and "## Projected to llama-2-7b" in text
    assert "## Rank diagnostics" in text and "r=8 on attention.self.query used an effective rank of" in text


def test_trainable_counts_equal_models_built_on_the_meta_device(compared: dict[str, Any]) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lightning_adapt.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model("minilm"), num_labels=3, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    rows = compared["rows"]
    total = sum(p.numel() for p in model.parameters())
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"] == total
    lora = yaml.safe_load(RECIPES[1].read_text())["lora"]["init_args"]
    inject_lora(model, LoRASpec(**lora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows["lora"]["trainable_params"] == rows["qlora"]["trainable_params"] == trainable
    assert rows["lora"]["total_params"] == sum(p.numel() for p in model.parameters())
    assert rows["qlora"]["total_params"] == rows["lora"]["total_params"]  # 4-bit weights counted as weights


def test_memory_components_equal_a_separate_fit(compared: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The qlora row against MemoryReportCallback of an in-process fit with the same recipe and options."""
    tmp, report = compared["tmp"], compared["report"]
    monkeypatch.chdir(tmp)
    args = ["fit", "--config", str(RECIPES[2]), *report["overrides"], f"--trainer.logger.init_args.save_dir={tmp}/own"]
    cli = AdaptCLI(args=args)
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MemoryReportCallback)]  # type: ignore[attr-defined]
    measured = {component: values[0] for component, values in callback.reports["fit_end"].items()}
    row = compared["rows"]["qlora"]
    assert row["weights_bytes"] == measured["weights"]
    assert row["gradient_bytes"] == measured["gradients"] > 0
    assert row["optimizer_bytes"] == measured["optimizer state"] > 0
    assert row["trainable_params"] == measured["trainable params"]
    kinds = {"fp32": "weights: fp32", "quantized": "weights: quantized", "adapter": "adapter weights"}
    assert row["weights_by_kind"] == {kind: measured[component] for kind, component in kinds.items()}


def test_pictures_draw_the_report_numbers(compared: dict[str, Any]) -> None:
    out, report, rows = compared["out"], compared["report"], compared["rows"]
    drawn = json.loads((out / "pictures.json").read_text())
    ok = [name for name in rows if rows[name]["ok"]]
    for name in ("memory.png", "losses.png", "metrics.png", "rank-lora.png", "rank-qlora.png"):
        assert 10_000 < (out / name).stat().st_size < 200_000, name
        assert matplotlib.image.imread(out / name).shape[0] > 200, name
    assert set(report["pictures"].values()) == {
        "memory.png",
        "losses.png",
        "metrics.png",
        "rank-lora.png",
        "rank-qlora.png",
    }
    memory = drawn["memory.png"]
    assert memory["recipes"] == ok
    for key, label in MEMORY_PARTS:
        assert memory[label] == pytest.approx([rows[n][key] / 1e6 for n in ok], rel=1e-12), label
    tops = [sum(memory[label][i] for _, label in MEMORY_PARTS) for i in range(len(ok))]
    assert tops == pytest.approx([rows[n]["peak_above_baseline_bytes"] / 1e6 for n in ok], rel=1e-9)
    for name in ok:
        curve = rows[name]["loss_curve"]
        assert drawn["losses.png"]["step"][name] == [curve["step"], curve["loss"]]
        assert drawn["losses.png"]["time"][name] == [curve["time"], curve["loss"]]
        for metric, pair in drawn["metrics.png"].items():
            assert pair[name] == [rows[name]["metrics_before"][metric], rows[name]["metrics_after"][metric]]
    assert set(drawn["metrics.png"]) == {"val_acc", "val_loss"}
    for name in ("lora", "qlora"):
        layers = rows[name]["rank"]["layers"]
        plotted = [values for group in drawn[f"rank-{name}.png"].values() for values in group]
        assert sorted(plotted) == sorted(layer["singular_values"] for layer in layers)


def test_rank_diagnostics_equal_inspect_on_the_exported_adapter(
    compared: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = compared["rows"]["lora"]
    main(["inspect", "--ckpt_path", row["files"]["adapter"], "--json", str(tmp_path / "rank.json")])
    assert json.loads((tmp_path / "rank.json").read_text())["layers"] == row["rank"]["layers"]
    assert len(row["rank"]["layers"]) == 24 and {la["r"] for la in row["rank"]["layers"]} == {8}
    assert "r=8 on attention.output.dense used an effective rank of" in capsys.readouterr().out


def _assumptions(settings: dict[str, Any], **changes: Any) -> Assumptions:
    names = {key: tuple(n for n in str(settings[key]).split(",") if n) for key in ("targets", "modules_to_save")}
    return replace(Assumptions(**(settings | names)), **changes)


def test_projection_is_the_estimator_for_the_recipe_settings(compared: dict[str, Any]) -> None:
    shape = load_model_shape("llama-2-7b")
    for name in ("full", "lora", "qlora"):
        row = compared["rows"][name]
        settings = row["estimate"]["assumptions"]
        assert row["estimate"]["trainable_params"] == row["trainable_params"]  # the live estimate is exact
        changes = {"targets": QKVO, "modules_to_save": ()}  # BERT names -> Llama's; no classifier on a causal LM
        expected = estimate(shape, row["method"], _assumptions(settings, **changes))
        assert row["projection"]["estimate"] == expected.to_json(), name
    lora = compared["rows"]["lora"]["projection"]
    assert lora["estimate"]["trainable_params"] == 8 * (4096 + 4096) * 4 * 32  # r (in + out) on q, k, v, o
    assert lora["notes"] == ["modules_to_save 'classifier': no layer of llama-2-7b plays its role; left out"]


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_projection_of_the_article_settings_reproduces_estimate(
    method: str, compared: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A MiniLM run with the article's settings (r=16 on q, k, v, o; bf16; AdamW fp32 moments), projected to
    llama-2-7b, is ``lightning-adapt estimate --model llama-2-7b`` exactly."""
    measured = compared["rows"][method]["estimate"]
    article = {"rank": 16, "optimizer": "adamw-fp32", "state_bytes_per_tensor": 0, "batch_size": None}
    article |= {"seq_len": None, "modules_to_save": "", "targets": "query,key,value,attention.output.dense"}
    run = measured | {"assumptions": measured["assumptions"] | article}
    estimate_main(["--model", "llama-2-7b", "--method", method, "--json"])
    expected = json.loads(capsys.readouterr().out)
    assert project(run, load_model_shape("llama-2-7b"), dtype="bf16").estimate.to_json() == expected


def _no_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("a run started")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["recipes/sentiment/nope.yaml"], "RECIPE='recipes/sentiment/nope.yaml': no such recipe file"),
        (
            ["recipes/sentiment/lora.yaml", "recipes/chat/lora.yaml"],
            "RECIPE='recipes/chat/lora.yaml': model.class_path=",
        ),
        (["recipes/sentiment/lora.yaml", "--project", "llama-9"], "--project='llama-9' is neither a preset"),
        (["recipes/sentiment/lora.yaml", "--project_dtype", "int3"], "--project_dtype='int3' is not one of"),
        ([], "RECIPE: none given"),
        (  # a misspelled option: the recipe's own fit parser refuses it, before the first run
            ["recipes/sentiment/lora.yaml", "--trainer.max_stepz", "3"],
            "RECIPE='recipes/sentiment/lora.yaml' with the options given: ",
        ),
        (  # a value of the wrong type, only in the second recipe's key
            ["recipes/sentiment/full.yaml", "recipes/sentiment/lora.yaml", "--lora.init_args.r", "eight"],
            "RECIPE='recipes/sentiment/full.yaml' with the options given: ",
        ),
    ],
)
def test_bad_input_is_one_line_before_anything_runs(
    argv: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(subprocess, "Popen", _no_run)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *argv, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Fix" in err, err
    assert not (tmp_path / "out").exists()


def test_an_earlier_compare_is_not_overwritten_unasked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(subprocess, "Popen", _no_run)
    (tmp_path / "out" / "lora").mkdir(parents=True)
    (tmp_path / "out" / "lora" / "run.log").write_text("earlier")
    with pytest.raises(SystemExit):
        main(["compare", str(RECIPES[1]), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"--output={str(tmp_path / 'out')!r}: holds runs of an earlier compare" in err and "--overwrite" in err


def test_a_packed_batch_counts_its_examples_not_its_rows() -> None:
    from lightning_adapt.compare.record import _batch_size
    from lightning_adapt.data.batching import pack_collate

    rows = [{"input_ids": [5] * n, "labels": [0] * n} for n in (4, 7, 3)]
    packed = pack_collate(rows)
    assert _batch_size(packed) == (3, 14)
    padded = {
        "input_ids": torch.ones(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]),
    }
    assert _batch_size(padded) == (2, 7)


def test_command_line_split_and_failure_lines(tmp_path: Path) -> None:
    options = parse_args(["a.yaml", "--trainer.max_steps", "60", "b.yaml", "--output=o", "--model.x=1", "--overwrite"])
    assert (options.recipes, options.output, options.overwrite) == (["a.yaml", "b.yaml"], "o", True)
    assert options.overrides == ["--trainer.max_steps", "60", "--model.x", "1"]
    log = tmp_path / "run.log"
    log.write_text("step 3\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert failure(log, 1) == "out of memory (exit 1)"
    log.write_text("loading\n")
    assert failure(log, -9) == "out of memory (exit -9)"  # killed by the kernel's OOM killer
    log.write_text("Traceback\nValueError: a bug\n  during teardown\n")
    assert failure(log, 1) == "exit 1: ValueError: a bug"


def test_runs_print_none_of_the_libraries_noise(compared: dict[str, Any]) -> None:
    """Each compared fit is a real `python -m lightning_adapt.cli fit` (its whole output in run.log): Lightning's
    litlogger/litmodels tips, bitsandbytes' trust_remote_code advice and the _pytree deprecation are hidden."""
    from lightning_adapt.checks import NOISE

    logs = {name: (compared["out"] / name / "run.log").read_text() for name in ("full", "lora", "qlora")}
    assert all("lightning-adapt: LoRA r=8" in logs[name] for name in ("lora", "qlora")), "the project still speaks"
    for name, text in logs.items():
        for _, start in NOISE:
            assert start not in text, (name, start)
        assert "trust_remote_code" not in text and "litlogger" not in text and "litmodels" not in text, name
