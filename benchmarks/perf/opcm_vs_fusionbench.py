"""OPCM speed and memory, foldin against FusionBench 0.2.33, same inputs, same machine, same
threads (the machine's default unless OMP_NUM_THREADS is set), alternating runs.

    python benchmarks/perf/opcm_vs_fusionbench.py                       # ViT-B/32 shape and MiniLM-L6
    python benchmarks/perf/opcm_vs_fusionbench.py --cases clip-vit-b32 --repeats 3 --workers 1,2

Each case is a base and 3 fine-tuned-like checkpoints saved as Hugging Face folders (the parity
cases: low-rank plus noise task vectors). One FusionBench run is one process (its own venv,
benchmarks/parity/setup_fusionbench.sh) that loads each model from disk when it asks for it (model
configs, as its YAML configs give them) and runs OPCM over the 3 checkpoints, with its whole-model
norms in float64 (its float32 norm is 1% off on ViT-B/32: parity needs it, the time does not
change). One foldin run is one `foldin run` process (init, 3 steps, export), once per `--workers`
value. Reported per side: seconds in the merge itself (FusionBench: `OPCM.run`; foldin: its steps'
own times), wall seconds, peak RSS (`/usr/bin/time -v`), and the floor: the thin SVDs of the
merged task vector's linear weights, which every OPCM step needs (one step's worth, timed at the
same threads in this process). The table shows medians and the parity of the final weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
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
    side = [str(fusionbench_python()), str(PARITY / "fusionbench_side.py"), str(case), str(out)]
    wall, rss, _ = timed([*side, "--methods", "opcm", "--lazy", "--float64-norm"])
    return {"merge_s": json.loads((out / "timings.json").read_text())["opcm"], "wall_s": wall, "peak_rss_mb": rss}


def run_foldin(case: Path, work: Path, workers: str) -> dict[str, float]:
    """One `foldin run` process: init, a step per ckpt_* folder of `case`, export; `workers` is
    --workers' value, or "default" to leave it out."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpts = sorted(case.glob("ckpt_*"), key=lambda p: int(p.name.split("_")[1]))
    (work / "merge.yaml").write_text(
        f"base: {(case / 'base').resolve()}\nmethod: opcm\ncheckpoints: {[str(c.resolve()) for c in ckpts]}\n"
        "output: out\nstate: state\n"
    )
    wall, rss, _ = timed(
        [sys.executable, "-m", "foldin.cli", "run", str(work / "merge.yaml"), "--quiet"]
        + ([] if workers == "default" else ["--workers", workers])
    )
    history = json.loads((work / "state" / "state.json").read_text())["history"]
    return {
        "merge_s": sum(e["seconds"] for e in history),
        "wall_s": wall,
        "peak_rss_mb": rss,
        "step_s": [e["seconds"] for e in history],
    }


def svd_floors(state: Path) -> dict[str, float]:
    """Seconds of the decompositions of every linear weight of the merged task vector, one step's
    worth: LAPACK's thin SVD of each matrix as it is (what a step needed before foldin's own
    decomposition), and foldin's `thin_svd` (the Gram route where certified, the tall SVD otherwise)."""
    from foldin import MergeState
    from foldin.methods.singular import thin_svd

    merged = MergeState.open(state)
    linear = set(merged.meta["linear_weights"])
    with merged.reading() as (_, vector):
        matrices = [vector.read(n).flatten(1) for n in vector.names() if n in linear]
    floors = {}
    for name, decompose in (("lapack_svd", lambda m: torch.linalg.svd(m, full_matrices=False)), ("foldin", thin_svd)):
        started = time.perf_counter()
        for m in matrices:
            decompose(m)
        floors[name] = time.perf_counter() - started
    return floors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="clip-vit-b32,minilm-l6")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--workers",
        default="default,1",
        help="foldin run --workers, comma-separated values to compare ('default': the flag left out)",
    )
    ap.add_argument("--work", type=Path, default=HERE.parent / "_work" / "perf")
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "perf" / "opcm_vs_fusionbench.json")
    a = ap.parse_args()
    results = {
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "repeats": a.repeats,
        "foldin_workers": a.workers,
        "default_threads": torch.get_num_threads(),
        "cases": {},
    }
    for kind in a.cases.split(","):
        case = a.work / kind
        if not (case / "ckpt_3").exists():
            shutil.rmtree(case, ignore_errors=True)
            make_case(kind, case, n_checkpoints=3)
        sides = ["fusionbench", *(f"foldin --workers {w}" for w in a.workers.split(","))]
        runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        for r in range(a.repeats):  # alternate, so that drifts in machine load hit every side
            runs["fusionbench"].append(run_fusionbench(case, a.work / f"{kind}-fb"))
            for side in sides[1:]:
                runs[side].append(run_foldin(case, a.work / f"{kind}-foldin", side.rpartition(" ")[2]))
            print(
                f"  {kind} repeat {r + 1}: " + ", ".join(f"{s} {runs[s][-1]['merge_s']:.1f} s" for s in sides),
                file=sys.stderr,
            )
        floor_runs = [svd_floors(a.work / f"{kind}-foldin" / "state") for _ in range(a.repeats)]
        floors = {k: statistics.median(f[k] for f in floor_runs) for k in floor_runs[0]}
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
            "svd_floor_per_step_s": floors["lapack_svd"],
            "foldin_decomposition_per_step_s": floors["foldin"],
            "max_rel_err": max(errs.values()),
            "worst_tensor": max(errs, key=errs.get),
        }
    print(
        f"\nOPCM (alpha 0.5) over 3 checkpoints, {torch.get_num_threads()} threads, medians of {a.repeats} "
        "alternating "
        "runs; per step = merge s / 3 (the first step projects nothing); floor = LAPACK's thin SVDs of one step\n"
    )
    print(
        f"{'case':<14}{'side':<22}{'merge s':>9}{'per step':>10}{'/ floor':>9}{'wall s':>9}{'peak RSS MiB':>14}"
        f"{'FB / this':>11}"
    )
    for kind, c in results["cases"].items():
        fb, floor = c["median"]["fusionbench"], c["svd_floor_per_step_s"]
        for side, m in c["median"].items():
            print(
                f"{kind:<14}{side:<22}{m['merge_s']:>9.1f}{m['merge_s'] / 3:>10.2f}{m['merge_s'] / 3 / floor:>8.1f}x"
                f"{m['wall_s']:>9.1f}{m['peak_rss_mb']:>14.0f}{fb['merge_s'] / m['merge_s']:>10.2f}x"
            )
        print(f"{kind:<14}{'SVD floor per step':<22}{'':>9}{floor:>10.2f}")
        print(f"{kind:<14}{'foldin decompositions':<22}{'':>9}{c['foldin_decomposition_per_step_s']:>10.2f}")
        print(f"{kind:<14}parity: max relative error {c['max_rel_err']:.1e} ({c['worst_tensor']})\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
