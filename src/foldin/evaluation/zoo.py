"""The model zoo: one fine-tuned checkpoint and one frozen head per task, built deterministically
from a seed, resumable task by task, and self-contained: a user task's spec and data files are
copied into the zoo when it is built, so the zoo can be scored after the originals have moved.

ZOO_DIR/
  zoo.json               suite, backbone, settings (including the head protocol), the user tasks
                         and per task: source, labels, sizes, pretrained_acc, finetuned_acc
  base/                  (vision, vit, llm) the pretrained backbone as a checkpoint folder
  user-tasks/<name>/     a user task's YAML and data files, as they were when the task was built
  tasks/<name>/          model.safetensors (+ config and tokenizer for text: loadable by
                         AutoModel), or (llm) a PEFT LoRA adapter of base/; head.safetensors, task.json
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from foldin.errors import FoldinError
from foldin.evaluation.registry import get_suite
from foldin.evaluation.suite import Suite, Task, read_task_spec
from foldin.io.atomic import make_dirs, write_dir_atomic, write_json_atomic
from foldin.io.checkpoint import open_checkpoint
from foldin.io.lora import open_model_or_adapter
from foldin.progress import progress as progress_bar

USER_TASKS = "user-tasks"


def _settings_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The zoo's settings; zoos built before heads were a setting used linear probes."""
    return {"heads": "probe", **meta["settings"]}


@dataclass
class Zoo:
    dir: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, zoo_dir: str | Path) -> Zoo:
        path = Path(zoo_dir) / "zoo.json"
        if not path.is_file():
            raise FoldinError(f"{zoo_dir} is not a model zoo (no zoo.json); build one with 'foldin zoo build'.")
        return cls(Path(zoo_dir), json.loads(path.read_text()))

    @property
    def backbone(self) -> Path:
        return Path(self.meta["backbone"])

    @property
    def settings(self) -> dict[str, Any]:
        return _settings_of(self.meta)

    @cached_property
    def suite(self) -> Suite:
        return get_suite(self.meta["suite"], self.backbone, self.settings["heads"])

    @property
    def task_names(self) -> list[str]:
        return list(self.meta["tasks"])

    def checkpoint(self, name: str) -> Path:
        return self.dir / "tasks" / name

    def base_state(self) -> dict[str, torch.Tensor]:
        with open_checkpoint(self.backbone) as base:
            return {n: base.read(n) for n in base.names()}

    def task_state(self, name: str) -> dict[str, torch.Tensor]:
        """A task's fine-tuned weights as a state dict: its model folder's tensors, or the base with
        its LoRA adapter applied (what foldin folds in when given the adapter folder)."""
        with open_checkpoint(self.backbone) as base, open_model_or_adapter(self.checkpoint(name), base) as ckpt:
            return {n: ckpt.read(n) for n in ckpt.names()}

    def head(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.checkpoint(name) / "head.safetensors")

    def tasks(self, names: list[str] | None = None) -> list[Task]:
        """The named tasks (default: all), with their test splits; only those are loaded."""
        names = names or self.task_names
        unknown = set(names) - set(self.task_names)
        if unknown:
            raise FoldinError(
                f"task {sorted(unknown)[0]!r} is not in the zoo at {self.dir}; it has {', '.join(self.task_names)}."
            )
        user = self.meta.get("user_tasks", {})
        files = {n: self.dir / user[n] for n in names if n in user}
        loaded = {t.name: t for t in load_tasks(self.suite, self.settings, [n for n in names if n not in user], files)}
        return [loaded[n] for n in names]


def load_tasks(suite: Suite, settings: dict[str, Any], builtin: list[str], user_files: dict[str, Path]) -> list[Task]:
    """The named built-in tasks and the user tasks of `user_files` (name -> YAML), in that order."""
    kw = {k: settings[k] for k in ("max_train", "max_test", "seed")}
    tasks = suite.builtin_tasks(builtin, **kw) if builtin else []
    for name, path in user_files.items():
        task = suite.user_task(path, **kw)
        if task.name != name:
            raise FoldinError(f"{path} names its task {task.name!r}, but the zoo holds it as {name!r}.")
        tasks.append(task)
    return tasks


def _copy_user_task(spec: Path, out: Path) -> tuple[str, str]:
    """Copy a user task's YAML and its data files into the zoo; returns (task name, path in the zoo)."""
    name, train, test, _ = read_task_spec(spec)
    folder = out / USER_TASKS / name

    def copy(tmp: Path) -> None:
        for f in (spec, train, *([test] if test else [])):
            target = tmp / f.relative_to(spec.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)

    write_dir_atomic(folder, copy)
    return name, str((folder / spec.name).relative_to(out))


def build_zoo(
    out: str | Path,
    suite_name: str = "text",
    builtin: list[str] | None = None,
    task_files: list[str] | None = None,
    backbone: Path | None = None,
    progress: bool = True,
    **settings: Any,
) -> Zoo:
    """Build (or finish building) the zoo in `out`: the built-in tasks named in `builtin` (None:
    all of the suite's) and the user tasks of `task_files` (YAML files). Built tasks are skipped.
    A build that fails before its first task is written leaves no folder behind."""
    out = Path(out)
    meta_path = out / "zoo.json"
    existed = out.exists()
    try:
        return _build(
            out, meta_path, suite_name, builtin, [Path(f) for f in task_files or []], backbone, progress, settings
        )
    except BaseException:
        if not existed and not meta_path.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _build(
    out: Path,
    meta_path: Path,
    suite_name: str,
    builtin: list[str] | None,
    task_files: list[Path],
    backbone: Path | None,
    progress: bool,
    settings: dict[str, Any],
) -> Zoo:
    suite = get_suite(suite_name, backbone, settings.get("heads"))
    settings = {**suite.defaults, **{k: v for k, v in settings.items() if v is not None}}
    names = suite.builtin_task_names() if builtin is None else builtin
    unknown = set(names) - set(suite.builtin_task_names())
    if unknown:
        raise FoldinError(
            f"unknown {suite_name} task {sorted(unknown)[0]!r}; available: {', '.join(suite.builtin_task_names())}."
        )
    for f in task_files:  # check every user task before anything is built or copied
        suite.user_task(f, **{k: settings[k] for k in ("max_train", "max_test", "seed")})
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["suite"] != suite_name or _settings_of(meta) != settings:
            raise FoldinError(
                f"{out} was built with other settings ({meta['suite']}, {_settings_of(meta)}); use another directory."
            )
        meta["settings"] = settings
    else:
        meta = {"suite": suite_name, "backbone": None, "settings": settings, "user_tasks": {}, "tasks": {}}
    make_dirs(out)  # durably: the tasks written into it must not outlive its entry
    backbone_path = str(suite.base_checkpoint(out))
    if meta["backbone"] not in (None, backbone_path):
        raise FoldinError(
            f"{out} was built from the backbone {meta['backbone']}, not {backbone_path}; use another directory."
        )
    meta["backbone"] = backbone_path
    user = meta.setdefault("user_tasks", {})
    for f in task_files:
        name, path = _copy_user_task(f, out)
        user[name] = path
    wanted = [n for n in names if n not in user] + [n for n in user if n in {read_task_spec(f)[0] for f in task_files}]
    todo = [n for n in wanted if not (out / "tasks" / n / "task.json").exists()]
    for n in wanted:
        if n not in todo:
            meta["tasks"][n] = json.loads((out / "tasks" / n / "task.json").read_text())
    tasks = load_tasks(
        suite, settings, [n for n in todo if n not in user], {n: out / user[n] for n in todo if n in user}
    )
    bar = progress_bar(total=len(tasks) * settings["steps"], desc="building zoo", unit="step", enabled=progress)
    for task in tasks:
        bar.set_postfix_str(task.name)
        seed = settings["seed"] + 1000 * _task_index(suite, task.name, user)
        meta["tasks"][task.name] = _build_task(suite, task, out / "tasks" / task.name, settings, seed, bar)
        write_json_atomic(meta_path, meta)
    bar.close()
    meta["tasks"] = dict(sorted(meta["tasks"].items(), key=lambda item: _task_index(suite, item[0], user)))
    write_json_atomic(meta_path, meta)
    return Zoo(out, meta)


def _task_index(suite: Suite, name: str, user: dict[str, str]) -> int:
    """A task's place in the suite (user tasks after the built-in ones): its fine-tuning seed offset,
    the same whichever other tasks a zoo holds."""
    builtin = suite.builtin_task_names()
    return builtin.index(name) if name in builtin else len(builtin) + list(user).index(name)


def _build_task(suite: Suite, task: Task, folder: Path, settings: dict[str, Any], seed: int, bar) -> dict[str, Any]:
    started = time.time()
    model = suite.load_backbone()
    test = suite.encode(*task.test)
    head = suite.head(model, task, seed)
    pretrained = suite.accuracy(model, head, test)
    model = suite.fine_tune(
        model, head, *task.train, steps=settings["steps"], lr=settings["lr"], seed=seed, progress=bar
    )
    finetuned = suite.accuracy(model, head, test)
    info = {
        "name": task.name,
        "source": task.source,
        "labels": task.labels,
        "descriptions": list(task.descriptions),
        "heads": settings["heads"],
        "n_train": len(task.train[1]),
        "n_test": len(task.test[1]),
        "pretrained_acc": pretrained,
        "finetuned_acc": finetuned,
        "seed": seed,
        "seconds": round(time.time() - started, 1),
    }

    def write(tmp: Path) -> None:
        suite.save_backbone(model, tmp)
        save_file(head, tmp / "head.safetensors")
        write_json_atomic(tmp / "task.json", info)

    write_dir_atomic(folder, write)
    return info
