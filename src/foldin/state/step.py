"""One step of a state, as a transaction: fold a checkpoint into a new generation, commit, clean up.

The new generation is written beside the current one and made durable, then state.json is
replaced atomically (the commit point), then the old generation is removed. Any failure before the
commit removes the new generation and leaves the state at its last good step. With an ExportPlan,
the merged model folder is written in the same pass and put in place only after the commit.
"""

from __future__ import annotations

import secrets
import shutil
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from foldin.data import Learning, TaskData
from foldin.engine import CheckedReader, ModelLayout, export_tensor, fold_step
from foldin.errors import FoldinError, MismatchError
from foldin.io.atomic import fsync_dir
from foldin.io.export import ModelFolderWriter
from foldin.io.hub import Located
from foldin.io.lora import open_model_or_adapter
from foldin.methods.base import Heads
from foldin.runners import GenerationJob, Options
from foldin.runners.local import LocalBackend
from foldin.state.base import open_base
from foldin.state.card import model_card
from foldin.state.export import ExportPlan, config_dir, export_specs, method_of, protected
from foldin.state.generation import BUFFER_FILE, HEADS_FILE, new_generation_name, write_heads, write_task_data
from foldin.state.schema import committed_generation, digest_algorithm, file_digest, write_meta
from foldin.state.stored import open_generation, state_files, stored_buffer, stored_heads


def refuse_duplicate(meta: dict[str, Any], checkpoint: Path, ckpt_hash: str, base_hash: str | None = None) -> None:
    """Refuse the base itself, and a checkpoint whose content was folded in before."""
    if ckpt_hash == (base_hash or meta["base"]["hash"]):
        raise MismatchError(f"{checkpoint} is the base model itself; there is nothing to fold in.")
    for entry in meta["history"]:
        if entry["hash"] == ckpt_hash:
            raise MismatchError(
                f"{checkpoint} was already folded in at step {entry['step']} (same content as {entry['checkpoint']})."
            )


def write_learned(
    state_dir: Path, meta: dict[str, Any], gen_dir: Path, buffer: TaskData | None, heads: Heads
) -> dict[str, str]:
    """A data-driven step's buffer and all heads refit so far, into the new generation; their checksums."""
    if buffer is not None:
        write_task_data(gen_dir / BUFFER_FILE, buffer)
    all_heads = {**stored_heads(state_dir, meta), **heads}
    if all_heads:
        write_heads(gen_dir / HEADS_FILE, all_heads)
    return {f.name: file_digest(f) for f in (gen_dir / BUFFER_FILE, gen_dir / HEADS_FILE) if f.exists()}


def commit_step(
    state_dir: Path,
    meta: dict[str, Any],
    located: Located,
    learning: Learning | None,
    options: Options,
    export: ExportPlan | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fold the checkpoint at `located` into the state, whose lock the caller holds exclusively.

    Args:
        meta: state.json as read under that lock.
        options: how the step runs (its backend None: in this process).
        learning: the model and the new task's data, for a data-driven method.
        export: a model folder to write in the same pass, or None.

    Returns:
        The step's history entry and the committed state.json.
    """
    checkpoint = located.path
    started = time.time()
    step = meta["step"] + 1
    method = method_of(meta)
    algorithm = digest_algorithm(meta)
    gen = new_generation_name(step, secrets.token_hex(4))
    gen_dir = state_dir / gen
    if learning is not None and method.needs_data:
        learning = Learning(learning.module, learning.features, learning.new, stored_buffer(state_dir, meta))
    opened, base_info = open_base(meta["base"], algorithm)
    with opened, open_model_or_adapter(checkpoint, opened) as ckpt:
        base = opened if base_info["hash"] is not None else CheckedReader(opened, algorithm=algorithm)
        layout = ModelLayout.from_source(base, meta["linear_weights"])
        previous = open_generation(state_dir, meta)
        folder: ModelFolderWriter | None = None
        if export is not None:
            specs = export_specs(base, export.dtype)
            folder = ModelFolderWriter(
                export.out_dir, specs, export.max_shard_bytes, export.overwrite, protected(state_dir, meta)
            )
        gen_dir.mkdir()
        try:
            job = GenerationJob(state_files(state_dir, meta), checkpoint, layout, step, gen_dir, base, previous)
            with (options.backend or LocalBackend()).generation_runner(options, job) as runner:
                if folder is not None:  # the merged model's tensor, from what the step holds anyway
                    out = folder
                    runner.on_merged = lambda slot, merged: out.write(
                        slot.name, export_tensor(method, {}, slot.base, merged, out.specs[slot.name][0])
                    )
                result, ckpt_hash = fold_step(
                    method,
                    step,
                    meta["stats"],
                    layout,
                    ckpt,
                    runner,
                    learning,
                    on_hashed=lambda h: refuse_duplicate(meta, checkpoint, h),
                    algorithm=algorithm,
                )
            if folder is not None:  # integer buffers: the base's
                for name in [n for n in base.names() if n not in layout.merged_names]:
                    folder.write(name, base.read(name))
            if isinstance(base, CheckedReader):  # a state made without hashing its base: hashed now
                base_info = {**base_info, "hash": base.content_hash()}
                refuse_duplicate(meta, checkpoint, ckpt_hash, base_info["hash"])
            files = write_learned(state_dir, meta, gen_dir, result.buffer, result.heads)
            fsync_dir(gen_dir)
            fsync_dir(state_dir)  # the generation's own entry, before state.json may name it
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
            committed = {
                **meta,
                "base": base_info,
                "step": step,
                "stats": result.stats,
                "generation": gen,
                "checksums": {"merged": runner.digests, "files": files},
                "history": [*meta["history"], entry],
                "foldin_version": version("foldin"),
            }
            write_meta(state_dir, committed)  # the commit point
        except BaseException:
            if folder is not None:
                folder.abort()
            if committed_generation(state_dir) != gen:  # a failure after the commit point keeps it
                shutil.rmtree(gen_dir, ignore_errors=True)
            raise
        finally:
            if previous is not None:
                previous.close()
    if meta["generation"]:
        shutil.rmtree(state_dir / meta["generation"], ignore_errors=True)
    if folder is not None and export is not None:
        try:
            folder.finish_model(config_dir(committed), model_card(committed), export.dtype)
        except OSError as e:
            raise FoldinError(
                f"step {step} was committed, but writing {export.out_dir} failed: {e.strerror or e}; "
                f"export it again with 'foldin export'."
            ) from e
    return entry, committed
