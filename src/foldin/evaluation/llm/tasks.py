"""The `llm` suite's tasks: the text suite's first eight tasks (the same data and splits), each asked
as an instruction whose answer is a class's verbalizer.

A verbalizer is a short word; the verbalizers of one task start with different tokens (checked
when the suite tokenizes them), so the class a model would start to answer with is read from one
forward pass: the logits of the verbalizers' first tokens at the prompt's last position.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Instruction:
    """What the user message asks, and the verbalizer of each of the task's labels."""

    question: str
    verbalizers: dict[str, str]  # label -> answer word


LLM_TASKS: dict[str, Instruction] = {
    "reuters_r8": Instruction(
        "What is this Reuters news story mainly about?",
        {
            "acq": "merger",
            "crude": "oil",
            "earn": "earnings",
            "grain": "grain",
            "interest": "interest",
            "money-fx": "currency",
            "ship": "shipping",
            "trade": "trade",
        },
    ),
    "newsgroups_comp": Instruction(
        "Which computer newsgroup was this post written for?",
        {
            "comp.graphics": "graphics",
            "comp.os.ms-windows.misc": "Windows",
            "comp.sys.ibm.pc.hardware": "PC",
            "comp.sys.mac.hardware": "Mac",
            "comp.windows.x": "X",
        },
    ),
    "newsgroups_science": Instruction(
        "Which science newsgroup was this post written for?",
        {"sci.crypt": "encryption", "sci.electronics": "electronics", "sci.med": "medicine", "sci.space": "space"},
    ),
    "election_tweets": Instruction(
        "Who wrote this tweet during the 2016 US election campaign?",
        {"HillaryClinton": "Clinton", "realDonaldTrump": "Trump"},
    ),
    "rotten_tomatoes": Instruction(
        "Is this movie review positive or negative?", {"fresh": "positive", "rotten": "negative"}
    ),
    "debate_speaker": Instruction(
        "Which candidate said this in a 2016 US presidential or vice-presidential debate?",
        {"CLINTON": "Clinton", "KAINE": "Kaine", "PENCE": "Pence", "TRUMP": "Trump"},
    ),
    "amazon_food": Instruction("Does this review say the food product is great?", {"great": "yes", "other": "no"}),
    "newsgroups_rec": Instruction(
        "Which recreation newsgroup was this post written for?",
        {
            "rec.autos": "cars",
            "rec.motorcycles": "motorcycles",
            "rec.sport.baseball": "baseball",
            "rec.sport.hockey": "hockey",
        },
    ),
}


def user_message(instruction: Instruction, labels: list[str], text: str) -> str:
    """The prompt's user turn: the question, the text, and the allowed answers in label order."""
    options = ", ".join(instruction.verbalizers[label] for label in labels)
    return f"{instruction.question}\n\n{text}\n\nAnswer with one word: {options}."
