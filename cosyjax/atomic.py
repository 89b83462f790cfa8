"""Atomic output directories: build in a temp dir, then publish with renames."""

from __future__ import annotations

import contextlib
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
