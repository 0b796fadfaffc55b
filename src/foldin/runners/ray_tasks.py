"""What a Ray task of `--backend ray` runs on its node: one chunk of a step's pass, or one shard of an
export. The tasks open every file themselves (storage every node sees) and return only scalars,
checksums and timings; the driver side is `foldin.runners.ray`. They need nothing of Ray, so they
also run anywhere the files are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from foldin.engine import CheckedReader, ModelLayout, read_export_tensor, tensor_loader
from foldin.io.checkpoint import tensor_digest
from foldin.io.lora import open_model_or_adapter
from foldin.io.safetensors_file import SafetensorsWriter
from foldin.io.specs import Spec
from foldin.methods.base import TensorSlot
from foldin.runners import StateFiles


@dataclass(frozen=True)
class StepFiles:
    """What a task of one step opens: the state's files and the incoming checkpoint."""

    state: StateFiles
    checkpoint: str
    layout: ModelLayout
    device: str
    threads: int


@dataclass
class ChunkResult:
    results: list[Any]
    digests: dict[str, str]  # of the tensors this task wrote
    new_digests: dict[
        str, str
    ]  # of the incoming checkpoint's tensors it read (the driver hashes the checkpoint from them)
    seconds: dict[str, float]  # per tensor
    versions: tuple[str, str]  # foldin and torch on the node that ran it


def versions() -> tuple[str, str]:
    from importlib.metadata import version

    return version("foldin"), torch.__version__


def fold_chunk(
    files: StepFiles, names: list[str], fn: Callable[[TensorSlot], Any], shard: str | None, also_hash: list[str]
) -> ChunkResult:
    """One task: `fn` over the slots of `names`; with `shard`, fn returns (tensor, result) and the
    tensors are written there. Runs on a Ray worker (or anywhere: it needs only the files)."""
    torch.set_num_threads(files.threads)
    layout = files.layout
    results, digests, seconds = [], {}, {}
    with files.state.open() as (base, previous), open_model_or_adapter(files.checkpoint, base) as ckpt:
        new = CheckedReader(ckpt, algorithm=files.state.checksum)
        load = tensor_loader(layout, base, new, previous, torch.device(files.device))
        specs = layout.state_specs()
        with ExitStack() as stack:
            writer = (
                stack.enter_context(SafetensorsWriter(Path(shard), {n: specs[n] for n in names})) if shard else None
            )
            for name in names:
                started = time.perf_counter()
                out = fn(TensorSlot(name, name in layout.linear, load))
                if writer is not None:
                    tensor, out = out
                    tensor = layout.as_stored(name, tensor).cpu()
                    digests[name] = tensor_digest(tensor, files.state.checksum)
                    writer.write(name, tensor)
                results.append(out)
                seconds[name] = time.perf_counter() - started
        for name in also_hash:
            new.read(name)
    return ChunkResult(results, digests, dict(new.digests), seconds, versions())


def export_shard(
    files: StateFiles,
    names: list[str],
    method: Any,
    stats: dict[str, float],
    specs: dict[str, Spec],
    path: str,
    threads: int,
) -> dict[str, float]:
    """One task of an export: compute the merged model's `names` and write them to `path`."""
    torch.set_num_threads(threads)
    seconds = {}
    with files.open() as (base, merged), SafetensorsWriter(Path(path), specs) as writer:
        for name in names:
            started = time.perf_counter()
            writer.write(name, read_export_tensor(method, stats, base, merged, name, specs[name][0]))
            seconds[name] = time.perf_counter() - started
    return seconds
