"""`foldin run`: one YAML file names the base, the method, the checkpoints (globs allowed) and the
output; each run folds in what is new since the last one and exports the merged model."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from foldin.cli.common import (
    add_backend_options,
    add_step_options,
    lora_summary,
    options_from,
    validation_message,
    widened,
)
from foldin.errors import FoldinError, StateError
from foldin.io.hub import HUB_ID
from foldin.methods import get_method
from foldin.state import MergeState
from foldin.state.schema import STATE_FILE


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
    options = options_from(args, dtype=cfg.dtype, max_shard_size=cfg.max_shard_size, overwrite=True)  # run owns it
    todo = checkpoints[len(done) :]
    for ckpt in todo[:-1]:
        entry = state.add(ckpt, options)
        print(f"step {entry['step']}: folded in {ckpt} in {entry['seconds']:.1f}s{widened(entry)}")
    if todo and cfg.lora_rank is None:  # the last step writes the export in the same pass where the method allows it
        entry, _ = state.add_and_export(todo[-1], output, options)
        print(f"step {entry['step']}: folded in {todo[-1]} in {entry['seconds']:.1f}s{widened(entry)}")
    elif todo:
        entry = state.add(todo[-1], options)
        print(f"step {entry['step']}: folded in {todo[-1]} in {entry['seconds']:.1f}s{widened(entry)}")
    if cfg.lora_rank is not None:
        energy = state.export_lora(output, cfg.lora_rank, cfg.lora_full_tensors, options)
        print(f"{lora_summary(state, output, cfg.lora_rank, energy)} (state kept in {state_dir})")
        return
    if not todo:
        state.export(output, options)
    print(f"exported the merged model after step {state.step} to {output} (state kept in {state_dir})")


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


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="init/resume, add every checkpoint and export, from a YAML file")
    p.add_argument("config")
    add_step_options(p)
    p.add_argument("--quiet", action="store_true")
    add_backend_options(p)
    p.set_defaults(func=cmd_run)
