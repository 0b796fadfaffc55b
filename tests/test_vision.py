"""The CNN vision suite: packaged image tasks, user image tasks, and a smoke zoo + bench + CLI on real
EfficientNet-Lite0 weights."""

from __future__ import annotations

import json

import pytest
import torch

from foldin import MergeState
from foldin.cli import main
from foldin.errors import FoldinError


def run(command: str, **paths: object) -> int:
    """The CLI on `command`'s words, each {name} in them replaced by `paths[name]` after the split,
    so that a folder whose path has a space stays one word."""
    return main([word.format(**paths) for word in command.split()])


def test_vision_tasks_from_real_packaged_images():
    from foldin.evaluation.vision.tasks import vision_suite

    mnist, digits, rotated, permuted = vision_suite(
        ["mnist", "digits", "rotated_mnist", "permuted_mnist"], max_train=40, max_test=20
    )
    for t in (mnist, digits, rotated, permuted):
        assert (
            t.train[0].dtype == torch.uint8 and t.train[0].ndim == 3 and len(t.train[1]) == 40 and len(t.test[1]) == 20
        )
        assert len(t.labels) == 10 and set(t.train[1]) <= set(range(10))
    assert digits.train[0].shape[1:] == (8, 8) and mnist.train[0].shape[1:] == (28, 28)
    # the variants are the same images with the same labels, transformed
    assert (
        torch.equal(rotated.train[0], torch.rot90(mnist.train[0], 1, dims=(1, 2)))
        and rotated.train[1] == mnist.train[1]
    )
    assert torch.equal(permuted.train[0].reshape(40, -1).sort(1).values, mnist.train[0].reshape(40, -1).sort(1).values)
    assert not torch.equal(permuted.train[0], mnist.train[0])


def test_user_vision_task_from_npz(tmp_path):
    import numpy as np

    from foldin.evaluation.vision.tasks import user_task as vision_user_task

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.savez(
            tmp_path / f"{split}.npz",
            images=rng.integers(0, 255, (12, 16, 16), dtype=np.uint8),
            labels=np.arange(12) % 3,
        )
    (tmp_path / "shapes.yaml").write_text("name: shapes\ntrain: train.npz\ntest: test.npz\nlabel_names: [a, b, c]\n")
    task = vision_user_task(tmp_path / "shapes.yaml")
    assert task.labels == ["a", "b", "c"] and task.train[0].shape == (12, 16, 16)
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 4, 4)))
    (tmp_path / "bad.yaml").write_text("name: bad\ntrain: bad.npz\ntest: test.npz\n")
    with pytest.raises(FoldinError, match="'images' and 'labels'"):
        vision_user_task(tmp_path / "bad.yaml")


def test_smoke_vision_zoo_bench_and_cli_on_real_weights(tmp_path, capsys, monkeypatch):
    """EfficientNet-Lite0 (real ImageNet weights), 2 real image tasks: zoo, bench with OPCM on
    convolution kernels, and a state built by the CLI from the zoo's checkpoint folders."""
    zoo = tmp_path / "zoo"
    sizes = "--tasks 2 --steps 3 --max-train 64 --max-test 64"
    assert run(f"zoo build --suite vision {sizes} --quiet --out {{zoo}}", zoo=zoo) == 0
    meta = json.loads((zoo / "zoo.json").read_text())
    assert meta["suite"] == "vision" and list(meta["tasks"]) == ["mnist", "digits"]
    out = tmp_path / "bench"
    methods = "task_arithmetic,opcm,opcm:linear_weights=.*conv.*weight,otmf:steps=4:head_refit=true,adamerging:steps=2"
    two_orders = "--orders 2 --full-matrix-orders 1 --cft-orders 0"
    assert run(f"bench --methods {methods} {two_orders} --quiet --out {{out}} --zoo {{zoo}}", out=out, zoo=zoo) == 0
    results = json.loads((out / "results.json").read_text())
    labels = {*methods.split(","), "otmf:steps=4"}  # the refit run also scores the no-refit ablation (zoo heads)
    assert results["suite"] == "vision" and set(results["methods"]) == labels
    assert not (out / "bench-progress.json").exists()
    # a stopped bench resumes: finished orders saved in bench-progress.json are not run again
    saved = {
        "settings": results["settings"],
        "orders": [r["order"] for r in results["methods"]["opcm"]["runs"]],
        "runs": {
            "opcm": [
                {**r, "final_acc": {n: 0.123 for n in r["final_acc"]}} for r in results["methods"]["opcm"]["runs"]
            ]
        },
    }
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "bench-progress.json").write_text(json.dumps(saved))
    assert run(f"bench --methods opcm {two_orders} --quiet --out {{out}} --zoo {{zoo}}", out=resumed, zoo=zoo) == 0
    again = json.loads((resumed / "results.json").read_text())["methods"]["opcm"]["runs"]
    assert all(v == 0.123 for r in again for v in r["final_acc"].values())
    assert results["methods"]["opcm:linear_weights=.*conv.*weight"]["linear_weights"] == ".*conv.*weight"
    assert "labels of 25%" in results["methods"]["otmf:steps=4:head_refit=true"]["data_use"]
    assert results["methods"]["otmf:steps=4"]["scored_from"].startswith("the otmf:steps=4:head_refit=true runs")
    report = (out / "report.md").read_text()
    assert "| adamerging:steps=2 |" in report
    # what was learned is kept per step: AdaMerging's two coefficients, in [0, 1], in results and report
    ada_steps = [s for r in results["methods"]["adamerging:steps=2"]["runs"] for s in r["step_stats"][1:]]
    assert len(ada_steps) == 2 and all(0.0 <= s[k] <= 1.0 for s in ada_steps for k in ("lambda_pre", "lambda_post"))
    assert "| adamerging:steps=2 | lambda_pre |" in report
    monkeypatch.setattr("foldin.progress.LOG_INTERVAL", 0.0)
    capsys.readouterr()
    assert run(f"bench --methods average {two_orders} --extend --out {{out}} --zoo {{zoo}}", out=out, zoo=zoo) == 0
    extended = json.loads((out / "results.json").read_text())
    assert set(extended["methods"]) == labels | {"average"} and len(extended["commands"]) == 2
    # each method has its own progress line, counting its own steps (a log gets a line per step here)
    assert "bench average: 4/4 step (order 2 of 2)" in capsys.readouterr().err
    other_seed = "--orders 2 --seed 7 --cft-orders 0 --extend --quiet"
    assert run(f"bench --methods average {other_seed} --out {{out}} --zoo {{zoo}}", out=out, zoo=zoo) == 1
    assert "--extend: the results already in the output directory" in capsys.readouterr().err
    state = tmp_path / "state"
    assert run("init {s} --method opcm --linear-weights .*conv.*\\.weight --base {b}", s=state, b=zoo / "base") == 0
    for name in ("mnist", "digits"):
        assert run("add {s} {t}", s=state, t=zoo / "tasks" / name) == 0
    learned = tmp_path / "otmf-state"
    assert run("init {s} --method otmf --set steps=2 --set head_refit=true --base {b}", s=learned, b=zoo / "base") == 0
    tasks = {"a": zoo / "tasks" / "mnist", "b": zoo / "tasks" / "digits"}
    assert run("add {s} {a} {b} --task vision:mnist --task vision:digits --quiet", s=learned, **tasks) == 0
    # the previous and the new task, refit at step 2
    assert set(MergeState.open(learned).heads()) == {"mnist", "digits"}
    capsys.readouterr()
    for s in (state, learned):
        assert run("eval {s} --zoo {zoo}", s=s, zoo=zoo) == 0
        assert "digits" in capsys.readouterr().out
