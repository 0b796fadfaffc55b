"""Peak RSS and seconds of one merge step of opcm, otmf and adamerging on a real zoo, each through
the CLI exactly as a user runs it (`foldin add STATE CKPT --task SUITE:TASK`), measured on the
second step (the first step of otmf/adamerging learns nothing), with `/usr/bin/time -v`.

    python benchmarks/learned_cost.py --zoo zoo/text --out benchmarks/results/text/cost.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed  # noqa: E402

METHODS = {"opcm": [], "otmf": ["--set", "head_refit=true"], "adamerging": []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("zoo/text"))
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "learned_cost")
    a = ap.parse_args()
    zoo = json.loads((a.zoo / "zoo.json").read_text())
    first, second = list(zoo["tasks"])[:2]
    foldin = [sys.executable, "-m", "foldin.cli"]
    rows = []
    for method, extra in METHODS.items():
        state = a.work / method
        shutil.rmtree(state, ignore_errors=True)
        subprocess.run(
            [*foldin, "init", str(state), "--base", zoo["backbone"], "--method", method, *extra],
            check=True,
            capture_output=True,
        )
        steps = []
        for task in (first, second):
            task_args = ["--task", f"{zoo['suite']}:{task}"] if method != "opcm" else []
            wall, rss, _ = timed([*foldin, "add", str(state), str(a.zoo / "tasks" / task), *task_args, "--quiet"])
            steps.append((rss, wall))
        state_mb = sum(p.stat().st_size for p in state.rglob("*") if p.is_file()) / 2**20
        rows.append(
            {
                "method": method,
                "step2_peak_rss_mb": steps[1][0],
                "step2_seconds": steps[1][1],
                "step1_seconds": steps[0][1],
                "state_mb": state_mb,
            }
        )
        print(f"  {method}: step 2 {steps[1][1]:.1f} s, {steps[1][0]:.0f} MiB", file=sys.stderr)
        shutil.rmtree(state)
    anchor = rows[0]
    print(
        f"\n{zoo['suite']} suite, backbone {zoo['backbone']}, step 2 ({second} into {first}), each a fresh "
        f"`foldin add` process\n"
    )
    print(f"{'method':<12}{'seconds':>9}{'x opcm':>8}{'peak RSS MiB':>14}{'x opcm':>8}{'state MiB':>11}")
    for r in rows:
        print(
            f"{r['method']:<12}{r['step2_seconds']:>9.1f}{r['step2_seconds'] / anchor['step2_seconds']:>8.1f}"
            f"{r['step2_peak_rss_mb']:>14.0f}{r['step2_peak_rss_mb'] / anchor['step2_peak_rss_mb']:>8.2f}"
            f"{r['state_mb']:>11.1f}"
        )
    if a.out:
        a.out.write_text(json.dumps({"zoo": str(a.zoo), "tasks": [first, second], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
