"""A user's text task: a YAML file naming CSV or JSONL files.

The YAML names: name, train, test (CSV or JSONL files, relative to the YAML; or one `data` file,
split with `test_fraction`, default 0.2), and optionally text (column, default "text"), label
(column, default "label") and classes (a mapping from each label to a description, for zero-shot
heads; default: the label itself).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from foldin.errors import FoldinError
from foldin.evaluation.suite import Task, read_task_spec, split_fraction
from foldin.evaluation.text.readers import Rows, seeded_split, to_task


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
    classes = spec.get("classes")
    if classes is not None and not isinstance(classes, dict):
        raise FoldinError(f"{spec_path}: classes must map each label to a short description of it.")
    train_rows = _read_table(train, text, label)
    if test is None:  # one labelled file: a seeded split
        train_rows, test_rows = seeded_split(train_rows, seed, split_fraction(spec_path, spec))
    else:
        test_rows = _read_table(test, text, label)
    described = (
        _check_classes(spec_path, {str(k): str(v) for k, v in classes.items()}, train_rows) if classes else None
    )
    return to_task(
        name,
        f"user task {spec_path.name}",
        train_rows,
        test_rows,
        max_train,
        max_test,
        seed,
        described,
    )


def _check_classes(spec_path: Path, classes: dict[str, str], rows: Rows) -> dict[str, str]:
    """`classes` must describe exactly the labels of the training data: a key that is no label (a
    typo) or a label left undescribed would silently fall back to the bare label. Without `classes`
    the bare labels are the descriptions, on purpose."""
    import difflib

    labels = sorted({label for label, _ in rows})
    for key in classes:
        if key not in labels:
            close = difflib.get_close_matches(key, labels, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FoldinError(
                f"{spec_path}: classes has {key!r}, which is not a label of the training data{hint}; "
                f"the labels are {', '.join(map(repr, labels))}."
            )
    missing = [label for label in labels if label not in classes]
    if missing:
        raise FoldinError(
            f"{spec_path}: classes describes no {', '.join(map(repr, missing))}; describe every label, or leave "
            "classes out to use the bare labels."
        )
    return classes
