"""A merge method from another package: installed as a `foldin.methods` entry point (a dist-info
folder on the path, as pip leaves it), or named by FOLDIN_METHODS; listed, used by init and add,
and reopened by a later process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import read_weights

PLUGIN = """
from foldin.methods import register
from foldin.methods.base import FoldResult, MergeMethod, MethodParams


class HalfSumParams(MethodParams):
    factor: float = 0.5


@register
class HalfSum(MergeMethod):
    name = "half_sum"
    Params = HalfSumParams
    summary = "A test plugin: the sum of the task vectors, times a factor at export."

    def fold(self, ctx):
        ctx.update(lambda s: (s.merged + s.task_vector, None), desc="summing")
        return FoldResult()

    def scale(self, stats):
        return self.params.factor
"""


def _install(site: Path, entry_point: bool) -> None:
    """A package `foldin_half_sum` in `site`; with `entry_point`, the dist-info pip would write."""
    (site / "foldin_half_sum").mkdir(parents=True)
    (site / "foldin_half_sum" / "__init__.py").write_text(PLUGIN)
    if entry_point:
        info = site / "foldin_half_sum-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: foldin-half-sum\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[foldin.methods]\nhalf_sum = foldin_half_sum\n")


def _foldin(site: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "foldin.cli", *args], capture_output=True, text=True, env=environ, check=False
    )


def test_an_installed_plugin_method_is_listed_used_and_reopened(bert_case, tmp_path):
    site = tmp_path / "site"
    _install(site, entry_point=True)
    listing = _foldin(site, "methods", "--json")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["half_sum"]["params"]["factor"]["default"] == 0.5
    state, out = tmp_path / "state", tmp_path / "out"
    for argv in (
        ["init", str(state), "--base", str(bert_case / "base"), "--method", "half_sum", "--set", "factor=0.25"],
        ["add", str(state), str(bert_case / "ckpt_1"), str(bert_case / "ckpt_2"), "--quiet"],
        ["export", str(state), str(out), "--quiet"],  # a new process reopens the state
    ):
        done = _foldin(site, *argv)
        assert done.returncode == 0, done.stderr
    base = read_weights(bert_case / "base")
    ckpts = [read_weights(bert_case / f"ckpt_{i}") for i in (1, 2)]
    merged = read_weights(out)
    for name, b in base.items():
        if b.is_floating_point():
            expected = b + 0.25 * ((ckpts[0][name] - b) + (ckpts[1][name] - b))
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    without = _foldin(tmp_path / "empty", "info", str(state))  # the plugin missing: one sentence, not a traceback
    assert without.returncode == 1 and without.stderr.count("\n") == 1 and "half_sum" in without.stderr


def test_a_plugin_module_named_by_the_environment_is_listed_and_used(bert_case, tmp_path):
    site = tmp_path / "site"
    _install(site, entry_point=False)
    env = {"FOLDIN_METHODS": "foldin_half_sum"}
    assert "half_sum" in json.loads(_foldin(site, "methods", "--json", env=env).stdout)
    state = tmp_path / "state"
    init = _foldin(site, "init", str(state), "--base", str(bert_case / "base"), "--method", "half_sum", env=env)
    assert init.returncode == 0, init.stderr
    assert json.loads(_foldin(site, "info", str(state), "--json", env=env).stdout)["method"] == "half_sum"


def test_a_plugin_that_fails_to_import_is_named(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    done = _foldin(site, "methods", env={"FOLDIN_METHODS": "no_such_plugin_module"})
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "FOLDIN_METHODS module 'no_such_plugin_module' could not be loaded" in done.stderr
