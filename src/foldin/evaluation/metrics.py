"""Continual-merging metrics on an accuracy matrix, as the OPCM paper defines them (section 6.1).

acc[t][k]: accuracy on the k-th task of the order after folding in the first t+1 checkpoints
(0-based; None where not evaluated). Only k <= t is meaningful.
"""

from __future__ import annotations

import statistics

Matrix = list[list[float | None]]


def final_accuracy(acc: Matrix) -> float:
    """ACC: mean accuracy over all tasks after the last step."""
    row = acc[-1]
    if any(a is None for a in row):
        raise ValueError("the final row must be evaluated")
    return statistics.fmean(row)  # type: ignore[arg-type]


def backward_transfer(acc: Matrix) -> float:
    """BWT: mean over k < T of acc_T(k) - acc_k(k) (0 for a single task)."""
    n = len(acc)
    if n < 2:
        return 0.0
    return statistics.fmean(acc[-1][k] - acc[k][k] for k in range(n - 1))  # type: ignore[operator]


def accuracy_after_each_step(acc: Matrix) -> list[float | None]:
    """Mean accuracy over the tasks seen so far, after each step (None where a row is incomplete)."""
    out: list[float | None] = []
    for t, row in enumerate(acc):
        seen = row[: t + 1]
        out.append(None if any(a is None for a in seen) else statistics.fmean(seen))  # type: ignore[arg-type]
    return out


def normalized_accuracy(final_row: list[float], finetuned: list[float]) -> float:
    """Mean over tasks of merged / individually fine-tuned accuracy."""
    return statistics.fmean(m / f for m, f in zip(final_row, finetuned))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
