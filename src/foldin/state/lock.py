"""One writer at a time: an advisory lock on STATE_DIR/.lock (shared for readers)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from foldin.errors import StateError


@contextmanager
def locked(state_dir: Path, exclusive: bool) -> Iterator[None]:
    fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(
                f"{state_dir} is in use by another foldin process; try again when it has finished."
            ) from None
        yield
    finally:
        os.close(fd)
