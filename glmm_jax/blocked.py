"""The inner Hessian of several grouping factors: MixedModels.jl's blocked Cholesky, in JAX.

With random terms on ``K >= 2`` grouping factors, ``H = Lambda' Z' W Z Lambda + I`` is no longer
block-diagonal. The factors are ordered by number of levels, largest first (as lme4 and
MixedModels.jl order them), and the modes split as ``u = (u_1, u_r)``: ``u_1`` the first
factor's effects, ``(G, Q)``, and ``u_r`` those of all the other factors stacked into one vector
of length ``R`` (factor by factor, level by level, column by column). Then

    H = [[A11, A21'], [A21, A22]],    L11 = chol(A11),    L21 = A21 L11^{-T},
    L22 = chol(A22 - L21 L21'),

where ``A11`` keeps one ``Q x Q`` block per level (factored vectorised over levels, as with one
factor) and only ``L22`` is dense: ``R`` is the number of effects outside the largest factor,
small in nested and crossed designs (24 items in VerbAgg, 12 years in a site-by-year design).

``A21`` is sparse: level ``g`` of the first factor meets only the rest effects that share an
observation with it. The design lists these (level, rest effect) *pairs* once, in numpy
(:class:`Coupling`), so ``L21`` is stored as one ``Q``-vector per pair,
``C_p = L11_g^{-1} a_p``, and ``L21 L21'`` is a sum over the *pairs of pairs* that share a level.
Every shape is static, and a factorisation costs one pass over the rows, one over the pairs, one
over the pairs of pairs and one dense Cholesky of size ``R``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from .blocks import chol, chol_logdet, tri_solve, tri_solve_t

__all__ = ["Coupling", "BlockedCholesky", "assemble", "factor", "solve", "logdet", "inverse_blocks"]


class Coupling(NamedTuple):
    """Index arrays linking the first grouping factor to the others (built by ``design.py``).

    With one grouping factor every array is empty (``C = P = M = 0``).

    Attributes
    ----------
    rest : (n, C) int32
        Position in ``u_r`` of the effect that multiplies each row's rest column ``c``.
    obs_pair : (n, C) int32
        The (level, rest effect) pair of each row and rest column.
    pair_level : (P,) int32
        The first factor's level of each pair, sorted ascending.
    pair_rest : (P,) int32
        The rest effect of each pair.
    pp_left, pp_right : (M,) int32
        Every ordered pair of pairs that share a level of the first factor.
    pp_level : (M,) int32
        That level, sorted ascending.
    pp_flat : (M,) int32
        ``pair_rest[pp_left] * R + pair_rest[pp_right]``: the entry of the ``R x R`` block.

    Padding rows, pairs and pairs of pairs point at a last dummy pair whose value is zero.
    """

    rest: jnp.ndarray
    obs_pair: jnp.ndarray
    pair_level: jnp.ndarray
    pair_rest: jnp.ndarray
    pp_left: jnp.ndarray
    pp_right: jnp.ndarray
    pp_level: jnp.ndarray
    pp_flat: jnp.ndarray


class BlockedCholesky(NamedTuple):
    """Cholesky factor of ``H``: ``L11`` ``(G, Q, Q)``, ``C`` ``(P, Q)`` (rows of ``L21``),
    ``L22`` ``(R, R)``."""

    L11: jnp.ndarray
    C: jnp.ndarray
    L22: jnp.ndarray


def _level_sum(values, index, num_levels):
    return jax.ops.segment_sum(values, index, num_segments=num_levels, indices_are_sorted=True)


def assemble(w, ZT, ZTr, group, num_levels: int, coupling: Coupling, R: int):
    """Blocks of ``H = Lambda' Z' diag(w) Z Lambda + I``: ``(A11, V, A22)``.

    ``ZT`` ``(n, Q)`` and ``ZTr`` ``(n, C)`` are the rows of ``Z Lambda`` of the first factor and
    of the others; ``V`` ``(P, Q)`` holds the non-zero columns of ``A21'``, one per pair.
    """
    q = ZT.shape[1]
    P = coupling.pair_level.shape[0]
    wZT = w[:, None] * ZT
    A11 = _level_sum(wZT[:, :, None] * ZT[:, None, :], group, num_levels) + jnp.eye(
        q, dtype=w.dtype
    )
    V = jax.ops.segment_sum(
        (ZTr[:, :, None] * wZT[:, None, :]).reshape(-1, q),
        coupling.obs_pair.reshape(-1),
        num_segments=P,
    )
    flat = (coupling.rest[:, :, None] * R + coupling.rest[:, None, :]).reshape(-1)
    wrr = (w[:, None, None] * ZTr[:, :, None] * ZTr[:, None, :]).reshape(-1)
    A22 = jax.ops.segment_sum(wrr, flat, num_segments=R * R).reshape(R, R)
    return A11, V, A22 + jnp.eye(R, dtype=w.dtype)


def factor(A11, V, A22, coupling: Coupling) -> BlockedCholesky:
    """The blocked Cholesky factor of ``H`` from :func:`assemble`'s blocks."""
    R = A22.shape[0]
    L11 = chol(A11)
    C = tri_solve(L11[coupling.pair_level], V)
    cross = jnp.sum(C[coupling.pp_left] * C[coupling.pp_right], axis=1)
    schur = A22 - jax.ops.segment_sum(cross, coupling.pp_flat, num_segments=R * R).reshape(R, R)
    return BlockedCholesky(L11, C, jnp.linalg.cholesky(schur))


def solve(F: BlockedCholesky, b1, b2, coupling: Coupling):
    """Solve ``H (x1, x2) = (b1, b2)`` with ``b1`` ``(G, Q)`` and ``b2`` ``(R,)``."""
    G, R = F.L11.shape[0], F.L22.shape[0]
    z1 = tri_solve(F.L11, b1)
    t = b2 - jax.ops.segment_sum(
        jnp.sum(F.C * z1[coupling.pair_level], axis=1), coupling.pair_rest, num_segments=R
    )
    x2 = cho_solve((F.L22, True), t)
    back = _level_sum(F.C * x2[coupling.pair_rest][:, None], coupling.pair_level, G)
    return tri_solve_t(F.L11, z1 - back), x2


def logdet(F: BlockedCholesky):
    """``log det H``."""
    return jnp.sum(chol_logdet(F.L11)) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(F.L22)))


def inverse_blocks(F: BlockedCholesky, coupling: Coupling, rest_shapes):
    """Diagonal blocks of ``H^{-1}``: ``(G, Q, Q)`` for the first factor, then one
    ``(G_k, Q_k, Q_k)`` array per other factor (``rest_shapes`` lists their ``(G_k, Q_k)``).

    The first factor's block is ``L11^{-T} (I + sum_{p, p'} C_p S_{p p'} C_p'') L11^{-1}``
    with ``S = L22^{-T} L22^{-1}``, summed over the pairs of pairs of the level.
    """
    G, q = F.L11.shape[:2]
    R = F.L22.shape[0]
    S_inv = cho_solve((F.L22, True), jnp.eye(R, dtype=F.L22.dtype))
    s = S_inv.reshape(-1)[coupling.pp_flat]
    outer = F.C[coupling.pp_left][:, :, None] * F.C[coupling.pp_right][:, None, :]
    inner = _level_sum(s[:, None, None] * outer, coupling.pp_level, G) + jnp.eye(q, dtype=s.dtype)
    eye = jnp.broadcast_to(jnp.eye(q, dtype=s.dtype), F.L11.shape)
    L_inv = jnp.stack([tri_solve(F.L11, eye[:, :, j]) for j in range(q)], -1)
    blocks = [jnp.einsum("gji,gjk,gkl->gil", L_inv, inner, L_inv)]
    offset = 0
    for G_k, q_k in rest_shapes:
        idx = offset + jnp.arange(G_k)[:, None] * q_k + jnp.arange(q_k)[None, :]
        blocks.append(S_inv[idx[:, :, None], idx[:, None, :]])
        offset += G_k * q_k
    return tuple(blocks)
