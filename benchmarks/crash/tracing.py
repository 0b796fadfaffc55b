"""What a command does to the file system, from strace: every creation, write (with its bytes and
range), truncation, fsync, mkdir, rename, unlink and rmdir on a path under the given roots, in
order, following every thread and child process (Ray workers included). `crashsim` builds the crash
states a power loss allows from this sequence."""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    cmd = ["strace", "-f", *_seccomp(), "-qq", "-y", "-xx", "-s", str(MAX_BUFFER), "-e", "signal=none"]
    cmd += ["-e", f"trace={SYSCALLS}"]
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


@functools.cache
def _seccomp() -> list[str]:
    """strace's --seccomp-bpf where it has it (5.3 and later): the traced process then stops only at
    the syscalls traced, not at each of the tens of thousands a Python start makes, which cuts a
    traced `foldin` command's time by about a third. The operations recorded are the same."""
    probe = subprocess.run(["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=none", "true"], capture_output=True)
    return ["--seccomp-bpf"] if probe.returncode == 0 else []


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
