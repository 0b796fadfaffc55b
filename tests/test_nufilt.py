"""NUFILT: the per-layer filter and LoRA fit on tensors, the layer patterns on real architectures,
and the whole on-disk path on real checkpoint folders."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModel

from conftest import PARITY, read_weights
from foldin import MergeState
from foldin.api import merge
from foldin.errors import FoldinError
from foldin.io.hf_names import file_names
from foldin.methods.nufilt import LAYER_PATTERNS, NUFILTParams, filter_layer, layer_generator, selected


def _pair(seed: int, m: int = 24, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g), torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)


def _loss(task, merged, added, p: NUFILTParams) -> float:
    """The reference's objective at a given update, from its definition."""
    pre_v = torch.linalg.svd(merged, full_matrices=False).Vh.T[:, : p.null_r]
    task_v = torch.linalg.svd(task, full_matrices=False).Vh.T[:, : p.grad_r]
    new = merged + added
    return float(((new - task) @ task_v).square().sum() + ((new - merged) @ pre_v).square().sum())


@given(st.integers(0, 2**16), st.integers(1, 6))
def test_without_lora_the_update_is_orthogonal_to_the_merged_top_directions(seed, null_r):
    task, merged = _pair(seed)
    p = NUFILTParams(lora_r=0, null_r=null_r)
    added = filter_layer(task, merged, p, layer_generator(0, 2, "w"), fit=True)
    top = torch.linalg.svd(merged, full_matrices=False).Vh[:null_r].T
    assert (added @ top).abs().max() < 1e-4 * task.abs().max()
    # and it keeps the rest of the task vector: T P with P the projector off those directions
    assert torch.allclose(added, task - task @ top @ top.T, atol=1e-5)


def test_the_lora_fit_lowers_the_reference_objective_and_is_seeded():
    task, merged = _pair(1)
    p = NUFILTParams(lora_r=4, grad_r=2, null_r=3, max_steps=50, lr=1e-2)
    filtered = filter_layer(task, merged, NUFILTParams(lora_r=0, grad_r=2, null_r=3), layer_generator(0, 2, "w"), True)
    fitted = filter_layer(task, merged, p, layer_generator(0, 2, "w"), fit=True)
    assert _loss(task, merged, fitted, p) < 0.5 * _loss(task, merged, filtered, p)
    again = filter_layer(task, merged, p, layer_generator(0, 2, "w"), fit=True)
    other = filter_layer(task, merged, p, layer_generator(0, 2, "v"), fit=True)
    assert torch.equal(fitted, again) and not torch.equal(fitted, other)


def test_first_task_as_reference_zeroes_the_first_null_r_input_columns():
    task, _ = _pair(2)
    p = NUFILTParams(null_r=5, first_task="as_reference")
    added = filter_layer(task, torch.zeros_like(task), p, layer_generator(0, 1, "w"), fit=False)
    assert not added[:, :5].any() and torch.equal(added[:, 5:], task[:, 5:])


def _module_names(model) -> set[str]:
    """The nn.Linear layers of `model` as its checkpoint files name them (transformers 5 names some
    differently in memory): what NUFILT's patterns are matched against."""
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return {n.removesuffix(".weight") for n in file_names(model, linear).values()}


@pytest.mark.parametrize(
    ("family", "config", "expected"),
    [
        ("bert", PARITY / "bert-tiny" / "base", {"query", "key", "value", "attention.output.dense", "intermediate"}),
        ("clip", PARITY / "clip-vision-tiny" / "base", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1"}),
    ],
)
def test_layer_patterns_select_attention_and_the_first_mlp_projection(family, config, expected):
    """The default (all families' patterns) selects on each architecture exactly what its own do."""
    model = AutoModel.from_config(AutoConfig.from_pretrained(config))
    names = _module_names(model)
    own = {n for n in names if selected(n + ".weight", True, LAYER_PATTERNS[family])}
    default = {n for n in names if selected(n + ".weight", True, NUFILTParams().layers)}
    assert own == default and own
    assert {k for k in expected if any(n.endswith(k) or f".{k}." in n for n in own)} == expected
    assert not any(n.endswith(("fc2", "output.dense")) and "attention" not in n for n in own)


def test_layer_patterns_on_dinov2_and_llama_shapes():
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        dinov2 = _module_names(Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)))
        llama = _module_names(
            LlamaForCausalLM(
                LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
            )
        )
    pick = lambda names: {n.rsplit(".", 1)[-1] for n in names if selected(n + ".weight", True, NUFILTParams().layers)}
    assert pick(dinov2) == {"query", "key", "value", "dense", "fc1"}
    assert pick(llama) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}


def test_nufilt_on_real_checkpoint_folders_changes_only_the_selected_layers(bert_case, tmp_path):
    state = MergeState.create(tmp_path / "s", base=bert_case / "base", method="nufilt", params={"lora_r": 8})
    for i in (1, 2, 3):
        state.add(bert_case / f"ckpt_{i}", progress=False)
    state.export(tmp_path / "out")
    merged, base = read_weights(tmp_path / "out"), read_weights(bert_case / "base")
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(selected(k, True, LAYER_PATTERNS["bert"]) for k in changed)
    assert any("intermediate" in k for k in changed) and not any(k.endswith("bias") for k in changed)
    checkpoints = [read_weights(bert_case / f"ckpt_{i}") for i in (1, 2, 3)]
    module = AutoModel.from_pretrained(bert_case / "base")
    in_memory = merge(base, checkpoints, method="nufilt", lora_r=8, linear_weights=module)
    assert all(torch.allclose(in_memory[k], merged[k], atol=1e-6) for k in base)


def test_nufilt_refuses_layer_patterns_that_match_nothing(bert_case, tmp_path):
    state = MergeState.create(tmp_path / "s", base=bert_case / "base", method="nufilt", params={"layers": ["nothing"]})
    with pytest.raises(FoldinError, match="match no linear layer"):
        state.add(bert_case / "ckpt_1", progress=False)
    assert MergeState.open(tmp_path / "s").step == 0
