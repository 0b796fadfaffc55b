"""What data-driven methods (OTMF, AdaMerging) share: the task data they see, a functional forward
pass of the user's model under any candidate weights, batch sampling, and the buffer they keep.

A data-driven method still folds through the same engine as the others (the checkpoint is
validated and hashed, the merged task vector written tensor by tensor, the step committed
atomically); it reads the whole model into memory first because it needs forward passes. Its
memory is bounded by a few copies of the model (base, merged and new task vectors, what it
learns) plus a bounded buffer of examples of the last task, never by the number of tasks.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from foldin.data import Batch, FeatureFn, Learning, TaskData
from foldin.errors import FoldinError
from foldin.methods.base import FoldResult, Heads, MergeMethod, MethodParams, StepContext


class _WithFeatures(nn.Module):
    def __init__(self, module: nn.Module, features: FeatureFn):
        super().__init__()
        self.module = module
        self.features = features

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.features(self.module, batch)


class FunctionalModel:
    """Features of the user's model under given weights, without copying weights into the module
    (torch.func.functional_call), so candidate weights can carry gradients to masks or coefficients."""

    def __init__(self, learning: Learning):
        self._wrapped = _WithFeatures(learning.module, learning.features)
        self._buffers = {name for name, _ in learning.module.named_buffers()}
        learning.module.eval()  # dropout off: the loss compares features, not noisy samples

    def __call__(self, weights: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Features under `weights` (the floating-point tensors; the module keeps its integer buffers).
        Buffers (BatchNorm statistics) are used as given but carry no gradient: they are not learned."""
        params = {f"module.{k}": v.detach() if k in self._buffers else v for k, v in weights.items()}
        return torch.func.functional_call(self._wrapped, params, (batch,), strict=False)


def add_task_vectors(
    base: Mapping[str, torch.Tensor], *terms: tuple[torch.Tensor | float, Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """base + sum of coefficient * task vector, name by name (a coefficient is a scalar or a tensor per name)."""
    out = {}
    for name, b in base.items():
        w = b
        for coeff, tv in terms:
            c = coeff[name] if isinstance(coeff, Mapping) else coeff
            w = w + c * tv[name]
        out[name] = w
    return out


class LinearWeights:
    """One reusable copy of the model's weights, refilled in place as base + sum of scale * mask *
    task vector, for methods whose learned quantities (masks, coefficients) enter the weights
    linearly. The forward and backward passes treat the weights as a leaf; the learned quantities'
    gradients then follow by the chain rule (d loss/d mask = scale * task vector * d loss/d weights).
    This gives autograd's gradients without an autograd graph over every element of the model at
    each step: a third of OTMF's step time and most of its memory went there."""

    def __init__(self, model: FunctionalModel, base: dict[str, torch.Tensor]):
        self.model = model
        self.base = base
        self.weights = {n: torch.empty_like(b) for n, b in base.items()}

    @torch.no_grad()
    def fill(self, *terms: tuple[float, Mapping[str, torch.Tensor] | None, Mapping[str, torch.Tensor]]) -> None:
        """weights = base + sum of scale * mask * task vector (mask None: no mask)."""
        for name, w in self.weights.items():
            w.copy_(self.base[name])
            for scale, mask, tv in terms:
                if mask is None:
                    w.add_(tv[name], alpha=scale)
                else:
                    w.addcmul_(mask[name], tv[name], value=scale)

    @torch.no_grad()
    def features(self, batch: Batch) -> torch.Tensor:
        return self.model(self.weights, batch)

    def gradient(
        self, loss_of: Callable[[Callable[[Batch], torch.Tensor]], torch.Tensor]
    ) -> tuple[float, dict[str, torch.Tensor | None]]:
        """The loss `loss_of(features)` computes from features under the current weights, and its
        gradient with respect to each weight (None where the loss does not depend on it)."""
        leaves = {n: w.requires_grad_() for n, w in self.weights.items()}
        try:
            loss = loss_of(lambda batch: self.model(leaves, batch))
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        finally:
            for w in leaves.values():
                w.requires_grad_(False)
        return loss.item(), dict(zip(leaves, grads))


def sample_index(data: TaskData, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(len(data), (min(batch_size, len(data)),), generator=generator)


def refit_head(
    head: Mapping[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, steps: int, lr: float = 1e-3
) -> dict[str, torch.Tensor]:
    """Continue training a linear head by cross-entropy on features of the merged model (full batch, Adam)."""
    weight = head["weight"].detach().clone().requires_grad_()
    bias = head["bias"].detach().clone().requires_grad_()
    opt = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(F.linear(features, weight, bias), labels).backward()
        opt.step()
    return {"weight": weight.detach(), "bias": bias.detach()}


@torch.no_grad()
def batched_features(
    model: FunctionalModel, weights: Mapping[str, torch.Tensor], data: TaskData, batch_size: int = 64
) -> torch.Tensor:
    index = torch.arange(len(data))
    return torch.cat([model(weights, data.batch(i)) for i in index.split(batch_size)])


class LearnedParams(MethodParams):
    steps: int = Field(100, ge=0, description="Optimisation steps per merge.")
    lr: float = Field(0.01, gt=0, description="Adam learning rate.")
    batch_size: int = Field(16, ge=1, description="Examples per optimisation step.")
    buffer_size: int = Field(512, ge=1, description="Examples of the last task kept in the state for the next step.")
    seed: int = Field(0, description="Seeds batch sampling and the buffer.")


Tensors = dict[str, torch.Tensor]  # by parameter name
LearnResult = tuple[Tensors, dict[str, float], Heads]  # the merged task vector, scalars to record, refit heads


def previous_task(learning: Learning) -> TaskData:
    """The previous task's kept examples, which `learn` always has (LearnedMethod.fold checks)."""
    if learning.previous is None:
        raise RuntimeError("learn() was called without the previous task's examples")
    return learning.previous


class LearnedMethod(MergeMethod):
    """A method that learns how to combine the merged task vector (`previous`) with the new one
    from data. The first step has nothing to combine: the merged task vector is the task vector."""

    needs_data = True
    params: LearnedParams

    @abstractmethod
    def learn(
        self, base: Tensors, tau_pre: Tensors, tau_post: Tensors, learning: Learning, generator: torch.Generator
    ) -> LearnResult:
        """Return the next merged task vector, a few scalars worth recording (e.g. coefficients) and
        the heads it refit (by task name; empty if none)."""

    def fold(self, ctx: StepContext) -> FoldResult:
        learning = ctx.learning
        assert learning is not None  # fold_step refuses a data-driven step without data
        rows = ctx.scan(lambda s: (s.name, s.base, s.merged, s.task_vector), desc="reading")
        base = {n: b for n, b, _, _ in rows}
        tau_pre = {n: m for n, _, m, _ in rows}
        tau_post = {n: t for n, _, _, t in rows}
        del rows
        generator = torch.Generator().manual_seed(self.params.seed + ctx.step)
        stats: dict[str, float] = {}
        heads: Heads = {}
        if ctx.step == 1:
            merged = tau_post
        elif learning.previous is None:
            raise FoldinError(
                f"{self.name} needs examples of the previous task, and none were kept (was step {ctx.step - 1} "
                f"made by another method?)."
            )
        else:
            merged, stats, heads = self.learn(base, tau_pre, tau_post, learning, generator)
        buffer = learning.new.subset(self.params.buffer_size, generator)
        ctx.update(lambda s: (merged[s.name].detach(), None), desc="writing")
        return FoldResult(stats, buffer, heads)
