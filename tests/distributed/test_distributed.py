"""Several processes on CPU (gloo): DDP with LoRA and QLoRA gives what one process with the whole batch gives.

Each case launches ``tests/helpers/distributed_run.py`` as a user would (Lightning's launcher starts the other
rank), fp32, dropout 0, every rank its own slice of each global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.multiprocess import assert_same_weights, global_losses, launch, ranks
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "distributed_run.py"
STEPS_PER_EPOCH = 4  # 64 rows / global batch 16


def _run(out: Path, devices: int, method: str = "lora", *extra: str, check: bool = True) -> Any:
    return launch(SCRIPT, out, devices, "--method", method, *extra, check=check)


_ranks, _global_losses, _assert_same_weights = ranks, global_losses, assert_same_weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    paths = {name: root / name for name in ("one", "two", "qlora-one", "qlora-two")}
    _run(paths["one"], 1)
    _run(paths["two"], 2, "lora", "--export")
    _run(paths["qlora-one"], 1, "qlora")
    _run(paths["qlora-two"], 2, "qlora")
    return paths


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_two_processes_train_as_one_with_twice_the_batch(runs: dict[str, Path], method: str) -> None:
    prefix = "" if method == "lora" else "qlora-"
    one, two = _ranks(runs[prefix + "one"], 1), _ranks(runs[prefix + "two"], 2)
    assert len(one[0]["losses"]) == 2 * STEPS_PER_EPOCH
    torch.testing.assert_close(_global_losses(two), _global_losses(one), atol=1e-5, rtol=0)
    for name, value in two[0]["trainable"].items():  # identical on every rank, bit for bit
        assert torch.equal(value, two[1]["trainable"][name]), name
    _assert_same_weights(two[0]["trainable"], one[0]["trainable"])
    assert two[0]["ddp_ignored"] > 0, "the frozen base is not broadcast by DDP"
    assert one[0]["trainable"] and all("lora_" in n for n in one[0]["trainable"])


def test_files_are_written_once_by_rank_zero(runs: dict[str, Path]) -> None:
    checkpoints = sorted(p.name for p in (runs["two"] / "ckpt").iterdir())
    assert checkpoints == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    assert all((runs["two"] / "ckpt" / c).stat().st_size < 200_000 for c in checkpoints), "adapter-only"
    exported = runs["two"] / "export"
    assert (exported / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in runs["two"].iterdir() if p.name.startswith(".")) == [], "no temp dirs left"


@pytest.mark.parametrize(("saved", "resumed"), [(2, 1), (1, 2)])
def test_resume_across_world_sizes_reproduces_the_uninterrupted_run(
    runs: dict[str, Path], tmp_path: Path, saved: int, resumed: int
) -> None:
    source = runs["two" if saved == 2 else "one"]
    _run(tmp_path, resumed, "lora", "--resume", str(source / "ckpt" / "epoch=0-step=4.ckpt"))
    after = _ranks(tmp_path, resumed)
    uninterrupted = _ranks(source, saved)
    assert len(after[0]["losses"]) == STEPS_PER_EPOCH, "only the second epoch ran"
    torch.testing.assert_close(
        _global_losses(after), _global_losses(uninterrupted)[STEPS_PER_EPOCH:], atol=1e-5, rtol=0
    )
    _assert_same_weights(after[0]["trainable"], uninterrupted[0]["trainable"])


def test_a_base_that_differs_between_ranks_is_refused(tmp_path: Path) -> None:
    done = _run(tmp_path, 2, "lora", "--per-rank-seed", check=False)
    assert done.returncode != 0
    assert "the frozen base differs between rank 0 and rank(s) [1]" in done.stdout + done.stderr


@pytest.mark.parametrize("init", ["loftq"])
def test_a_changed_base_trains_and_exports_under_ddp_as_in_one_process(tmp_path: Path, init: str) -> None:
    """LoftQ (SVDs of each weight and of its NF4 error) computed on every rank gives every rank the same base and
    adapters: two processes train as one with the whole batch, and rank 0's merge into the original weights,
    ``W + s(BA - B0A0)``, equals the one-process export.

    One thread in every process, so that the SVDs run the same LAPACK path everywhere (DDP gives each rank
    ``cores / ranks``). With that the adapters start bit-identical on one and on two processes (measured with 0
    epochs). The two ranks' averaged gradient differs from the whole batch's in its last bits, and after 8 steps at
    lr 0.05 the weights differ by at most 8.4e-7 with PiSSA but 2.4e-5 with LoftQ: 1e-4 here (the losses: 1e-5).
    """
    for name, devices in (("one", 1), ("two", 2)):
        _run(tmp_path / name, devices, "qlora", "--init", init, "--export", "--threads", "1")
    one, two = _ranks(tmp_path / "one", 1), _ranks(tmp_path / "two", 2)
    torch.testing.assert_close(_global_losses(two), _global_losses(one), atol=1e-5, rtol=0)
    for name, value in two[0]["trainable"].items():
        assert torch.equal(value, two[1]["trainable"][name]), name
    _assert_same_weights(two[0]["trainable"], one[0]["trainable"], atol=1e-4)
    merged = [load_file(tmp_path / run / "export" / "merged" / "model.safetensors") for run in ("one", "two")]
    _assert_same_weights(merged[1], merged[0], atol=1e-4)
    assert not [k for k in merged[0] if "lora_" in k], "A0 / B0 never reach merged/"
