"""The continual fine-tuning reference of the benchmark: one backbone fine-tuned on each task in
turn, saved after every task so that a stopped run resumes from its last finished task."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from foldin.evaluation.metrics import Matrix
from foldin.evaluation.peak_memory import peak_mb, reset_peak
from foldin.evaluation.scoring import Scorer, run_order, run_record
from foldin.io.atomic import write_atomic, write_json_atomic

CFT_PARTIAL = "cft-partial.json"


def continual_finetuning_order(
    scorer: Scorer,
    base: dict[str, torch.Tensor],
    order: list[str],
    full: bool,
    partial: dict[str, Any] | None,
    out: Path,
    settings: dict[str, Any],
    on_step: Callable[[int], Any],
) -> dict[str, Any]:
    """One order of the continual fine-tuning reference: the backbone fine-tuned on each task in
    turn, with the zoo's recipe and the task's head frozen. It is the one part of the bench that runs
    for hours in a single sequence (20 tasks x 400 steps), so the model is saved after every task
    (OUT/cft-partial.json and the weights beside it) and a stopped run resumes from its last
    finished task, bit for bit: each task's fine-tuning is seeded and starts a fresh optimizer.
    `partial`: the saved record of this order's finished tasks (see `load_cft_partial`), or None."""
    if partial:
        scorer.model = scorer.suite.continued(scorer.model, load_file(out / partial["weights"]))
    else:
        scorer.load(base)
    scorer.use_heads({})
    zoo_settings = settings["zoo"]
    peaks = list(partial.get("peak_rss_mb_per_step", [])) if partial else []

    def advance(name: str) -> float:
        task = scorer.tasks[name]
        reset_peak()
        t0 = time.perf_counter()
        scorer.model = scorer.suite.fine_tune(
            scorer.model,
            scorer.zoo_heads[name],
            *task.train,
            steps=zoo_settings["steps"],
            lr=zoo_settings["lr"],
            seed=zoo_settings["seed"],
        )
        seconds = time.perf_counter() - t0
        peaks.append(round(peak_mb(), 1))
        on_step(1)
        return seconds

    def save(accs: dict[bool, Matrix], seconds: list[float]) -> None:
        save_cft_partial(out, settings, order, accs[True], seconds, peaks, scorer.suite.training_state(scorer.model))

    resume = ({True: partial["acc_matrix"]}, partial["seconds"]) if partial else None
    accs, seconds = run_order(order, advance, scorer, full, resume=resume, after_step=save)
    return run_record(order, accs[True], seconds, peaks=peaks)


def save_cft_partial(
    out: Path,
    settings: dict[str, Any],
    order: list[str],
    acc: Matrix,
    seconds: list[float],
    peaks: list[float],
    state_dict: dict[str, torch.Tensor],
) -> None:
    """Save a continual fine-tuning order after a step: the weights first, under a name of their
    own, then the record that points to them, so that a kill at any moment leaves a matching pair
    (at worst the previous step's)."""
    out.mkdir(parents=True, exist_ok=True)
    weights = f"cft-partial-{len(seconds)}.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    write_atomic(out / weights, lambda tmp: save_file(tensors, tmp))
    record = {
        "settings": settings,
        "order": order,
        "acc_matrix": acc,
        "seconds": seconds,
        "peak_rss_mb_per_step": peaks,
        "weights": weights,
    }
    write_json_atomic(out / CFT_PARTIAL, record)
    for old in out.glob("cft-partial-*.safetensors"):
        if old.name != weights:
            old.unlink()


def load_cft_partial(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a stopped continual fine-tuning order run with the same settings: its `order`,
    `acc_matrix` so far, `seconds` per finished task and the file of its `weights` after the last."""
    path = out / CFT_PARTIAL
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if same_settings(saved["settings"], settings) else None


def clear_cft_partial(out: Path) -> None:
    for path in [out / CFT_PARTIAL, *out.glob("cft-partial-*.safetensors")]:
        path.unlink(missing_ok=True)


def same_settings(saved: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether saved progress belongs to this bench: the same settings but for the number of
    orders, since a bench asked for more or fewer orders starts with the same ones."""
    ignoring_orders = lambda d: {k: v for k, v in d.items() if k != "orders"}  # noqa: E731
    return ignoring_orders(saved) == ignoring_orders(settings)
