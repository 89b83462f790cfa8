"""Atomic outputs: build a directory or a file under a temp name next to it, then publish with renames."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from typing import Iterator


def publish_dir(tmp: str, dst: str) -> str:
    """Move the finished directory ``tmp`` to ``dst``, replacing any ``dst``; returns ``dst``'s absolute path.

    ``dst`` is never half-written: the new tree is first moved next to it (a plain rename on the same file
    system), then the old ``dst`` is renamed aside and the new one renamed into place.
    """
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    holder = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        staged = os.path.join(holder, "new")
        shutil.move(tmp, staged)
        if os.path.exists(dst):
            os.rename(dst, os.path.join(holder, "old"))
        os.rename(staged, dst)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    return dst


@contextlib.contextmanager
def staged_dir(dst: str) -> Iterator[str]:
    """A fresh temp directory next to ``dst`` to build an output in.

    When the block ends normally the directory is published as ``dst`` (``publish_dir``); when it
    raises, the directory is removed and ``dst`` is left as it was.
    """
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        yield tmp
        publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)  # reading the mask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_file(dst: str) -> Iterator[str]:
    """A fresh temp path next to ``dst`` (same extension, hidden name) to write one file to.

    When the block ends normally the file is renamed onto ``dst`` (readers see the old file or the
    whole new one, never a part); when it raises, the temp file is removed and ``dst`` is left as it was.
    """
    dst = os.path.abspath(dst)
    directory, name = os.path.split(dst)
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.tmp-", suffix=ext, dir=directory)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result gets the usual mode
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
