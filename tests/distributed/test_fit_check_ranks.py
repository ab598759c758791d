"""The fit check under DDP: one rank short of memory stops every rank, each with a message, none left waiting."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.multiprocess import launch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "fit_check_run.py"


def test_one_rank_that_cannot_fit_stops_them_all(tmp_path: Path) -> None:
    launch(SCRIPT, tmp_path, 2, "--short-rank", "1")
    short, other = ((tmp_path / f"rank{r}.txt").read_text() for r in (1, 0))
    assert short.startswith("fit_check: the run does not fit: full fine-tuning of LlamaForCausalLM (fp32 base")
    assert "(weights 100.0 kB + gradients 100.0 kB + optimizer state 200.0 kB " in short
    assert "patched free memory + the 100.0 kB of weights built already: 100.0 kB." in short, "built in __init__"
    assert other.startswith("fit_check: the run does not fit the device of another rank, whose message gives")
