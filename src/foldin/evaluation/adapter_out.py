"""A merged model exported as a rank-R LoRA adapter and scored as a user would load it: the same
writer as `foldin export --lora-rank R`, then PEFT's PeftModel.from_pretrained on the base. The
difference from the full merged model's scores is what re-compressing the merge to rank R costs."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from foldin.evaluation.suite import Encoded, Suite
from foldin.io.lora_export import write_lora_adapter


def export_adapter(
    base: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor], linear: set[str], rank: int, out: Path
) -> dict[str, float]:
    """Write merged - base as a rank-`rank` adapter folder; returns the energy kept per weight."""
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in base.items()}
    floating = [n for n in base if base[n].is_floating_point()]
    changed = {n for n in floating if n not in linear and not torch.equal(base[n], merged[n])}
    return write_lora_adapter(
        out,
        specs,
        linear,
        changed,
        lambda n: merged[n].float() - base[n].float(),
        lambda n: merged[n],
        rank,
        False,
        "base",
        "A merged model exported as a LoRA adapter by foldin bench.\n",
    )


def score_as_adapter(
    suite: Suite,
    base_dir: Path,
    base: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    linear: set[str],
    rank: int,
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    tests: Mapping[str, Encoded],
) -> dict[str, Any]:
    """Each task's accuracy with the merge as a rank-`rank` adapter on the base, the mean share of
    energy the rank kept, and the suite's talk check of the adapted model."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        energy = export_adapter(base, merged, linear, rank, Path(tmp) / "adapter")
        model = PeftModel.from_pretrained(suite.load_backbone(base_dir), Path(tmp) / "adapter").eval()
        accuracies = {n: suite.accuracy(model, heads[n], tests[n]) for n in tests}
        talk = suite.talk(model)
    return {
        "rank": rank,
        "final_acc": accuracies,
        "ACC": sum(accuracies.values()) / len(accuracies),
        "energy_kept_mean": sum(energy.values()) / len(energy),
        **({"talk": talk} if talk is not None else {}),
    }
