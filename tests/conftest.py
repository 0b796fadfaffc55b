"""Shared fixtures: small real checkpoint folders and a way to run the CLI."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from safetensors.torch import load_file, save_file

# property tests draw the same examples on every run: CI never fails on an example no one has seen
settings.register_profile("deterministic", derandomize=True)
settings.load_profile("deterministic")

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity"
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "parity"))


@pytest.fixture
def bert_case(tmp_path: Path) -> Path:
    """A writable copy of the tiny BERT case: base/ and ckpt_1..3/ Hugging Face folders."""
    dst = tmp_path / "bert"
    shutil.copytree(PARITY / "bert-tiny", dst, ignore=shutil.ignore_patterns("fusionbench"))
    return dst


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def write_variant(src: Path, dst: Path, change) -> Path:
    """Copy a HF folder, passing its state dict through `change(sd) -> sd`."""
    shutil.copytree(src, dst)
    sd = change(dict(read_weights(src)))
    save_file({k: v.contiguous() for k, v in sd.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def snapshot(state_dir: Path) -> dict[str, bytes]:
    """Every file of a state, by relative path (the lock file excluded), to prove it is untouched."""
    return {
        str(p.relative_to(state_dir)): p.read_bytes()
        for p in sorted(state_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }
