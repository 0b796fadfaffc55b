"""A merged model written as a PEFT LoRA adapter instead of a full model: for each linear-layer
weight, the best rank-R approximation of its change (truncated SVD, Eckart-Young), as
lora_B @ lora_A with lora_alpha = r (scaling 1); PeftModel.from_pretrained(base, folder) loads it.

Parameters a LoRA cannot carry (biases, norms, embeddings) are refused, naming them, unless
`full_tensors`: then the biases of adapted layers are stored as PEFT's `bias="lora_only"` stores
them, and every other changed module whole, as `modules_to_save` (the merged values). The folder
is written tensor by tensor like every other export, with what share of each weight change's
energy (sum of squared singular values) the rank keeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from foldin.errors import FoldinError
from foldin.io.export import write_folder
from foldin.io.lora import PREFIX
from foldin.io.safetensors_file import SafetensorsWriter
from foldin.io.specs import Spec
from foldin.methods.singular import nonzero_singular_triplets

ADAPTER_FILE = "adapter_model.safetensors"
REPORT_FILE = "lora-energy.json"


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, share of energy kept): B @ A is the best rank-`rank` approximation of `delta`,
    split evenly (B = U sqrt(s), A = sqrt(s) V^T); zero-padded to `rank` when the matrix is smaller.
    The singular pairs come from OPCM's `nonzero_singular_triplets`: a merge of LoRA adapters has
    the rank of their sum, found from a sketch at O(m n k) instead of a full SVD's O(m n min(m, n));
    a full-rank change gets `thin_svd`. Pairs below 1e-5 of the largest singular value are left out
    of the factors only, never of the energy, which is ||delta||_F^2 computed directly."""
    m, n = delta.shape
    u, s, vh = nonzero_singular_triplets(delta.float())
    k = min(rank, len(s))
    total = float(delta.double().square().sum())
    kept = min(1.0, float(s[:k].double().square().sum()) / total) if total > 0 else 1.0
    root = s[:k].sqrt()
    b = torch.zeros(m, rank, dtype=torch.float32)
    a = torch.zeros(rank, n, dtype=torch.float32)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a, kept


def module_of(name: str) -> tuple[str, str]:
    """('encoder.layer.0.output.dense', 'weight') from a parameter name."""
    module, _, param = name.rpartition(".")
    return module, param


def plan_adapter(
    specs: dict[str, Spec],
    linear: set[str],
    changed: set[str],
    full_tensors: bool,
) -> tuple[list[str], list[str], list[str]]:
    """(adapted linear weights, biases stored with them, modules stored whole): every 2-D linear
    weight gets a LoRA; a changed tensor that is not one needs `full_tensors` (else: refused)."""
    adapted = sorted(n for n in linear if len(specs[n][1]) == 2 and module_of(n)[1] == "weight")
    adapted_modules = {module_of(n)[0] for n in adapted}
    others = sorted(n for n in changed if n not in adapted)
    if others and not full_tensors:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FoldinError(
            f"the merge changed {len(others)} tensors a LoRA adapter cannot hold ({shown}); "
            "pass --lora-full-tensors to store them whole, as PEFT stores modules_to_save."
        )
    # PEFT's bias="lora_only" stores the bias of every adapted layer: all of them, if any changed
    adapted_biases = sorted(n for n in specs if module_of(n)[0] in adapted_modules and module_of(n)[1] == "bias")
    biases = adapted_biases if set(adapted_biases) & set(others) else []
    whole = sorted({module_of(n)[0] for n in others if module_of(n)[0] not in adapted_modules})
    return adapted, biases, whole


def write_lora_adapter(
    out_dir: Path,
    specs: dict[str, Spec],
    linear: set[str],
    changed: set[str],
    delta: Callable[[str], torch.Tensor],
    merged: Callable[[str], torch.Tensor],
    rank: int,
    full_tensors: bool,
    base_name: str,
    model_card: str,
    overwrite: bool = False,
    progress: Callable[[list[str]], Any] = iter,
) -> dict[str, float]:
    """Write the adapter folder; returns the share of energy kept per adapted weight.
    `delta(name)`: merged minus base (float); `merged(name)`: the merged model's tensor."""
    if rank < 1:
        raise FoldinError(f"--lora-rank must be at least 1, not {rank}.")
    adapted, biases, whole = plan_adapter(specs, linear, changed, full_tensors)
    if not adapted:
        raise FoldinError("the model has no linear-layer weights to carry a LoRA adapter.")
    stored = biases + [n for n in specs if module_of(n)[0] in set(whole) and specs[n][0].is_floating_point]
    out_specs: dict[str, Spec] = {}
    for name in adapted:
        module, _ = module_of(name)
        out, inp = specs[name][1]
        out_specs[f"{PREFIX}{module}.lora_A.weight"] = (torch.float32, (rank, inp))
        out_specs[f"{PREFIX}{module}.lora_B.weight"] = (torch.float32, (out, rank))
    keys = {n: f"{PREFIX}{module_of(n)[0]}.base_layer.bias" if n in biases else PREFIX + n for n in stored}
    out_specs.update({keys[n]: specs[n] for n in stored})
    energy: dict[str, float] = {}

    def write(tmp: Path) -> None:
        with SafetensorsWriter(tmp / ADAPTER_FILE, out_specs, {"format": "pt"}) as writer:
            for name in progress(adapted):
                b, a, energy[name] = low_rank_factors(delta(name).flatten(1), rank)
                module, _ = module_of(name)
                writer.write(f"{PREFIX}{module}.lora_A.weight", a.contiguous())
                writer.write(f"{PREFIX}{module}.lora_B.weight", b.contiguous())
            for name in stored:
                writer.write(keys[name], merged(name).contiguous())
        config = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_name,
            "r": rank,
            "lora_alpha": rank,  # scaling = lora_alpha / r = 1: B @ A is the change itself
            "lora_dropout": 0.0,
            "target_modules": sorted(module_of(n)[0] for n in adapted),
            "modules_to_save": whole or None,
            "bias": "lora_only" if biases else "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "inference_mode": True,
        }
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        report = {
            "rank": rank,
            "energy_kept": energy,
            "min": min(energy.values()),
            "mean": math.fsum(energy.values()) / len(energy),
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card)

    write_folder(out_dir, overwrite, write)
    return energy
