"""Parity of foldin with FusionBench 0.2.33: run both on the same base and checkpoints (same
order), compare every tensor of the exported merged models (relative error, float32).

    python benchmarks/parity/check_parity.py                 # tiny + full-size cases
    python benchmarks/parity/check_parity.py --cases bert-tiny

FusionBench runs in its own virtualenv (created by setup_fusionbench.sh on first use). The CLIP
`class_embedding` is excluded: FusionBench never merges parameters owned by non-leaf modules.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from foldin import MergeState

HERE = Path(__file__).resolve().parent
# NAME-N: the model after the first N checkpoints (FusionBench's MagMax and DOP return only the final one)
METHODS = ["average", "task_arithmetic", "ties", "opcm", "magmax", "magmax-2", "dop", "dop-2", "nufilt", "nufilt-2"]
EXCLUDED = {"vision_model.embeddings.class_embedding"}  # FusionBench quirk, see module doc
TOLERANCE = 1e-4


def nufilt_reference_params(kind: str) -> dict:
    """The NUFILT reference's settings for a case: the layer patterns of the case's architecture
    (CLIP: the reference's own), and on the tiny cases (hidden 32) ranks scaled down with the width,
    since the defaults (null_r 128) would filter every input direction of a 32-wide layer."""
    layers = ["attn", "fc1"] if kind.startswith("clip") else ["attention", "intermediate"]
    return {"lora_layer": layers, **({"lora_r": 4, "null_r": 8, "grad_r": 2} if "tiny" in kind else {})}


def foldin_params(method: str, kind: str) -> dict:
    """foldin's parameters for the same computation as FusionBench's (or the reference fork's)."""
    if method != "nufilt":
        return {}
    ref = nufilt_reference_params(kind)
    ranks = {k: v for k, v in ref.items() if k != "lora_layer"}
    return {"layers": ref["lora_layer"], "first_task": "as_reference", **ranks}


def run_foldin(
    case: Path, label: str, work: Path, params: dict | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """init + add every checkpoint (the first N for NAME-N) + export, through the on-disk state;
    returns (weights, seconds in add)."""
    method, _, count = label.partition("-")
    params = foldin_params(method, case.name) if params is None else params
    state = MergeState.create(work / f"{label}.state", case / "base", method, params)
    ckpts = sorted(p for p in case.iterdir() if p.name.startswith("ckpt_"))
    t0 = time.perf_counter()
    for ckpt in ckpts[: int(count)] if count else ckpts:
        state.add(ckpt, progress=False)
    seconds = time.perf_counter() - t0
    out = state.export(work / f"{label}.export", progress=False)
    return load_file(out / "model.safetensors"), seconds


def relative_errors(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Per-tensor ||ours - theirs|| / ||theirs||, over the tensors both hold, minus EXCLUDED. With
    `base`, relative to the merged task vector instead, ||ours - theirs|| / ||theirs - base||: the
    stricter measure, since a merge changes weights by a small fraction of their size (tensors the
    reference leaves at the base are left out)."""
    errs = {}
    for name, ref in theirs.items():
        if name in EXCLUDED or not ref.is_floating_point():
            continue
        diff = torch.linalg.vector_norm(ours[name].double() - ref.double())
        scale = torch.linalg.vector_norm(ref.double() - (base[name].double() if base is not None else 0))
        if base is None or scale > 0:
            errs[name] = float(diff / scale.clamp(min=1e-30))
    return errs


def fusionbench_python() -> Path:
    py = Path(os.environ.get("FUSIONBENCH_VENV", HERE.parent / "_work" / "fusionbench-venv")) / "bin" / "python"
    if not py.exists():
        subprocess.run(["bash", str(HERE / "setup_fusionbench.sh"), str(py.parent.parent)], check=True)
    return py


def main() -> int:
    sys.path.insert(0, str(HERE))
    from cases import FULL, TINY, make_case

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join([*TINY, *FULL]))
    ap.add_argument("--work", type=Path, default=HERE.parent / "_work" / "parity")
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args()
    methods = a.methods.split(",")
    py = fusionbench_python()
    rows, worst = [], 0.0
    for kind in a.cases.split(","):
        case = a.work / kind
        if not (case / "base").exists():
            make_case(kind, case)
        fb = case / "fusionbench"
        missing = [m for m in methods if not (fb / f"{m}.safetensors").exists()]
        if missing:  # FusionBench runs once per case and method; its outputs are kept
            subprocess.run(
                [
                    *(str(py), str(HERE / "fusionbench_side.py"), str(case), str(fb)),
                    *("--methods", ",".join(missing), "--params", json.dumps(nufilt_reference_params(kind))),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        fb_seconds = json.loads((fb / "timings.json").read_text())
        for method in methods:
            work = case / "foldin"
            subprocess.run(["rm", "-rf", str(work / f"{method}.state"), str(work / f"{method}.export")], check=True)
            ours, seconds = run_foldin(case, method, work)
            theirs = load_file(fb / f"{method}.safetensors")
            errs = relative_errors(ours, theirs)
            name, err = max(errs.items(), key=lambda kv: kv[1])
            to_delta = max(relative_errors(ours, theirs, load_file(case / "base" / "model.safetensors")).values())
            worst = max(worst, err)
            rows.append((kind, method, len(errs), err, to_delta, name, fb_seconds[method], seconds))
    print(
        f"{'case':<18}{'method':<17}{'tensors':>8}{'max rel err':>13}{'of delta':>10}  {'fusionbench s':>13}"
        f"{'foldin s':>10}  worst tensor"
    )
    for kind, method, n, err, to_delta, name, fbs, s in rows:
        print(f"{kind:<18}{method:<17}{n:>8}{err:>13.2e}{to_delta:>10.2e}  {fbs:>13.2f}{s:>10.2f}  {name}")
    print(f"\nworst relative error {worst:.2e} (tolerance {TOLERANCE:.0e}): {'PASS' if worst < TOLERANCE else 'FAIL'}")
    return 0 if worst < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
