"""Persistence orderings that a power loss (not a SIGKILL) would expose: every directory entry a
commit depends on is flushed before the commit, and an export never leaves its folder missing.

Each test records the file-system operations of a real command (directory creations, renames,
exchanges, directory fsyncs) in the order the process issues them and checks the ordering rule.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import foldin.io.atomic as atomic
import foldin.state.create as create_module
import foldin.state.step as step_module
from conftest import read_weights
from foldin import MergeState


@pytest.fixture
def ops(monkeypatch) -> list[tuple[str, Path]]:
    """The log of mkdir / rename / replace / exchange / fsync_dir calls, with resolved paths."""
    log: list[tuple[str, Path]] = []
    real = {
        "mkdir": Path.mkdir,
        "rename": os.rename,
        "replace": os.replace,
        "exchange": getattr(atomic, "exchange", None),
    }
    real_fsync_dir = atomic.fsync_dir

    def fsync_dir(path):
        log.append(("fsync_dir", Path(path).resolve()))
        real_fsync_dir(path)

    def mkdir(self, *a, **kw):
        real["mkdir"](self, *a, **kw)
        log.append(("mkdir", self.resolve()))

    def rename(src, dst, *a, **kw):
        real["rename"](src, dst, *a, **kw)
        log.append(("rename", Path(dst).resolve()))

    def replace(src, dst, *a, **kw):
        real["replace"](src, dst, *a, **kw)
        log.append(("replace", Path(dst).resolve()))

    def exchange(a, b):
        done = real["exchange"](a, b)
        log.append(("exchange" if done else "no-exchange", Path(b).resolve()))
        return done

    monkeypatch.setattr(atomic, "fsync_dir", fsync_dir)
    monkeypatch.setattr(step_module, "fsync_dir", fsync_dir)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    if real["exchange"] is not None:
        monkeypatch.setattr(atomic, "exchange", exchange)
    return log


def _first(log, kind: str, pred=lambda p: True, after: int = -1) -> int:
    return next(i for i, (k, p) in enumerate(log) if i > after and k == kind and pred(p))


def test_add_flushes_the_new_generation_entry_before_state_json_names_it(bert_case, tmp_path, ops):
    state = MergeState.create(tmp_path / "s", base=bert_case / "base", method="task_arithmetic")
    ops.clear()
    state.add(bert_case / "ckpt_1", progress=False)
    state_dir = (tmp_path / "s").resolve()
    made = _first(ops, "mkdir", lambda p: p.parent == state_dir and p.name.startswith("gen-"))
    commit = _first(ops, "replace", lambda p: p == state_dir / "state.json")
    flushes = [i for i, (k, p) in enumerate(ops) if k == "fsync_dir" and p == state_dir]
    assert any(made < i < commit for i in flushes), ops


def test_init_flushes_every_folder_it_creates_in_its_parent(bert_case, tmp_path, ops):
    target = tmp_path / "a" / "b" / "state"
    MergeState.create(target, base=bert_case / "base", method="average")
    commit = _first(ops, "replace", lambda p: p == target.resolve() / "state.json")
    for folder in (tmp_path / "a", tmp_path / "a" / "b", target):
        made = _first(ops, "mkdir", lambda p, f=folder: p == f.resolve())
        flushed = _first(ops, "fsync_dir", lambda p, f=folder: p == f.resolve().parent, after=made)
        assert flushed < commit, (folder, ops)


def test_export_overwrite_swaps_the_folders_in_one_step(bert_case, tmp_path, ops):
    state = MergeState.create(tmp_path / "s", base=bert_case / "base", method="task_arithmetic")
    state.add(bert_case / "ckpt_1", progress=False)
    out = tmp_path / "out"
    state.export(out, progress=False)
    first = read_weights(out)
    state.add(bert_case / "ckpt_2", progress=False)
    ops.clear()
    state.export(out, overwrite=True, progress=False)
    touching_out = [(k, p) for k, p in ops if p == out.resolve() and k in ("rename", "exchange", "no-exchange")]
    assert touching_out == [("exchange", out.resolve())]  # no rename of OUT away: never missing
    assert not any(read_weights(out)[k].equal(first[k]) for k in first if "layer.0.attention.self.query" in k)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "out", "s"]  # the old folder is gone


def test_replace_dir_falls_back_to_two_renames_where_exchange_is_unsupported(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    target, new = tmp_path / "out", tmp_path / ".out.tmp"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    atomic.replace_dir(new, target)
    assert (target / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_io_error_while_init_writes_is_one_sentence_and_init_again_works(bert_case, tmp_path, monkeypatch, capsys):
    import errno

    from foldin.cli import main

    real = create_module.write_meta

    def failing(state_dir, meta):
        raise OSError(errno.EIO, "Input/output error", str(state_dir / "state.json"))

    monkeypatch.setattr(create_module, "write_meta", failing)
    argv = ["init", str(tmp_path / "state"), "--base", str(bert_case / "base"), "--method", "opcm"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("foldin: error: creating the state in") and "Input/output error" in err
    assert err.count("\n") == 1
    monkeypatch.setattr(create_module, "write_meta", real)
    assert main(argv) == 0 and MergeState.open(tmp_path / "state").step == 0


def test_zoo_build_and_bench_flush_every_folder_before_what_they_commit_in_it(tmp_path, ops):
    """Found by benchmarks/crash/check_resume_files.py: the bench's output folder and the zoo's
    folders were made without flushing their entries, so a power loss after the command returned
    could lose results.json or a finished task; the vision suite's base was written in place, so a
    torn base/model.safetensors was trusted by the next build."""
    from foldin.cli import main

    zoo, out = tmp_path / "zoo", tmp_path / "bench"
    small = ["--tasks", "1", "--steps", "1", "--max-train", "16", "--max-test", "16", "--quiet"]
    assert main(["zoo", "build", "--suite", "vision", *small, "--out", str(zoo)]) == 0
    bench = "bench --methods average --orders 1 --cft-orders 0 --quiet".split()
    assert main([*bench, "--zoo", str(zoo), "--out", str(out)]) == 0
    zoo, out = zoo.resolve(), out.resolve()
    for folder, commit in (
        (zoo, ("rename", zoo / "base")),
        (zoo / "tasks", ("rename", zoo / "tasks" / "mnist")),
        (out, ("replace", out / "results.json")),
    ):
        made = _first(ops, "mkdir", lambda p, f=folder: p == f)
        flushed = _first(ops, "fsync_dir", lambda p, f=folder: p == f.parent, after=made)
        assert flushed < _first(ops, commit[0], lambda p, c=commit[1]: p == c), (folder, ops)
    assert ("mkdir", zoo / "base") not in ops  # the base is written whole beside it, then moved in
