"""How much of an OPCM step is the SVD: the step's time against bare decompositions of the same
matrices (the merged task vector of every linear weight), on the CPU or on `--device`.

    python benchmarks/perf/svd_floor.py                         # ViT-B/32 shape, CPU
    python benchmarks/perf/svd_floor.py --device cuda           # where a GPU is lent

Step 2 of a 3-checkpoint case (the first step has no subspace to project away from) is timed
through the on-disk state (`MergeState.add`, reading and writing included) `--repeats` times; the
decompositions are timed on the merged task vector after step 1: `torch.linalg.svd` thin (LAPACK,
each matrix as it is), `torch.linalg.eigh` of the smaller Gram matrix alone (in the input dtype), and
foldin's `thin_svd` (float64 Gram route where its bound certifies it, else LAPACK on the tall side).
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

from foldin import MergeState
from foldin.methods.singular import thin_svd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "parity"))
from cases import make_case  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_decompositions(matrices: list[torch.Tensor], device: torch.device) -> dict[str, float]:
    out = {}
    for name, fn in (
        ("svd_thin", lambda m: torch.linalg.svd(m, full_matrices=False)),
        ("eigh_gram", lambda m: torch.linalg.eigh(m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m)),
        ("foldin_thin_svd", thin_svd),
    ):
        fn(matrices[0])  # warm-up (library loading, GPU kernels)
        sync(device)
        t0 = time.perf_counter()
        for m in matrices:
            fn(m)
        sync(device)
        out[name] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="clip-vit-b32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE.parent / "_work" / "perf")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    case = a.work / a.case
    if not (case / "ckpt_3").exists():
        shutil.rmtree(case, ignore_errors=True)
        make_case(a.case, case, n_checkpoints=3)
    steps = []
    for _ in range(a.repeats):
        state_dir = a.work / f"{a.case}-svd-state"
        shutil.rmtree(state_dir, ignore_errors=True)
        state = MergeState.create(state_dir, case / "base", "opcm")
        state.add(case / "ckpt_1", progress=False, device=a.device)
        tau = load_file(state_dir / state.meta["generation"] / "merged.safetensors")  # what step 2 decomposes
        steps.append(state.add(case / "ckpt_2", progress=False, device=a.device)["seconds"])
    matrices = [tau[n].to(device) for n in state.meta["linear_weights"]]
    dec = timed_decompositions(matrices, device)
    step = statistics.median(steps)
    row = {
        "case": a.case,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "linear_weights": len(matrices),
        "step2_seconds_median": step,
        "step2_seconds": steps,
        **{f"{k}_seconds": v for k, v in dec.items()},
        "svd_fraction_of_step": dec["svd_thin"] / step,
    }
    print(
        f"{a.case} on {device} ({torch.get_num_threads()} threads): OPCM step 2 {step:.2f} s (median of {a.repeats}, "
        f"I/O included); {len(matrices)} linear weights: thin SVD {dec['svd_thin']:.2f} s "
        f"({100 * row['svd_fraction_of_step']:.0f}% of the step), eigh of the Gram matrix {dec['eigh_gram']:.2f} s, "
        f"foldin's thin_svd {dec['foldin_thin_svd']:.2f} s"
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
