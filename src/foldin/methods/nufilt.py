"""NUFILT: null-space filtering for data-free continual model merging (ICLR 2026, arXiv 2509.21413),
computed as the authors' FusionBench fork does (`zihuanqiu/NUFILT`: `fusion_bench/method/nufilt/
nufilt.py`, `fusion_bench/models/filter_lora.py`, config `config/method/nufilt/nufilt.yaml`).

For each selected linear layer (a weight whose module name contains one of `layers`), with T the
new task vector and M the merged task vector so far:
- V_M: M's top `null_r` right singular vectors; P = I - V_M V_M^T filters T's input side away
  from the directions the merged model already uses (`null_space=False`: P = I);
- V_T: T's top `grad_r` right singular vectors;
- a LoRA pair A (lora_r x d, normal with std 0.02) and B (d x lora_r, zeros) is fitted by `max_steps`
  Adam steps (`lr`) on a loss in weight space only,
      || (M + T P + T B A - T) V_T ||_F^2 + || (M + T P + T B A - M) V_M ||_F^2,
  that is: keep the new task's action on its own top directions, and do not disturb the merged
  model's action on its top directions;
- the merged task vector becomes M + T (P + B A).
No global rescale. Every other tensor (the layers not selected, biases, norms, embeddings) keeps
its pretrained value, as in the reference, which changes only the selected layers' weights.

The layers share nothing in the loss (it is a sum of per-layer terms, and Adam is per-parameter),
so optimising them one at a time, as foldin streams tensors, gives what the reference's joint
optimiser gives. A step holds one layer's T, M, A, B and Adam moments at a time.

Choices:
- A is drawn from a generator seeded by (`seed`, step, tensor name), so a layer's result does not
  depend on which other layers exist or the order they stream in; the reference draws it from the
  global torch stream. The parity harness makes the reference draw the same A.
- At the first checkpoint M is zero. The reference still filters T with the "top singular vectors"
  of the zero matrix, which LAPACK returns as the first `null_r` coordinate axes: the first null_r
  input columns of every selected layer of the first task vector are zeroed, an artefact of
  feature order. `first_task="as_reference"` does that (parity); `"whole"` keeps the first task
  vector whole, since nothing merged yet needs protecting. No LoRA is fitted at the first step
  either way (the reference fits none).
"""

from __future__ import annotations

import zlib
from typing import Any, Literal, cast

import torch
from pydantic import Field

from foldin.errors import FoldinError
from foldin.methods.base import FoldResult, MergeMethod, MethodParams, StepContext, TensorSlot
from foldin.methods.registry import register

# The layers NUFILT filters, per architecture: the reference's choice (attention and the first MLP
# projection; the second MLP projection and every non-linear tensor keep their pretrained values),
# mapped onto each backbone's module names. The default selects by all of them at once; no pattern
# of one family matches a module of another.
LAYER_PATTERNS: dict[str, tuple[str, ...]] = {
    "clip": ("attn", "fc1"),  # reference, config/method/nufilt/nufilt.yaml: self_attn.{q,k,v,out}_proj, mlp.fc1
    "t5": ("DenseReluDense", "SelfAttention", "EncDecAttention"),  # reference, nufilt_nlp.yaml
    "bert": ("attention", "intermediate"),  # attention.self.{query,key,value}, attention.output.dense, fc1 analogue
    "dinov2": ("attention", "fc1"),  # attention.attention.{query,key,value}, attention.output.dense, mlp.fc1
    "llama": ("self_attn", "gate_proj", "up_proj"),  # {q,k,v,o}_proj; gate and up project in, down_proj out
}
DEFAULT_LAYERS = tuple(dict.fromkeys(p for patterns in LAYER_PATTERNS.values() for p in patterns))


class NUFILTParams(MethodParams):
    lora_r: int = Field(64, ge=0, description="Rank of the LoRA pair fitted per layer (0: filter only).")
    grad_r: int = Field(8, ge=0, description="Top right singular vectors of the new task vector the loss keeps.")
    null_r: int = Field(128, ge=0, description="Top right singular vectors of the merged task vector filtered out.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the LoRA fit.")
    max_steps: int = Field(50, ge=0, description="Adam steps of the LoRA fit, per layer and merge.")
    null_space: bool = Field(True, description="Filter the new task vector's inputs by P = I - V V^T (else P = I).")
    layers: tuple[str, ...] = Field(
        DEFAULT_LAYERS,
        description="Substrings of the module names of the linear layers to filter (see LAYER_PATTERNS); "
        "every other tensor stays at the base.",
    )
    first_task: Literal["as_reference", "whole"] = Field(
        "whole",
        description="At the first checkpoint: 'as_reference' filters by the zero merge's arbitrary SVD basis "
        "(its first null_r input columns are zeroed); 'whole' keeps the first task vector whole.",
    )
    seed: int = Field(
        42, ge=0, description="Seed of the LoRA factors' initialisation (with the step and tensor name)."
    )


def selected(name: str, is_linear: bool, layers: tuple[str, ...]) -> bool:
    module = name.removesuffix(".weight")
    return is_linear and name.endswith("weight") and any(p in module for p in layers)


def layer_generator(seed: int, step: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{step}:{name}".encode()) + (seed << 32))


def _residual(task: torch.Tensor, merged: torch.Tensor, target: torch.Tensor, v: torch.Tensor, u) -> torch.Tensor:
    """target V - (M V + T P V), in the reference's order of operations (P V = V - U (U^T V))."""
    p_v = v - u @ (u.T @ v) if u is not None else v
    return target @ v - (merged @ v + task @ p_v)


def _squared(r: torch.Tensor) -> torch.Tensor:
    return torch.sum(r * r)


def filter_layer(
    task: torch.Tensor, merged: torch.Tensor, p: NUFILTParams, generator: torch.Generator, fit: bool
) -> torch.Tensor:
    """T (P + B A) for one layer: the part of the new task vector NUFILT adds to the merged one."""
    d = task.shape[1]
    like: dict[str, Any] = {"dtype": task.dtype, "device": task.device}
    pre_v = torch.linalg.svd(merged, full_matrices=False).Vh.T[:, : p.null_r]
    u = pre_v if p.null_space else None
    a = torch.zeros(max(p.lora_r, 1), d, dtype=task.dtype)
    torch.nn.init.normal_(a, std=0.02, generator=generator)  # on the CPU, where the generator lives
    a, b = a.to(task.device), torch.zeros(d, a.shape[0], **like)
    if fit and p.lora_r > 0:
        terms = [(pre_v, _residual(task, merged, merged, pre_v, u))]
        if p.grad_r > 0:
            task_v = torch.linalg.svd(task, full_matrices=False).Vh.T[:, : p.grad_r]
            terms.insert(0, (task_v, _residual(task, merged, task, task_v, u)))
        a, b = torch.nn.Parameter(a), torch.nn.Parameter(b)
        optimizer = torch.optim.Adam([a, b], lr=p.lr)
        for _ in range(p.max_steps):
            loss = cast(torch.Tensor, sum(_squared(res - task @ (b @ (a @ v))) for v, res in terms))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        a, b = a.detach(), b.detach()
    gate = torch.eye(d, **like) - (u @ u.T if u is not None else 0) + b @ a
    return task @ gate


@register
class NUFILT(MergeMethod):
    name = "nufilt"
    Params = NUFILTParams
    params: NUFILTParams
    uses_linear_weights = True
    summary = (
        "Filters each new task vector's inputs away from the merged one's top singular directions, plus a small "
        "LoRA fitted in weight space; attention and first MLP layers only."
    )

    def fold(self, ctx: StepContext) -> FoldResult:
        p = self.params
        whole_first = ctx.step == 1 and p.first_task == "whole"

        def update(slot: TensorSlot) -> tuple[torch.Tensor, bool]:
            if not selected(slot.name, slot.is_linear, p.layers):
                return slot.merged, False
            if whole_first:
                return slot.task_vector, True
            task, merged = slot.task_vector.flatten(1), slot.merged.flatten(1)
            g = layer_generator(p.seed, ctx.step, slot.name)
            added = filter_layer(task, merged, p, g, fit=ctx.step > 1)
            return (merged + added).view_as(slot.task_vector), True

        filtered = sum(ctx.update(update, desc="filtering"))
        if not filtered:
            raise FoldinError(
                f"nufilt's layer patterns {list(p.layers)} match no linear layer of this model; "
                "name them with --set layers='[...]' (substrings of module names)."
            )
        return FoldResult({"layers_filtered": float(filtered)})
