"""Where a merge step's passes run, and where its merged task vector goes: threads in this process
(`local`) or Ray tasks on a cluster (`ray`). The state and the API choose a backend; the engine
sees only a `Runner` (foldin.engine), and the methods only their StepContext."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from foldin.engine import ModelLayout, Runner, TensorSource, VerifiedSource
from foldin.io.checkpoint import CHECKSUM, Checkpoint, open_checkpoint
from foldin.io.specs import Spec
from foldin.methods.base import MergeMethod, TensorSlot


@dataclass(frozen=True)
class Options:
    """How a step or an export runs, one value for every entry point (MergeState.add,
    add_and_export, export, export_lora; the CLI builds it in one place).

    Attributes:
        progress: show progress bars.
        device: where a weight-only method's arithmetic runs (None: the CPU).
        workers: tensors computed at once on threads, sharing torch's threads (None: one per thread for
            methods that decompose matrices on the CPU, else 1).
        backend: where the passes run (None: this process; a RayBackend: Ray tasks).
        dtype: the exported model's floating dtype, "float32", "float16" or "bfloat16" (None: the base's).
        max_shard_size: the largest exported safetensors file, e.g. "5GB".
        overwrite: an export may replace an earlier foldin export in its folder.
    """

    progress: bool = True
    device: str | None = None
    workers: int | None = None
    backend: Backend | None = None
    dtype: str | None = None
    max_shard_size: str = "5GB"
    overwrite: bool = False


def with_changes(options: Options | None, changes: dict[str, Any]) -> Options:
    """`options` (default: Options()) with the fields in `changes` replaced; an unknown field is refused."""
    unknown = sorted(set(changes) - {f.name for f in fields(Options)})
    if unknown:
        raise TypeError(
            f"{unknown[0]!r} is not a field of foldin.Options ({', '.join(f.name for f in fields(Options))})"
        )
    return replace(options or Options(), **changes)


@dataclass(frozen=True)
class StateFiles:
    """Where a merge state's tensors live, as paths every node of a cluster can open."""

    state_dir: str
    base: str
    generation: str | None  # the current merged task vector (a .safetensors file or a shard index)
    digests: dict[str, str] = field(default_factory=dict)  # its checksums recorded at commit
    checksum: str = CHECKSUM  # the algorithm of the digests this state records

    @contextmanager
    def open(self) -> Iterator[tuple[Checkpoint, VerifiedSource | None]]:
        """(base, the merged task vector checked against its checksums as it is read, or None at step 0)."""
        with ExitStack() as stack:
            base = stack.enter_context(open_checkpoint(self.base))
            previous = None
            if self.generation is not None:
                previous = VerifiedSource(open_checkpoint(self.generation), self.digests, self.state_dir)
                stack.callback(previous.close)
            yield base, previous


@dataclass(frozen=True)
class GenerationJob:
    """One step of a merge state, as a backend sees it: where the state's files are, the incoming
    checkpoint, the model's layout, and the new generation folder the step writes into."""

    files: StateFiles
    checkpoint: Path
    layout: ModelLayout
    step: int
    gen_dir: Path
    base: TensorSource
    previous: TensorSource | None


class GenerationRunner(Runner, Protocol):
    """A Runner that writes the step's merged task vector into a new generation folder; after the
    step, `digests` holds each tensor's checksum (what the state records at commit)."""

    digests: dict[str, str]
    on_merged: Callable[[TensorSlot, torch.Tensor], None] | None  # sees each merged tensor (a fused export)


ShardWriter = Callable[
    [list[tuple[Path, list[str]]]], None
]  # writes the planned (path, tensor names) shards of an export


class Backend(Protocol):
    """Runs a state's steps and exports (LocalBackend, RayBackend)."""

    def generation_runner(self, options: Options, job: GenerationJob) -> AbstractContextManager[GenerationRunner]:
        """A runner that writes `job`'s merged task vector into its generation folder."""

    def shard_writer(
        self,
        options: Options,
        files: StateFiles,
        method: MergeMethod,
        stats: dict[str, float],
        specs: dict[str, Spec],
    ) -> ShardWriter | None:
        """None: the export writes its shards in this process."""
