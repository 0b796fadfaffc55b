"""How exact OPCM's projection is with each decomposition: the Gram route (`gram_svd`, where its
bound certifies it) and LAPACK's float32 SVD (what FusionBench uses), both against the same
projection computed with a float64 SVD, on real task vectors.

    python benchmarks/perf/gram_accuracy.py BASE CKPT_A CKPT_B [--out FILE]

The merged task vector is CKPT_A - BASE and the new one CKPT_B - BASE; every rectangular linear
weight (long side >= 2 x short side, where foldin tries the Gram route) is compared. The error is
the norm of the difference over the float64 projection's norm.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from foldin.io.checkpoint import open_checkpoint
from foldin.methods.opcm import remove_protected_coefficients
from foldin.methods.singular import GRAM_MIN_ASPECT, gram_svd


def relative_error(projected: torch.Tensor, reference: torch.Tensor) -> float:
    return float((projected.double() - reference).norm() / reference.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("merged", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    base, merged, new = (open_checkpoint(p) for p in (a.base, a.merged, a.new))
    rows, uncertified = {}, []
    for name in base.names():
        w = base.read(name)
        if w.dim() != 2 or max(w.shape) < GRAM_MIN_ASPECT * min(w.shape) or name not in merged.names():
            continue
        d, t = (merged.read(name) - w).float(), (new.read(name) - w).float()
        certified = gram_svd(d)
        if certified is None:
            uncertified.append(name)
            continue
        exact = torch.linalg.svd(d.double(), full_matrices=False)
        reference = remove_protected_coefficients(*exact, t.double(), a.alpha)
        lapack = torch.linalg.svd(d, full_matrices=False)
        rows[name] = {
            "gram": relative_error(remove_protected_coefficients(*certified, t, a.alpha), reference),
            "lapack_float32": relative_error(remove_protected_coefficients(*lapack, t, a.alpha), reference),
        }
    summary = {
        side: {"median": statistics.median(r[side] for r in rows.values()), "max": max(r[side] for r in rows.values())}
        for side in ("gram", "lapack_float32")
    }
    print(f"{len(rows)} rectangular linear weights certified, {len(uncertified)} not")
    for side, s in summary.items():
        print(f"{side:<16} relative error of the projection: median {s['median']:.1e}, max {s['max']:.1e}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"summary": summary, "uncertified": uncertified, "per_weight": rows}
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
