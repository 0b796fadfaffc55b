"""The scenarios of the crash-state and I/O-fault checks: each prepares a work folder, names the real
`foldin` command to trace in it, and says how to finish the work after a crash, so that the result
can be compared with an uninterrupted run's.

Two cases of real inputs: the tiny BERT parity case (base and three checkpoints, copied into the
work folder), and a three-task EfficientNet-Lite0 zoo built once beside the work folder for the
data-driven path (OTMF keeps a buffer of features and refit heads in its state).
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from foldin import MergeState

CASE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity" / "bert-tiny"


@dataclass(frozen=True)
class Case:
    """A scenario's inputs: `place(work)` puts them in place; the base and checkpoints 1..3 are paths
    relative to the work folder, and each `add` of checkpoint i takes `add_args[i - 1]` besides."""

    place: Callable[[Path], None]
    base: str
    checkpoints: tuple[str, ...]
    init_args: tuple[str, ...] = ()
    add_args: tuple[tuple[str, ...], ...] = ((), (), ())

    def add_argv(self, i: int, work: Path) -> list[str]:
        return [str(work / self.checkpoints[i - 1]), *self.add_args[i - 1]]


def _copy_bert(work: Path) -> None:
    shutil.copytree(CASE, work / "case", ignore=shutil.ignore_patterns("fusionbench"))


def vision_zoo(work: Path) -> None:
    """A real EfficientNet-Lite0 zoo of three image tasks, built once beside the work folder (so crash
    states need not rebuild it) and read, never written, by the commands under test."""
    from foldin.cli import main as foldin

    zoo = work.parent / "zoo"
    if not (zoo / "zoo.json").exists():
        argv = ["zoo", "build", "--suite", "vision", "--tasks", "3", "--steps", "3", "--max-train", "64"]
        with contextlib.redirect_stdout(io.StringIO()):
            assert foldin([*argv, "--max-test", "64", "--out", str(zoo), "--quiet"]) == 0


BERT = Case(_copy_bert, "case/base", ("case/ckpt_1", "case/ckpt_2", "case/ckpt_3"))
VISION_TASKS = ("mnist", "digits", "fashion_mnist")
VISION = Case(  # OTMF with its buffer of features and refit heads: the data-driven path
    vision_zoo,
    "../zoo/base",
    tuple(f"../zoo/tasks/{t}" for t in VISION_TASKS),
    ("--set", "steps=2", "--set", "head_refit=true"),
    tuple(("--task", f"vision:{t}") for t in VISION_TASKS),
)


@dataclass
class Scenario:
    """prepare(work) sets the folder up; argv runs the traced command in it; `steps` are the state
    steps a crash may leave; the remaining checkpoints of `case` complete the work after a crash."""

    name: str
    method: str
    prepare: Callable[[Path], None]
    argv: list[str]
    steps: tuple[int, ...]
    out: str | None = None  # the export folder, if the command writes one
    first_export: bool = True  # no export at OUT before the command
    state: str = "state"  # the state folder (foldin run keeps it beside its output)
    case: Case = BERT


def _cli(argv: list[str]) -> None:
    from foldin.cli import main as foldin

    with contextlib.redirect_stdout(io.StringIO()):
        code = foldin([*argv, "--quiet"] if argv[0] == "add" else argv)
    if code != 0:
        raise RuntimeError(f"foldin {' '.join(argv)} failed")


def init_state(work: Path, method: str, case: Case) -> None:
    _cli(["init", str(work / "state"), "--base", str(work / case.base), "--method", method, *case.init_args])


def _setup(method: str, adds: int, export_after: int | None = None, case: Case = BERT) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        case.place(work)
        if adds < 0:
            return
        init_state(work, method, case)
        for i in range(1, adds + 1):
            _cli(["add", str(work / "state"), *case.add_argv(i, work)])
            if export_after == i:
                _cli(["export", str(work / "state"), str(work / "out"), "--quiet"])

    return prepare


def scenarios() -> dict[str, Scenario]:
    run_yaml = "base: case/base\nmethod: opcm\ncheckpoints: [case/ckpt_1, case/ckpt_2]\noutput: out\n"

    def prepare_run(work: Path) -> None:
        _setup("opcm", -1)(work)
        (work / "merge.yaml").write_text(run_yaml)

    return {
        "init": Scenario(
            "init", "opcm", _setup("opcm", -1), ["init", "state", "--base", "case/base", "--method", "opcm"], (0,)
        ),
        "add": Scenario(
            "add", "task_arithmetic", _setup("task_arithmetic", 1), ["add", "state", "case/ckpt_2"], (1, 2)
        ),
        "add-opcm": Scenario("add-opcm", "opcm", _setup("opcm", 1), ["add", "state", "case/ckpt_2"], (1, 2)),
        "add-otmf": Scenario(
            "add-otmf",
            "otmf",
            _setup("otmf", 1, case=VISION),
            ["add", "state", VISION.checkpoints[1], *VISION.add_args[1]],
            (1, 2),
            case=VISION,
        ),
        "add-ray": Scenario(
            "add-ray",
            "opcm",
            _setup("opcm", 1),
            ["add", "state", "case/ckpt_2", "--backend", "ray", "--threads-per-task", "1"],
            (1, 2),
        ),
        "export": Scenario("export", "opcm", _setup("opcm", 2), ["export", "state", "out"], (2,), out="out"),
        "export-overwrite": Scenario(
            "export-overwrite",
            "opcm",
            _setup("opcm", 2, export_after=1),
            ["export", "state", "out", "--overwrite"],
            (2,),
            out="out",
            first_export=False,
        ),
        "export-lora": Scenario(
            "export-lora",
            "opcm",
            _setup("opcm", 2),
            ["export", "state", "out", "--lora-rank", "4", "--lora-full-tensors"],
            (2,),
            out="out",
        ),
        "run": Scenario(
            "run", "opcm", prepare_run, ["run", "merge.yaml"], (0, 1, 2), out="out", state="out.foldin-state"
        ),
    }


def finish_work(state_dir: Path, work: Path, case: Case, total: int = 3) -> dict[str, torch.Tensor]:
    """Fold in what is left of checkpoints 1..total; the merged model and the heads a learned method keeps."""
    for i in range(MergeState.open(state_dir).step + 1, total + 1):
        _cli(["add", str(state_dir), *case.add_argv(i, work)])
    state = MergeState.open(state_dir)
    heads = {f"heads/{task}/{k}": v for task, head in state.heads().items() for k, v in head.items()}
    return {**state.merged_state_dict(), **heads}
