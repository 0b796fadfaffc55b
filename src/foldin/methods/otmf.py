"""OTMF: optimal-transport masked fusion (Pan et al., 2025, arXiv 2511.19561), continual form.

    theta(M) = theta_0 + alpha * (M_pre * tau_pre) + (1 - alpha) * (M_post * tau_post)

tau_pre is the merged task vector so far, tau_post the new one; the element-wise masks start at
ones and are the only thing trained (Adam). Steps alternate: even steps draw a batch of the previous
task's inputs (the buffer the state keeps) and move M_pre towards the previous merged model's
features; odd steps draw a batch of the new task's inputs and move M_post towards the fine-tuned
model's features. The loss is the Sinkhorn divergence between the two feature clouds (geomloss,
p = 2, blur 0.05). The masks of the best (pre, post) pair of steps, by summed loss, are kept; the
step records what they are (mean, 5th and 95th percentile of each mask) and how far they move the
fusion from plain interpolation (norm of the masked fusion / norm of alpha tau_pre + (1 - alpha)
tau_post). Optionally the heads of the previous and of the new task are refit afterwards on the
merged model's features of a labelled fraction of their training examples, as the research code
refits the previous task's head at each step and the final task's at the end.
"""

from __future__ import annotations

import torch
from pydantic import Field

from foldin.data import Learning, TaskData
from foldin.methods.base import squared_norm
from foldin.methods.learned import (
    FunctionalModel,
    LearnedMethod,
    LearnedParams,
    LearnResult,
    LinearWeights,
    Tensors,
    add_task_vectors,
    batched_features,
    previous_task,
    refit_head,
    sample_index,
)
from foldin.methods.registry import register

Masks = dict[str, torch.Tensor]


def sinkhorn_divergence(
    x: torch.Tensor, y: torch.Tensor, p: int = 2, blur: float = 0.05, scaling: float = 0.5
) -> torch.Tensor:
    """Debiased Sinkhorn divergence between two point clouds with uniform weights, as geomloss
    computes it (cost |x - y|^p / p, entropic regularisation blur^p, epsilon annealed by `scaling`
    per iteration: 0.5 is geomloss's default and the research code's), on the tensorized backend:
    plain PyTorch, no KeOps compilation, fine for the batch sizes used here."""
    from geomloss import SamplesLoss

    return SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling, backend="tensorized")(x, y)


def masked_fusion(
    tau_pre: dict[str, torch.Tensor],
    tau_post: dict[str, torch.Tensor],
    m_pre: Masks | None,
    m_post: Masks | None,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """alpha * M_pre * tau_pre + (1 - alpha) * M_post * tau_post, name by name (None: masks of ones)."""

    def side(tau: dict[str, torch.Tensor], masks: Masks | None, name: str, scale: float) -> torch.Tensor:
        return scale * tau[name] if masks is None else scale * masks[name] * tau[name]

    return {n: side(tau_pre, m_pre, n, alpha) + side(tau_post, m_post, n, 1 - alpha) for n in tau_pre}


def mask_statistics(masks: Masks, prefix: str) -> dict[str, float]:
    """Mean and 5th / 95th percentile of every element of a mask (exact order statistics)."""
    flat = torch.cat([m.reshape(-1) for m in masks.values()])
    k = lambda q: max(1, min(len(flat), round(q * len(flat))))  # noqa: E731
    return {
        f"{prefix}_mean": float(flat.double().mean()),
        f"{prefix}_p5": float(flat.kthvalue(k(0.05)).values),
        f"{prefix}_p95": float(flat.kthvalue(k(0.95)).values),
    }


class OTMFParams(LearnedParams):
    alpha: float = Field(0.8, ge=0.0, le=1.0, description="Weight of the merged task vector (1 - alpha: the new one).")
    blur: float = Field(0.05, gt=0, description="Sinkhorn blur (entropic regularisation blur^p).")
    p: int = Field(2, ge=1, le=2, description="Exponent of the transport cost.")
    masks: bool = Field(True, description="Learn the masks; false: plain alpha interpolation (the ablation).")
    head_refit: bool = Field(
        False, description="Refit the previous and the new task's heads on the merged model's features."
    )
    head_refit_fraction: float = Field(
        0.25, gt=0, le=1, description="Fraction of each refit task's labelled examples used."
    )
    head_refit_steps: int = Field(100, ge=1, description="Adam steps of the head refit.")


@register
class OTMF(LearnedMethod):
    name = "otmf"
    Params = OTMFParams
    params: OTMFParams
    summary = (
        "Learns element-wise masks on the merged and the new task vector by a Sinkhorn loss against both "
        "teachers' features (needs task data)."
    )

    def data_use(self) -> str:
        p = self.params
        refit = (
            f"labels of {p.head_refit_fraction:.0%} of the previous task's (at most the buffer) and of the new task's "
            "training examples to refit their heads"
            if p.head_refit
            else "no labels"
        )
        inputs = (
            f"unlabelled training inputs of the previous task (a buffer of {p.buffer_size}) and of the new task, "
            f"{p.steps} batches of {p.batch_size}"
            if p.masks
            else "none for the fusion itself"
        )
        return f"{inputs}; {refit}"

    def learn(
        self, base: Tensors, tau_pre: Tensors, tau_post: Tensors, learning: Learning, generator: torch.Generator
    ) -> LearnResult:
        p = self.params
        stats: dict[str, float] = {}
        if not p.masks:
            fused = masked_fusion(tau_pre, tau_post, None, None, p.alpha)
        else:
            masks, loss = self._train_masks(base, tau_pre, tau_post, learning, generator)
            fused = masked_fusion(tau_pre, tau_post, masks["pre"], masks["post"], p.alpha)
            plain = masked_fusion(tau_pre, tau_post, None, None, p.alpha)
            norm = lambda tensors: sum(squared_norm(t) for t in tensors.values()) ** 0.5  # noqa: E731
            stats = {
                **mask_statistics(masks["pre"], "mask_pre"),
                **mask_statistics(masks["post"], "mask_post"),
                "norm_ratio": norm(fused) / max(norm(plain), 1e-30),
            }
            if loss < float("inf"):
                stats["sinkhorn_loss"] = loss
        heads = {}
        if p.head_refit:
            for task in (learning.previous, learning.new):
                if (
                    task is not None and task.labels is not None and task.head is not None
                ):  # else nothing to refit with
                    heads[task.name] = self._refit_head(task, base, fused, learning, generator)
        return fused, stats, heads

    def _train_masks(
        self, base: Tensors, tau_pre: Tensors, tau_post: Tensors, learning: Learning, generator: torch.Generator
    ) -> tuple[dict[str, Masks], float]:
        """The best masks (by the summed loss of a pre and a post step) and that loss."""
        p = self.params
        weights = LinearWeights(FunctionalModel(learning), base)
        tau = {"pre": tau_pre, "post": tau_post}
        scale = {"pre": p.alpha, "post": 1 - p.alpha}
        masks = {side: {n: torch.ones_like(t) for n, t in tau_pre.items()} for side in tau}
        optimizers = {side: torch.optim.Adam(list(m.values()), lr=p.lr, fused=True) for side, m in masks.items()}
        data = {"pre": previous_task(learning), "post": learning.new}
        best, best_loss, pair_loss = None, float("inf"), 0.0
        for step in range(p.steps):
            side = "pre" if step % 2 == 0 else "post"
            batch = data[side].batch(sample_index(data[side], p.batch_size, generator))
            weights.fill((1.0, None, tau[side]))  # the teacher: the previous merged model, or the fine-tuned one
            target = weights.features(batch)
            weights.fill(*((scale[s], masks[s], tau[s]) for s in tau))
            loss, grads = weights.gradient(lambda features: sinkhorn_divergence(features(batch), target, p.p, p.blur))
            for name, mask in masks[side].items():  # only this side's masks move
                g = grads[name]
                mask.grad = None if g is None else g.mul_(tau[side][name]).mul_(scale[side])
            optimizers[side].step()
            pair_loss += loss
            if side == "post":  # a (pre, post) pair is complete: keep the best masks so far
                if pair_loss < best_loss:
                    best_loss = pair_loss
                    best = {s: {n: m.detach().clone() for n, m in masks[s].items()} for s in masks}
                pair_loss = 0.0
        return best or masks, best_loss

    def _refit_head(
        self, task: TaskData, base: Tensors, fused: Tensors, learning: Learning, generator: torch.Generator
    ) -> Tensors:
        """`task`'s head refit on the merged model's features of a labelled fraction of its examples."""
        wanted = round(
            self.params.head_refit_fraction * (task.total or len(task))
        )  # a fraction of the task's examples
        draws = torch.Generator().set_state(
            generator.get_state()
        )  # a copy: refitting leaves the merged weights as they would be without it
        labelled = task.subset(max(1, wanted), draws)  # as many as the buffer holds
        if task.head is None or labelled.labels is None:
            raise RuntimeError("a head is refit only for a task with labels and a head (OTMF.learn checks)")
        features = batched_features(FunctionalModel(learning), add_task_vectors(base, (1.0, fused)), labelled)
        return refit_head(task.head, features, labelled.labels, self.params.head_refit_steps)
