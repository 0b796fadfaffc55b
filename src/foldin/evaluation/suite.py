"""What a task suite is: a backbone, labelled tasks, and the two trainings the OPCM protocol needs
(fitting a head on the frozen pretrained backbone; fine-tuning the backbone with that head frozen).

Everything that differs between text and images (loading, batching, the feature function, how a
backbone is saved) is a `Suite` method; the zoo, `foldin eval` and the benchmark only talk to a
`Suite`, so a third modality is one new subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from foldin.data import TaskData
from foldin.errors import FoldinError

EVAL_BATCH = 64


@dataclass(frozen=True)
class Task:
    """A labelled task; inputs are a list of strings (text) or a uint8 image tensor (vision).
    `descriptions`: a short text per class, for zero-shot heads (empty: the labels themselves)."""

    name: str
    source: str
    labels: list[str]
    train: tuple[Any, list[int]]
    test: tuple[Any, list[int]]
    descriptions: tuple[str, ...] = ()


class Encoded:
    """A task split prepared once (tokenized / normalized, in batches) for every evaluation."""

    def __init__(self, batches: list[Any], labels: torch.Tensor):
        self.batches = batches
        self.labels = labels


class Suite(ABC):
    name: str
    defaults: dict[str, Any]  # zoo settings: steps, lr, max_train, max_test, seed, heads
    fine_tune_batch: int
    head_weight_decay: float = (
        0.0  # L2 on the head: a head that already fits the training set leaves fine-tuning nothing to learn
    )
    head_protocols: tuple[str, ...] = ("probe",)  # how a task's frozen head is made (see `head`)

    def __init__(self, backbone: Path | str | None = None, heads: str | None = None):
        self.backbone = Path(backbone) if backbone else self.default_backbone()
        self.heads = heads or self.defaults["heads"]
        if self.heads not in self.head_protocols:
            raise FoldinError(
                f"the {self.name} suite's heads can be {' or '.join(self.head_protocols)}, not {self.heads!r}."
            )

    @abstractmethod
    def default_backbone(self) -> Path:
        """The pretrained backbone that ships in a package (a folder with model.safetensors)."""

    def backbone_label(self) -> str:
        """The backbone as a report names it: the package that ships it, or the folder's name (never a
        machine's absolute path)."""
        return self.default_backbone_label if self.backbone == self.default_backbone() else self.backbone.name

    default_backbone_label: str = ""

    @abstractmethod
    def builtin_task_names(self) -> list[str]:
        """The names of the suite's own tasks, in the suite's order."""

    @abstractmethod
    def builtin_tasks(self, names: list[str] | None, max_train: int, max_test: int, seed: int) -> list[Task]:
        """The suite's own tasks, all of them or those named."""

    @abstractmethod
    def user_task(self, spec_path: Path, max_train: int, max_test: int, seed: int) -> Task:
        """A task the user describes in a YAML file (see README: evaluation)."""

    def base_checkpoint(self, zoo_dir: Path) -> Path:
        """The pretrained backbone as a checkpoint folder (the base every task was fine-tuned from)."""
        return self.backbone

    @abstractmethod
    def load_backbone(self, path: Path | None = None) -> nn.Module:
        """A backbone in eval mode: the suite's pretrained one, or a folder written by `save_backbone`."""

    @abstractmethod
    def save_backbone(self, model: nn.Module, folder: Path) -> None:
        """Write a checkpoint folder that foldin (and, for text, transformers) can load."""

    @abstractmethod
    def encode(self, inputs: Any, labels: list[int]) -> Encoded:
        """Batches for evaluation."""

    @abstractmethod
    def train_batch(self, inputs: Any, index: torch.Tensor) -> Any:
        """One fine-tuning batch of the examples at `index`."""

    @abstractmethod
    def features(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The backbone's feature vectors for a batch (what the heads read)."""

    @abstractmethod
    def tensorize(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Inputs as tensors with one example per row: what data-driven methods batch and keep."""

    @abstractmethod
    def batch_features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features of a batch of `tensorize`d rows (the feature function data-driven methods get)."""

    def head(self, model: nn.Module, task: Task, seed: int) -> dict[str, torch.Tensor]:
        """The task's frozen head: `probe`, a linear classifier fit on the pretrained backbone's
        features of the training split; `zeroshot`, the backbone's embeddings of the class
        descriptions (suites that can embed text)."""
        if self.heads == "zeroshot":
            return self.zero_shot_head(model, task)
        train = self.encode(*task.train)
        return fit_head(
            self.embed(model, train), train.labels, len(task.labels), seed=seed, weight_decay=self.head_weight_decay
        )

    def zero_shot_head(self, model: nn.Module, task: Task) -> dict[str, torch.Tensor]:
        raise FoldinError(f"the {self.name} suite has no zero-shot heads; use --heads probe.")

    def task_data(self, task: Task, head: dict[str, torch.Tensor] | None = None) -> TaskData:
        """A task's training split as data-driven methods see it."""
        return TaskData(self.tensorize(task.train[0]), torch.tensor(list(task.train[1])), head, task.name)

    @torch.no_grad()
    def embed(self, model: nn.Module, data: Encoded) -> torch.Tensor:
        model.eval()
        return torch.cat([self.features(model, b) for b in data.batches])

    def accuracy(self, model: nn.Module, head: Mapping[str, torch.Tensor], data: Encoded) -> float:
        logits = F.linear(self.embed(model, data), head["weight"], head["bias"])
        return float((logits.argmax(1) == data.labels).float().mean())

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What `continued` needs to resume fine-tuning `model` (what `fine_tune` returned)."""
        return model.state_dict()

    def continued(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """`model` holding a saved `training_state` of a continual fine-tuning run, to be fine-tuned further."""
        model.load_state_dict(state)
        return model

    def talk(self, model: nn.Module) -> dict[str, Any] | None:
        """Checks of what a merged model can still do beyond its tasks (generation, for an LLM);
        None where the suite's backbone only classifies."""
        return None

    def train_mode(self, model: nn.Module) -> None:
        """The module state during fine-tuning (dropout on, by default)."""
        model.train()

    def fine_tune(
        self,
        model: nn.Module,
        head: Mapping[str, torch.Tensor],
        inputs: Any,
        labels: Sequence[int],
        steps: int,
        lr: float,
        seed: int = 0,
        progress=None,
    ) -> nn.Module:
        """Fine-tune the backbone with the head frozen (AdamW, linear decay), in place; returns it."""
        batch = self.fine_tune_batch
        with seeded(seed):
            self.train_mode(model)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(1, steps))
            y = torch.tensor(list(labels))
            order = torch.randperm(len(y))
            for step in range(steps):
                start = (step * batch) % len(y)
                idx = order[start : start + batch]
                loss = F.cross_entropy(
                    F.linear(self.features(model, self.train_batch(inputs, idx)), head["weight"], head["bias"]), y[idx]
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                if progress is not None:
                    progress.update(1)
        return model.eval()


def hf(model: nn.Module) -> Any:
    """A Hugging Face or PEFT model, for calling what they add to nn.Module (save_pretrained,
    generate, get_output_embeddings): torch types any other attribute of a module as a Tensor or a
    Module, so these calls are untyped."""
    return model


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The global generator seeded for one run and restored afterwards: dropout draws from it, so
    the seed decides the run's draws, and nothing outside the run sees the seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fit_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    steps: int = 300,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> dict[str, torch.Tensor]:
    """A linear classifier on frozen features (full-batch Adam): the task's fixed head."""
    with seeded(seed):
        head = nn.Linear(features.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(features), labels).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def read_task_spec(spec_path: Path) -> tuple[str, Path, Path | None, dict[str, Any]]:
    """(name, train file, test file, the whole spec) from a user task's YAML file. A task with one
    labelled file names it as `data` instead of train and test: its test file is then None, and the
    suite splits it (`test_fraction`, see `split_fraction`)."""
    import yaml

    if not spec_path.is_file():
        raise FoldinError(f"task file {spec_path} does not exist.")
    try:
        spec = yaml.safe_load(spec_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FoldinError(f"{spec_path} is not a task file (YAML with name, train, test).") from e
    if not isinstance(spec, dict):
        raise FoldinError(f"{spec_path} is not a task file (YAML with name, train, test).")
    files = ("data",) if "data" in spec else ("train", "test")
    missing = [key for key in ("name", *files) if key not in spec]
    if missing:
        raise FoldinError(
            f"{spec_path} has no {' and no '.join(repr(k) for k in missing)}: a task file names its "
            "name, train and test (files relative to it), or its name and one data file to split."
        )
    if "data" in spec and ("train" in spec or "test" in spec):
        raise FoldinError(f"{spec_path} names both data and train / test: give one labelled file or the two splits.")
    for key in files:
        if not (spec_path.parent / spec[key]).is_file():
            raise FoldinError(f"task data file {spec_path.parent / spec[key]} does not exist.")
    split_fraction(spec_path, spec)
    paths = [spec_path.parent / spec[key] for key in files]
    return str(spec["name"]), paths[0], paths[1] if len(paths) > 1 else None, spec


def split_fraction(spec_path: Path, spec: dict[str, Any]) -> float:
    """The share of a one-file task's examples held out for testing (`test_fraction`, default 0.2),
    drawn with the zoo's seed."""
    fraction = spec.get("test_fraction", 0.2)
    if "test_fraction" in spec and "data" not in spec:
        raise FoldinError(f"{spec_path}: test_fraction splits a single data file; with train and test, drop it.")
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise FoldinError(f"{spec_path}: test_fraction must be a number between 0 and 1, not {fraction!r}.")
    return float(fraction)


def check_labels(name: str, labels: list[str]) -> list[str]:
    if len(labels) < 2:
        raise FoldinError(f"task {name!r} has fewer than two labels in its training data.")
    return labels
