"""Linear mixed models (lme4's ``lmer``): the profiled deviance as pure JAX.

For a gaussian response with the identity link no Laplace step is needed: for given ``theta``,
the fixed effects and the modes solve one penalised least-squares (PLS) problem (Bates et al.
2015, section 3),

    min_{beta, u} |W^{1/2} (y - offset - X beta - Z Lambda u)|^2 + |u|^2,

whose normal equations share the Hessian ``H = Lambda' Z' W Z Lambda + I`` of the GLMM code
(factored the same way: blockwise for one grouping factor, blocked Cholesky for several,
``blocked.py``). With ``r^2`` the penalised residual sum of squares at the solution and
``R_X' R_X = X' W X - X' W Z Lambda H^{-1} Lambda' Z' W X``, ``sigma`` is profiled out and the
criterion depends on ``theta`` only:

    ML:    log det H + n [1 + log(2 pi r^2 / n)] - sum log w
    REML:  log det H + log det R_X'R_X + (n - p) [1 + log(2 pi r^2 / (n - p))] - sum log w

With one grouping factor the same criterion comes from per-level cross-products of
``[Z | X | y]`` computed in one pass over the data (:func:`cross_products`, as lme4 and
MixedModels.jl compute it): each evaluation then costs ``O(levels)``, whatever the number of
rows (:func:`pls_from_cross_products`).

This module gives that criterion (:func:`profiled_deviance`), the fit over ``theta`` with the
optimiser of the GLMM code (:func:`fit_lmm_arrays`), and the Satterthwaite degrees of freedom
of lmerTest (:func:`satterthwaite_df`), all pure functions of arrays.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .blocked import spd_inverse, spd_logdet
from .blocks import (
    chol,
    gauss_jordan,
    small_einsum,
)
from .laplace import (
    ModelArrays,
    _hessian_factor,
    _hessian_logdet,
    _hessian_solve,
    _rest_size,
    _rest_sum,
    _segsum,
    _several,
    hessian_logdet,
    lambda_factors,
    rest_shapes,
    variances_from_factor,
)
from .optimize import Control, fit_stages, fit_stages_joint
from .structure import ReStructure

__all__ = [
    "LmmOutput",
    "PlsSolution",
    "CrossProducts",
    "pls",
    "cross_products",
    "pls_from_cross_products",
    "moment_start",
    "profiled_deviance",
    "envelope_deviance",
    "average_information",
    "fit_lmm_arrays",
    "fits_from_cross_products",
    "lmm_inputs",
    "value_gradient_hessian",
    "lmm_conditional_variances",
    "satterthwaite_df",
]


class PlsSolution(NamedTuple):
    """The penalised least-squares solution at one ``theta``.

    Attributes
    ----------
    beta : (p,) fixed effects (preconditioned basis).
    u : pair ``(u_1, u_r)`` of spherical modes (``b = Lambda u``).
    pwrss : () penalised weighted residual sum of squares ``r^2``.
    logdet_H, logdet_RX : () log determinants of ``H`` and ``R_X' R_X``.
    RX2 : (p, p) ``R_X' R_X``.
    n, log_weights : () number of weighted rows and ``sum log w`` over them.
    x_modes : pair ``(G, Q, p)``, ``(R, p)``: ``H^{-1} Lambda' Z' W X``, the PLS modes of each
        column of ``X`` (``R_X' R_X`` is the penalised residual cross-product of ``X`` on them).
    factor : the factor of ``H`` (``laplace._hessian_factor``).
    """

    beta: jnp.ndarray
    u: tuple
    pwrss: jnp.ndarray
    logdet_H: jnp.ndarray
    logdet_RX: jnp.ndarray
    RX2: jnp.ndarray
    n: jnp.ndarray
    log_weights: jnp.ndarray
    x_modes: tuple
    factor: object


def pls(phi, arrays: ModelArrays, mask, structure: ReStructure, differentiable=True):
    """Solve the PLS problem at ``theta = theta(phi)``.

    ``differentiable=False`` factors the dense block of several grouping factors by Cholesky
    only (no explicit inverse): cheaper, for values that are not differentiated.
    """
    w, X = arrays.weights, arrays.X
    p = X.shape[1]
    T, T_rest = lambda_factors(phi, structure, mask)
    ZT, ZTr = arrays.Z @ T, arrays.Zr @ T_rest
    y = arrays.y - arrays.offset
    F = _hessian_factor(w, ZT, ZTr, arrays, structure, differentiable)
    beta, u, resid, RX2, x_modes = _pls_columns(F, ZT, ZTr, y[:, None], arrays, structure)
    beta, u, resid = beta[:, 0], (u[0][..., 0], u[1][..., 0]), resid[:, 0]
    pwrss = jnp.sum(w * resid**2) + jnp.sum(u[0] ** 2) + jnp.sum(u[1] ** 2)
    n, log_weights = _weighted_rows(w, y.dtype)
    logdet_RX = spd_logdet(RX2) if p else jnp.zeros((), y.dtype)
    return PlsSolution(
        beta, u, pwrss, _hessian_logdet(F, structure), logdet_RX, RX2, n, log_weights, x_modes, F
    )


def _weighted_rows(w, dtype):
    """``(n, sum log w)`` over the rows of positive weight (padding has weight 0); ``n`` in
    ``dtype``."""
    used, log_w = _row_weight_terms(w, dtype)
    return jnp.sum(used), jnp.sum(log_w)


def _row_weight_terms(w, dtype):
    """Per row, what :func:`_weighted_rows` sums: 1 for a row of positive weight, 0 for
    padding (in ``dtype``), and ``log w`` there (0 for padding)."""
    used = w > 0
    return used.astype(dtype), jnp.where(used, jnp.log(jnp.where(used, w, 1.0)), 0.0)


def _pls_columns(F, ZT, ZTr, Y, arrays: ModelArrays, structure: ReStructure):
    """The PLS solution for each column of ``Y`` ``(n, m)`` as the response, with the fixed
    effects ``X`` and the factor ``F`` of ``H`` at hand: ``(beta, u, residual, RX2, x_modes)``
    with ``beta`` ``(p, m)``, ``u`` the pair ``(G, Q, m)``, ``(R, m)`` and the residuals
    ``Y - X beta - Z Lambda u`` ``(n, m)``."""
    w, X = arrays.weights, arrays.X
    p = X.shape[1]
    # Lambda' Z' W [X | Y], one column per fixed effect and one per response.
    XY = jnp.concatenate([X, Y], axis=1)
    B = w[:, None] * XY
    b1 = _segsum(ZT[:, :, None] * B[:, None, :], arrays)
    if _several(structure):
        br = _rest_sum(ZTr[:, :, None] * B[:, None, :], arrays, _rest_size(arrays, structure))
    else:
        br = jnp.zeros((0, XY.shape[1]), XY.dtype)

    def solve(c1, cr):
        return _hessian_solve(F, (c1, cr), arrays, structure)

    s1, sr = jax.vmap(solve, in_axes=(2, 1), out_axes=(2, 1))(b1, br)
    # [X | Y]' W [X | Y] - B' H^{-1} B over both blocks.
    cross = XY.T @ B - jnp.einsum("gqi,gqj->ij", b1, s1) - br.T @ sr
    RX2 = cross[:p, :p]
    beta = jnp.linalg.solve(RX2, cross[:p, p:])
    u = (s1[:, :, p:] - s1[:, :, :p] @ beta, sr[:, p:] - sr[:, :p] @ beta)
    resid = Y - X @ beta - _rows_times(u, ZT, ZTr, arrays, structure)
    return beta, u, resid, RX2, (s1[:, :, :p], sr[:, :p])


class CrossProducts(NamedTuple):
    """What a linear mixed model with one grouping factor needs of its data, per level.

    With ``e`` the residuals of the weighted least-squares fit of ``y - offset`` on ``X``
    (coefficients ``beta_ls``), and ``Z_g``, ``X_g``, ``e_g``, ``W_g`` level ``g``'s rows:

    Attributes
    ----------
    S : (G, Q, Q) ``Z_g' W_g Z_g``.
    ZX : (G, Q, p) ``Z_g' W_g X_g``.
    Ze : (G, Q) ``Z_g' W_g e_g``.
    XX : (p, p) ``X' W X``.
    ee : () ``e' W e``.
    beta_ls : (p,) the least-squares coefficients.
    n, log_weights : () number of weighted rows and ``sum log w`` over them.

    Residualising ``y`` on ``X`` first keeps the penalised residual sum of squares, a
    difference of these sums, accurate whatever the response's mean (it is at least
    ``e' W e / (1 + max theta^2 |Z_g|^2)``, not a small difference of large numbers).
    """

    S: jnp.ndarray
    ZX: jnp.ndarray
    Ze: jnp.ndarray
    XX: jnp.ndarray
    ee: jnp.ndarray
    beta_ls: jnp.ndarray
    n: jnp.ndarray
    log_weights: jnp.ndarray


def cross_products(arrays: ModelArrays) -> CrossProducts:
    """The :class:`CrossProducts` of a one-factor model: one pass over the data."""
    w, X, Z = arrays.weights, arrays.X, arrays.Z
    n_rows, p, q = X.shape[0], X.shape[1], Z.shape[1]
    y = arrays.y - arrays.offset
    # X'WX, X'Wy, the number of weighted rows and sum log w as one sum over the rows: on small
    # data each reduction is a kernel, and independent kernels ready at once are what makes
    # XLA's runtime hand work to other threads.
    used, log_w = _row_weight_terms(w, y.dtype)
    rows = jnp.concatenate(
        [
            ((w[:, None] * X)[:, :, None] * X[:, None, :]).reshape(n_rows, p * p),
            (w * y)[:, None] * X,
            used[:, None],
            log_w[:, None],
        ],
        axis=1,
    )
    totals = jnp.sum(rows, axis=0)
    XX, Xy = totals[: p * p].reshape(p, p), totals[p * p : p * p + p]
    beta_ls = _spd_solve(XX, Xy)
    e = y - small_einsum("np,p->n", X, beta_ls)
    G = arrays.level_mask.shape[0]
    sums = _level_products(Z, jnp.concatenate([Z, X, e[:, None]], 1), w, arrays.group, G, True)
    return CrossProducts(
        sums[:, :, :q],
        sums[:, :, q : q + p],
        sums[:, :, -1],
        XX,
        jnp.sum(w * e**2),
        beta_ls,
        totals[-2],
        totals[-1],
    )


def _level_products(Z, V, w, index, G: int, sorted_index: bool = False):
    """``Z_g' W V_g`` of every level ``g`` of ``index``: ``(G, Q, m)`` for ``Z`` ``(n, Q)`` and
    ``V`` ``(n, m)``, in one segment sum."""
    n, q, m = Z.shape[0], Z.shape[1], V.shape[1]
    # An explicit row count: with no fixed effects a block of V can be empty, and -1 cannot
    # be inferred from an empty array.
    rows = ((w[:, None] * Z)[:, :, None] * V[:, None, :]).reshape(n, q * m)
    sums = jax.ops.segment_sum(rows, index, num_segments=G, indices_are_sorted=sorted_index)
    return sums.reshape(G, q, m)


def _spd_solve(A, b):
    """``A^{-1} b`` for a small SPD ``A`` (``p x p``, :func:`blocks.gauss_jordan`); 0 x 0
    allowed."""
    if A.shape[0] == 0:
        return b
    return gauss_jordan(A, b[:, None])[0][:, 0]


def pls_from_cross_products(phi, cp: CrossProducts, mask, structure: ReStructure) -> PlsSolution:
    """:func:`pls` for one grouping factor, from :func:`cross_products`: no pass over the data.

    With ``A_g = T' S_g T + I`` (level ``g``'s block of ``H``), ``B_g = T' Z_g' W X_g`` and
    ``b_g = T' Z_g' W e_g``: ``R_X' R_X = X' W X - sum B_g' A_g^{-1} B_g``; the fixed effects
    are ``beta_ls + delta`` with ``R_X' R_X delta = -sum B_g' A_g^{-1} b_g``; the penalised
    residual sum of squares is ``e' W e - sum b_g' A_g^{-1} b_g + delta' sum B_g' A_g^{-1}
    b_g``; the modes are ``u_g = A_g^{-1} (b_g - B_g delta)``; ``log det H`` is the sum of the
    logs of the pivots. One Gauss-Jordan elimination per level (:func:`blocks.gauss_jordan`)
    gives ``A_g^{-1} [B_g | b_g]`` and the pivots, and every operation is on ``(G, Q, Q + p +
    1)`` or smaller arrays: the cost of an evaluation does not grow with the number of rows,
    and on small data it is the number of XLA kernels that counts
    (:func:`value_gradient_hessian`). ``x_modes`` and ``factor`` are not formed (``None``).
    """
    T, _ = lambda_factors(phi, structure, mask)
    q, p = cp.ZX.shape[1], cp.ZX.shape[2]
    A = small_einsum("ji,gjl->gil", T, small_einsum("gjk,kl->gjl", cp.S, T)) + np.eye(
        q, dtype=T.dtype
    )
    # [B_g | b_g]: the fixed effects' columns and the residual's, (G, Q, p + 1).
    Bb = small_einsum("jq,gjc->gqc", T, jnp.concatenate([cp.ZX, cp.Ze[:, :, None]], -1))
    solved, pivots = gauss_jordan(A, Bb)
    # sum_g [B_g | b_g]' A_g^{-1} [B_g | b_g]: (p + 1, p + 1), summed over the Q rows of each
    # block first (unrolled), then over the levels: XLA's CPU backend hands a product-and-sum
    # of more than 4096 elements to a YNNPACK call with a transpose on each side (13 stencil
    # points x 20 levels x 2 x 3 x 3 on sleepstudy), where this sum is one fused loop.
    S = jnp.sum(sum(Bb[:, j, :, None] * solved[:, j, None, :] for j in range(q)), axis=0)
    RX2 = cp.XX - S[:p, :p]
    r = -S[:p, p]
    if p:
        delta, pivots_RX = gauss_jordan(RX2, r[:, None])
        delta, logdet_RX = delta[:, 0], jnp.sum(jnp.log(pivots_RX))
    else:
        delta, logdet_RX = r, jnp.zeros((), T.dtype)
    pwrss = cp.ee - S[p, p] - jnp.dot(r, delta)
    u1 = solved[:, :, p] - small_einsum("gqc,c->gq", solved[:, :, :p], delta)
    return PlsSolution(
        cp.beta_ls + delta,
        (u1, jnp.zeros((0,), T.dtype)),
        pwrss,
        jnp.sum(jnp.log(pivots)),
        logdet_RX,
        RX2,
        cp.n,
        cp.log_weights,
        None,
        None,
    )


def value_gradient_hessian(f, x):
    """``f(x)``, its gradient and its Hessian from values of ``f`` on a stencil around ``x``.

    One ``vmap`` of ``f`` over ``x``, ``x +- h e_i`` and ``x +- h (e_i + e_j)``
    (``k^2 + k + 1`` points for ``k`` parameters): central differences give the gradient and
    the diagonal of the Hessian, and

        H_ij = [f(x + a) + f(x - a) - f(x + h e_i) - f(x - h e_i)
                - f(x + h e_j) - f(x - h e_j) + 2 f(x)] / (2 h^2),  a = h (e_i + e_j),

    all with errors of order ``h^2``. On the small arrays of a cross-product criterion the cost
    is the number of XLA kernels, not their size, and a batched evaluation compiles to the
    kernels of one evaluation (sleepstudy: ~17 with :func:`pls_from_cross_products`'s
    elimination, where the unrolled Cholesky version's 32 compared with 88 for
    ``jax.value_and_grad`` and 211 more for ``jax.hessian``); so every trial point of the
    line search evaluates the whole stencil and the accepted one's derivatives come free
    (:func:`optimize.fit_stages_joint`).
    ``x`` holds log standard deviations and Cholesky entries of order one, so ``h`` is
    absolute: ``h = eps^0.3`` (2e-5 in float64, 8e-3 in float32) balances the gradient's
    truncation error ``h^2 |f'''| / 6`` against its rounding ``delta / h`` (``f`` rounded to
    ``delta ~ eps |f|``), leaning to the larger ``h`` that keeps the Hessian's rounding
    ``delta / h^2`` small. On sleepstudy's criterion (1.7e3, ``|f'''|`` up to 1.1e3) in
    float64: the gradient is accurate to ``1e-7`` and the Hessian to ``2e-3`` on entries of
    30 to 200, so the optimum moves by ``H^{-1}`` times the gradient's error, ``1e-9``, and the
    Newton decrement's error is far below ``Control.newton_tol``; in float32 the Hessian's
    few per cent only slow Newton's last steps.
    """
    k = x.shape[0]
    h = float(np.finfo(x.dtype).eps ** 0.3)
    steps = h * np.eye(k, dtype=x.dtype)
    i, j = np.triu_indices(k, 1)
    pairs = steps[i] + steps[j]
    points = jnp.concatenate([x[None], x + steps, x - steps, x + pairs, x - pairs])
    values = jax.vmap(f)(points)
    f0, plus, minus = values[0], values[1 : k + 1], values[k + 1 : 2 * k + 1]
    both_plus, both_minus = values[2 * k + 1 : 2 * k + 1 + i.size], values[2 * k + 1 + i.size :]
    g = (plus - minus) / (2.0 * h)
    curvature = plus + minus - 2.0 * f0  # h^2 H_ii
    off = (both_plus + both_minus - 2.0 * f0 - curvature[i] - curvature[j]) / (2.0 * h**2)
    # H by a gather from static positions in (diagonal, off-diagonal), which fuses; writing
    # the off-diagonal into a diagonal matrix was two scatters, two kernels per evaluation.
    position = np.diag(np.arange(k))
    position[i, j] = position[j, i] = k + np.arange(i.size)
    H = jnp.concatenate([curvature / h**2, off])[position]
    return f0, g, H


def _criterion(sol: PlsSolution, p: int, reml: bool, log_sigma=None):
    """``-2 log L`` (ML) or the REML criterion, with ``sigma`` profiled out unless given."""
    dof = sol.n - p if reml else sol.n
    if log_sigma is None:
        fit = dof * (1.0 + jnp.log(2.0 * jnp.pi * sol.pwrss / dof))
    else:
        fit = dof * jnp.log(2.0 * jnp.pi) + 2.0 * dof * log_sigma
        fit = fit + sol.pwrss * jnp.exp(-2.0 * log_sigma)
    extra = sol.logdet_RX if reml else 0.0
    return sol.logdet_H + extra + fit - sol.log_weights


def profiled_deviance(phi, arrays, mask, structure: ReStructure, reml: bool, differentiable=True):
    """The ML deviance or REML criterion of the linear mixed model at ``theta(phi)``.

    The REML criterion is that of the preconditioned fixed-effects matrix ``X M``: it differs
    from lme4's by the constant ``-2 log|det M|`` (see :func:`glmm_jax.lmer`).
    """
    sol = pls(phi, arrays, mask, structure, differentiable)
    return _criterion(sol, arrays.X.shape[1], reml)


def _rows_times(v, ZT, ZTr, arrays: ModelArrays, structure: ReStructure):
    """``Z Lambda v`` for modes ``v = (v_1, v_r)`` with trailing columns: ``(n, ...)``."""
    v1, vr = v
    out = jnp.einsum("nq,nq...->n...", ZT, v1[arrays.group])
    if _several(structure):
        out = out + jnp.einsum("nc,nc...->n...", ZTr, vr[arrays.coupling.rest])
    return out


def envelope_deviance(phi, arrays, mask, structure: ReStructure, reml: bool, sol=None):
    """:func:`profiled_deviance`, written so that its *gradient* is cheap (not its Hessian).

    Every term is a minimum over the PLS unknowns: ``r^2`` over ``(beta, u)`` and
    ``R_X' R_X = min_S (X - Z Lambda S)' W (X - Z Lambda S) + S'S`` over the modes ``S`` of
    ``X``'s columns. By the envelope theorem their first derivatives in ``theta`` are those at
    the minimiser held fixed, so the solution is computed once without derivatives
    (``stop_gradient``) and only the rows of ``Z Lambda`` carry ``theta``'s tangent: a pass over
    the data, plus :func:`laplace.hessian_logdet`'s selected inverse for ``log det H``. The
    value equals :func:`profiled_deviance`'s; its second derivatives are not the criterion's
    (the optimiser starts from :func:`average_information` instead).
    ``sol`` may pass in the :func:`pls` solution at ``phi`` if it is at hand.
    """
    p = arrays.X.shape[1]
    if sol is None:
        sol = pls(jax.lax.stop_gradient(phi), arrays, mask, structure, False)
    sol = jax.lax.stop_gradient(sol)
    T, T_rest = lambda_factors(phi, structure, mask)
    ZT, ZTr = arrays.Z @ T, arrays.Zr @ T_rest
    w = arrays.weights
    resid = (
        arrays.y
        - arrays.offset
        - arrays.X @ sol.beta
        - _rows_times(sol.u, ZT, ZTr, arrays, structure)
    )
    pwrss = jnp.sum(w * resid**2) + jnp.sum(sol.u[0] ** 2) + jnp.sum(sol.u[1] ** 2)
    logdet_H = hessian_logdet(w, ZT, ZTr, sol.factor, arrays, structure)
    logdet_RX = sol.logdet_RX
    if reml and p:
        S1, Sr = sol.x_modes
        E = arrays.X - _rows_times(sol.x_modes, ZT, ZTr, arrays, structure)
        RX2 = E.T @ (w[:, None] * E) + jnp.einsum("gqi,gqj->ij", S1, S1) + Sr.T @ Sr
        logdet_RX = spd_logdet(RX2)
    sol = sol._replace(pwrss=pwrss, logdet_H=logdet_H, logdet_RX=logdet_RX)
    return _criterion(sol, p, reml)


def average_information(phi, sol: PlsSolution, arrays, mask, structure: ReStructure, reml):
    """The average-information approximation to the Hessian of the criterion in ``phi``.

    The Hessian of ``-2 log L`` in variance parameters ``a, b`` averages to ``y'P V_a P V_b P y``
    between its observed and expected values (the AI-REML algorithm of Gilmour, Thompson and
    Cullis 1995), with ``V = sigma^2 (W^{-1} + A A')``, ``A = Z Lambda``, ``V_a = dV/da`` and
    ``P y = V^{-1} (y - X beta)``. Each ``V_a P y`` is a vector of length ``n`` and each
    ``P v`` a PLS solve with ``v`` as the response, which the factor of ``H`` at hand makes
    cheap: the whole matrix costs a few solves, where one gradient costs the dense block's
    inverse (on InstEval 10 ms against 3 x 130 ms for differences of the gradient). In
    ``(log sigma^2, phi)``: ``V_sigma P y = y - X beta`` and
    ``V_j P y = dA_j u + A (dA_j' W r)`` (``r`` the PLS residual, ``u = A' W r``, ``dA_j`` the
    derivative of ``A`` in ``phi_j``); ``sigma`` is then profiled out by a Schur complement.
    The optimiser takes it as the Hessian of every Newton step.
    """

    def rows(ph):
        T, T_rest = lambda_factors(ph, structure, mask)
        return arrays.Z @ T, arrays.Zr @ T_rest

    ZT, ZTr = rows(phi)
    dZT, dZTr = jax.jacfwd(rows)(phi)  # (n, Q, k), (n, C, k)
    w, u = arrays.weights, sol.u
    y = arrays.y - arrays.offset
    r = y - arrays.X @ sol.beta - _rows_times(u, ZT, ZTr, arrays, structure)
    wr = (w * r)[:, None, None]
    effects = (_segsum(dZT * wr, arrays), jnp.zeros((0, phi.shape[0]), y.dtype))
    v = jnp.einsum("nqk,nq->nk", dZT, u[0][arrays.group])
    if _several(structure):
        effects = (effects[0], _rest_sum(dZTr * wr, arrays, _rest_size(arrays, structure)))
        v = v + jnp.einsum("nck,nc->nk", dZTr, u[1][arrays.coupling.rest])
    v = v + _rows_times(effects, ZT, ZTr, arrays, structure)
    V = jnp.concatenate([(r + _rows_times(u, ZT, ZTr, arrays, structure))[:, None], v], axis=1)
    resid = _pls_columns(sol.factor, ZT, ZTr, V, arrays, structure)[2]
    dof = sol.n - arrays.X.shape[1] if reml else sol.n
    AI = V.T @ (w[:, None] * resid) / (sol.pwrss / dof)
    AI = 0.5 * (AI + AI.T)
    return AI[1:, 1:] - jnp.outer(AI[1:, 0], AI[0, 1:]) / AI[0, 0]


class LmmOutput(NamedTuple):
    """Everything :func:`fit_lmm_arrays` returns (a PyTree, like ``optimize.FitOutput``).

    ``x`` is ``(beta, phi)`` as for a GLMM, so results read both alike; ``grad`` is the
    gradient of the profiled criterion in ``phi`` (padded with zeros for ``beta``) and
    ``hessian`` the Hessian that the fit converged with (with one grouping factor from the
    stencil of :func:`value_gradient_hessian`, with several the average information,
    :func:`average_information`); ``deviance`` is the ML deviance or the REML
    criterion; ``cov_unscaled`` is ``(R_X' R_X)^{-1}`` (the covariance of ``beta`` is
    ``sigma^2`` times it, conditional on ``theta``, as lme4's ``vcov``). The conditional
    variances are not here: they need the dense block's inverse, ~6% of an InstEval fit, so
    :func:`lmm_conditional_variances` computes them when they are asked for.
    """

    x: jnp.ndarray
    u: tuple
    mask: jnp.ndarray
    deviance: jnp.ndarray
    grad: jnp.ndarray
    hessian: jnp.ndarray
    status: jnp.ndarray
    lbfgs_iterations: jnp.ndarray
    newton_iterations: jnp.ndarray
    evaluations: jnp.ndarray
    sigma: jnp.ndarray
    cov_unscaled: jnp.ndarray


def moment_start(arrays: ModelArrays, structure: ReStructure):
    """A starting ``phi`` from moment estimates of every grouping factor's covariance.

    For the columns ``Z_g`` of a grouping factor at its level ``g`` (every term of the factor
    at once), the least-squares coefficients ``b_g = (Z_g' W Z_g)^{-1} Z_g' W e_g`` on the
    residuals ``e`` of the fixed-effects fit have covariance
    ``Sigma_b + sigma^2 (Z_g' W Z_g)^{-1}`` across levels (the ANOVA estimator), so ``Sigma_b``
    is their spread less the mean noise, and ``sigma^2`` what the factors leave of the residual
    variance (:func:`_moment_phi`). Only a start: the optimiser refines it, but it saves the
    iterations of the walk from lme4's ``theta = 1``, which on InstEval cost half of the fit (a
    weakly determined variance bounced between the step limits), and on sleepstudy two of six
    Newton steps.
    """
    w, X = arrays.weights, arrays.X
    y = arrays.y - arrays.offset
    A = X.T @ (w[:, None] * X)
    beta = jnp.linalg.solve(A + 1e-10 * jnp.eye(A.shape[0], dtype=X.dtype), X.T @ (w * y))
    e = y - X @ beta
    n = jnp.sum(w > 0)
    shapes = rest_shapes(arrays, structure)
    level_sums = [_moment_sums(arrays.Z, e, w, arrays.group, arrays.level_mask.shape[0])]
    col = 0
    for k, (G_k, q_k) in enumerate(shapes):
        # Position in u_r -> level of factor k + 1 (its block's effects are consecutive).
        start = sum(G * q for G, q in shapes[:k])
        index = (arrays.coupling.rest[:, col] - start) // q_k
        level_sums.append(_moment_sums(arrays.Zr[:, col : col + q_k], e, w, index, G_k))
        col += q_k
    s2 = jnp.sum(w * e**2) / jnp.maximum(n - X.shape[1], 1)
    return _moment_phi(level_sums, s2, n.astype(X.dtype), structure)


def _moment_sums(Z, e, w, index, G: int):
    """``(Z_g' W Z_g, Z_g' W e_g)`` of every level: ``(G, Q, Q)`` and ``(G, Q)``."""
    sums = _level_products(Z, jnp.concatenate([Z, e[:, None]], 1), w, index, G)
    return sums[:, :, :-1], sums[:, :, -1]


def _moment_phi(level_sums, s2, n, structure: ReStructure):
    """``phi`` from each grouping factor's per-level sums ``(Z_g' W Z_g, Z_g' W e_g)``
    (``(G, Q, Q)`` and ``(G, Q)``), the residual variance ``s2`` of the fixed-effects fit and
    the number of rows.

    Levels whose ``Z_g' W Z_g`` is singular (a slope over one value) have no coefficient and are
    left out; the terms of a factor with at most ``Q`` levels left start at ``theta = 1``.
    """
    dtype = s2.dtype
    spreads, noises, scales, enough = [], [], [], []
    for S, Ze in level_sums:
        q = S.shape[-1]
        eye = jnp.broadcast_to(np.eye(q, dtype=dtype), S.shape)
        # (Z_g' W Z_g)^{-1} [Z_g' W e_g | I]: a singular level's values are not finite, and
        # are left out by the mask.
        solved, pivots = gauss_jordan(S, jnp.concatenate([Ze[:, :, None], eye], -1))
        scale_g = jnp.max(jnp.diagonal(S, axis1=-2, axis2=-1), axis=-1)
        present = (scale_g > 0) & jnp.all(pivots > 1e-8 * scale_g[:, None], axis=-1)
        m = jnp.sum(present)
        b = jnp.where(present[:, None], solved[:, :, 0], 0.0)
        centred = jnp.where(present[:, None], b - jnp.sum(b, 0) / jnp.maximum(m, 1), 0.0)
        spreads.append(centred.T @ centred / jnp.maximum(m - 1, 1))
        inverse = jnp.where(present[:, None, None], solved[:, :, 1:], 0.0)
        noises.append(jnp.sum(inverse, 0) / jnp.maximum(m, 1))
        scales.append(jnp.sum(S, 0) / jnp.maximum(n, 1))
        enough.append(m > q)

    def positive_part(V, floor):
        """``V`` with its eigenvalues floored (``V`` symmetric, ``q x q``)."""
        q = V.shape[0]
        if q == 1:
            return jnp.maximum(V, floor)

        def floored():
            ev, vecs = jnp.linalg.eigh(V)
            return (vecs * jnp.maximum(ev, floor)) @ vecs.T

        # Every eigenvalue above the floor (V - floor I positive definite: its pivots
        # positive), the usual case: V itself, without LAPACK's eigh (~4 us a call).
        _, pivots = gauss_jordan(V - floor * np.eye(q, dtype=V.dtype), V[:, :0])
        return jax.lax.cond(jnp.all(pivots > 0), lambda: V, floored)

    # The noise in b_g is sigma^2 (Z_g' W Z_g)^{-1}, but the residual variance s2 also holds
    # the terms' variances (in a crossed design they do not average out of b_g): a few
    # fixed-point steps between sigma^2 and the terms' covariances (Penicillin's plates start
    # at theta 1.9 rather than 0.4, against lme4's 1.5).
    # (Inside the loop each factor's share is floored at zero as a whole, not projected onto
    # the positive semi-definite matrices: an eigendecomposition per step costs more than
    # the start is worth.)
    sigma2 = s2
    for _ in range(4):
        covs = [V - sigma2 * N for V, N in zip(spreads, noises, strict=True)]
        explained = sum(jnp.maximum(jnp.sum(C * K), 0.0) for C, K in zip(covs, scales, strict=True))
        sigma2 = jnp.maximum(s2 - explained, 0.05 * s2)
    covs = [V - sigma2 * N for V, N in zip(spreads, noises, strict=True)]
    phi, start = [], 0
    layout = structure.theta_layout()
    for term, f, col in structure.term_columns:
        # theta = chol(Sigma_b / sigma^2) of the term's block, not at a boundary (the boundary
        # stage decides those) and not absurdly large.
        block = covs[f][col : col + term.q, col : col + term.q]
        T = chol(positive_part(block / sigma2, 0.05**2)[None])[0]
        # The term's theta entries, in the structure's order, within its block.
        stop = start + term.n_theta
        rows = np.array([row - col for _, row, _ in layout[start:stop]])
        cols = np.array([c - col for _, _, c in layout[start:stop]])
        entries = T[rows, cols]
        diagonal = structure.diagonal[start:stop]
        start = stop
        entries = jnp.where(
            diagonal, jnp.log(jnp.clip(jnp.where(diagonal, entries, 1.0), 0.05, 20.0)), entries
        )
        phi.append(jnp.where(enough[f], jnp.clip(entries, -20.0, 20.0), 0.0))
    return jnp.concatenate(phi).astype(dtype)


#: The largest ``theta`` fitted from cross-products with stencil derivatives: the stencil has
#: ``k^2 + k + 1`` points (111 for a 4 x 4 block), each a pass over the levels; larger blocks
#: take the PLS path with the average information, whose cost does not grow with ``k^2``.
STENCIL_MAX_THETA = 10


def fits_from_cross_products(structure: ReStructure) -> bool:
    """Whether :func:`fit_lmm_arrays` fits this structure from :func:`cross_products`: one
    grouping factor with at most :data:`STENCIL_MAX_THETA` entries in ``theta``."""
    return not _several(structure) and structure.n_theta <= STENCIL_MAX_THETA


def lmm_inputs(arrays: ModelArrays, structure: ReStructure) -> ModelArrays:
    """``arrays`` without the leaves that :func:`fit_lmm_arrays` does not read for this
    structure (``None`` in their place).

    From cross-products the fit reads ``X``, ``y``, ``weights``, ``offset``, ``Z``, ``group``
    and ``level_mask``; the other ten leaves of a one-factor design (trials, the other factors'
    columns and coupling indices) would each cost jit's dispatch ~3 us to transfer, a tenth of
    the compiled call on sleepstudy.
    """
    if not fits_from_cross_products(structure):
        return arrays
    return arrays._replace(trials=None, Zr=None, rest_levels=None, coupling=None)


def fit_lmm_arrays(
    arrays: ModelArrays,
    phi0: jnp.ndarray | None,
    *,
    structure: ReStructure,
    reml: bool = True,
    control: Control | None = None,
) -> LmmOutput:
    """Fit a linear mixed model to its arrays: the pure, compiled, batchable core of ``lmer``.

    ``phi0`` starts the optimisation (``None``: :func:`moment_start`).
    Newton steps from the start over ``phi`` alone, with the GLMM fit's line search and
    boundary stage. With one grouping factor (and at most :data:`STENCIL_MAX_THETA` entries
    in ``theta``) the criterion comes from :func:`cross_products` computed once, and every
    evaluation is a stencil of its values whose differences give the gradient and Hessian
    (:func:`value_gradient_hessian`), so the line search's accepted point brings the next
    step's derivatives (:func:`optimize.fit_stages_joint`, one evaluation per iteration);
    otherwise the GLMM fit's optimiser runs (:func:`optimize.fit_stages`), each evaluation a
    PLS solve over the data (:func:`pls`), the gradient from :func:`envelope_deviance` and the
    Hessian the average information.
    """
    control = Control() if control is None else control
    if control.lbfgs_maxiter is None:
        # Newton from the start: its Hessian costs a few solves (or, from cross-products,
        # little at all). sleepstudy: 6 Newton iterations against 9 of L-BFGS and 2 of Newton.
        control = dataclasses.replace(control, lbfgs_maxiter=0)
    p = arrays.X.shape[1]
    dtype = arrays.X.dtype
    rows = arrays.X.shape[0]

    if fits_from_cross_products(structure):
        cp = cross_products(arrays)
        if phi0 is None:
            # moment_start's sums are the cross-products' (no second pass over the data).
            s2 = cp.ee / jnp.maximum(cp.n - p, 1.0)
            phi0 = _moment_phi([(cp.S, cp.Ze)], s2, cp.n, structure)

        def evaluate(phi, mask):
            # Every evaluation is the whole stencil (as many kernels as one value): each
            # trial point of the line search brings its derivatives with it, so a Newton step
            # costs one stencil per trial and no more.
            def criterion(ph):
                return _criterion(pls_from_cross_products(ph, cp, mask, structure), p, reml)

            return value_gradient_hessian(criterion, phi)

        mask, phi, _, v, g, H, status, its_l, its_n, evals = fit_stages_joint(
            evaluate, phi0, 0, structure, control
        )
        sol = pls_from_cross_products(phi, cp, mask, structure)
    else:
        if phi0 is None:
            phi0 = moment_start(arrays, structure)

        # The optimiser carries the PLS solution where a GLMM carries its modes: the line
        # search's solution at the accepted point is the next gradient's, which then costs no
        # second PLS.
        def objective(mask):
            def value(phi, sol):
                sol = pls(phi, arrays, mask, structure, False)
                return _criterion(sol, p, reml), sol

            def dev_and_grad(phi, sol):
                return jax.value_and_grad(envelope_deviance)(
                    phi, arrays, mask, structure, reml, sol
                )

            def hessian(phi, sol, g):
                return average_information(phi, sol, arrays, mask, structure, reml)

            return value, dev_and_grad, hessian

        sol_zero = jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(lambda ph: pls(ph, arrays, jnp.ones_like(ph), structure, False), phi0),
        )
        mask, phi, sol, v, g, H, status, its_l, its_n, evals = fit_stages(
            objective, phi0, sol_zero, 0, structure, control, rows
        )
    dof = sol.n - p if reml else sol.n
    sigma = jnp.sqrt(sol.pwrss / dof)
    x = jnp.concatenate([sol.beta, phi])
    grad = jnp.concatenate([jnp.zeros(p, dtype), g])
    # By elimination (LAPACK's Cholesky and two triangular solves would be three calls).
    cov = gauss_jordan(sol.RX2, np.eye(p, dtype=dtype))[0]
    return LmmOutput(x, sol.u, mask, v, grad, H, status, its_l, its_n, evals, sigma, cov)


def lmm_conditional_variances(arrays, phi, mask, sigma, *, structure: ReStructure):
    """Conditional covariances of the random effects of a fitted LMM, one ``(G_k, Q_k, Q_k)``
    array per grouping factor, on the ``b`` scale: ``sigma^2`` times ``laplace``'s."""
    sol = pls(phi, arrays, mask, structure, False)
    condvar = variances_from_factor(sol.factor, phi, arrays, mask, structure)
    return tuple(sigma**2 * V for V in condvar)


def satterthwaite_df(phi, log_sigma, arrays, mask, M, *, free, structure, reml):
    """Satterthwaite's denominator degrees of freedom of each fixed effect (lmerTest's method).

    With ``V(v) = sigma^2 M (R_X' R_X)^{-1} M'`` the covariance of the fixed effects as a
    function of the variance parameters ``v = (phi, log sigma)`` (those not held at zero) and
    ``A = 2 H^{-1}`` their asymptotic covariance, ``H`` the Hessian of the (REML or ML)
    deviance in ``v`` with ``sigma`` explicit, the degrees of freedom of coefficient ``j`` are
    ``2 V_jj^2 / (g' A g)`` with ``g = dV_jj / dv``. Derivatives by autodiff; the result does not
    depend on how ``v`` is parameterised, since ``v`` is at the optimum. ``free`` (static)
    lists the entries of ``phi`` not held at zero.
    """
    p = arrays.X.shape[1]
    free = np.asarray(free, dtype=int)

    def unpack(v):
        return phi.at[free].set(v[:-1]), v[-1]

    def deviance(v):
        ph, ls = unpack(v)
        return _criterion(pls(ph, arrays, mask, structure), p, reml, ls)

    def covariance(v):
        ph, ls = unpack(v)
        RX2 = pls(ph, arrays, mask, structure).RX2
        return jnp.exp(2.0 * ls) * jnp.diagonal(M @ spd_inverse(RX2) @ M.T)

    v = jnp.concatenate([phi[free], jnp.reshape(log_sigma, (1,))])
    A = 2.0 * jnp.linalg.inv(jax.hessian(deviance)(v))
    V, J = covariance(v), jax.jacfwd(covariance)(v)
    return 2.0 * V**2 / jnp.einsum("ji,ik,jk->j", J, A, J)
