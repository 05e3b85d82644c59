"""Write files so that a failure never leaves a half-written destination.

:func:`atomic_path` yields a temporary path next to the destination and moves it into place only on
success. Around that it enforces what a careful ``cp`` would:

* only a regular file (or, for directory writers such as orbax, a directory) is ever replaced: a device
  node, FIFO or socket at the destination is refused, never swapped for a new file;
* a symlink destination is written through: the link stays and its target is replaced;
* a new file gets the mode ``0o666 & ~umask`` (a replaced file keeps its mode), not ``mkstemp``'s 0600;
* the temporary path is removed on any error, on ``KeyboardInterrupt`` (SIGINT) and on
  :class:`Terminated` (raised by the SIGTERM handler of :func:`terminate_raises`);
* concurrent writers of one destination: every writer holds an ``flock`` on its temporary path, and a writer
  that finds another live one raises :class:`ConcurrentWriteError` (a stale temporary file left by a killed
  process, unlocked, is ignored).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator

from interop.errors import CheckpointError


class ConcurrentWriteError(CheckpointError):
    """Another process is writing the same destination right now."""


class Terminated(BaseException):  # noqa: N818 - mirrors KeyboardInterrupt, which it stands next to
    """Raised in the main thread by the SIGTERM handler of :func:`terminate_raises`."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def resolve_destination(dst: str | os.PathLike, *, directory: bool = False) -> str:
    """The absolute path that will be replaced: symlinks followed (the link itself is kept), and a
    CheckpointError when that path exists but is not a regular file (a directory for ``directory=True``)."""
    path = os.path.realpath(os.path.abspath(os.fspath(dst)))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    want_ok = stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)
    if not want_ok:
        shown = os.fspath(dst) if path == os.path.abspath(os.fspath(dst)) else f"{os.fspath(dst)} (-> {path})"
        want = "a directory (orbax checkpoints are directories)" if directory else "a regular file"
        raise CheckpointError(
            f"{shown}: refusing to replace {_kind(mode)}; the destination must be {want} or not exist yet"
        )
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _live_writers(prefix: str, parent: str, own: str) -> list[str]:
    """Temporary paths of other writers of the same destination that still hold their lock."""
    live = []
    for other in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")):
        if other == own or os.path.basename(other)[len(prefix) :].startswith("old-"):
            continue
        try:
            fd = os.open(other, os.O_RDONLY)
        except OSError:  # finished or removed meanwhile
            continue
        try:
            if not _lock(fd):
                live.append(other)
        finally:
            os.close(fd)  # closing drops a lock we took on a stale file
    return live


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, *, directory: bool = False) -> Iterator[str]:
    """Yield a temporary path next to ``dst`` (its symlink target, if ``dst`` is a link); on success it
    replaces that path (``os.replace``), on failure or interruption it is removed and ``dst`` is untouched.

    Raises CheckpointError when ``dst`` is neither absent nor a regular file (a directory for
    ``directory=True``) and ConcurrentWriteError when another writer of ``dst`` is active.
    """
    target = resolve_destination(dst, directory=directory)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(target)}.tmp-"
    try:
        old_mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        old_mode = None
    if directory:
        holder = tempfile.mkdtemp(prefix=prefix, dir=parent)
        tmp = os.path.join(holder, "checkpoint")  # writers such as orbax want to create the directory themselves
        lock_fd = os.open(holder, os.O_RDONLY)
    else:
        lock_fd, holder = tempfile.mkstemp(prefix=prefix, dir=parent)
        tmp = holder
    try:
        _lock(lock_fd)
        others = _live_writers(prefix, parent, holder)
        if others:
            raise ConcurrentWriteError(
                f"{os.fspath(dst)}: another process is writing this destination right now (its temporary "
                f"path: {others[0]}); wait for it to finish, or write to another path"
            )
        yield tmp
        if directory:
            os.chmod(tmp, old_mode if old_mode is not None else 0o777 & ~_umask())
        else:
            os.chmod(tmp, old_mode if old_mode is not None else 0o666 & ~_umask())
        resolve_destination(dst, directory=directory)  # a FIFO may have appeared meanwhile
        if directory and os.path.isdir(target):
            # os.replace cannot replace a non-empty directory: move the old one aside first
            old = tempfile.mkdtemp(prefix=prefix + "old-", dir=parent)
            os.replace(target, os.path.join(old, "x"))
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        os.close(lock_fd)
        if os.path.lexists(holder):
            _remove(holder)


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`Terminated` instead of killing the process, so
    ``finally`` blocks (temporary files of :func:`atomic_path`) run. The previous handler is restored."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signal handling alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"terminated by signal {signum}")
