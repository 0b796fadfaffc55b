"""A task-arithmetic step, foldin against mergekit 0.1.5: base + one fine-tuned model with weight
(scaling factor) 0.3, same inputs, same machine, alternating runs; output parity, wall seconds and
peak RSS (`/usr/bin/time -v`).

    python benchmarks/perf/ta_vs_mergekit.py                   # a 0.5 GB Llama-shaped model
    python benchmarks/perf/ta_vs_mergekit.py --layers 16 --repeats 3

mergekit runs in its own venv (setup_mergekit.sh, created on first use): `mergekit-yaml` with
`merge_method: task_arithmetic`, the model at `weight: 0.3`, `dtype: float32`, on the CPU. foldin
runs `init` (task_arithmetic, scaling_factor 0.3), `add` and `export`, each a process; its wall
time is their sum and its peak RSS their largest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "parity"))
sys.path.insert(0, str(HERE.parent))
from timing import timed  # noqa: E402

from cases import fine_tuned_like  # noqa: E402
from check_parity import relative_errors  # noqa: E402


def mergekit_bin() -> Path:
    venv = Path(os.environ.get("MERGEKIT_VENV", HERE.parent / "_work" / "mergekit-venv"))
    if not (venv / "bin" / "mergekit-yaml").exists():
        subprocess.run(["bash", str(HERE / "setup_mergekit.sh"), str(venv)], check=True)
    return venv / "bin" / "mergekit-yaml"


def make_models(work: Path, layers: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    base, ckpt = work / "base", work / "ckpt"
    if (ckpt / "config.json").exists():
        return base, ckpt
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(base)
    model.load_state_dict(fine_tuned_like(model.state_dict(), torch.Generator().manual_seed(1)))
    model.save_pretrained(ckpt)
    return base, ckpt


def run_mergekit(base: Path, ckpt: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    config = out.with_suffix(".yml")
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ckpt}\n"
        f"    parameters:\n      weight: 0.3\ndtype: float32\n"
    )
    wall, rss, _ = timed([str(mergekit_bin()), str(config), str(out), "--no-copy-tokenizer"])
    return {"wall_s": wall, "peak_rss_mb": rss}


def run_foldin(base: Path, ckpt: Path, work: Path) -> dict[str, float]:
    shutil.rmtree(work, ignore_errors=True)
    foldin = [sys.executable, "-m", "foldin.cli"]
    runs = [
        timed(cmd)[:2]
        for cmd in (
            [
                *foldin,
                "init",
                str(work / "state"),
                "--base",
                str(base),
                "--method",
                "task_arithmetic",
                "--set",
                "scaling_factor=0.3",
            ],
            [*foldin, "add", str(work / "state"), str(ckpt), "--quiet"],
            [*foldin, "export", str(work / "state"), str(work / "out"), "--quiet"],
        )
    ]
    return {"wall_s": sum(w for w, _ in runs), "peak_rss_mb": max(r for _, r in runs), "add_wall_s": runs[1][0]}


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE.parent / "_work" / "perf-mergekit")
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "perf" / "ta_vs_mergekit.json")
    a = ap.parse_args()
    base, ckpt = make_models(a.work / f"L{a.layers}", a.layers)
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    runs: dict[str, list[dict[str, float]]] = {"mergekit": [], "foldin": []}
    for r in range(a.repeats):
        runs["mergekit"].append(run_mergekit(base, ckpt, a.work / "mergekit-out"))
        runs["foldin"].append(run_foldin(base, ckpt, a.work / "foldin"))
        print(
            f"  repeat {r + 1}: mergekit {runs['mergekit'][-1]['wall_s']:.1f} s, foldin "
            f"{runs['foldin'][-1]['wall_s']:.1f} s",
            file=sys.stderr,
        )
    errs = relative_errors(load_all(a.work / "foldin" / "out"), load_all(a.work / "mergekit-out"))
    med = {
        side: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "peak_rss_mb")} for side, rs in runs.items()
    }
    print(
        f"\ntask arithmetic, base + 1 model at 0.3, Llama-shaped {size_gb:.2f} GB float32, medians of "
        f"{a.repeats} alternating runs\n"
    )
    print(f"{'side':<10}{'wall s':>9}{'peak RSS MiB':>14}")
    for side, m in med.items():
        print(f"{side:<10}{m['wall_s']:>9.1f}{m['peak_rss_mb']:>14.0f}")
    print(
        f"{'ratio':<10}{med['mergekit']['wall_s'] / med['foldin']['wall_s']:>8.1f}x"
        f"{med['foldin']['peak_rss_mb'] / med['mergekit']['peak_rss_mb']:>13.2f}x   (speed: mergekit / foldin; "
        f"RSS: foldin / mergekit)"
    )
    print(f"parity: {len(errs)} tensors, max relative error {max(errs.values()):.1e} ({max(errs, key=errs.get)})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {"model_gb": size_gb, "layers": a.layers, "median": med, "runs": runs, "max_rel_err": max(errs.values())},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
