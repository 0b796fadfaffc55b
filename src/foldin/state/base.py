"""A state's base model: opened and checked against the identity recorded when the state was made.

The identity is a cheap file fingerprint (names, sizes, modification times) and, from the first
step on, a content hash. A changed fingerprint is not yet an error: the same content copied to new
files hashes the same, and then the new fingerprint is what the next step records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from foldin.engine import hash_source
from foldin.errors import MismatchError
from foldin.io.checkpoint import Checkpoint, open_checkpoint
from foldin.io.hub import locate


def open_base(base_info: dict[str, Any], checksum: str) -> tuple[Checkpoint, dict[str, Any]]:
    """Open the base a state records and make sure it is still that model.

    Args:
        base_info: state.json's "base" record.
        checksum: the hash algorithm of the state's digests.

    Returns:
        The open checkpoint, and the base record to commit with the next step: `base_info` itself,
        or a copy with the new fingerprint where the same content now sits in other files.
    """
    path = Path(base_info["path"])
    if not path.exists() and base_info.get("hub_id"):  # a cleared Hugging Face cache: the same commit again
        path = locate(f"{base_info['hub_id']}@{base_info['revision']}").path
    ckpt = open_checkpoint(path)
    if ckpt.fingerprint() == base_info["fingerprint"]:
        return ckpt, base_info
    if base_info["hash"] is None or hash_source(ckpt, checksum) != base_info["hash"]:
        ckpt.close()
        raise MismatchError(
            f"the base model at {base_info['path']} has changed since this state was created; restore "
            f"it or start a new state."
        )
    return ckpt, {**base_info, "fingerprint": ckpt.fingerprint()}  # same content, new files (e.g. copied)


def check_base(base: str | os.PathLike[str], base_info: dict[str, Any], checksum: str, state_dir: Path) -> None:
    """Refuse a base that is not the state's base (compared by content where the files differ)."""
    path = locate(base).path
    with open_checkpoint(path) as ckpt:
        if path.resolve() == Path(base_info["path"]) and ckpt.fingerprint() == base_info["fingerprint"]:
            return
        if base_info["hash"] is None or hash_source(ckpt, checksum) != base_info["hash"]:
            raise MismatchError(f"{base} is not the base model of the state in {state_dir} (its content differs).")
