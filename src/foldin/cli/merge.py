"""The merging commands: init, add, export, run, verify, info, methods."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from foldin.cli.common import validation_message
from foldin.errors import FoldinError, StateError
from foldin.io.checkpoint import open_checkpoint
from foldin.io.hub import HUB_ID
from foldin.methods import available_methods, get_method
from foldin.runners import Backend
from foldin.state import MergeState
from foldin.state.schema import STATE_FILE


def parse_settings(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values are read as YAML scalars (0.5 -> float, sum -> str, true -> bool)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FoldinError(f"--set expects KEY=VALUE, got {item!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out


class RunConfig(BaseModel):
    """The YAML file `foldin run` reads. Relative paths are relative to the file."""

    model_config = ConfigDict(extra="forbid")
    base: str
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    checkpoints: list[str]  # paths, Hub ids, or glob patterns (matches taken in name order)
    output: str
    state: str | None = None
    linear_weights: str | None = None
    dtype: str | None = None
    max_shard_size: str = "5GB"
    lora_rank: int | None = Field(None, ge=1)  # export a rank-R PEFT adapter instead of a full model
    lora_full_tensors: bool = False


def ensure_state(
    state_dir: Path, base: str, method: str, params: dict[str, Any], linear_weights: str | None
) -> MergeState:
    """Open the state at state_dir if it exists and matches (base, method, params), else create it."""
    if not (state_dir / STATE_FILE).exists():
        return MergeState.create(state_dir, base, method, params, linear_weights)
    state = MergeState.open(state_dir)
    wanted = get_method(method)(**params).params.model_dump()
    if state.meta["method"] != method or state.meta["params"] != wanted:
        raise FoldinError(
            f"{state_dir} holds a {state.meta['method']} state with {state.meta['params']}, "
            f"not {method} with {wanted}; use another state directory."
        )
    state.check_base(base)
    return state


def _backend(args: argparse.Namespace) -> Backend | None:
    """--backend ray [--address ADDR] [--threads-per-task N]; None: in this process."""
    if args.backend == "local":
        if args.address:
            raise FoldinError("--address applies to --backend ray.")
        return None
    from foldin.runners.ray import RayBackend

    return RayBackend(args.address, threads=args.threads_per_task)


def _add_backend_options(p: argparse.ArgumentParser) -> None:
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


def _add_step_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tensors processed at once on threads, sharing torch's threads (same bits as one worker with that share)",
    )
    p.add_argument(
        "--device",
        help="where the arithmetic runs, e.g. cuda or cuda:1 (default: cpu); results are identical up to float "
        "rounding",
    )


def cmd_init(args: argparse.Namespace) -> None:
    state = MergeState.create(args.state_dir, args.base, args.method, parse_settings(args.set), args.linear_weights)
    linear = state.meta["linear_weights"]
    layers = (
        f"{len(linear)} linear-layer weights, found by {state.meta['linear_weights_source']}"
        if state.method.uses_linear_weights or linear
        else f"{args.method} treats every tensor alike"
    )
    base = state.meta["base"]["path"]
    print(f"created {args.method} state in {state.dir} (base {base}, hashed by the first step; {layers})")


def cmd_add(args: argparse.Namespace) -> None:
    state = MergeState.open(args.state_dir)
    if args.task and len(args.task) != len(args.checkpoints):
        raise FoldinError(
            f"give one --task per checkpoint ({len(args.checkpoints)} checkpoints, {len(args.task)} --task)."
        )
    for i, ckpt in enumerate(args.checkpoints):
        learning = None
        if args.task:
            from foldin.evaluation.registry import learning_for_task

            learning = learning_for_task(args.task[i], state.base_path, Path(ckpt))
        entry = state.add(
            ckpt,
            progress=not args.quiet,
            learning=learning,
            device=args.device,
            workers=args.workers,
            backend=_backend(args),
        )
        print(
            f"step {entry['step']}: folded in {ckpt} ({entry['hash'][:19]}) in {entry['seconds']:.1f}s{widened(entry)}"
        )


def cmd_export(args: argparse.Namespace) -> None:
    state = MergeState.open(args.state_dir)
    if args.lora_rank is not None:
        energy = state.export_lora(
            args.out_dir, args.lora_rank, args.lora_full_tensors, args.overwrite, not args.quiet
        )
        print(lora_summary(state, Path(args.out_dir), args.lora_rank, energy))
        return
    out = state.export(
        args.out_dir, args.dtype, args.max_shard_size, args.overwrite, progress=not args.quiet, backend=_backend(args)
    )
    print(f"exported the merged model after step {state.step} to {out}")


def cmd_run(args: argparse.Namespace) -> None:
    path = Path(args.config)
    try:
        raw = yaml.safe_load(path.read_text())
        cfg = RunConfig.model_validate(raw)
    except OSError as e:
        raise FoldinError(f"cannot read {path}: {e.strerror}.") from e
    except yaml.YAMLError as e:
        raise FoldinError(f"{path} is not valid YAML: {e}.") from e
    except ValidationError as e:
        raise FoldinError(f"{path}: " + validation_message(e, "config")) from e
    here = path.resolve().parent

    def resolve(p: str) -> Path:
        return (here / p).resolve()

    def model(p: str) -> str:
        """A path relative to the file, or else a Hub id as written."""
        return str(resolve(p)) if (here / p).exists() or not HUB_ID.fullmatch(p) else p

    output = resolve(cfg.output)
    state_dir = resolve(cfg.state) if cfg.state else output.with_name(output.name + ".foldin-state")
    state = ensure_state(state_dir, model(cfg.base), cfg.method, cfg.params, cfg.linear_weights)
    checkpoints = [m for c in cfg.checkpoints for m in (expand(here, c) if GLOB.search(c) else [model(c)])]
    if not checkpoints:
        raise FoldinError(f"{path}: its checkpoints match nothing yet.")
    done = state.history
    if not all(same_model(entry, wanted) for entry, wanted in zip(done, checkpoints)) or len(done) > len(checkpoints):
        raise StateError(
            f"{state_dir} already holds a different sequence of checkpoints than {path} lists; use another "
            f"state directory."
        )
    print(f"resuming the state in {state_dir} at step {len(done)}" if done else f"keeping the state in {state_dir}")
    backend = _backend(args)
    todo = checkpoints[len(done) :]
    step = {"device": args.device, "workers": args.workers}
    for ckpt in todo[:-1]:
        entry = state.add(ckpt, progress=not args.quiet, backend=backend, **step)
        print(f"step {entry['step']}: folded in {ckpt} in {entry['seconds']:.1f}s{widened(entry)}")
    export = (cfg.dtype, cfg.max_shard_size, True, not args.quiet, backend)  # overwrite: run owns its output
    if todo and cfg.lora_rank is None:  # the last step writes the export in the same pass where the method allows it
        entry, _ = state.add_and_export(todo[-1], output, *export, **step)
        print(f"step {entry['step']}: folded in {todo[-1]} in {entry['seconds']:.1f}s{widened(entry)}")
    elif todo:
        entry = state.add(todo[-1], progress=not args.quiet, backend=backend, **step)
        print(f"step {entry['step']}: folded in {todo[-1]} in {entry['seconds']:.1f}s{widened(entry)}")
    if cfg.lora_rank is not None:
        energy = state.export_lora(output, cfg.lora_rank, cfg.lora_full_tensors, True, not args.quiet)
        print(f"{lora_summary(state, output, cfg.lora_rank, energy)} (state kept in {state_dir})")
        return
    if not todo:
        state.export(output, *export)
    print(f"exported the merged model after step {state.step} to {output} (state kept in {state_dir})")


def lora_summary(state: MergeState, out: Path, rank: int, energy: dict[str, float]) -> str:
    """What a LoRA export kept and costs: the energy share of each weight change, and the adapter's
    size beside the full model's."""
    worst = min(energy, key=energy.get)
    size = (out / "adapter_model.safetensors").stat().st_size
    with open_checkpoint(state.meta["base"]["path"]) as base:
        full = sum(math.prod(shape) * dtype.itemsize for dtype, shape in map(base.spec, base.names()))
    return (
        f"exported the merged model after step {state.step} as a rank-{rank} LoRA adapter to {out}: "
        f"{size / 1e6:.1f} MB ({size / full:.1%} of the full model's {full / 1e6:.1f} MB), {len(energy)} weights, "
        f"energy kept mean {sum(energy.values()) / len(energy):.1%}, least {energy[worst]:.1%} ({worst}); "
        "per weight in lora-energy.json"
    )


def widened(entry: dict[str, Any]) -> str:
    """', its float16 tensors widened' where the checkpoint's precision was lower than the base's."""
    return f", its {' and '.join(entry['widened_from'])} tensors widened" if entry.get("widened_from") else ""


GLOB = re.compile(r"[*?\[]")


def expand(here: Path, pattern: str) -> list[str]:
    """The paths a glob pattern (relative to the run file) matches, in name order: name arrivals so
    that they sort in arrival order (a date prefix), and a later run folds in only the new ones."""
    return [str(p.resolve()) for p in sorted(here.glob(pattern))]


def same_model(entry: dict[str, Any], wanted: str) -> bool:
    """Whether a history entry folded in the model `wanted` names (a path, org/name or org/name@rev)."""
    source = entry.get("source")
    if source is None:
        return Path(entry["checkpoint"]) == Path(wanted)
    return source == wanted or source.partition("@")[0] == wanted


def cmd_verify(args: argparse.Namespace) -> None:
    state = MergeState.open(args.state_dir)
    checked = state.verify()
    print(f"{args.state_dir}: step {state.step}, {checked / 2**20:.1f} MiB checked, every checksum matches")


def cmd_info(args: argparse.Namespace) -> None:
    info = MergeState.open(args.state_dir).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items()) or "-"
    print(f"state:   {info['state_dir']}\nmethod:  {info['method']} ({params})\nstep:    {info['step']}")
    base_hash = info["base"]["hash"] or "content hash taken by the first step"
    print(f"base:    {info['base']['path']}\n         {base_hash}")
    print(f"linear:  {info['linear_weights']} weights ({info['linear_weights_source']})")
    for e in info["history"]:
        print(f"  {e['step']:>4}  {e['added_at']}  {e['hash'][:19]}  {e['checkpoint']}")


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "|".join(map(str, get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


def cmd_methods(args: argparse.Namespace) -> None:
    listing = {
        name: {
            "summary": cls.summary,
            "params": {
                p: {"type": _type_name(f.annotation), "default": f.default, "description": f.description}
                for p, f in cls.Params.model_fields.items()
            },
        }
        for name, cls in available_methods().items()
    }
    if args.json:
        print(json.dumps(listing, indent=2))
        return
    for name, m in listing.items():
        print(f"{name}: {m['summary']}")
        for p, f in m["params"].items():
            print(f"    {p} = {f['default']!r}  ({f['type']})  {f['description'] or ''}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a merge state for a base model and a method")
    p.add_argument("state_dir")
    p.add_argument("--base", required=True, help="the pretrained model: HF folder, .safetensors, .bin or .pt")
    p.add_argument("--method", required=True, choices=list(available_methods()))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method parameter (repeatable)")
    p.add_argument(
        "--linear-weights",
        metavar="REGEX",
        help="tensors OPCM treats as linear-layer weights (full match); default: the model's nn.Linear modules "
        "from config.json, else a name rule",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("add", help="fold checkpoints in, in the order given")
    p.add_argument("state_dir")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="SUITE:TASK",
        help="data-driven methods (otmf, adamerging): the checkpoint's task, e.g. text:reuters_r8 or "
        "vision:my_task.yaml; one per checkpoint",
    )
    _add_step_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_backend_options(p)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("export", help="write the merged model as a Hugging Face folder")
    p.add_argument("state_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the base's dtypes")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is an earlier foldin export")
    p.add_argument(
        "--lora-rank",
        type=int,
        metavar="R",
        help="write a PEFT LoRA adapter (rank R) instead of a full model: each linear weight's change "
        "by its best rank-R approximation",
    )
    p.add_argument(
        "--lora-full-tensors",
        action="store_true",
        help="with --lora-rank: store changed biases, norms and embeddings whole (PEFT's modules_to_save)",
    )
    p.add_argument("--quiet", action="store_true")
    _add_backend_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="init/resume, add every checkpoint and export, from a YAML file")
    p.add_argument("config")
    _add_step_options(p)
    p.add_argument("--quiet", action="store_true")
    _add_backend_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("info", help="method, parameters, step and history of a state")
    p.add_argument("state_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify", help="read the whole state and check it against the checksums recorded at each commit"
    )
    p.add_argument("state_dir")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("methods", help="registered methods and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)
