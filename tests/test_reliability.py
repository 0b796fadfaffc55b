"""Crash safety, full disks and concurrent writers, with real processes and real file systems.

Short forms run in CI. Long forms on demand:
    FOLDIN_KILL_TRIALS=200 .venv/bin/python -m pytest -q tests/test_reliability.py -m slow -s
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import snapshot
from foldin import MergeState
from foldin.cli import main

KILL_METHODS = ["opcm", "ties", "task_arithmetic", "average"]


def medium_model(folder: Path, seed: int) -> Path:
    """Big enough (~9 MB) that a kill lands inside the step, small enough to run many times."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    sd = {f"layer{i}.{p}.weight": torch.randn(256, 256, generator=g) for i in range(6) for p in ("q", "k", "v")}
    sd.update({f"layer{i}.norm.weight": torch.randn(256, generator=g) for i in range(6)})
    save_file(sd, folder / "model.safetensors")
    return folder


def cli_add(state: Path, ckpt: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "foldin.cli", "add", str(state), str(ckpt), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **kw,
    )


def merged_bytes(state_dir: Path) -> bytes:
    s = MergeState.open(state_dir)
    return (state_dir / s.meta["generation"] / "merged.safetensors").read_bytes()


def kill_trials(work: Path, methods: list[str], trials: int, seed: int = 0) -> dict[str, dict[str, int]]:
    """SIGKILL `foldin add` of checkpoint 2 at random moments; after each kill the state must open,
    be at step 1 or 2 bitwise equal to an uninterrupted run, verify, and accept the remaining adds."""
    base = medium_model(work / "base", 0)
    ckpts = [medium_model(work / f"ck{i}", i + 1) for i in range(3)]
    rng = random.Random(seed)
    outcomes: dict[str, dict[str, int]] = {}
    for m, method in enumerate(methods):
        ref_dir = work / f"ref-{method}"
        MergeState.create(ref_dir, base, method)
        ref, started = [], time.perf_counter()
        for c in ckpts:  # the reference runs through the same CLI path as the killed processes
            assert cli_add(ref_dir, c).wait() == 0
            ref.append(merged_bytes(ref_dir))
        full = (time.perf_counter() - started) / len(ckpts)  # one uninterrupted add, process start included
        counts = outcomes.setdefault(method, {"trials": 0, "old": 0, "new": 0, "lost": 0})
        for trial in range(trials // len(methods) + (m < trials % len(methods))):
            sdir = work / f"s-{method}-{trial}"
            s = MergeState.create(sdir, base, method)
            s.add(ckpts[0], progress=False)
            proc = cli_add(sdir, ckpts[1])
            time.sleep(rng.uniform(0.3, 1.1) * full)  # mostly inside the step, sometimes after it
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            s = MergeState.open(sdir)
            counts["trials"] += 1
            if s.step not in (1, 2) or merged_bytes(sdir) != ref[s.step - 1]:
                counts["lost"] += 1
                continue
            counts["old" if s.step == 1 else "new"] += 1
            s.verify()
            for c in ckpts[s.step :]:  # the interrupted add can simply be retried, and the next one follows
                s.add(c, progress=False)
            assert merged_bytes(sdir) == ref[2], (
                f"{method} trial {trial}: resumed run differs from an uninterrupted one"
            )
            assert len(list(sdir.glob("gen-*"))) == 1  # leftovers were cleaned up
            shutil.rmtree(sdir)
    return outcomes


def test_kill_minus_nine_leaves_the_old_or_the_new_step(tmp_path):
    outcomes = kill_trials(tmp_path, ["opcm", "ties"], trials=8)
    assert all(c["lost"] == 0 for c in outcomes.values()), outcomes
    assert sum(c["old"] for c in outcomes.values()) > 0, f"no kill landed inside a step: {outcomes}"


@pytest.mark.slow
def test_kill_minus_nine_long_form(tmp_path):
    trials = int(os.environ.get("FOLDIN_KILL_TRIALS", "200"))
    started = time.time()
    outcomes = kill_trials(tmp_path, KILL_METHODS, trials, seed=1)
    print(json.dumps({"trials": trials, "seconds": round(time.time() - started), "outcomes": outcomes}))
    assert all(c["lost"] == 0 for c in outcomes.values()), outcomes


def test_two_concurrent_adds_fold_in_each_checkpoint_at_most_once(tmp_path):
    """Two real `foldin add` processes on one state at once: one wins, the other fails clearly
    (or runs after it); the history never holds a checkpoint twice or loses one that succeeded."""
    base = medium_model(tmp_path / "base", 0)
    ckpts = [medium_model(tmp_path / f"ck{i}", i + 1) for i in range(2)]
    MergeState.create(tmp_path / "s", base, "opcm")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "foldin.cli", "add", str(tmp_path / "s"), str(c), "--quiet"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in ckpts
    ]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc == 0 or "in use by another foldin process" in err
    succeeded = {c.resolve() for c, (rc, _) in zip(ckpts, results) if rc == 0}
    state = MergeState.open(tmp_path / "s")
    assert {Path(e["checkpoint"]) for e in state.history} == succeeded and state.step == len(succeeded) >= 1
    assert main(["verify", str(tmp_path / "s")]) == 0


def _small_tmpfs(where: Path, size_bytes: int) -> Path:
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode:
        pytest.skip(
            f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'not root'}); the "
            f"injected-ENOSPC tests still run"
        )
    return where


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="mounting a tmpfs needs root on Linux")
def test_a_really_full_disk_during_add_and_export(tmp_path, capsys):
    base = medium_model(tmp_path / "base", 0)
    ckpts = [medium_model(tmp_path / f"ck{i}", i + 1) for i in range(2)]
    generation = 6 * 3 * 256 * 256 * 4 + 6 * 256 * 4
    disk = _small_tmpfs(tmp_path / "disk", int(generation * 1.6))
    try:
        state = disk / "state"
        assert main(["init", str(state), "--base", str(base), "--method", "opcm"]) == 0
        assert main(["add", str(state), str(ckpts[0]), "--quiet"]) == 0
        before = snapshot(state)
        capsys.readouterr()
        for args in (["add", str(state), str(ckpts[1])], ["export", str(state), str(disk / "out")]):
            assert main([*args, "--quiet"]) == 1
            err = capsys.readouterr().err
            assert "No space left on device" in err and err.count("\n") == 1, err
            assert snapshot(state) == before
            assert sorted(p.name for p in disk.iterdir()) == ["state"]  # nothing half-written left behind
        assert main(["verify", str(state)]) == 0
    finally:
        subprocess.run(["umount", str(disk)], check=False)
