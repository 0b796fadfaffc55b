"""I/O errors at every write and every fsync of foldin's writing commands, one at a time, checked.

    python benchmarks/crash/check_faults.py                    # long form: every scenario, EIO and ENOSPC
    python benchmarks/crash/check_faults.py --scenarios add --errors EIO   # a short form

`faultinject.c`, built here with the system's C compiler and preloaded into this process
(LD_PRELOAD; the script re-executes itself with it), counts every write-family and fsync-family
call on a file under the scenario's work folder, across threads and whatever library makes it
(Python, safetensors' Rust writer), and fails exactly one of them with the chosen errno. For each
scenario of `check_crashes`, an uninterrupted run counts the calls; then, for each errno, each
family and each call index in turn, a fresh copy of the same prepared work folder (at the same
path) runs the same command with that one call failing, and:
- the command exits 1 with one sentence on stderr (no traceback), never 0: a failed write or fsync
  that were retried and then trusted (the PostgreSQL fsync lesson, 2018) would exit 0, since the
  fault fires once;
- the state (and OUT) then passes the crash-state checks of `check_crashes` (opens or refuses in
  one sentence, old or new step, `verify`, the finished merge bitwise equal to the uninterrupted
  run's, OUT the previous or the new complete export).
Writes a JSON summary per scenario with --out.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from check_crashes import check_state, file_tree  # noqa: E402
from scenarios import Scenario, finish_work, scenarios  # noqa: E402

ERRORS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}
FAMILIES = ("write", "fsync")


def build_library(folder: Path) -> Path:
    """Compile faultinject.c (cc) into `folder`; the path of the shared library."""
    library = folder / "faultinject.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(HERE / "faultinject.c"), "-ldl"], check=True
    )
    return library


def _shim() -> ctypes.CDLL:
    lib = ctypes.CDLL(None)
    if not hasattr(lib, "foldin_fault_count"):
        raise RuntimeError("faultinject.so is not preloaded (run this script directly: it preloads it)")
    lib.foldin_fault_count.restype = ctypes.c_long
    return lib


def _run(argv: list[str], work: Path, fault: tuple[str, int, int] | None) -> tuple[int, str]:
    """foldin `argv` in `work`, in this process, with `fault` = (family, index, errno) armed."""
    from foldin.cli import main

    shim = _shim()
    shim.foldin_fault_reset()
    os.environ["FOLDIN_FAULT_ROOTS"] = str(work) + "/"
    if fault:
        os.environ.update(FOLDIN_FAULT_KIND=fault[0], FOLDIN_FAULT_AT=str(fault[1]), FOLDIN_FAULT_ERRNO=str(fault[2]))
    err, cwd = io.StringIO(), Path.cwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main(argv if argv[0] == "init" else [*argv, "--quiet"])  # init prints one line anyway
    finally:
        os.chdir(cwd)
        for key in ("FOLDIN_FAULT_KIND", "FOLDIN_FAULT_AT", "FOLDIN_FAULT_ERRNO", "FOLDIN_FAULT_ROOTS"):
            os.environ.pop(key, None)
    return rc, err.getvalue()


def check(sc: Scenario, root: Path, errors: list[str]) -> dict:
    started = time.perf_counter()
    # every run starts from one prepared copy at one path: the paths and times a state records match
    template, reference = root / "template", root / "work"
    template.mkdir(parents=True)
    sc.prepare(template)
    shutil.copytree(template, reference)
    previous = file_tree(reference / sc.out) if sc.out and (reference / sc.out).exists() else None
    shim = _shim()
    rc, err = _run(sc.argv, reference, None)
    if rc != 0:
        raise RuntimeError(f"{sc.name}: the uninterrupted command failed: {err}")
    calls = {family: int(shim.foldin_fault_count(i)) for i, family in enumerate(FAMILIES)}
    new_export = file_tree(reference / sc.out) if sc.out and (reference / sc.out).exists() else None
    expected = finish_work(reference / sc.state, reference, sc.case)
    failures: list[str] = []
    outcomes: dict[str, int] = {}
    memo: dict[str, bool] = {}
    for name in errors:
        for family in FAMILIES:
            for index in range(1, calls[family] + 1):
                work = reference
                shutil.rmtree(work)
                shutil.copytree(template, work)
                rc, err = _run(sc.argv, work, (family, index, ERRORS[name]))
                what = f"{sc.name}: {name} at {family} {index}"
                lines = err.strip().splitlines()
                if rc != 1 or len(lines) != 1 or not lines[0].startswith("foldin: error:"):
                    failures.append(f"{what}: exit {rc}, stderr {err.strip()[-300:]!r}")
                    continue
                try:
                    verdict = check_state(sc, work, expected, previous, new_export, memo, done=False)
                except Exception as e:  # noqa: BLE001 - anything but a clean verdict is a failure to report
                    verdict = f"{type(e).__name__}: {e}"
                if verdict is None or verdict.startswith("step ") or verdict == "refused":
                    outcomes[verdict or f"step {sc.steps[-1]}"] = (
                        outcomes.get(verdict or f"step {sc.steps[-1]}", 0) + 1
                    )
                else:
                    failures.append(f"{what}: {verdict}")
    return {
        "scenario": sc.name,
        "command": "foldin " + " ".join(sc.argv),
        "writes": calls["write"],
        "fsyncs": calls["fsync"],
        "errors": errors,
        "faults": len(errors) * (calls["write"] + calls["fsync"]),
        "after the fault": outcomes,
        "lost": len(failures),
        "failures": failures[:20],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(scenarios()))
    ap.add_argument("--errors", default="EIO,ENOSPC")
    ap.add_argument("--out", help="a folder for one JSON summary per scenario")
    args = ap.parse_args()
    if "faultinject.so" not in os.environ.get("LD_PRELOAD", ""):
        folder = Path(tempfile.mkdtemp(prefix="foldin-faults-"))
        env = {**os.environ, "LD_PRELOAD": str(build_library(folder))}
        try:
            return subprocess.run([sys.executable, *sys.argv], env=env).returncode
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    lost = 0
    for name in args.scenarios.split(","):
        with tempfile.TemporaryDirectory(prefix=f"foldin-faults-{name}-") as tmp:
            result = check(scenarios()[name], Path(tmp), args.errors.split(","))
        lost += result["lost"]
        print(json.dumps(result, indent=2), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
