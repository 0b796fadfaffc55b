"""MagMax (Marczak et al., ECCV 2024), continual form, computed as FusionBench 0.2.33
(`fusion_bench/method/magmax/magmax.py`) does: the merged task vector is the running element-wise
maximum-magnitude task vector, and the merged model is theta_0 + scaling_factor * tau_max.

    tau_max_1 = tau_1;  tau_max_t = where(|tau_t| >= |tau_max_{t-1}|, tau_t, tau_max_{t-1})

A later task wins ties (`>=`), FusionBench's and the official release's rule. The state holds only
the running vector; since the scale is fixed, every step's model can be exported and scored.
"""

from __future__ import annotations

import torch
from pydantic import Field

from foldin.methods.base import FoldResult, MergeMethod, MethodParams, StepContext, TensorSlot
from foldin.methods.registry import register


def max_magnitude(running: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Element-wise, the entry of larger magnitude; `new` wins ties."""
    return torch.where(new.abs() >= running.abs(), new, running)


class MagMaxParams(MethodParams):
    scaling_factor: float = Field(
        0.5, description="Weight of the max-magnitude task vector (FusionBench's default, 0.5)."
    )


@register
class MagMax(MergeMethod):
    name = "magmax"
    Params = MagMaxParams
    params: MagMaxParams
    summary = "Keeps, element by element, the task-vector entry of largest magnitude seen so far; adds it scaled."

    def fold(self, ctx: StepContext) -> FoldResult:
        first = ctx.step == 1

        def update(slot: TensorSlot) -> tuple[torch.Tensor, None]:
            return (slot.task_vector if first else max_magnitude(slot.merged, slot.task_vector)), None

        ctx.update(update, desc="selecting")
        return FoldResult()

    def scale(self, stats) -> float:
        return self.params.scaling_factor
