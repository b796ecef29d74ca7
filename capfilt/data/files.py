"""Durable writes, one policy for every writer: write under a temporary name, fsync the data (a file, or every
file of a directory), rename into place, fsync the parent directory. A name in place is therefore complete and
on disk before anything written after it, such as a stats file vouching for it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def sync_dir(directory: Path) -> None:
    """Make renames and deletions in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # a filesystem that cannot sync dirs
            raise
    finally:
        os.close(fd)


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(path: Path) -> None:
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _sync_file(Path(root) / name)
            sync_dir(Path(root))
    else:
        _sync_file(path)


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file or directory into place durably (a directory replaces none: remove an
    old one first)."""
    _sync_tree(tmp)
    os.replace(tmp, path)
    sync_dir(path.parent)


def temporary(path: Path, unique: bool = False) -> Path:
    """The temporary name `path` is written under; per process when `unique` (several may write it at once)."""
    return path.with_name(path.name + (f".{os.getpid()}" if unique else "") + TMP_SUFFIX)


def atomic_write(path: Path, data: bytes, unique: bool = False) -> None:
    """Write `data` to `path` through its temporary name and `publish` it."""
    tmp = temporary(path, unique)
    with open(tmp, "wb") as f:
        f.write(data)
    publish(tmp, path)
