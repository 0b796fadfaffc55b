"""Why OPCM needs `diagonal=nonzero` on LoRA sums, and what the sketch costs, on plain tensors.

    OMP_NUM_THREADS=1 python benchmarks/perf/lora_null_space.py

1. Sensitivity: S = two rank-16 updates (768 x 768), a third rank-16 update T projected away from
   it; how far the projection moves (relative Frobenius) when S changes by 1e-12 noise, and
   between float32 and float64, for each convention.
2. Bare decomposition seconds (best of 3): the sketch that `nonzero` uses against the full thin
   SVD, on LoRA sums of rank 32 and on full-rank matrices (where the sketches fail first and the
   full SVD follows: the overhead a dense model pays for `nonzero`).
"""

from __future__ import annotations

import time
from functools import partial

import torch

from foldin.methods.opcm import nonzero_singular_triplets, project_task_vector


def lora_sum(m: int, n: int, ranks: list[int], gen: torch.Generator) -> torch.Tensor:
    return sum(0.02 * torch.randn(m, r, generator=gen) @ (0.02 * torch.randn(r, n, generator=gen)) for r in ranks)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def best_seconds(fn, matrix: torch.Tensor, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(matrix)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    merged, task = lora_sum(768, 768, [16, 16], gen), lora_sum(768, 768, [16], gen)
    nudged = merged + 1e-12 * torch.randn(768, 768, generator=gen)
    print("768 x 768, S = two rank-16 updates, T rank 16: change of the projected T")
    print(f"{'diagonal':<10}{'S + 1e-12 noise':>17}{'float64 vs float32':>20}")
    for diagonal in ("all", "nonzero"):
        p = project_task_vector(merged, task, 0.5, diagonal)
        print(
            f"{diagonal:<10}{relative(project_task_vector(nudged, task, 0.5, diagonal), p):>17.1e}"
            f"{relative(project_task_vector(merged.double(), task.double(), 0.5, diagonal), p):>20.1e}"
        )
    print(f"\n{'matrix':<28}{'sketch s':>10}{'full SVD s':>12}{'ratio':>8}")
    for m, n in ((768, 768), (768, 3072), (4096, 4096)):
        for kind, matrix in (
            ("rank 32", lora_sum(m, n, [16, 16], gen)),
            ("full rank", torch.randn(m, n, generator=gen)),
        ):
            sketch = best_seconds(nonzero_singular_triplets, matrix)
            full = best_seconds(partial(torch.linalg.svd, full_matrices=False), matrix, 1 if m >= 4096 else 3)
            print(f"{f'{m}x{n} {kind}':<28}{sketch:>10.3f}{full:>12.3f}{full / sketch:>7.1f}x")


if __name__ == "__main__":
    main()
