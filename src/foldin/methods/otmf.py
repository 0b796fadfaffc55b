"""OTMF: optimal-transport masked fusion (Pan et al., 2025, arXiv 2511.19561), continual form.

    theta(M) = theta_0 + alpha * (M_pre * tau_pre) + (1 - alpha) * (M_post * tau_post)

tau_pre is the merged task vector so far, tau_post the new one; the element-wise masks start at
ones and are the only thing trained (Adam). Steps alternate: even steps draw a batch of the previous
task's inputs (the buffer the state keeps) and move M_pre towards the previous merged model's
features; odd steps draw a batch of the new task's inputs and move M_post towards the fine-tuned
model's features. The loss is the Sinkhorn divergence between the two feature clouds (geomloss,
p = 2, blur 0.05). The masks of the best (pre, post) pair of steps, by summed loss, are kept.
Optionally the previous task's head is refit afterwards on a labelled fraction of its examples.
"""

from __future__ import annotations

import torch
from pydantic import Field

from foldin.methods import register
from foldin.methods.learned import (FunctionalModel, LearnedMethod, LearnedParams, Learning, LinearWeights,
                                    add_task_vectors, batched_features, refit_head, sample_index)


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, p: int = 2, blur: float = 0.05, scaling: float = 0.5) -> torch.Tensor:
    """Debiased Sinkhorn divergence between two point clouds with uniform weights, as geomloss
    computes it (cost |x - y|^p / p, entropic regularisation blur^p, epsilon annealed by `scaling`
    per iteration: 0.5 is geomloss's default and the research code's), on the tensorized backend:
    plain PyTorch, no KeOps compilation, fine for the batch sizes used here."""
    from geomloss import SamplesLoss

    return SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling, backend="tensorized")(x, y)


def masked_fusion(tau_pre: dict[str, torch.Tensor], tau_post: dict[str, torch.Tensor], m_pre: dict[str, torch.Tensor],
                  m_post: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """alpha * M_pre * tau_pre + (1 - alpha) * M_post * tau_post, name by name."""
    return {n: alpha * m_pre[n] * tau_pre[n] + (1 - alpha) * m_post[n] * tau_post[n] for n in tau_pre}


class OTMFParams(LearnedParams):
    alpha: float = Field(0.8, ge=0.0, le=1.0, description="Weight of the merged task vector (1 - alpha: the new one).")
    blur: float = Field(0.05, gt=0, description="Sinkhorn blur (entropic regularisation blur^p).")
    p: int = Field(2, ge=1, le=2, description="Exponent of the transport cost.")
    masks: bool = Field(True, description="Learn the masks; false: plain alpha interpolation (the ablation).")
    head_refit: bool = Field(False, description="Refit the previous task's head on the merged model's features.")
    head_refit_fraction: float = Field(0.25, gt=0, le=1, description="Fraction of the previous task's labelled examples used to refit.")
    head_refit_steps: int = Field(100, ge=1, description="Adam steps of the head refit.")


@register
class OTMF(LearnedMethod):
    name = "otmf"
    Params = OTMFParams
    summary = "Learns element-wise masks on the merged and the new task vector by a Sinkhorn loss against both teachers' features (needs task data)."

    def data_use(self) -> str:
        p = self.params
        refit = (f"labels of {p.head_refit_fraction:.0%} of the previous task's training examples (at most the buffer) to refit its head"
                 if p.head_refit else "no labels")
        inputs = (f"unlabelled training inputs of the previous task (a buffer of {p.buffer_size}) and of the new task, "
                  f"{p.steps} batches of {p.batch_size}" if p.masks else "none for the fusion itself")
        return f"{inputs}; {refit}"

    def learn(self, base, tau_pre, tau_post, learning: Learning, generator: torch.Generator):
        p = self.params
        stats: dict[str, float] = {}
        if not p.masks:
            ones = {n: torch.ones_like(t) for n, t in tau_pre.items()}
            fused = masked_fusion(tau_pre, tau_post, ones, ones, p.alpha)
        else:
            fused, loss = self._train_masks(base, tau_pre, tau_post, learning, generator)
            if loss < float("inf"):
                stats["sinkhorn_loss"] = loss
        if p.head_refit:
            self._refit_previous_head(base, fused, learning, generator)
        return fused, stats

    def _train_masks(self, base, tau_pre, tau_post, learning: Learning, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
        """The fused task vector with the best masks, and their (pre + post) loss."""
        p = self.params
        weights = LinearWeights(FunctionalModel(learning), base)
        tau = {"pre": tau_pre, "post": tau_post}
        scale = {"pre": p.alpha, "post": 1 - p.alpha}
        masks = {side: {n: torch.ones_like(t) for n, t in tau_pre.items()} for side in tau}
        optimizers = {side: torch.optim.Adam(list(m.values()), lr=p.lr, fused=True) for side, m in masks.items()}
        data = {"pre": learning.previous, "post": learning.new}
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
            if side == "post":  # a (pre, post) pair is complete: keep the best fusion so far
                if pair_loss < best_loss:
                    best_loss = pair_loss
                    best = masked_fusion(tau_pre, tau_post, masks["pre"], masks["post"], p.alpha)
                pair_loss = 0.0
        return best or masked_fusion(tau_pre, tau_post, masks["pre"], masks["post"], p.alpha), best_loss

    def _refit_previous_head(self, base, fused, learning: Learning, generator: torch.Generator) -> None:
        previous = learning.previous
        if previous is None or previous.labels is None or previous.head is None:
            return  # nothing labelled to refit with
        wanted = round(self.params.head_refit_fraction * (previous.total or len(previous)))  # a fraction of the task's examples
        draws = torch.Generator().set_state(generator.get_state())  # a copy: refitting leaves the merged weights as they would be without it
        labelled = previous.subset(max(1, wanted), draws)  # as many as the buffer holds
        features = batched_features(FunctionalModel(learning), add_task_vectors(base, (1.0, fused)), labelled)
        learning.heads[previous.name] = refit_head(previous.head, features, labelled.labels, self.params.head_refit_steps)
