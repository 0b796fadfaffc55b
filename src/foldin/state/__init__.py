"""The on-disk merge state: everything needed to fold in the next checkpoint on another day.

Layout of STATE_DIR:
  state.json            method, parameters, step, stats, base identity, history, checksums (schema.py)
  gen-<step>-<token>/   the current generation: the merged task vector and, for data-driven methods,
                        the examples and heads kept for the next step (generation.py)
  .lock                 advisory lock: one writer at a time (lock.py)

Each `add` writes a complete new generation beside the current one, makes it durable, then
atomically replaces state.json (the commit point) and removes the old generation (step.py). A
crash at any moment leaves state.json pointing at a complete generation: the old step or the new
one. Leftover generations from an interrupted step are removed the next time the state is opened
for writing. Where a step's passes run is a backend's business (foldin.runners): this process, or
Ray tasks. Making a state is create.py, its base's identity base.py, reading it back verified
stored.py, and writing the merged model out export.py; MergeState ties them together.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from foldin.data import Learning, TaskData
from foldin.engine import VerifiedSource
from foldin.errors import FoldinError, StateError, io_failure
from foldin.io.checkpoint import Checkpoint
from foldin.io.export import check_target
from foldin.io.hub import locate
from foldin.methods.base import Heads, MergeMethod
from foldin.runners import Options, with_changes
from foldin.state import base as base_model
from foldin.state import export as exporting
from foldin.state import stored
from foldin.state.create import create_state
from foldin.state.generation import remove_leftovers
from foldin.state.lock import locked
from foldin.state.schema import digest_algorithm, read_meta
from foldin.state.step import commit_step

__all__ = ["MergeState"]


class MergeState:
    """A merge state directory. Open with `MergeState.create` or `MergeState.open`.

    `meta` is state.json as this object last read or committed it. A step, an export and `reading`
    read it again under the state's lock, since another process may have committed since."""

    def __init__(self, state_dir: Path, meta: dict[str, Any]):
        self.dir = state_dir
        self.meta = meta

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def method(self) -> MergeMethod:
        return exporting.method_of(self.meta)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.meta["history"]

    @property
    def checksum(self) -> str:
        """The hash of this state's digests (states made before xxh3 keep sha256)."""
        return digest_algorithm(self.meta)

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
        id (org/name[@revision]); `hash_base=True` hashes it now (a full read) instead of at the
        first step (see foldin.state.create)."""
        state_dir = Path(state_dir)
        return cls(state_dir, create_state(state_dir, base, method, params, linear_weights, hash_base))

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> MergeState:
        return cls(Path(state_dir), read_meta(Path(state_dir)))

    def check_base(self, base: str | os.PathLike[str]) -> None:
        """Refuse a base that is not this state's base (compared by content)."""
        base_model.check_base(base, self.meta["base"], self.checksum, self.dir)

    # ---- folding in -------------------------------------------------------------------------
    def add(
        self,
        checkpoint: str | os.PathLike[str],
        options: Options | None = None,
        *,
        learning: Learning | None = None,
        **changes: Any,
    ) -> dict[str, Any]:
        """Fold one checkpoint in, atomically. Returns its history entry.

        Args:
            checkpoint: a model folder or file, a LoRA adapter folder, or a Hub id.
            options: how the step runs (foldin.Options: progress, device, workers, backend);
                keyword arguments change single fields of it, e.g. `add(ckpt, progress=False)`.
            learning: for a data-driven method, the model and the new task's data; the previous
                task's examples come from the state.
        """
        opts = with_changes(options, changes)
        return self._step(checkpoint, learning, opts, None, "")

    def add_and_export(
        self,
        checkpoint: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        options: Options | None = None,
        **changes: Any,
    ) -> tuple[dict[str, Any], Path]:
        """Fold one checkpoint in, then export the merged model (`options` as for `add` and
        `export`). When the method's scale is known before the step (every method but opcm), on the
        CPU of this process, the export is written in the same pass: the base and the new merged
        task vector are not read a second time. The export is put in place only after the step
        has committed."""
        opts = with_changes(options, changes)
        if opts.backend is not None or opts.device not in (None, "cpu") or not self.method.scale_known_before_step:
            entry = self.add(checkpoint, opts)
            return entry, self.export(out_dir, opts)
        plan = exporting.ExportPlan.of(out_dir, opts)
        check_target(plan.out_dir, plan.overwrite, exporting.protected(self.dir, self.meta))
        entry = self._step(checkpoint, None, opts, plan, f", and {out_dir} as it was")
        return entry, plan.out_dir

    def _step(
        self,
        checkpoint: str | os.PathLike[str],
        learning: Learning | None,
        options: Options,
        export: exporting.ExportPlan | None,
        also_unchanged: str,
    ) -> dict[str, Any]:
        """A step under the exclusive lock, after removing what an interrupted one left behind."""
        with locked(self.dir, exclusive=True):
            self.meta = read_meta(self.dir)  # another process may have committed since we opened
            remove_leftovers(self.dir, self.meta["generation"])
            try:
                entry, self.meta = commit_step(self.dir, self.meta, locate(checkpoint), learning, options, export)
            except OSError as e:  # disk full, I/O error: the new generation was discarded
                raise StateError(
                    io_failure(
                        f"folding in {checkpoint}",
                        e,
                        self.dir,
                        f"the state is unchanged at step {self.step}{also_unchanged}.",
                    )
                ) from e
            except FoldinError:  # a failure after the commit point leaves the step committed
                with suppress(FoldinError):
                    self.meta = read_meta(self.dir)
                raise
        return entry

    # ---- reading ----------------------------------------------------------------------------
    def verify(self) -> int:
        """Read everything the state holds and check it against its checksums; returns bytes checked."""
        return stored.verify(self.dir)

    def buffer(self) -> TaskData | None:
        """The examples of the last task that a data-driven method kept for the next step."""
        return stored.stored_buffer(self.dir, self.meta)

    def heads(self) -> Heads:
        """Classification heads refit by a data-driven method (OTMF's head refit), by task."""
        return stored.stored_heads(self.dir, self.meta)

    @contextmanager
    def reading(self) -> Iterator[tuple[Checkpoint, VerifiedSource | None]]:
        """Hold a shared lock and yield (base, merged task vector or None at step 0)."""
        with stored.reading(self.dir) as (self.meta, base, merged):
            yield base, merged

    def merged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The merged model in memory (for evaluation; `export` streams instead)."""
        return exporting.merged_state_dict(self.dir, dtype)

    def export(self, out_dir: str | os.PathLike[str], options: Options | None = None, **changes: Any) -> Path:
        """Write the merged model after the current step as a Hugging Face folder. `options`
        (foldin.Options) gives its dtype, shard size, overwrite, progress and backend (a RayBackend
        writes each shard elsewhere: out_dir's parent must be shared storage); keyword arguments
        change single fields, e.g. `export(out, dtype="bfloat16")`."""
        opts = with_changes(options, changes)
        return exporting.export_folder(self.dir, self.meta, exporting.ExportPlan.of(out_dir, opts), opts)

    def export_lora(
        self,
        out_dir: str | os.PathLike[str],
        rank: int,
        full_tensors: bool = False,
        options: Options | None = None,
        **changes: Any,
    ) -> dict[str, float]:
        """Write the merged model as a PEFT LoRA adapter of rank `rank` over the base; returns the
        share of each weight change's energy kept (see foldin.state.export.export_lora). Of
        `options`, overwrite and progress apply."""
        opts = with_changes(options, changes)
        return exporting.export_lora(self.dir, self.meta, Path(out_dir), rank, full_tensors, opts)

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
