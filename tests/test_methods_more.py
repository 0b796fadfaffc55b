"""MagMax and DOP on plain tensors: the rules themselves, against independent computations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foldin import ContinualMerger
from foldin.methods.dop import DOPParams, ProjectedLoss, adam_merge, exact_merge, min_norm_weights, principal_basis
from foldin.methods.magmax import max_magnitude


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), steps=st.integers(1, 4))
def test_magmax_keeps_the_largest_magnitude_seen_and_the_later_on_ties(seed, steps):
    gen = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randint(-9, 10, (6, 5), generator=gen).float(),
        "b": torch.randint(-9, 10, (5,), generator=gen).float(),
    }
    # small integers: task vectors are exact in float32 and ties of magnitude are frequent
    taus = [{n: torch.randint(-3, 4, t.shape, generator=gen).float() for n, t in base.items()} for _ in range(steps)]
    taus[0]["w"][0, 0] = 7.0 + torch.arange(steps).numel()  # never all-zero, and checkpoints differ from each other
    for i, tau in enumerate(taus):
        tau["b"][0] = 10.0 + i
    merger = ContinualMerger(base, "magmax", scaling_factor=0.5)
    for tau in taus:
        merger.partial_fit({n: base[n] + tau[n] for n in base})
    for n in base:
        stacked = torch.stack([t[n] for t in taus])  # whole history at once: the last index of the max |.|
        last_max = steps - 1 - stacked.abs().flip(0).argmax(0)
        expected = stacked.gather(0, last_max.unsqueeze(0)).squeeze(0)
        torch.testing.assert_close(merger.merged_state_dict()[n], base[n] + 0.5 * expected)
    assert torch.equal(max_magnitude(torch.tensor([2.0, -1.0]), torch.tensor([-2.0, 0.5])), torch.tensor([-2.0, -1.0]))


def _layer(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=gen) * 0.05
    pre, post = (base + torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen) * 1e-2 for _ in range(2))
    return base, pre, post


def _losses(base, pre, post, p=None):
    p = p or DOPParams()
    return [ProjectedLoss(t, *principal_basis(t - base, p.svd_epsilon), p.svd_proj_space) for t in (pre, post)]


@pytest.mark.parametrize("space", ["uv", "u", "v"])
def test_dop_gradient_is_autograds(space):
    base, pre, post = _layer(7, 5, 0)
    loss = _losses(base, pre, post, DOPParams(svd_proj_space=space))[0]
    w = (pre + post).div(2).requires_grad_()
    u, s, v = principal_basis(pre - base, 0.99999)
    delta = w - pre
    reference = {
        "u": torch.linalg.matrix_norm(torch.diag(s) @ u.T @ delta) ** 2,
        "v": torch.linalg.matrix_norm(delta @ v @ torch.diag(s)) ** 2,
    }
    expected = sum(reference[k] for k in space)
    expected.backward()
    value, grad = loss.value_and_gradient(w.detach())
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(grad, w.grad)


def test_principal_basis_keeps_the_pairs_before_the_first_share_reaching_epsilon():
    """FusionBench's searchsorted rule: shares 0.4, 0.7, 0.9, 1.0."""
    matrix = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert [len(principal_basis(matrix, eps)[1]) for eps in (0.3, 0.4, 0.7, 0.75, 0.95, 1.0)] == [0, 0, 1, 2, 3, 3]


def test_min_norm_weights_of_two_gradients():
    """MGDA's two-task solution: the convex combination of least norm, clamped like its solver."""
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    gamma, rest = min_norm_weights(g1, g2)
    assert gamma == pytest.approx(0.8) and rest == pytest.approx(0.2)  # |0.8 g1 + 0.2 g2| is least on the segment
    assert min_norm_weights(g1, 2 * g1) == (0.999, 1 - 0.999)
    assert min_norm_weights(2 * g1, g1) == (0.001, 1 - 0.001)


def test_dop_exact_solver_is_the_minimiser_and_adam_approaches_it():
    base, pre, post = _layer(12, 7, 1)
    losses = _losses(base, pre, post)
    start = (pre + post) / 2
    exact = exact_merge(start, losses, (0.8, 0.2))
    grad = 0.8 * losses[0].value_and_gradient(exact)[1] + 0.2 * losses[1].value_and_gradient(exact)[1]
    assert grad.abs().max() < 1e-5 * max(float(loss.value_and_gradient(start)[1].abs().max()) for loss in losses)

    def objective(w: torch.Tensor) -> float:
        return float(0.8 * losses[0].value_and_gradient(w)[0] + 0.2 * losses[1].value_and_gradient(w)[0])

    adam, weight = adam_merge(start, losses, DOPParams(mgda=False, num_steps=300, lr=1e-3))
    gap = lambda w: objective(w) - objective(exact)  # noqa: E731
    assert weight == 0.8 and -1e-6 * gap(start) <= gap(adam) < 0.05 * gap(start)  # no better than exact, to rounding


def test_dop_keeps_the_first_model_then_averages_what_is_not_a_linear_weight():
    gen = torch.Generator().manual_seed(0)
    base = {"dense.weight": torch.randn(6, 4, generator=gen), "norm.weight": torch.randn(4, generator=gen)}
    ckpts = [{n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()} for _ in range(2)]
    merger = ContinualMerger(base, "dop", linear_weights=r"dense\.weight", num_steps=5)
    merger.partial_fit(ckpts[0])
    assert all(torch.equal(merger.merged_state_dict()[n], ckpts[0][n]) for n in base)
    merger.partial_fit(ckpts[1])
    merged = merger.merged_state_dict()
    torch.testing.assert_close(merged["norm.weight"], (ckpts[0]["norm.weight"] + ckpts[1]["norm.weight"]) / 2)
    assert not torch.allclose(merged["dense.weight"], (ckpts[0]["dense.weight"] + ckpts[1]["dense.weight"]) / 2)
    assert 0 < merger.stats_["weight_pre_mean"] < 1
