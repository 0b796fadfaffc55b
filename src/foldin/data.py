"""The data a data-driven merge method sees: examples of a task, and the model that reads them.
A neutral module: the methods, the engine, the state and the evaluation suites all speak it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from foldin.errors import FoldinError

Batch = dict[str, torch.Tensor]
FeatureFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class TaskData:
    """Training examples of one task: `inputs` holds N examples along dim 0 of every tensor
    (e.g. input_ids and attention_mask, or images); `labels` and `head` (the task's linear
    classifier, {"weight", "bias"}) are needed only where a method uses them."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    head: dict[str, torch.Tensor] | None = None
    name: str = "task"
    total: int | None = None  # examples of the task this data was drawn from (None: all of them are here)

    def __post_init__(self) -> None:
        sizes = {len(t) for t in self.inputs.values()} | ({len(self.labels)} if self.labels is not None else set())
        if not self.inputs or len(sizes) != 1 or 0 in sizes:
            raise FoldinError(
                f"task data {self.name!r}: inputs (and labels) must be non-empty and hold the same number of examples."
            )

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batch(self, index: torch.Tensor) -> Batch:
        return {k: v[index] for k, v in self.inputs.items()}

    def subset(self, n: int, generator: torch.Generator) -> TaskData:
        """At most n examples, drawn without replacement: the bounded buffer kept for the next step."""
        index = torch.randperm(len(self), generator=generator)[:n]
        labels = self.labels[index] if self.labels is not None else None
        return TaskData(
            {k: v[index].clone() for k, v in self.inputs.items()},
            labels,
            self.head,
            self.name,
            self.total or len(self),
        )


@dataclass(frozen=True)
class Learning:
    """What a data-driven step sees besides tensors: the model, its feature function, the new
    task's data and the buffer kept from the last task. What it leaves for the next step comes back
    in the method's `FoldResult`, never through this object."""

    module: nn.Module  # the architecture; its state_dict names are the checkpoint's
    features: FeatureFn  # features(module, batch) -> (batch, d)
    new: TaskData  # the incoming task's training data
    previous: TaskData | None = None  # the buffer kept from the last task folded in
