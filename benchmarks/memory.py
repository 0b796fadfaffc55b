"""Scaling of `foldin add`: seconds and peak RSS against model size (at step 2) and against the
number of steps (on the smallest model), with plots.

    python benchmarks/memory.py                                  # opcm, 0.1 and 0.8 GB, steps 1..8
    python benchmarks/memory.py --method task_arithmetic --layers 2,16,64,256 --steps 20 --plot DIR

Models are synthetic transformer-shaped safetensors files (hidden 1024, six matrices a layer:
four 1024x1024 and two 1024x4096, plus norms), written tensor by tensor; checkpoints are the base
plus a low-rank update and noise. Peak RSS is read from `/usr/bin/time -v` ("Maximum resident set
size", which counts file-backed pages too) around each measured `foldin add` process.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from foldin.io.safetensors_file import SafetensorsWriter

HIDDEN = 1024


def layer_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        for p in ("q", "k", "v", "o"):
            shapes[f"layers.{i}.attn.{p}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"layers.{i}.mlp.up.weight"] = (4 * HIDDEN, HIDDEN)
        shapes[f"layers.{i}.mlp.down.weight"] = (HIDDEN, 4 * HIDDEN)
        shapes[f"layers.{i}.norm.weight"] = (HIDDEN,)
    return shapes


def write_model(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, base_seed: int = 0) -> None:
    """Base (seed == base_seed) or base + rank-4 update + noise, one tensor at a time."""
    with SafetensorsWriter(path, {n: (torch.float32, s) for n, s in shapes.items()}) as w:
        for i, (name, shape) in enumerate(shapes.items()):
            t = torch.randn(shape, generator=torch.Generator().manual_seed(base_seed * 100_003 + i)) * 0.02
            if seed != base_seed:
                g = torch.Generator().manual_seed(seed * 100_003 + i)
                t += torch.randn(shape, generator=g) * 1e-4
                if len(shape) == 2:
                    t += (torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g)) * 2e-4
            w.write(name, t)


def timed_add(state: Path, ckpt: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one `foldin add` process."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "foldin.cli", "add", str(state), str(ckpt), "--quiet"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return kb / 1024, seconds


def interpreter_rss() -> float:
    out = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", "import foldin.cli, torch"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="opcm")
    ap.add_argument(
        "--layers",
        default="2,16",
        help="model sizes, in layers of ~48 MiB, comma-separated (the first also gets the step curve)",
    )
    ap.add_argument("--steps", type=int, default=8, help="steps on the smallest model (every step is measured)")
    ap.add_argument("--plot", type=Path, help="write scaling_size.png and scaling_steps.png here")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "memory")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    sizes = [int(x) for x in a.layers.split(",")]
    rows = []
    for layers, steps in [(sizes[0], a.steps), *((n, 2) for n in sizes[1:])]:
        shapes = layer_shapes(layers)
        work = a.work / f"L{layers}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_model(work / "base.safetensors", shapes, seed=0)
        state = work / "state"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "foldin.cli",
                "init",
                str(state),
                "--base",
                str(work / "base.safetensors"),
                "--method",
                a.method,
                "--linear-weights",
                r".*\.(attn|mlp)\..*weight",
            ],
            check=True,
            capture_output=True,
        )
        model_bytes = sum(4 * torch.Size(s).numel() for s in shapes.values())
        largest = max(4 * torch.Size(s).numel() for s in shapes.values())
        for step in range(1, steps + 1):
            ckpt = work / "ckpt.safetensors"
            write_model(ckpt, shapes, seed=step)
            rss, seconds = timed_add(state, ckpt)
            if steps > 2 or step == 2:
                rows.append(
                    {
                        "layers": layers,
                        "model_gb": model_bytes / 1e9,
                        "largest_tensor_mb": largest / 2**20,
                        "step": step,
                        "peak_rss_mb": rss,
                        "seconds": seconds,
                    }
                )
                print(f"  measured L{layers} step {step}: {rss:.0f} MiB, {seconds:.1f} s", file=sys.stderr)
        shutil.rmtree(work)
    base_rss = interpreter_rss()
    print(f"\nmethod {a.method}; interpreter + torch + foldin imported: {base_rss:.0f} MiB peak RSS\n")
    print(f"{'model GB':>9}{'largest MiB':>12}{'step':>6}{'peak RSS MiB':>14}{'above interp.':>15}{'seconds':>9}")
    for r in rows:
        print(
            f"{r['model_gb']:>9.2f}{r['largest_tensor_mb']:>12.0f}{r['step']:>6}{r['peak_rss_mb']:>14.0f}"
            f"{r['peak_rss_mb'] - base_rss:>15.0f}{r['seconds']:>9.1f}"
        )
    if a.json:
        a.json.write_text(json.dumps({"method": a.method, "interpreter_rss_mb": base_rss, "rows": rows}, indent=2))
    if a.plot:
        plot(rows, a.method, base_rss, a.plot)


def plot(rows: list[dict], method: str, base_rss: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    by_size = [r for r in rows if r["step"] == 2]
    first = rows[0]["layers"]
    by_step = [r for r in rows if r["layers"] == first]
    for name, xs, pick, xlabel in (
        ("size", by_size, "model_gb", "model size (GB, float32)"),
        ("steps", by_step, "step", "step"),
    ):
        fig, ax1 = plt.subplots(figsize=(6, 4))
        x = [r[pick] for r in xs]
        ax1.plot(x, [r["seconds"] for r in xs], "o-", color="tab:blue", label="seconds per step")
        ax1.set_xlabel(xlabel)
        ax1.set_ylabel("seconds per step", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.plot(x, [r["peak_rss_mb"] for r in xs], "s--", color="tab:red", label="peak RSS")
        ax2.axhline(base_rss, color="grey", lw=0.8, ls=":")
        ax2.set_ylabel("peak RSS of the add process (MiB)", color="tab:red")
        ax2.set_ylim(0, max(r["peak_rss_mb"] for r in xs) * 1.3)
        if name == "size":
            ax1.set_xscale("log")
            ax1.set_yscale("log")
        ax1.set_title(f"foldin add ({method}): {'model size' if name == 'size' else 'number of steps'}")
        fig.tight_layout()
        fig.savefig(out / f"scaling_{name}_{method}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
