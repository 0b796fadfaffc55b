"""OPCM: orthogonal projection-based continual merging (Tang et al., 2025), computed exactly as
FusionBench 0.2.33 (`fusion_bench/method/opcm/opcm_general.py`) does.

For a linear-layer weight, the new task vector T is written in the singular bases (U, V) of the
merged task vector D; its top-left r x r block and its whole diagonal are removed, where r is the
first index at which cumsum(s)/sum(s) exceeds alpha. Other parameters are added as they are. One
global scale then keeps the merged task vector's norm at the mean norm of the task vectors seen.

Only the first min(m, n) singular pairs carry the removed coefficients, so a thin SVD gives the
same result as FusionBench's full_matrices SVD: T - U_k Z V_k^T, with Z the removed coefficients.

When D is rank-deficient (a sum of LoRA updates), FusionBench still removes u_i^T T v_i for the
pairs with zero singular value, whose vectors are an arbitrary basis of D's null space: the result
then depends on rounding (a 1e-12 change of D moves it by 5%). `diagonal="nonzero"` removes the
diagonal only over pairs with a nonzero singular value: the same as FusionBench for full-rank D,
well-defined for low-rank D, and computable from a thin decomposition of D's rank.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from foldin.methods.base import FoldResult, MergeMethod, MethodParams, StepContext, TensorSlot, squared_norm
from foldin.methods.registry import register
from foldin.methods.singular import nonzero_singular_triplets, thin_svd


def split_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """First index where the cumulative share of singular values exceeds alpha (0 if none does)."""
    # the last share is exactly 1 in exact arithmetic; rounding must not make alpha = 1 select r > 0
    share = (singular_values.cumsum(dim=0) / singular_values.sum()).clamp(max=1.0)
    return int((share > alpha).float().argmax().item())


Diagonal = Literal["all", "nonzero"]


def project_task_vector(
    merged: torch.Tensor, task: torch.Tensor, alpha: float, diagonal: Diagonal = "all"
) -> torch.Tensor:
    """Remove from `task` the coefficients OPCM assigns to `merged`'s dominant singular subspace:
    the top-left r x r block and the diagonal coefficients u_i^T task v_i (of every pair, or of
    the pairs with a nonzero singular value)."""
    if not merged.any():
        return task  # no subspace to protect; FusionBench would use an arbitrary basis here
    triplets = thin_svd(merged) if diagonal == "all" else nonzero_singular_triplets(merged)
    return remove_protected_coefficients(*triplets, task, alpha)


def remove_protected_coefficients(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, task: torch.Tensor, alpha: float
) -> torch.Tensor:
    """task - sum_i (u_i^T task v_i) u_i v_i^T - U_r (off-diagonal of U_r^T task V_r) V_r^T, from
    the merged task vector's singular triplets (u, s, vh)."""
    r = split_rank(s, alpha)
    coeffs = u.T @ task  # (k, n): rows are u_i^T task
    diagonal_coeffs = torch.bmm(coeffs.unsqueeze(1), vh.unsqueeze(2)).reshape(
        -1
    )  # u_i^T task v_i, no (k, n) temporary
    block = coeffs[:r] @ vh[:r].T  # U_r^T task V_r
    del coeffs
    block.diagonal().zero_()  # the diagonal is removed below, once
    projected = torch.addmm(task, u * diagonal_coeffs, vh, alpha=-1)
    return projected.addmm_(u[:, :r] @ block, vh[:r], alpha=-1)


class OPCMParams(MethodParams):
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of the singular-value mass that defines the protected subspace."
    )
    diagonal: Diagonal = Field(
        "all",
        description=(
            "Singular pairs of the merged task vector whose diagonal coefficient is removed: 'all' (FusionBench; "
            "arbitrary when the merged task vector is rank-deficient, as sums of LoRA updates are) or 'nonzero' "
            "(above 1e-5 x the largest: well-defined for LoRA, and a low-rank merged task vector is decomposed "
            "at the cost of its rank)."
        ),
    )


@register
class OPCM(MergeMethod):
    name = "opcm"
    Params = OPCMParams
    params: OPCMParams
    uses_linear_weights = True
    scale_known_before_step = False  # the global rescale needs the new merged task vector's norm
    summary = (
        "Projects each task vector away from the merged one's dominant singular subspace (linear layers), "
        "then rescales to the mean task-vector norm."
    )

    def fold(self, ctx: StepContext) -> FoldResult:
        alpha, diagonal, first = self.params.alpha, self.params.diagonal, ctx.step == 1

        def update(slot: TensorSlot) -> tuple[torch.Tensor, tuple[float, float]]:
            tau = slot.task_vector
            if first:
                merged = tau
            elif slot.is_linear:  # a convolution kernel selected by pattern is read as (out, in * kh * kw)
                merged = (
                    project_task_vector(slot.merged.flatten(1), tau.flatten(1), alpha, diagonal)
                    .view_as(tau)
                    .add_(slot.merged)
                )
            else:
                merged = slot.merged + tau
            return merged, (squared_norm(tau), squared_norm(merged))

        parts = ctx.update(update, desc="projecting")
        norm_sum = ctx.stats.get("task_vector_norm_sum", 0.0) + math.sqrt(sum(p[0] for p in parts))
        merged_norm = math.sqrt(sum(p[1] for p in parts))
        mean_norm = norm_sum / ctx.step
        return FoldResult(
            {
                "task_vector_norm_sum": norm_sum,
                "merged_norm": merged_norm,
                "scale": mean_norm / merged_norm if merged_norm > 0 else 1.0,
            }
        )

    def scale(self, stats) -> float:
        return stats["scale"]
