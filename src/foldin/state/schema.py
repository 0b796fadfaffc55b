"""state.json: its schema, checked on open, and its checksum, so that a damaged or hand-edited
file gives one clear error instead of a crash deep inside a step."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from foldin.errors import FoldinError, StateError
from foldin.io.atomic import write_json_atomic
from foldin.methods import get_method

STATE_FILE = "state.json"
FORMAT = "foldin-state"
FORMAT_VERSION = 2  # 2: checksums of state.json and of every tensor and file of the generation


class _BaseInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    hash: str | None  # None until the first step, which reads every base tensor anyway and hashes them
    # (a state created with hash_base=True has it from the start)
    fingerprint: list[list[Any]]
    config_dir: str | None
    hub_id: str | None = None  # org/name, when the base was named by its Hub id
    revision: str | None = None  # the commit it resolved to


class _Checksums(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merged: dict[str, str]
    files: dict[str, str]


class _HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    step: int
    checkpoint: str
    hash: str


class StateMeta(BaseModel):
    """The schema of state.json: checked on open, so that a damaged or hand-edited file gives one
    clear error instead of a crash deep inside a step."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal["foldin-state"]
    format_version: int
    foldin_version: str
    method: str
    params: dict[str, Any]
    base: _BaseInfo
    linear_weights: list[str]
    linear_weights_source: str
    step: int = Field(ge=0)
    stats: dict[str, float]
    generation: str | None = Field(pattern=r"^gen-\d{6}-[0-9a-f]{8}$")  # a plain name: never a path elsewhere
    history: list[_HistoryEntry]
    checksums: _Checksums | None = None
    checksum: Literal["xxh3_128", "sha256"] = "sha256"  # the hash of every digest; states before xxh3: sha256

    @model_validator(mode="after")
    def _consistent(self) -> StateMeta:
        if (
            self.step != len(self.history)
            or (self.generation is None) != (self.step == 0)
            or (self.checksums is None) != (self.step == 0)
        ):
            raise ValueError("step, history, generation and checksums disagree")
        get_method(self.method)(**self.params)
        return self


def meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_meta(state_dir: Path, meta: dict[str, Any]) -> None:
    """Seal state.json with a checksum of its content, then replace it atomically (the commit point)."""
    write_json_atomic(state_dir / STATE_FILE, {**meta, "meta_sha256": meta_digest(meta)})


def read_meta(state_dir: Path) -> dict[str, Any]:
    """state.json of `state_dir`, checked: format, version, checksum and schema."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        raise StateError(f"{state_dir} is not a foldin state (no {STATE_FILE}); create one with 'foldin init'.")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StateError(f"{path} is corrupted (not valid JSON).") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError(f"{path} is not a foldin state file.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StateError(f"{path} has state format {meta.get('format_version')}, this foldin reads {FORMAT_VERSION}.")
    if meta.get("meta_sha256") != meta_digest(meta):
        raise StateError(
            f"{path} is corrupted: its content does not match its checksum; restore the state directory from a backup."
        )
    meta.pop("meta_sha256")
    try:
        StateMeta.model_validate(meta)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "state"
        raise StateError(f"{path} is not a valid foldin state ({where}: {first['msg']}).") from None
    except FoldinError as e:
        raise StateError(f"{path} is not a valid foldin state ({e})") from None
    return meta


def committed_generation(state_dir: Path) -> str | None:
    """The generation state.json names right now (read without checks: for cleanup decisions)."""
    try:
        return json.loads((state_dir / STATE_FILE).read_text()).get("generation")
    except (OSError, ValueError):
        return None


def digest_algorithm(meta: dict[str, Any]) -> str:
    """The hash of a state's digests (states made before xxh3 keep sha256)."""
    return meta.get("checksum", "sha256")
