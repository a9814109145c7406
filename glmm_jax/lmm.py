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
from .optimize import Control, fit_stages
from .structure import ReStructure

__all__ = [
    "LmmOutput",
    "PlsSolution",
    "pls",
    "profiled_deviance",
    "envelope_deviance",
    "average_information",
    "fit_lmm_arrays",
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
    used = w > 0
    n = jnp.sum(used).astype(y.dtype)
    log_weights = jnp.sum(jnp.where(used, jnp.log(jnp.where(used, w, 1.0)), 0.0))
    logdet_RX = spd_logdet(RX2) if p else jnp.zeros((), y.dtype)
    return PlsSolution(
        beta, u, pwrss, _hessian_logdet(F, structure), logdet_RX, RX2, n, log_weights, x_modes, F
    )


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
    ``hessian`` the approximation of its Hessian that the fit converged with (the average
    information, :func:`average_information`); ``deviance`` is the ML deviance or the REML
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
    """A starting ``phi``: moment estimates for the scalar terms, ``theta = 1`` elsewhere.

    For the column ``z`` of a scalar term ``(1 | g)`` or ``(0 + x | g)``, each level's least-
    squares coefficient ``b_g = sum z e / sum z^2`` on the residuals ``e`` of the fixed-effects
    fit has variance ``sigma_b^2 + sigma^2 / sum z^2`` across levels (the ANOVA estimator),
    so ``sigma_b^2`` is its spread less the mean noise, and ``sigma^2`` what the terms leave of
    the residual variance (the two solved by a few fixed-point steps). Only a start: the
    optimiser refines it, but it saves the iterations of the walk from lme4's ``theta = 1``,
    which on InstEval cost half of the fit (a weakly determined variance bounced between the
    step limits). Entries of vector terms keep ``theta = 1`` (their slopes and correlations
    have no comparably cheap estimate).
    """
    dtype = arrays.X.dtype
    phi0 = np.zeros(structure.n_theta)
    scalar = []  # (theta index, factor index, column in its block)
    k = 0
    for term in structure.terms:
        if term.q == 1:
            f = structure.factors.index(term.group)
            col = sum(
                t.q for t in structure.terms[: structure.terms.index(term)] if t.group == term.group
            )
            scalar.append((k, f, col))
        k += term.n_theta
    if not scalar:
        return jnp.asarray(phi0, dtype)
    w, X = arrays.weights, arrays.X
    y = arrays.y - arrays.offset
    A = X.T @ (w[:, None] * X)
    beta = jnp.linalg.solve(A + 1e-10 * jnp.eye(A.shape[0], dtype=dtype), X.T @ (w * y))
    e = y - X @ beta
    n = jnp.sum(w > 0)
    s2 = jnp.sum(w * e**2) / jnp.maximum(n - X.shape[1], 1)
    shapes = rest_shapes(arrays, structure)
    col_offsets = np.cumsum([0] + [q for _, q in shapes])
    effect_offsets = np.cumsum([0] + [G * q for G, q in shapes])
    spreads, noises, scales = [], [], []
    for _, f, col in scalar:
        if f == 0:
            z, index, G = arrays.Z[:, col], arrays.group, arrays.level_mask.shape[0]
        else:
            G_k, q_k = shapes[f - 1]
            c = col_offsets[f - 1] + col
            z = arrays.Zr[:, c]
            # Position in u_r -> level of factor f.
            index = (arrays.coupling.rest[:, c] - effect_offsets[f - 1]) // q_k
            G = G_k
        sums = jax.ops.segment_sum(jnp.stack([w * z * e, w * z * z], 1), index, num_segments=G)
        present = sums[:, 1] > 0
        den = jnp.where(present, sums[:, 1], 1.0)
        b = sums[:, 0] / den
        m = jnp.maximum(jnp.sum(present), 2)
        mean = jnp.sum(jnp.where(present, b, 0.0)) / m
        spreads.append(jnp.sum(jnp.where(present, (b - mean) ** 2, 0.0)) / (m - 1))
        noises.append(jnp.sum(jnp.where(present, 1.0 / den, 0.0)) / m)
        scales.append(jnp.sum(w * z * z) / jnp.maximum(n, 1))
    spreads, noises, scales = jnp.stack(spreads), jnp.stack(noises), jnp.stack(scales)
    # The noise in b_g is sigma^2 / sum z^2, but the residual variance s2 also holds the
    # other terms' variances (in a crossed design they do not average out of b_g): a few
    # fixed-point steps between sigma^2 and the terms' variances (Penicillin's plates start at
    # theta 1.9 rather than 0.4, against lme4's 1.5).
    sigma2 = s2
    for _ in range(4):
        variances = jnp.maximum(spreads - sigma2 * noises, 0.0)
        sigma2 = jnp.maximum(s2 - jnp.sum(variances * scales), 0.05 * s2)
    theta = jnp.sqrt(variances / sigma2)
    # Not at a boundary (the boundary stage decides those) and not absurdly large.
    log_theta = jnp.log(jnp.clip(theta, 0.05, 20.0))
    return jnp.asarray(phi0, dtype).at[np.array([i for i, _, _ in scalar])].set(log_theta)


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
    The same optimiser and boundary stage as the GLMM fit run over ``phi`` alone.
    """
    control = Control() if control is None else control
    if control.lbfgs_maxiter is None:
        # Newton from the start: its Hessian (the average information) costs a few solves.
        # sleepstudy: 6 Newton iterations against 9 of L-BFGS and 2 of Newton before.
        control = dataclasses.replace(control, lbfgs_maxiter=0)
    p = arrays.X.shape[1]
    dtype = arrays.X.dtype
    if phi0 is None:
        phi0 = moment_start(arrays, structure)

    # The optimiser carries the PLS solution where a GLMM carries its modes: the line search's
    # solution at the accepted point is the next gradient's, which then costs no second PLS.
    def objective(mask):
        def value(phi, sol):
            sol = pls(phi, arrays, mask, structure, False)
            return _criterion(sol, p, reml), sol

        def dev_and_grad(phi, sol):
            return jax.value_and_grad(envelope_deviance)(phi, arrays, mask, structure, reml, sol)

        def hessian(phi, sol, g):
            return average_information(phi, sol, arrays, mask, structure, reml)

        return value, dev_and_grad, hessian

    sol_zero = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(lambda ph: pls(ph, arrays, jnp.ones_like(ph), structure, False), phi0),
    )
    mask, phi, sol, v, g, H, status, its_l, its_n, evals = fit_stages(
        objective, phi0, sol_zero, 0, structure, control, arrays.X.shape[0]
    )
    dof = sol.n - p if reml else sol.n
    sigma = jnp.sqrt(sol.pwrss / dof)
    x = jnp.concatenate([sol.beta, phi])
    grad = jnp.concatenate([jnp.zeros(p, dtype), g])
    cov = spd_inverse(sol.RX2) if p else jnp.zeros((0, 0), dtype)
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
