"""Atomic file writes, in one place: a reader (or a crash) sees the old file or folder or the new
one, whole, never a mix. Used by the merge state, the export, the zoo and the benchmark."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, then the directories, so that a rename of `path` commits content."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` with the file `write(tmp)` writes, so that readers see either the old or the
    new file, whole: written beside it under a temporary name, flushed, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` with `data` as JSON, atomically (see `write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def replace_dir(tmp: Path, target: Path) -> None:
    """Make the complete folder `tmp` become `target` (replacing a previous one), durably. Between
    the two renames `target` is briefly absent; it is never half-written."""
    fsync_tree(tmp)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
