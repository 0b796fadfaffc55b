"""How foldin names safetensors shards and writes their index, the way Hugging Face shards a model.

Two kinds of files use it: an exported model folder (model.safetensors, or
model-0000i-of-0000N.safetensors and model.safetensors.index.json), and the merged task vector of
a state's generation (merged.safetensors, or merged-0000i-of-0000N.safetensors and their index when
Ray tasks wrote it). The names live here, below both the state that commits a generation and the
runners that write one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from foldin.io.atomic import fsync_file

MODEL_PREFIX = "model"
MERGED_PREFIX = "merged"
MERGED_FILE = f"{MERGED_PREFIX}.safetensors"
MERGED_INDEX = f"{MERGED_FILE}.index.json"


def shard_name(prefix: str, index: int, count: int) -> str:
    """The file name of shard `index` (0-based) of `count`: prefix-0000i-of-0000N.safetensors."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.safetensors"


def write_index(path: Path, weight_map: dict[str, str], metadata: dict[str, Any]) -> None:
    """Write a shard index (which shard holds each tensor) and make it durable."""
    path.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n")
    fsync_file(path)


def merged_file(gen_dir: Path) -> Path:
    """The merged task vector of a generation: its single file, or the shard index Ray tasks wrote."""
    single = gen_dir / MERGED_FILE
    return single if single.exists() or not (gen_dir / MERGED_INDEX).exists() else gen_dir / MERGED_INDEX
