"""Every crash state a power loss allows while `zoo build` and `bench` write the files they resume
from, checked (the model and the recorder are those of `check_crashes.py`).

    python benchmarks/crash/check_resume_files.py --samples 0 --out DIR

Both commands keep their progress in files so that a stopped run goes on where it stopped: the zoo
keeps each finished task's folder (its checkpoint, head and task.json) and zoo.json; the bench keeps
bench-progress.json (the finished orders) until it writes results.json. On a real EfficientNet-Lite0
zoo of image tasks, each scenario traces one real command and checks every crash state:
- the same command run again works (no refusal, no traceback) and ends exactly where an
  uninterrupted run ends: the zoo's checkpoints
  and heads byte for byte, its task.json and zoo.json but for times; the bench's accuracies, orders
  and accuracy matrices (times and memory peaks differ from run to run);
- a crash after the command returned finds that end already there;
- the command wrote nothing in the work folder outside its output and its temporary siblings.
States that hold the same committed progress share the result of the rerun, the slow check.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from check_crashes import FOLDIN, file_tree, run_checks, within  # noqa: E402
from crashsim import crash_states, materialize  # noqa: E402
from scenarios import vision_zoo  # noqa: E402
from tracing import record  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: a rerun's fine-tuning repeats the bits
SMALL = ["--steps", "3", "--max-train", "64", "--max-test", "64", "--quiet"]


@dataclass
class ResumeScenario:
    """`prepare(work)` sets the folder up; `argv` runs in it and writes `output` (relative to it);
    `committed(output)` digests what a rerun resumes from; `result(output)` is the finished output
    without what differs between runs (times)."""

    name: str
    prepare: Callable[[Path], None]
    argv: list[str]
    output: str
    committed: Callable[[Path], str]
    result: Callable[[Path], Any]


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()


def _zoo_committed(zoo: Path) -> str:
    """zoo.json and the task folders a rerun keeps (those with a task.json)."""
    files = file_tree(zoo) if zoo.exists() else {}
    kept = {n for n in files if n.startswith("tasks/") and n.endswith("/task.json")}
    folders = tuple(n[: -len("task.json")] for n in kept)
    return _digest({n: d for n, d in files.items() if n == "zoo.json" or n.startswith(folders)})


def _without_seconds(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_seconds(v) for k, v in data.items() if k != "seconds"}
    return data


def _zoo_result(zoo: Path) -> dict[str, Any]:
    files = file_tree(zoo)
    return {n: _without_seconds(json.loads(d)) if n.endswith(".json") else d for n, d in files.items()}


def _bench_committed(out: Path) -> str:
    return _digest({n: d for n, d in (file_tree(out) if out.exists() else {}).items() if n.endswith(".json")})


def _bench_result(out: Path) -> dict[str, Any]:
    results = json.loads((out / "results.json").read_text())
    kept = ("order", "acc_matrix", "final_acc", "ACC", "BWT")
    return {
        "references": results["references"],
        "methods": {m: [{k: run[k] for k in kept} for run in e["runs"]] for m, e in results["methods"].items()},
    }


def _run(argv: list[str], work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*FOLDIN, *argv], cwd=work, env=ENV, capture_output=True, text=True)


def scenarios() -> dict[str, ResumeScenario]:
    def first_task(work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        done = _run(["zoo", "build", "--suite", "vision", "--tasks", "1", *SMALL, "--out", "zoo"], work)
        assert done.returncode == 0, done.stderr

    bench = ["bench", "--zoo", "../zoo", "--tasks", "3", "--methods", "average,opcm", "--orders", "2"]
    return {
        "zoo-build": ResumeScenario(
            "zoo-build",
            first_task,
            ["zoo", "build", "--suite", "vision", "--tasks", "2", *SMALL, "--out", "zoo"],
            "zoo",
            _zoo_committed,
            _zoo_result,
        ),
        "bench": ResumeScenario(
            "bench",
            vision_zoo,
            [*bench, "--full-matrix-orders", "1", "--cft-orders", "0", "--max-test", "32", "--out", "out", "--quiet"],
            "out",
            _bench_committed,
            _bench_result,
        ),
    }


def check(sc: ResumeScenario, root: Path, samples: int, seed: int) -> dict:
    started = time.perf_counter()
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sc.prepare(work)
    trace = record([*FOLDIN, *sc.argv], [work], cwd=work, env=ENV)
    expected = sc.result(work / sc.output)
    output = (work / sc.output).resolve()
    touched = sorted(
        {
            o.path
            for o in trace.ops
            if o.kind != "fsync" and o.path != str(work.resolve()) and not within(o.path, output)
        }
    )
    states = crash_states(trace.ops, samples, seed)
    memo: dict[str, str | None] = {}
    failures: list[str] = []
    for state in states:
        materialize(trace, state, work, work)
        what = f"{sc.name}: crash after op {state.point} ({state.label})"
        try:
            if state.point == len(trace.ops):
                same = sc.result(work / sc.output) == expected
                verdict = None if same else "the command had returned, and its end is not there"
            else:
                key = sc.committed(work / sc.output)
                if key not in memo:
                    memo[key] = _rerun(sc, work, expected)
                verdict = memo[key]
        except Exception as e:  # noqa: BLE001 - anything else is a failure to report
            verdict = f"{type(e).__name__}: {e}"
        if verdict is not None:
            failures.append(f"{what}: {verdict}")
    return {
        "scenario": sc.name,
        "command": "foldin " + " ".join(sc.argv),
        "operations": len(trace.ops),
        "crash_points": len(trace.ops) + 1,
        "states": len(states),
        "distinct_progress": len(memo),
        "lost": len(failures),
        "failures": failures[:20],
        "touched_outside": touched,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _rerun(sc: ResumeScenario, work: Path, expected: Any) -> str | None:
    """None when the same command, run again on the crash state, ends where the uninterrupted run did."""
    done = _run(sc.argv, work)
    lines = done.stderr.strip().splitlines()
    if done.returncode != 0:
        if len(lines) == 1 and lines[0].startswith("foldin: error:"):
            return f"the command again refuses: {lines[0]}"
        return f"the command again fails with exit {done.returncode}: {done.stderr.strip()[-300:]!r}"
    return None if sc.result(work / sc.output) == expected else "the command again ends elsewhere"


def _line(s: dict) -> str:
    return (
        f"{s['scenario']:<12}{s['operations']:>5} ops {s['states']:>6} states  {s['distinct_progress']} progress"
        f"  lost {s['lost']}  {s['seconds']:>6.1f} s"
    )


def main() -> int:
    return run_checks(
        __doc__ or "",
        list(scenarios()),
        lambda name, root, samples, seed: check(scenarios()[name], root, samples, seed),
        HERE.parent / "_work" / "crash-resume",
        _line,
    )


if __name__ == "__main__":
    sys.exit(main())
