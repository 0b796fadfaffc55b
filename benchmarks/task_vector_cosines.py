"""How orthogonal are the zoo's task vectors? (The OPCM paper's Figure 4 motivation.)

    python benchmarks/task_vector_cosines.py [--zoo zoo/text]

Prints the pairwise cosine similarity of whole-model task vectors, and of the linear-layer part
alone, over all tasks and over the first 8 and 14 (the benchmark's settings), plus each task
vector's norm.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from safetensors.torch import load_file

from foldin.evaluation.zoo import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo/text")
    zoo = Zoo.open(ap.parse_args().zoo)
    base = load_file(Path(zoo.backbone) / "model.safetensors")
    names = zoo.task_names
    tvs, linear = {}, {}
    for n in names:
        sd = load_file(zoo.checkpoint(n) / "model.safetensors")
        keys = [k for k in sd if sd[k].is_floating_point()]
        tvs[n] = torch.cat([(sd[k] - base[k]).reshape(-1).double() for k in keys])
        linear[n] = torch.cat(
            [(sd[k] - base[k]).reshape(-1).double() for k in keys if sd[k].dim() == 2 and "embeddings" not in k]
        )
    for label, vecs in (("whole model", tvs), ("linear layers", linear)):
        for k in sorted({n for n in (8, 14, len(names)) if n <= len(names)}):
            cos = [
                float(torch.nn.functional.cosine_similarity(vecs[a], vecs[b], dim=0))
                for a, b in itertools.combinations(names[:k], 2)
            ]
            mean = sum(cos) / len(cos)
            print(f"{label}, first {k} tasks: pairwise cosine mean {mean:.4f}, min {min(cos):.4f}, max {max(cos):.4f}")
    print("task-vector norms: " + ", ".join(f"{n} {float(v.norm()):.2f}" for n, v in tvs.items()))


if __name__ == "__main__":
    main()
