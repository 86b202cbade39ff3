"""Crash-safe local files: write to a temporary name, fsync, rename, fsync the directory.

A reader, or a process restarted after kill -9, sees such a file completely or not at all. Used by
the filesystem snapshot store and the local record store.
"""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"


def write_temp(directory: Path, data: bytes) -> Path:
    """Write ``data`` to a new fsynced temporary file in ``directory``; the caller moves it into place."""
    tmp = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def fsync_dir(directory: Path) -> None:
    """Make renames and creations inside ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some network filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (temp + fsync + rename + directory fsync)."""
    os.replace(write_temp(path.parent, data), path)
    fsync_dir(path.parent)


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/.lock`` (created with the directory if missing).

    flock, not lockf: it also excludes a second open file in the same process (a scheduler thread).
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
