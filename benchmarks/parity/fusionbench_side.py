"""Run FusionBench 0.2.33's continual methods on a parity case; save each merged state dict.

Runs inside FusionBench's own virtualenv (see setup_fusionbench.sh), never imports foldin.
Usage: python fusionbench_side.py CASE_DIR OUT_DIR [--methods opcm,ties,...]
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import torch
import transformers
from fusion_bench import BaseModelPool
from fusion_bench.method.dop.dop_general import DOPMerging
from fusion_bench.method.magmax import MagMaxAlgorithm
from fusion_bench.method.opcm.opcm_general import OPCM
from fusion_bench.method.opcm.task_arithmetic import ContinualTaskArithmeticForCLIP
from fusion_bench.method.opcm.ties_merging import ContinualTiesMergingForCLIP
from fusion_bench.method.opcm.weight_average import ContinualWeightAverageForCLIP
from safetensors.torch import save_file
from transformers import AutoConfig

COMMON = dict(shuffle_order=False, save_on_every_step=False, evaluate_on_every_step=False)


class _Program:
    class taskpool:  # the baselines read self._program.taskpool._test_datasets
        _test_datasets: dict = {}


def algorithms(params: dict) -> dict:
    return {
        "average": lambda: ContinualWeightAverageForCLIP(**COMMON),
        "task_arithmetic": lambda: ContinualTaskArithmeticForCLIP(
            scaling_factor=params.get("scaling_factor", 0.3), **COMMON
        ),
        "ties": lambda: ContinualTiesMergingForCLIP(
            scaling_factor=params.get("scaling_factor", 0.3),
            threshold=params.get("threshold", 20),
            merge_func="sum",
            **COMMON,
        ),
        "opcm": lambda: OPCM(alpha=params.get("alpha", 0.5), **COMMON),
        "magmax": lambda: MagMaxAlgorithm(scaling_factor=params.get("scaling_factor", 0.5)),
        # the defaults of FusionBench's config/method/dop/dop.yaml (the class's own defaults differ)
        "dop": lambda: DOPMerging(
            seed=0,
            lr=1e-4,
            num_steps=200,
            mgda=True,
            ema=True,
            ema_beta=0.999,
            alpha=0.8,
            svd_epsilon=0.99999,
            svd_proj_space="uv",
            **COMMON,
        ),
    }


def nufilt(params: dict, base: torch.nn.Module):
    """The authors' NUFILT (installed by setup_nufilt_reference.sh), with each layer's LoRA factor A
    drawn as foldin draws it, from a generator seeded by (seed, step, tensor name); the reference
    draws it from the global torch stream, which no streaming implementation can follow. The
    layers are created in named_modules order at every step, so the k-th FilterLoRA built is layer
    k mod L of step k // L + 1."""
    from fusion_bench.method.nufilt.nufilt import NUFILT
    from fusion_bench.models import filter_lora

    layers = params["lora_layer"]
    names = [
        n
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and not list(m.children()) and any(k in n for k in layers)
    ]
    seed, built = params.get("seed", 42), [0]
    original = filter_lora.FilterLoRA.__init__

    def pinned(self, *args, **kwargs):
        original(self, *args, **kwargs)
        step, name = built[0] // len(names) + 1, names[built[0] % len(names)] + ".weight"
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{step}:{name}".encode()) + (seed << 32))
        a = torch.zeros_like(self.gate.A.data)
        torch.nn.init.normal_(a, std=0.02, generator=g)
        self.gate.A.data = a
        built[0] += 1

    filter_lora.FilterLoRA.__init__ = pinned
    algo = NUFILT(
        lora_r=params.get("lora_r", 64),
        null_r=params.get("null_r", 128),
        grad_r=params.get("grad_r", 8),
        null_space=True,
        seed=seed,
        lora_layer=layers,
        lr=params.get("lr", 1e-3),
        max_steps=params.get("max_steps", 50),
        **COMMON,
    )
    return algo


def load(folder: Path) -> torch.nn.Module:
    cfg = AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, cfg.architectures[0])
    return cls.from_pretrained(folder).eval()


def lazy_config(folder: Path) -> dict:
    """A Hydra config FusionBench instantiates when the model is needed (from_pretrained)."""
    arch = AutoConfig.from_pretrained(folder).architectures[0]
    return {"_target_": f"transformers.{arch}.from_pretrained", "pretrained_model_name_or_path": str(folder)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument(
        "--methods",
        default="average,task_arithmetic,ties,opcm",
        help="method names; NAME-N folds in only the first N checkpoints (FusionBench's MagMax and DOP "
        "return only the final model)",
    )
    ap.add_argument("--params", default="{}", help="JSON of method parameters")
    ap.add_argument(
        "--lazy",
        action="store_true",
        help="give FusionBench model configs (loaded from disk when it asks), as its YAML configs do, "
        "instead of models loaded up front",
    )
    ap.add_argument(
        "--float64-norm",
        action="store_true",
        help="diagnostic: compute OPCM's whole-model norms in float64 instead of FusionBench's float32",
    )
    a = ap.parse_args()
    if a.float64_norm:
        import fusion_bench.method.opcm.opcm_general as opcm_general
        from fusion_bench.utils.parameters import state_dict_to_vector
        from fusion_bench.utils.state_dict_arithmetic import state_dict_sub

        opcm_general.get_task_vector_norm = lambda model, pre: torch.linalg.norm(
            state_dict_to_vector(state_dict_sub(model.state_dict(), pre.state_dict())).double()
        )
    torch.set_num_threads(torch.get_num_threads())
    a.out.mkdir(parents=True, exist_ok=True)
    ckpts = sorted(p for p in a.case.iterdir() if p.name.startswith("ckpt_"))
    timings = {}
    for label in a.methods.split(","):
        method, _, count = label.partition("-")
        get = lazy_config if a.lazy else load
        used = ckpts[: int(count)] if count else ckpts
        pool = BaseModelPool(models={"_pretrained_": get(a.case / "base"), **{p.name: get(p) for p in used}})
        params = json.loads(a.params)
        algo = nufilt(params, load(a.case / "base")) if method == "nufilt" else algorithms(params)[method]()
        algo._program = _Program()
        algo._program.taskpool._test_datasets = {p.name: None for p in used}  # NUFILT reads one per model
        t0 = time.perf_counter()
        merged = algo.run(pool)
        timings[label] = time.perf_counter() - t0
        save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()}, a.out / f"{label}.safetensors")
    previous = json.loads((a.out / "timings.json").read_text()) if (a.out / "timings.json").exists() else {}
    (a.out / "timings.json").write_text(json.dumps({**previous, **timings}, indent=2))


if __name__ == "__main__":
    main()
