"""Streaming safetensors reading (pread, one tensor at a time) and writing (header first, then
tensors at known offsets), so that neither side ever holds more than one tensor in memory.

We parse the format ourselves rather than going through ``safetensors.safe_open`` because we need
to validate hostile headers before touching data, to read with ``pread`` (no file-backed pages
accumulating in RSS) and to write a file whose tensors are produced one by one.
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from foldin.errors import CheckpointError
from foldin.io.specs import Spec, spec_bytes

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000  # the safetensors reference implementation's MAX_HEADER_SIZE
_ALIGNMENT = 8


@dataclass(frozen=True)
class TensorSpec:
    """Where a tensor lies in a file and what it is, as the header says (and we have checked)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Parse and validate a safetensors header: offsets inside the file and non-overlapping, sizes
    consistent with dtype and shape. Returns (specs, metadata). Unlike the reference reader, gaps
    between tensors are tolerated: each tensor's bytes are still exactly where its offsets say, so
    nothing can be misread, and a file padded by another writer is not refused for it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: it is shorter than 8 bytes.")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file: its header claims "
                    f"{header_len} bytes but the file has {size}."
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}.") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupted safetensors header (not valid JSON).") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupted safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} has a corrupted safetensors header (bad __metadata__).")
    data_start = 8 + header_len
    data_size = size - data_start
    specs: dict[str, TensorSpec] = {}
    for name, entry in header.items():
        specs[name] = _parse_entry(path, name, entry, data_start, data_size)
    # overlapping tensors would alias each other's bytes: refused (gaps are not, see the docstring)
    spans = sorted((s.begin, s.end, n) for n, s in specs.items() if s.nbytes)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path} has overlapping tensors {n0!r} and {n1!r} in its header.")
    if spans and spans[-1][1] > size:
        raise CheckpointError(f"{path} is truncated: tensor {spans[-1][2]!r} ends past the end of the file.")
    return specs, {str(k): str(v) for k, v in metadata.items()}


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorSpec:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: header entry {name!r} is malformed.")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}.")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**40 for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}.")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data offsets {offsets!r}.")
    if offsets[1] > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} ends at byte {offsets[1]} of a {data_size}-byte data area."
        )
    expected = spec_bytes((dtype, tuple(shape)))
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} occupies {offsets[1] - offsets[0]} bytes but shape {shape} "
            f"of {entry['dtype']} needs {expected}."
        )
    return TensorSpec(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_bytes(fd: int, begin: int, nbytes: int, path: Path) -> torch.Tensor:
    """pread exactly nbytes at begin into a fresh uint8 tensor, or fail with a clear error if the
    file is shorter. The buffer is not zeroed first (a bytearray would be: a third of a read's time)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = buf.numpy().data
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], begin + done)
        if n == 0:
            raise CheckpointError(f"{path} is truncated: it ended while reading a tensor.")
        done += n
    return buf


def tensor_from_bytes(buf: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=spec.dtype)
    return buf.view(spec.dtype).reshape(spec.shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (no copy when it is already contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor. The header is fixed up front from the
    tensors' names, dtypes and shapes; each tensor is then written at its offset in any order.

    The bytes go to the file on a background thread, at most `MAX_PENDING` tensors behind the
    caller: reading and computing the next tensor overlaps writing this one (pwrite releases the
    GIL), which matters once a model no longer fits the kernel's dirty-page allowance and writes
    wait for the disk. Memory stays bounded by those few tensors. A tensor handed to `write` must
    not be modified afterwards; a failed write is raised by a later `write` or by `close`."""

    MAX_PENDING = 2

    def __init__(self, path: Path, specs: dict[str, Spec], metadata: dict[str, str] | None = None):
        self.path = path
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._offsets: dict[str, tuple[int, int]] = {}
        for name, (dtype, shape) in specs.items():
            nbytes = spec_bytes((dtype, shape))
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._offsets[name] = (offset, offset + nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % _ALIGNMENT)
        self._data_start = 8 + len(raw)
        self._specs = specs
        self._pending = set(specs)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(self._fd, self._data_start + offset)
        except BaseException:
            os.close(self._fd)
            raise
        self._io = ThreadPoolExecutor(1, thread_name_prefix="foldin-write")
        self._in_flight: deque[Future[None]] = deque()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)}, expected {dtype}{shape}")
        while len(self._in_flight) >= self.MAX_PENDING:
            self._in_flight.popleft().result()  # bounded memory; raises a failed earlier write
        data = tensor_bytes(tensor)  # keeps the tensor alive until its bytes are written
        self._in_flight.append(self._io.submit(_write_all, self._fd, data, self._data_start + self._offsets[name][0]))
        self._pending.discard(name)

    def close(self, sync: bool = True) -> None:
        """Finish the file (every write done); with sync, make it durable before returning."""
        if self._fd < 0:
            return
        try:
            self._drain(raise_errors=True)
            if self._pending:
                raise ValueError(f"{len(self._pending)} tensors were never written, e.g. {sorted(self._pending)[0]!r}")
            if sync:
                os.fsync(self._fd)
        finally:
            self._release()

    def abort(self) -> None:
        if self._fd >= 0:
            self._drain(raise_errors=False)
            self._release()

    def _drain(self, raise_errors: bool) -> None:
        """Wait for the writes in flight; the first failure is raised once all have ended."""
        error: BaseException | None = None
        while self._in_flight:
            try:
                self._in_flight.popleft().result()
            except BaseException as e:  # kept, and raised once the rest have ended
                error = error or e
        if error is not None and raise_errors:
            raise error

    def _release(self) -> None:
        self._io.shutdown(wait=True)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
