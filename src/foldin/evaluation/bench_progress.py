"""What a stopped bench resumes from: OUT/bench-progress.json holds the finished orders of each method
(by label, with the settings and orders they belong to) and the reference accuracies, so that a
rerun of the same command does neither again."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from foldin.evaluation.continual_finetuning import same_settings
from foldin.evaluation.scoring import Scorer, reference_accuracies
from foldin.io.atomic import make_dirs, write_json_atomic


def saved_or_scored_references(
    progress_file: Path,
    key: dict[str, Any],
    scorer: Scorer,
    base: dict[str, torch.Tensor],
    task_state: Callable[[str], dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """{"key", "pretrained", "finetuned"}: the reference accuracies, kept in the progress file as soon
    as they are scored, so that a resumed bench of the same zoo and test sets (`key`) does not score
    them again (half an hour on the llm suite's 16 models). Every later save keeps this entry."""
    saved = json.loads(progress_file.read_text()) if progress_file.exists() else {}
    references = saved.get("references") or {}
    if references.get("key") == key:
        return references
    pretrained, finetuned = reference_accuracies(scorer, base, task_state)
    references = {"key": key, "pretrained": pretrained, "finetuned": finetuned}
    make_dirs(progress_file.parent)
    write_json_atomic(progress_file, {**saved, "references": references})
    return references


def load_progress(path: Path, settings: dict[str, Any], orders: list[list[str]]) -> dict[str, list[dict[str, Any]]]:
    """Finished orders of an interrupted run with the same settings (by method label), else none.
    A run asked for more orders counts too (its first orders are these): a stopped 5-order bench
    can be finished, or reported at the orders it completed with --orders N."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if (
        not same_settings(saved.get("settings") or {}, settings)
        or saved.get("orders", [])[: len(orders)] != orders[: len(saved.get("orders", []))]
    ):
        return {}
    return {label: runs[: len(orders)] for label, runs in saved["runs"].items()}
