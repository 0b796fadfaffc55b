"""The methods' math on plain tensors, against independent whole-model implementations."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from foldin import merge
from foldin.engine import DictSource, ModelLayout
from foldin.methods.opcm import project_task_vector, split_rank
from foldin.methods.selection import kth_smallest_abs
from foldin.methods.singular import nonzero_singular_triplets
from foldin.runners import Options
from foldin.runners.local import LocalStep


def reference_projection(
    merged: torch.Tensor, task: torch.Tensor, alpha: float, nonzero: bool = False
) -> torch.Tensor:
    """FusionBench's computation, in float64 with full SVD matrices; with `nonzero`, only pairs
    with a singular value above 1e-5 x the largest count."""
    u, s, vh = torch.linalg.svd(merged.double(), full_matrices=True)
    kept = int((s > 1e-5 * s[0]).sum()) if nonzero else len(s)
    s = s[:kept]
    r = int(((s.cumsum(0) / s.sum()).clamp(max=1.0) > alpha).float().argmax())  # shares never exceed 1
    x = u.T @ task.double() @ vh.T
    x.diagonal()[:kept] = 0
    x[:r, :r] = 0
    return (u @ x @ vh).to(task.dtype)


def low_rank_plus_noise(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen) + 0.05 * torch.randn(
        m, n, generator=gen
    )


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 24),
    n=st.integers(2, 24),
    alpha=st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]),
    seed=st.integers(0, 10**6),
)
def test_projection_matches_full_svd_reference(m, n, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    merged, task = low_rank_plus_noise(m, n, gen).double(), torch.randn(m, n, generator=gen).double()
    torch.testing.assert_close(
        project_task_vector(merged, task, alpha), reference_projection(merged, task, alpha), rtol=1e-9, atol=1e-9
    )


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 24), n=st.integers(2, 24), alpha=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_projection_is_orthogonal_to_the_protected_coefficients(m, n, alpha, seed):
    """What OPCM guarantees: the projected update has no component on any (u_i, v_i) pair and
    none in the dominant r x r block of the merged task vector's singular bases."""
    gen = torch.Generator().manual_seed(seed)
    merged, task = low_rank_plus_noise(m, n, gen).double(), torch.randn(m, n, generator=gen).double()
    projected = project_task_vector(merged, task, alpha)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    coeffs = u.T @ projected @ vh.T
    r = split_rank(s, alpha)
    assert coeffs.diagonal().abs().max() < 1e-10
    assert r == 0 or coeffs[:r, :r].abs().max() < 1e-10


def sum_of_lora_updates(m: int, n: int, ranks: list[int], gen: torch.Generator) -> torch.Tensor:
    """A merged task vector as continual LoRA fine-tuning leaves it: rank sum(ranks), float32."""
    return sum(0.02 * torch.randn(m, r, generator=gen) @ (0.02 * torch.randn(r, n, generator=gen)) for r in ranks)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 24),
    n=st.integers(2, 24),
    alpha=st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]),
    seed=st.integers(0, 10**6),
)
def test_nonzero_diagonal_is_fusionbench_for_a_full_rank_merged_task_vector(m, n, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    merged, task = low_rank_plus_noise(m, n, gen).double(), torch.randn(m, n, generator=gen).double()
    s = torch.linalg.svdvals(merged)
    assume(s[-1] > 1e-4 * s[0])  # full rank by a margin: a random square matrix is sometimes nearly singular
    torch.testing.assert_close(
        project_task_vector(merged, task, alpha, "nonzero"),
        reference_projection(merged, task, alpha),
        rtol=1e-9,
        atol=1e-9,
    )


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(128, 320),
    n=st.integers(128, 320),
    ranks=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    alpha=st.sampled_from([0.3, 0.5, 1.0]),
    seed=st.integers(0, 10**6),
)
def test_nonzero_diagonal_on_lora_sums_is_the_reference_and_does_not_depend_on_rounding(m, n, ranks, alpha, seed):
    """A sum of LoRA updates takes the sketch (rank <= 48 < min(m, n) / 4); the result equals the
    float64 full-SVD reference and a 1e-9 change of the merged task vector barely moves it, where
    FusionBench's convention ('all') moves by percents."""
    gen = torch.Generator().manual_seed(seed)
    merged, task = sum_of_lora_updates(m, n, ranks, gen), sum_of_lora_updates(m, n, [8], gen)
    u, s, vh = nonzero_singular_triplets(merged)
    assert len(s) == sum(ranks)  # generic updates: the ranks add
    projected = project_task_vector(merged, task, alpha, "nonzero")
    coeffs, r = u.T @ projected @ vh.T, split_rank(s, alpha)  # OPCM's guarantee, on the nonzero pairs
    assert coeffs.diagonal().abs().max() < 1e-5 * task.abs().max() and (
        r == 0 or coeffs[:r, :r].abs().max() < 1e-5 * task.abs().max()
    )
    reference = reference_projection(merged, task, alpha, nonzero=True)
    assert (projected.double() - reference).norm() < 1e-5 * reference.norm()
    nudged = project_task_vector(merged + 1e-9 * torch.randn(m, n, generator=gen), task, alpha, "nonzero")
    assert (nudged - projected).norm() < 1e-5 * projected.norm()


def test_a_full_rank_matrix_falls_back_to_the_full_svd_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    merged, task = low_rank_plus_noise(300, 260, gen), torch.randn(300, 260, generator=gen)
    assert torch.equal(
        project_task_vector(merged, task, 0.5, "nonzero"), project_task_vector(merged, task, 0.5, "all")
    )


def test_alpha_one_removes_only_the_diagonal_even_when_rounding_pushes_the_last_share_above_one():
    gen = torch.Generator().manual_seed(1)  # found by hypothesis: full SVD's shares end at 1 + 2e-16
    merged, task = low_rank_plus_noise(21, 12, gen).double(), torch.randn(21, 12, generator=gen).double()
    torch.testing.assert_close(
        project_task_vector(merged, task, 1.0), reference_projection(merged, task, 1.0), rtol=1e-9, atol=1e-9
    )
    assert split_rank(torch.tensor([1.0, 1e-17, 1e-17], dtype=torch.float64), 1.0) == 0


def test_split_rank_edges():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert split_rank(s, 0.5) == 1  # cumsum share 0.4, 0.7: first above 0.5 is index 1
    assert split_rank(s, 0.0) == 0
    assert split_rank(s, 1.0) == 0  # nothing exceeds 1: r = 0, only the diagonal is removed


def test_zero_merged_matrix_leaves_the_task_vector_unchanged():
    task = torch.randn(5, 7)
    assert torch.equal(project_task_vector(torch.zeros(5, 7), task, 0.5), task)


def _context(tensors: dict[str, torch.Tensor]) -> LocalStep:
    layout = ModelLayout.from_source(DictSource(tensors), [])
    return LocalStep(2, {}, layout, lambda kind, name: tensors[name], lambda n, t: None, Options(progress=False))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
    frac=st.floats(0.0, 1.0),
    duplicates=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_streaming_kth_matches_kthvalue(sizes, frac, duplicates, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}
    if duplicates:  # many exact ties, including zeros and negatives of each other
        tensors = {k: (v * 4).round() / 4 for k, v in tensors.items()}
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    k = max(1, min(flat.numel(), int(frac * flat.numel()) or 1))
    (got,) = kth_smallest_abs(_context(tensors), [lambda s: s.base], [k])
    assert got == flat.abs().kthvalue(k).values.item()


def reference_ties(base, checkpoints, lam=0.3, threshold=20):
    """FusionBench's continual TIES over flattened whole-model vectors (sorted keys)."""
    keys = sorted(base)
    flat = lambda sd: torch.cat([sd[k].reshape(-1) for k in keys])  # noqa: E731
    theta0 = flat(base)
    merged = theta0.clone()
    for i, ck in enumerate(checkpoints):
        tau = flat(ck) - theta0
        if i == 0:
            merged = merged + lam * tau
            continue
        rows = torch.stack([merged - theta0, tau])
        d = rows.shape[1]
        k = d - int(d * threshold / 100)
        kth = rows.abs().kthvalue(k, dim=1, keepdim=True).values
        rows = rows * (rows.abs() >= kth)
        signs = torch.sign(rows.sum(0))
        signs[signs == 0] = torch.sign(signs.sum())
        keep = torch.where(signs > 0, rows > 0, rows < 0)
        merged = merged + lam * (rows * keep).sum(0)
    out, offset = {}, 0
    for k in keys:
        out[k] = merged[offset : offset + base[k].numel()].reshape(base[k].shape)
        offset += base[k].numel()
    return out


def _random_model(seed: int, n_ckpts: int = 3):
    gen = torch.Generator().manual_seed(seed)
    base = {
        "a.weight": torch.randn(6, 5, generator=gen),
        "a.bias": torch.randn(6, generator=gen),
        "b.weight": torch.randn(4, 6, generator=gen),
        "norm.weight": torch.ones(4),
    }
    ckpts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(n_ckpts)]
    return base, ckpts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_matches_whole_vector_reference(seed):
    base, ckpts = _random_model(seed)
    ours = merge(base, ckpts, method="ties")
    ref = reference_ties(base, ckpts)
    for k in base:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)


def test_average_and_task_arithmetic_closed_forms():
    base, ckpts = _random_model(3)
    avg = merge(base, ckpts, method="average")
    ta = merge(base, ckpts, method="task_arithmetic", scaling_factor=0.4)
    for k in base:
        torch.testing.assert_close(avg[k], sum(c[k] for c in ckpts) / len(ckpts))
        torch.testing.assert_close(ta[k], base[k] + 0.4 * sum(c[k] - base[k] for c in ckpts))


def test_opcm_keeps_the_merged_norm_at_the_mean_task_vector_norm():
    base, ckpts = _random_model(4, n_ckpts=4)
    out = merge(base, ckpts, method="opcm", linear_weights=r"[ab]\.weight", alpha=0.5)
    norm = lambda sd: sum(float((sd[k] - base[k]).double().norm() ** 2) for k in base) ** 0.5  # noqa: E731
    assert norm(out) == pytest.approx(sum(norm(c) for c in ckpts) / len(ckpts), rel=1e-6)
    first = merge(base, ckpts[:1], method="opcm")
    for k in base:  # the first checkpoint is taken as it is
        torch.testing.assert_close(first[k], ckpts[0][k])


@settings(max_examples=15, deadline=None)
@given(method=st.sampled_from(["average", "task_arithmetic", "ties", "opcm"]), seed=st.integers(0, 1000))
def test_result_does_not_depend_on_key_order(method, seed):
    base, ckpts = _random_model(seed)
    order = list(base)
    random.Random(seed).shuffle(order)
    shuffled = lambda sd: {k: sd[k] for k in order}  # noqa: E731
    a = merge(base, ckpts, method=method)
    b = merge(shuffled(base), [shuffled(c) for c in ckpts], method=method)
    for k in base:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_models_are_merged_in_float32_and_stored_in_their_dtype(dtype):
    base, ckpts = _random_model(5)
    stored = lambda sd: {k: v.to(dtype) for k, v in sd.items()}  # noqa: E731
    widened = lambda sd: {k: v.to(dtype).float() for k, v in sd.items()}  # noqa: E731
    out = merge(stored(base), [stored(c) for c in ckpts], method="opcm")
    ref = merge(widened(base), [widened(c) for c in ckpts], method="opcm")
    for k in base:
        assert out[k].dtype == dtype
        assert torch.equal(out[k], ref[k].to(dtype))


def test_float64_models_are_merged_in_float64():
    base, ckpts = _random_model(6)
    out = merge(
        {k: v.double() for k, v in base.items()}, [{k: v.double() for k, v in c.items()} for c in ckpts], method="ties"
    )
    assert all(v.dtype == torch.float64 for v in out.values())


def test_integer_buffers_come_from_the_base_and_may_be_absent_from_checkpoints():
    """position_ids-style buffers: in old base files, no longer saved by newer transformers."""
    base, ckpts = _random_model(7)
    base["embeddings.position_ids"] = torch.arange(8)
    out = merge(base, ckpts, method="opcm")
    assert torch.equal(out["embeddings.position_ids"], base["embeddings.position_ids"])


def test_opcm_reads_a_convolution_kernel_as_out_by_patch_matrix():
    """A kernel selected by pattern is projected exactly as its (out, in*kh*kw) matrix would be."""
    g = torch.Generator().manual_seed(0)
    base = {"conv.weight": torch.randn(8, 4, 3, 3, generator=g), "fc.weight": torch.randn(8, 36, generator=g)}
    deltas = [torch.randn(8, 4, 3, 3, generator=g) for _ in range(3)]
    conv = merge(
        base,
        [{"conv.weight": base["conv.weight"] + d, "fc.weight": base["fc.weight"] + d.flatten(1)} for d in deltas],
        method="opcm",
        linear_weights=r".*\.weight",
        alpha=0.5,
    )
    assert torch.allclose(
        (conv["conv.weight"] - base["conv.weight"]).flatten(1), conv["fc.weight"] - base["fc.weight"], atol=1e-5
    )


def test_workers_stay_busy_when_small_tensors_sit_between_large_ones():
    """Two workers must work on both weights at once although a bias sits between them (it finishes
    first and waits for its weight): each weight's fn blocks until the other's has started."""
    import threading

    tensors = {"a.weight": torch.ones(4, 4), "a.bias": torch.ones(4), "b.weight": torch.ones(4, 4)}
    layout = ModelLayout.from_source(DictSource(tensors), [])
    step = LocalStep(2, {}, layout, lambda kind, name: tensors[name], lambda n, t: None, Options(False, workers=2))
    both_started = threading.Barrier(2, timeout=10)

    def fn(slot):
        if slot.name.endswith("weight"):
            both_started.wait()  # raises BrokenBarrierError if the other weight never starts
        return slot.name

    assert step.run_pass(fn, "test", write=False) == list(layout.merged_names)
