"""The merged model's tensors: the base plus the method's scale times the merged task vector."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from foldin.engine.sources import TensorSource
from foldin.methods.base import MergeMethod


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
