"""A generation: one folder of a merge state holding everything after one step.

gen-<step>-<token>/merged.safetensors   the merged task vector (float32), or, when Ray tasks
                                        wrote it, merged-0000i-of-0000N.safetensors + their index
gen-<step>-<token>/buffer.safetensors   data-driven methods: examples of the last task (bounded)
gen-<step>-<token>/heads.safetensors    data-driven methods: classification heads refit so far
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from foldin.data import TaskData
from foldin.io.atomic import fsync_file
from foldin.methods.base import Heads

BUFFER_FILE = "buffer.safetensors"
HEADS_FILE = "heads.safetensors"


def new_generation_name(step: int, token: str) -> str:
    return f"gen-{step:06d}-{token}"


def remove_leftovers(state_dir: Path, current: str | None) -> None:
    """Delete generations and temporary files that an interrupted step left behind."""
    for p in state_dir.iterdir():
        if (p.name.startswith("gen-") and p.name != current) or p.name.endswith(".tmp"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def write_task_data(path: Path, data: TaskData) -> None:
    tensors = {f"inputs.{k}": v.contiguous() for k, v in data.inputs.items()}
    if data.labels is not None:
        tensors["labels"] = data.labels.contiguous()
    for k, v in (data.head or {}).items():
        tensors[f"head.{k}"] = v.contiguous()
    save_file(tensors, path, metadata={"name": data.name, "total": str(data.total or len(data))})
    fsync_file(path)


def read_task_data(path: Path) -> TaskData:
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def pick(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    return TaskData(
        pick("inputs."),
        tensors.get("labels"),
        pick("head.") or None,
        meta.get("name", "task"),
        int(meta.get("total", 0)) or None,
    )


def write_heads(path: Path, heads: Heads) -> None:
    save_file({f"{task}/{k}": v.contiguous() for task, h in heads.items() for k, v in h.items()}, path)
    fsync_file(path)


def read_heads(path: Path | None) -> Heads:
    heads: Heads = {}
    for key, tensor in load_file(path).items() if path else []:
        task, _, part = key.rpartition("/")
        heads.setdefault(task, {})[part] = tensor
    return heads
