"""Checks on what a step reads: an incoming checkpoint is checked for NaN/Inf and hashed as it is
read; a state's own tensors are checked against the digests recorded when they were written."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from foldin.engine.sources import Spec, TensorSource
from foldin.errors import CheckpointError, StateError
from foldin.io.checkpoint import CHECKSUM, content_hash, digest_matches, tensor_digest


class CheckedReader:
    """Reads a checkpoint's tensors, checking each for NaN/Inf and hashing it the first time.
    `on_hashed(content_hash)` runs as soon as every tensor has been hashed: a step can refuse a
    checkpoint it has already folded in (or the base) before doing the expensive part."""

    def __init__(
        self, source: TensorSource, on_hashed: Callable[[str], None] | None = None, algorithm: str = CHECKSUM
    ):
        self.source = source
        self.algorithm = algorithm
        self.specs = {n: source.spec(n) for n in source.names()}
        self.digests: dict[str, str] = {}
        self._on_hashed = on_hashed
        self.path = source.path

    def names(self) -> list[str]:
        return list(self.specs)

    def spec(self, name: str) -> Spec:
        return self.specs[name]

    @property
    def config_dir(self) -> Path | None:
        return getattr(self.source, "config_dir", None)

    def read(self, name: str) -> torch.Tensor:
        t = self.source.read(name)
        if name not in self.digests:
            if t.dtype.is_floating_point and not all_finite(t):
                raise CheckpointError(f"{self.source.path}: tensor {name!r} contains NaN or Inf values.")
            self.add_digests({name: tensor_digest(t, self.algorithm)})
        return t

    def add_digests(self, digests: Mapping[str, str]) -> None:
        """Record tensor digests (computed here, or by a Ray task that read the tensors)."""
        self.digests.update(digests)
        if self._on_hashed is not None and len(self.digests) == len(self.specs):
            callback, self._on_hashed = self._on_hashed, None
            callback(self.content_hash())

    def content_hash(self) -> str:
        for name in self.specs:
            if name not in self.digests:
                self.read(name)
        return content_hash({n: (*self.specs[n], d) for n, d in self.digests.items()}, self.algorithm)


def hash_source(source: TensorSource, algorithm: str = CHECKSUM) -> str:
    """Content hash of a whole checkpoint (one streaming pass)."""
    return CheckedReader(source, algorithm=algorithm).content_hash()


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf. A sum is finite exactly when every entry is (or it overflowed): one fast
    reduction, about 30x faster than isfinite(t).all(), which builds a mask of the whole tensor;
    only a non-finite sum is checked element by element."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


class VerifiedSource:
    """A source whose tensors are checked, the first time each is read, against checksums recorded
    when it was written (a merge state's generation): a flipped bit is reported, never merged."""

    def __init__(self, ckpt: TensorSource, digests: Mapping[str, str], owner: str):
        self.ckpt, self.path, self._digests, self._owner = ckpt, ckpt.path, dict(digests), owner
        self._verified: set[str] = set()
        if set(ckpt.names()) != set(self._digests):
            raise StateError(
                f"the merge state in {owner} is corrupted: its merged tensors do not match the list recorded "
                "at commit."
            )

    def names(self) -> list[str]:
        return self.ckpt.names()

    def spec(self, name: str) -> Spec:
        return self.ckpt.spec(name)

    def read(self, name: str) -> torch.Tensor:
        t = self.ckpt.read(name)
        if name not in self._verified:
            if not digest_matches(t, self._digests[name]):
                raise StateError(
                    f"the merge state in {self._owner} is corrupted: tensor {name!r} does not match its checksum "
                    "(disk or copy damage); restore the state directory from a backup."
                )
            self._verified.add(name)
        return t

    def close(self) -> None:
        self.ckpt.close()  # type: ignore[attr-defined]
