"""What a new user meets: building only their own task into a self-contained zoo, an export that
never deletes what it did not write, progress lines in logs, helpful errors."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import PARITY
from foldin.cli import main
from foldin.progress import LogProgress, SettlingBar

BERT = PARITY / "bert-tiny"


def _user_task(folder: Path, label: str = "label") -> Path:
    folder.mkdir(parents=True)

    def rows(numbers: range) -> str:
        return "text,label\n" + "".join(
            f"{'great food and loved it' if i % 2 else 'awful and cold and late'} {i},{'pos' if i % 2 else 'neg'}\n"
            for i in numbers
        )

    (folder / "train.csv").write_text(rows(range(24)))
    (folder / "test.csv").write_text(rows(range(24, 40)))
    (folder / "mine.yaml").write_text(
        f"name: mine\ntrain: train.csv\ntest: test.csv\nlabel: {label}\n"
        "classes: {pos: a positive review, neg: a negative review}\n"
    )
    return folder / "mine.yaml"


def test_zoo_build_with_task_files_alone_builds_only_them_into_a_self_contained_zoo(tmp_path, capsys):
    spec = _user_task(tmp_path / "mytask")
    zoo = tmp_path / "zoo"
    small = ["--steps", "2", "--max-train", "16", "--max-test", "16", "--out", str(zoo), "--quiet"]
    assert main(["zoo", "build", "--task", str(spec), *small]) == 0
    meta = json.loads((zoo / "zoo.json").read_text())
    assert list(meta["tasks"]) == ["mine"]  # no built-in task was fine-tuned
    assert meta["tasks"]["mine"]["descriptions"] == ["a negative review", "a positive review"]
    shutil.rmtree(tmp_path / "mytask")  # the zoo holds its own copy of the task
    capsys.readouterr()
    assert main(["eval", str(zoo / "tasks" / "mine"), "--zoo", str(zoo)]) == 0
    table = capsys.readouterr().out
    assert "pretrained" in table and "fine-tuned" in table and table.splitlines()[-1].startswith("mean")
    (zoo / "user-tasks" / "mine" / "test.csv").unlink()
    assert main(["eval", str(zoo / "tasks" / "mine"), "--zoo", str(zoo)]) == 1
    assert "test.csv does not exist" in capsys.readouterr().err


def test_a_failed_zoo_build_leaves_no_folder_behind(tmp_path, capsys):
    spec = _user_task(tmp_path / "mytask", label="stars")
    assert main(["zoo", "build", "--task", str(spec), "--out", str(tmp_path / "zoo"), "--quiet"]) == 1
    assert "no column 'stars'" in capsys.readouterr().err
    assert not (tmp_path / "zoo").exists()


def _state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    assert main(["init", str(state), "--base", str(BERT / "base"), "--method", "average"]) == 0
    assert main(["add", str(state), str(BERT / "ckpt_1"), "--quiet"]) == 0
    return state


def test_export_overwrites_only_its_own_folders(tmp_path, capsys, monkeypatch):
    state = _state(tmp_path)
    out = tmp_path / "merged"
    assert main(["export", str(state), str(out), "--quiet"]) == 0
    assert main(["export", str(state), str(out), "--overwrite", "--quiet"]) == 0  # a previous export is replaced
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(state), str(out), "--overwrite", "--quiet"]) == 1
    assert "did not write (notes.txt)" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("x")
    assert main(["export", str(state), str(mine), "--overwrite", "--quiet"]) == 1
    assert "is not one" in capsys.readouterr().err and (mine / "data.csv").exists()
    monkeypatch.chdir(tmp_path)
    for target, reason in [
        (".", "current folder"),
        ("..", "current folder"),
        (str(state), "merge state"),
        (str(state / "inside"), "merge state"),
        (str(BERT / "base"), "base model"),
    ]:
        assert main(["export", str(state), target, "--overwrite", "--quiet"]) == 1
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1 and "Traceback" not in err
    assert (BERT / "base" / "model.safetensors").exists()


def test_progress_lines_when_the_output_is_a_log():
    stream = io.StringIO()
    bar = LogProgress(total=4, desc="building zoo", unit="step", interval=0, stream=stream)
    bar.set_postfix_str("reuters_r8")
    for _ in range(4):
        bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[1].startswith("building zoo: 2/4 step (reuters_r8),") and "left" in lines[1]


def test_no_time_left_is_estimated_before_the_rate_settles():
    """A slow start (loading, a first evaluation) would make the first estimate hours long: the time
    left is estimated from the first unit on, once 2% of the work (and 2 units) are done after it."""
    stream = io.StringIO()
    bar = LogProgress(total=200, desc="bench", unit="step", interval=0, stream=stream)
    bar.started -= 3600  # an hour of set-up before the first step
    for _ in range(5):
        bar.update(1)
    lines = stream.getvalue().splitlines()
    assert all(line.endswith("estimating the time left") for line in lines[:4])  # 4 = 2% of 200, after the first
    assert "about" in lines[4] and "h" not in lines[4].split("about")[1]  # seconds, not the set-up's hour


def test_the_terminal_bar_estimates_from_the_first_unit_once_settled():
    """The same rule on a terminal's bar: no time left before 2% of the work is done after the
    first unit, then one measured from that unit, not from an hour of set-up."""
    bar = SettlingBar(total=200, desc="bench", unit="step", file=io.StringIO(), mininterval=0)
    bar.start_t -= 3600  # an hour of set-up before the first step
    shown = []
    for _ in range(6):
        bar.update(1)
        shown.append(str(bar))
    assert all(line.endswith("estimating the time left]") for line in shown[:4]) and "[1:00:00," in shown[0]
    remaining = shown[5].split("<")[1].split(",")[0]  # [elapsed<remaining, rate]
    assert remaining.count(":") == 1  # mm:ss, not the hours that the set-up's rate would give
    bar.close()


def test_a_step_prints_progress_lines_into_a_log(tmp_path):
    state = tmp_path / "s"
    assert main(["init", str(state), "--base", str(BERT / "base"), "--method", "opcm"]) == 0
    env = {**os.environ, "FOLDIN_PROGRESS_SECONDS": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "foldin.cli", "add", str(state), str(BERT / "ckpt_1")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "step 1: projecting:" in run.stderr and "tensor" in run.stderr


def test_a_misspelt_parameter_lists_the_methods_parameters(tmp_path, capsys):
    assert (
        main(
            [
                "init",
                str(tmp_path / "s"),
                "--base",
                str(BERT / "base"),
                "--method",
                "task_arithmetic",
                "--set",
                "scaling_facter=0.3",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert (
        "no parameter 'scaling_facter'; did you mean 'scaling_factor'?" in err
        and "its parameters: scaling_factor" in err
    )
    assert not (tmp_path / "s").exists()


def _cast_copy(src: Path, out: Path, dtype) -> Path:
    """A copy of the checkpoint folder `src` with its floating tensors cast to `dtype`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(src / "model.safetensors")
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, out / "model.safetensors")
    return out


def test_half_precision_checkpoints_of_a_float32_base_are_widened_and_merged(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    state = tmp_path / "state"
    assert main(["init", str(state), "--base", str(BERT / "base"), "--method", "task_arithmetic"]) == 0
    half = _cast_copy(BERT / "ckpt_1", tmp_path / "half", torch.float16)
    brain = _cast_copy(BERT / "ckpt_2", tmp_path / "brain", torch.bfloat16)
    capsys.readouterr()
    assert main(["add", str(state), str(half), str(brain), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "its float16 tensors widened" in out and "its bfloat16 tensors widened" in out
    assert main(["export", str(state), str(tmp_path / "merged"), "--quiet"]) == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(BERT / "base" / "model.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    taus = [load_file(f / "model.safetensors")[name].float() - base[name] for f in (half, brain)]
    assert merged[name].dtype == torch.float32
    assert torch.allclose(merged[name], base[name] + 0.3 * (taus[0] + taus[1]), atol=1e-6)
    assert json.loads((state / "state.json").read_text())["history"][0]["widened_from"] == ["float16"]
    wide = _cast_copy(BERT / "ckpt_3", tmp_path / "wide", torch.float64)
    assert main(["add", str(state), str(wide), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert (
        "cast the checkpoint to torch.float32" in err and json.loads((state / "state.json").read_text())["step"] == 2
    )


def test_a_class_key_that_is_no_label_or_a_label_left_undescribed_is_named(tmp_path, capsys):
    spec = _user_task(tmp_path / "mytask")
    text = spec.read_text()
    cases = {
        "{poss: a positive review, neg: a negative review}": ["'poss'", "did you mean 'pos'?", "'neg', 'pos'"],
        "{pos: a positive review}": ["describes no 'neg'", "leave classes out"],
    }
    for classes, words in cases.items():
        spec.write_text(text.replace("{pos: a positive review, neg: a negative review}", classes))
        capsys.readouterr()
        assert (
            main(["zoo", "build", "--task", str(spec), "--steps", "1", "--out", str(tmp_path / "z"), "--quiet"]) == 1
        )
        err = capsys.readouterr().err
        assert all(w in err for w in words) and err.count("\n") == 1, err
        assert not (tmp_path / "z").exists()
    spec.write_text("\n".join(line for line in text.splitlines() if not line.startswith("classes")))
    small = ["--steps", "1", "--max-train", "8", "--max-test", "8", "--out", str(tmp_path / "z"), "--quiet"]
    assert main(["zoo", "build", "--task", str(spec), *small]) == 0  # no classes: the bare labels, on purpose
    assert json.loads((tmp_path / "z" / "zoo.json").read_text())["tasks"]["mine"]["descriptions"] == ["neg", "pos"]


def test_a_task_with_one_labelled_file_is_split_by_test_fraction(tmp_path, capsys):
    spec = _user_task(tmp_path / "mytask")
    folder = spec.parent
    rows = (folder / "train.csv").read_text() + "".join((folder / "test.csv").read_text().splitlines(True)[1:])
    (folder / "all.csv").write_text(rows)
    text = spec.read_text().replace("train: train.csv\ntest: test.csv\n", "data: all.csv\ntest_fraction: 0.25\n")
    spec.write_text(text)
    small = ["--steps", "1", "--max-train", "64", "--max-test", "64", "--quiet"]
    assert main(["zoo", "build", "--task", str(spec), *small, "--out", str(tmp_path / "z")]) == 0
    task = json.loads((tmp_path / "z" / "zoo.json").read_text())["tasks"]["mine"]
    assert (task["n_train"], task["n_test"]) == (30, 10)  # 40 rows, a quarter held out
    assert (tmp_path / "z" / "user-tasks" / "mine" / "all.csv").is_file()
    for bad, words in {
        text.replace("data: all.csv\n", "data: all.csv\ntrain: train.csv\n"): "both data and train",
        text.replace("test_fraction: 0.25", "test_fraction: 1.5"): "between 0 and 1",
    }.items():
        spec.write_text(bad)
        capsys.readouterr()
        assert main(["zoo", "build", "--task", str(spec), *small, "--out", str(tmp_path / "z2")]) == 1
        assert words in capsys.readouterr().err


def test_setup_and_the_demo_say_what_they_do_before_the_long_parts():
    """A first set-up spends minutes in pip: set-up announces the venv, torch, foldin, the packaged
    models and any Debian package before it starts on them, and the demo speaks before set-up."""
    scripts = Path(__file__).parents[1] / "scripts"
    announced: list[str] = []
    for line in (scripts / "setup.sh").read_text().splitlines():
        code = line.split("  #")[0].strip()
        if re.search(r'\bsay "', code):  # a call, not the function's definition
            announced.append(code)
        if any(long in code for long in ("-m venv", "pip install", "apt-get install")):
            assert announced, f"setup.sh starts {code!r} before saying what it does"
    assert len(announced) >= 5
    demo = [line.strip() for line in (scripts / "demo.sh").read_text().splitlines()]
    assert demo.index("bash scripts/setup.sh") > next(i for i, line in enumerate(demo) if line.startswith("echo "))
