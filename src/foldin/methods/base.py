"""What a merge method is: a parameter model, and one `fold` that turns the previous merged task
vector and a new checkpoint into the next merged task vector, tensor by tensor.

Every method keeps the same learned state: the *merged task vector* (one tensor per floating-point
parameter, merged model minus base, before any global scale) and a few scalars (`stats`). The merged
model is ``base + scale(stats) * merged``. Methods never see files: they see a `StepContext` that
streams tensors to them, so the same code runs on disk, in memory, and on plain tensors in tests.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from foldin.data import Learning, TaskData
from foldin.errors import FoldinError

R = TypeVar("R")
Heads = dict[str, dict[str, torch.Tensor]]  # task name -> a classification head {"weight", "bias"}


class MethodParams(BaseModel):
    """Base for each method's validated, immutable parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSlot:
    """One floating-point parameter during a step. Inputs are read on first use and cached, so a
    pass that needs only some of them reads only those."""

    def __init__(self, name: str, is_linear: bool, load: Callable[[str, str], torch.Tensor]):
        self.name = name
        self.is_linear = is_linear
        self._load = load

    @cached_property
    def base(self) -> torch.Tensor:
        return self._load("base", self.name)

    @cached_property
    def new(self) -> torch.Tensor:
        """The incoming checkpoint's tensor."""
        return self._load("new", self.name)

    @cached_property
    def merged(self) -> torch.Tensor:
        """The merged task vector after the previous step (zeros before the first)."""
        return self._load("merged", self.name)

    @cached_property
    def task_vector(self) -> torch.Tensor:
        return self.new - self.base


class StepContext(Protocol):
    """What a method sees of one step: the step number, its scalars, and passes over the tensors."""

    @property
    def step(self) -> int:
        """1-based number of the checkpoint being folded in."""

    @property
    def stats(self) -> Mapping[str, float]:
        """The method's scalars after the previous step ({} before the first)."""

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32, or float64 for a float64 model."""

    @property
    def numel(self) -> int:
        """Number of floating-point entries in the whole model."""

    @property
    def learning(self) -> Learning | None:
        """The model and task data, for data-driven methods (None otherwise)."""

    def scan(self, fn: Callable[[TensorSlot], R], desc: str) -> list[R]:
        """A read-only pass over every tensor; returns fn's results (for global reductions)."""
        ...

    def update(self, fn: Callable[[TensorSlot], tuple[torch.Tensor, R]], desc: str) -> list[R]:
        """The final pass: fn returns each tensor's new merged task vector (and a result)."""
        ...


@dataclass(frozen=True)
class FoldResult:
    """What a step leaves: the method's scalars (the global scale, learned coefficients, ...) and,
    for data-driven methods, the examples to keep for the next step and the heads they refit."""

    stats: dict[str, float] = field(default_factory=dict)
    buffer: TaskData | None = None
    heads: Heads = field(default_factory=dict)


class MergeMethod(ABC):
    """A continual merging rule. The constructor only validates and stores parameters."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    summary: ClassVar[str]
    needs_data: ClassVar[bool] = False  # True: each step needs the model and the task's data (`Learning`)
    uses_linear_weights: ClassVar[bool] = False  # True: it treats linear-layer weights apart (TensorSlot.is_linear)
    scale_known_before_step: ClassVar[bool] = True  # False: scale() needs the step's own stats (e.g. a norm)

    def __init__(self, **params: Any):
        fields = list(self.Params.model_fields)
        unknown = sorted(set(params) - set(fields))
        if unknown:
            close = difflib.get_close_matches(unknown[0], fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise FoldinError(
                f"method {self.name!r} has no parameter {unknown[0]!r}; {hint}"
                f"its parameters: {', '.join(fields) or 'none'}."
            )
        self.params = self.Params(**params)

    @abstractmethod
    def fold(self, ctx: StepContext) -> FoldResult:
        """Fold the step's checkpoint into the merged task vector (through `ctx.update`); return
        what the step leaves besides it."""

    def scale(self, stats: Mapping[str, float]) -> float:
        """The global factor applied to the merged task vector to get the merged model."""
        return 1.0

    def data_use(self) -> str:
        """What the method reads besides checkpoints (stated in benchmark reports)."""
        return "none (checkpoint weights only)"


def squared_norm(t: torch.Tensor, chunk: int = 1 << 20) -> float:
    """Sum of squares in float64, so that a model's norm does not lose digits over many tensors
    (FusionBench's float32 norm is 1.2% off on ViT-B/32); in chunks, to need no float64 copy."""
    return sum(float(torch.linalg.vector_norm(c, dtype=torch.float64) ** 2) for c in t.reshape(-1).split(chunk))
