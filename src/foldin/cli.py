"""The `foldin` command line: init, add, export, run, info, methods."""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from foldin import __version__
from foldin.errors import FoldinError, StateError
from foldin.evaluation.suite import SUITES
from foldin.io.checkpoint import open_checkpoint
from foldin.methods import available_methods
from foldin.state import MergeState, ensure_state

if TYPE_CHECKING:
    from foldin.ray_backend import RayBackend


def parse_settings(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values are read as YAML scalars (0.5 -> float, sum -> str, true -> bool)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FoldinError(f"--set expects KEY=VALUE, got {item!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _validation_message(e: ValidationError, what: str) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "value"
    return f"invalid {what}: {where}: {first['msg']} (got {first.get('input')!r})."


class RunConfig(BaseModel):
    """The YAML file `foldin run` reads. Relative paths are relative to the file."""

    model_config = ConfigDict(extra="forbid")
    base: str
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    checkpoints: list[str]
    output: str
    state: str | None = None
    linear_weights: str | None = None
    dtype: str | None = None
    max_shard_size: str = "5GB"


def _backend(args: argparse.Namespace) -> "RayBackend | None":
    """--backend ray [--address ADDR] [--threads-per-task N]; None: in this process."""
    if args.backend == "local":
        if args.address:
            raise FoldinError("--address applies to --backend ray.")
        return None
    from foldin.ray_backend import RayBackend

    return RayBackend(args.address, threads=args.threads_per_task)


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="ray: run the work as Ray tasks that read and write the files themselves (pip install 'foldin[ray]'; paths must be on storage every node sees)")
    p.add_argument("--address", help="the Ray cluster to use (e.g. auto or HOST:6379); default: RAY_ADDRESS, else a new local one")
    p.add_argument("--threads-per-task", type=int, default=1,
                   help="torch threads per Ray task; the bits equal a local run with as many threads (OMP_NUM_THREADS)")


def cmd_init(args: argparse.Namespace) -> None:
    state = MergeState.create(args.state_dir, args.base, args.method, parse_settings(args.set), args.linear_weights)
    print(f"created {args.method} state in {state.dir} (base {state.meta['base']['hash'][:19]}, "
          f"{len(state.meta['linear_weights'])} linear-layer weights from {state.meta['linear_weights_source']})")


def cmd_add(args: argparse.Namespace) -> None:
    state = MergeState.open(args.state_dir)
    if args.task and len(args.task) != len(args.checkpoints):
        raise FoldinError(f"give one --task per checkpoint ({len(args.checkpoints)} checkpoints, {len(args.task)} --task).")
    for i, ckpt in enumerate(args.checkpoints):
        learning = None
        if args.task:
            from foldin.evaluation.suite import learning_for_task

            learning = learning_for_task(args.task[i], state.base_path, Path(ckpt))
        entry = state.add(ckpt, progress=not args.quiet, learning=learning, device=args.device, workers=args.workers,
                          backend=_backend(args))
        print(f"step {entry['step']}: folded in {ckpt} ({entry['hash'][:19]}) in {entry['seconds']:.1f}s")


def cmd_export(args: argparse.Namespace) -> None:
    state = MergeState.open(args.state_dir)
    out = state.export(args.out_dir, args.dtype, args.max_shard_size, args.overwrite, progress=not args.quiet, backend=_backend(args))
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
        raise FoldinError(f"{path}: " + _validation_message(e, "config")) from e
    here = path.resolve().parent

    def resolve(p: str) -> Path:
        return (here / p).resolve()

    output = resolve(cfg.output)
    state_dir = resolve(cfg.state) if cfg.state else output.with_name(output.name + ".foldin-state")
    state = ensure_state(state_dir, str(resolve(cfg.base)), cfg.method, cfg.params, cfg.linear_weights)
    checkpoints = [resolve(c) for c in cfg.checkpoints]
    done = [Path(e["checkpoint"]) for e in state.history]
    if done != checkpoints[: len(done)]:
        raise StateError(f"{state_dir} already holds a different sequence of checkpoints than {path} lists; use another state directory.")
    if done:
        print(f"resuming {state_dir} at step {len(done)}")
    backend = _backend(args)
    for ckpt in checkpoints[len(done):]:
        entry = state.add(ckpt, progress=not args.quiet, backend=backend)
        print(f"step {entry['step']}: folded in {ckpt} in {entry['seconds']:.1f}s")
    state.export(output, cfg.dtype, cfg.max_shard_size, overwrite=True, progress=not args.quiet, backend=backend)
    print(f"exported the merged model after step {state.step} to {output} (state kept in {state_dir})")


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
    print(f"base:    {info['base']['path']}\n         {info['base']['hash']}")
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


def builtin_selection(args: argparse.Namespace, suite: str) -> list[str] | None:
    """Which built-in tasks `zoo build` builds: the first N with --tasks N; none when only --task
    files are given (without --suite); all otherwise (None)."""
    from foldin.evaluation.suite import get_suite

    if args.tasks is not None:
        if args.tasks < 1:
            raise FoldinError(f"--tasks must be at least 1, not {args.tasks}.")
        return get_suite(suite, heads="probe").builtin_task_names()[: args.tasks]
    if getattr(args, "task", None) and args.suite is None:
        return []
    return None


def cmd_zoo_build(args: argparse.Namespace) -> None:
    from foldin.evaluation.zoo import build_zoo

    suite = args.suite or "text"
    zoo = build_zoo(args.out or f"zoo/{suite}", suite, builtin_selection(args, suite), args.task, progress=not args.quiet,
                    steps=args.steps, lr=args.lr, seed=args.seed, max_train=args.max_train, max_test=args.max_test, heads=args.heads)
    print(f"{'task':<22}{'classes':>8}{'pretrained':>12}{'fine-tuned':>12}{'lift':>8}")
    for name, t in zoo.meta["tasks"].items():
        print(f"{name:<22}{len(t['labels']):>8}{100 * t['pretrained_acc']:>12.1f}{100 * t['finetuned_acc']:>12.1f}"
              f"{100 * (t['finetuned_acc'] - t['pretrained_acc']):>+8.1f}")
    print(f"zoo in {zoo.dir}")


def cmd_eval(args: argparse.Namespace) -> None:
    from foldin.evaluation.bench import Scorer
    from foldin.evaluation.zoo import Zoo

    zoo = Zoo.open(args.zoo or f"zoo/{args.suite}")
    names = args.tasks.split(",") if args.tasks else zoo.task_names
    scorer = Scorer(zoo, names)
    target = Path(args.model)
    if (target / "state.json").exists():
        state = MergeState.open(target)
        scorer.load(state.merged_state_dict())
        scorer.use_heads(state.heads())  # heads refit by OTMF, where it refit them
    else:
        with open_checkpoint(target) as ckpt:
            scorer.load({n: ckpt.read(n) for n in ckpt.names()})
    rows = {n: (zoo.meta["tasks"][n]["pretrained_acc"], scorer.score(n), zoo.meta["tasks"][n]["finetuned_acc"]) for n in names}
    print(f"{'task':<24}{'pretrained':>11}{'this model':>11}{'fine-tuned':>11}")
    for n, accs in {**rows, "mean": tuple(sum(col) / len(col) for col in zip(*rows.values()))}.items():
        print(f"{n:<24}" + "".join(f"{100 * a:>11.1f}" for a in accs))


def cmd_bench(args: argparse.Namespace) -> None:
    from foldin.evaluation.bench import parse_method_specs, run_bench
    from foldin.evaluation.zoo import Zoo, build_zoo

    specs = parse_method_specs(args.methods)
    zoo_dir = Path(args.zoo or f"zoo/{args.suite}")
    if (zoo_dir / "zoo.json").exists():  # built tasks are kept; missing ones of the first --tasks are built alike
        zoo = Zoo.open(zoo_dir)
        if args.tasks and len(zoo.task_names) < args.tasks:
            zoo = build_zoo(zoo_dir, zoo.meta["suite"], builtin_selection(args, zoo.meta["suite"]), progress=not args.quiet,
                            **zoo.settings)
    else:
        zoo = build_zoo(zoo_dir, args.suite, builtin_selection(args, args.suite), progress=not args.quiet)
    run_bench(zoo, specs, args.orders, Path(args.out), seed=args.seed, full_matrix_orders=args.full_matrix_orders,
              cft_orders=args.cft_orders, tasks=zoo.task_names[: args.tasks] if args.tasks else None, max_test=args.max_test, progress=not args.quiet,
              command="foldin " + " ".join(sys.argv[1:]), extend=args.extend)
    print((Path(args.out) / "report.md").read_text().split("## Table 3")[0])
    print(f"results, report and plots in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldin", description="Continual model merging: fold fine-tuned checkpoints into one model as they arrive.")
    parser.add_argument("--version", action="version", version=f"foldin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a merge state for a base model and a method")
    p.add_argument("state_dir")
    p.add_argument("--base", required=True, help="the pretrained model: HF folder, .safetensors, .bin or .pt")
    p.add_argument("--method", required=True, choices=list(available_methods()))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method parameter (repeatable)")
    p.add_argument("--linear-weights", metavar="REGEX", help="tensors OPCM treats as linear-layer weights (full match); default: the model's nn.Linear modules from config.json, else a name rule")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("add", help="fold checkpoints in, in the order given")
    p.add_argument("state_dir")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--task", action="append", default=[], metavar="SUITE:TASK",
                   help="data-driven methods (otmf, adamerging): the checkpoint's task, e.g. text:reuters_r8 or vision:my_task.yaml; one per checkpoint")
    p.add_argument("--workers", type=int, default=1,
                   help="tensors processed at once on threads, sharing torch's threads (same bits as one worker with that share)")
    p.add_argument("--device", help="where the arithmetic runs, e.g. cuda or cuda:1 (default: cpu); results are identical up to float rounding")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_backend_options(p)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("export", help="write the merged model as a Hugging Face folder")
    p.add_argument("state_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the base's dtypes")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true")
    _add_backend_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="init/resume, add every checkpoint and export, from a YAML file")
    p.add_argument("config")
    p.add_argument("--quiet", action="store_true")
    _add_backend_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("info", help="method, parameters, step and history of a state")
    p.add_argument("state_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="read the whole state and check it against the checksums recorded at each commit")
    p.add_argument("state_dir")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("methods", help="registered methods and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("zoo", help="task checkpoints for evaluation").add_subparsers(dest="zoo_command", required=True)
    p = p.add_parser("build", help="fine-tune the suite's backbone on each task (resumable)")
    p.add_argument("--suite", choices=SUITES, help="the built-in suite (default: text); with --task, also build its tasks")
    p.add_argument("--tasks", type=int, help="build only the first N built-in tasks")
    p.add_argument("--task", action="append", default=[], metavar="TASK.yaml",
                   help="a task of your own (repeatable); alone, only these are built (see docs/benchmarks.md)")
    p.add_argument("--heads", choices=["zeroshot", "probe"],
                   help="frozen task heads: class-description embeddings (text default) or linear probes (vision default)")
    p.add_argument("--out", help="default: zoo/SUITE")
    p.add_argument("--steps", type=int, help="fine-tuning steps per task (default: text 200 at batch 16, vision 400 at batch 32)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: 1e-4)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-train", type=int, help="training examples per task (default: text 2000, vision 3000)")
    p.add_argument("--max-test", type=int, help="test examples per task (default: text 500, vision 1000)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_zoo_build)

    p = sub.add_parser("eval", help="accuracy of a merged model (folder or state) on each task, with the tasks' heads")
    p.add_argument("model", help="a checkpoint (Hugging Face folder, .safetensors, .bin, ...) or a foldin state directory")
    p.add_argument("--suite", default="text", choices=SUITES)
    p.add_argument("--zoo", help="default: zoo/SUITE")
    p.add_argument("--tasks", help="comma-separated task names (default: all in the zoo)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="every method over the same random task orders, with references, report and plots")
    p.add_argument("--suite", default="text", choices=SUITES)
    p.add_argument("--zoo", help="default: zoo/SUITE (built if missing)")
    p.add_argument("--tasks", type=int, help="use only the first N tasks (builds them if needed)")
    p.add_argument("--methods", default="average,task_arithmetic,ties,opcm", help="name or name:key=value[:key=value], comma-separated")
    p.add_argument("--orders", type=int, default=10)
    p.add_argument("--full-matrix-orders", type=int, default=3, help="orders evaluated in full (the rest: diagonal + final row)")
    p.add_argument("--cft-orders", type=int, default=1, help="orders for the continual fine-tuning reference")
    p.add_argument("--max-test", type=int, help="score on the first N test examples of each task (default: all the zoo kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--extend", action="store_true", help="add these methods to the results already in --out (same zoo, seed and test sets)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
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
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FoldinError as e:
        print(f"foldin: error: {e}", file=sys.stderr)
        return 1
    except ValidationError as e:
        print(f"foldin: error: {_validation_message(e, 'method parameter')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("foldin: interrupted; the state is unchanged since its last completed step.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
