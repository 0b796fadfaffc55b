"""Open any checkpoint format a user is likely to hold, and read it one tensor at a time.

Formats: a Hugging Face model folder (sharded or single safetensors, pytorch_model.bin, sharded
.bin), a single ``.safetensors`` file, or a ``.bin``/``.pt``/``.pth`` state dict. Pickles are only
ever loaded with ``weights_only=True``: a checkpoint can never run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import xxhash

from foldin.errors import CheckpointError
from foldin.io.safetensors_file import TensorSpec, read_bytes, read_header, tensor_bytes, tensor_from_bytes
from foldin.io.specs import Spec

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


class Checkpoint(ABC):
    """A read-only, lazily read set of named tensors."""

    def __init__(self, path: Path, files: list[Path]):
        self.path = path
        self.files = files

    @property
    def config_dir(self) -> Path | None:
        """The Hugging Face folder this checkpoint came from, when it has a config.json."""
        return self.path if self.path.is_dir() and (self.path / "config.json").is_file() else None

    @abstractmethod
    def names(self) -> list[str]:
        """Tensor names in storage order (reading in this order is sequential I/O)."""

    @abstractmethod
    def spec(self, name: str) -> Spec:
        """dtype and shape, from the header alone."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """The tensor's data in its stored dtype; a fresh buffer the caller may keep."""

    def close(self) -> None:  # noqa: B027  (a checkpoint with no open file has nothing to release)
        pass

    def fingerprint(self) -> list[list[object]]:
        """Cheap identity of the files (name, size, mtime): if it is unchanged, so is the content."""
        out: list[list[object]] = []
        for f in self.files:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        return out

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: Path, files: list[Path], weight_map: dict[str, str] | None = None):
        super().__init__(path, files)
        self._specs: dict[str, tuple[int, TensorSpec]] = {}
        self._fds: list[int] = []
        try:
            for i, f in enumerate(files):
                specs, _meta = read_header(f)
                for name, spec in specs.items():
                    if name in self._specs:
                        raise CheckpointError(f"{path}: tensor {name!r} appears in more than one shard.")
                    if weight_map is not None and weight_map.get(name) != f.name:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} is stored in {f.name} but the index says "
                            f"{weight_map.get(name)!r}."
                        )
                    self._specs[name] = (i, spec)
                self._fds.append(os.open(f, os.O_RDONLY))
        except BaseException:
            self.close()
            raise
        if weight_map is not None and (missing := set(weight_map) - set(self._specs)):
            raise CheckpointError(f"{path}: the index lists {sorted(missing)[0]!r} but no shard holds it.")
        self._order = sorted(self._specs, key=lambda n: (self._specs[n][0], self._specs[n][1].begin))

    def names(self) -> list[str]:
        return list(self._order)

    def spec(self, name: str) -> Spec:
        s = self._specs[name][1]
        return s.dtype, s.shape

    def read(self, name: str) -> torch.Tensor:
        i, spec = self._specs[name]
        return tensor_from_bytes(read_bytes(self._fds[i], spec.begin, spec.nbytes, self.files[i]), spec)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class TorchCheckpoint(Checkpoint):
    """A pickled state dict, memory-mapped where the file is in the zip format torch.save writes."""

    def __init__(self, path: Path, files: list[Path]):
        super().__init__(path, files)
        self._tensors: dict[str, torch.Tensor] = {}
        for f in files:
            for name, t in _load_state_dict(f).items():
                if name in self._tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in more than one shard.")
                self._tensors[name] = t

    def names(self) -> list[str]:
        return list(self._tensors)

    def spec(self, name: str) -> Spec:
        t = self._tensors[name]
        return t.dtype, tuple(t.shape)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()


def _is_gguf(f: Path) -> bool:
    with open(f, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _is_zip(f: Path) -> bool:
    try:
        return zipfile.is_zipfile(f)
    except zipfile.BadZipFile as e:  # is_zipfile itself raises on some damaged end records
        raise CheckpointError(f"{f} is truncated or corrupted: {e}") from e


def _load_state_dict(f: Path) -> dict[str, torch.Tensor]:
    mmap = _is_zip(f)  # legacy (non-zip) pickles cannot be memory-mapped
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{f} is a pickle that needs more than plain tensors to load, and foldin only loads "
            f"pickles with weights_only=True so that a checkpoint cannot run code (re-save it as "
            f"safetensors or as a plain state dict): {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # noqa: BLE001  torch.load on damaged bytes raises many types (KeyError, ...)
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{f} is truncated or corrupted: {first_line}") from e
    if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{f} does not hold a state dict (a mapping of names to tensors).")
    return obj


def _index_files(index: Path) -> tuple[list[Path], dict[str, str]]:
    """Shard files named by a Hugging Face index, refusing any that would lie outside its folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid checkpoint index (expected JSON with a weight_map).") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names.")
    folder = index.parent.resolve()
    files: list[Path] = []
    for shard in dict.fromkeys(weight_map.values()):
        if not shard or "\0" in shard:
            raise CheckpointError(f"{index} names an empty or invalid shard file name {shard!r}.")
        target = (index.parent / shard).resolve()
        if os.path.isabs(shard) or "/" in shard or "\\" in shard or target.parent != folder:
            raise CheckpointError(f"{index} points to {shard!r}, outside the checkpoint folder; refusing to read it.")
        if not target.is_file():
            raise CheckpointError(f"{index} names shard {shard!r}, which does not exist.")
        files.append(index.parent / shard)
    return files, weight_map


def _check_config(config: Path) -> None:
    """A folder's config.json decides which weights are linear layers and is copied on export:
    refuse one that is not a JSON object rather than silently fall back."""
    if not config.exists():
        return
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{config} is not valid JSON (a JSON object was expected); fix or remove it.")
    quantization = parsed.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
        raise CheckpointError(
            f"{config.parent} holds {method} weights (config.json has a quantization_config); foldin merges float "
            "weights: load the model dequantized and save_pretrained it first."
        )


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint of any supported format; validates headers, reads no tensor data."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist.")
    if p.is_dir():
        _check_config(p / "config.json")
        found = next((p / n for n in WEIGHT_FILES if (p / n).is_file()), None)
        if found is None:
            raise CheckpointError(f"{p} holds no model weights (looked for {', '.join(WEIGHT_FILES)}).")
        return _open_file(found, shown_as=p)
    return _open_file(p, shown_as=p)


def _open_file(f: Path, shown_as: Path) -> Checkpoint:
    if _is_gguf(f):
        raise CheckpointError(
            f"{shown_as} is a GGUF file (llama.cpp's quantized format), not float weights; convert it first "
            "(transformers: from_pretrained(folder, gguf_file=...) then save_pretrained)."
        )
    if f.name.endswith(".safetensors.index.json"):
        files, weight_map = _index_files(f)
        return SafetensorsCheckpoint(shown_as, files, weight_map)
    if f.name.endswith(".index.json"):
        files, _ = _index_files(f)
        return TorchCheckpoint(shown_as, files)
    if f.suffix == ".safetensors":
        return SafetensorsCheckpoint(shown_as, [f])
    if f.suffix in (".bin", ".pt", ".pth") or _is_zip(f):
        return TorchCheckpoint(shown_as, [f])
    return SafetensorsCheckpoint(shown_as, [f])


# Checksums: xxh3-128 (about 30x faster than sha256 here: hashing every byte read and written no
# longer shows in a step's time) for states created by this version; sha256 for earlier states,
# which keep it. A tensor digest names its algorithm unless it is sha256 (the earlier, bare form).
CHECKSUM = "xxh3_128"
CHECKSUMS = ("xxh3_128", "sha256")


def tensor_digest(tensor: torch.Tensor, algorithm: str = CHECKSUM) -> str:
    data = tensor_bytes(tensor)
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    return "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()


def digest_matches(tensor: torch.Tensor, recorded: str) -> bool:
    """Whether `tensor` has the digest recorded (in whichever algorithm recorded it)."""
    algorithm = recorded.partition(":")[0] if ":" in recorded else "sha256"
    return tensor_digest(tensor, algorithm) == recorded


def content_hash(entries: dict[str, tuple[torch.dtype, tuple[int, ...], str]], algorithm: str = CHECKSUM) -> str:
    """A format-independent hash of a checkpoint: the same tensors give the same hash whether
    they are stored as safetensors, shards or a pickle. entries: name -> (dtype, shape, digest)."""
    h = hashlib.sha256() if algorithm == "sha256" else xxhash.xxh3_128()
    for name in sorted(entries):
        dtype, shape, digest = entries[name]
        h.update(f"{name}\0{dtype}\0{list(shape)}\0{digest}\n".encode())
    return f"{algorithm}:{h.hexdigest()}"
