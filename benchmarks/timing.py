"""Wall time and peak RSS of one process, as `/usr/bin/time -v` reports it (shared by the benchmarks)."""

from __future__ import annotations

import re
import subprocess
import time


def timed(cmd: list[str], stdout: int = subprocess.PIPE) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of `cmd`; exits with its stderr if it fails.
    `stdout=subprocess.DEVNULL` for a command whose output is not wanted (e.g. cat of a model)."""
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=stdout, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return wall, int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024, out.stdout
