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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .blocked import spd_inverse, spd_logdet
from .families import Gaussian
from .laplace import (
    ModelArrays,
    _hessian_factor,
    _hessian_logdet,
    _hessian_solve,
    _rest_size,
    _rest_sum,
    _segsum,
    _several,
    conditional_variances,
    lambda_factors,
)
from .links import get_link
from .optimize import Control, fit_stages
from .structure import ReStructure

__all__ = [
    "LmmOutput",
    "PlsSolution",
    "pls",
    "profiled_deviance",
    "fit_lmm_arrays",
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
    """

    beta: jnp.ndarray
    u: tuple
    pwrss: jnp.ndarray
    logdet_H: jnp.ndarray
    logdet_RX: jnp.ndarray
    RX2: jnp.ndarray
    n: jnp.ndarray
    log_weights: jnp.ndarray


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
    # Lambda' Z' W [X | y], one column per fixed effect and one for the response.
    B = w[:, None] * jnp.concatenate([X, y[:, None]], axis=1)
    b1 = _segsum(ZT[:, :, None] * B[:, None, :], arrays)
    if _several(structure):
        br = _rest_sum(ZTr[:, :, None] * B[:, None, :], arrays, _rest_size(arrays, structure))
    else:
        br = jnp.zeros((0, p + 1), y.dtype)

    def solve(c1, cr):
        return _hessian_solve(F, (c1, cr), arrays, structure)

    s1, sr = jax.vmap(solve, in_axes=(2, 1), out_axes=(2, 1))(b1, br)
    # B' H^{-1} B over both blocks: (p + 1) x (p + 1).
    BHB = jnp.einsum("gqi,gqj->ij", b1, s1) + br.T @ sr
    XY = jnp.concatenate([X, y[:, None]], axis=1)
    cross = XY.T @ B - BHB
    RX2 = cross[:p, :p]
    beta = jnp.linalg.solve(RX2, cross[:p, p])
    u = (s1[:, :, p] - s1[:, :, :p] @ beta, sr[:, p] - sr[:, :p] @ beta)
    fitted = X @ beta + jnp.sum(ZT * u[0][arrays.group], axis=1)
    if _several(structure):
        fitted = fitted + jnp.sum(ZTr * u[1][arrays.coupling.rest], axis=1)
    pwrss = jnp.sum(w * (y - fitted) ** 2) + jnp.sum(u[0] ** 2) + jnp.sum(u[1] ** 2)
    used = w > 0
    n = jnp.sum(used).astype(y.dtype)
    log_weights = jnp.sum(jnp.where(used, jnp.log(jnp.where(used, w, 1.0)), 0.0))
    logdet_RX = spd_logdet(RX2) if p else jnp.zeros((), y.dtype)
    return PlsSolution(
        beta, u, pwrss, _hessian_logdet(F, structure), logdet_RX, RX2, n, log_weights
    )


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


class LmmOutput(NamedTuple):
    """Everything :func:`fit_lmm_arrays` returns (a PyTree, like ``optimize.FitOutput``).

    ``x`` is ``(beta, phi)`` as for a GLMM, so results read both alike; ``grad`` and
    ``hessian`` are those of the profiled criterion in ``phi`` (``grad`` padded with zeros for
    ``beta``); ``deviance`` is the ML deviance or the REML criterion; ``condvar`` is on the
    ``b`` scale including ``sigma^2``; ``cov_unscaled`` is ``(R_X' R_X)^{-1}`` (the covariance of
    ``beta`` is ``sigma^2`` times it, conditional on ``theta``, as lme4's ``vcov``).
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
    condvar: tuple
    sigma: jnp.ndarray
    cov_unscaled: jnp.ndarray


def fit_lmm_arrays(
    arrays: ModelArrays,
    phi0: jnp.ndarray | None,
    *,
    structure: ReStructure,
    reml: bool = True,
    control: Control | None = None,
) -> LmmOutput:
    """Fit a linear mixed model to its arrays: the pure, compiled, batchable core of ``lmer``.

    ``phi0`` starts the optimisation (``None``: ``theta = 1`` on the diagonals, lme4's start).
    The same optimiser and boundary stage as the GLMM fit run over ``phi`` alone.
    """
    control = Control() if control is None else control
    p = arrays.X.shape[1]
    dtype = arrays.X.dtype
    if phi0 is None:
        phi0 = jnp.zeros(structure.n_theta, dtype)
    no_modes = jnp.zeros(0, dtype)

    def objective(mask):
        def deviance(phi):
            return profiled_deviance(phi, arrays, mask, structure, reml)

        def value(phi, u):
            return profiled_deviance(phi, arrays, mask, structure, reml, False), u

        def dev_and_grad(phi, u):
            return jax.value_and_grad(deviance)(phi)

        return value, dev_and_grad

    mask, phi, _, v, g, H, status, its_l, its_n, evals = fit_stages(
        objective, phi0, no_modes, 0, structure, control, arrays.X.shape[0]
    )
    sol = pls(phi, arrays, mask, structure, False)
    dof = sol.n - p if reml else sol.n
    sigma = jnp.sqrt(sol.pwrss / dof)
    x = jnp.concatenate([sol.beta, phi])
    condvar = conditional_variances(
        x, sol.u, arrays, mask, Gaussian(get_link("identity")), structure
    )
    condvar = tuple(sigma**2 * V for V in condvar)
    grad = jnp.concatenate([jnp.zeros(p, dtype), g])
    cov = spd_inverse(sol.RX2) if p else jnp.zeros((0, 0), dtype)
    return LmmOutput(x, sol.u, mask, v, grad, H, status, its_l, its_n, evals, condvar, sigma, cov)


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
