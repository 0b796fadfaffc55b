"""Continual task arithmetic (Ilharco et al., 2022): M_0 = theta_0, M_t = M_{t-1} + lambda tau_t."""

from __future__ import annotations

from pydantic import Field

from foldin.methods.base import FoldResult, MergeMethod, MethodParams, StepContext
from foldin.methods.registry import register


class TaskArithmeticParams(MethodParams):
    scaling_factor: float = Field(0.3, description="lambda: weight of each new task vector.")


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    Params = TaskArithmeticParams
    params: TaskArithmeticParams
    summary = "Adds each new task vector, scaled by a fixed factor."

    def fold(self, ctx: StepContext) -> FoldResult:
        lam = self.params.scaling_factor
        if ctx.step == 1:  # nothing merged yet: no zeros to read and add
            ctx.update(lambda s: (lam * s.task_vector, None), desc="adding")
        else:
            ctx.update(lambda s: (s.merged + lam * s.task_vector, None), desc="adding")
        return FoldResult()
