"""Power-loss crash states of foldin's writing commands, enumerated from a strace of the real
command (benchmarks/crash): the short form of `python benchmarks/crash/check_crashes.py`, every
crash point with its all-lost, all-persisted and single-drop states, for init, add and export."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "crash"))

from check_crashes import check, scenarios  # noqa: E402


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (scripts/setup.sh installs it)")
@pytest.mark.parametrize("name", ["init", "add", "add-opcm", "export", "export-overwrite"])
def test_no_crash_state_loses_the_state_or_the_export(name, tmp_path):
    result = check(scenarios()[name], tmp_path, samples=0, seed=0)
    assert result["operations"] > 5 and result["states"] > result["operations"]
    assert result["lost"] == 0, result["failures"]
    assert result["touched_outside"] == []
