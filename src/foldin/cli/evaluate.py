"""The evaluation commands: zoo build, eval, bench."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from foldin.errors import FoldinError
from foldin.evaluation.registry import SUITES, get_suite
from foldin.io.checkpoint import open_checkpoint
from foldin.io.lora import open_model_or_adapter
from foldin.state import MergeState


def builtin_selection(args: argparse.Namespace, suite: str) -> list[str] | None:
    """Which built-in tasks `zoo build` builds: the first N with --tasks N; none when only --task
    files are given (without --suite); all otherwise (None)."""
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
    zoo = build_zoo(
        args.out or f"zoo/{suite}",
        suite,
        builtin_selection(args, suite),
        args.task,
        progress=not args.quiet,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        max_train=args.max_train,
        max_test=args.max_test,
        heads=args.heads,
    )
    print(f"{'task':<22}{'classes':>8}{'pretrained':>12}{'fine-tuned':>12}{'lift':>8}")
    for name, t in zoo.meta["tasks"].items():
        print(
            f"{name:<22}{len(t['labels']):>8}{100 * t['pretrained_acc']:>12.1f}{100 * t['finetuned_acc']:>12.1f}"
            f"{100 * (t['finetuned_acc'] - t['pretrained_acc']):>+8.1f}"
        )
    print(f"zoo in {zoo.dir}")


def cmd_eval(args: argparse.Namespace) -> None:
    from foldin.evaluation.scoring import Scorer
    from foldin.evaluation.zoo import Zoo

    zoo = Zoo.open(args.zoo or f"zoo/{args.suite}")
    names = args.tasks.split(",") if args.tasks else zoo.task_names
    scorer = Scorer(zoo, names)
    target = Path(args.model)
    if (target / "state.json").exists():
        state = MergeState.open(target)
        scorer.load(state.merged_state_dict())
        scorer.use_heads(state.heads())  # heads refit by OTMF, where it refit them
    else:  # a model folder, or a PEFT adapter folder, applied to the zoo's base
        with open_checkpoint(zoo.backbone) as base, open_model_or_adapter(target, base) as ckpt:
            scorer.load({n: ckpt.read(n) for n in ckpt.names()})
    rows = {
        n: (zoo.meta["tasks"][n]["pretrained_acc"], scorer.score(n), zoo.meta["tasks"][n]["finetuned_acc"])
        for n in names
    }
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
            zoo = build_zoo(
                zoo_dir,
                zoo.meta["suite"],
                builtin_selection(args, zoo.meta["suite"]),
                progress=not args.quiet,
                **zoo.settings,
            )
    else:
        zoo = build_zoo(zoo_dir, args.suite, builtin_selection(args, args.suite), progress=not args.quiet)
    run_bench(
        zoo,
        specs,
        args.orders,
        Path(args.out),
        seed=args.seed,
        full_matrix_orders=args.full_matrix_orders,
        cft_orders=args.cft_orders,
        tasks=zoo.task_names[: args.tasks] if args.tasks else None,
        max_test=args.max_test,
        progress=not args.quiet,
        command=shlex.join(["foldin", *sys.argv[1:]]),  # quoted: an empty --methods "" stays visible
        extend=args.extend,
        matrix_test=args.matrix_test,
        first_order=args.first_order,
        adapter_ranks=tuple(args.adapter_ranks),
    )
    print((Path(args.out) / "report.md").read_text().split("## Table 3")[0])
    print(f"results, report and plots in {args.out}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="task checkpoints for evaluation").add_subparsers(dest="zoo_command", required=True)
    p = p.add_parser("build", help="fine-tune the suite's backbone on each task (resumable)")
    p.add_argument(
        "--suite", choices=list(SUITES), help="the built-in suite (default: text); with --task, also build its tasks"
    )
    p.add_argument("--tasks", type=int, help="build only the first N built-in tasks")
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="TASK.yaml",
        help="a task of your own (repeatable); alone, only these are built (see docs/benchmarks.md)",
    )
    p.add_argument(
        "--heads",
        choices=["zeroshot", "prototype", "probe"],
        help="frozen task heads: class-description embeddings (text default), class prototypes of the pretrained "
        "backbone (vit default) or linear probes (vision default)",
    )
    p.add_argument("--out", help="default: zoo/SUITE")
    p.add_argument(
        "--steps",
        type=int,
        help="fine-tuning steps per task (default: text 200 at batch 16, vision 400 / vit 500 at batch 32)",
    )
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: 1e-4; vit 5e-5)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-train", type=int, help="training examples per task (default: text 2000, images 3000)")
    p.add_argument("--max-test", type=int, help="test examples per task (default: text 500, images 1000)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_zoo_build)

    p = sub.add_parser("eval", help="accuracy of a merged model (folder or state) on each task, with the tasks' heads")
    p.add_argument(
        "model",
        help="a checkpoint (Hugging Face folder, .safetensors, .bin, ...), a PEFT LoRA adapter folder (applied to "
        "the zoo's base) or a foldin state directory",
    )
    p.add_argument("--suite", default="text", choices=list(SUITES))
    p.add_argument("--zoo", help="default: zoo/SUITE")
    p.add_argument("--tasks", help="comma-separated task names (default: all in the zoo)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "bench", help="every method over the same random task orders, with references, report and plots"
    )
    p.add_argument("--suite", default="text", choices=list(SUITES))
    p.add_argument("--zoo", help="default: zoo/SUITE (built if missing)")
    p.add_argument("--tasks", type=int, help="use only the first N tasks (builds them if needed)")
    p.add_argument(
        "--methods",
        default="average,task_arithmetic,ties,opcm",
        help="name or name:key=value[:key=value], comma-separated",
    )
    p.add_argument("--orders", type=int, default=10)
    p.add_argument(
        "--full-matrix-orders", type=int, default=3, help="orders evaluated in full (the rest: diagonal + final row)"
    )
    p.add_argument("--cft-orders", type=int, default=1, help="orders for the continual fine-tuning reference")
    p.add_argument(
        "--max-test", type=int, help="score on the first N test examples of each task (default: all the zoo kept)"
    )
    p.add_argument(
        "--matrix-test",
        type=int,
        help="in fully evaluated orders, score the cells ACC and BWT do not use on the first N test examples",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--first-order",
        type=int,
        default=1,
        help="run only orders N..--orders of the seeded sequence: one part of a bench split over processes "
        "(join the parts with benchmarks/combine_results.py)",
    )
    p.add_argument(
        "--adapter-ranks",
        type=lambda text: [int(r) for r in text.split(",") if r],
        default=[],
        metavar="R[,R]",
        help="also score the first order's final merge exported as a rank-R LoRA adapter (e.g. 16,64)",
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--extend",
        action="store_true",
        help="add these methods to the results already in --out (same zoo, seed and test sets)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
