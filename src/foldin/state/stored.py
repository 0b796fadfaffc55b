"""What a state holds after its last step, read back and checked against the checksums that
state.json recorded when the step committed: the merged task vector, tensor by tensor as it is
read, and the files a data-driven method keeps (its buffer of examples, its refit heads)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from foldin.data import TaskData
from foldin.engine import VerifiedSource
from foldin.errors import FoldinError, StateError
from foldin.io.checkpoint import Checkpoint, open_checkpoint
from foldin.io.shards import merged_file
from foldin.methods.base import Heads
from foldin.runners import StateFiles
from foldin.state.base import open_base
from foldin.state.generation import BUFFER_FILE, HEADS_FILE, read_heads, read_task_data
from foldin.state.lock import locked
from foldin.state.schema import digest_algorithm, file_digest, read_meta


def generation_file(state_dir: Path, meta: dict[str, Any]) -> Path | None:
    """The merged task vector's file (or shard index) of the current generation; None at step 0."""
    return merged_file(state_dir / meta["generation"]) if meta["generation"] else None


def generation_path(state_dir: Path, meta: dict[str, Any], name: str) -> Path | None:
    """A file of the current generation (None if it has none), checked against its recorded checksum."""
    recorded = meta.get("checksums", {}).get("files", {})
    path = state_dir / meta["generation"] / name if meta["generation"] else None
    if path is None or not path.exists():
        if name in recorded:
            raise StateError(f"the merge state in {state_dir} is corrupted: {name} is missing from its generation.")
        return None
    if recorded.get(name) is None or file_digest(path) != recorded[name]:
        raise StateError(
            f"the merge state in {state_dir} is corrupted: {name} does not match its checksum; restore it "
            f"from a backup."
        )
    return path


def open_generation(state_dir: Path, meta: dict[str, Any]) -> VerifiedSource | None:
    """The merged task vector of the current generation (None at step 0), verified as it is read."""
    path = generation_file(state_dir, meta)
    if path is None:
        return None
    try:
        ckpt = open_checkpoint(path)
    except FoldinError as e:
        raise StateError(f"the merge state in {state_dir} is corrupted: {e}") from e
    return VerifiedSource(ckpt, meta["checksums"]["merged"], str(state_dir))


def state_files(state_dir: Path, meta: dict[str, Any]) -> StateFiles:
    """The state's tensors as paths, for a backend whose workers open them (and verify what they read)."""
    gen = generation_file(state_dir, meta)
    return StateFiles(
        str(state_dir.resolve()),
        meta["base"]["path"],
        str(gen.resolve()) if gen else None,
        dict(meta.get("checksums", {}).get("merged", {})),
        digest_algorithm(meta),
    )


def stored_buffer(state_dir: Path, meta: dict[str, Any]) -> TaskData | None:
    """The examples of the last task that a data-driven method kept for the next step."""
    path = generation_path(state_dir, meta, BUFFER_FILE)
    return read_task_data(path) if path else None


def stored_heads(state_dir: Path, meta: dict[str, Any]) -> Heads:
    """Classification heads refit by a data-driven method (OTMF's head refit), by task."""
    return read_heads(generation_path(state_dir, meta, HEADS_FILE))


@contextmanager
def reading(state_dir: Path) -> Iterator[tuple[dict[str, Any], Checkpoint, VerifiedSource | None]]:
    """Hold a shared lock and yield (state.json as it is now, the base, the merged task vector or
    None at step 0)."""
    with locked(state_dir, exclusive=False):
        meta = read_meta(state_dir)
        base, _ = open_base(meta["base"], digest_algorithm(meta))
        with base:
            merged = open_generation(state_dir, meta)
            try:
                yield meta, base, merged
            finally:
                if merged is not None:
                    merged.close()


def verify(state_dir: Path) -> int:
    """Read everything the state holds and check it against its checksums; returns the bytes checked."""
    with reading(state_dir) as (meta, _, merged):
        if merged is not None:
            for name in merged.names():
                merged.read(name)
        for name in (BUFFER_FILE, HEADS_FILE):
            generation_path(state_dir, meta, name)
    gen = state_dir / meta["generation"] if meta["generation"] else None
    return sum(f.stat().st_size for f in gen.iterdir()) if gen else 0
