"""Write files so that a failure never leaves a half-written destination."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, *, directory: bool = False) -> Iterator[str]:
    """Yield a temporary path next to ``dst``; on success it replaces ``dst`` (``os.replace``),
    on failure it is removed and ``dst`` is left untouched."""
    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(dst)}.tmp-"
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        # writers such as orbax want to create the directory themselves
        os.rmdir(tmp)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
        os.close(fd)
    try:
        yield tmp
        if directory and os.path.isdir(dst):
            # os.replace cannot replace a non-empty directory: move the old one aside first
            old = tempfile.mkdtemp(prefix=prefix + "old-", dir=parent)
            os.replace(dst, os.path.join(old, "x"))
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise
