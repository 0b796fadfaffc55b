"""Cost of a DOP step against an OPCM step on the CLIP ViT-B/32 layer shapes, per linear layer,
extrapolated to the whole model (48 layers of 768 x 768 and 24 of 768 x 3072 or 3072 x 768).

A whole DOP step at FusionBench's defaults (200 Adam steps per layer) takes tens of minutes on a
CPU; timing one layer of each shape and multiplying by the layer counts costs a few minutes and
leaves out only what all methods share (reading and writing tensors). Task vectors are low rank
plus noise, as the parity cases make them.

    OMP_NUM_THREADS=1 python benchmarks/perf/dop_cost.py --out benchmarks/results/perf/dop_cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from foldin.methods.dop import DOPParams, ProjectedLoss, adam_merge, exact_merge, principal_basis
from foldin.methods.opcm import project_task_vector

SHAPES = {(768, 768): 48, (3072, 768): 12, (768, 3072): 12}  # ViT-B/32: q, k, v, out per block; fc1, fc2


def task_vector(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return (
        torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen) * 1e-3
        + torch.randn(m, n, generator=gen) * 1e-4
    )


def seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def layer_costs(m: int, n: int, p: DOPParams) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(m, n, generator=gen) * 0.02
    merged, new = base + task_vector(m, n, gen), base + task_vector(m, n, gen)
    start = (merged + new) / 2
    timings: dict[str, float] = {}
    losses: list[ProjectedLoss] = []
    timings["dop_svds"] = seconds(
        lambda: losses.extend(ProjectedLoss(t, *principal_basis(t - base, p.svd_epsilon), "uv") for t in (merged, new))
    )
    timings["dop_adam"] = timings["dop_svds"] + seconds(lambda: adam_merge(start, losses, p))
    timings["dop_exact"] = timings["dop_svds"] + seconds(lambda: exact_merge(start, losses, (p.alpha, 1 - p.alpha)))
    timings["opcm"] = seconds(lambda: project_task_vector(merged - base, new - base, 0.5))
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results" / "perf" / "dop_cost.json")
    a = ap.parse_args()
    p = DOPParams()
    per_layer = {f"{m}x{n}": layer_costs(m, n, p) for m, n in SHAPES}
    total = {
        k: sum(per_layer[f"{m}x{n}"][k] * count for (m, n), count in SHAPES.items())
        for k in ("dop_adam", "dop_exact", "opcm")
    }
    print(f"{torch.get_num_threads()} threads, ViT-B/32 linear layers (seconds; whole step = per layer x layer count)")
    print(f"{'layer':<12}{'count':>6}{'dop adam':>10}{'dop exact':>11}{'opcm':>8}")
    for (m, n), count in SHAPES.items():
        t = per_layer[f"{m}x{n}"]
        print(f"{m}x{n:<7}{count:>6}{t['dop_adam']:>10.2f}{t['dop_exact']:>11.2f}{t['opcm']:>8.2f}")
    print(f"{'step':<12}{'':>6}{total['dop_adam']:>10.0f}{total['dop_exact']:>11.0f}{total['opcm']:>8.0f}")
    print(
        f"dop (adam) / opcm: {total['dop_adam'] / total['opcm']:.0f}x; "
        f"dop (exact) / opcm: {total['dop_exact'] / total['opcm']:.1f}x"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps({"threads": torch.get_num_threads(), "per_layer": per_layer, "step": total}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
