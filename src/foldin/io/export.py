"""Write a merged model as a Hugging Face folder, tensor by tensor: safetensors shards (+ index when
more than one), the base's config/tokenizer/processor files, and a README model card.

The folder is built beside OUT_DIR and renamed into place at the end, so OUT_DIR is never seen
half-written; with overwrite, the old folder is replaced only after the new one is complete. An
export lists what it wrote in MANIFEST, and --overwrite replaces only such a folder, holding
nothing else: a file of the user's that sits in the target is never deleted.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from foldin.errors import FoldinError
from foldin.io.atomic import make_dirs, replace_dir
from foldin.io.safetensors_file import SafetensorsWriter
from foldin.io.shards import MODEL_PREFIX, shard_name, write_index
from foldin.io.specs import Spec, spec_bytes

MANIFEST = ".foldin-export.json"
WEIGHT_PATTERNS = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|onnx|gguf)$|\.index\.json$|^README\.md$|^\.")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise FoldinError(f"cannot read {text!r} as a size (examples: 5GB, 500MB).")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(m.group(1)) * base**power)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


class FolderWriter:
    """A folder written beside `out_dir`, listed in MANIFEST and renamed into place by `finish`;
    `abort` (or a failure in `finish`) leaves `out_dir` as it was."""

    def __init__(self, out_dir: Path, overwrite: bool, protected: dict[str, Path] | None = None):
        check_target(out_dir, overwrite, protected)
        make_dirs(out_dir.parent)
        self.out_dir = out_dir
        self.tmp = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(4)}.tmp")
        self.tmp.mkdir()

    def finish(self) -> Path:
        try:
            written = sorted(p.name for p in self.tmp.iterdir())
            manifest = {"written_by": "foldin export", "files": written}
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            replace_dir(self.tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_folder(out_dir: Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Build a folder with `fill(tmp)` and put it in place (see FolderWriter)."""
    folder = FolderWriter(out_dir, overwrite)
    try:
        fill(folder.tmp)
    except BaseException:
        folder.abort()
        raise
    return folder.finish()


class ModelFolderWriter(FolderWriter):
    """A Hugging Face model folder written tensor by tensor, in any order: safetensors shards of at
    most `max_shard_bytes` (with an index when there are several), then the base's config and
    tokenizer files and the model card. `torch_dtype`, when the weights were cast, goes into config.json."""

    def __init__(
        self,
        out_dir: Path,
        specs: dict[str, Spec],
        max_shard_bytes: int,
        overwrite: bool = False,
        protected: dict[str, Path] | None = None,
        open_shards: bool = True,
    ):
        super().__init__(out_dir, overwrite, protected)
        self.specs = specs
        self.sizes = {n: spec_bytes((dtype, shape)) for n, (dtype, shape) in specs.items()}
        self.shards = plan_shards(self.sizes, max_shard_bytes)
        single = len(self.shards) == 1
        self.files = [
            self.tmp / (f"{MODEL_PREFIX}.safetensors" if single else shard_name(MODEL_PREFIX, i, len(self.shards)))
            for i in range(len(self.shards))
        ]
        self._writers: dict[str, SafetensorsWriter] = {}
        try:
            for path, names in zip(self.files, self.shards) if open_shards else []:
                writer = SafetensorsWriter(path, {n: specs[n] for n in names})
                self._writers.update(dict.fromkeys(names, writer))
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writers[name].write(name, tensor)

    def finish_model(self, config_dir: Path | None, model_card: str, torch_dtype: torch.dtype | None = None) -> Path:
        try:
            for writer in dict.fromkeys(self._writers.values()):
                writer.close()
            if len(self.shards) > 1:
                weight_map = {name: path.name for path, names in zip(self.files, self.shards) for name in names}
                metadata = {"total_size": sum(self.sizes.values())}
                write_index(self.tmp / f"{MODEL_PREFIX}.safetensors.index.json", weight_map, metadata)
            if config_dir is not None:
                shutil.copytree(
                    config_dir,
                    self.tmp,
                    dirs_exist_ok=True,
                    ignore=lambda _d, names: [n for n in names if WEIGHT_PATTERNS.search(n)],
                )
            if torch_dtype is not None and (self.tmp / "config.json").is_file():
                _set_config_dtype(self.tmp / "config.json", torch_dtype)
            (self.tmp / "README.md").write_text(model_card)
        except BaseException:
            self.abort()
            raise
        return self.finish()

    def abort(self) -> None:
        for writer in dict.fromkeys(self._writers.values()):
            writer.abort()
        super().abort()


def write_hf_folder(
    out_dir: Path,
    specs: dict[str, Spec],
    produce: Callable[[str], torch.Tensor],
    config_dir: Path | None,
    model_card: str,
    max_shard_bytes: int,
    overwrite: bool = False,
    progress: Callable[[list[str]], Iterable[str]] = iter,
    torch_dtype: torch.dtype | None = None,
    write_shards: Callable[[list[tuple[Path, list[str]]]], None] | None = None,
) -> Path:
    """Write the folder: `specs` gives each output tensor's dtype and shape in file order,
    `produce(name)` computes it. `write_shards`, if given, writes the planned (path, names) shards
    instead (e.g. as Ray tasks)."""
    folder = ModelFolderWriter(out_dir, specs, max_shard_bytes, overwrite, open_shards=write_shards is None)
    try:
        if write_shards is not None:
            write_shards(list(zip(folder.files, folder.shards)))
        else:
            for name in progress(list(specs)):
                folder.write(name, produce(name))
    except BaseException:
        folder.abort()
        raise
    return folder.finish_model(config_dir, model_card, torch_dtype)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """Record the exported dtype, so that from_pretrained(..., torch_dtype="auto") uses it."""
    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:  # newer / older transformers
        config[key] = name
    path.write_text(json.dumps(config, indent=2) + "\n")


def check_target(out_dir: Path, overwrite: bool, protected: dict[str, Path] | None = None) -> None:
    """Refuse, in one sentence, a target whose replacement could lose something foldin did not
    write: the current folder or one above it, a `protected` path (e.g. the state, the base) or a
    folder holding or inside one, a non-empty folder without --overwrite, and with --overwrite
    anything but a previous export holding only what it wrote."""
    target = out_dir.resolve()
    here = Path.cwd().resolve()
    if out_dir.name in ("", ".", "..") or target == here or target in here.parents:
        raise FoldinError(
            f"cannot export into {out_dir}: it is the current folder or one above it; name a new folder."
        )
    for what, path in (protected or {}).items():
        p = path.resolve()
        if target == p or target in p.parents or p in target.parents:
            raise FoldinError(
                f"cannot export into {out_dir}: it is, holds or lies inside {what} ({path}); name a new folder."
            )
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FoldinError(f"{out_dir} exists and is not a folder; choose another path.")
    entries = {p.name for p in out_dir.iterdir()}
    if not entries:
        return
    if not overwrite:
        raise FoldinError(f"{out_dir} exists and is not empty; choose another directory or pass --overwrite.")
    try:
        written = set(json.loads((out_dir / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise FoldinError(
            f"--overwrite replaces only a folder that foldin exported, and {out_dir} is not one "
            f"(no {MANIFEST}); choose another directory."
        ) from None
    foreign = sorted(entries - written - {MANIFEST})
    if foreign:
        raise FoldinError(
            f"{out_dir} holds files that foldin did not write ({', '.join(foreign[:3])}); "
            "move them or choose another directory."
        )
