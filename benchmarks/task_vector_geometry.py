"""Norms and pairwise cosines of a zoo's task vectors (fine-tuned minus pretrained, all shared
tensors flattened, float64): how much the tasks interfere, which is what separates merging methods.

    python benchmarks/task_vector_geometry.py zoo/text-zeroshot > benchmarks/results/text-zeroshot/geometry.txt
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def task_vectors(zoo: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((zoo / "zoo.json").read_text())
    base = load_file(Path(meta["backbone"]) / "model.safetensors")
    vectors = {}
    for name in meta["tasks"]:
        tuned = load_file(zoo / "tasks" / name / "model.safetensors")
        vectors[name] = torch.cat(
            [(tuned[k].double() - base[k].double()).flatten() for k in sorted(base) if k in tuned]
        )
    return vectors


def main() -> None:
    vectors = task_vectors(Path(sys.argv[1]))
    names = list(vectors)
    unit = {n: v / v.norm() for n, v in vectors.items()}
    print(f"{'task':<22}{'norm':>8}{'max |cos| to another':>24}")
    for n in names:
        worst = max(abs(float(unit[n] @ unit[m])) for m in names if m != n)
        print(f"{n:<22}{float(vectors[n].norm()):>8.3f}{worst:>24.4f}")
    for k in (8, 14, 20):
        if k <= len(names):
            cos = [float(unit[a] @ unit[b]) for a, b in itertools.combinations(names[:k], 2)]
            mean = sum(cos) / len(cos)
            print(f"first {k} tasks: mean pairwise cosine {mean:.4f}, range [{min(cos):.4f}, {max(cos):.4f}]")


if __name__ == "__main__":
    main()
