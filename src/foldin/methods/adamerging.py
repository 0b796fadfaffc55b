"""Task-wise AdaMerging (Yang et al., 2024), continual form: the baseline OTMF compares memory with.

    merged = lambda_pre * tau_pre + lambda_post * tau_post,   lambda in [0, 1]

lambda_pre starts at 1.0 (the merged model as it is) and lambda_post at 0.3, as the continual
AdaMerging baseline of the OTMF research code starts them: starting both at 0.3, as offline
AdaMerging does for independent task vectors, would begin every step by shrinking everything
merged so far to 0.3 times its size. The two coefficients are trained with Adam to minimise the
entropy of the model's predictions (through each task's classification head) on unlabelled inputs
of the previous task (the buffer the state keeps) and of the new task, one batch of each per step;
they are clamped to [0, 1] after every step.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from pydantic import Field

from foldin.data import Learning
from foldin.errors import FoldinError
from foldin.methods.learned import (
    FunctionalModel,
    LearnedMethod,
    LearnedParams,
    LearnResult,
    LinearWeights,
    Tensors,
    previous_task,
    sample_index,
)
from foldin.methods.registry import register


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions: low when the model is confident."""
    return -(F.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


class AdaMergingParams(LearnedParams):
    init_merged: float = Field(
        1.0, ge=0.0, le=1.0, description="Initial lambda_pre, the merged task vector's coefficient."
    )
    init_new: float = Field(0.3, ge=0.0, le=1.0, description="Initial lambda_post, the new task vector's coefficient.")


@register
class AdaMerging(LearnedMethod):
    name = "adamerging"
    Params = AdaMergingParams
    params: AdaMergingParams
    summary = (
        "Learns one coefficient for the merged and one for the new task vector by minimising prediction "
        "entropy on unlabelled inputs (needs task data and heads)."
    )

    def data_use(self) -> str:
        p = self.params
        return (
            f"unlabelled training inputs of the previous task (a buffer of {p.buffer_size}) and of the new task, "
            f"{p.steps} steps of {p.batch_size} each, and the two tasks' frozen heads; no labels"
        )

    def learn(
        self, base: Tensors, tau_pre: Tensors, tau_post: Tensors, learning: Learning, generator: torch.Generator
    ) -> LearnResult:
        p = self.params
        previous = previous_task(learning)
        if previous.head is None or learning.new.head is None:
            raise FoldinError(
                "adamerging scores predictions, so each task's data needs its classification head (TaskData.head)."
            )
        tasks, heads = [previous, learning.new], [previous.head, learning.new.head]
        weights = LinearWeights(FunctionalModel(learning), base)
        taus = (tau_pre, tau_post)
        coeffs = torch.tensor([p.init_merged, p.init_new])
        opt = torch.optim.Adam([coeffs], lr=p.lr)
        for _ in range(p.steps):
            batches = [t.batch(sample_index(t, p.batch_size, generator)) for t in tasks]
            weights.fill(*((float(c), None, tau) for c, tau in zip(coeffs, taus)))
            _, grads = weights.gradient(
                lambda features: cast(
                    torch.Tensor,
                    sum(
                        prediction_entropy(F.linear(features(b), h["weight"], h["bias"]))
                        for h, b in zip(heads, batches)
                    ),
                )
            )
            coeffs.grad = torch.stack(
                [
                    cast(
                        torch.Tensor,
                        sum(torch.dot(g.flatten(), tau[n].flatten()) for n, g in grads.items() if g is not None),
                    )
                    for tau in taus
                ]
            )  # the chain rule: d loss/d lambda = <d loss/d weights, tau>
            opt.step()
            coeffs.clamp_(0.0, 1.0)
        c_pre, c_post = (float(c) for c in coeffs.detach())
        merged = {n: c_pre * tau_pre[n] + c_post * tau_post[n] for n in tau_pre}
        return merged, {"lambda_pre": c_pre, "lambda_post": c_post}, {}
