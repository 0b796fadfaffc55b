"""What every image suite shares: grey-scale uint8 tasks from `vision.tasks` (built-in sources or a
user's .npz files), batches made by the suite's `preprocess`, and a backbone that ships in a
package in a form foldin does not merge directly (a torch state dict, an ONNX graph), written once
into the zoo as a checkpoint folder. A suite names its sources, its preprocessing and its backbone."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import torch
from torch import nn

from foldin.evaluation.suite import Encoded, Suite, Task
from foldin.evaluation.vision.tasks import Source, tasks_from_sources, user_task
from foldin.io.atomic import write_dir_atomic


class ImageSuite(Suite):
    eval_batch: int = 128

    @abstractmethod
    def sources(self, seed: int) -> dict[str, Source]:
        """The built-in tasks, in the suite's order: name -> (description, label names, loader)."""

    @abstractmethod
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) grey-scale images -> the backbone's input batch."""

    def builtin_task_names(self) -> list[str]:
        return list(self.sources(seed=0))

    def builtin_tasks(self, names: list[str] | None, max_train: int, max_test: int, seed: int) -> list[Task]:
        return tasks_from_sources(self.name, self.sources(seed), names, max_train, max_test, seed)

    def user_task(self, spec_path: Path, max_train: int, max_test: int, seed: int) -> Task:
        return user_task(spec_path, max_train, max_test, seed)

    def base_checkpoint(self, zoo_dir: Path) -> Path:
        """The package's backbone, written once as a checkpoint folder that foldin reads like any other."""
        folder = zoo_dir / "base"
        if not (folder / "model.safetensors").exists():  # written whole, then moved in: never trusted half-written
            write_dir_atomic(folder, lambda tmp: self.save_backbone(self.load_backbone(), tmp))
        self.backbone = folder
        return folder

    def encode(self, inputs: torch.Tensor, labels: list[int]) -> Encoded:
        batches = [self.preprocess(inputs[i : i + self.eval_batch]) for i in range(0, len(inputs), self.eval_batch)]
        return Encoded(batches, torch.tensor(labels))

    def train_batch(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.preprocess(inputs[index])

    def tensorize(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"images": inputs}

    def batch_features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.features(model, self.preprocess(batch["images"]))
