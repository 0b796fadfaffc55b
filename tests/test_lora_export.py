"""Export as a LoRA adapter, checked with PEFT itself: loaded by PeftModel.from_pretrained and
merged into the base, it equals the dense export when the rank covers the change."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel

from conftest import FIXTURES, PARITY
from foldin import MergeState
from foldin.cli import main
from foldin.io.checkpoint import open_checkpoint
from foldin.io.lora import open_model_or_adapter
from foldin.io.lora_export import low_rank_factors

peft = pytest.importorskip("peft", reason="PEFT checks the adapter: pip install peft")
BASE = PARITY / "bert-tiny" / "base"


def _peft_merged(adapter) -> dict[str, torch.Tensor]:
    model = peft.PeftModel.from_pretrained(BertModel.from_pretrained(BASE), adapter).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_low_rank_factors_are_the_truncated_svd():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    b, a, kept = low_rank_factors(delta.float(), 3)
    s = torch.linalg.svdvals(delta)
    assert kept == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-6)
    assert torch.linalg.matrix_norm((b @ a).double() - delta) == pytest.approx(float(s[3:].norm()), rel=1e-5)
    wide_b, wide_a, everything = low_rank_factors(delta.float(), 8)  # more than min(m, n): zero-padded, exact
    assert (
        wide_b.shape == (9, 8)
        and everything == pytest.approx(1.0)
        and torch.allclose(wide_b @ wide_a, delta.float(), atol=1e-5)
    )


def test_adapters_folded_in_come_back_as_one_adapter_peft_loads(tmp_path, capsys):
    """Two LoRA adapters (ranks 2 and 4) folded in by task arithmetic: every change has rank <= 6,
    so a rank-6 export holds it exactly, and nothing outside the linear layers changed."""
    state = tmp_path / "state"
    assert (
        main(["init", str(state), "--base", str(BASE), "--method", "task_arithmetic", "--set", "scaling_factor=0.5"])
        == 0
    )
    assert (
        main(
            ["add", str(state), str(FIXTURES / "lora" / "adapter_1"), str(FIXTURES / "lora" / "adapter_2"), "--quiet"]
        )
        == 0
    )
    assert main(["export", str(state), str(tmp_path / "dense"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(state), str(tmp_path / "lora"), "--lora-rank", "6", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "energy kept mean 100.0%" in out
    size = (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size
    assert f"{size / 1e6:.1f} MB (" in out and "of the full model's" in out
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    merged = _peft_merged(tmp_path / "lora")
    for name, expected in dense.items():
        if expected.is_floating_point():
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 6 and config["modules_to_save"] is None and config["bias"] == "none"


def test_a_full_fine_tune_needs_full_tensors_and_keeps_the_energy_it_says(tmp_path, capsys):
    state = MergeState.create(tmp_path / "state", BASE, "average")
    for i in (1, 2):
        state.add(PARITY / "bert-tiny" / f"ckpt_{i}", progress=False)
    with pytest.raises(Exception, match="cannot hold .*--lora-full-tensors"):
        state.export_lora(tmp_path / "lora", 2)
    assert not (tmp_path / "lora").exists()
    energy = state.export_lora(tmp_path / "lora", 2, full_tensors=True, progress=False)
    state.export(tmp_path / "dense", progress=False)
    dense, merged = load_file(tmp_path / "dense" / "model.safetensors"), _peft_merged(tmp_path / "lora")
    base = load_file(BASE / "model.safetensors")
    targets = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["target_modules"]
    linear = {f"{module}.weight" for module in targets}
    assert len(linear) == 13  # every nn.Linear of the tiny BERT, found at export (average did not need them)
    for name, expected in dense.items():
        if not expected.is_floating_point():
            continue
        if name in linear:  # the rank-2 approximation: the error is the energy it leaves out
            change, kept = (expected - base[name]).double(), energy[name]
            error = torch.linalg.matrix_norm((merged[name] - base[name]).double() - change) ** 2
            assert 0 < kept < 1 and float(error) == pytest.approx((1 - kept) * float(change.square().sum()), rel=1e-3)
        else:  # biases, norms, embeddings: stored whole
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=0)
    report = json.loads((tmp_path / "lora" / "lora-energy.json").read_text())
    assert report["energy_kept"] == pytest.approx(energy) and report["rank"] == 2
    with open_checkpoint(BASE) as base_ckpt, open_model_or_adapter(tmp_path / "lora", base_ckpt) as ours:
        for name in base:  # foldin reads its own adapter back, whole tensors included, as PEFT merges it
            torch.testing.assert_close(ours.read(name), merged[name], rtol=1e-6, atol=1e-6)
