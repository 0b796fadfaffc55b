"""What the command-line modules share: validation errors as one sentence, the backend and step
options, and the one-line reports of a step and of a LoRA export."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from foldin.errors import FoldinError
from foldin.io.checkpoint import open_checkpoint
from foldin.io.specs import spec_bytes
from foldin.runners import Backend, Options
from foldin.state import MergeState


def validation_message(e: ValidationError, what: str) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "value"
    return f"invalid {what}: {where}: {first['msg']} (got {first.get('input')!r})."


def options_from(args: argparse.Namespace, **fixed: Any) -> Options:
    """The one place the command line becomes foldin.Options: the flags a command has (--quiet,
    --device, --workers, --backend, --dtype, --max-shard-size, --overwrite) and `fixed` values
    (what `foldin run` reads from its YAML)."""
    flags = ("device", "workers", "dtype", "max_shard_size", "overwrite")
    given = {name: getattr(args, name) for name in flags if hasattr(args, name)}  # else Options' default
    return Options(progress=not args.quiet, backend=backend_from(args), **{**given, **fixed})


def backend_from(args: argparse.Namespace) -> Backend | None:
    """--backend ray [--address ADDR] [--threads-per-task N]; None: in this process."""
    if args.backend == "local":
        if args.address:
            raise FoldinError("--address applies to --backend ray.")
        return None
    from foldin.runners.ray import RayBackend

    return RayBackend(args.address, threads=args.threads_per_task)


def add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="ray: run the work as Ray tasks that read and write the files themselves (pip install "
        "'foldin[ray]'; paths must be on storage every node sees)",
    )
    p.add_argument(
        "--address", help="the Ray cluster to use (e.g. auto or HOST:6379); default: RAY_ADDRESS, else a new local one"
    )
    p.add_argument(
        "--threads-per-task",
        type=int,
        default=1,
        help="torch threads per Ray task; the bits equal a local run with as many threads (OMP_NUM_THREADS)",
    )


def add_step_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        help="tensors processed at once on threads, sharing torch's threads (same bits as one worker with that "
        "share; on the CPU at most one per thread); default: one per thread for methods that decompose matrices "
        "(OPCM), else 1",
    )
    p.add_argument(
        "--device",
        help="where the arithmetic runs, e.g. cuda or cuda:1 (default: cpu); results are identical up to float "
        "rounding",
    )


def lora_summary(state: MergeState, out: Path, rank: int, energy: dict[str, float]) -> str:
    """What a LoRA export kept and costs: the energy share of each weight change, and the adapter's
    size beside the full model's."""
    worst = min(energy, key=lambda name: energy[name])
    size = (out / "adapter_model.safetensors").stat().st_size
    with open_checkpoint(state.meta["base"]["path"]) as base:
        full = sum(spec_bytes(base.spec(n)) for n in base.names())
    return (
        f"exported the merged model after step {state.step} as a rank-{rank} LoRA adapter to {out}: "
        f"{size / 1e6:.1f} MB ({size / full:.1%} of the full model's {full / 1e6:.1f} MB), {len(energy)} weights, "
        f"energy kept mean {sum(energy.values()) / len(energy):.1%}, least {energy[worst]:.1%} ({worst}); "
        "per weight in lora-energy.json"
    )


def widened(entry: dict[str, Any]) -> str:
    """', its float16 tensors widened' where the checkpoint's precision was lower than the base's."""
    return f", its {' and '.join(entry['widened_from'])} tensors widened" if entry.get("widened_from") else ""
