"""Rank diagnostics: exact on constructed updates of known rank, and ``lightning-adapt inspect`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
from safetensors.torch import save_file

from lightning_adapt.adapters.spectrum import (
    effective_rank,
    layer_type,
    spectra_from_state,
    suggest_ranks,
    update_singular_values,
)
from lightning_adapt.entry import main


def _rank_k_factors(out: int, inp: int, r: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (r × in) and ``B`` (out × r) whose product has rank exactly ``k`` (r - k rows of ``A`` are zero)."""
    gen = torch.Generator().manual_seed(seed)
    lora_A = torch.randn(r, inp, generator=gen)
    lora_A[k:] = 0
    return lora_A, torch.randn(out, r, generator=gen)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_update_of_known_rank_reports_that_rank(k: int) -> None:
    lora_A, lora_B = _rank_k_factors(40, 24, 8, k)
    values = update_singular_values(lora_A, lora_B, scaling=2.0)
    reference = torch.linalg.svdvals(2.0 * lora_B.double() @ lora_A.double())[:8]
    torch.testing.assert_close(values, reference, rtol=1e-9, atol=1e-9)
    (spectrum,) = spectra_from_state({"blk.0.q.lora_A.weight": lora_A, "blk.0.q.lora_B.weight": lora_B}, alpha=16)
    assert spectrum.numerical_rank == k
    assert spectrum.effective_rank(0.99) <= k  # energy ranks never exceed the true rank
    assert spectrum.effective_rank(1.0) == k


def test_effective_rank_counts_energy() -> None:
    # energies 64, 16, 9, 1 of 90: 71.1 % / 88.9 % / 98.9 % / 100 % cumulative.
    values = torch.tensor([8.0, 4.0, 3.0, 1.0])
    assert [effective_rank(values, e) for e in (0.5, 0.88, 0.9, 0.98, 0.99, 1.0)] == [1, 2, 3, 3, 4, 4]
    assert effective_rank(torch.zeros(4), 0.9) == 0  # untrained (B = 0) update


def test_suggestion_rounds_used_rank_up_to_power_of_two() -> None:
    state = {}
    for i, k in enumerate([2, 3]):
        lora_A, lora_B = _rank_k_factors(16, 16, 16, k, seed=i)
        state |= {f"model.layers.{i}.self_attn.q_proj.lora_A.weight": lora_A}
        state |= {f"model.layers.{i}.self_attn.q_proj.lora_B.weight": lora_B}
    (suggestion,) = suggest_ranks(spectra_from_state(state, alpha=32))
    assert (suggestion.layer_type, suggestion.r, suggestion.suggested_r) == ("self_attn.q_proj", 16, 4)
    assert suggestion.used_rank <= 3
    assert suggestion.sentence().startswith(
        f"r=16 on self_attn.q_proj used an effective rank of {suggestion.used_rank}"
    )
    assert "r=4 would keep 99% of the update" in suggestion.sentence()
    assert layer_type("encoder.layer.11.attention.output.dense") == "attention.output.dense"


def test_inspect_command_on_peft_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lora_A, lora_B = _rank_k_factors(32, 32, 8, 2)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    prefix = "base_model.model.layers.0.v_proj"
    save_file(
        {f"{prefix}.lora_A.weight": lora_A, f"{prefix}.lora_B.weight": lora_B}, adapter / "adapter_model.safetensors"
    )
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 4}))
    plot, report = tmp_path / "spectra.png", tmp_path / "rank.json"
    main(["inspect", "--ckpt_path", str(adapter), "--plot", str(plot), "--json", str(report)])
    out = capsys.readouterr().out
    assert "| layers.0.v_proj | 8 |" in out and "r=8 on v_proj used an effective rank of" in out
    data = json.loads(report.read_text())
    expected = torch.linalg.svdvals(0.5 * lora_B.double() @ lora_A.double())[:8]  # alpha / r = 4 / 8
    torch.testing.assert_close(torch.tensor(data["layers"][0]["singular_values"], dtype=torch.float64), expected)
    assert data["layers"][0]["numerical_rank"] == 2
    assert plot.stat().st_size > 5_000 and matplotlib.image.imread(plot).shape[0] > 100


def test_inspect_bad_path_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--ckpt_path=" in err and "Fix:" in err
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "full.ckpt")
    with pytest.raises(SystemExit):
        main(["inspect", "--ckpt_path", str(tmp_path / "full.ckpt")])
    assert "holds no LoRA adapter weights" in capsys.readouterr().err


def test_real_adapter_of_the_sentiment_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real LoRA run (recipes/sentiment/lora.yaml, 3 steps): the spectra read from its .ckpt (alpha from the
    recipe) equal those from its exported PEFT adapter (alpha from adapter_config.json), and both equal the
    singular values of the merged weight minus the original base weight, the update as exported."""
    from safetensors import safe_open

    from lightning_adapt.models import resolve_model

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    main([
        "fit", "--config", "recipes/sentiment/lora.yaml", "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
        "--data.init_args.train_size=32", "--data.init_args.val_size=8", "--data.init_args.batch_size=8",
        "--data.init_args.max_length=32", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ])  # fmt: skip
    (ckpt,) = tmp_path.rglob("last.ckpt")
    (adapter,) = tmp_path.rglob("export/adapter")
    capsys.readouterr()
    main(
        [
            "inspect",
            "--ckpt_path",
            str(ckpt),
            "--config",
            "recipes/sentiment/lora.yaml",
            "--json",
            str(tmp_path / "c.json"),
        ]
    )
    main(["inspect", "--ckpt_path", str(adapter), "--json", str(tmp_path / "a.json")])
    from_ckpt = json.loads((tmp_path / "c.json").read_text())["layers"]
    from_adapter = json.loads((tmp_path / "a.json").read_text())["layers"]
    assert len(from_adapter) == 24 and {layer["r"] for layer in from_adapter} == {8}  # 6 blocks x q, k, v, out
    assert [la["name"].removeprefix("model.") for la in from_ckpt] == [la["name"] for la in from_adapter]
    for mine, theirs in zip(from_ckpt, from_adapter, strict=True):
        torch.testing.assert_close(mine["singular_values"], theirs["singular_values"], rtol=1e-12, atol=0)
    name = "encoder.layer.0.attention.self.query.weight"
    merged_file, base_file = (
        adapter.parent / "merged" / "model.safetensors",
        resolve_model("minilm") / "model.safetensors",
    )
    with safe_open(str(merged_file), "pt") as merged, safe_open(str(base_file), "pt") as base:
        delta = merged.get_tensor(f"bert.{name}").double() - base.get_tensor(name).double()
    (layer,) = [la for la in from_adapter if la["name"] == f"bert.{name.removesuffix('.weight')}"]
    reference = torch.linalg.svdvals(delta)[:8]  # the merged fp32 weight rounds ΔW to ~1e-8 absolute
    torch.testing.assert_close(
        torch.tensor(layer["singular_values"], dtype=torch.float64), reference, rtol=1e-3, atol=1e-6
    )
    assert layer["numerical_rank"] == 8 and 1 <= layer["effective_rank_90"] <= layer["effective_rank_99"] <= 8
