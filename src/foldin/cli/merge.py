"""The merging commands: init, add, export, verify, info, methods (and run, from run.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from foldin.cli import run
from foldin.cli.common import add_backend_options, add_step_options, lora_summary, options_from, widened
from foldin.errors import FoldinError
from foldin.methods import available_methods
from foldin.state import MergeState


def parse_settings(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values are read as YAML scalars (0.5 -> float, sum -> str, true -> bool)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FoldinError(f"--set expects KEY=VALUE, got {item!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out


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
    state, options = MergeState.open(args.state_dir), options_from(args)
    if args.task and len(args.task) != len(args.checkpoints):
        raise FoldinError(
            f"give one --task per checkpoint ({len(args.checkpoints)} checkpoints, {len(args.task)} --task)."
        )
    for i, ckpt in enumerate(args.checkpoints):
        learning = None
        if args.task:
            from foldin.evaluation.registry import learning_for_task

            learning = learning_for_task(args.task[i], state.base_path, Path(ckpt))
        entry = state.add(ckpt, options, learning=learning)
        print(
            f"step {entry['step']}: folded in {ckpt} ({entry['hash'][:19]}) in {entry['seconds']:.1f}s{widened(entry)}"
        )


def cmd_export(args: argparse.Namespace) -> None:
    state, options = MergeState.open(args.state_dir), options_from(args)
    if args.lora_rank is not None:
        energy = state.export_lora(args.out_dir, args.lora_rank, args.lora_full_tensors, options)
        print(lora_summary(state, Path(args.out_dir), args.lora_rank, energy))
        return
    out = state.export(args.out_dir, options)
    print(f"exported the merged model after step {state.step} to {out}")


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
    listing: dict[str, dict[str, Any]] = {
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
    add_step_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backend_options(p)
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
    add_backend_options(p)
    p.set_defaults(func=cmd_export)

    run.add_command(sub)

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
