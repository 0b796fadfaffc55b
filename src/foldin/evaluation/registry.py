"""The suites by name, and the task data a data-driven merge needs, from a suite's task."""

from __future__ import annotations

from pathlib import Path

from foldin.data import Learning
from foldin.errors import FoldinError
from foldin.evaluation.llm.suite import LlmSuite
from foldin.evaluation.suite import Suite
from foldin.evaluation.text.suite import TextSuite
from foldin.evaluation.vision.suite import VisionSuite
from foldin.evaluation.vit.suite import ViTSuite

SUITES: dict[str, type[Suite]] = {"text": TextSuite, "vision": VisionSuite, "vit": ViTSuite, "llm": LlmSuite}


def get_suite(name: str, backbone: Path | str | None = None, heads: str | None = None) -> Suite:
    if name not in SUITES:
        raise FoldinError(f"unknown suite {name!r}; available: {', '.join(SUITES)}.")
    return SUITES[name](backbone, heads)


def learning_for_task(spec: str, base: Path, checkpoint: Path) -> Learning:
    """The model and data a data-driven method needs, from `SUITE:TASK` (a built-in task name or a
    task YAML file), the state's base, and the checkpoint (its head.safetensors, if any, is the head;
    its task.json, as the zoo writes it, says which head protocol, and so which features, it uses)."""
    import json

    from safetensors.torch import load_file

    suite_name, sep, task_name = spec.partition(":")
    if not sep or not task_name:
        raise FoldinError(f"--task expects SUITE:TASK (e.g. text:reuters_r8), got {spec!r}.")
    info = Path(checkpoint) / "task.json"
    heads = json.loads(info.read_text()).get("heads", "probe") if info.is_file() else None
    suite = get_suite(suite_name, base if Path(base).is_dir() else None, heads)
    settings = {k: suite.defaults[k] for k in ("max_train", "max_test", "seed")}
    if task_name.endswith((".yaml", ".yml")):
        task = suite.user_task(Path(task_name), **settings)
    else:
        if task_name not in suite.builtin_task_names():
            raise FoldinError(
                f"unknown {suite_name} task {task_name!r}; available: {', '.join(suite.builtin_task_names())}."
            )
        (task,) = suite.builtin_tasks([task_name], **settings)
    head_file = Path(checkpoint) / "head.safetensors"
    head = load_file(head_file) if head_file.is_file() else None
    return Learning(suite.load_backbone(), suite.batch_features, suite.task_data(task, head))
