"""Does a merged LLM still talk? Two checks beside the task scores: its perplexity on held-out
English prose (passages of the Grimm tales, which no llm task trains on) and its greedy answers
to three fixed general chat prompts. A merge that breaks generation shows in both."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from foldin.evaluation.suite import hf
from foldin.evaluation.text.readers import grimm_passages

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me two tips for sleeping well.",
    "Write one sentence about the sea.",
)
HELD_OUT_PASSAGES = 32
PASSAGE_TOKENS = 128
ANSWER_TOKENS = 40
BATCH = 8


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str]) -> float:
    """exp of the mean next-token negative log-likelihood over every token of `texts` (each cut to
    PASSAGE_TOKENS), as the causal LM scores them without a chat template."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:PASSAGE_TOKENS] for t in texts]
    total, count = 0.0, 0
    for i in range(0, len(rows), BATCH):
        chunk = rows[i : i + BATCH]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    return math.exp(total / count)


@torch.no_grad()
def chat_answers(model: nn.Module, tokenizer, prompts: tuple[str, ...] = CHAT_PROMPTS) -> list[dict[str, str]]:
    """Greedy answers of at most ANSWER_TOKENS tokens, through the model's chat template."""
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=False
        )
        out = hf(model).generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=ANSWER_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers.append(
            {"prompt": prompt, "answer": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}
        )
    return answers


def talk_check(model: nn.Module, tokenizer) -> dict[str, Any]:
    model.eval()
    return {
        "perplexity": round(perplexity(model, tokenizer, grimm_passages(HELD_OUT_PASSAGES)), 3),
        "chat": chat_answers(model, tokenizer),
    }
