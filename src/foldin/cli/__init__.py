"""The `foldin` command line. Merging commands live in `merge` (`run` in `run`), evaluation ones in `evaluate`."""

from __future__ import annotations

import argparse
import ctypes
import sys
from importlib.metadata import version

from pydantic import ValidationError

from foldin.cli import evaluate, merge
from foldin.cli.common import validation_message
from foldin.errors import FoldinError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foldin",
        description="Continual model merging: fold fine-tuned checkpoints into one model as they arrive.",
    )
    parser.add_argument("--version", action="version", version=f"foldin {version('foldin')}")
    sub = parser.add_subparsers(dest="command", required=True)
    merge.add_commands(sub)
    evaluate.add_commands(sub)
    return parser


def keep_memory_flat() -> None:
    """Make glibc serve every large allocation with mmap, returned to the OS when freed. By default
    it raises that threshold after the first frees, and the tensors of later steps then pile up in
    a fragmented heap: peak RSS would grow with model size instead of staying flat."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def main(argv: list[str] | None = None) -> int:
    keep_memory_flat()
    try:
        args = build_parser().parse_args(argv)  # lists the methods: a broken plugin is one sentence too
        args.func(args)
    except FoldinError as e:
        print(f"foldin: error: {e}", file=sys.stderr)
        return 1
    except ValidationError as e:
        print(f"foldin: error: {validation_message(e, 'method parameter')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("foldin: interrupted; the state is unchanged since its last completed step.", file=sys.stderr)
        return 130
    return 0
