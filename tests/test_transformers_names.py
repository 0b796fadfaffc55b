"""transformers 5 renamed some modules in memory (DINOv2's attention.attention.query is
attention.q_proj) and maps the names when it loads and saves. foldin merges by the names in the
files: a folder written either way must keep its names through a merge, have every nn.Linear
found, and load back into the model. Runs with whichever transformers is installed."""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import load_file

from foldin import MergeState
from foldin.io.hf_names import to_model_names


def _dinov2(seed: int):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14
    )
    torch.manual_seed(seed)
    return Dinov2Model(config).eval()


@pytest.mark.parametrize("original_names", [True, False], ids=["as-published", "as-in-memory"])
def test_a_dinov2_folder_keeps_its_names_through_a_merge_and_loads_back(tmp_path, original_names):
    base = _dinov2(0)
    if not original_names and "save_original_format" not in inspect.signature(base.save_pretrained).parameters:
        pytest.skip("this transformers writes the names it holds in memory: one naming only")
    kwargs = {} if original_names else {"save_original_format": False}
    base.save_pretrained(tmp_path / "base", **kwargs)
    tuned = _dinov2(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tuned.save_pretrained(tmp_path / "tuned", **kwargs)

    state = MergeState.create(tmp_path / "state", tmp_path / "base", "opcm")
    per_layer = len(state.meta["linear_weights"]) / 2
    assert per_layer == 6  # query, key, value, attention output, fc1, fc2: none missed for its name
    state.add(tmp_path / "tuned", progress=False)
    out = state.export(tmp_path / "out", progress=False)

    written, merged = load_file(tmp_path / "base" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(merged) == set(written)  # the folder's own names, whichever they are
    from transformers import Dinov2Model

    loaded = Dinov2Model.from_pretrained(out)
    own = loaded.state_dict()
    renamed = to_model_names(loaded, merged)
    assert all(torch.equal(own[n], renamed[n]) for n in renamed if n in own)
    assert set(renamed) >= {n for n in own if "weight" in n}
