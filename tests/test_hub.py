"""Models named by Hub id, resolved offline from a Hugging Face cache the test fills, as
huggingface_hub lays it out (refs/ and snapshots/ under models--org--name)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import PARITY

BERT = PARITY / "bert-tiny"
COMMITS = {"base": "a" * 40, "ckpt_1": "b" * 40, "ckpt_2": "c" * 40}


def _cache(root: Path) -> Path:
    """A Hub cache holding the tiny BERT as acme/bert-base and two fine-tunes as acme/bert-task-{1,2}."""
    for folder, repo in (("base", "acme/bert-base"), ("ckpt_1", "acme/bert-task-1"), ("ckpt_2", "acme/bert-task-2")):
        storage = root / f"models--{repo.replace('/', '--')}"
        shutil.copytree(BERT / folder, storage / "snapshots" / COMMITS[folder])
        (storage / "refs").mkdir()
        (storage / "refs" / "main").write_text(COMMITS[folder])
    return root


def _foldin(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "foldin.cli", *args], env=env, capture_output=True, text=True)


def test_hub_ids_resolve_from_the_cache_and_are_recorded(tmp_path):
    cache = _cache(tmp_path / "hub")
    state = tmp_path / "state"
    assert _foldin(cache, "init", str(state), "--base", "acme/bert-base", "--method", "average").returncode == 0
    added = _foldin(cache, "add", str(state), "acme/bert-task-1", f"acme/bert-task-2@{COMMITS['ckpt_2']}", "--quiet")
    assert added.returncode == 0, added.stderr
    info = yaml.safe_load(_foldin(cache, "info", str(state), "--json").stdout)
    assert info["history"][0]["source"] == f"acme/bert-task-1@{COMMITS['ckpt_1']}"
    assert info["history"][1]["source"] == f"acme/bert-task-2@{COMMITS['ckpt_2']}"
    assert _foldin(cache, "export", str(state), str(tmp_path / "out"), "--quiet").returncode == 0
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "acme/bert-base" and front["base_model_relation"] == "merge"
    assert front["library_name"] == "transformers"
    recipe = yaml.safe_load(card.split("```yaml")[1].split("```")[0])
    assert recipe["base"] == f"acme/bert-base@{COMMITS['base']}" and recipe["method"] == "average"
    assert recipe["checkpoints"] == [f"acme/bert-task-1@{COMMITS['ckpt_1']}", f"acme/bert-task-2@{COMMITS['ckpt_2']}"]
    # the card's recipe makes the same model again
    (tmp_path / "again.yaml").write_text(yaml.safe_dump({**recipe, "output": "again"}))
    rerun = _foldin(cache, "run", str(tmp_path / "again.yaml"), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "out" / "model.safetensors"
    ).read_bytes()


def test_an_id_that_cannot_be_resolved_is_named_in_one_sentence(tmp_path):
    cache = _cache(tmp_path / "hub")
    failed = _foldin(cache, "init", str(tmp_path / "s"), "--base", "acme/no-such-model", "--method", "average")
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1
    assert "could not get acme/no-such-model: it is not in the Hugging Face cache" in failed.stderr
    assert not (tmp_path / "s").exists()
    missing = _foldin(cache, "init", str(tmp_path / "s"), "--base", "./not/here", "--method", "average")
    assert missing.returncode == 1 and "not/here does not exist" in missing.stderr
