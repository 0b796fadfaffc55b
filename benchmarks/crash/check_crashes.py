"""Every crash state a power loss allows during foldin's writing commands, checked.

    python benchmarks/crash/check_crashes.py                       # long form: all scenarios, sampled reorderings
    python benchmarks/crash/check_crashes.py --scenarios add,export --samples 0   # the short form CI runs

Each scenario prepares a work folder from the tiny BERT parity case (base and three checkpoints),
runs one real `foldin` command under strace (`crashsim.record`), and checks every crash state
(`crashsim.crash_states`), rebuilt in the folder where the command ran (once the uninterrupted run's
results are in memory), so that the absolute paths a state records still hold:
- the state opens, or refuses in one `FoldinError` sentence (never another exception);
- it is at the old step or the new one (any step the command passed through, for `run`), and
  `verify` passes;
- the next command ends bitwise equal to an uninterrupted run: `add` of what is left, then the
  merged model compared with the reference run's;
- an export folder at OUT is absent (a first export), the previous complete export or the new one,
  file for file; both reference folders load in `transformers`;
- the traced command changed nothing under the work folder outside the state and OUT.
States whose committed content (state.json and the generation it names) is the same share the
result of the "next command" check, which is the slow one; so do the states of `init` or `run` that
leave no state to open, when their files are the same.
Writes a JSON summary per scenario with --out.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from foldin import MergeState
from foldin.errors import FoldinError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from crashsim import crash_states, materialize  # noqa: E402
from scenarios import Scenario, finish_work, init_state, scenarios  # noqa: E402
from tracing import Trace, record  # noqa: E402

FOLDIN = [sys.executable, "-m", "foldin.cli"]


def within(path: str, folder: Path) -> bool:
    """Whether `path` is `folder`, inside it, or one of foldin's temporary siblings of it."""
    name = Path(path).relative_to(folder.parent).parts[0] if path.startswith(str(folder.parent) + "/") else ""
    return path == str(folder) or path.startswith(f"{folder}/") or name.startswith(f".{folder.name}.")


def file_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _committed_key(state_dir: Path) -> str:
    """A digest of what a state has committed: state.json and the files of the generation it names."""
    h = hashlib.sha256((state_dir / "state.json").read_bytes())
    gen = json.loads((state_dir / "state.json").read_text()).get("generation")
    if gen:
        for name, data in sorted(file_tree(state_dir / gen).items()):
            h.update(name.encode() + data)
    return h.hexdigest()


def _tree_key(folder: Path) -> str:
    """A digest of everything under `folder`, folders included: a command rerun on the same files
    ends the same way, so crash states that leave the same files share one rerun."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        data = path.read_bytes() if path.is_file() else b""
        h.update(f"{path.relative_to(folder)}\0{path.is_dir()}\0{len(data)}\0".encode() + data)
    return "tree " + h.hexdigest()


def _reference(sc: Scenario, root: Path) -> tuple[dict[str, torch.Tensor], Trace, Path, dict[str, bytes] | None]:
    """The uninterrupted run: its trace, its finished model, the work folder, the previous export."""
    work = root / "reference"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sc.prepare(work)
    previous = file_tree(work / sc.out) if sc.out and (work / sc.out).exists() else None
    trace = record([*FOLDIN, *sc.argv], [work], cwd=work)
    return finish_work(work / sc.state, work, sc.case), trace, work, previous


def check(sc: Scenario, root: Path, samples: int, seed: int, single_drops: bool = True) -> dict:
    started = time.perf_counter()
    expected, trace, work, previous = _reference(sc, root)
    new_export = file_tree(work / sc.out) if sc.out and (work / sc.out).exists() else None
    if sc.out:
        from transformers import AutoConfig

        if "--lora-rank" not in sc.argv:
            from transformers import AutoModel

            AutoModel.from_pretrained(work / sc.out)  # the complete exports load
        else:
            AutoConfig.from_pretrained(work / "case" / "base")
    allowed = (work / sc.state, work / (sc.out or sc.state))
    touched = sorted(
        {o.path for o in trace.ops if o.kind != "fsync" and not any(within(o.path, a) for a in allowed)} - {str(work)}
    ) + [p for p in trace.outside if within(p, work.parent.resolve() / "zoo")]  # a shared zoo is only read
    states = crash_states(trace.ops, samples, seed, single_drops)
    scratch = work  # each crash state is rebuilt where the command ran: the state's recorded paths hold
    results: dict[str, str | None] = {}
    failures: list[str] = []
    counts = {"states": len(states), "refused": 0, **{f"step {s}": 0 for s in sc.steps}}
    for state in states:
        materialize(trace, state, scratch, work)
        what = f"{sc.name}: crash after op {state.point} ({state.label})"
        try:
            done = state.point == len(trace.ops)
            failure = check_state(sc, scratch, expected, previous, new_export, results, done)
        except Exception as e:  # noqa: BLE001 - anything but a FoldinError is a failure to report
            failure = f"{type(e).__name__}: {e}"
        if failure == "refused":
            counts["refused"] += 1
        elif failure is None or failure.startswith("step "):
            counts[failure or f"step {sc.steps[-1]}"] = counts.get(failure or f"step {sc.steps[-1]}", 0) + 1
        else:
            failures.append(f"{what}: {failure}")
    return {
        "scenario": sc.name,
        "command": "foldin " + " ".join(sc.argv),
        "operations": len(trace.ops),
        "crash_points": len(trace.ops) + 1,
        **counts,
        "lost": len(failures),
        "failures": failures[:20],
        "touched_outside": touched,
        "seconds": round(time.perf_counter() - started, 1),
    }


def check_state(
    sc: Scenario,
    work: Path,
    expected: dict[str, torch.Tensor],
    previous: dict[str, bytes] | None,
    new_export: dict[str, bytes] | None,
    memo: dict[str, str | None],
    done: bool,
) -> str | None:
    """None or 'step N' when the crash state is sound, 'refused' for a clean refusal, else what is
    wrong. `done`: the crash came after the command returned, so everything it did must be there."""
    if sc.out:
        out = work / sc.out
        found = file_tree(out) if out.exists() else None
        if found not in (previous, new_export) and not (found is None and sc.first_export):
            return f"OUT holds neither export ({sorted(found or {})})"
        if done and found != new_export:
            return "the export had returned, and OUT is not the new export"
    state_dir = work / sc.state
    try:
        state = MergeState.open(state_dir)
    except FoldinError as e:
        if "\n" in str(e):
            return f"a refusal of more than one line: {e}"
        if done:
            return f"the command had returned, and the state does not open: {e}"
        if sc.name in ("init", "run"):  # the state was being created: the same command again must work
            key = _tree_key(work)
            if key not in memo:
                memo[key] = _rerun(sc, work, expected)
            return memo[key] or "refused"
        return f"the state does not open: {e}"
    if state.step not in sc.steps or (done and state.step != sc.steps[-1]):
        return f"the state is at step {state.step}, expected {sc.steps[-1] if done else sc.steps}"
    state.verify()
    key = _committed_key(state_dir)
    if key not in memo:
        memo[key] = _rerun(sc, work, expected)
    return memo[key] or f"step {state.step}"


def _rerun(sc: Scenario, work: Path, expected: dict[str, torch.Tensor]) -> str | None:
    from foldin.cli import main

    if sc.name == "run":
        with contextlib.redirect_stdout(io.StringIO()):
            finished = main(["run", str(work / "merge.yaml"), "--quiet"]) == 0
        if not finished:
            return "foldin run did not finish after the crash"
        merged = finish_work(work / sc.state, work, sc.case)
    else:
        if sc.name == "init" and not (work / "state" / "state.json").exists():
            try:
                init_state(work, sc.method, sc.case)
            except RuntimeError:
                return "init again after the crash refuses"
        merged = finish_work(work / "state", work, sc.case)
    same = merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    return None if same else "the finished merge differs from the uninterrupted run's"


def run_checks(
    doc: str,
    names: list[str],
    check_one: Callable[[str, Path, int, int], dict],
    work: Path,
    line: Callable[[dict], str],
) -> int:
    """The command line of the crash checkers: check each scenario named by --scenarios, print a
    line per scenario and its failures, write the summaries as JSON with --out; 1 if a state was lost."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(names))
    ap.add_argument("--samples", type=int, default=20, help="random subsets with torn writes per crash point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=work)
    ap.add_argument("--out", type=Path, help="write the summary as JSON here")
    a = ap.parse_args()
    summary = [check_one(n, a.work / n, a.samples, a.seed) for n in a.scenarios.split(",")]
    for s in summary:
        print(line(s))
        for f in s["failures"]:
            print("   ", f)
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if any(s["lost"] or s["touched_outside"] for s in summary) else 0


def _line(s: dict) -> str:
    steps = "  ".join(f"{k} {v}" for k, v in s.items() if k.startswith("step "))
    return (
        f"{s['scenario']:<18}{s['operations']:>5} ops {s['states']:>6} states  {steps}  refused {s['refused']}  "
        f"lost {s['lost']}  {s['seconds']:>6.1f} s"
    )


def main() -> int:
    return run_checks(
        __doc__ or "",
        list(scenarios()),
        lambda name, root, samples, seed: check(scenarios()[name], root, samples, seed),
        HERE.parent / "_work" / "crash",
        _line,
    )


if __name__ == "__main__":
    sys.exit(main())
