"""Power-loss crash states of foldin's writing commands, enumerated from a strace of the real
command (benchmarks/crash): the short form of `python benchmarks/crash/check_crashes.py`, every
crash point with its all-lost, all-persisted and single-drop states, for init, add and export."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "crash"))

from check_crashes import check  # noqa: E402
from crashsim import crash_states, durable, identities  # noqa: E402
from scenarios import scenarios  # noqa: E402
from tracing import Op  # noqa: E402


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (scripts/setup.sh installs it)")
@pytest.mark.parametrize("name", ["init", "add", "add-opcm", "export", "export-overwrite"])
def test_no_crash_state_loses_the_state_or_the_export(name, tmp_path):
    result = check(scenarios()[name], tmp_path, samples=0, seed=0)
    assert result["operations"] > 5 and result["states"] > result["operations"]
    assert result["lost"] == 0, result["failures"]
    assert result["touched_outside"] == []


@pytest.mark.skipif(shutil.which("cc") is None, reason="the fault-injection library needs a C compiler")
def test_an_io_error_at_any_write_or_fsync_leaves_one_sentence_and_a_sound_state(tmp_path):
    """EIO and ENOSPC at every write and every fsync of `add` and `export --overwrite`, one at a time
    (benchmarks/crash/check_faults.py, which preloads its own library into a subprocess)."""
    import json
    import subprocess

    script = Path(__file__).parents[1] / "benchmarks" / "crash" / "check_faults.py"
    argv = [sys.executable, str(script), "--scenarios", "add,export-overwrite", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("add", "export-overwrite"):
        r = json.loads((tmp_path / f"{name}.json").read_text())
        assert r["writes"] > 10 and r["fsyncs"] >= 5 and r["faults"] == 2 * (r["writes"] + r["fsyncs"])
        assert r["lost"] == 0 and sum(r["after the fault"].values()) == r["faults"]


def test_a_file_fsynced_under_its_new_name_after_a_rename_has_durable_writes():
    """Durability follows the file, not its name: a write to a temporary file that is renamed and
    then fsynced under its final name is durable (the inode was flushed); without that fsync it is not."""
    ops = [
        Op(0, "create", "/w/.tmp1"),
        Op(1, "write", "/w/.tmp1", start=0, size=3, data=b"abc"),
        Op(2, "rename", "/w/.tmp1", dest="/w/model"),
        Op(3, "fsync", "/w/model"),
        Op(4, "fsync", "/w"),
    ]
    assert durable(ops, 5, identities(ops)) == [True] * 5
    assert durable(ops, 3, identities(ops)) == [False, False, False]
    unsynced = [*ops[:3], Op(3, "fsync", "/w")]
    assert durable(unsynced, 4, identities(unsynced)) == [True, False, True, True]
    assert all(1 in s.kept for s in crash_states(ops) if s.point == 5)
