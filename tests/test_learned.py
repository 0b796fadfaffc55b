"""Data-driven methods (OTMF, task-wise AdaMerging): the Sinkhorn loss against an independent
computation, the masks' identities, and continual runs through the API and the on-disk state, on
a tiny real BERT (the committed parity fixture) with token inputs."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from conftest import PARITY
from foldin import ContinualMerger, MergeState, TaskData
from foldin.data import Learning
from foldin.errors import FoldinError
from foldin.methods.adamerging import prediction_entropy
from foldin.methods.learned import FunctionalModel, LinearWeights, add_task_vectors
from foldin.methods.otmf import masked_fusion, sinkhorn_divergence


def entropic_ot(x: torch.Tensor, y: torch.Tensor, eps: float, iters: int = 5000) -> torch.Tensor:
    """Entropic OT between uniform point clouds, cost |x-y|^2/2, by plain log-domain Sinkhorn
    iterations (no epsilon-scaling), value = <a, f> + <b, g> at convergence."""
    cost = torch.cdist(x, y) ** 2 / 2
    log_a, log_b = (
        torch.full((len(x),), -math.log(len(x)), dtype=x.dtype),
        torch.full((len(y),), -math.log(len(y)), dtype=x.dtype),
    )
    f, g = torch.zeros(len(x), dtype=x.dtype), torch.zeros(len(y), dtype=x.dtype)
    for _ in range(iters):
        f = -eps * torch.logsumexp(log_b[None, :] + (g[None, :] - cost) / eps, dim=1)
        g = -eps * torch.logsumexp(log_a[:, None] + (f[:, None] - cost) / eps, dim=0)
    return log_a.exp() @ f + log_b.exp() @ g


def test_sinkhorn_divergence_matches_an_independent_log_domain_sinkhorn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64) * 0.3
    y = torch.randn(12, 8, generator=g, dtype=torch.float64) * 0.3 + 0.2
    eps = 0.05**2
    reference = entropic_ot(x, y, eps) - entropic_ot(x, x, eps) / 2 - entropic_ot(y, y, eps) / 2
    assert float(sinkhorn_divergence(x, y, scaling=0.999)) == pytest.approx(float(reference), rel=1e-5)
    # the training loss uses geomloss's default annealing (scaling 0.5), as the research code does: within a few %
    assert float(sinkhorn_divergence(x, y)) == pytest.approx(float(reference), rel=0.05)
    assert float(sinkhorn_divergence(x, x)) == pytest.approx(0.0, abs=1e-6)


def test_masks_at_ones_are_plain_alpha_interpolation():
    g = torch.Generator().manual_seed(1)
    pre, post = {"w": torch.randn(5, 3, generator=g)}, {"w": torch.randn(5, 3, generator=g)}
    ones = {"w": torch.ones(5, 3)}
    assert torch.allclose(masked_fusion(pre, post, ones, ones, 0.8)["w"], 0.8 * pre["w"] + 0.2 * post["w"])


def test_prediction_entropy():
    assert float(prediction_entropy(torch.zeros(2, 4))) == pytest.approx(math.log(4))
    assert float(prediction_entropy(torch.tensor([[100.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def _tiny_bert():
    folders = [PARITY / "bert-tiny" / n for n in ("base", "ckpt_1", "ckpt_2", "ckpt_3")]
    return AutoModel.from_pretrained(folders[0]), [load_file(f / "model.safetensors") for f in folders], folders


def _features(module, batch):
    return module(**batch).last_hidden_state.mean(1)


def _data(i: int, n: int = 24) -> TaskData:
    g = torch.Generator().manual_seed(100 + i)
    ids = torch.randint(1, 64, (n, 10), generator=g)
    head = {"weight": torch.randn(3, 32, generator=g), "bias": torch.zeros(3)}
    return TaskData(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        torch.randint(0, 3, (n,), generator=g),
        head,
        f"task{i}",
    )


def test_mask_gradients_by_the_chain_rule_equal_autograd_through_the_fusion():
    """OTMF and AdaMerging differentiate the loss with respect to the weights and apply the chain
    rule themselves (LinearWeights); that must be what autograd gives through the whole fusion."""
    module, (base, a, b, _), _ = _tiny_bert()
    tau_pre, tau_post = ({n: t[n] - base[n] for n in base} for t in (a, b))
    g = torch.Generator().manual_seed(3)
    m_pre = {n: (1 + 0.1 * torch.randn(t.shape, generator=g)).requires_grad_() for n, t in base.items()}
    batch = _data(0).batch(torch.arange(6))
    model = FunctionalModel(Learning(module, _features, _data(0)))
    expected = (
        model(add_task_vectors(base, (0.8, {n: m_pre[n] * tau_pre[n] for n in base}), (0.2, tau_post)), batch)
        .square()
        .sum()
    )
    expected.backward()
    weights = LinearWeights(model, base)
    weights.fill((0.8, m_pre, tau_pre), (0.2, None, tau_post))
    loss, grads = weights.gradient(lambda features: features(batch).square().sum())
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    for name, m in m_pre.items():
        if m.grad is None:
            assert grads[name] is None or not grads[name].any()
        else:
            assert torch.allclose(grads[name] * tau_pre[name] * 0.8, m.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize(
    "method,params", [("otmf", {"steps": 4}), ("otmf", {"steps": 4, "head_refit": True}), ("adamerging", {"steps": 3})]
)
def test_continual_api_run(method, params):
    module, (base, *ckpts), _ = _tiny_bert()
    merger = ContinualMerger(base, method, module=module, features=_features, buffer_size=8, **params)
    for i, ckpt in enumerate(ckpts):
        merger.partial_fit(ckpt, data=_data(i))
        assert len(merger.buffer_) == 8 and merger.buffer_.name == f"task{i}"
    merged = merger.merged_state_dict()
    assert all(torch.isfinite(t).all() for t in merged.values() if t.dtype.is_floating_point)
    assert (
        merged["encoder.layer.0.attention.self.query.weight"].shape
        == base["encoder.layer.0.attention.self.query.weight"].shape
    )
    if params.get("head_refit"):
        assert set(merger.heads_) == {
            "task0",
            "task1",
            "task2",
        }  # the previous and the new task's heads, at steps 2 and 3
    if method == "adamerging":
        assert 0.0 <= merger.stats_["lambda_pre"] <= 1.0 and 0.0 <= merger.stats_["lambda_post"] <= 1.0


def test_head_refit_changes_the_heads_and_not_the_merged_weights():
    """What lets `foldin bench` score the no-refit ablation from the refit run."""
    module, (base, *ckpts), _ = _tiny_bert()
    mergers = [
        ContinualMerger(base, "otmf", module=module, features=_features, buffer_size=8, steps=4, head_refit=refit)
        for refit in (False, True)
    ]
    for merger in mergers:
        for i, ckpt in enumerate(ckpts):
            merger.partial_fit(ckpt, data=_data(i))
    plain, refit = (m.merged_state_dict() for m in mergers)
    assert all(torch.equal(plain[n], refit[n]) for n in plain)
    assert not mergers[0].heads_ and set(mergers[1].heads_) == {"task0", "task1", "task2"}
    assert not torch.equal(
        mergers[1].heads_["task2"]["weight"], _data(2).head["weight"]
    )  # the final task's head, refit too


def test_otmf_records_what_its_masks_learned():
    module, (base, *ckpts), _ = _tiny_bert()
    merger = ContinualMerger(base, "otmf", module=module, features=_features, buffer_size=8, steps=6, lr=0.05)
    merger.partial_fit(ckpts[0], data=_data(0)).partial_fit(ckpts[1], data=_data(1))
    stats = merger.stats_
    for side in ("pre", "post"):
        assert stats[f"mask_{side}_p5"] <= stats[f"mask_{side}_mean"] <= stats[f"mask_{side}_p95"]
        assert stats[f"mask_{side}_p95"] - stats[f"mask_{side}_p5"] > 0  # the masks moved away from ones
    assert stats["norm_ratio"] > 0 and stats["norm_ratio"] != pytest.approx(1.0, abs=1e-9)


def test_mask_statistics_are_exact_order_statistics():
    from foldin.methods.otmf import mask_statistics

    stats = mask_statistics({"a": torch.arange(1.0, 61.0), "b": torch.arange(61.0, 101.0).reshape(8, 5)}, "m")
    assert stats == {"m_mean": 50.5, "m_p5": 5.0, "m_p95": 95.0}


def test_adamerging_starts_from_the_merged_model_and_a_third_of_the_new_task():
    """Its defaults (1.0, 0.3): with no optimisation step, the fusion is tau_pre + 0.3 tau_post."""
    module, (base, *ckpts), _ = _tiny_bert()
    merger = ContinualMerger(base, "adamerging", module=module, features=_features, steps=0)
    merger.partial_fit(ckpts[0], data=_data(0)).partial_fit(ckpts[1], data=_data(1))
    name = "encoder.layer.1.output.dense.weight"
    expected = base[name] + (ckpts[0][name] - base[name]) + 0.3 * (ckpts[1][name] - base[name])
    assert torch.allclose(merger.merged_state_dict()[name], expected, atol=1e-6)
    assert (merger.stats_["lambda_pre"], merger.stats_["lambda_post"]) == pytest.approx((1.0, 0.3))


def test_otmf_without_masks_is_alpha_interpolation_of_task_vectors():
    module, (base, *ckpts), _ = _tiny_bert()
    merger = ContinualMerger(base, "otmf", module=module, features=_features, masks=False, alpha=0.7)
    merger.partial_fit(ckpts[0], data=_data(0)).partial_fit(ckpts[1], data=_data(1))
    name = "encoder.layer.1.output.dense.weight"
    expected = base[name] + 0.7 * (ckpts[0][name] - base[name]) + 0.3 * (ckpts[1][name] - base[name])
    assert torch.allclose(merger.merged_state_dict()[name], expected, atol=1e-6)


def test_a_duplicate_is_refused_before_the_learning_starts(tmp_path):
    """A million optimisation steps would never end: the duplicate must be caught when the
    checkpoint has been read, before learning, through the API and the on-disk state."""
    module, (base, *ckpts), folders = _tiny_bert()
    merger = ContinualMerger(base, "otmf", module=module, features=_features, steps=1_000_000).partial_fit(
        ckpts[0], data=_data(0)
    )
    with pytest.raises(FoldinError, match="identical to one already folded in"):
        merger.partial_fit(ckpts[0], data=_data(1))
    state = MergeState.create(tmp_path / "s", folders[0], "otmf", {"steps": 1_000_000})
    state.add(folders[1], progress=False, learning=Learning(module, _features, _data(0)))
    with pytest.raises(FoldinError, match="already folded in at step 1"):
        state.add(folders[1], progress=False, learning=Learning(module, _features, _data(1)))
    assert MergeState.open(state.dir).step == 1


def test_data_driven_method_without_data_is_refused():
    module, (base, *ckpts), _ = _tiny_bert()
    with pytest.raises(FoldinError, match="learns from data"):
        ContinualMerger(base, "otmf", module=module, features=_features).partial_fit(ckpts[0])


def test_state_with_otmf_keeps_its_size_and_resumes(tmp_path):
    """Three tiny continual steps through the on-disk state: the buffer and the merged task vector
    are all it keeps (constant size), and a later `add` reads the buffer back."""
    module, _, folders = _tiny_bert()
    state = MergeState.create(tmp_path / "s", folders[0], "otmf", {"steps": 4, "buffer_size": 8})
    sizes = []
    for i, folder in enumerate(folders[1:]):
        state = MergeState.open(tmp_path / "s")  # another day: everything comes from disk
        entry = state.add(folder, progress=False, learning=Learning(module, _features, _data(i)))
        assert entry["task"] == f"task{i}"
        assert state.buffer().name == f"task{i}" and len(state.buffer()) == 8
        sizes.append(
            sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file() and p.name != "state.json")
        )
    assert sizes[0] == sizes[1] == sizes[2]
    with pytest.raises(FoldinError, match="learns from data"):
        state.add(folders[1], progress=False)
    assert state.step == 3
