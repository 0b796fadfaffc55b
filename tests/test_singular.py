"""OPCM's decompositions: the Gram route is taken only where its bound certifies it, is then at least
as accurate as LAPACK's float32 SVD, and falls back to the SVD where the bound fails."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foldin.methods.opcm import project_task_vector, remove_protected_coefficients
from foldin.methods.singular import gram_svd, thin_svd
from test_methods import reference_projection

UNIT32 = torch.finfo(torch.float32).eps / 2


def with_spectrum(m: int, n: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    """A float32 m x n matrix with the given singular values and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    return ((u * singular_values.double()) @ v.T).float()


def worst_residual(matrix: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float:
    """max_i ||D v_i - s_i u_i|| and ||D^T u_i - s_i v_i||, in float64, over the largest singular value."""
    d, u, s, v = matrix.double(), u.double(), s.double(), vh.double().T
    left = torch.linalg.vector_norm(d @ v - u * s, dim=0)
    right = torch.linalg.vector_norm(d.T @ u - v * s, dim=0)
    return float(torch.maximum(left, right).max() / s[0])


def test_ill_conditioned_matrix_falls_back_to_the_svd():
    """Singular values from 1 down to 1e-7: the Gram matrix cannot resolve the smallest pairs, the
    bound says so, and thin_svd returns LAPACK's SVD of the tall orientation, bit for bit."""
    wide = with_spectrum(64, 256, torch.logspace(0, -7, 64), seed=0)
    assert gram_svd(wide) is None
    u, s, vh = thin_svd(wide)
    lapack = torch.linalg.svd(wide.T, full_matrices=False)
    assert torch.equal(u, lapack.Vh.T) and torch.equal(s, lapack.S) and torch.equal(vh, lapack.U.T)


@settings(max_examples=30, deadline=None)
@given(
    short=st.integers(4, 40),
    aspect=st.integers(2, 5),
    wide=st.booleans(),
    decades=st.floats(0.0, 3.0),
    seed=st.integers(0, 10**6),
)
def test_certified_gram_triplets_are_as_exact_as_float32_svd(short, aspect, wide, decades, seed):
    """Where the bound certifies the Gram route (well-conditioned rectangular matrices), every
    triplet's residual is within what a float32 SVD leaves, and OPCM's projection with it is no
    further from the float64 reference than the projection with LAPACK's float32 SVD."""
    m, n = (short, short * aspect) if wide else (short * aspect, short)
    matrix = with_spectrum(m, n, torch.logspace(0, -decades, short), seed)
    certified = gram_svd(matrix)
    assert certified is not None
    u, s, vh = certified
    assert bool((s[:-1] >= s[1:]).all())
    assert worst_residual(matrix, u, s, vh) <= 16 * UNIT32 * max(m, n) ** 0.5
    task = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1))
    reference = reference_projection(matrix.double(), task.double(), 0.5)
    gram_error = float((project_task_vector(matrix, task, 0.5).double() - reference).norm())
    lapack = torch.linalg.svd(matrix, full_matrices=False)
    svd_error = float((remove_protected_coefficients(*lapack, task, 0.5).double() - reference).norm())
    assert gram_error <= 2 * svd_error + 8 * UNIT32 * float(task.norm())


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 48), n=st.integers(1, 48), seed=st.integers(0, 10**6), double=st.booleans())
def test_thin_svd_is_an_svd_whichever_route(m, n, seed, double):
    """Any shape and dtype: descending singular values, orthonormal factors, small residuals."""
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(m, n, generator=gen, dtype=torch.float64 if double else torch.float32)
    u, s, vh = thin_svd(matrix)
    k = min(m, n)
    assert u.shape == (m, k) and s.shape == (k,) and vh.shape == (k, n)
    assert bool((s[:-1] >= s[1:]).all())
    unit = torch.finfo(matrix.dtype).eps / 2
    tolerance = 64 * unit * max(m, n) ** 0.5
    assert float((u.double().T @ u.double() - torch.eye(k, dtype=torch.float64)).abs().max()) <= tolerance
    assert float((vh.double() @ vh.double().T - torch.eye(k, dtype=torch.float64)).abs().max()) <= tolerance
    assert worst_residual(matrix, u, s, vh) <= tolerance
