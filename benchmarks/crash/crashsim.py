"""Crash states a power loss allows, from a traced run of a real command (ALICE-style).

1. `record(argv, roots)` runs the command under strace (following every thread and child process,
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
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PAGE = 4096
MAX_BUFFER = 1 << 24  # bytes strace prints of one write: the whole buffer, for the small models tested
SYSCALLS = (
    "open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,sendfile,copy_file_range,ftruncate,truncate,"
    "fsync,fdatasync,rename,renameat,renameat2,mkdir,mkdirat,unlink,unlinkat,rmdir,lseek,link,linkat,"
    "symlink,symlinkat,fallocate,mmap"
)
_HEX = r"((?:\\x[0-9a-f]{2})*)"  # strace -xx prints every byte of a path or a buffer as \xNN
_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<" + _HEX + ">)?")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)<" + _HEX + ">")
_STR = re.compile(r'"' + _HEX + r'"(\.\.\.)?')


def _bytes(hexed: str) -> bytes:
    return bytes.fromhex(hexed.replace("\\x", ""))


def _text(hexed: str) -> str:
    return os.fsdecode(_bytes(hexed))


@dataclass(frozen=True)
class Op:
    """One file-system operation. kind: create, mkdir, write, truncate, fsync, rename, exchange,
    unlink, rmdir. `path` (and `dest` for renames) absolute; `start`/`size` for write and truncate."""

    index: int
    kind: str
    path: str
    dest: str = ""
    start: int = 0
    size: int = 0
    data: bytes = b""  # what a write wrote

    @property
    def dirs(self) -> tuple[str, ...]:
        """The directories whose fsync makes a directory operation durable."""
        parents = {os.path.dirname(self.path)} | ({os.path.dirname(self.dest)} if self.dest else set())
        return tuple(sorted(parents))


@dataclass
class Trace:
    ops: list[Op]
    before: dict[str, bytes | None]  # path -> file bytes, None for a directory (under the roots)
    mtimes: dict[str, int]  # path -> modification time (ns) of each file before: untouched files keep it
    outside: list[str] = field(default_factory=list)  # mutated paths outside the roots (reported)


class UnsupportedOperation(Exception):
    """The trace holds an operation the model cannot replay (an mmap write, a link)."""


def snapshot(roots: Sequence[Path]) -> dict[str, bytes | None]:
    tree: dict[str, bytes | None] = {}
    for root in roots:
        if not root.exists():
            continue
        tree[str(root)] = None
        for folder, dirs, files in os.walk(root):
            for d in dirs:
                tree[os.path.join(folder, d)] = None
            for f in files:
                tree[os.path.join(folder, f)] = Path(folder, f).read_bytes()
    return tree


def record(argv: Sequence[str], roots: Sequence[Path], cwd: Path, env: dict[str, str] | None = None) -> Trace:
    """Run `argv` under strace in `cwd`; the operations under `roots` (absolute, resolved)."""
    roots = [Path(r).resolve() for r in roots]
    before = snapshot(roots)
    mtimes = {path: os.stat(path).st_mtime_ns for path, content in before.items() if content is not None}
    log = cwd / f".strace-{os.getpid()}.txt"
    cmd = ["strace", "-f", "-qq", "-y", "-xx", "-s", str(MAX_BUFFER), "-e", "signal=none", "-e", f"trace={SYSCALLS}"]
    cmd += ["-o", str(log)]
    done = subprocess.run([*cmd, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed under strace: {done.stderr.strip()[-2000:]}")
    try:
        lines = log.read_text().splitlines()
    finally:
        log.unlink(missing_ok=True)
    ops, outside = parse(lines, roots, cwd.resolve(), before)
    return Trace(ops, before, mtimes, outside)


def _under(path: str, roots: Sequence[Path]) -> bool:
    return any(path == str(r) or path.startswith(str(r) + os.sep) for r in roots)


def _args(text: str) -> list[str]:
    """Split a syscall's argument list at top-level commas (strings hold only \\xNN escapes)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return [*out, cur.strip()] if cur.strip() else out


def _path(arg: str, base: str) -> str:
    found = _STR.search(arg)
    name = _text(found.group(1)) if found else arg
    return os.path.normpath(os.path.join(base, name))


def _buffer(arg: str) -> bytes | None:
    """The bytes of a write's buffer argument (a string, or writev's iovec list); None if strace cut it."""
    found = _STR.findall(arg)
    if not found or any(cut for _, cut in found):
        return None
    return b"".join(_bytes(h) for h, _ in found)


def _offset(arg: str) -> int | None:
    found = re.match(r"\[(\d+)\]", arg)
    return int(found.group(1)) if found else None


def _merge_unfinished(lines: list[str]) -> Iterator[str]:
    """Join strace's `<unfinished ...>` / `<... resumed>` halves (threads interleave)."""
    pending: dict[str, str] = {}
    for line in lines:
        pid = line.split(None, 1)[0] if line else ""
        if line.endswith("<unfinished ...>"):
            pending[pid] = line[: -len("<unfinished ...>")].rstrip()
        elif "resumed>" in line and pid in pending:
            yield pending.pop(pid) + line.split("resumed>", 1)[1]
        else:
            yield line


def parse(
    lines: list[str], roots: Sequence[Path], cwd: Path, before: dict[str, bytes | None]
) -> tuple[list[Op], list[str]]:
    """The operations on paths under `roots`, in order; `before`: the files and folders there at the start."""
    positions: dict[tuple[str, str], int] = {}  # (fd, path) -> file offset, for write / writev / sendfile
    ops: list[Op] = []
    outside: list[str] = []
    existing = set(before)

    def read(path: str, start: int, size: int) -> bytes:
        """Bytes sendfile / copy_file_range copied from an input file (unchanged by the command)."""
        content = before.get(path)
        if content is None:
            content = Path(path).read_bytes() if Path(path).is_file() else b""
        return content[start : start + size]

    def add(kind: str, path: str, **kw) -> None:
        if not _under(path, roots) and not _under(kw.get("dest", ""), roots):
            if kind != "fsync":
                outside.append(path)
            return
        ops.append(Op(len(ops), kind, path, **kw))

    for line in _merge_unfinished(lines):
        m = _LINE.match(line)
        if not m or int(m.group(4)) < 0:
            continue
        name, args, ret = m.group(2), _args(m.group(3)), int(m.group(4))
        ret_path = _text(m.group(5)) if m.group(5) else None
        fd_match = _FD.match(args[0]) if args else None
        fd = (fd_match.group(1), _text(fd_match.group(2))) if fd_match else None
        if name in ("open", "openat", "creat"):
            flags = args[2 if name == "openat" else 1] if name != "creat" else "O_CREAT|O_WRONLY|O_TRUNC"
            if not ret_path or not re.search(r"O_CREAT|O_WRONLY|O_RDWR|O_TRUNC", flags):
                continue
            positions[(str(ret), ret_path)] = 0
            if "O_CREAT" in flags and ret_path not in existing:
                existing.add(ret_path)
                add("create", ret_path)
            elif "O_TRUNC" in flags:
                add("truncate", ret_path, size=0)
        elif name in ("write", "writev", "pwrite64", "pwritev", "pwritev2") and fd:
            if name.startswith("pwrite"):
                start = int(args[3])
            else:
                start = positions.get(fd, 0)
                positions[fd] = start + ret
            data = _buffer(args[1])
            if data is None and _under(fd[1], roots):
                raise UnsupportedOperation(f"strace cut a buffer of more than {MAX_BUFFER} bytes: {line[:200]}")
            if ret:
                add("write", fd[1], start=start, size=ret, data=(data or b"")[:ret])
        elif name in ("sendfile", "copy_file_range"):
            out_arg, in_arg, in_offset = (
                (args[0], args[1], args[2]) if name == "sendfile" else (args[2], args[0], args[1])
            )
            out_fd, in_fd = _FD.match(out_arg), _FD.match(in_arg)
            if out_fd and in_fd and ret:
                key = (out_fd.group(1), _text(out_fd.group(2)))
                start = positions.get(key, 0)
                positions[key] = start + ret
                source = (in_fd.group(1), _text(in_fd.group(2)))
                origin = _offset(in_offset)
                if origin is None:
                    origin = positions.get(source, 0)
                    positions[source] = origin + ret
                add("write", key[1], start=start, size=ret, data=read(source[1], origin, ret))
        elif name == "lseek" and fd:
            positions[fd] = ret
        elif name == "ftruncate" and fd:
            add("truncate", fd[1], size=int(args[1]))
        elif name in ("fsync", "fdatasync") and fd:
            add("fsync", fd[1])
        elif name in ("mkdir", "mkdirat"):
            base = _text(_FD.match(args[0]).group(2)) if name == "mkdirat" else str(cwd)
            path = _path(args[1] if name == "mkdirat" else args[0], base)
            existing.add(path)
            add("mkdir", path)
        elif name in ("rename", "renameat", "renameat2"):
            if name == "rename":
                src, dst = _path(args[0], str(cwd)), _path(args[1], str(cwd))
            else:
                src = _path(args[1], _text(_FD.match(args[0]).group(2)))
                dst = _path(args[3], _text(_FD.match(args[2]).group(2)))
            exchange = name == "renameat2" and "RENAME_EXCHANGE" in args[4]
            add("exchange" if exchange else "rename", src, dest=dst)
            existing.add(dst)
            if not exchange:
                existing.discard(src)
        elif name in ("unlink", "unlinkat", "rmdir"):
            if name == "unlinkat":
                path = _path(args[1], _text(_FD.match(args[0]).group(2)))
                kind = "rmdir" if "AT_REMOVEDIR" in args[2] else "unlink"
            else:
                path, kind = _path(args[0], str(cwd)), name
            existing.discard(path)
            add(kind, path)
        elif name in ("link", "linkat", "symlink", "symlinkat", "truncate", "fallocate"):
            target = args[-1] if name.startswith("sym") else args[0]
            if _under(_path(target, str(cwd)), roots):
                raise UnsupportedOperation(line)
        elif name == "mmap" and "PROT_WRITE" in line and "MAP_SHARED" in line:
            mapped = _FD.match(args[4]) if len(args) > 4 else None
            if mapped and _under(_text(mapped.group(2)), roots):
                raise UnsupportedOperation(line[:200])
    return ops, outside


# ---- the crash states ------------------------------------------------------------------------


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
    """Write the crash state of the traced folder `root` (a root given to `record`) as `out`."""
    model = _Model(trace.before)
    torn = dict(state.torn)
    for op in trace.ops[: state.point]:
        if op.index in state.kept:
            model.apply(op, torn.get(op.index))
    initial = {n: p for p, n in _Model(trace.before).paths.items()}
    root_text = str(Path(root).resolve())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path, node in sorted(model.paths.items()):
        if not (path == root_text or path.startswith(root_text + os.sep)):
            continue
        target = Path(str(out) + path[len(root_text) :])
        if model.kind[node] == "dir":
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(bytes(model.data[node]))
            original = initial.get(node)  # inodes are numbered in the snapshot's order, the same each time
            if original in trace.mtimes and node not in model.touched:
                os.utime(target, ns=(trace.mtimes[original], trace.mtimes[original]))
