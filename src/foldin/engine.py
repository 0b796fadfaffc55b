"""Runs one merge step: streams the base, the previous merged task vector and the new checkpoint
tensor by tensor through a method's passes, validating and hashing the checkpoint on the way.

Sources and sinks are plain callables, so the same engine drives on-disk states (files) and the
in-memory API (dicts). Nothing here knows about directories or atomic commits.
"""

from __future__ import annotations

import math

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from foldin.errors import CheckpointError, FoldinError, MismatchError
from foldin.io.checkpoint import content_hash, tensor_digest
from foldin.methods.base import MergeMethod, R, TensorSlot
from foldin.methods.learned import Learning
from foldin.progress import progress

if TYPE_CHECKING:
    from foldin.ray_backend import RayStepRunner

Spec = tuple[torch.dtype, tuple[int, ...]]


class TensorSource(Protocol):
    """Anything with a path label, names(), spec(name) and read(name): a Checkpoint, a DictSource."""

    path: object

    def names(self) -> list[str]: ...
    def spec(self, name: str) -> Spec: ...
    def read(self, name: str) -> torch.Tensor: ...


class DictSource(TensorSource):
    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "state dict"):
        self.tensors = tensors
        self.path = label

    def names(self) -> list[str]:
        return list(self.tensors)

    def spec(self, name: str) -> Spec:
        t = self.tensors[name]
        return t.dtype, tuple(t.shape)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach()


@dataclass(frozen=True)
class ModelLayout:
    """The base model's tensors as the merge sees them: which are merged (floating point), in which
    order, which are linear-layer weights, and the dtype arithmetic is done in."""

    specs: dict[str, Spec]
    merged_names: list[str]
    linear: frozenset[str]
    compute_dtype: torch.dtype
    numel: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "numel", sum(math.prod(self.specs[n][1]) for n in self.merged_names))

    @classmethod
    def from_source(cls, base: TensorSource, linear: set[str] | list[str]) -> "ModelLayout":
        specs = {n: base.spec(n) for n in base.names()}
        merged = [n for n, (dtype, _) in specs.items() if dtype.is_floating_point]
        if not merged:
            raise CheckpointError(f"{base.path} has no floating-point tensors to merge.")
        wide = any(specs[n][0] == torch.float64 for n in merged)
        return cls(specs, merged, frozenset(linear), torch.float64 if wide else torch.float32)

    def state_specs(self) -> dict[str, Spec]:
        """Dtype and shape of each tensor of the merged task vector."""
        return {n: (self.compute_dtype, self.specs[n][1]) for n in self.merged_names}

    def as_stored(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A method's output for `name` as the state stores it (checked shape, compute dtype, contiguous)."""
        if tuple(tensor.shape) != self.specs[name][1]:
            raise RuntimeError(f"method returned shape {tuple(tensor.shape)} for {name!r}")
        return tensor.to(self.compute_dtype).contiguous()

    def check_compatible(self, ckpt: TensorSource) -> None:
        """Refuse a checkpoint whose keys, shapes or dtypes differ from the base's. Tensors that are
        not merged (integer buffers such as position_ids, which newer transformers no longer save)
        may be absent: they are taken from the base."""
        names = set(ckpt.names())
        missing = set(self.merged_names) - names
        extra = names - set(self.specs)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} of the base's tensors are missing (e.g. {sorted(missing)[0]!r})")
            if extra:
                parts.append(f"{len(extra)} are not in the base (e.g. {sorted(extra)[0]!r})")
            raise MismatchError(f"{ckpt.path} does not have the base model's tensors: {'; '.join(parts)}.")
        for name in names:
            (dtype, shape), (c_dtype, c_shape) = self.specs[name], ckpt.spec(name)
            if c_shape != shape:
                raise MismatchError(f"{ckpt.path}: tensor {name!r} has shape {list(c_shape)} but the base has {list(shape)}.")
            if c_dtype != dtype:
                raise MismatchError(f"{ckpt.path}: tensor {name!r} is {c_dtype} but the base is {dtype}.")


class CheckedReader:
    """Reads a checkpoint's tensors, checking each for NaN/Inf and hashing it the first time.
    `on_hashed(content_hash)` runs as soon as every tensor has been hashed: a step can refuse a
    checkpoint it has already folded in (or the base) before doing the expensive part."""

    def __init__(self, source: TensorSource, on_hashed: Callable[[str], None] | None = None):
        self.source = source
        self.specs = {n: source.spec(n) for n in source.names()}
        self.digests: dict[str, str] = {}
        self._on_hashed = on_hashed

    def read(self, name: str) -> torch.Tensor:
        t = self.source.read(name)
        if name not in self.digests:
            if t.dtype.is_floating_point and not torch.isfinite(t).all():
                raise CheckpointError(f"{self.source.path}: tensor {name!r} contains NaN or Inf values.")
            self.add_digests({name: tensor_digest(t)})
        return t

    def add_digests(self, digests: Mapping[str, str]) -> None:
        """Record tensor digests (computed here, or by a Ray task that read the tensors)."""
        self.digests.update(digests)
        if self._on_hashed is not None and len(self.digests) == len(self.specs):
            callback, self._on_hashed = self._on_hashed, None
            callback(self.content_hash())

    def content_hash(self) -> str:
        for name in self.specs:
            if name not in self.digests:
                self.read(name)
        return content_hash({n: (*self.specs[n], d) for n, d in self.digests.items()})


def hash_source(source: TensorSource) -> str:
    """Content hash of a whole checkpoint (one streaming pass)."""
    return CheckedReader(source).content_hash()


class _Step:
    """The StepContext a method sees; drives passes over the layout's tensors."""

    def __init__(self, step: int, stats: Mapping[str, float], layout: ModelLayout,
                 load: Callable[[str, str], torch.Tensor], sink: Callable[[str, torch.Tensor], None], progress: bool,
                 learning: Learning | None = None, workers: int = 1):
        self.step = step
        self._workers = workers
        self.learning = learning
        self.stats = dict(stats)
        self.compute_dtype = layout.compute_dtype
        self.numel = layout.numel
        self._layout = layout
        self._load = load
        self._sink = sink
        self._progress = progress
        self.updated = False

    def _slots(self, desc: str):
        names = self._layout.merged_names
        bar = progress(names, desc=f"step {self.step}: {desc}", unit="tensor", enabled=self._progress)
        for name in bar:
            yield TensorSlot(name, name in self._layout.linear, self._load)

    def _map(self, fn: Callable[[TensorSlot], R], desc: str) -> Iterator[tuple[TensorSlot, R]]:
        """fn over every slot, in tensor order. With workers > 1, up to `workers` tensors are in
        flight on threads (torch releases the GIL in its kernels), each with its share of torch's
        threads; results still come back in order, so reductions are done in the same order and the
        bits equal those of a one-worker run with that many threads."""
        if self._workers <= 1:
            for slot in self._slots(desc):
                yield slot, fn(slot)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // self._workers))
        try:
            with ThreadPoolExecutor(self._workers) as pool:
                in_flight: deque = deque()
                for slot in self._slots(desc):
                    in_flight.append((slot, pool.submit(fn, slot)))
                    if len(in_flight) >= self._workers:  # bounded: memory is `workers` tensors' worth
                        done, future = in_flight.popleft()
                        yield done, future.result()
                while in_flight:
                    done, future = in_flight.popleft()
                    yield done, future.result()
        finally:
            torch.set_num_threads(threads)

    def scan(self, fn: Callable[[TensorSlot], R], desc: str) -> list[R]:
        return [result for _, result in self._map(fn, desc)]

    def update(self, fn: Callable[[TensorSlot], tuple[torch.Tensor, R]], desc: str) -> list[R]:
        if self.updated:
            raise RuntimeError("a method may call update() only once per step")
        results = []
        for slot, (tensor, result) in self._map(fn, desc):
            self._sink(slot.name, self._layout.as_stored(slot.name, tensor))
            results.append(result)
        self.updated = True
        return results


def fold_step(
    method: MergeMethod,
    step: int,
    stats: Mapping[str, float],
    layout: ModelLayout,
    base: TensorSource,
    checkpoint: TensorSource,
    previous: TensorSource | None,
    sink: Callable[[str, torch.Tensor], None],
    progress: bool = True,
    learning: Learning | None = None,
    device: str | torch.device | None = None,
    workers: int = 1,
    cluster: "RayStepRunner | None" = None,
    on_hashed: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], str]:
    """Fold `checkpoint` in as step `step`. Writes every tensor of the new merged task vector to
    `sink`; returns (new stats, the checkpoint's content hash). Raises before returning if the
    checkpoint is bad; the caller commits only on success. Data-driven methods need `learning`.
    `device` (e.g. "cuda") is where the arithmetic runs; tensors are read and written on the CPU.
    `workers` tensors are processed at once on threads, each with torch's threads divided among
    them; the bits depend only on the threads each tensor gets (BLAS and LAPACK split work by thread
    count). With `cluster`, the passes run as Ray tasks that read the files and write the merged
    task vector's shards themselves; `sink` is not used. `on_hashed(content_hash)` runs once the
    whole checkpoint has been read (e.g. to refuse a duplicate before a long learning phase)."""
    if method.needs_data and learning is None:
        raise FoldinError(f"method {method.name!r} learns from data: give the task's data (API: data=TaskData(...); CLI: --task SUITE:TASK).")
    compute = resolve_device(device)
    if method.needs_data and compute.type != "cpu":
        raise FoldinError(f"--device applies to the weight-only methods; {method.name!r} runs on the CPU.")
    layout.check_compatible(checkpoint)
    new = CheckedReader(checkpoint, on_hashed)
    if cluster is None:  # tensors that are not merged (integer buffers) are hashed first, so on_hashed fires once the merged ones are read
        for name in [n for n in new.specs if n not in layout.specs or not layout.specs[n][0].is_floating_point]:
            new.read(name)
    if workers < 1:
        raise FoldinError(f"--workers must be at least 1, not {workers}.")
    if cluster is not None:
        if method.needs_data:
            raise FoldinError(f"--backend ray applies to the weight-only methods; {method.name!r} learns on one machine (use the local backend).")
        ctx: _Step = cluster.step_context(step, stats, layout, new, progress)
    else:
        ctx = _Step(step, stats, layout, tensor_loader(layout, base, new, previous, compute), lambda name, t: sink(name, t.cpu()),
                    progress, learning, 1 if method.needs_data else workers)
    new_stats = method.fold(ctx)
    if not ctx.updated:
        raise RuntimeError(f"method {method.name!r} did not write the merged task vector")
    return new_stats, new.content_hash()


def tensor_loader(layout: ModelLayout, base: TensorSource, new: CheckedReader, previous: TensorSource | None,
                  compute: torch.device) -> Callable[[str, str], torch.Tensor]:
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


def export_tensor(method: MergeMethod, stats: Mapping[str, float], base: torch.Tensor,
                  merged: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
    """The merged model's tensor: base + scale * merged task vector (base itself if not merged)."""
    if merged is None:
        return base
    out = base.to(merged.dtype) + method.scale(stats) * merged
    return out.to(dtype or base.dtype)


def read_export_tensor(method: MergeMethod, stats: Mapping[str, float], base: TensorSource, merged: TensorSource | None,
                       name: str, dtype: torch.dtype) -> torch.Tensor:
    """export_tensor for `name`, read from the base and the merged task vector (non-float tensors: the base's)."""
    m = merged.read(name) if merged is not None and dtype.is_floating_point else None
    return export_tensor(method, stats, base.read(name), m, dtype)
