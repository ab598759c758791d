"""Exact resume after SIGKILL, and the numerical guard rails.

The kill tests run tests/helpers/exact_resume_run.py in subprocesses: LoRA dropout 0.1, a shuffled training set,
PagedAdamW8bit and a StepLR, a checkpoint every 3 steps (5 batches an epoch, so most are mid-epoch). A run
that SIGKILLs itself in the middle of a step (or while writing a checkpoint) and is restarted with ``ckpt_path="last"`` (twice in one epoch
for LoRA) must end with the uninterrupted run's adapter weights, optimizer and scheduler state and per-step
losses, bit for bit.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.toy import ToyModule, trainer
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_adapt.callbacks.exact_resume import ExactResumeCallback, NotResumableLoaderWarning
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.nonfinite_guard import NonFiniteGuardCallback, NonFiniteStepSkippedWarning
from lightning_adapt.data import ResumableDataLoader, SeededShuffleSampler
from lightning_adapt.errors import ConfigError, NonFiniteError
from lightning_adapt.rng import capture_rng_states, restore_rng_states

pytestmark = pytest.mark.slow

RUN = Path(__file__).resolve().parents[1] / "helpers" / "exact_resume_run.py"
STEPS = 14


def _child(methods: list[str], root: Path, *flags: str) -> int:
    cmd = [sys.executable, str(RUN), "--method", *methods, "--root", str(root), *flags]
    return subprocess.run(cmd, capture_output=True, timeout=300).returncode


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted runs, both methods in one process (each seeds everything at its start)."""
    root = tmp_path_factory.mktemp("straight")
    assert _child(["lora", "qlora"], root) == 0
    return root


def _losses(root: Path) -> list[tuple[int, str]]:
    return [(int(s), v) for s, v in (line.split() for line in (root / "losses.txt").read_text().splitlines())]


def _assert_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _check_killed_in_save(ckpt: Path) -> None:
    """Half of step 6's checkpoint was on disk: only as a hidden temp; ``last.ckpt`` is still step 3's, complete."""
    partial = [p.name for p in ckpt.iterdir() if ".tmp-" in p.name]
    assert len(partial) == 1 and partial[0].startswith(".epoch=1-step=6.ckpt.tmp-"), sorted(ckpt.iterdir())
    assert sorted(p.name for p in ckpt.glob("*.ckpt")) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize(
    ("method", "kills"), [("lora", (("--kill-in-save", 6), ("--kill-at", 11))), ("qlora", (("--kill-at", 5),))]
)
def test_a_run_killed_mid_step_and_resumed_from_last_equals_the_uninterrupted_run(
    straight: Path, tmp_path: Path, method: str, kills: tuple[tuple[str, int], ...]
) -> None:
    """LoRA: killed while writing step 6's checkpoint (AtomicCheckpointIO keeps step 3's ``last.ckpt``), resumed,
    killed again in the middle of step 11, resumed to the end. QLoRA: killed in the middle of step 5."""
    for i, (flag, step) in enumerate(kills):
        assert _child([method], tmp_path, *(["--resume"] if i else []), flag, str(step)) == -9, "must die by SIGKILL"
        if flag == "--kill-in-save":
            _check_killed_in_save(tmp_path / method / "ckpt")
    assert _child([method], tmp_path, "--resume") == 0
    leftovers = [p for p in (tmp_path / method / "ckpt").iterdir() if p.name.startswith(".")]
    assert not leftovers, "the resumed run removed the dead writer's temp file"

    expected = dict(_losses(straight / method))
    assert sorted(expected) == list(range(1, STEPS + 1))
    killed = tmp_path / method
    pieces = _losses(killed)
    assert {step for step, _ in pieces} == set(expected)
    assert len(pieces) > STEPS, "steps after the last checkpoint were trained twice"
    assert [(s, v) for s, v in pieces if expected[s] != v] == []

    a = torch.load(straight / method / "final.pt", weights_only=True)
    b = torch.load(killed / "final.pt", weights_only=True)
    assert any("lora_A" in n for n in a["trainable"]) and a["global_step"] == STEPS
    quant = [s["__bnb_optimizer_quant_state__"] for s in a["optimizer"]["state"].values()]
    assert any(q["state1"].dtype == torch.uint8 for q in quant), "8-bit optimizer state"
    _assert_equal(a, b)

    saved = torch.load(killed / "ckpt" / "last.ckpt", weights_only=True)  # adapter-only, safe to load
    position = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position["batches"] == saved["global_step"] % 5 and set(position["rng"]) >= {"torch", "python", "numpy"}
    assert not any(k.endswith("base_layer.weight") for k in saved["state_dict"])


def _data(n: int = 20) -> TensorDataset:
    return TensorDataset(torch.arange(n).float().unsqueeze(1))


def _rows(batches: Any) -> list[list[int]]:
    return [b[0].squeeze(1).long().tolist() for b in batches]


def test_the_order_depends_only_on_seed_and_epoch() -> None:
    sampler = SeededShuffleSampler(range(10), seed=5)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)
    assert list(sampler) == first and sorted(first) == list(range(10))
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(SeededShuffleSampler(range(4), shuffle=False)) == [0, 1, 2, 3]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_loaded_state_skips_the_trained_batches_once_and_restores_the_random_streams(num_workers: int) -> None:
    make = lambda: ResumableDataLoader(_data(), batch_size=3, shuffle=True, seed=2, num_workers=num_workers)  # noqa: E731
    straight = make()
    it = iter(straight)
    head = _rows([next(it), next(it)])
    state = straight.state_dict()
    after = torch.rand(3)
    tail = _rows(it)
    assert state["batches"] == 2 and state["epoch"] == 0
    assert sorted(i for rows in head + tail for i in rows) == list(range(20))

    resumed = make()
    resumed.load_state_dict(state)
    torch.manual_seed(123)
    rest = iter(resumed)
    assert _rows([next(rest)]) == tail[:1] and torch.equal(torch.rand(3), after)
    assert _rows(rest) == tail[1:]
    assert resumed.state_dict()["batches"] == len(resumed) == 7, "the position counts the skipped batches"
    assert _rows(resumed) == head + tail, "the skip happens once"


def test_a_state_from_an_earlier_epoch_does_not_skip() -> None:
    loader = ResumableDataLoader(_data(), batch_size=4, shuffle=True, seed=2)
    loader.load_state_dict({"epoch": 0, "batches": 2, "rng": None})
    loader.batch_sampler.sampler.set_epoch(1)  # type: ignore[union-attr]
    assert len(_rows(loader)) == 5


def test_rng_states_round_trip_and_load_with_weights_only(tmp_path: Path) -> None:
    state = capture_rng_states()
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_the_ready_datamodules_train_on_a_resumable_loader(tiny_bert_dir: Path) -> None:
    from lightning_adapt.data import TweetSentimentDataModule

    dm = TweetSentimentDataModule(tokenizer=str(tiny_bert_dir), train_size=32, val_size=8, seed=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and loader.seed == 4 and loader.restore_rng
    assert not isinstance(dm.val_dataloader(), ResumableDataLoader)


def test_the_callback_restores_the_random_streams_and_warns_about_a_plain_loader(tmp_path: Path) -> None:
    callback = ExactResumeCallback()
    state = callback.state_dict()
    expected = torch.rand(4)
    callback.load_state_dict(state)
    plain = DataLoader(TensorDataset(torch.randn(8, 64), torch.randint(0, 4, (8,))), batch_size=4)
    seen: list[torch.Tensor] = []

    class Spy(ToyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if not seen:
                seen.append(torch.rand(4))
            return super().training_step(batch, batch_idx)

    with pytest.warns(NotResumableLoaderWarning, match="ResumableDataLoader"):
        trainer(tmp_path, callbacks=[callback], max_steps=1).fit(Spy(), plain)
    assert torch.equal(seen[0], expected)

    seen.clear()
    callback.load_state_dict(state)  # a loader that restores the states itself is left to do it
    resumable = ResumableDataLoader(plain.dataset, batch_size=4)
    trainer(tmp_path, callbacks=[callback], max_steps=1).fit(Spy(), resumable)
    assert not torch.equal(seen[0], expected)


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class _Poisoned(ToyModule):
    """At step ``at``, a NaN loss (``what="loss"``) or a finite loss with NaN gradients (``"gradient"``)."""

    def __init__(self, what: str, at: int = 3) -> None:
        super().__init__()
        self.what, self.at = what, at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        hit = self.global_step == self.at
        out = self(x)
        out = _NaNGradient.apply(out) if hit and self.what == "gradient" else out
        loss = torch.nn.functional.cross_entropy(out, y)
        return loss * float("nan") if hit and self.what == "loss" else loss


def _loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(96, 64, generator=g), torch.randint(0, 4, (96,), generator=g)), 16)


def _guarded_fit(what: str, action: str, steps: int = 5) -> tuple[_Poisoned, NonFiniteGuardCallback, list[Any]]:
    module, guard = _Poisoned(what), NonFiniteGuardCallback(action=action)  # type: ignore[arg-type]
    lora = LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, modules_to_save=["classifier"])
    snapshots: list[Any] = []

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer_: Any, pl_module: Any, *args: Any) -> None:
            state = trainer_.optimizers[0].state_dict()["state"]
            params = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
            snapshots.append((params, {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in state.items()}))

    trainer(callbacks=[lora, guard, Snapshot()], max_steps=steps).fit(module, _loader())
    return module, guard, snapshots


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("loss", r"Non-finite loss at step 3 \(epoch 0, batch 3\): loss = nan \(1 NaN.*every trainable parameter"),
        ("gradient", r"Non-finite gradient at step 3 .*first non-finite gradient: net\.layers\.0\.q_proj\.lora_A"),
    ],
)
def test_the_guard_stops_naming_the_step_and_the_parameter(what: str, expected: str) -> None:
    with pytest.raises(NonFiniteError, match=expected) as info:
        _guarded_fit(what, "stop")
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_the_guard_skips_the_step_leaving_weights_and_optimizer_state_unchanged(what: str) -> None:
    with pytest.warns(NonFiniteStepSkippedWarning, match="at step 3"):
        module, guard, snaps = _guarded_fit(what, "skip")
    assert guard.skipped_steps == [3] and len(snaps) == 5
    _assert_equal(snaps[3], snaps[2])  # the batch of step 3 changed nothing
    assert any(not torch.equal(p, snaps[3][0][n]) for n, p in snaps[4][0].items()), "training went on"
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_the_guard_refuses_an_unknown_action() -> None:
    with pytest.raises(ConfigError, match=r"action='halt'.*\['stop', 'skip'\]"):
        NonFiniteGuardCallback(action="halt")  # type: ignore[arg-type]
