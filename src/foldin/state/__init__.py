"""The on-disk merge state: everything needed to fold in the next checkpoint on another day.

Layout of STATE_DIR:
  state.json            method, parameters, step, stats, base identity, history, checksums (schema.py)
  gen-<step>-<token>/   the current generation: the merged task vector and, for data-driven methods,
                        the examples and heads kept for the next step (generation.py)
  .lock                 advisory lock: one writer at a time (lock.py)

Each `add` writes a complete new generation beside the current one, makes it durable, then
atomically replaces state.json (the commit point) and removes the old generation. A crash at any
moment leaves state.json pointing at a complete generation: the old step or the new one. Leftover
generations from an interrupted step are removed the next time the state is opened for writing.
Where a step's passes run is a backend's business (foldin.runners): this process, or Ray tasks.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from foldin.data import Learning, TaskData
from foldin.engine import (
    CheckedReader,
    ModelLayout,
    VerifiedSource,
    export_tensor,
    fold_step,
    hash_source,
    read_export_tensor,
)
from foldin.errors import FoldinError, MismatchError, StateError, io_failure
from foldin.io.atomic import fsync_dir, make_dirs
from foldin.io.checkpoint import CHECKSUM, Checkpoint, open_checkpoint
from foldin.io.export import DTYPES, ModelFolderWriter, check_target, parse_size, write_hf_folder
from foldin.io.hub import Located, locate
from foldin.io.lora import open_model_or_adapter
from foldin.io.lora_export import write_lora_adapter
from foldin.layers import resolve_linear_weights
from foldin.methods import get_method
from foldin.methods.base import Heads, MergeMethod
from foldin.progress import progress as progress_bar
from foldin.runners import Backend, GenerationJob, RunOptions, StateFiles
from foldin.runners.local import LocalBackend
from foldin.state.card import model_card
from foldin.state.generation import (
    BUFFER_FILE,
    HEADS_FILE,
    merged_file,
    new_generation_name,
    read_heads,
    read_task_data,
    remove_leftovers,
    write_heads,
    write_task_data,
)
from foldin.state.lock import locked
from foldin.state.schema import (
    FORMAT,
    FORMAT_VERSION,
    STATE_FILE,
    committed_generation,
    file_digest,
    read_meta,
    write_meta,
)

__all__ = ["MergeState"]


@dataclass(frozen=True)
class ExportPlan:
    """An export to write in the same pass as a step (MergeState.add_and_export)."""

    out_dir: Path
    dtype: torch.dtype | None
    max_shard_bytes: int
    overwrite: bool


def _export_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is not None and dtype not in DTYPES:
        raise FoldinError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    return DTYPES[dtype] if dtype is not None else None


def _init_leftover(path: Path) -> bool:
    """What an `init` interrupted before its commit leaves: the lock and a temporary state.json."""
    return path.name == ".lock" or (path.name.startswith(f".{STATE_FILE}.") and path.name.endswith(".tmp"))


class MergeState:
    """A merge state directory. Open with `MergeState.create` or `MergeState.open`."""

    def __init__(self, state_dir: Path, meta: dict[str, Any]):
        self.dir = state_dir
        self.meta = meta

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
    def checksum(self) -> str:
        """The hash of this state's digests (states made before xxh3 keep sha256)."""
        return self.meta.get("checksum", "sha256")

    @property
    def base_path(self) -> Path:
        return Path(self.meta["base"]["path"])

    @classmethod
    def create(
        cls,
        state_dir: str | os.PathLike[str],
        base: str | os.PathLike[str],
        method: str,
        params: dict[str, Any] | None = None,
        linear_weights: str | None = None,
        hash_base: bool = False,
    ) -> MergeState:
        """Start a merge state at step 0 (the merged model is the base). `base` is a path or a Hub
        id (org/name[@revision]). The base's content hash (and its NaN/Inf check) is taken by the
        first step, which reads every base tensor anyway, so creating a state reads only the
        headers and the base is read once, not twice; until that step commits, the base's file
        fingerprint guards it. `hash_base=True` hashes it now instead (a full read)."""
        state_dir = Path(state_dir)
        merge_method = get_method(method)(**(params or {}))  # validates the parameters first
        if (state_dir / STATE_FILE).exists():
            raise StateError(
                f"{state_dir} already holds a foldin state; use 'foldin add' or choose another directory."
            )
        if state_dir.exists() and any(not _init_leftover(p) for p in state_dir.iterdir()):
            raise StateError(f"{state_dir} exists and is not empty; choose a new directory for the state.")
        located = locate(base)
        with open_checkpoint(located.path) as ckpt:
            specs = {n: ckpt.spec(n)[1] for n in ckpt.names()}
            if merge_method.uses_linear_weights or linear_weights is not None:
                linear, linear_source = resolve_linear_weights(
                    specs, pattern=linear_weights, config_dir=ckpt.config_dir
                )
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
                    f"creating the state in {state_dir}",
                    e,
                    state_dir,
                    "run the same init again once the cause is fixed.",
                )
            ) from e
        return cls(state_dir, meta)

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> MergeState:
        return cls(Path(state_dir), read_meta(Path(state_dir)))

    # ---- folding in -------------------------------------------------------------------------
    def open_base(self) -> Checkpoint:
        """Open the base and make sure it is still the model this state was created from."""
        base_info = self.meta["base"]
        path = Path(base_info["path"])
        if not path.exists() and base_info.get("hub_id"):  # a cleared Hugging Face cache: the same commit again
            path = locate(f"{base_info['hub_id']}@{base_info['revision']}").path
        ckpt = open_checkpoint(path)
        if ckpt.fingerprint() != base_info["fingerprint"]:
            if base_info["hash"] is None or hash_source(ckpt, self.checksum) != base_info["hash"]:
                ckpt.close()
                raise MismatchError(
                    f"the base model at {base_info['path']} has changed since this state was created; restore "
                    f"it or start a new state."
                )
            base_info["fingerprint"] = ckpt.fingerprint()  # same content, new files (e.g. copied)
        return ckpt

    def check_base(self, base: str | os.PathLike[str]) -> None:
        """Refuse a base that is not this state's base (compared by content)."""
        path = locate(base).path
        with open_checkpoint(path) as ckpt:
            if path.resolve() == self.base_path and ckpt.fingerprint() == self.meta["base"]["fingerprint"]:
                return
            if self.meta["base"]["hash"] is None or hash_source(ckpt, self.checksum) != self.meta["base"]["hash"]:
                raise MismatchError(f"{base} is not the base model of the state in {self.dir} (its content differs).")

    def add(
        self,
        checkpoint: str | os.PathLike[str],
        progress: bool = True,
        learning: Learning | None = None,
        device: str | None = None,
        workers: int = 1,
        backend: Backend | None = None,
    ) -> dict[str, Any]:
        """Fold one checkpoint in, atomically. Returns its history entry. Data-driven methods need
        `learning` (the model and the new task's data); the previous task's examples come from the
        state. `device` is where the arithmetic runs, `workers` how many tensors are in flight on
        threads; `backend` (e.g. a RayBackend) runs the step elsewhere."""
        options = RunOptions(progress, device, workers)
        with locked(self.dir, exclusive=True):
            self.meta = read_meta(self.dir)  # another process may have committed since we opened
            remove_leftovers(self.dir, self.meta["generation"])
            try:
                return self._add_locked(locate(checkpoint), learning, options, backend or LocalBackend(), None)
            except OSError as e:  # disk full, I/O error: the new generation was discarded
                raise StateError(
                    io_failure(f"folding in {checkpoint}", e, self.dir, f"the state is unchanged at step {self.step}.")
                ) from e

    def add_and_export(
        self,
        checkpoint: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        dtype: str | None = None,
        max_shard_size: str = "5GB",
        overwrite: bool = False,
        progress: bool = True,
        backend: Backend | None = None,
        device: str | None = None,
        workers: int = 1,
    ) -> tuple[dict[str, Any], Path]:
        """Fold one checkpoint in, then export the merged model. When the method's scale is known
        before the step (every method but opcm), on the CPU of this process, the export is written
        in the same pass: the base and the new merged task vector are not read a second time.
        The export is put in place only after the step has committed."""
        if backend is not None or device not in (None, "cpu") or not self.method.scale_known_before_step:
            entry = self.add(checkpoint, progress, device=device, workers=workers, backend=backend)
            return entry, self.export(out_dir, dtype, max_shard_size, overwrite, progress, backend)
        plan = ExportPlan(Path(out_dir), _export_dtype(dtype), parse_size(max_shard_size), overwrite)
        check_target(plan.out_dir, overwrite, self._protected())
        with locked(self.dir, exclusive=True):
            self.meta = read_meta(self.dir)
            remove_leftovers(self.dir, self.meta["generation"])
            try:
                options = RunOptions(progress, device, workers)
                entry = self._add_locked(locate(checkpoint), None, options, LocalBackend(), plan)
            except OSError as e:
                raise StateError(
                    io_failure(
                        f"folding in {checkpoint}",
                        e,
                        self.dir,
                        f"the state is unchanged at step {self.step}, and {out_dir} as it was.",
                    )
                ) from e
        return entry, plan.out_dir

    def _add_locked(
        self,
        located: Located,
        learning: Learning | None,
        options: RunOptions,
        backend: Backend,
        export: ExportPlan | None,
    ) -> dict[str, Any]:
        checkpoint = located.path
        started = time.time()
        step = self.step + 1
        method = self.method
        gen = new_generation_name(step, secrets.token_hex(4))
        gen_dir = self.dir / gen
        if learning is not None and method.needs_data:
            learning = Learning(learning.module, learning.features, learning.new, self.buffer())
        with self.open_base() as opened, open_model_or_adapter(checkpoint, opened) as ckpt:
            base = opened if self.meta["base"]["hash"] is not None else CheckedReader(opened, algorithm=self.checksum)
            layout = ModelLayout.from_source(base, self.meta["linear_weights"])
            previous = self._open_generation()
            folder = self._export_folder(base, export) if export is not None else None
            gen_dir.mkdir()
            try:
                job = GenerationJob(self._files(), checkpoint, layout, step, gen_dir, base, previous)
                with backend.generation_runner(options, job) as runner:
                    if folder is not None:  # the merged model's tensor, from what the step holds anyway
                        runner.on_merged = lambda slot, merged: folder.write(
                            slot.name, export_tensor(method, {}, slot.base, merged, folder.specs[slot.name][0])
                        )
                    result, ckpt_hash = fold_step(
                        method,
                        step,
                        self.meta["stats"],
                        layout,
                        ckpt,
                        runner,
                        learning,
                        on_hashed=lambda h: self._refuse_duplicate(checkpoint, h),
                        algorithm=self.checksum,
                    )
                for name in [n for n in base.names() if n not in layout.merged_names] if folder else []:
                    folder.write(name, base.read(name))  # integer buffers: the base's
                base_info = self.meta["base"]
                if isinstance(base, CheckedReader):  # a state made without hashing its base: hashed now
                    base_info = {**base_info, "hash": base.content_hash()}
                    self._refuse_duplicate(checkpoint, ckpt_hash, base_info["hash"])
                files = self._write_learned(gen_dir, result.buffer, result.heads)
                fsync_dir(gen_dir)
                fsync_dir(self.dir)  # the generation's own entry, before state.json may name it
                entry = {
                    "step": step,
                    "checkpoint": str(checkpoint.resolve()),
                    **({"source": located.source} if located.hub_id else {}),
                    **({"task": learning.new.name} if learning is not None and method.needs_data else {}),
                    "hash": ckpt_hash,
                    "added_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "seconds": round(time.time() - started, 3),
                    "stats": result.stats,
                    **({"widened_from": widened} if (widened := layout.widened_dtypes(ckpt)) else {}),
                }
                meta = {
                    **self.meta,
                    "base": base_info,
                    "step": step,
                    "stats": result.stats,
                    "generation": gen,
                    "checksums": {"merged": runner.digests, "files": files},
                    "history": [*self.history, entry],
                    "foldin_version": version("foldin"),
                }
                write_meta(self.dir, meta)  # the commit point
            except BaseException:
                if folder is not None:
                    folder.abort()
                if committed_generation(self.dir) != gen:  # a failure after the commit point keeps it
                    shutil.rmtree(gen_dir, ignore_errors=True)
                raise
            finally:
                if previous is not None:
                    previous.close()
        old = self.meta["generation"]
        self.meta = meta
        if old:
            shutil.rmtree(self.dir / old, ignore_errors=True)
        if folder is not None:
            try:
                folder.finish_model(self._config_dir(), model_card(self.meta), export.dtype)
            except OSError as e:
                raise FoldinError(
                    f"step {step} was committed, but writing {export.out_dir} failed: {e.strerror or e}; "
                    f"export it again with 'foldin export'."
                ) from e
        return entry

    def _export_folder(self, base: Checkpoint, plan: ExportPlan) -> ModelFolderWriter:
        specs = self._export_specs(base, plan.dtype)
        return ModelFolderWriter(plan.out_dir, specs, plan.max_shard_bytes, plan.overwrite, self._protected())

    def _protected(self) -> dict[str, Path]:
        """What an export must never replace or write into."""
        return {"the merge state's folder": self.dir, "the base model": self.base_path}

    def _config_dir(self) -> Path | None:
        return Path(self.meta["base"]["config_dir"]) if self.meta["base"]["config_dir"] else None

    def _write_learned(self, gen_dir: Path, buffer: TaskData | None, heads: Heads) -> dict[str, str]:
        """A data-driven step's buffer and all heads refit so far, into the new generation; their checksums."""
        if buffer is not None:
            write_task_data(gen_dir / BUFFER_FILE, buffer)
        all_heads = {**self.heads(), **heads}
        if all_heads:
            write_heads(gen_dir / HEADS_FILE, all_heads)
        return {f.name: file_digest(f) for f in (gen_dir / BUFFER_FILE, gen_dir / HEADS_FILE) if f.exists()}

    def _files(self) -> StateFiles:
        """The state's tensors as paths, for a backend whose workers open them (and verify what they read)."""
        gen = self._generation_file()
        return StateFiles(
            str(self.dir.resolve()),
            self.meta["base"]["path"],
            str(gen.resolve()) if gen else None,
            dict(self.meta.get("checksums", {}).get("merged", {})),
            self.checksum,
        )

    def _generation_file(self) -> Path | None:
        return merged_file(self.dir / self.meta["generation"]) if self.meta["generation"] else None

    def _generation_path(self, name: str) -> Path | None:
        """A file of the current generation (None if it has none), checked against its recorded checksum."""
        path = self.dir / self.meta["generation"] / name if self.meta["generation"] else None
        if path is None or not path.exists():
            if name in self.meta.get("checksums", {}).get("files", {}):
                raise StateError(f"the merge state in {self.dir} is corrupted: {name} is missing from its generation.")
            return None
        expected = self.meta.get("checksums", {}).get("files", {}).get(name)
        if expected is None or file_digest(path) != expected:
            raise StateError(
                f"the merge state in {self.dir} is corrupted: {name} does not match its checksum; restore it "
                f"from a backup."
            )
        return path

    def _open_generation(self) -> VerifiedSource | None:
        """The merged task vector of the current generation (None at step 0), verified as it is read."""
        path = self._generation_file()
        if path is None:
            return None
        try:
            ckpt = open_checkpoint(path)
        except FoldinError as e:
            raise StateError(f"the merge state in {self.dir} is corrupted: {e}") from e
        return VerifiedSource(ckpt, self.meta["checksums"]["merged"], str(self.dir))

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

    def heads(self) -> Heads:
        """Classification heads refit by a data-driven method (OTMF's head refit), by task."""
        return read_heads(self._generation_path(HEADS_FILE))

    def _refuse_duplicate(self, checkpoint: Path, ckpt_hash: str, base_hash: str | None = None) -> None:
        if ckpt_hash == (base_hash or self.meta["base"]["hash"]):
            raise MismatchError(f"{checkpoint} is the base model itself; there is nothing to fold in.")
        for entry in self.history:
            if entry["hash"] == ckpt_hash:
                raise MismatchError(
                    f"{checkpoint} was already folded in at step {entry['step']} (same content as "
                    f"{entry['checkpoint']})."
                )

    # ---- reading ----------------------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[tuple[Checkpoint, Checkpoint | None]]:
        """Hold a shared lock and yield (base, merged task vector or None at step 0)."""
        with locked(self.dir, exclusive=False):
            self.meta = read_meta(self.dir)
            with self.open_base() as base:
                merged = self._open_generation()
                try:
                    yield base, merged
                finally:
                    if merged is not None:
                        merged.close()

    @staticmethod
    def _export_specs(base: Checkpoint, dtype: torch.dtype | None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The dtype and shape of each tensor of the merged model (floating ones in `dtype` if given)."""
        specs = {}
        for name in base.names():
            b_dtype, shape = base.spec(name)
            specs[name] = (dtype if dtype is not None and b_dtype.is_floating_point else b_dtype, shape)
        return specs

    def _merged_tensors(self, base: Checkpoint, merged: Checkpoint | None, dtype: torch.dtype | None):
        """(dtype and shape of each output tensor, a function computing it) for the merged model."""
        method = self.method
        specs = self._export_specs(base, dtype)

        def produce(name: str) -> torch.Tensor:
            return read_export_tensor(method, self.meta["stats"], base, merged, name, specs[name][0])

        return specs, produce

    def merged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The merged model in memory (for evaluation; `export` streams instead)."""
        with self.reading() as (base, merged):
            specs, produce = self._merged_tensors(base, merged, dtype)
            return {name: produce(name) for name in specs}

    def export(
        self,
        out_dir: str | os.PathLike[str],
        dtype: str | None = None,
        max_shard_size: str = "5GB",
        overwrite: bool = False,
        progress: bool = True,
        backend: Backend | None = None,
    ) -> Path:
        """Write the merged model after the current step as a Hugging Face folder. With `backend`
        (e.g. a RayBackend), each shard is written elsewhere (out_dir's parent must be shared storage)."""
        out_dtype = _export_dtype(dtype)
        options = RunOptions(progress)
        check_target(Path(out_dir), overwrite, self._protected())
        with self.reading() as (base, merged):
            specs, produce = self._merged_tensors(base, merged, out_dtype)
            try:
                return write_hf_folder(
                    Path(out_dir),
                    specs,
                    produce,
                    self._config_dir(),
                    model_card(self.meta),
                    parse_size(max_shard_size),
                    overwrite=overwrite,
                    torch_dtype=out_dtype,
                    progress=lambda names: progress_bar(names, desc="exporting", unit="tensor", enabled=progress),
                    write_shards=(backend or LocalBackend()).shard_writer(
                        options, self._files(), self.method, self.meta["stats"], specs
                    ),
                )
            except OSError as e:
                raise FoldinError(
                    io_failure(f"exporting to {out_dir}", e, out_dir, f"{out_dir} was left as it was.")
                ) from e

    def export_lora(
        self,
        out_dir: str | os.PathLike[str],
        rank: int,
        full_tensors: bool = False,
        overwrite: bool = False,
        progress: bool = True,
    ) -> dict[str, float]:
        """Write the merged model as a PEFT LoRA adapter of rank `rank` over the base (each linear
        weight's change by its best rank-`rank` approximation); returns the share of each weight
        change's energy kept. Other changed tensors need `full_tensors` (see foldin.io.lora_export)."""
        check_target(Path(out_dir), overwrite, self._protected())
        scale = self.method.scale(self.meta["stats"])
        with self.reading() as (base, merged):
            specs, produce = self._merged_tensors(base, merged, None)
            linear = set(self.meta["linear_weights"])
            if not linear:  # a method that needs no linear weights did not look them up at init
                config_dir = Path(self.meta["base"]["config_dir"]) if self.meta["base"]["config_dir"] else None
                linear = set(resolve_linear_weights({n: s for n, (_, s) in specs.items()}, config_dir=config_dir)[0])

            def delta(name: str) -> torch.Tensor:
                return scale * merged.read(name) if merged is not None else torch.zeros(specs[name][1])

            floating = [n for n in specs if specs[n][0].is_floating_point]
            changed = {n for n in floating if n not in linear and merged is not None and merged.read(n).any()}
            try:
                return write_lora_adapter(
                    Path(out_dir),
                    specs,
                    linear,
                    changed,
                    delta,
                    produce,
                    rank,
                    full_tensors,
                    self.meta["base"]["path"],
                    model_card(self.meta, "peft"),
                    overwrite,
                    progress=lambda names: progress_bar(names, desc="factorising", unit="tensor", enabled=progress),
                )
            except OSError as e:
                raise FoldinError(
                    io_failure(f"exporting to {out_dir}", e, out_dir, f"{out_dir} was left as it was.")
                ) from e

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
