"""Thin singular value decompositions for OPCM, as fast as they can be while staying as exact as the
LAPACK SVD they replace.

Two facts, measured on a 2-core CPU (`benchmarks/perf/svd_floor.py`), make an OPCM step cheaper:

- LAPACK's divide-and-conquer SVD of a wide matrix (768 x 3072) takes 2.8x as long as that of its
  transpose. `thin_svd` always decomposes the tall orientation and transposes the factors back.
- For a clearly rectangular matrix, the eigendecomposition of its smaller Gram matrix, in float64,
  plus one product for the other side's vectors, is cheaper than the SVD. It is exact enough only
  when the matrix is well enough conditioned: `gram_svd` proves, from the spectrum it computes, that
  each singular triplet it returns has a residual no larger than the unit roundoff of the input's
  dtype times the largest singular value. A backward-stable SVD in that dtype guarantees nothing
  smaller, and by Wedin's theorem a triplet's angle error is its residual over its gap to the other
  singular values, so every Gram triplet is at least as accurate as the SVD's own (measured on real
  task vectors, OPCM's projection lands 1e-7 from a float64 reference with it, 3e-6 to 6e-5 with
  float32 LAPACK: `benchmarks/perf/gram_accuracy.py`). When the proof fails, `thin_svd` falls back
  to the SVD. The derivation is in docs/methods.md.
"""

from __future__ import annotations

import torch

GRAM_MIN_ASPECT = 2  # the Gram route is tried only where long side >= 2 x short side: there it is faster at
# one and two threads; on square matrices it is not faster at one thread, and fails the bound more often
GRAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 in has no more precise Gram to use
FLOAT64_UNIT = torch.finfo(torch.float64).eps / 2


def residual_bound(gram_trace: float, largest_eigenvalue: float, k: int, n: int) -> float:
    """3 eps, where eps bounds the perturbation E for which the float64 eigenvectors of fl(A A^T)
    are exact eigenvectors of A A^T + E, A being k x n: the Gram product's rounding, at most
    gamma_n ||A||_F^2 (Higham, Accuracy and Stability, Thm 3.5), plus the symmetric eigensolver's
    backward error, taken as k u ||G||_2. Each triplet's residual is then at most 2 eps over its
    singular value; the third eps covers the products and norms that form the triplets."""
    gamma_n = n * FLOAT64_UNIT / (1 - n * FLOAT64_UNIT)
    return 3 * (gamma_n * gram_trace + k * FLOAT64_UNIT * largest_eigenvalue)


def gram_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(U, S, Vh) of `matrix` from the float64 eigendecomposition of its smaller Gram matrix, or None
    when the residual bound does not certify every triplet to the input dtype's own SVD accuracy."""
    wide = matrix.shape[0] <= matrix.shape[1]
    a = (matrix if wide else matrix.T).double()  # k x n, k <= n
    k, n = a.shape
    gram = a @ a.T
    gram_trace = float(gram.diagonal().sum())
    eigenvalues, short_side = torch.linalg.eigh(gram)
    del gram
    short_side = short_side.flip(1)  # descending singular values, as torch.linalg.svd returns them
    long_side = a.T @ short_side  # column i is s_i v_i; in place below, so that at most two
    del a  # float64 copies of the matrix are held at once
    singular_values = torch.linalg.vector_norm(long_side, dim=0)
    smallest, largest = float(singular_values[-1]), float(singular_values[0])
    bound = residual_bound(gram_trace, float(eigenvalues[-1]), k, n)
    unit = torch.finfo(matrix.dtype).eps / 2
    if smallest == 0 or bound / smallest > unit * largest:
        return None
    long_side.div_(singular_values)
    u, vh = (short_side, long_side.T) if wide else (long_side, short_side.T)
    return u.to(matrix.dtype), singular_values.to(matrix.dtype), vh.to(matrix.dtype)


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) with S descending, U m x k, Vh k x n, k = min(m, n): from the Gram matrix where
    `gram_svd` certifies it, otherwise LAPACK's SVD of the tall orientation."""
    m, n = matrix.shape
    float64_device = matrix.device.type in ("cpu", "cuda")  # MPS has no float64
    if matrix.dtype in GRAM_DTYPES and float64_device and max(m, n) >= GRAM_MIN_ASPECT * min(m, n):
        certified = gram_svd(matrix)
        if certified is not None:
            return certified
    if m >= n:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u, s, vh
    u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
    return vh.T, s, u.T


NONZERO_RTOL = (
    1e-5  # float32 rounding leaves a sum of LoRA updates with "null" singular values near 1e-6 x the largest
)
SKETCH_OVERSAMPLING = 8


def nonzero_singular_triplets(
    merged: torch.Tensor, rtol: float = NONZERO_RTOL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of `merged` restricted to the singular values above rtol x the largest.

    A numerically low-rank matrix (a sum of LoRA updates) is found from a seeded Gaussian sketch
    of k columns, k doubling from 32 while k <= min(m, n) / 4, in O(m n k) instead of the full
    SVD's O(m n min(m, n)); the sketch is accepted once its rank leaves `SKETCH_OVERSAMPLING`
    columns spare (the whole range was caught). Otherwise the full thin SVD is truncated.
    """
    m, n = merged.shape
    generator = torch.Generator(device=merged.device).manual_seed(0)
    k = 32
    while k <= min(m, n) // 4:
        probe = torch.randn(n, k, generator=generator, dtype=merged.dtype, device=merged.device)
        basis = torch.linalg.qr(merged @ probe).Q
        u, s, vh = thin_svd(basis.T @ merged)  # k x n, wide: thin_svd gives LAPACK its tall transpose
        rank = int((s > rtol * s[0]).sum())
        if rank + SKETCH_OVERSAMPLING <= k:
            return basis @ u[:, :rank], s[:rank], vh[:rank]
        k *= 2
    u, s, vh = thin_svd(merged)
    rank = int((s > rtol * s[0]).sum())
    return u[:, :rank], s[:rank], vh[:rank]
