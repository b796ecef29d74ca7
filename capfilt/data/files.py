"""Durable writes, one policy for every writer: write under a temporary name, fsync the data (a file, or every
file of a directory), rename into place, fsync the parent directory. A name in place is therefore complete and
on disk before anything written after it, such as a stats file vouching for it."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

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


def publish(tmp: Path, path: Path, guard: Callable[[], bool] | None = None) -> bool:
    """Rename a finished temporary file or directory into place durably (a directory replaces none: remove an
    old one first). `guard` is asked once the data is on disk, right before the rename: when it says no (the
    writer lost its right to the name, say its shard claim), the temporary file goes instead and False comes back."""
    for check in (False, True):  # once before the sync, which may be slow, and again right before the rename
        if check:
            _sync_tree(tmp)
        if guard is not None and not guard():
            _remove(tmp)
            return False
    os.replace(tmp, path)
    sync_dir(path.parent)
    return True


def _remove(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def temporary(path: Path, unique: bool = False) -> Path:
    """The temporary name `path` is written under. `unique` where other processes, on this machine or another,
    may write the same `path` at the same time (an output directory shared by several jobs): the name then
    carries this process's id and a random tag, so nobody's temporary file is anyone else's."""
    tag = f".{os.getpid()}-{secrets.token_hex(4)}" if unique else ""
    return path.with_name(path.name + tag + TMP_SUFFIX)


def is_temporary_of(name: str, final: str) -> bool:
    """Whether the file name `name` is a temporary name (`unique` or not) of the file name `final`."""
    return name.endswith(TMP_SUFFIX) and (name == final + TMP_SUFFIX or name.startswith(final + "."))


def atomic_write(path: Path, data: bytes, unique: bool = False, guard: Callable[[], bool] | None = None) -> bool:
    """Write `data` to `path` through its temporary name and `publish` it (False: `guard` refused)."""
    tmp = temporary(path, unique)
    with open(tmp, "wb") as f:
        f.write(data)
    return publish(tmp, path, guard)
