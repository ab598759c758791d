"""Files and directories that are either the previous complete version or the new one, never half of each.

Pure standard library (and :mod:`lightning_adapt.errors`): every writer of the project goes through here, the
checkpoint plugin, both export paths, the converted-model cache and the reports.

* :func:`atomic_file` writes ``.<name>.tmp-<pid>-<token>`` next to the target, ``fsync``\\ s it and renames it
  over the target (``os.replace``, atomic on POSIX within one file system), then ``fsync``\\ s the folder. A
  process killed at any point leaves the old file (or none) plus, at worst, a hidden temp file that the next
  writer of the same target removes (its pid is gone).
* :func:`atomic_directory` does the same for a directory (an export): the new tree is built in a hidden
  sibling, every file is ``fsync``\\ ed, and it takes the target's place by an atomic *exchange*
  (``renameat2(RENAME_EXCHANGE)`` on Linux), so there is no instant at which the target is missing or mixed.
  Where the exchange is not available it falls back to two renames; a kill between them leaves the old tree
  as ``.<name>.old-*``, which the next writer puts back before anything else.
* :func:`target_lock` serialises writers of one target across processes (``flock`` on ``.<name>.lock``,
  released by the kernel if the holder dies): a second export to the same folder gets one clear line instead of
  interleaving its files with the first's.

Example:
    >>> with atomic_file(Path("report.md")) as f:  # doctest: +SKIP
    ...     f.write(b"# report")
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from lightning_adapt.errors import SETTING, ExportError

__all__ = [
    "atomic_directory",
    "atomic_file",
    "check_free_space",
    "check_target",
    "fsync_tree",
    "remove_stale",
    "target_lock",
    "write_bytes_atomic",
    "write_text_atomic",
]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _temp_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process: alive
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse to open or sync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale(target: Path) -> list[Path]:
    """Remove the temp files/dirs (``.<name>.tmp-<pid>-*``) that dead writers of ``target`` left behind.

    A temp whose writer is still running is kept. Returns what was removed.
    """
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        pid = path.name[len(f".{target.name}.tmp-") :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(path)
            removed.append(path)
    return removed


@contextmanager
def atomic_file(target: Path | str) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``target`` (atomically, ``fsync``\\ ed) when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = _temp_name(target, "tmp")
    try:
        with open(tmp, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(target.parent)


def write_bytes_atomic(target: Path | str, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_file`)."""
    with atomic_file(target) as handle:
        handle.write(data)


def write_text_atomic(target: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically (see :func:`atomic_file`)."""
    write_bytes_atomic(target, text.encode("utf-8"))


def fsync_tree(root: Path) -> None:
    """``fsync`` every file under ``root`` and every folder, so a power cut after the rename loses nothing."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


@contextmanager
def target_lock(target: Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (``.<name>.lock`` beside it) for the block.

    Args:
        target: the file or folder about to be written.
        wait: block until the lock is free (e.g. ranks converting one cached model) instead of refusing.

    Raises:
        ExportError: another process holds it (without ``wait``), naming ``target`` (the error's setting), that
            process and the fix.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the atomic rename still protects the target
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(f".{target.name}.lock")
    fd = _acquire(lock_path, wait, fcntl)
    if fd is None:
        holder = _read_pid(lock_path)
        raise ExportError(
            f"{SETTING}={str(target)!r} is being written by another process (pid {holder}; lock "
            f"{lock_path.name}). Fix: wait for that process to finish, or choose another {SETTING}.",
            setting="target",
        )
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()  # before releasing: a waiter then re-checks the inode and retries
        os.close(fd)  # closing the descriptor releases the flock


def _acquire(lock_path: Path, wait: bool, fcntl: Any) -> int | None:
    """Lock ``lock_path``; ``None`` if another process holds it (without ``wait``). Retries when the file was
    unlinked by its previous holder between our open and our lock, so two processes never both hold it."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return None
            raise
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _read_pid(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "?"
    except OSError:
        return "?"


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty directory unless ``overwrite``.

    Raises:
        ExportError: naming ``target`` (the error's setting: ``dirpath``, ``--output`` where renamed) and the fix.
    """
    if target.exists() and not target.is_dir():
        raise ExportError(f"{SETTING}={str(target)!r} is a file. Fix: choose a directory path.", setting="target")
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if entries and not overwrite:
        raise ExportError(
            f"{SETTING}={str(target)!r} exists and is not empty ({entries[:5]}). Fix: choose a new or empty "
            "directory, or allow replacing it (overwrite: true / --overwrite true).",
            setting="target",
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_free_space(target: Path, needed: int, hint: str = "") -> None:
    """Refuse to start writing ``needed`` bytes under ``target`` when its file system has less free space.

    The new tree is complete before the previous one is removed, so an overwrite needs the full size too.

    Raises:
        ExportError: naming ``target`` (the error's setting), the size needed, the space free and the fix.
    """
    folder = target
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ExportError(
            f"{SETTING}={str(target)!r}: the export needs about {_gb(needed)} but only {_gb(free)} is free on "
            f"that file system ({folder}). Fix: free some space there or choose another {SETTING}{hint}.",
            setting="target",
        )


def _recover(target: Path) -> None:
    """Put back a previous tree that a kill between the fallback's two renames left as ``.<name>.old-*``."""
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds.pop(), target)
    for old in olds:
        _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2``); ``False`` where the system cannot."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _commit(tmp: Path, target: Path) -> None:
    if target.is_dir() and any(target.iterdir()):
        if _exchange(tmp, target):
            _remove(tmp)  # now holds the previous tree
        else:
            old = _temp_name(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
    else:
        os.replace(tmp, target)  # over an empty folder too
    _fsync_dir(target.parent)


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False, lock: bool = True) -> Iterator[Path]:
    """Yield a temp dir next to ``target``; when the block succeeds it takes ``target``'s place atomically.

    Writers of one target are serialised (:func:`target_lock`; ``lock=False`` when the caller holds it); stale temps of dead writers and a previous
    tree stranded by a kill are cleaned up first, so a rerun needs no manual cleanup. On any error (or
    interrupt) the temp dir is removed and ``target`` is untouched.

    Raises:
        ExportError: ``target`` is a file, is non-empty without ``overwrite``, or is being written by another
            process; each names ``target`` (the error's setting) and the fix.
    """
    target = Path(target)
    with target_lock(target) if lock else contextlib.nullcontext():
        _recover(target)
        remove_stale(target)
        check_target(target, overwrite)
        tmp = _temp_name(target, "tmp")
        tmp.mkdir(mode=0o755)
        try:
            yield tmp
            fsync_tree(tmp)
            _commit(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
