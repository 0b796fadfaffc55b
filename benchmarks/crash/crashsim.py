"""Crash states a power loss allows, from a traced run of a real command (ALICE-style).

1. `tracing.record(argv, roots)` runs the command under strace (following every thread and child process,
   Ray workers included) and keeps, in order, each file-system operation on a path under `roots`:
   creations, writes (write, pwrite, writev, sendfile, copy_file_range, with their byte ranges),
   truncations, fsyncs of files and directories, mkdir, rename, RENAME_EXCHANGE, unlink, rmdir,
   each write with its bytes (strace prints every buffer in full; the files of the crash tests are
   small), and snapshots `roots` before the command.
2. `crash_states(ops, seed)` enumerates, at every point of that sequence, the on-disk states the
   weakest common model allows: data not yet fsynced may be lost, or kept only in part at 4 KiB
   pages; a directory operation not yet made durable by an fsync of its directory (of both, for a
   rename across two) may be lost, independently of the others (so in effect in any order). Per
   point: all non-durable operations lost, all persisted, each one dropped alone, and a seeded
   sample of subsets with torn writes.
3. `materialize(...)` writes one such state into a scratch folder.

Not modelled: mmap writes (refused if one touches a root), hard and symbolic links (refused), and
disks that acknowledge an fsync without keeping the data.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tracing import Op, Trace

PAGE = 4096


def identities(ops: Sequence[Op]) -> list[tuple[int, tuple[int, ...]]]:
    """Per op, the identity of the file or folder it writes, truncates or fsyncs, and of each folder
    whose entry it changes, at that moment. Identities follow renames as inodes do: a file written
    under a temporary name and fsynced under its final one has its writes made durable."""
    ids: dict[str, int] = {}
    fresh = itertools.count()

    def ident(path: str) -> int:
        if path not in ids:
            ids[path] = next(fresh)
        return ids[path]

    def move(src: str, dest: str, table: dict[str, int]) -> dict[str, int]:
        return {dest + q[len(src) :]: n for q, n in table.items() if q == src or q.startswith(src + os.sep)}

    out = []
    for op in ops:
        out.append((ident(op.path), tuple(ident(d) for d in op.dirs)))
        if op.kind in ("rename", "exchange") and op.path in ids:
            moved, swapped = move(op.path, op.dest, ids), move(op.dest, op.path, ids)
            for q in [q for q in ids if q == op.path or q.startswith(op.path + os.sep)]:
                del ids[q]
            for q in [q for q in ids if q == op.dest or q.startswith(op.dest + os.sep)]:
                del ids[q]
            ids.update(moved)
            if op.kind == "exchange":
                ids.update(swapped)
        elif op.kind in ("unlink", "rmdir"):
            ids.pop(op.path, None)
    return out


def durable(ops: Sequence[Op], point: int, marks: Sequence[tuple[int, tuple[int, ...]]]) -> list[bool]:
    """Which of ops[:point] are durable at a crash right after op point-1: a write or truncate
    once its file is fsynced (under whatever name it has then); a directory operation once each
    folder it changes is. `marks`: `identities(ops)`."""
    out = []
    for op in ops[:point]:
        synced = {marks[o.index][0] for o in ops[op.index + 1 : point] if o.kind == "fsync"}
        target, folders = marks[op.index]
        if op.kind == "fsync":
            out.append(True)
        elif op.kind in ("write", "truncate"):
            out.append(target in synced)
        else:
            out.append(all(f in synced for f in folders))
    return out


@dataclass(frozen=True)
class CrashState:
    point: int  # operations issued before the crash
    kept: frozenset[int]  # the indices of ops[:point] that reached the disk
    torn: tuple[tuple[int, frozenset[int]], ...] = ()  # (write index, pages of it kept)
    label: str = ""


def crash_states(ops: Sequence[Op], samples: int = 0, seed: int = 0, single_drops: bool = True) -> list[CrashState]:
    """Every point; per point all-lost, all-persisted, each single drop, and `samples` random subsets."""
    rng = random.Random(seed)
    states: dict[tuple, CrashState] = {}
    marks = identities(ops)
    for point in range(len(ops) + 1):
        flags = durable(ops, point, marks)
        sure = frozenset(i for i, d in enumerate(flags) if d)
        loose = [i for i, d in enumerate(flags) if not d and ops[i].kind != "fsync"]
        candidates = [
            CrashState(point, sure, label="all lost"),
            CrashState(point, frozenset(range(point)), label="all persisted"),
        ]
        if single_drops:
            candidates += [
                CrashState(point, frozenset(range(point)) - {i}, label=f"drop {ops[i].kind}") for i in loose
            ]
        for _ in range(samples if loose else 0):
            chosen = frozenset(i for i in loose if rng.random() < 0.5)
            torn = tuple(
                (i, frozenset(p for p in _pages(ops[i]) if rng.random() < 0.5))
                for i in sorted(chosen)
                if ops[i].kind == "write" and rng.random() < 0.3
            )
            candidates.append(CrashState(point, sure | chosen, torn, label="sampled"))
        for s in candidates:
            states.setdefault((s.point, s.kept, s.torn), s)
    return list(states.values())


def _pages(op: Op) -> list[int]:
    return list(range(op.start // PAGE, (op.start + op.size - 1) // PAGE + 1))


class _Model:
    """Paths -> inodes and inode contents, replayed from the snapshot before the command."""

    def __init__(self, before: dict[str, bytes | None]):
        self.next = 0
        self.paths: dict[str, int] = {}
        self.kind: dict[int, str] = {}
        self.data: dict[int, bytearray] = {}
        self.touched: set[int] = set()  # inodes a replayed write or truncation changed
        for path, content in sorted(before.items()):
            self._new(path, "dir" if content is None else "file", content or b"")

    def _new(self, path: str, kind: str, content: bytes = b"") -> int:
        self.next += 1
        self.paths[path] = self.next
        self.kind[self.next] = kind
        self.data[self.next] = bytearray(content)
        return self.next

    def apply(self, op: Op, pages: frozenset[int] | None = None) -> None:
        node = self.paths.get(op.path)
        if op.kind in ("create", "mkdir"):
            if os.path.dirname(op.path) in self.paths and op.path not in self.paths:
                self._new(op.path, "dir" if op.kind == "mkdir" else "file")
        elif op.kind == "write" and node is not None:
            self.touched.add(node)
            data = self.data[node]
            content = op.data
            for page in _pages(op) if pages is None else sorted(pages):
                lo, hi = max(op.start, page * PAGE), min(op.start + op.size, (page + 1) * PAGE)
                if len(data) < hi:
                    data.extend(b"\0" * (hi - len(data)))
                data[lo:hi] = content[lo - op.start : hi - op.start]
        elif op.kind == "truncate" and node is not None:
            self.touched.add(node)
            data = self.data[node]
            del data[op.size :]
            data.extend(b"\0" * (op.size - len(data)))
        elif op.kind in ("rename", "exchange") and node is not None and os.path.dirname(op.dest) in self.paths:
            other = self.paths.get(op.dest)
            if op.kind == "exchange" and other is None:
                return
            moved = {p: n for p, n in self.paths.items() if p == op.path or p.startswith(op.path + os.sep)}
            swapped = {p: n for p, n in self.paths.items() if p == op.dest or p.startswith(op.dest + os.sep)}
            for p in [*moved, *swapped]:
                del self.paths[p]
            for p, n in moved.items():
                self.paths[op.dest + p[len(op.path) :]] = n
            if op.kind == "exchange":
                for p, n in swapped.items():
                    self.paths[op.path + p[len(op.dest) :]] = n
        elif op.kind in ("unlink", "rmdir") and node is not None:
            if op.kind == "unlink" or not any(p.startswith(op.path + os.sep) for p in self.paths):
                del self.paths[op.path]


def materialize(trace: Trace, state: CrashState, out: Path, root: Path) -> None:
    """Write the crash state of the traced folder `root` (a root given to `record`) as `out`.

    `out` is brought to the state in place: only what differs is written or removed. Crash states
    mostly share their files, and rebuilding the folder each time was half of a check's time where
    a directory removal costs milliseconds (ext4 mounted with `discard`)."""
    model = _Model(trace.before)
    torn = dict(state.torn)
    for op in trace.ops[: state.point]:
        if op.index in state.kept:
            model.apply(op, torn.get(op.index))
    initial = {n: p for p, n in _Model(trace.before).paths.items()}
    root_text = str(Path(root).resolve())
    wanted: dict[Path, int] = {}
    for path, node in model.paths.items():
        if path == root_text or path.startswith(root_text + os.sep):
            wanted[Path(str(out) + path[len(root_text) :])] = node
    _remove_unwanted(out, {p for p, n in wanted.items() if model.kind[n] == "dir"} | {out}, set(wanted))
    out.mkdir(parents=True, exist_ok=True)
    for target, node in sorted(wanted.items()):
        if model.kind[node] == "dir":
            target.mkdir(parents=True, exist_ok=True)
            continue
        content = bytes(model.data[node])
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.is_file() and target.read_bytes() == content):
            target.write_bytes(content)
        original = initial.get(node)  # inodes are numbered in the snapshot's order, the same each time
        if original in trace.mtimes and node not in model.touched:
            os.utime(target, ns=(trace.mtimes[original], trace.mtimes[original]))
        else:
            os.utime(target)  # written by the command: a fresh modification time, as a rewrite gives


def _remove_unwanted(out: Path, dirs: set[Path], paths: set[Path]) -> None:
    """Remove what lies under `out` but is not in the crash state: files not in `paths`, folders not
    in `dirs` (and anything, file or folder, that has the other kind there)."""
    if not out.is_dir() or out.is_symlink():
        if out.exists() or out.is_symlink():
            out.unlink()
        return
    for folder, subdirs, files in os.walk(out, topdown=False):
        for name in files:
            path = Path(folder, name)
            if path not in paths or path in dirs:
                path.unlink()
        for name in subdirs:
            path = Path(folder, name)
            if path.is_symlink():
                path.unlink()
            elif path not in dirs:
                shutil.rmtree(path)
