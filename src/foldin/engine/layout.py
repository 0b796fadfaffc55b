"""The base model's tensors as a merge sees them, and which checkpoints fit them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from foldin.engine.sources import Spec, TensorSource, architecture
from foldin.errors import CheckpointError, MismatchError


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
