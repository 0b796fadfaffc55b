"""A task-arithmetic step, foldin against mergekit 0.1.5: base + one fine-tuned model with weight
(scaling factor) 0.3, same inputs, same machine, same thread count, alternating runs; output
parity, wall seconds and peak RSS (`/usr/bin/time -v`), and the I/O floor beside them.

    python benchmarks/perf/ta_vs_mergekit.py                   # a 0.67 GB Llama-shaped model
    python benchmarks/perf/ta_vs_mergekit.py --layers 72       # 4.1 GB

mergekit runs in its own venv (setup_mergekit.sh, created on first use): `mergekit-yaml` with
`merge_method: task_arithmetic`, the model at `weight: 0.3`, `dtype: float32`, on the CPU. foldin
runs `foldin run merge.yaml` (one process: init, the step and the export) and, separately, the
three commands `init`, `add` and `export` (their wall times summed, their peak RSS the largest).
The floor is reading both inputs once (`cat > /dev/null`, from the page cache as every side reads
them) plus writing one output of the model's size and syncing it (`dd conv=fsync`).
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
    """`foldin run` (one process), then the same merge as init + add + export (three processes)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "merge.yaml").write_text(
        f"base: {base.resolve()}\nmethod: task_arithmetic\nparams: {{scaling_factor: 0.3}}\n"
        f"checkpoints: [{ckpt.resolve()}]\noutput: out\n"
    )
    foldin = [sys.executable, "-m", "foldin.cli"]
    run_wall, run_rss, _ = timed([*foldin, "run", str(work / "merge.yaml"), "--quiet"])
    state = str(work / "state")
    steps = [
        timed(cmd)[:2]
        for cmd in (
            [
                *foldin,
                "init",
                state,
                "--base",
                str(base),
                "--method",
                "task_arithmetic",
                "--set",
                "scaling_factor=0.3",
            ],
            [*foldin, "add", state, str(ckpt), "--quiet"],
            [*foldin, "export", state, str(work / "out3"), "--quiet"],
        )
    ]
    return {
        "wall_s": run_wall,
        "peak_rss_mb": run_rss,
        "three_commands_wall_s": sum(w for w, _ in steps),
        "three_commands_peak_rss_mb": max(r for _, r in steps),
    }


def io_floor(base: Path, ckpt: Path, work: Path) -> dict[str, float]:
    """Read both inputs once, write and sync one model-sized file: what any merge must do."""
    files = [str(f) for folder in (base, ckpt) for f in sorted(folder.glob("*.safetensors"))]
    read, _, _ = timed(["cat", *files], stdout=subprocess.DEVNULL)
    size_mb = sum(Path(f).stat().st_size for f in files[: len(files) // 2]) // 2**20
    write, _, _ = timed(["dd", "if=/dev/zero", f"of={work / 'floor.bin'}", "bs=1M", f"count={size_mb}", "conv=fsync"])
    (work / "floor.bin").unlink()
    return {"read_s": read, "write_s": write, "wall_s": read + write}


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
    runs: dict[str, list[dict[str, float]]] = {"mergekit": [], "foldin": [], "floor": []}
    for r in range(a.repeats):
        runs["floor"].append(io_floor(base, ckpt, a.work))
        runs["mergekit"].append(run_mergekit(base, ckpt, a.work / "mergekit-out"))
        runs["foldin"].append(run_foldin(base, ckpt, a.work / "foldin"))
        print(
            f"  repeat {r + 1}: floor {runs['floor'][-1]['wall_s']:.1f} s, "
            f"mergekit {runs['mergekit'][-1]['wall_s']:.1f} s, "
            f"foldin run {runs['foldin'][-1]['wall_s']:.1f} s, init+add+export "
            f"{runs['foldin'][-1]['three_commands_wall_s']:.1f} s",
            file=sys.stderr,
        )
    med = {side: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for side, rs in runs.items()}
    mk, fo, fl = med["mergekit"], med["foldin"], med["floor"]
    print(
        f"\ntask arithmetic, base + 1 model at 0.3, Llama-shaped {size_gb:.2f} GB float32, "
        f"{torch.get_num_threads()} threads each, medians of {a.repeats} alternating runs\n"
    )
    print(f"{'':<26}{'wall s':>8}{'/ mergekit':>12}{'peak RSS MiB':>14}{'/ mergekit':>12}")
    rows = [
        ("I/O floor (read + write)", fl["wall_s"], None),
        ("mergekit 0.1.5", mk["wall_s"], mk["peak_rss_mb"]),
        ("foldin run", fo["wall_s"], fo["peak_rss_mb"]),
        ("foldin init + add + export", fo["three_commands_wall_s"], fo["three_commands_peak_rss_mb"]),
    ]
    for label, wall, rss in rows:
        rss_cells = f"{rss:>14.0f}{rss / mk['peak_rss_mb']:>11.2f}x" if rss else ""
        print(f"{label:<26}{wall:>8.1f}{wall / mk['wall_s']:>11.2f}x{rss_cells}")
    errs = relative_errors(load_all(a.work / "foldin" / "out"), load_all(a.work / "mergekit-out"))
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
