"""Scoring merged backbones the way the benchmark does: the test sets encoded once, each task's
frozen head (or the head a method refit), an order's accuracy matrix step by step, the reference
accuracies, and the checks of a final merge beyond its tasks (as rank-R adapters, the talk check)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from foldin.api import ContinualMerger
from foldin.errors import FoldinError
from foldin.evaluation.adapter_out import score_as_adapter
from foldin.evaluation.metrics import Matrix, backward_transfer, final_accuracy
from foldin.evaluation.zoo import Zoo
from foldin.io.hf_names import to_model_names


class Scorer:
    """Scores backbones on the zoo's test sets with the tasks' heads (test sets tokenized once)."""

    def __init__(self, zoo: Zoo, names: list[str], max_test: int | None = None, matrix_test: int | None = None):
        self.suite = zoo.suite
        self.model = self.suite.load_backbone()
        self.tasks = {t.name: t for t in zoo.tasks(names)}
        self.test = {n: self.suite.encode(t.test[0][:max_test], t.test[1][:max_test]) for n, t in self.tasks.items()}
        # the cells of a full accuracy matrix that ACC and BWT do not use, on fewer examples (None: all)
        smaller = matrix_test is not None and matrix_test > 0 and (max_test is None or matrix_test < max_test)
        self.sample = (
            {n: self.suite.encode(t.test[0][:matrix_test], t.test[1][:matrix_test]) for n, t in self.tasks.items()}
            if smaller
            else self.test  # not fewer examples than the test sets: the same encodings, not a second copy
        )
        self.zoo_heads = {n: zoo.head(n) for n in names}
        self.tied = tied_parameters(self.model)
        self.refit_heads: dict[str, dict[str, torch.Tensor]] = {}

    def use_heads(self, refit: dict[str, dict[str, torch.Tensor]]) -> None:
        """Score with the zoo's heads, except where a method refit a task's head."""
        self.refit_heads = {n: h for n, h in refit.items() if n in self.zoo_heads}

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a backbone's weights; buffers the model no longer keeps (old position_ids) are ignored,
        and so is a tied parameter whose twin is loaded (an LM head tied to the input embeddings)."""
        loaded = set(self.model.load_state_dict(to_model_names(self.model, state_dict), strict=False).missing_keys)
        missing = [n for n in loaded if not self.tied.get(n, set()) - loaded]
        if missing:
            raise FoldinError(
                f"the model to score lacks {len(missing)} of the backbone's weights (e.g. {missing[0]!r})."
            )

    def score(self, name: str, refit: bool = True, sample: bool = False) -> float:
        """Accuracy on the task's test set (`sample`: its first matrix_test examples), with its
        refit head if there is one and `refit`."""
        head = self.refit_heads.get(name) if refit else None
        return self.suite.accuracy(
            self.model, head or self.zoo_heads[name], (self.sample if sample else self.test)[name]
        )


def tied_parameters(model: torch.nn.Module) -> dict[str, set[str]]:
    """Each parameter name that shares its tensor with others -> the names of those others."""
    by_tensor: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), set()).add(name)
    return {n: names - {n} for names in by_tensor.values() if len(names) > 1 for n in names}


def run_order(
    order: list[str],
    advance: Callable[[str], float],
    scorer: Scorer,
    full: bool,
    refit_variants: tuple[bool, ...] = (True,),
    resume: tuple[dict[bool, Matrix], list[float]] | None = None,
    after_step: Callable[[dict[bool, Matrix], list[float]], None] | None = None,
) -> tuple[dict[bool, Matrix], list[float]]:
    """Fold the tasks in, in order; `advance(name)` does one step, loads the result into the
    scorer and returns its merge seconds. Returns (an accuracy matrix per variant: scored with the
    refit heads or with the zoo's heads, seconds per step). In a full matrix, the cells ACC and BWT
    do not read (earlier tasks before the last step) are scored on the scorer's sample.
    `resume`: the matrices and seconds of the steps already done (the scorer holds their model);
    `after_step(matrices, seconds)` is called after each step is scored, to save it."""
    n = len(order)
    if resume is None:
        accs: dict[bool, Matrix] = {v: [[None] * n for _ in range(n)] for v in refit_variants}
        seconds: list[float] = []
    else:
        accs, seconds = {v: [row[:] for row in m] for v, m in resume[0].items()}, list(resume[1])
    for t in range(len(seconds), n):
        seconds.append(advance(order[t]))
        columns = range(t + 1) if full else ([*range(n)] if t == n - 1 else [t])
        for k in columns:
            for refit, acc in accs.items():
                acc[t][k] = scorer.score(order[k], refit, sample=k < t < n - 1)
        if after_step is not None:
            after_step(accs, seconds)
    return accs, seconds


def final_model_checks(
    scorer: Scorer,
    zoo: Zoo,
    base: dict[str, torch.Tensor],
    merger: ContinualMerger,
    adapter_ranks: tuple[int, ...],
) -> dict[str, Any] | None:
    """The suite's talk check of the final merged model (the scorer holds it), and its scores as a
    rank-R adapter for each of `adapter_ranks`; None when there is neither."""
    talk = scorer.suite.talk(scorer.model)
    if talk is None and not adapter_ranks:
        return None
    merged = merger.merged_state_dict()
    adapters = [
        score_as_adapter(
            scorer.suite, zoo.backbone, base, merged, set(merger.layout_.linear), r, scorer.zoo_heads, scorer.test
        )
        for r in adapter_ranks
    ]
    return {**({"talk": talk} if talk is not None else {}), **({"adapters": adapters} if adapters else {})}


def base_talk(scorer: Scorer, base: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    scorer.load(base)
    return scorer.suite.talk(scorer.model)


def reference_accuracies(
    scorer: Scorer, base: dict[str, torch.Tensor], task_state: Callable[[str], dict[str, torch.Tensor]]
) -> tuple[dict[str, float], dict[str, float]]:
    """(pretrained, individually fine-tuned) accuracy of each task, on the bench's own test sets."""
    scorer.load(base)
    pretrained = {n: scorer.score(n) for n in scorer.tasks}
    finetuned = {}
    for n in scorer.tasks:
        scorer.load(task_state(n))
        finetuned[n] = scorer.score(n)
    return pretrained, finetuned


def run_record(
    order: list[str],
    acc: Matrix,
    seconds: list[float],
    step_stats: list[dict[str, float]] | None = None,
    peaks: list[float] | None = None,
    final_model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One order's results; `step_stats`: the method's scalars after each step (e.g. AdaMerging's
    learned coefficients, OPCM's scale), kept so a run says what was learned, not only how well;
    `peaks`: the bench process's peak resident memory during each step (MB, see `peak_memory`)."""
    return {
        "order": order,
        "acc_matrix": acc,
        "final_acc": dict(zip(order, acc[-1])),
        "ACC": final_accuracy(acc),
        "BWT": backward_transfer(acc),
        "seconds_per_step": seconds,
        **({"peak_rss_mb_per_step": peaks} if peaks else {}),
        **({"step_stats": step_stats} if step_stats is not None else {}),
        **({"final_model": final_model} if final_model is not None else {}),
    }
