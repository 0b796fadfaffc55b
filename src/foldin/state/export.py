"""The merged model out of a state: a Hugging Face folder, a PEFT LoRA adapter, or tensors in memory.

Each merged tensor is computed when it is written (base + the method's scale x the merged task
vector, in the export dtype), so an export holds one tensor at a time, never the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from foldin.engine import Spec, TensorSource, read_export_tensor
from foldin.errors import FoldinError, io_failure
from foldin.io.export import DTYPES, check_target, parse_size, write_hf_folder
from foldin.io.lora_export import write_lora_adapter
from foldin.layers import resolve_linear_weights
from foldin.methods import get_method
from foldin.methods.base import MergeMethod
from foldin.progress import progress as progress_bar
from foldin.runners import Options
from foldin.runners.local import LocalBackend
from foldin.state.card import model_card
from foldin.state.stored import reading, state_files


@dataclass(frozen=True)
class ExportPlan:
    """Where and how to write a merged model folder: its folder, the floating dtype (None: the
    base's), the largest shard and whether an earlier export there may be replaced."""

    out_dir: Path
    dtype: torch.dtype | None
    max_shard_bytes: int
    overwrite: bool

    @classmethod
    def of(cls, out_dir: str | os.PathLike[str], options: Options) -> ExportPlan:
        """From the user's words in `options`: a dtype name and a size such as "5GB"."""
        if options.dtype is not None and options.dtype not in DTYPES:
            raise FoldinError(f"--dtype must be one of {', '.join(DTYPES)}, not {options.dtype!r}.")
        dtype = DTYPES[options.dtype] if options.dtype else None
        return cls(Path(out_dir), dtype, parse_size(options.max_shard_size), options.overwrite)


def method_of(meta: dict[str, Any]) -> MergeMethod:
    return get_method(meta["method"])(**meta["params"])


def protected(state_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """What an export must never replace or write into."""
    return {"the merge state's folder": state_dir, "the base model": Path(meta["base"]["path"])}


def config_dir(meta: dict[str, Any]) -> Path | None:
    """The base's folder of config and tokenizer files, which an exported model folder copies."""
    return Path(meta["base"]["config_dir"]) if meta["base"]["config_dir"] else None


def export_specs(base: TensorSource, dtype: torch.dtype | None) -> dict[str, Spec]:
    """The dtype and shape of each tensor of the merged model (floating ones in `dtype` if given)."""
    specs = {}
    for name in base.names():
        b_dtype, shape = base.spec(name)
        specs[name] = (dtype if dtype is not None and b_dtype.is_floating_point else b_dtype, shape)
    return specs


def merged_tensors(
    meta: dict[str, Any], base: TensorSource, merged: TensorSource | None, dtype: torch.dtype | None
) -> tuple[dict[str, Spec], Callable[[str], torch.Tensor]]:
    """(dtype and shape of each output tensor, a function computing it) for the merged model."""
    method, specs = method_of(meta), export_specs(base, dtype)

    def produce(name: str) -> torch.Tensor:
        return read_export_tensor(method, meta["stats"], base, merged, name, specs[name][0])

    return specs, produce


def merged_state_dict(state_dir: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The merged model in memory (for evaluation; `export_folder` streams instead)."""
    with reading(state_dir) as (meta, base, merged):
        specs, produce = merged_tensors(meta, base, merged, dtype)
        return {name: produce(name) for name in specs}


def export_folder(state_dir: Path, meta: dict[str, Any], plan: ExportPlan, options: Options) -> Path:
    """Write the merged model after the current step as a Hugging Face folder. With `backend` (e.g.
    a RayBackend), each shard is written elsewhere (the folder's parent must be shared storage)."""
    check_target(plan.out_dir, plan.overwrite, protected(state_dir, meta))
    with reading(state_dir) as (meta, base, merged):
        specs, produce = merged_tensors(meta, base, merged, plan.dtype)
        try:
            return write_hf_folder(
                plan.out_dir,
                specs,
                produce,
                config_dir(meta),
                model_card(meta),
                plan.max_shard_bytes,
                overwrite=plan.overwrite,
                torch_dtype=plan.dtype,
                progress=lambda names: progress_bar(names, desc="exporting", unit="tensor", enabled=options.progress),
                write_shards=(options.backend or LocalBackend()).shard_writer(
                    options, state_files(state_dir, meta), method_of(meta), meta["stats"], specs
                ),
            )
        except OSError as e:
            raise FoldinError(
                io_failure(f"exporting to {plan.out_dir}", e, plan.out_dir, f"{plan.out_dir} was left as it was.")
            ) from e


def export_lora(
    state_dir: Path,
    meta: dict[str, Any],
    out_dir: Path,
    rank: int,
    full_tensors: bool,
    options: Options,
) -> dict[str, float]:
    """Write the merged model as a PEFT LoRA adapter of rank `rank` over the base (each linear
    weight's change by its best rank-`rank` approximation); returns the share of each weight
    change's energy kept. Other changed tensors need `full_tensors` (see foldin.io.lora_export)."""
    check_target(out_dir, options.overwrite, protected(state_dir, meta))
    with reading(state_dir) as (meta, base, merged):
        scale = method_of(meta).scale(meta["stats"])
        specs, produce = merged_tensors(meta, base, merged, None)
        linear = set(meta["linear_weights"])
        if not linear:  # a method that needs no linear weights did not look them up at init
            shapes = {n: s for n, (_, s) in specs.items()}
            linear = set(resolve_linear_weights(shapes, config_dir=config_dir(meta))[0])

        def delta(name: str) -> torch.Tensor:
            return scale * merged.read(name) if merged is not None else torch.zeros(specs[name][1])

        floating = [n for n in specs if specs[n][0].is_floating_point]
        changed = {n for n in floating if n not in linear and merged is not None and merged.read(n).any()}
        try:
            return write_lora_adapter(
                out_dir,
                specs,
                linear,
                changed,
                delta,
                produce,
                rank,
                full_tensors,
                meta["base"]["path"],
                model_card(meta, "peft"),
                options.overwrite,
                progress=lambda names: progress_bar(
                    names, desc="factorising", unit="tensor", enabled=options.progress
                ),
            )
        except OSError as e:
            raise FoldinError(
                io_failure(f"exporting to {out_dir}", e, out_dir, f"{out_dir} was left as it was.")
            ) from e
