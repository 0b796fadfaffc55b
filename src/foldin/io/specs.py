"""A tensor's spec, its dtype and shape: what foldin knows of a tensor before reading it."""

from __future__ import annotations

import math

import torch

Spec = tuple[torch.dtype, tuple[int, ...]]


def spec_bytes(spec: Spec) -> int:
    """The bytes a tensor of this spec takes, stored densely."""
    dtype, shape = spec
    return math.prod(shape) * dtype.itemsize
