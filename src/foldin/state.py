"""The on-disk merge state: everything needed to fold in the next checkpoint on another day.

Layout of STATE_DIR:
  state.json                     method, parameters, step, stats, base identity, history
  gen-<step>-<token>/merged.safetensors   the merged task vector (one generation, float32)
  gen-<step>-<token>/buffer.safetensors   data-driven methods: examples of the last task (bounded)
  gen-<step>-<token>/heads.safetensors    data-driven methods: classification heads refit so far
  .lock                          advisory lock: one writer at a time

Each `add` writes a complete new generation beside the current one, makes it durable, then
atomically replaces state.json (the commit point) and removes the old generation. A crash at any
moment leaves state.json pointing at a complete generation: the old step or the new one. Leftover
generations from an interrupted step are removed the next time the state is opened for writing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from foldin import __version__
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file

from foldin.engine import ModelLayout, fold_step, hash_source, read_export_tensor
from foldin.errors import FoldinError, MismatchError, StateError
from foldin.io.atomic import fsync_dir, write_json_atomic
from foldin.io.checkpoint import Checkpoint, open_checkpoint, tensor_digest
from foldin.io.export import DTYPES, check_target, parse_size, write_hf_folder
from foldin.io.lora import open_model_or_adapter
from foldin.io.safetensors_file import SafetensorsWriter
from foldin.layers import resolve_linear_weights
from foldin.methods import get_method
from foldin.methods.base import MergeMethod
from foldin.methods.learned import Learning, TaskData
from foldin.progress import progress as progress_bar

if TYPE_CHECKING:
    from foldin.ray_backend import RayBackend, StateFiles

STATE_FILE = "state.json"
MERGED_FILE = "merged.safetensors"
MERGED_INDEX = "merged.safetensors.index.json"  # a generation written in shards by Ray tasks
BUFFER_FILE = "buffer.safetensors"
HEADS_FILE = "heads.safetensors"
FORMAT = "foldin-state"
FORMAT_VERSION = 2  # 2: checksums of state.json and of every tensor and file of the generation


class _BaseInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    hash: str
    fingerprint: list[list[Any]]
    config_dir: str | None


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

    @model_validator(mode="after")
    def _consistent(self) -> "StateMeta":
        if self.step != len(self.history) or (self.generation is None) != (self.step == 0) or (self.checksums is None) != (self.step == 0):
            raise ValueError("step, history, generation and checksums disagree")
        get_method(self.method)(**self.params)
        return self


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_meta(state_dir: Path, meta: dict[str, Any]) -> None:
    """Seal state.json with a checksum of its content, then replace it atomically (the commit point)."""
    write_json_atomic(state_dir / STATE_FILE, {**meta, "meta_sha256": _meta_digest(meta)})


class VerifiedGeneration:
    """The merged task vector of a generation, each tensor checked against the checksum recorded
    at commit the first time it is read: a flipped bit is reported, never merged."""

    def __init__(self, ckpt: Checkpoint, digests: dict[str, str], state_dir: Path):
        self.ckpt, self.path, self._digests, self._dir = ckpt, ckpt.path, digests, state_dir
        self._verified: set[str] = set()
        if set(ckpt.names()) != set(digests):
            raise StateError(f"the merge state in {state_dir} is corrupted: its merged tensors do not match the list recorded at commit.")

    def names(self) -> list[str]:
        return self.ckpt.names()

    def spec(self, name: str):
        return self.ckpt.spec(name)

    def read(self, name: str) -> torch.Tensor:
        t = self.ckpt.read(name)
        if name not in self._verified:
            if tensor_digest(t) != self._digests[name]:
                raise StateError(f"the merge state in {self._dir} is corrupted: tensor {name!r} does not match its checksum "
                                 "(disk or copy damage); restore the state directory from a backup.")
            self._verified.add(name)
        return t

    def close(self) -> None:
        self.ckpt.close()


@contextmanager
def _locked(state_dir: Path, exclusive: bool) -> Iterator[None]:
    fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(f"{state_dir} is in use by another foldin process; try again when it has finished.") from None
        yield
    finally:
        os.close(fd)


class MergeState:
    """A merge state directory. Open with `MergeState.create` or `MergeState.open`."""

    def __init__(self, state_dir: Path, meta: dict[str, Any]):
        self.dir = state_dir
        self.meta = meta

    # ---- properties -------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def method(self) -> MergeMethod:
        return get_method(self.meta["method"])(**self.meta["params"])

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.meta["history"]

    @property
    def base_path(self) -> Path:
        return Path(self.meta["base"]["path"])

    # ---- creation and opening ---------------------------------------------------------------
    @classmethod
    def create(cls, state_dir: str | os.PathLike[str], base: str | os.PathLike[str], method: str,
               params: dict[str, Any] | None = None, linear_weights: str | None = None) -> "MergeState":
        """Start a merge state at step 0 (the merged model is the base)."""
        state_dir = Path(state_dir)
        merge_method = get_method(method)(**(params or {}))  # validates the parameters first
        if (state_dir / STATE_FILE).exists():
            raise StateError(f"{state_dir} already holds a foldin state; use 'foldin add' or choose another directory.")
        if state_dir.exists() and any(p.name != ".lock" for p in state_dir.iterdir()):
            raise StateError(f"{state_dir} exists and is not empty; choose a new directory for the state.")
        with open_checkpoint(base) as ckpt:
            specs = {n: ckpt.spec(n)[1] for n in ckpt.names()}
            linear, linear_source = resolve_linear_weights(specs, pattern=linear_weights, config_dir=ckpt.config_dir)
            ModelLayout.from_source(ckpt, linear)  # refuses a base with nothing to merge
            base_hash = hash_source(ckpt)
            fingerprint = ckpt.fingerprint()
            config_dir = ckpt.config_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "foldin_version": __version__,
            "method": merge_method.name,
            "params": merge_method.params.model_dump(),
            "base": {
                "path": str(Path(base).resolve()),
                "hash": base_hash,
                "fingerprint": fingerprint,
                "config_dir": str(config_dir.resolve()) if config_dir else None,
            },
            "linear_weights": linear,
            "linear_weights_source": linear_source,
            "step": 0,
            "stats": {},
            "generation": None,
            "history": [],
        }
        with _locked(state_dir, exclusive=True):
            _write_meta(state_dir, meta)
        return cls(state_dir, meta)

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> "MergeState":
        state_dir = Path(state_dir)
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
        if meta.get("meta_sha256") != _meta_digest(meta):
            raise StateError(f"{path} is corrupted: its content does not match its checksum; restore the state directory from a backup.")
        meta.pop("meta_sha256")
        try:
            StateMeta.model_validate(meta)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "state"
            raise StateError(f"{path} is not a valid foldin state ({where}: {first['msg']}).") from None
        except FoldinError as e:
            raise StateError(f"{path} is not a valid foldin state ({e})") from None
        return cls(state_dir, meta)

    # ---- folding in -------------------------------------------------------------------------
    def _generation_file(self) -> Path | None:
        gen = self.meta["generation"]
        if not gen:
            return None
        single = self.dir / gen / MERGED_FILE
        return single if single.exists() or not (self.dir / gen / MERGED_INDEX).exists() else self.dir / gen / MERGED_INDEX

    def _files(self) -> "StateFiles":
        """The state's tensors as paths, for Ray tasks to open (they verify what they read)."""
        from foldin.ray_backend import StateFiles

        gen = self._generation_file()
        return StateFiles(str(self.dir.resolve()), self.meta["base"]["path"], str(gen.resolve()) if gen else None,
                          dict(self.meta.get("checksums", {}).get("merged", {})))

    def _remove_leftovers(self) -> None:
        """Delete generations and temporary files that an interrupted step left behind."""
        current = self.meta["generation"]
        for p in self.dir.iterdir():
            if (p.name.startswith("gen-") and p.name != current) or p.name.endswith(".tmp"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def open_base(self) -> Checkpoint:
        """Open the base and make sure it is still the model this state was created from."""
        base_info = self.meta["base"]
        ckpt = open_checkpoint(base_info["path"])
        if ckpt.fingerprint() != base_info["fingerprint"]:
            if hash_source(ckpt) != base_info["hash"]:
                ckpt.close()
                raise MismatchError(f"the base model at {base_info['path']} has changed since this state was created; restore it or start a new state.")
            base_info["fingerprint"] = ckpt.fingerprint()  # same content, new files (e.g. copied)
        return ckpt

    def check_base(self, base: str | os.PathLike[str]) -> None:
        """Refuse a base that is not this state's base (compared by content)."""
        with open_checkpoint(base) as ckpt:
            if Path(base).resolve() == self.base_path and ckpt.fingerprint() == self.meta["base"]["fingerprint"]:
                return
            if hash_source(ckpt) != self.meta["base"]["hash"]:
                raise MismatchError(f"{base} is not the base model of the state in {self.dir} (its content differs).")

    def add(self, checkpoint: str | os.PathLike[str], progress: bool = True, learning: Learning | None = None,
            device: str | None = None, workers: int = 1, backend: "RayBackend | None" = None) -> dict[str, Any]:
        """Fold one checkpoint in, atomically. Returns its history entry. Data-driven methods need
        `learning` (the model and the new task's data); the previous task's examples come from the state.
        With `backend` (a RayBackend) the step runs as Ray tasks that read and write the files themselves."""
        with _locked(self.dir, exclusive=True):
            fresh = MergeState.open(self.dir)  # another process may have committed since we opened
            self.meta = fresh.meta
            self._remove_leftovers()
            try:
                return self._add_locked(Path(checkpoint), progress, learning, device, workers, backend)
            except OSError as e:  # disk full, I/O error: the new generation was discarded
                raise StateError(f"folding in {checkpoint} failed: {e.strerror or e} ({e.filename or self.dir}); "
                                 f"the state is unchanged at step {self.step}.") from e

    def _add_locked(self, checkpoint: Path, progress: bool, learning: Learning | None, device: str | None,
                    workers: int, backend: "RayBackend | None") -> dict[str, Any]:
        started = time.time()
        step = self.step + 1
        method = self.method
        gen = f"gen-{step:06d}-{secrets.token_hex(4)}"
        gen_dir = self.dir / gen
        with self.open_base() as base, open_model_or_adapter(checkpoint, base) as ckpt:
            layout = ModelLayout.from_source(base, self.meta["linear_weights"])
            previous = self._open_generation()
            if learning is not None and method.needs_data:
                learning.previous = self.buffer()
            gen_dir.mkdir()
            try:
                if backend is not None:
                    stats, ckpt_hash, digests = self._fold_on_ray(backend, checkpoint, layout, method, step, gen_dir, base, ckpt, previous,
                                                                  progress, device)
                else:
                    digests = {}
                    with SafetensorsWriter(gen_dir / MERGED_FILE, layout.state_specs(), {"format": "pt", "foldin_step": str(step)}) as writer:
                        def sink(name: str, tensor: torch.Tensor) -> None:
                            digests[name] = tensor_digest(tensor)
                            writer.write(name, tensor)

                        stats, ckpt_hash = fold_step(method, step, self.meta["stats"], layout, base, ckpt,
                                                     previous, sink, progress, learning if method.needs_data else None, device, workers,
                                                     on_hashed=lambda h: self._refuse_duplicate(checkpoint, h))
                if learning is not None and learning.buffer is not None:
                    write_task_data(gen_dir / BUFFER_FILE, learning.buffer)
                    heads = {**self.heads(), **learning.heads}
                    if heads:
                        save_file({f"{task}/{k}": v.contiguous() for task, h in heads.items() for k, v in h.items()}, gen_dir / HEADS_FILE)
                files = {f.name: _file_digest(f) for f in (gen_dir / BUFFER_FILE, gen_dir / HEADS_FILE) if f.exists()}
                fsync_dir(gen_dir)
                entry = {
                    "step": step,
                    "checkpoint": str(checkpoint.resolve()),
                    **({"task": learning.new.name} if learning is not None and method.needs_data else {}),
                    "hash": ckpt_hash,
                    "added_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "seconds": round(time.time() - started, 3),
                    "stats": stats,
                }
                meta = {**self.meta, "step": step, "stats": stats, "generation": gen,
                        "checksums": {"merged": digests, "files": files},
                        "history": [*self.history, entry], "foldin_version": __version__}
                _write_meta(self.dir, meta)  # the commit point
            except BaseException:
                if self._committed_generation() != gen:  # a failure after the commit point keeps it
                    shutil.rmtree(gen_dir, ignore_errors=True)
                raise
            finally:
                if previous is not None:
                    previous.close()
        old = self.meta["generation"]
        self.meta = meta
        if old:
            shutil.rmtree(self.dir / old, ignore_errors=True)
        return entry

    def _fold_on_ray(self, backend: "RayBackend", checkpoint: Path, layout: ModelLayout, method: MergeMethod, step: int,
                     gen_dir: Path, base: Checkpoint, ckpt: Any, previous: Any, progress: bool,
                     device: str | None) -> tuple[dict[str, float], str, dict[str, str]]:
        """The step as Ray tasks that write the merged task vector in shards, plus their index."""
        from foldin.ray_backend import RayStepRunner, StepFiles

        if device not in (None, "cpu"):
            raise FoldinError("--device with --backend ray is not supported yet; the Ray tasks compute on their nodes' CPUs.")
        files = StepFiles(self._files(), str(checkpoint.resolve()), layout, "cpu", backend.threads)
        runner = RayStepRunner(backend, files, gen_dir, MERGED_FILE.removesuffix(".safetensors"))
        stats, ckpt_hash = fold_step(method, step, self.meta["stats"], layout, base, ckpt, previous, lambda *_: None, progress,
                                     cluster=runner, on_hashed=lambda h: self._refuse_duplicate(checkpoint, h))
        index = {"metadata": {"format": "pt", "foldin_step": str(step)},
                 "weight_map": {n: runner.weight_map[n] for n in layout.merged_names}}
        with open(gen_dir / MERGED_INDEX, "w") as f:
            f.write(json.dumps(index, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return stats, ckpt_hash, runner.digests

    def _generation_path(self, name: str) -> Path | None:
        """A file of the current generation (None if it has none), checked against its recorded checksum."""
        path = self.dir / self.meta["generation"] / name if self.meta["generation"] else None
        if path is None or not path.exists():
            if name in self.meta.get("checksums", {}).get("files", {}):
                raise StateError(f"the merge state in {self.dir} is corrupted: {name} is missing from its generation.")
            return None
        expected = self.meta.get("checksums", {}).get("files", {}).get(name)
        if expected is None or _file_digest(path) != expected:
            raise StateError(f"the merge state in {self.dir} is corrupted: {name} does not match its checksum; restore it from a backup.")
        return path

    def _open_generation(self) -> VerifiedGeneration | None:
        """The merged task vector of the current generation (None at step 0), verified as it is read."""
        path = self._generation_file()
        if path is None:
            return None
        try:
            ckpt = open_checkpoint(path)
        except FoldinError as e:
            raise StateError(f"the merge state in {self.dir} is corrupted: {e}") from e
        return VerifiedGeneration(ckpt, self.meta["checksums"]["merged"], self.dir)

    def verify(self) -> int:
        """Read everything the state holds and check it against its checksums; returns bytes checked."""
        with self.reading() as (_, merged):
            if merged is not None:
                for name in merged.names():
                    merged.read(name)
            for name in (BUFFER_FILE, HEADS_FILE):
                self._generation_path(name)
        gen = self.dir / self.meta["generation"] if self.meta["generation"] else None
        return sum(f.stat().st_size for f in gen.iterdir()) if gen else 0

    def buffer(self) -> TaskData | None:
        """The examples of the last task that a data-driven method kept for the next step."""
        path = self._generation_path(BUFFER_FILE)
        return read_task_data(path) if path else None

    def heads(self) -> dict[str, dict[str, torch.Tensor]]:
        """Classification heads refit by a data-driven method (OTMF's head refit), by task."""
        path = self._generation_path(HEADS_FILE)
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in (load_file(path).items() if path else []):
            task, _, part = key.rpartition("/")
            heads.setdefault(task, {})[part] = tensor
        return heads

    def _committed_generation(self) -> str | None:
        try:
            return json.loads((self.dir / STATE_FILE).read_text()).get("generation")
        except (OSError, ValueError):
            return None

    def _refuse_duplicate(self, checkpoint: Path, ckpt_hash: str) -> None:
        if ckpt_hash == self.meta["base"]["hash"]:
            raise MismatchError(f"{checkpoint} is the base model itself; there is nothing to fold in.")
        for entry in self.history:
            if entry["hash"] == ckpt_hash:
                raise MismatchError(f"{checkpoint} was already folded in at step {entry['step']} (same content as {entry['checkpoint']}).")

    # ---- reading ----------------------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[tuple[Checkpoint, Checkpoint | None]]:
        """Hold a shared lock and yield (base, merged task vector or None at step 0)."""
        with _locked(self.dir, exclusive=False):
            self.meta = MergeState.open(self.dir).meta
            with self.open_base() as base:
                merged = self._open_generation()
                try:
                    yield base, merged
                finally:
                    if merged is not None:
                        merged.close()

    def _merged_tensors(self, base: Checkpoint, merged: Checkpoint | None, dtype: torch.dtype | None):
        """(dtype and shape of each output tensor, a function computing it) for the merged model."""
        method = self.method
        specs = {}
        for name in base.names():
            b_dtype, shape = base.spec(name)
            specs[name] = (dtype if dtype is not None and b_dtype.is_floating_point else b_dtype, shape)

        def produce(name: str) -> torch.Tensor:
            return read_export_tensor(method, self.meta["stats"], base, merged, name, specs[name][0])

        return specs, produce

    def merged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The merged model in memory (for evaluation; `export` streams instead)."""
        with self.reading() as (base, merged):
            specs, produce = self._merged_tensors(base, merged, dtype)
            return {name: produce(name) for name in specs}

    def export(self, out_dir: str | os.PathLike[str], dtype: str | None = None, max_shard_size: str = "5GB",
               overwrite: bool = False, progress: bool = True, backend: "RayBackend | None" = None) -> Path:
        """Write the merged model after the current step as a Hugging Face folder. With `backend`
        (a RayBackend), each shard is written by a Ray task (out_dir's parent must be shared storage)."""
        out_dtype = None
        if dtype is not None:
            if dtype not in DTYPES:
                raise FoldinError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
            out_dtype = DTYPES[dtype]
        check_target(Path(out_dir), overwrite, {"the merge state's folder": self.dir, "the base model": self.base_path})
        with self.reading() as (base, merged):
            specs, produce = self._merged_tensors(base, merged, out_dtype)

            config_dir = Path(self.meta["base"]["config_dir"]) if self.meta["base"]["config_dir"] else None
            try:
                return write_hf_folder(
                    Path(out_dir), specs, produce, config_dir, model_card(self.meta), parse_size(max_shard_size),
                    overwrite=overwrite, torch_dtype=out_dtype,
                    progress=lambda names: progress_bar(names, desc="exporting", unit="tensor", enabled=progress),
                    write_shards=None if backend is None else lambda shards: self._export_on_ray(backend, shards, specs, progress),
                )
            except OSError as e:
                raise FoldinError(f"exporting to {out_dir} failed: {e.strerror or e} ({e.filename or out_dir}); "
                                  f"{out_dir} was left as it was.") from e

    def _export_on_ray(self, backend: "RayBackend", shards: list[tuple[Path, list[str]]],
                       specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], progress: bool) -> None:
        from foldin.ray_backend import export_shard

        files, method, stats = self._files(), self.method, self.meta["stats"]
        calls = [(files, names, method, stats, {n: specs[n] for n in names}, str(path.resolve()), backend.threads) for path, names in shards]
        timings = backend.run(export_shard, calls, "exporting", progress, [len(names) for _, names in shards])
        backend.timings.append({"pass": "export", "seconds": {k: v for t in timings for k, v in t.items()}})

    def info(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.dir),
            "method": self.meta["method"],
            "params": self.meta["params"],
            "step": self.step,
            "base": {"path": self.meta["base"]["path"], "hash": self.meta["base"]["hash"]},
            "linear_weights": len(self.meta["linear_weights"]),
            "linear_weights_source": self.meta["linear_weights_source"],
            "stats": self.meta["stats"],
            "history": self.history,
        }


def write_task_data(path: Path, data: TaskData) -> None:
    tensors = {f"inputs.{k}": v.contiguous() for k, v in data.inputs.items()}
    if data.labels is not None:
        tensors["labels"] = data.labels.contiguous()
    for k, v in (data.head or {}).items():
        tensors[f"head.{k}"] = v.contiguous()
    save_file(tensors, path, metadata={"name": data.name, "total": str(data.total or len(data))})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_task_data(path: Path) -> TaskData:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return TaskData(pick("inputs."), tensors.get("labels"), pick("head.") or None, meta.get("name", "task"), int(meta.get("total", 0)) or None)


def ensure_state(state_dir: Path, base: str, method: str, params: dict[str, Any], linear_weights: str | None) -> MergeState:
    """Open the state at state_dir if it exists and matches (base, method, params), else create it."""
    if not (state_dir / STATE_FILE).exists():
        return MergeState.create(state_dir, base, method, params, linear_weights)
    state = MergeState.open(state_dir)
    wanted = get_method(method)(**params).params.model_dump()
    if state.meta["method"] != method or state.meta["params"] != wanted:
        raise FoldinError(
            f"{state_dir} holds a {state.meta['method']} state with {state.meta['params']}, "
            f"not {method} with {wanted}; use another state directory."
        )
    state.check_base(base)
    return state


def model_card(meta: dict[str, Any]) -> str:
    """A README for the exported folder: how it was made, from what, in which order."""
    params = ", ".join(f"{k}={v}" for k, v in meta["params"].items()) or "none"
    lines = [
        "---",
        "tags: [foldin, model-merging, continual-merging]",
        "---",
        "# Merged model",
        "",
        f"Made with foldin {__version__} by folding {meta['step']} fine-tuned checkpoint(s) into the base model "
        f"with the `{meta['method']}` method ({params}).",
        "",
        f"- Base: `{meta['base']['path']}` ({meta['base']['hash']})",
        f"- Linear-layer weights: {len(meta['linear_weights'])}, from {meta['linear_weights_source']}",
        "",
        "| step | checkpoint | content hash |",
        "|---:|---|---|",
    ]
    lines += [f"| {e['step']} | `{e['checkpoint']}` | {e['hash']} |" for e in meta["history"]]
    return "\n".join(lines) + "\n"
