"""Continual weight averaging (the SWA baseline of the OPCM paper):
M_1 = theta_1, M_t = ((t-1) M_{t-1} + theta_t) / t, kept as a task vector M_t - theta_0."""

from __future__ import annotations

from foldin.methods.base import FoldResult, MergeMethod, MethodParams, StepContext
from foldin.methods.registry import register


class AverageParams(MethodParams):
    pass


@register
class Average(MergeMethod):
    name = "average"
    Params = AverageParams
    summary = "Running mean of all checkpoints folded in so far."

    def fold(self, ctx: StepContext) -> FoldResult:
        t = ctx.step
        if t == 1:  # the mean of one task vector (reading no merged task vector: there is none yet)
            ctx.update(lambda s: (s.task_vector, None), desc="averaging")
        else:
            ctx.update(lambda s: (((t - 1) * s.merged + s.task_vector) / t, None), desc="averaging")
        return FoldResult()
