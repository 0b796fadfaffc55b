"""OPCM speed and memory, foldin against FusionBench 0.2.33, same inputs, same machine, alternating.

    python benchmarks/perf/opcm_vs_fusionbench.py                       # ViT-B/32 shape and MiniLM-L6
    python benchmarks/perf/opcm_vs_fusionbench.py --cases clip-vit-b32 --repeats 3

Each case is a base and 3 fine-tuned-like checkpoints saved as Hugging Face folders (the parity
cases: low-rank plus noise task vectors). One FusionBench run is one process (its own venv,
benchmarks/parity/setup_fusionbench.sh) that loads the models from disk and runs OPCM over the 3
checkpoints, loading each model from disk when it asks for it (model configs, as its YAML
configs give them); one foldin run is `foldin init` and three `foldin add` processes. Reported per side:
seconds in the merge itself (FusionBench: `OPCM.run`; foldin: each `add`'s own step time), wall
seconds of the processes, and peak RSS as `/usr/bin/time -v` reports it (FusionBench: its one
process; foldin: the largest of its processes). Both sides run in turn, `--repeats` times; the
table shows medians, the ratios and the parity of the final weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
PARITY = HERE.parent / "parity"
sys.path.insert(0, str(PARITY))
sys.path.insert(0, str(HERE.parent))
from timing import timed  # noqa: E402

from cases import make_case  # noqa: E402
from check_parity import fusionbench_python, relative_errors  # noqa: E402


def run_fusionbench(case: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    wall, rss, _ = timed(
        [
            str(fusionbench_python()),
            str(PARITY / "fusionbench_side.py"),
            str(case),
            str(out),
            "--methods",
            "opcm",
            "--lazy",
        ]
    )
    return {"merge_s": json.loads((out / "timings.json").read_text())["opcm"], "wall_s": wall, "peak_rss_mb": rss}


def run_foldin(case: Path, work: Path, workers: int = 1, init_args: list[str] | None = None) -> dict[str, float]:
    """`foldin init` (with `init_args`) and one `foldin add` process per ckpt_* folder of `case`, then export."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    foldin = [sys.executable, "-m", "foldin.cli"]
    walls, rsses = [], []
    for cmd in (
        [*foldin, "init", str(work / "state"), "--base", str(case / "base"), "--method", "opcm", *(init_args or [])],
        *(
            [*foldin, "add", str(work / "state"), str(c), "--quiet", "--workers", str(workers)]
            for c in sorted(case.glob("ckpt_*"), key=lambda p: int(p.name.split("_")[1]))
        ),
    ):
        wall, rss, _ = timed(cmd)
        walls.append(wall)
        rsses.append(rss)
    history = json.loads((work / "state" / "state.json").read_text())["history"]
    subprocess.run(
        [*foldin, "export", str(work / "state"), str(work / "out"), "--quiet"], check=True, capture_output=True
    )
    return {
        "merge_s": sum(e["seconds"] for e in history),
        "wall_s": sum(walls),
        "peak_rss_mb": max(rsses),
        "step_s": [e["seconds"] for e in history],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="clip-vit-b32,minilm-l6")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="foldin add --workers")
    ap.add_argument("--work", type=Path, default=HERE.parent / "_work" / "perf")
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "perf" / "opcm_vs_fusionbench.json")
    a = ap.parse_args()
    results = {
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "repeats": a.repeats,
        "foldin_workers": a.workers,
        "cases": {},
    }
    for kind in a.cases.split(","):
        case = a.work / kind
        if not (case / "ckpt_3").exists():
            shutil.rmtree(case, ignore_errors=True)
            make_case(kind, case, n_checkpoints=3)
        runs: dict[str, list[dict[str, float]]] = {"fusionbench": [], "foldin": []}
        for r in range(a.repeats):  # alternate, so that drifts in machine load hit both sides
            runs["fusionbench"].append(run_fusionbench(case, a.work / f"{kind}-fb"))
            runs["foldin"].append(run_foldin(case, a.work / f"{kind}-foldin", a.workers))
            print(
                f"  {kind} repeat {r + 1}: fusionbench {runs['fusionbench'][-1]['merge_s']:.1f} s, "
                f"foldin {runs['foldin'][-1]['merge_s']:.1f} s",
                file=sys.stderr,
            )
        errs = relative_errors(
            load_file(a.work / f"{kind}-foldin" / "out" / "model.safetensors"),
            load_file(a.work / f"{kind}-fb" / "opcm.safetensors"),
        )
        med = {
            side: {k: statistics.median(r[k] for r in rs) for k in ("merge_s", "wall_s", "peak_rss_mb")}
            for side, rs in runs.items()
        }
        results["cases"][kind] = {
            "median": med,
            "runs": runs,
            "max_rel_err": max(errs.values()),
            "worst_tensor": max(errs, key=errs.get),
        }
    print(
        f"\nOPCM (alpha 0.5) over 3 checkpoints, medians of {a.repeats} alternating runs; ratio = FusionBench / "
        f"foldin\n"
    )
    print(f"{'case':<14}{'side':<13}{'merge s':>9}{'per step':>10}{'wall s':>9}{'peak RSS MiB':>14}")
    for kind, c in results["cases"].items():
        for side in ("fusionbench", "foldin"):
            m = c["median"][side]
            print(
                f"{kind:<14}{side:<13}{m['merge_s']:>9.1f}{m['merge_s'] / 3:>10.2f}"
                f"{m['wall_s']:>9.1f}{m['peak_rss_mb']:>14.0f}"
            )
        fb, us = c["median"]["fusionbench"], c["median"]["foldin"]
        print(
            f"{kind:<14}{'ratio':<13}{fb['merge_s'] / us['merge_s']:>8.1f}x{'':>10}"
            f"{fb['wall_s'] / us['wall_s']:>8.1f}x"
            f"{us['peak_rss_mb'] / fb['peak_rss_mb']:>13.2f}x   (RSS: foldin / FusionBench)"
        )
        print(f"{kind:<14}parity: max relative error {c['max_rel_err']:.1e} ({c['worst_tensor']})\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
