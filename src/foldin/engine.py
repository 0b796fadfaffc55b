"""Runs one merge step: streams the base, the previous merged task vector and the new checkpoint
tensor by tensor through a method's passes, validating and hashing the checkpoint on the way.

Where the passes run (threads in this process, Ray tasks on a cluster) is a `Runner`'s business
(foldin.runners); where the merged task vector goes, the runner's too. Nothing here knows about
directories, atomic commits or clusters.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from foldin.data import Learning
from foldin.errors import CheckpointError, FoldinError, MismatchError, StateError
from foldin.io.checkpoint import CHECKSUM, content_hash, digest_matches, tensor_digest
from foldin.methods.base import FoldResult, MergeMethod, R, TensorSlot

Spec = tuple[torch.dtype, tuple[int, ...]]


class TensorSource(Protocol):
    """Anything with a path label, names(), spec(name) and read(name): a Checkpoint, a DictSource."""

    path: object

    def names(self) -> list[str]: ...
    def spec(self, name: str) -> Spec: ...
    def read(self, name: str) -> torch.Tensor: ...


def architecture(source: TensorSource) -> str | None:
    """The model class a checkpoint folder's config.json names (else its model_type), if it has one."""
    folder = getattr(source, "config_dir", None)
    if folder is None:
        return None
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    names = config.get("architectures") or []
    return names[0] if names else config.get("model_type")


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
    architecture: str | None = None  # what the base's config.json names, for a clearer mismatch message
    numel: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "numel", sum(math.prod(self.specs[n][1]) for n in self.merged_names))

    @classmethod
    def from_source(cls, base: TensorSource, linear: set[str] | list[str]) -> ModelLayout:
        specs = {n: base.spec(n) for n in base.names()}
        merged = [n for n, (dtype, _) in specs.items() if dtype.is_floating_point]
        if not merged:
            raise CheckpointError(f"{base.path} has no floating-point tensors to merge.")
        wide = any(specs[n][0] == torch.float64 for n in merged)
        return cls(specs, merged, frozenset(linear), torch.float64 if wide else torch.float32, architecture(base))

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
            theirs = architecture(ckpt)
            named = f" ({theirs}; the base is {self.architecture})" if theirs and self.architecture else ""
            raise MismatchError(
                f"{ckpt.path} does not have the base model's tensors: {'; '.join(parts)}; it looks like a "
                f"different model than the base{named if theirs != self.architecture else ''}."
            )
        for name in names:
            (dtype, shape), (c_dtype, c_shape) = self.specs[name], ckpt.spec(name)
            if c_shape != shape:
                raise MismatchError(
                    f"{ckpt.path}: tensor {name!r} has shape {list(c_shape)} but the base has {list(shape)}."
                )
            if c_dtype != dtype and not self.widens(dtype, c_dtype):
                raise MismatchError(
                    f"{ckpt.path}: tensor {name!r} is {c_dtype} but the base is {dtype}, and merging in "
                    f"{self.compute_dtype} would not hold it exactly; cast the checkpoint to {dtype}."
                )

    def widens(self, base_dtype: torch.dtype, dtype: torch.dtype) -> bool:
        """Whether a checkpoint tensor of `dtype` is merged as if it had the base's dtype: both are
        floating point and the merge's arithmetic dtype holds every value of `dtype` exactly
        (float16 and bfloat16 in float32; anything in float64). Mixed-precision fine-tunes of a
        float32 base come as float16 or bfloat16."""
        exact = {torch.float16, torch.bfloat16, torch.float32} if self.compute_dtype == torch.float32 else None
        return base_dtype.is_floating_point and dtype.is_floating_point and (exact is None or dtype in exact)

    def widened_dtypes(self, ckpt: TensorSource) -> list[str]:
        """The checkpoint's floating dtypes that differ from the base's (widened, see `widens`)."""
        return sorted(
            {str(ckpt.spec(n)[0]).removeprefix("torch.") for n in ckpt.names() if ckpt.spec(n)[0] != self.specs[n][0]}
        )


class CheckedReader:
    """Reads a checkpoint's tensors, checking each for NaN/Inf and hashing it the first time.
    `on_hashed(content_hash)` runs as soon as every tensor has been hashed: a step can refuse a
    checkpoint it has already folded in (or the base) before doing the expensive part."""

    def __init__(
        self, source: TensorSource, on_hashed: Callable[[str], None] | None = None, algorithm: str = CHECKSUM
    ):
        self.source = source
        self.algorithm = algorithm
        self.specs = {n: source.spec(n) for n in source.names()}
        self.digests: dict[str, str] = {}
        self._on_hashed = on_hashed
        self.path = source.path

    def names(self) -> list[str]:
        return list(self.specs)

    def spec(self, name: str) -> Spec:
        return self.specs[name]

    @property
    def config_dir(self) -> Path | None:
        return getattr(self.source, "config_dir", None)

    def read(self, name: str) -> torch.Tensor:
        t = self.source.read(name)
        if name not in self.digests:
            if t.dtype.is_floating_point and not all_finite(t):
                raise CheckpointError(f"{self.source.path}: tensor {name!r} contains NaN or Inf values.")
            self.add_digests({name: tensor_digest(t, self.algorithm)})
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
        return content_hash({n: (*self.specs[n], d) for n, d in self.digests.items()}, self.algorithm)


def hash_source(source: TensorSource, algorithm: str = CHECKSUM) -> str:
    """Content hash of a whole checkpoint (one streaming pass)."""
    return CheckedReader(source, algorithm=algorithm).content_hash()


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf. A sum is finite exactly when every entry is (or it overflowed): one fast
    reduction, about 30x faster than isfinite(t).all(), which builds a mask of the whole tensor;
    only a non-finite sum is checked element by element."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


class VerifiedSource:
    """A source whose tensors are checked, the first time each is read, against checksums recorded
    when it was written (a merge state's generation): a flipped bit is reported, never merged."""

    def __init__(self, ckpt: TensorSource, digests: Mapping[str, str], owner: str):
        self.ckpt, self.path, self._digests, self._owner = ckpt, ckpt.path, dict(digests), owner
        self._verified: set[str] = set()
        if set(ckpt.names()) != set(self._digests):
            raise StateError(
                f"the merge state in {owner} is corrupted: its merged tensors do not match the list recorded "
                "at commit."
            )

    def names(self) -> list[str]:
        return self.ckpt.names()

    def spec(self, name: str) -> Spec:
        return self.ckpt.spec(name)

    def read(self, name: str) -> torch.Tensor:
        t = self.ckpt.read(name)
        if name not in self._verified:
            if not digest_matches(t, self._digests[name]):
                raise StateError(
                    f"the merge state in {self._owner} is corrupted: tensor {name!r} does not match its checksum "
                    "(disk or copy damage); restore the state directory from a backup."
                )
            self._verified.add(name)
        return t

    def close(self) -> None:
        self.ckpt.close()  # type: ignore[attr-defined]


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


def export_tensor(
    method: MergeMethod,
    stats: Mapping[str, float],
    base: torch.Tensor,
    merged: torch.Tensor | None,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """The merged model's tensor: base + scale * merged task vector (base itself if not merged)."""
    if merged is None:
        return base
    scale = method.scale(stats)
    out = base.to(merged.dtype) + (merged if scale == 1 else scale * merged)  # 1 * x is x: no pass for it
    return out.to(dtype or base.dtype)


def read_export_tensor(
    method: MergeMethod,
    stats: Mapping[str, float],
    base: TensorSource,
    merged: TensorSource | None,
    name: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """export_tensor for `name`, read from the base and the merged task vector (non-float tensors: the base's)."""
    m = merged.read(name) if merged is not None and dtype.is_floating_point else None
    return export_tensor(method, stats, base.read(name), m, dtype)
