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
from lightning_adapt.cli import main


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
