"""benchmarks/run_all.py on synthetic results: the ratio table, pass/fail against each target, rows that could not
be measured, the RESULTS.md block replaced in place (hand-written text kept), the plot written. No benchmark runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import run_all
from bench_lora import Result


def measured() -> dict[str, dict[str, Any] | str]:
    return {
        "lora-fp32": {
            "describe": "fp32 settings",
            "results": {  # both shapes a script may return: Result objects and plain dicts
                "ours": Result("ours", [0.9, 0.95, 0.85], {"peak_bytes": 100}),
                "peft": Result("peft", [1.0, 1.0, 1.0], {"peak_bytes": 200}),
                "ours-dora": {"times": [0.7, 0.75, 0.72], "info": {"cpu_times": [9.0, 0.5, 0.6, 0.7]}},  # warmup first
                "peft-dora": {"times": [1.0, 1.0, 1.0], "info": {"cpu_times": [9.0, 1.0, 1.0, 1.0]}},
            },
        },
        "lora-bf16": {
            "results": {  # the frozen base with no adapter (the floor) above the target: unreachable here
                "ours": {"times": [2.0, 2.2, 2.1]},
                "peft": {"times": [1.0, 1.0, 1.0]},
                "floor": {"times": [1.8, 2.0, 1.9]},
            }
        },
        "qlora-bf16": "qlora-bf16 failed: ModuleNotFoundError: No module named 'bitsandbytes'",
    }


def outcome(label: str) -> run_all.Outcome:
    row = next(r for r in run_all.ROWS if r.label == label)
    return run_all.evaluate(row, measured())


def test_ratios_and_verdicts() -> None:
    lora = outcome("LoRA ours / PEFT (fp32)")
    assert (lora.median, lora.low, lora.high, lora.memory) == (0.9, 0.85, 0.95, 0.5)
    assert lora.verdict.startswith("PASS (range straddles")  # median at the target 0.9, range across it
    assert outcome("DoRA ours / PEFT (fp32)").verdict == "PASS"
    assert outcome("DoRA ours / PEFT (fp32)").median == pytest.approx(0.72)
    assert outcome("LoRA ours / PEFT (bf16)").verdict == (
        "FAIL: unreachable here, the step-time floor 1.900 is above the target"
    )
    dora_bf16 = run_all.Row("DoRA (bf16)", "dora", "ours-dora", "peft-dora", 0.8, floor="ours")
    cpu = {"dora": {"results": {  # wall time says the floor is under the target; CPU time (trusted) says not
        "ours": {"times": [0.7, 0.7], "info": {"cpu_times": [0.85, 0.85]}},
        "ours-dora": {"times": [0.9, 0.9], "info": {"cpu_times": [0.95, 0.95]}},
        "peft-dora": {"times": [1.0, 1.0], "info": {"cpu_times": [1.0, 1.0]}},
    }}}  # fmt: skip
    judged = run_all.evaluate(dora_bf16, cpu)  # type: ignore[arg-type]
    assert (judged.floor, judged.bound) == (pytest.approx(0.7), pytest.approx(0.85))
    assert judged.verdict == "FAIL: unreachable here, the CPU-time floor 0.850 is above the target"
    assert outcome("DoRA ours / PEFT (fp32)").floor == pytest.approx(0.9)  # plain LoRA bounds DoRA; it passes anyway
    assert outcome("LoRA ours / PEFT (fp32)").floor is None  # no floor contender in that group
    assert (
        outcome("DoRA ours / PEFT (bf16)").verdict
        == "not measured: no contender ours-dora, peft-dora in lora-bf16 (have: ours, peft, floor)"
    )
    assert outcome("compiled / eager LoRA (fp32)").verdict.startswith("not measured: no contender ours-compiled")
    assert outcome("QLoRA ours / PEFT+bnb (bf16 model, bf16 compute)").verdict == (
        "not measured: qlora-bf16 failed: ModuleNotFoundError: No module named 'bitsandbytes'"
    )
    assert (
        outcome("packed / padded chat batching (max_length 64)").verdict
        == "not measured: group chat not run (--groups)"
    )


def test_report_block_and_plot(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Results\n\nintro\n" + run_all.BEGIN + "\nold numbers\n" + run_all.END + "\n\n## Analysis\nkept\n"
    )
    plot = tmp_path / "img" / "ratios.png"
    env = {**run_all.machine(), **run_all.versions()}
    block = run_all.report(measured(), results, plot, "python benchmarks/run_all.py --reps 3", env)
    run_all.report(measured(), results, plot, "python benchmarks/run_all.py --reps 3", env)  # twice: replaced
    text = results.read_text()
    assert text.count(run_all.BEGIN) == 1 and "old numbers" not in text
    assert text.startswith("# Results\n\nintro\n") and text.endswith("## Analysis\nkept\n")
    assert (
        "| DoRA ours / PEFT (fp32) | lora-fp32 | 0.720 | 0.700..0.750 | ≤ 0.8 | PASS | 0.600 (0.500..0.700) | 0.900 |"
        in block
    )
    assert "| LoRA ours / PEFT (fp32) | lora-fp32 | 0.900 | 0.850..0.950 | ≤ 0.9 | PASS (range straddles" in block
    assert "| 0.500 |" in block.split("LoRA ours / PEFT (fp32)")[1].splitlines()[0]  # peak memory 100 / 200
    assert "| LoRA ours / PEFT (bf16) | lora-bf16 | 2.100 | 2.000..2.200 | ≤ 0.9 | FAIL: unreachable here" in block
    for key in ("cpu", "cores", "load average", "bf16 hardware", "date", "torch", "transformers", "peft", "lightning"):
        assert f"**{key}" in block
    assert "- `qlora-bf16`: qlora-bf16 failed" in block and "- `lora-fp32`: fp32 settings" in block
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert not [p for p in plot.parent.iterdir() if p != plot]  # no temp file left beside it


def test_the_floor_contender_trains_nothing_and_backpropagates_through_every_block() -> None:
    """The floor is the base's own step: no trainable parameter, yet every block's input gradient computed."""
    import bench_lora
    import torch

    s = bench_lora.Settings(hidden=32, layers=2, heads=4, intermediate=64, vocab=128, seq=8)
    model, _ = bench_lora.floor(s)
    assert not any(p.requires_grad for p in model.parameters())
    seen: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        args[0].retain_grad()  # a block's input hidden states: their gradient is what an adapter in it needs
        seen.append(args[0])

    for block in model.model.layers:
        block.register_forward_pre_hook(keep)
    ids = torch.randint(0, s.vocab, (1, s.seq))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(seen) == s.layers and all(h.grad is not None and h.grad.abs().sum() > 0 for h in seen)


def test_plot_draws_the_measured_medians(tmp_path: Path) -> None:
    outcomes = [run_all.evaluate(row, measured()) for row in run_all.ROWS]
    drawn = run_all.plot(outcomes, tmp_path / "r.png")
    assert drawn == pytest.approx([0.9, 2.1, 0.72])  # the measured rows in table order, nothing else


def test_block_inserted_after_the_title_when_absent() -> None:
    spliced = run_all.splice("# Results\nhand-written\n", "BLOCK\n")
    assert spliced == "# Results\n\nBLOCK\n\nhand-written\n"


def test_raw_json_round_trip_and_chat_options(tmp_path: Path) -> None:
    saved = run_all.json.loads(run_all.to_json(measured(), "cmd", {"cpu": "x"}))
    assert (saved["command"], saved["env"]) == ("cmd", {"cpu": "x"})
    raw = saved["groups"]
    assert raw["lora-fp32"]["results"]["ours"]["times"] == [0.9, 0.95, 0.85]
    row = run_all.ROWS[0]
    assert run_all.evaluate(row, raw) == run_all.evaluate(row, measured())
    common = ["--quick", "--layers", "2", "--reps", "2", "--threads", "1"]
    assert run_all.chat_argv(common, "--train-size 8") == [
        "--quick",
        "--reps",
        "2",
        "--threads",
        "1",
        "--train-size",
        "8",
    ]
