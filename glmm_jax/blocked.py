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

``A21`` couples the first factor to the others in one of two layouts, chosen by the design from
the static sizes (:class:`DenseCoupling`, :class:`SparseCoupling`):

* dense, for crossed designs where most levels meet most other effects: ``L21`` is held as a
  ``(G, R, Q)`` array and ``L21 L21'`` is one matrix product;
* sparse, for nested and sparsely crossed designs: the design lists the (level, rest effect)
  *pairs* that share an observation, ``L21`` is one ``Q``-vector per pair,
  ``C_p = L11_g^{-1} a_p``, and ``L21 L21'`` is a sum over the *pairs of pairs* that share a
  level (each unordered pair of pairs once, the product being symmetric).

Every shape is static. The dense Schur complement ``S = A22 - L21 L21'`` enters the deviance
through :func:`spd_logdet` and :func:`spd_inverse`, whose derivatives are written with
``S^{-1}`` (matrix products), because JAX's forward-over-reverse derivative of a Cholesky
factorisation costs about a hundred factorisations (148 ms against 1 ms at ``R = 192``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from .blocks import chol, chol_logdet, tri_solve, tri_solve_t

__all__ = [
    "DenseCoupling",
    "SparseCoupling",
    "BlockedCholesky",
    "assemble",
    "factor",
    "solve",
    "logdet",
    "inverse_blocks",
    "selected_inverse",
    "spd_inverse",
    "spd_logdet",
]


class DenseCoupling(NamedTuple):
    """Index arrays of the dense layout of ``L21`` (built by ``design.py``).

    Attributes
    ----------
    rest : (n, C) int32
        Position in ``u_r`` of the effect that multiplies each row's rest column ``c``.
    obs_cell : (n, C) int32
        ``group * R + rest``: the entry of the ``G x R`` coupling that each row touches.
    """

    rest: jnp.ndarray
    obs_cell: jnp.ndarray


class SparseCoupling(NamedTuple):
    """Index arrays of the sparse layout of ``L21`` (built by ``design.py``).

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
        Every pair of pairs ``p <= p'`` that share a level of the first factor (the products
        are symmetric, so each unordered pair is listed once and weighted twice).
    pp_level : (M,) int32
        That level, sorted ascending.
    pp_flat : (M,) int32
        ``pair_rest[pp_left] * R + pair_rest[pp_right]``: the entry of the ``R x R`` block.

    Padding rows, pairs and pairs of pairs point at a last dummy pair whose value is zero.
    With one grouping factor every array is empty.
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
    """Blocked factor of ``H``.

    Attributes
    ----------
    L11 : (G, Q, Q) Cholesky factors of the first factor's blocks.
    C : ``L21``: ``(G, R, Q)`` (dense layout) or ``(P, Q)``, one row per pair (sparse).
    S : (R, R) the Schur complement ``A22 - L21 L21'``.
    L22 : (R, R) its Cholesky factor, or None where derivatives are taken (then ``S`` is used
        through :func:`spd_inverse` and :func:`spd_logdet`).
    """

    L11: jnp.ndarray
    C: jnp.ndarray
    S: jnp.ndarray
    L22: jnp.ndarray | None


@jax.custom_jvp
def spd_inverse(S):
    """Inverse of a symmetric positive-definite matrix; derivative ``-S^{-1} dS S^{-1}``."""
    return _cho_inverse(jnp.linalg.cholesky(S))


@spd_inverse.defjvp
def _spd_inverse_jvp(primals, tangents):
    (S,), (dS,) = primals, tangents
    S_inv = spd_inverse(S)
    return S_inv, -S_inv @ dS @ S_inv


@jax.custom_jvp
def spd_logdet(S):
    """``log det S`` of a symmetric positive-definite matrix; derivative ``tr(S^{-1} dS)``."""
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(S))))


@spd_logdet.defjvp
def _spd_logdet_jvp(primals, tangents):
    (S,), (dS,) = primals, tangents
    return spd_logdet(S), jnp.sum(spd_inverse(S) * dS)


def _pair_weight(coupling: SparseCoupling):
    """1/2 for a pair paired with itself: listed once, it is counted twice by ``X + X'``."""
    return jnp.where(coupling.pp_left == coupling.pp_right, 0.5, 1.0)


def _level_sum(values, index, num_levels):
    return jax.ops.segment_sum(values, index, num_segments=num_levels, indices_are_sorted=True)


def assemble(w, ZT, ZTr, group, num_levels: int, coupling, R: int):
    """Blocks of ``H = Lambda' Z' diag(w) Z Lambda + I``: ``(A11, V, A22)``.

    ``ZT`` ``(n, Q)`` and ``ZTr`` ``(n, C)`` are the rows of ``Z Lambda`` of the first factor and
    of the others; ``V`` holds ``A21'`` in the coupling's layout: ``(G, R, Q)`` or ``(P, Q)``.
    """
    q = ZT.shape[1]
    wZT = w[:, None] * ZT
    eye = jnp.eye(q, dtype=w.dtype)
    A11 = _level_sum(wZT[:, :, None] * ZT[:, None, :], group, num_levels) + eye
    cross = (ZTr[:, :, None] * wZT[:, None, :]).reshape(-1, q)
    if isinstance(coupling, DenseCoupling):
        cells = coupling.obs_cell.reshape(-1)
        V = jax.ops.segment_sum(cross, cells, num_segments=num_levels * R).reshape(-1, R, q)
    else:
        P = coupling.pair_level.shape[0]
        V = jax.ops.segment_sum(cross, coupling.obs_pair.reshape(-1), num_segments=P)
    flat = (coupling.rest[:, :, None] * R + coupling.rest[:, None, :]).reshape(-1)
    wrr = (w[:, None, None] * ZTr[:, :, None] * ZTr[:, None, :]).reshape(-1)
    A22 = jax.ops.segment_sum(wrr, flat, num_segments=R * R).reshape(R, R)
    return A11, V, A22 + jnp.eye(R, dtype=w.dtype)


def factor(A11, V, A22, coupling, differentiable: bool = False) -> BlockedCholesky:
    """The blocked factor of ``H`` from :func:`assemble`'s blocks.

    ``differentiable=True`` leaves the dense block unfactored (``L22=None``), for functions
    that are differentiated (see the module docstring).
    """
    R = A22.shape[0]
    L11 = chol(A11)
    if isinstance(coupling, DenseCoupling):
        C = tri_solve(L11[:, None], V)
        S = A22 - jnp.einsum("grq,gsq->rs", C, C)
    else:
        C = tri_solve(L11[coupling.pair_level], V)
        cross = _pair_weight(coupling) * jnp.sum(C[coupling.pp_left] * C[coupling.pp_right], 1)
        half = jax.ops.segment_sum(cross, coupling.pp_flat, num_segments=R * R).reshape(R, R)
        S = A22 - (half + half.T)
    return BlockedCholesky(L11, C, S, None if differentiable else jnp.linalg.cholesky(S))


def _times_L21(F: BlockedCholesky, z1, coupling):
    """``L21 z1``: ``(R,)`` from ``(G, Q)``."""
    if isinstance(coupling, DenseCoupling):
        return jnp.einsum("grq,gq->r", F.C, z1)
    R = F.S.shape[0]
    values = jnp.sum(F.C * z1[coupling.pair_level], axis=1)
    return jax.ops.segment_sum(values, coupling.pair_rest, num_segments=R)


def _times_L21t(F: BlockedCholesky, x2, coupling):
    """``L21' x2``: ``(G, Q)`` from ``(R,)``."""
    if isinstance(coupling, DenseCoupling):
        return jnp.einsum("grq,r->gq", F.C, x2)
    G = F.L11.shape[0]
    return _level_sum(F.C * x2[coupling.pair_rest][:, None], coupling.pair_level, G)


def solve(F: BlockedCholesky, b1, b2, coupling):
    """Solve ``H (x1, x2) = (b1, b2)`` with ``b1`` ``(G, Q)`` and ``b2`` ``(R,)``."""
    z1 = tri_solve(F.L11, b1)
    t = b2 - _times_L21(F, z1, coupling)
    x2 = spd_inverse(F.S) @ t if F.L22 is None else cho_solve((F.L22, True), t)
    return tri_solve_t(F.L11, z1 - _times_L21t(F, x2, coupling)), x2


def logdet(F: BlockedCholesky):
    """``log det H``."""
    dense = spd_logdet(F.S) if F.L22 is None else 2.0 * jnp.sum(jnp.log(jnp.diagonal(F.L22)))
    return jnp.sum(chol_logdet(F.L11)) + dense


def selected_inverse(F: BlockedCholesky, coupling):
    """The blocks of ``H^{-1}`` that the rows of ``Z Lambda`` touch: ``(X11, X21, S_inv)``.

    ``X11`` ``(G, Q, Q)`` are the first factor's diagonal blocks, ``X21`` the coupling blocks in
    the coupling's layout (``(G, R, Q)`` dense, ``(P, Q)`` one per pair: row ``r`` of the pair's
    effect, columns of its level) and ``S_inv`` the dense ``(R, R)`` block. With
    ``T = S^{-1} L21``, ``X21 = -T L11^{-1}`` and ``X11 = L11^{-T} (I + L21' T) L11^{-1}``; for the
    sparse layout ``T`` and ``L21' T`` are sums over the pairs of pairs (and then the pairs) of
    each level, so nothing of size ``G x R`` is formed.
    """
    G, q = F.L11.shape[:2]
    S_inv = spd_inverse(F.S) if F.L22 is None else _cho_inverse(F.L22)
    if isinstance(coupling, DenseCoupling):
        T = jnp.einsum("rs,gsq->grq", S_inv, F.C)
        inner = jnp.einsum("grq,grp->gqp", F.C, T)
        X21 = -tri_solve_t(F.L11[:, None], T)
    else:
        P = F.C.shape[0]
        s = S_inv.reshape(-1)[coupling.pp_flat][:, None]
        left, right = coupling.pp_left, coupling.pp_right
        # Each unordered pair of pairs is listed once: it adds to both of its pairs, once if
        # the two are the same pair.
        other = jnp.where((left != right)[:, None], s * F.C[left], 0.0)
        T = jax.ops.segment_sum(s * F.C[right], left, num_segments=P) + jax.ops.segment_sum(
            other, right, num_segments=P
        )
        inner = _level_sum(F.C[:, :, None] * T[:, None, :], coupling.pair_level, G)
        X21 = -tri_solve_t(F.L11[coupling.pair_level], T)
    eye = jnp.eye(q, dtype=S_inv.dtype)
    L_inv = jnp.stack([tri_solve(F.L11, jnp.broadcast_to(eye[j], (G, q))) for j in range(q)], -1)
    X11 = jnp.einsum("gji,gjk,gkl->gil", L_inv, inner + eye, L_inv)
    return X11, X21, S_inv


def _cho_inverse(L):
    return cho_solve((L, True), jnp.eye(L.shape[0], dtype=L.dtype))


def inverse_blocks(F: BlockedCholesky, coupling, rest_shapes):
    """Diagonal blocks of ``H^{-1}``: ``(G, Q, Q)`` for the first factor, then one
    ``(G_k, Q_k, Q_k)`` array per other factor (``rest_shapes`` lists their ``(G_k, Q_k)``).
    """
    X11, _, S_inv = selected_inverse(F, coupling)
    blocks = [X11]
    offset = 0
    for G_k, q_k in rest_shapes:
        idx = offset + jnp.arange(G_k)[:, None] * q_k + jnp.arange(q_k)[None, :]
        blocks.append(S_inv[idx[:, :, None], idx[:, None, :]])
        offset += G_k * q_k
    return tuple(blocks)
