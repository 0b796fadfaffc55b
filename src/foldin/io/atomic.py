"""Atomic file writes, in one place: a reader (or a crash) sees the old file or folder or the new
one, whole, never a mix. Used by the merge state, the export, the zoo and the benchmark."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def fsync_file(path: Path) -> None:
    """Make a file's content durable (its directory entry needs `fsync_dir` of its folder)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create `path` and any missing parents, durably: each new directory's entry is flushed in its
    parent, so that a crash cannot keep a file inside it while losing the directory itself."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_dir(folder.parent)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE): no moment,
    and no crash, sees either name missing. False where the kernel, the C library or the file
    system does not support it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, then the directories, so that a rename of `path` commits content."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` with the file `write(tmp)` writes, so that readers see either the old or the
    new file, whole: written beside it under a temporary name, flushed, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` with `data` as JSON, atomically (see `write_atomic`)."""
    write_atomic(path, lambda tmp: _write_text(tmp, json.dumps(data, indent=2) + "\n"))


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


def write_dir_atomic(folder: Path, write: Callable[[Path], None]) -> None:
    """Replace `folder` with the folder `write(tmp)` fills, so that readers see the old folder or the
    new one, whole (see `replace_dir`): a stale temporary folder from a crash is discarded first,
    and the parent is made durably."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_dirs(tmp.parent)
    tmp.mkdir()
    write(tmp)
    replace_dir(tmp, folder)


def replace_dir(tmp: Path, target: Path) -> None:
    """Make the complete folder `tmp` become `target` (replacing a previous one), durably: `target`
    is the old complete folder or the new one at every moment, never half-written or missing.
    A previous folder is swapped out in one atomic exchange; where the system cannot exchange
    (not Linux, or a file system without RENAME_EXCHANGE), it is renamed aside first, and a crash
    between the two renames leaves `target` missing, with the old folder complete at
    `.NAME.*.old` beside it."""
    fsync_tree(tmp)
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return
    if exchange(tmp, target):
        fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
    os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
