"""Nothing half-written, ever: exports SIGKILLed at random instants and at the commit itself, two exports racing
for one folder, and the atomic-write primitives every writer uses (``lightning_adapt.atomic``).

After every kill the target is absent (a first export), the previous complete export or the new complete one,
compared tensor by tensor; what the dead writer left is hidden (``.<name>.tmp-*``) and the next export removes it
without help. (Checkpoints killed mid-write: tests/reliability/test_exact_resume.py.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.export_kill_run import adapter_state
from helpers.hf import llama_dir, read_tensors

from lightning_adapt import atomic
from lightning_adapt.adapters.inject import LoRASpec
from lightning_adapt.errors import ExportError, setting_names
from lightning_adapt.export.safetensors_io import model_keys, read_index
from lightning_adapt.export.stream_export import export_streamed

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUN = Path(__file__).resolve().parents[1] / "helpers" / "export_kill_run.py"


def _start(base: Path, out: Path, started: Path, seed: int, *flags: str) -> subprocess.Popen[str]:
    started.unlink(missing_ok=True)
    cmd = [sys.executable, str(RUN), str(base), str(out), str(started), str(seed), *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)


def _kill_after(process: subprocess.Popen[str], started: Path, delay: float) -> None:
    """SIGKILL ``delay`` seconds after the export read its first tensor (or when it ends, if sooner)."""
    deadline = time.monotonic() + 120
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    end = time.monotonic() + delay
    while process.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The base and the two complete exports (adapter seeds 1 and 2) every state is compared against."""
    root = tmp_path_factory.mktemp("crash")
    llama_dir(root / "base", hidden=64, layers=4, vocab=256)
    keys = model_keys(read_index(root / "base"))
    from lightning_adapt.export.adapter_sources import adapters_from_checkpoint
    from lightning_adapt.export.exporter import ExportOptions

    complete = {}
    for seed in (1, 2):
        adapters = adapters_from_checkpoint(adapter_state(64, 4, seed), keys, LoRASpec(8, 16.0))
        export_streamed(root / "base", root / f"ref{seed}", adapters, ExportOptions("original", "bf16"), keys=keys)
        complete[seed] = read_tensors(root / f"ref{seed}" / "merged")
    return {"base": root / "base", "complete": complete}


def _state(out: Path, complete: dict[int, dict[str, torch.Tensor]]) -> str:
    """``absent``, ``seed1`` or ``seed2``; fails on anything else (a partial or mixed tree)."""
    visible = sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".") and p.name.startswith("out"))
    assert visible in ([], ["out"]), visible
    if not out.exists():
        return "absent"
    assert sorted(p.name for p in out.iterdir()) == ["merged"], "only a complete tree is ever in place"
    assert (out / "merged" / "config.json").is_file()
    got = read_tensors(out / "merged")
    for seed, tensors in complete.items():
        if got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in got):
            return f"seed{seed}"
    raise AssertionError("the target holds neither complete export")


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_exports_killed_at_random_instants_leave_the_old_or_the_new_complete_tree(
    exports: dict[str, object], tmp_path: Path
) -> None:
    base, complete = exports["base"], exports["complete"]
    assert isinstance(base, Path) and isinstance(complete, dict)
    out, started = tmp_path / "out", tmp_path / "started"
    _kill_after(_start(base, out, started, 1), started, 0.6)
    assert _state(out, complete) == "absent", "a first export killed midway leaves no target"
    assert _start(base, out, started, 1).wait() == 0, "the rerun needs no cleanup"
    assert _state(out, complete) == "seed1" and _hidden(out) == []
    rng, seen = random.Random(0), {"seed1"}
    for _ in range(3):  # re-exports (overwrite) killed anywhere in ~2 s of merging, and the commit after it
        _kill_after(_start(base, out, started, 2), started, rng.uniform(0.0, 2.6))
        seen.add(_state(out, complete))
    assert _start(base, out, started, 2).wait() == 0
    assert _state(out, complete) == "seed2" and _hidden(out) == [], "the last writer cleaned up after the dead ones"
    print("states seen after the kills:", sorted(seen))


@pytest.mark.parametrize("how", ["exchange", "fallback"])
def test_an_export_killed_inside_its_commit_keeps_a_complete_tree(
    exports: dict[str, object], tmp_path: Path, how: str
) -> None:
    """``exchange``: killed right after the atomic swap (new tree in place, old one in a hidden temp).
    ``fallback`` (no renameat2): killed between the two renames; the next writer puts the old tree back first."""
    base, complete = exports["base"], exports["complete"]
    assert isinstance(base, Path) and isinstance(complete, dict)
    out, started = tmp_path / "out", tmp_path / "started"
    shutil.copytree(base.parent / "ref1", out)  # a previous complete export (the fixture's)
    assert _start(base, out, started, 2, "--die-at-commit", how).wait() == -signal.SIGKILL
    if how == "exchange":
        assert _state(out, complete) == "seed2" and any(".tmp-" in name for name in _hidden(out))
    else:
        assert _state(out, complete) == "absent" and any(".old-" in name for name in _hidden(out))
        atomic._recover(out)  # what every later writer of `out` does first
        assert _state(out, complete) == "seed1"
    assert _start(base, out, started, 2).wait() == 0
    assert _state(out, complete) == "seed2" and _hidden(out) == []


def test_two_exports_to_one_folder_one_wins_the_other_gets_one_line(exports: dict[str, object], tmp_path: Path) -> None:
    base, complete = exports["base"], exports["complete"]
    assert isinstance(base, Path) and isinstance(complete, dict)
    out, ready = tmp_path / "out", tmp_path / "ready"
    first = _start(base, out, tmp_path / "s1", 1, "--hold-until", str(ready))  # holds the lock, reads nothing yet
    deadline = time.monotonic() + 120
    while not (tmp_path / "s1").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = _start(base, out, tmp_path / "s2", 2, "--ready", str(ready))  # lets the first go as it starts
    assert second.wait() == 2 and first.wait() == 0
    message = second.stderr.read() if second.stderr else ""
    assert f"{str(out)!r} is being written by another process (pid {first.pid}" in message, message
    assert "Fix: wait for that process to finish, or choose another dirpath." in message
    assert _state(out, complete) == "seed1" and _hidden(out) == []


# --------------------------------------------------------------------------- the primitives, in process


def test_an_atomic_file_is_the_old_content_until_the_new_one_is_complete(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    atomic.write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic.atomic_file(target) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
    atomic.write_text_atomic(target, "new")
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_temps_of_dead_writers_go_and_those_of_live_ones_stay(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = tmp_path / "last.ckpt"
    stale = tmp_path / f".last.ckpt.tmp-{int(dead.stdout)}-abcd"
    live = tmp_path / f".last.ckpt.tmp-{os.getpid()}-abcd"
    other = tmp_path / f".other.ckpt.tmp-{int(dead.stdout)}-abcd"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert atomic.remove_stale(target) == [stale]
    assert live.exists() and other.exists() and not stale.exists()


def test_the_lock_refuses_a_second_writer_and_is_gone_after(tmp_path: Path) -> None:
    target = tmp_path / "export"
    with atomic.target_lock(target):
        with pytest.raises(ExportError) as err, setting_names(target="--output"), atomic.target_lock(target):
            pass
        assert f"--output={str(target)!r} is being written by another process (pid {os.getpid()}" in str(err.value)
    assert list(tmp_path.iterdir()) == [], "the lock file is removed on release"
    with atomic.atomic_directory(target) as tmp:  # free again
        (tmp / "a").write_text("x")
    assert (target / "a").read_text() == "x"


def test_the_free_space_check_names_sizes_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: _Usage(10**9))
    with pytest.raises(ExportError) as err, setting_names(target="--output"):
        atomic.check_free_space(tmp_path / "new" / "export", 2_200_000_000, ", or write bf16")
    assert str(err.value) == (
        f"--output={str(tmp_path / 'new' / 'export')!r}: the export needs about 2.20 GB but only 1.00 GB is free "
        f"on that file system ({tmp_path}). Fix: free some space there or choose another --output, or write bf16."
    )
    atomic.check_free_space(tmp_path / "new", 999_999_999)  # fits: no error


class _Usage:
    def __init__(self, free: int) -> None:
        self.free, self.total, self.used = free, 2 * free, free
