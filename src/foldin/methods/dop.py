"""DOP: dual orthogonal projections (continual model merging without data, NeurIPS 2025), computed
as FusionBench 0.2.33 (`fusion_bench/method/dop/dop_general.py`, config `method/dop/dop.yaml`) does.

Step 1 keeps the first model. At step t, for each linear-layer weight, with W_0 the base, W_pre
the merged model so far and W_post the new checkpoint, each task vector W_i - W_0 is decomposed
(U_i, s_i, V_i, truncated to the first rank at which the cumulative share of singular values
reaches `svd_epsilon`) and the merged weight W minimises, from the average of W_pre and W_post,

    L_i(W) = || diag(s_i) U_i^T (W - W_i) ||_F^2 + || (W - W_i) V_i diag(s_i) ||_F^2

by `num_steps` Adam steps on c_pre L_pre + c_post L_post. With `mgda`, (c_pre, c_post) are each
step's min-norm combination of the two loss-normalised gradients (MGDA), smoothed by an EMA that
starts at (alpha, 1 - alpha); without, they are (alpha, 1 - alpha). Every other parameter (biases,
norms, embeddings) is the average of the merged model and the new one.

The gradients are computed in closed form, 2 U_i s_i^2 U_i^T D + 2 D V_i s_i^2 V_i^T with D = W - W_i,
rather than by autograd (which needs a third backward pass for the weighted loss), each through
the cheaper of two equal products (see ProjectedLoss). `solver="exact"` replaces the Adam steps by
the exact minimiser of alpha L_pre + (1 - alpha) L_post: the losses are quadratic in W, so it
solves the Sylvester equation A W + W B = C, A = sum_i c_i U_i s_i^2 U_i^T, B = sum_i c_i V_i s_i^2
V_i^T, C = sum_i c_i (A_i W_i + W_i B_i), from the eigenbases of A and B (directions neither loss
constrains keep the average). It ignores lr, num_steps, mgda and ema.

FusionBench leaves parameters owned by non-leaf modules (CLIP's class_embedding) at the base after
step 1 and yields NaN for a layer whose two task vectors are equal; here they are averaged like
every other parameter, and such a layer keeps the average.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from foldin.methods.base import FoldResult, MergeMethod, MethodParams, StepContext, TensorSlot
from foldin.methods.registry import register

ProjSpace = Literal["uv", "u", "v"]


def principal_basis(task_vector: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, V) of the task vector, truncated as FusionBench truncates: the first index at which
    the cumulative share of singular values reaches epsilon (searchsorted, left)."""
    u, s, vh = torch.linalg.svd(task_vector, full_matrices=False)
    rank = int(torch.searchsorted(s.cumsum(dim=0) / s.sum(), min(epsilon, 1.0)).item())
    return u[:, :rank], s[:rank], vh[:rank].T


class ProjectedLoss:
    """L_i(W) and its gradient for one side (the merged model so far, or the new checkpoint).

    Each half of the loss is computed through whichever of two equal products is cheaper: the r
    singular vectors kept (P = diag(s) U^T D, then U diag(s) P: 2 r m n multiply-adds), or the
    m x m matrix A = U diag(s^2) U^T (A D: m^2 n), likewise for V with n x n. With r near min(m, n),
    the second is about half the cost on the short side of a rectangular matrix and on both sides
    of a square one."""

    def __init__(self, target: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, space: ProjSpace):
        self.target = target
        self.space = space
        m, n = target.shape
        r = len(s)
        self.us, self.vs = u * s, v * s  # U diag(s), V diag(s)
        self.a = self.us @ self.us.T if space != "v" and m < 2 * r else None  # U diag(s^2) U^T
        self.b = self.vs @ self.vs.T if space != "u" and n < 2 * r else None  # V diag(s^2) V^T

    def value_and_gradient(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = w - self.target
        loss = torch.zeros((), dtype=w.dtype, device=w.device)
        grad = torch.zeros_like(w)
        if self.space in ("uv", "u"):
            if self.a is not None:
                ad = self.a @ delta
                loss = loss + (delta * ad).sum()
                grad.add_(ad, alpha=2)
            else:
                p = self.us.T @ delta
                loss = loss + p.square().sum()
                grad.addmm_(self.us, p, alpha=2)
        if self.space in ("uv", "v"):
            if self.b is not None:
                db = delta @ self.b
                loss = loss + (delta * db).sum()
                grad.add_(db, alpha=2)
            else:
                q = delta @ self.vs
                loss = loss + q.square().sum()
                grad.addmm_(q, self.vs.T, alpha=2)
        return loss, grad


def min_norm_weights(g_pre: torch.Tensor, g_post: torch.Tensor) -> tuple[float, float]:
    """MGDA's min-norm convex combination of two gradients (Sener and Koltun, 2018), with the
    clamping of their solver (0.999 / 0.001 at the ends), in float32 as FusionBench computes it."""
    v11, v12, v22 = (g_pre * g_pre).sum(), (g_pre * g_post).sum(), (g_post * g_post).sum()
    if v12 >= v11:
        return 0.999, 1 - 0.999
    if v12 >= v22:
        return 0.001, 1 - 0.001
    gamma = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
    return float(gamma), float(1 - gamma)


def adam_merge(start: torch.Tensor, losses: list[ProjectedLoss], p: DOPParams) -> tuple[torch.Tensor, float]:
    """`num_steps` Adam steps from `start`; returns the merged weight and the final weight of L_pre."""
    w = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([w], lr=p.lr)
    ema = [p.alpha, 1 - p.alpha]
    weights = ema
    for _ in range(p.num_steps):
        with torch.no_grad():
            (l0, g0), (l1, g1) = (loss.value_and_gradient(w) for loss in losses)
            if p.mgda:
                if l0 > 0 and l1 > 0:  # a zero loss has nothing to balance (FusionBench would divide by it)
                    weights = list(min_norm_weights(g0 / float(l0), g1 / float(l1)))
                if p.ema:
                    ema = [p.ema_beta * e + (1 - p.ema_beta) * c for e, c in zip(ema, weights)]
                    weights = ema
            w.grad = g0.mul_(weights[0]).add_(g1, alpha=weights[1])
        optimizer.step()
    return w.detach(), weights[0]


def exact_merge(start: torch.Tensor, losses: list[ProjectedLoss], weights: tuple[float, float]) -> torch.Tensor:
    """The minimiser of sum_i c_i L_i (a Sylvester equation), in float64; unconstrained directions keep `start`."""
    m, n = start.shape
    a = torch.zeros(m, m, dtype=torch.float64, device=start.device)
    b = torch.zeros(n, n, dtype=torch.float64, device=start.device)
    c = torch.zeros(m, n, dtype=torch.float64, device=start.device)
    for weight, loss in zip(weights, losses):
        us, vs = loss.us.double(), loss.vs.double()
        target = loss.target.double()
        if loss.space in ("uv", "u"):
            a_i = us @ us.T
            a += weight * a_i
            c += weight * (a_i @ target)
        if loss.space in ("uv", "v"):
            b_i = vs @ vs.T
            b += weight * b_i
            c += weight * (target @ b_i)
    lam, p = torch.linalg.eigh(a)
    mu, q = torch.linalg.eigh(b)
    denominator = lam[:, None] + mu[None, :]
    free = denominator <= 1e-12 * denominator.max().clamp(min=1e-300)
    solved = (p.T @ c @ q) / torch.where(free, 1.0, denominator)
    solved = torch.where(free, p.T @ start.double() @ q, solved)
    return (p @ solved @ q.T).to(start.dtype)


class DOPParams(MethodParams):
    lr: float = Field(1e-4, gt=0, description="Adam learning rate.")
    num_steps: int = Field(200, ge=0, description="Adam steps per linear layer and merge.")
    mgda: bool = Field(True, description="Balance the two losses by MGDA's min-norm weights (else alpha, 1 - alpha).")
    ema: bool = Field(
        True, description="With mgda: smooth the weights by an exponential moving average starting at alpha."
    )
    ema_beta: float = Field(0.999, ge=0, le=1, description="Decay of that moving average.")
    alpha: float = Field(0.8, ge=0, le=1, description="Weight of the merged model's loss (the EMA's start with mgda).")
    svd_epsilon: float = Field(
        0.99999, ge=0, le=1, description="Share of singular-value mass each task vector's basis keeps."
    )
    svd_proj_space: ProjSpace = Field(
        "uv", description="Project on the left (u), right (v) or both (uv) singular bases."
    )
    solver: Literal["adam", "exact"] = Field(
        "adam",
        description=(
            "adam: FusionBench's optimisation; exact: the closed-form minimiser of alpha L_pre + (1 - alpha) L_post."
        ),
    )


@register
class DOP(MergeMethod):
    name = "dop"
    Params = DOPParams
    params: DOPParams
    uses_linear_weights = True
    summary = (
        "Per linear layer, finds the weight closest to both the merged and the new model in each one's principal "
        "singular subspaces (dual projections); averages the other parameters."
    )

    def fold(self, ctx: StepContext) -> FoldResult:
        p = self.params
        if ctx.step == 1:
            ctx.update(lambda s: (s.task_vector, None), desc="keeping the first model")
            return FoldResult()

        def update(slot: TensorSlot) -> tuple[torch.Tensor, float | None]:
            base = slot.base
            previous, new = base + slot.merged, slot.new
            average = (previous + new) / 2
            if not slot.is_linear:
                return average - base, None
            targets = (previous.flatten(1), new.flatten(1))
            losses = [
                ProjectedLoss(t, *principal_basis(t - base.flatten(1), p.svd_epsilon), p.svd_proj_space)
                for t in targets
            ]
            if p.solver == "exact":
                merged, weight = exact_merge(average.flatten(1), losses, (p.alpha, 1 - p.alpha)), p.alpha
            else:
                merged, weight = adam_merge(average.flatten(1), losses, p)
            return merged.view_as(base) - base, weight

        weights = [w for w in ctx.update(update, desc="optimising") if w is not None]
        return FoldResult({"weight_pre_mean": sum(weights) / len(weights)} if weights else {})
