"""Batched linear algebra on many small symmetric positive-definite blocks.

With one grouping factor the inner Hessian is block-diagonal: one ``Q x Q`` block per level,
``Q`` small (1 for a random intercept, 2 with a slope). LAPACK called once per block is slow for
thousands of 1x1 or 2x2 blocks, so for small ``Q`` the Cholesky factorisation is unrolled in
Python over the (static) block size and vectorised over the levels: every operation is an
elementwise operation on arrays of shape ``(G,)``. Larger blocks use the batched LAPACK path.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

__all__ = [
    "chol",
    "tri_solve",
    "tri_solve_t",
    "chol_solve",
    "chol_logdet",
    "chol_inverse",
    "gauss_jordan",
    "small_einsum",
]

#: Largest block size whose factorisation and solves are unrolled (larger ones call LAPACK).
UNROLL_MAX = 6


def chol(H: jnp.ndarray) -> jnp.ndarray:
    """Lower Cholesky factors of a batch ``(G, Q, Q)`` of SPD blocks."""
    q = H.shape[-1]
    if q > UNROLL_MAX:
        return jnp.linalg.cholesky(H)
    L = [[None] * q for _ in range(q)]
    for j in range(q):
        s = H[:, j, j] - sum(L[j][k] ** 2 for k in range(j))
        L[j][j] = jnp.sqrt(s)
        for i in range(j + 1, q):
            L[i][j] = (H[:, i, j] - sum(L[i][k] * L[j][k] for k in range(j))) / L[j][j]
    zero = jnp.zeros_like(H[:, 0, 0])
    return jnp.stack(
        [jnp.stack([L[i][j] if j <= i else zero for j in range(q)], -1) for i in range(q)], -2
    )


def tri_solve(L: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Solve ``L z = b`` blockwise (forward substitution): ``L`` ``(..., Q, Q)``, ``b``
    ``(..., Q)``, leading dimensions broadcast."""
    q = L.shape[-1]
    if q > UNROLL_MAX:
        L = jnp.broadcast_to(L, b.shape[:-1] + L.shape[-2:])
        return solve_triangular(L, b[..., None], lower=True)[..., 0]
    z = []
    for i in range(q):
        z.append((b[..., i] - sum(L[..., i, k] * z[k] for k in range(i))) / L[..., i, i])
    return jnp.stack(z, -1)


def tri_solve_t(L: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
    """Solve ``L' x = z`` blockwise (back substitution), as :func:`tri_solve`."""
    q = L.shape[-1]
    if q > UNROLL_MAX:
        L = jnp.broadcast_to(L, z.shape[:-1] + L.shape[-2:])
        return solve_triangular(L, z[..., None], lower=True, trans=1)[..., 0]
    x = [None] * q
    for i in reversed(range(q)):
        x[i] = (z[..., i] - sum(L[..., k, i] * x[k] for k in range(i + 1, q))) / L[..., i, i]
    return jnp.stack(x, -1)


def chol_solve(L: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Solve ``L L' x = b`` blockwise; ``L`` is ``(G, Q, Q)``, ``b`` is ``(G, Q)``."""
    return tri_solve_t(L, tri_solve(L, b))


def chol_logdet(L: jnp.ndarray) -> jnp.ndarray:
    """``log det(L L')`` for each block: shape ``(G,)``."""
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), axis=-1)


def chol_inverse(L: jnp.ndarray) -> jnp.ndarray:
    """``(L L')^{-1}`` for each block: shape ``(G, Q, Q)``."""
    q = L.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(q, dtype=L.dtype), L.shape)
    return jnp.stack([chol_solve(L, eye[:, :, j]) for j in range(q)], -1)


def gauss_jordan(A: jnp.ndarray, B: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(A^{-1} B, pivots)`` for small matrices ``A`` ``(..., n, n)`` and ``B``
    ``(..., n, m)`` (leading dimensions a batch), by Gauss-Jordan elimination without pivoting.

    Meant for symmetric ``A``: all ``n`` pivots are positive exactly when it is positive
    definite (they are the ratios of its leading minors, so their product is ``det A``), and
    elimination without pivoting is then stable, as Cholesky is; for any other ``A`` the
    caller must check the pivots. Each column's elimination is one elementwise update of the
    augmented matrix ``[A | B]``, which XLA compiles to one kernel: a Newton direction of 3
    parameters costs ~7 kernels, and a cross-product criterion's ``2 x 2`` blocks a few,
    where the unrolled Cholesky factor and its solves (:func:`chol`, :func:`tri_solve`) are a
    kernel per few scalars (each square root and division that several entries use is one).
    Above :data:`UNROLL_MAX` (many fixed effects) LAPACK's Cholesky does it instead: the same
    pivots (the squared diagonal of the factor), not finite where ``A`` is not positive
    definite.
    """
    n = A.shape[-1]
    if n > UNROLL_MAX:
        L = jnp.linalg.cholesky(A)
        Y = solve_triangular(L, B, lower=True)
        return solve_triangular(L, Y, lower=True, trans=1), jnp.diagonal(L, 0, -2, -1) ** 2
    M = jnp.concatenate([A, B], axis=-1)
    rows = np.arange(n)[:, None]
    pivots = []
    for j in range(n):
        pivot = M[..., j, j]
        pivots.append(pivot)
        row = M[..., j : j + 1, :] / pivot[..., None, None]
        M = jnp.where(rows == j, row, M - M[..., :, j : j + 1] * row)
    pivots = jnp.stack(pivots, -1) if n else jnp.zeros(A.shape[:-1], A.dtype)
    return M[..., n:], pivots


#: Largest broadcast product (elements, per call) that :func:`small_einsum` forms.
SMALL_EINSUM_MAX = 2**14


def small_einsum(subscripts: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """``jnp.einsum(subscripts, a, b)`` as a broadcast product and a sum, when that product
    has at most :data:`SMALL_EINSUM_MAX` elements (else ``jnp.einsum``).

    XLA compiles a contraction to a matrix-product kernel (on CPU a library call, with the
    transposes around it as kernels of their own) however small it is; a product and a sum
    fuse with their neighbours into one loop. On the per-level ``2 x 2`` blocks of a
    cross-product criterion that is ~10 kernels fewer per evaluation (sleepstudy's fit: ~30
    us of ~190). Two operands, each index at most once per operand, no ellipsis.
    """
    inputs, output = subscripts.replace(" ", "").split("->")
    sa, sb = inputs.split(",")
    sizes = {**dict(zip(sa, a.shape, strict=True)), **dict(zip(sb, b.shape, strict=True))}
    letters = output + "".join(dict.fromkeys(c for c in sa + sb if c not in output))
    total = 1
    for c in letters:
        total *= sizes[c]
    if total > SMALL_EINSUM_MAX:
        return jnp.einsum(subscripts, a, b)

    def expand(x, s):
        # x's axes in the order of ``letters``, with singleton axes for the letters it lacks.
        present = [c for c in letters if c in s]
        x = jnp.transpose(x, [s.index(c) for c in present])
        return x.reshape([sizes[c] if c in s else 1 for c in letters])

    product = expand(a, sa) * expand(b, sb)
    return jnp.sum(product, axis=tuple(range(len(output), len(letters))))
