"""In-memory API for users who already hold state dicts: the same methods and engine as the
on-disk state, with scikit-learn's incremental-estimator shape (`partial_fit` returns self,
learned state in attributes ending in `_`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from foldin.data import FeatureFn, Learning, TaskData
from foldin.engine import DictSource, ModelLayout, export_tensor, fold_step, hash_source
from foldin.errors import FoldinError, MismatchError
from foldin.layers import resolve_linear_weights
from foldin.methods import get_method
from foldin.methods.base import Heads, MergeMethod
from foldin.runners import Options
from foldin.runners.local import LocalRunner


class ContinualMerger:
    """Folds state dicts into one merged model, one at a time.

    base: the pretrained state dict every checkpoint was fine-tuned from.
    linear_weights: which tensors OPCM treats as linear-layer weights: an nn.Module (its nn.Linear
        modules), a regular expression over tensor names, or None (`module`'s nn.Linear modules if
        given, else the fallback name rule).
    module, features: for data-driven methods (otmf, adamerging): the architecture, whose
        state_dict names are the checkpoints', and `features(module, batch) -> (batch, d)`.

    Learned state: merged_task_vector_ (dict of tensors), stats_, step_, hashes_; for data-driven
    methods also buffer_ (examples of the last task, for the next step) and heads_ (refit heads).
    """

    method_: MergeMethod
    layout_: ModelLayout
    merged_task_vector_: dict[str, torch.Tensor]
    stats_: dict[str, float]
    step_: int
    hashes_: list[str]
    buffer_: TaskData | None
    heads_: Heads

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        method: str = "opcm",
        linear_weights: nn.Module | str | None = None,
        module: nn.Module | None = None,
        features: FeatureFn | None = None,
        device: str | None = None,
        workers: int | None = None,
        **params: Any,
    ):
        self.base = base
        self.method = method
        self.linear_weights = linear_weights
        self.module = module
        self.features = features
        self.device = device
        self.workers = workers
        self.params = params

    def partial_fit(self, checkpoint: Mapping[str, torch.Tensor], data: TaskData | None = None) -> ContinualMerger:
        """Fold one checkpoint in; data-driven methods also need its task's `data`."""
        if not hasattr(self, "step_"):
            self._start()
        learning = None
        if self.method_.needs_data and data is not None:
            if self.module is None or self.features is None:
                raise FoldinError(
                    f"method {self.method!r} runs the model: give ContinualMerger module= and features=."
                )
            learning = Learning(self.module, self.features, data, self.buffer_)
        merged: dict[str, torch.Tensor] = {}
        previous = DictSource(self.merged_task_vector_) if self.step_ else None
        runner = LocalRunner(
            self._base_source, previous, merged.__setitem__, Options(False, self.device, self.workers)
        )
        result, ckpt_hash = fold_step(
            self.method_,
            self.step_ + 1,
            self.stats_,
            self.layout_,
            DictSource(checkpoint, f"checkpoint {self.step_ + 1}"),
            runner,
            learning,
            on_hashed=self._refuse_duplicate,
        )
        self.merged_task_vector_, self.stats_ = merged, result.stats
        self.step_ += 1
        self.hashes_.append(ckpt_hash)
        if result.buffer is not None:
            self.buffer_ = result.buffer
        self.heads_ = {**self.heads_, **result.heads}
        return self

    def _refuse_duplicate(self, ckpt_hash: str) -> None:
        if ckpt_hash in self.hashes_:
            raise MismatchError(f"checkpoint {self.step_ + 1} is identical to one already folded in (or to the base).")

    def _start(self) -> None:
        self.method_ = get_method(self.method)(**self.params)
        self._base_source = DictSource(self.base, "base")
        specs = {n: tuple(t.shape) for n, t in self.base.items()}
        module = self.linear_weights if isinstance(self.linear_weights, nn.Module) else None
        module = module if module is not None or self.linear_weights is not None else self.module
        pattern = self.linear_weights if isinstance(self.linear_weights, str) else None
        linear, _ = resolve_linear_weights(specs, pattern=pattern, module=module)
        self.layout_ = ModelLayout.from_source(self._base_source, linear)
        self.merged_task_vector_ = {}
        self.stats_ = {}
        self.step_ = 0
        self.hashes_ = [hash_source(self._base_source)]
        self.buffer_ = None
        self.heads_ = {}

    def merged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The merged model after the last step (the base before the first)."""
        if not getattr(self, "step_", 0):
            return {n: t.detach().clone() for n, t in self.base.items()}
        return {
            n: export_tensor(
                self.method_,
                self.stats_,
                t,
                self.merged_task_vector_.get(n),
                dtype if dtype is not None and t.dtype.is_floating_point else None,
            )
            for n, t in self.base.items()
        }


def merge(
    base: Mapping[str, torch.Tensor],
    checkpoints: Iterable[Mapping[str, torch.Tensor]],
    method: str = "opcm",
    linear_weights: nn.Module | str | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Fold `checkpoints` into `base` in order and return the merged state dict.

    >>> merged = merge(base_sd, [sd1, sd2, sd3], method="opcm", alpha=0.5, linear_weights=model)
    """
    merger = ContinualMerger(base, method, linear_weights, **params)
    for ckpt in checkpoints:
        merger.partial_fit(ckpt)
    return merger.merged_state_dict()
