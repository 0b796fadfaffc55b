"""What each method costs on the llm suite: SmolLM2-135M-Instruct's real LoRA adapters folded in
through the CLI, then the merged model exported whole and as a rank-R adapter.

    python benchmarks/perf/llm_cost.py --zoo zoo/llm                 # 3 adapters, every weight-only method
    python benchmarks/perf/llm_cost.py --zoo zoo/llm --adapters 8 --methods opcm:diagonal=nonzero

Per method, one `foldin init` and one `foldin add` process per adapter (LoRA in: the adapter folder
as PEFT wrote it), then `foldin export` (the full model) and `foldin export --lora-rank R`, each
under `/usr/bin/time -v`. Reported: the step's own seconds (the state's history; the median over
the steps after the first, which has nothing to project or weigh against), the largest peak RSS of
the add processes, and the seconds and peak RSS of both exports. Torch's default threads unless
OMP_NUM_THREADS says otherwise; run it on an otherwise idle machine. Results are written after each
method, and a rerun with the same adapters and rank measures only the methods not yet in `--out`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from timing import timed  # noqa: E402

FOLDIN = [sys.executable, "-m", "foldin.cli"]
METHODS = "average,task_arithmetic,magmax,ties,opcm:diagonal=nonzero,dop,nufilt"


def init_command(spec: str, base: Path, state: Path) -> list[str]:
    """`foldin init` for a method spec as `foldin bench` writes it: NAME[:KEY=VALUE...]."""
    name, *params = spec.split(":")
    return [
        *FOLDIN,
        "init",
        str(state),
        "--base",
        str(base),
        "--method",
        name,
        *(a for p in params for a in ("--set", p)),
    ]


def method_cost(spec: str, base: Path, adapters: list[Path], work: Path, rank: int) -> dict:
    state = work / "state"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timed(init_command(spec, base, state))
    add_rss = [timed([*FOLDIN, "add", str(state), str(a), "--quiet"])[1] for a in adapters]
    history = json.loads((state / "state.json").read_text())["history"]
    steps = [entry["seconds"] for entry in history]
    full_s, full_rss, _ = timed([*FOLDIN, "export", str(state), str(work / "full"), "--quiet"])
    lora_s, lora_rss, _ = timed(
        [*FOLDIN, "export", str(state), str(work / "lora"), "--lora-rank", str(rank), "--quiet"]
    )
    return {
        "step_seconds": steps,
        "step_seconds_median": statistics.median(steps[1:] or steps),
        "add_peak_rss_mib": max(add_rss),
        "export_seconds": full_s,
        "export_peak_rss_mib": full_rss,
        f"export_lora_r{rank}_seconds": lora_s,
        f"export_lora_r{rank}_peak_rss_mib": lora_rss,
        "adapter_mib": sum(f.stat().st_size for f in (work / "lora").iterdir()) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("zoo/llm"))
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--work", type=Path, default=HERE.parent / "_work" / "llm_cost")
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "perf" / "llm_cost.json")
    a = ap.parse_args()
    zoo = json.loads((a.zoo / "zoo.json").read_text())
    adapters = [a.zoo / "tasks" / name for name in list(zoo["tasks"])[: a.adapters]]
    settings = {"adapters": [p.name for p in adapters], "lora_rank": a.lora_rank}
    saved = json.loads(a.out.read_text()) if a.out.exists() else {}
    # a method already measured with these adapters and rank is kept: a stopped run goes on
    rows = saved["methods"] if all(saved.get(k) == v for k, v in settings.items()) else {}
    for spec in a.methods.split(","):
        if spec in rows:
            continue
        rows[spec] = method_cost(spec, a.zoo / "base", adapters, a.work / spec.replace(":", "_"), a.lora_rank)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({**settings, "methods": rows}, indent=2) + "\n")
    r = a.lora_rank
    print(f"{len(adapters)} SmolLM2-135M LoRA adapters folded in; medians over steps 2-{len(adapters)}\n")
    print(
        f"| method | s / step | add peak RSS MiB | export s | export peak RSS MiB | rank-{r} export s "
        f"| rank-{r} peak RSS MiB | rank-{r} adapter MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for spec, c in rows.items():
        print(
            f"| `{spec}` | {c['step_seconds_median']:.2f} | {c['add_peak_rss_mib']:.0f} | {c['export_seconds']:.1f} "
            f"| {c['export_peak_rss_mib']:.0f} | {c[f'export_lora_r{r}_seconds']:.1f} "
            f"| {c[f'export_lora_r{r}_peak_rss_mib']:.0f} | {c['adapter_mib']:.1f} |"
        )


if __name__ == "__main__":
    main()
