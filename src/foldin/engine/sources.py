"""What the engine reads tensors from: anything with names(), spec(name) and read(name)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from foldin.io.specs import Spec


class TensorSource(Protocol):
    """Anything with a path label, names(), spec(name) and read(name): a Checkpoint, a DictSource."""

    @property
    def path(self) -> object: ...

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


class DictSource:
    """A TensorSource over tensors in memory."""

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
