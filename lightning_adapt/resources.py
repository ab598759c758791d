"""What this process uses, resident memory now and at its peak, and what its device has left. Imports nothing else
of ours.

Peak resident memory is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` is carried over ``exec`` on Linux
(a child spawned by an 800 MB parent reports 795 MB), so it is only the fallback where there is no ``/proc``.
Both count the touched pages of memory-mapped files.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from pathlib import Path

__all__ = ["available_memory_bytes", "current_rss_bytes", "peak_rss_bytes", "reset_peak_rss"]


def current_rss_bytes() -> int:
    """Resident set size now (``/proc/self/statm``); 0 where there is no ``/proc``."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: ``VmHWM``, else ``ru_maxrss``, which Linux carries over ``exec``
    (a spawned child starts with its parent's resident size as its peak)."""
    with contextlib.suppress(OSError, StopIteration, ValueError, IndexError):
        status = Path("/proc/self/status").read_text().splitlines()
        return 1024 * int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Start ``VmHWM`` over from the resident size now (Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``), so that
    a peak measured later is this run's, not an earlier job's in the same process (a notebook, a test session).
    Returns whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def available_memory_bytes(device: str = "cpu", cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[int, str] | None:
    """What a new allocation on ``device`` can still take now, and where that was read; ``None`` where it cannot be.

    ``cuda`` / ``cuda:N``: the driver's free memory (``torch.cuda.mem_get_info``; the CUDA context and other
    processes already out of it) plus what PyTorch's caching allocator holds unused. ``cpu``: ``MemAvailable`` of
    ``/proc/meminfo`` (free memory plus the page cache the kernel can drop; swap not counted), or less where a cgroup
    v2 limit leaves less (``memory.max`` - ``memory.current`` under ``cgroup``).
    """
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        free, _ = torch.cuda.mem_get_info(index)
        unused = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + unused), f"free memory of {device} (torch.cuda.mem_get_info)"
    if device != "cpu":
        return None
    with contextlib.suppress(OSError, StopIteration, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        available = 1024 * int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1])
        where = "available RAM (MemAvailable)"
        limit = _cgroup_room(cgroup)
        if limit is not None and limit < available:
            available, where = limit, "the cgroup's memory.max less memory.current"
        return available, where
    return None


def _cgroup_room(root: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        limit = (root / "memory.max").read_text().strip()
        if limit != "max":
            return max(0, int(limit) - int((root / "memory.current").read_text()))
    return None
