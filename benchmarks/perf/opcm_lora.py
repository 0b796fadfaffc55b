"""OPCM on LoRA adapters: the thin decomposition of a low-rank merged task vector
(`diagonal=nonzero`) against FusionBench's convention (`diagonal=all`, a full SVD of the dense
merged task vector), same adapters, same machine, alternating.

    python benchmarks/perf/opcm_lora.py                      # TinyLlama-shaped, 4 layers, 4 adapters
    python benchmarks/perf/opcm_lora.py --layers 2 --adapters 3 --repeats 1

The base is a random Llama model with TinyLlama-1.1B's widths (hidden 2048, MLP 5632, 32 heads,
4 KV heads, vocabulary 32000), saved as a Hugging Face folder. Each adapter is a PEFT LoRA folder
(adapter_config.json + adapter_model.safetensors, the layout PEFT writes) of rank `--rank` on
q, k, v, o, gate, up and down projections, with Gaussian A and B. One run is `foldin init
--set diagonal=...` and one `foldin add` process per adapter; reported: seconds of each step
(the state's own timing), wall seconds, and the largest peak RSS of the processes as
`/usr/bin/time -v` reports it. Parity: the `nonzero` merged task vector of the first layer's
tensors against a float64 full-SVD reference of the same convention (direction, since the global
scale depends on every tensor), and how far FusionBench's convention lands from it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from opcm_vs_fusionbench import run_foldin  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_case(out: Path, layers: int, adapters: int, rank: int) -> Path:
    """A random TinyLlama-shaped base and `adapters` PEFT LoRA folders named ckpt_1, ckpt_2, ..."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        num_hidden_layers=layers,
        vocab_size=32000,
    )
    LlamaModel(config).save_pretrained(out / "base")
    shapes = {n: t.shape for n, t in load_file(out / "base" / "model.safetensors").items()}
    gen = torch.Generator().manual_seed(1)
    for i in range(1, adapters + 1):
        folder = out / f"ckpt_{i}"
        folder.mkdir(parents=True)
        tensors = {}
        for name, (n_out, n_in) in ((n, s) for n, s in shapes.items() if n.split(".")[-2] in TARGETS):
            module = name.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) / math.sqrt(
                n_in
            )
            tensors[f"base_model.model.{module}.lora_B.weight"] = (
                0.01 * torch.randn(n_out, rank, generator=gen) / math.sqrt(rank)
            )
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "target_modules": list(TARGETS),
                    "bias": "none",
                    "fan_in_fan_out": False,
                    "use_rslora": False,
                    "use_dora": False,
                    "modules_to_save": None,
                    "base_model_name_or_path": str(out / "base"),
                },
                indent=2,
            )
        )
    return out


def reference_direction(case: Path, names: list[str], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """float64 OPCM chain over the adapters, full SVDs, diagonal removed over nonzero pairs (> 1e-5 s_max)."""
    adapters = sorted(case.glob("ckpt_*"), key=lambda p: int(p.name.split("_")[1]))
    updates = []
    for folder in adapters:
        t, scaling = load_file(folder / "adapter_model.safetensors"), 2.0  # lora_alpha / r, as make_case writes them
        updates.append(
            {
                n: scaling
                * t[f"base_model.model.{n.removesuffix('.weight')}.lora_B.weight"].double()
                @ t[f"base_model.model.{n.removesuffix('.weight')}.lora_A.weight"].double()
                for n in names
            }
        )
    merged = dict(updates[0])
    for update in updates[1:]:
        for n in names:
            u, s, vh = torch.linalg.svd(merged[n], full_matrices=False)
            kept = int((s > 1e-5 * s[0]).sum())
            u, s, vh = u[:, :kept], s[:kept], vh[:kept]
            r = int(((s.cumsum(0) / s.sum()).clamp(max=1.0) > alpha).float().argmax())
            x = u.T @ update[n] @ vh.T
            removed = torch.diag(x.diagonal())
            removed[:r, :r] = x[:r, :r]
            merged[n] = merged[n] + update[n] - u @ removed @ vh
    return merged


def direction_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a / a.norm() - b / b.norm()).norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=HERE.parent / "_work" / "perf-lora")
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "perf" / "opcm_lora.json")
    a = ap.parse_args()
    case = a.work / f"tinyllama-{a.layers}l-{a.adapters}x-r{a.rank}"
    if not (case / f"ckpt_{a.adapters}").exists():
        shutil.rmtree(case, ignore_errors=True)
        make_case(case, a.layers, a.adapters, a.rank)
    sides = ("all", "nonzero")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(a.repeats):  # alternate, so that drifts in machine load hit both sides
        for side in sides:
            runs[side].append(run_foldin(case, a.work / f"run-{side}", init_args=["--set", f"diagonal={side}"]))
            print(
                f"  repeat {r + 1}: diagonal={side} steps {[round(s, 2) for s in runs[side][-1]['step_s']]}",
                file=sys.stderr,
            )
    base = load_file(case / "base" / "model.safetensors")
    layer0 = [n for n in base if n.startswith("layers.0.") and n.split(".")[-2] in TARGETS]
    reference = reference_direction(case, layer0)
    outputs = {side: load_file(a.work / f"run-{side}" / "out" / "model.safetensors") for side in sides}
    parity = {side: max(direction_error(outputs[side][n] - base[n], reference[n]) for n in layer0) for side in sides}
    med = {
        side: {
            "later_step_s": statistics.median(s for run in rs for s in run["step_s"][1:]),
            "merge_s": statistics.median(run["merge_s"] for run in rs),
            "wall_s": statistics.median(run["wall_s"] for run in rs),
            "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in rs),
        }
        for side, rs in runs.items()
    }
    params = sum(t.numel() for t in base.values())
    results = {
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "repeats": a.repeats,
        "case": {"layers": a.layers, "adapters": a.adapters, "rank": a.rank, "base_parameters": params},
        "median": med,
        "runs": runs,
        "direction_error_vs_float64_nonzero_reference": parity,
    }
    print(
        f"\nOPCM (alpha 0.5) over {a.adapters} rank-{a.rank} LoRA adapters on a TinyLlama-shaped base "
        f"({a.layers} layers, {params / 1e6:.0f}M parameters); medians of {a.repeats} alternating runs\n"
    )
    print(
        f"{'diagonal':<10}{'s / later step':>16}{'merge s':>9}{'wall s':>9}{'peak RSS MiB':>14}{'direction error':>17}"
    )
    for side in sides:
        m = med[side]
        print(
            f"{side:<10}{m['later_step_s']:>16.2f}{m['merge_s']:>9.1f}{m['wall_s']:>9.1f}{m['peak_rss_mb']:>14.0f}"
            f"{parity[side]:>17.1e}"
        )
    print(
        f"{'ratio':<10}{med['all']['later_step_s'] / med['nonzero']['later_step_s']:>15.1f}x"
        f"{med['all']['merge_s'] / med['nonzero']['merge_s']:>8.1f}x"
        f"{med['all']['wall_s'] / med['nonzero']['wall_s']:>8.1f}x"
        f"{med['nonzero']['peak_rss_mb'] / med['all']['peak_rss_mb']:>13.2f}x   (time: all / nonzero; RSS: "
        f"nonzero / all)"
    )
    print(
        "direction error: max over the first layer's adapted weights of || x/|x| - ref/|ref| ||, ref = float64 "
        "full-SVD OPCM over nonzero pairs"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
