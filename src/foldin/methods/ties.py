"""Continual TIES-merging (Yadav et al., 2023) as the OPCM paper's appendix and FusionBench 0.2.33
(`fusion_bench/method/opcm/ties_merging.py`) define it.

Step 1 adds lambda * tau_1. Step t stacks [merged task vector, tau_t], trims each row to its top
`threshold` percent by magnitude over the whole model, elects a sign per element (sign of the sum;
elements with no sign take the model-wide majority sign), sums the entries that agree with it
(disjoint merge), and adds lambda times that. Whole-model thresholds are found exactly by a
streaming radix selection, so no full-model vector is ever built.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from foldin.methods.base import FoldResult, MergeMethod, MethodParams, StepContext, TensorSlot
from foldin.methods.registry import register
from foldin.methods.selection import kth_smallest_abs


def trim(values: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Keep entries with |value| >= cutoff (ties at the cutoff are kept, as FusionBench does)."""
    return values * (values.abs() >= cutoff)


def elected_signs(rows: torch.Tensor) -> torch.Tensor:
    """Per-element sign of the sum over rows, before zeros are resolved."""
    return torch.sign(rows.sum(dim=0))


def disjoint_merge(rows: torch.Tensor, signs: torch.Tensor, merge_func: str) -> torch.Tensor:
    """Aggregate, per element, only the rows whose sign agrees with the elected sign."""
    selected = rows * torch.where(signs > 0, rows > 0, rows < 0)
    if merge_func == "sum":
        return selected.sum(dim=0)
    if merge_func == "mean":
        return selected.sum(dim=0) / (selected != 0).sum(dim=0).clamp(min=1)
    return selected.abs().max(dim=0).values * signs


def kept_count_rank(numel: int, threshold: float) -> int:
    """The 1-based rank (smallest first) of the cutoff value, as FusionBench's topk_values_mask
    computes it: a threshold above 1 is a percentage, at most 1 a fraction."""
    fraction = threshold / 100 if threshold > 1 else threshold
    return numel - int(numel * fraction)


class TiesParams(MethodParams):
    scaling_factor: float = Field(0.3, description="lambda: weight of each TIES-merged update.")
    threshold: float = Field(
        20,
        gt=0,
        le=100,
        description="Percent of entries (by magnitude) each task vector keeps; a value <= 1 is read as a fraction.",
    )
    merge_func: Literal["sum", "mean", "max"] = Field(
        "sum", description="How the sign-agreeing entries are aggregated."
    )


@register
class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams
    params: TiesParams
    summary = "Trims, sign-elects and disjointly merges the merged and the new task vector."

    def fold(self, ctx: StepContext) -> FoldResult:
        lam, merge_func = self.params.scaling_factor, self.params.merge_func
        if ctx.step == 1:
            ctx.update(lambda s: (lam * s.task_vector, None), desc="adding")
            return FoldResult()

        def merged(s: TensorSlot) -> torch.Tensor:
            return s.merged

        def task(s: TensorSlot) -> torch.Tensor:
            return s.task_vector

        rank = kept_count_rank(ctx.numel, self.params.threshold)
        if rank == 0:  # keep everything (FusionBench's kthvalue(0) would fail here)
            cutoffs = [0.0, 0.0]
        else:
            cutoffs = kth_smallest_abs(ctx, [merged, task], [rank, rank])

        def trimmed_rows(s: TensorSlot) -> torch.Tensor:
            return torch.stack([trim(s.merged, cutoffs[0]), trim(s.task_vector, cutoffs[1])])

        sign_sum = sum(ctx.scan(lambda s: int(elected_signs(trimmed_rows(s)).sum()), desc="electing signs"))
        majority = float(torch.sign(torch.tensor(float(sign_sum))))

        def update(s: TensorSlot) -> tuple[torch.Tensor, None]:
            rows = trimmed_rows(s)
            signs = elected_signs(rows)
            signs[signs == 0] = majority
            return s.merged + lam * disjoint_merge(rows, signs, merge_func), None

        ctx.update(update, desc="merging")
        return FoldResult()
