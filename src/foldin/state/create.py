"""Making a new state: step 0, where the merged model is the base.

Creating a state reads only the base's headers. Its content hash (and the NaN/Inf check) is taken
by the first step, which reads every base tensor anyway, so the base is read once, not twice; until
that step commits, the base's file fingerprint guards it.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

from foldin.engine import ModelLayout, hash_source
from foldin.errors import StateError, io_failure
from foldin.io.atomic import make_dirs
from foldin.io.checkpoint import CHECKSUM, open_checkpoint
from foldin.io.hub import locate
from foldin.layers import resolve_linear_weights
from foldin.methods import get_method
from foldin.state.generation import remove_leftovers
from foldin.state.lock import locked
from foldin.state.schema import FORMAT, FORMAT_VERSION, STATE_FILE, write_meta


def init_leftover(path: Path) -> bool:
    """What an `init` interrupted before its commit leaves: the lock and a temporary state.json."""
    return path.name == ".lock" or (path.name.startswith(f".{STATE_FILE}.") and path.name.endswith(".tmp"))


def create_state(
    state_dir: Path,
    base: str | os.PathLike[str],
    method: str,
    params: dict[str, Any] | None,
    linear_weights: str | None,
    hash_base: bool,
) -> dict[str, Any]:
    """Write a new state's state.json in `state_dir` and return it.

    Args:
        state_dir: a new or empty directory (an interrupted init's leftovers are allowed).
        base: a model folder or file, or a Hub id (org/name[@revision]).
        method, params: the merge method and its parameters, validated before anything is written.
        linear_weights: a regular expression naming the linear weights, instead of the model's nn.Linear modules.
        hash_base: hash the base now (a full read) rather than at the first step.
    """
    merge_method = get_method(method)(**(params or {}))  # validates the parameters first
    if (state_dir / STATE_FILE).exists():
        raise StateError(f"{state_dir} already holds a foldin state; use 'foldin add' or choose another directory.")
    if state_dir.exists() and any(not init_leftover(p) for p in state_dir.iterdir()):
        raise StateError(f"{state_dir} exists and is not empty; choose a new directory for the state.")
    located = locate(base)
    with open_checkpoint(located.path) as ckpt:
        specs = {n: ckpt.spec(n)[1] for n in ckpt.names()}
        if merge_method.uses_linear_weights or linear_weights is not None:
            linear, linear_source = resolve_linear_weights(specs, pattern=linear_weights, config_dir=ckpt.config_dir)
        else:  # building the architecture to find them costs seconds: only for methods that need them
            linear, linear_source = [], f"not used by {merge_method.name}"
        ModelLayout.from_source(ckpt, linear)  # refuses a base with nothing to merge
        base_hash = hash_source(ckpt, CHECKSUM) if hash_base else None
        fingerprint = ckpt.fingerprint()
        config_dir = ckpt.config_dir
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "foldin_version": version("foldin"),
        "method": merge_method.name,
        "params": merge_method.params.model_dump(),
        "base": {
            "path": str(located.path.resolve()),
            "hash": base_hash,
            "fingerprint": fingerprint,
            "config_dir": str(config_dir.resolve()) if config_dir else None,
            **({"hub_id": located.hub_id, "revision": located.revision} if located.hub_id else {}),
        },
        "linear_weights": linear,
        "linear_weights_source": linear_source,
        "step": 0,
        "stats": {},
        "generation": None,
        "history": [],
        "checksum": CHECKSUM,
    }
    try:
        make_dirs(state_dir)
        with locked(state_dir, exclusive=True):
            remove_leftovers(state_dir, None)  # an init that crashed before its commit
            write_meta(state_dir, meta)
    except OSError as e:
        raise StateError(
            io_failure(
                f"creating the state in {state_dir}", e, state_dir, "run the same init again once the cause is fixed."
            )
        ) from e
    return meta
