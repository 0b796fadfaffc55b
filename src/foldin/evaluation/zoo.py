"""The model zoo: one fine-tuned checkpoint and one frozen head per task, built deterministically
from a seed, resumable task by task.

ZOO_DIR/
  zoo.json               suite, backbone, settings, and per task: source, labels, sizes,
                         pretrained_acc, finetuned_acc (the lift fine-tuning gives)
  base/                  (vision) the pretrained backbone as a checkpoint folder
  tasks/<name>/          model.safetensors (+ config and tokenizer for text: loadable by
                         AutoModel), head.safetensors, task.json
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from foldin.errors import FoldinError
from foldin.evaluation.suite import Suite, Task, fit_head, get_suite, read_task_spec
from foldin.state import write_json_atomic


def load_tasks(suite: Suite, settings: dict[str, Any], names: list[str] | None, task_files: list[str]) -> list[Task]:
    """The suite's built-in tasks plus user tasks, all of them or those named (only those are loaded)."""
    kw = {k: settings[k] for k in ("max_train", "max_test", "seed")}
    user = [suite.user_task(Path(f), **kw) for f in task_files]
    builtin = [n for n in suite.builtin_task_names() if names is None or n in names]
    builtin = [n for n in builtin if n not in {t.name for t in user}]
    tasks = (suite.builtin_tasks(builtin, **kw) if builtin else []) + user
    return tasks if names is None else [t for t in tasks if t.name in names]


@dataclass
class Zoo:
    dir: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, zoo_dir: str | Path) -> "Zoo":
        path = Path(zoo_dir) / "zoo.json"
        if not path.is_file():
            raise FoldinError(f"{zoo_dir} is not a model zoo (no zoo.json); build one with 'foldin zoo build'.")
        return cls(Path(zoo_dir), json.loads(path.read_text()))

    @property
    def backbone(self) -> Path:
        return Path(self.meta["backbone"])

    @cached_property
    def suite(self) -> Suite:
        return get_suite(self.meta["suite"], self.backbone)

    @property
    def task_names(self) -> list[str]:
        return list(self.meta["tasks"])

    def checkpoint(self, name: str) -> Path:
        return self.dir / "tasks" / name

    def head(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.checkpoint(name) / "head.safetensors")

    def tasks(self, names: list[str] | None = None) -> list[Task]:
        names = names or self.task_names
        unknown = set(names) - set(self.task_names)
        if unknown:
            raise FoldinError(f"task {sorted(unknown)[0]!r} is not in the zoo at {self.dir}; it has {', '.join(self.task_names)}.")
        loaded = load_tasks(self.suite, self.meta["settings"], names, self.meta.get("task_files", []))
        return [t for t in loaded if t.name in names]


def build_zoo(out: str | Path, suite_name: str = "text", n_tasks: int | None = None, task_files: list[str] | None = None,
              backbone: Path | None = None, progress: bool = True, **settings: Any) -> Zoo:
    """Build (or finish building) the zoo in `out`; tasks already built are skipped."""
    out = Path(out)
    suite = get_suite(suite_name, backbone)
    settings = {**suite.defaults, **{k: v for k, v in settings.items() if v is not None}}
    task_files = [str(Path(f).resolve()) for f in task_files or []]
    out.mkdir(parents=True, exist_ok=True)
    backbone = suite.base_checkpoint(out)
    meta_path = out / "zoo.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["suite"] != suite_name or meta["settings"] != settings or meta["backbone"] != str(backbone):
            raise FoldinError(f"{out} was built with other settings ({meta['suite']}, {meta['settings']}); use another directory.")
    else:
        meta = {"suite": suite_name, "backbone": str(backbone), "settings": settings, "task_files": task_files, "tasks": {}}
    meta["task_files"] = sorted(set(meta.get("task_files", [])) | set(task_files))
    user_names = [read_task_spec(Path(f))[0] for f in meta["task_files"]]
    names = (suite.builtin_task_names() + user_names)[:n_tasks] if n_tasks else None
    tasks = load_tasks(suite, settings, names, meta["task_files"])
    bar = tqdm(total=len(tasks) * settings["steps"], desc="building zoo", unit="step", disable=not progress or None, file=sys.stderr)
    for i, task in enumerate(tasks):
        folder = out / "tasks" / task.name
        if (folder / "task.json").exists():
            meta["tasks"][task.name] = json.loads((folder / "task.json").read_text())
            bar.update(settings["steps"])
            continue
        bar.set_postfix_str(task.name)
        meta["tasks"][task.name] = _build_task(suite, task, folder, settings, seed=settings["seed"] + 1000 * i, bar=bar)
        write_json_atomic(meta_path, meta)
    bar.close()
    write_json_atomic(meta_path, meta)
    return Zoo(out, meta)


def _build_task(suite: Suite, task: Task, folder: Path, settings: dict[str, Any], seed: int, bar) -> dict[str, Any]:
    started = time.time()
    model = suite.load_backbone()
    train, test = suite.encode(*task.train), suite.encode(*task.test)
    head = fit_head(suite.embed(model, train), train.labels, len(task.labels), seed=seed, weight_decay=suite.head_weight_decay)
    pretrained = suite.accuracy(model, head, test)
    suite.fine_tune(model, head, *task.train, steps=settings["steps"], lr=settings["lr"], seed=seed, progress=bar)
    finetuned = suite.accuracy(model, head, test)
    info = {"name": task.name, "source": task.source, "labels": task.labels, "n_train": len(task.train[1]),
            "n_test": len(task.test[1]), "pretrained_acc": pretrained, "finetuned_acc": finetuned,
            "seed": seed, "seconds": round(time.time() - started, 1)}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    suite.save_backbone(model, tmp)
    save_file(head, tmp / "head.safetensors")
    (tmp / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return info
