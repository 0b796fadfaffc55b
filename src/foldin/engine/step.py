"""One step: a method's passes over every merged tensor, carried out by a Runner."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from foldin.data import Learning
from foldin.engine.checks import CheckedReader
from foldin.engine.layout import ModelLayout
from foldin.engine.sources import TensorSource
from foldin.errors import FoldinError
from foldin.io.checkpoint import CHECKSUM
from foldin.methods.base import FoldResult, MergeMethod, R, TensorSlot


class StepPasses(ABC):
    """The StepContext a method sees, whatever carries its passes out (threads here, Ray tasks on a
    cluster): the step's facts, and scan / update over every merged tensor in order, with the rule
    that the merged task vector is written exactly once."""

    def __init__(self, step: int, stats: Mapping[str, float], layout: ModelLayout, learning: Learning | None = None):
        self.step = step
        self.stats = dict(stats)
        self.learning = learning
        self.layout = layout
        self.compute_dtype = layout.compute_dtype
        self.numel = layout.numel
        self.updated = False

    @abstractmethod
    def run_pass(self, fn: Callable[[TensorSlot], Any], desc: str, write: bool) -> list[Any]:
        """fn over every merged tensor, results in tensor order; with `write`, fn returns (tensor,
        result) and the tensors are the new merged task vector."""

    def scan(self, fn: Callable[[TensorSlot], R], desc: str) -> list[R]:
        return self.run_pass(fn, desc, write=False)

    def update(self, fn: Callable[[TensorSlot], tuple[torch.Tensor, R]], desc: str) -> list[R]:
        if self.updated:
            raise RuntimeError("a method may call update() only once per step")
        results = self.run_pass(fn, desc, write=True)
        self.updated = True
        return results


class Runner(Protocol):
    """Carries a step's passes out: gives the step its context (runners/ implement it)."""

    def context(
        self,
        method: MergeMethod,
        step: int,
        stats: Mapping[str, float],
        layout: ModelLayout,
        new: CheckedReader,
        learning: Learning | None,
    ) -> StepPasses: ...


def fold_step(
    method: MergeMethod,
    step: int,
    stats: Mapping[str, float],
    layout: ModelLayout,
    checkpoint: TensorSource,
    runner: Runner,
    learning: Learning | None = None,
    on_hashed: Callable[[str], None] | None = None,
    algorithm: str = CHECKSUM,
) -> tuple[FoldResult, str]:
    """Fold `checkpoint` in as step `step`: the runner streams the new merged task vector to where it
    goes; returns (what the step leaves, the checkpoint's content hash). Raises before returning if
    the checkpoint is bad; the caller commits only on success. Data-driven methods need `learning`.
    `on_hashed(content_hash)` runs once the whole checkpoint has been read (e.g. to refuse a
    duplicate before a long learning phase). `algorithm` hashes the checkpoint (the state's own)."""
    if method.needs_data and learning is None:
        raise FoldinError(
            f"method {method.name!r} learns from data: give the task's data (API: data=TaskData(...); CLI: "
            f"--task SUITE:TASK)."
        )
    layout.check_compatible(checkpoint)
    new = CheckedReader(checkpoint, on_hashed, algorithm)
    ctx = runner.context(method, step, stats, layout, new, learning if method.needs_data else None)
    result = method.fold(ctx)
    if not ctx.updated:
        raise RuntimeError(f"method {method.name!r} did not write the merged task vector")
    return result, new.content_hash()


def tensor_loader(
    layout: ModelLayout, base: TensorSource, new: CheckedReader, previous: TensorSource | None, compute: torch.device
) -> Callable[[str, str], torch.Tensor]:
    """load(kind, name) for TensorSlot: kind is "base", "new" or "merged" (zeros before the first step)."""
    dtype = layout.compute_dtype

    def load(kind: str, name: str) -> torch.Tensor:
        if kind == "base":
            return base.read(name).to(compute, dtype)
        if kind == "new":
            return new.read(name).to(compute, dtype)
        if previous is None:
            return torch.zeros(layout.specs[name][1], dtype=dtype, device=compute)
        return previous.read(name).to(compute, dtype)

    return load


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device, refused in one sentence if this machine does not have it."""
    try:
        d = torch.device(device or "cpu")
        torch.empty(1, device=d)
    except (RuntimeError, AssertionError) as e:
        raise FoldinError(f"device {device!r} is not available here ({str(e).splitlines()[0]}).") from None
    return d
