"""The Laplace-approximate deviance of a GLMM with one grouping factor, as pure JAX.

Notation (lme4's, Bates et al. 2015): ``eta = offset + X beta + Z Lambda_theta u``, ``u ~ N(0, I)``.
For one grouping factor every level ``g`` has its own ``u_g`` (length ``Q``) and the same
``Q x Q`` lower-triangular block ``T`` of ``Lambda``, so ``eta_i = x_i' beta + offset_i +
(T' z_i)' u_{g(i)}``.

* The conditional mode ``u*`` maximises ``sum_i w_i log p(y_i | eta_i) - |u|^2 / 2``. The
  problem separates by level, so :func:`solve_modes` runs a damped Newton iteration on all
  levels at once, with step-halving per level.
* The Laplace deviance (``-2 log L``) at ``u*`` is
  ``-2 sum_i w_i log p(y_i | u*) + |u*|^2 + sum_g log det(T' Z_g' W Z_g T + I)``
  with ``W`` the expected (Fisher) information, as lme4's PIRLS weights.
* Derivatives of ``u*`` come from the implicit function theorem (a ``custom_jvp`` whose primal
  is the identity on the converged modes), never from differentiating the Newton iterations, so
  gradients and the exact Hessian of the deviance are cheap, exact, and compile small.
* :func:`deviance_and_gradient` writes the gradient out by the adjoint method (three passes
  over the data); the optimiser uses it, and its forward derivative as the exact Hessian.
  :func:`laplace_deviance` stays the plain definition that autodiff checks it against.

Nothing here raises inside jit; failures show up as non-finite values or as flags in the result.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .blocks import chol, chol_inverse, chol_logdet, chol_solve
from .families import Family
from .structure import ReStructure

__all__ = [
    "ModelArrays",
    "InnerControl",
    "solve_modes",
    "implicit_modes",
    "laplace_deviance",
    "deviance_and_gradient",
    "deviance_constant",
    "conditional_variances",
    "linear_predictor",
]


class ModelArrays(NamedTuple):
    """The numbers of one model, padded to bucketed sizes (padding has weight 0).

    Attributes
    ----------
    X : (n, p) fixed-effects matrix (preconditioned: see ``design.py``).
    y : (n,) response; successes for the binomial.
    trials : (n,) binomial trials (1 otherwise).
    weights : (n,) prior weights; 0 marks padding.
    offset : (n,) offset of the linear predictor.
    Z : (n, Q) random-effect covariates of the grouping factor.
    group : (n,) int32 level codes, sorted ascending.
    level_mask : (G,) 1 for a level that occurs, 0 for padding.
    """

    X: jnp.ndarray
    y: jnp.ndarray
    trials: jnp.ndarray
    weights: jnp.ndarray
    offset: jnp.ndarray
    Z: jnp.ndarray
    group: jnp.ndarray
    level_mask: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class InnerControl:
    """Settings of the inner Newton iteration for the conditional modes.

    Attributes
    ----------
    maxiter : int
        Newton steps at most.
    tol : float
        Stop once the largest Newton step is below this (``u`` is on the N(0, 1) scale, and the
        error after that step is about its square).
    max_halvings : int
        Step-halvings per Newton step before the step is taken anyway.
    """

    maxiter: int = 50
    tol: float = 1e-6
    max_halvings: int = 20


def _split(x, arrays: ModelArrays, structure: ReStructure, mask):
    p = arrays.X.shape[1]
    beta, phi = x[:p], x[p:]
    (T,) = structure.lambda_blocks(structure.theta_from_phi(phi, mask))
    return beta, T


def linear_predictor(x, u, arrays: ModelArrays, structure: ReStructure, mask):
    """``eta``, and the rows ``T' z_i`` (as ``Z T``), at ``x = (beta, phi)`` and modes ``u``."""
    beta, T = _split(x, arrays, structure, mask)
    ZT = arrays.Z @ T
    eta = arrays.X @ beta + arrays.offset + jnp.sum(ZT * u[arrays.group], axis=1)
    return eta, ZT


def _segsum(values, arrays: ModelArrays):
    return jax.ops.segment_sum(
        values, arrays.group, num_segments=arrays.level_mask.shape[0], indices_are_sorted=True
    )


def _score_terms(family: Family, arrays: ModelArrays, eta):
    """First and second derivatives in ``eta`` of each weighted log-density (differentiable)."""

    def score(e):
        return arrays.weights * family.score(arrays.y, arrays.trials, e)

    # The score is elementwise in eta, so one forward pass with a vector of ones gives the
    # diagonal second derivative.
    return jax.jvp(score, (eta,), (jnp.ones_like(eta),))


def _block_hessian(w, ZT, arrays: ModelArrays):
    """``sum_i w_i (T' z_i)(T' z_i)' + I`` for every level: shape ``(G, Q, Q)``."""
    q = ZT.shape[1]
    outer = w[:, None, None] * ZT[:, :, None] * ZT[:, None, :]
    return _segsum(outer, arrays) + jnp.eye(q, dtype=ZT.dtype)


def solve_modes(x, arrays, u0, mask, family, structure, control: InnerControl):
    """Conditional modes ``u*`` by damped Newton from ``u0``: ``(u*, iterations, converged)``.

    Each trial point costs one pass over the data: the log-density, score and curvature come
    from one elementwise evaluation, and every per-level sum (objective, gradient, Hessian) from
    one stacked segment sum; an accepted trial's sums are the next Newton step's inputs. Not
    differentiable (the iteration is never differentiated): :func:`implicit_modes` attaches
    the derivatives of the converged modes.
    """
    beta, T = _split(x, arrays, structure, mask)
    # Loop invariants, hoisted by hand: XLA does not move them out of the while loop.
    eta_fixed = arrays.X @ beta + arrays.offset
    ZT = arrays.Z @ T
    q = ZT.shape[1]
    outer = (ZT[:, :, None] * ZT[:, None, :]).reshape(-1, q * q)
    eye = jnp.eye(q, dtype=ZT.dtype)

    def at(u):
        """Per-level objective, gradient and Newton Hessian at modes ``u``."""
        eta = eta_fixed + jnp.sum(ZT * u[arrays.group], axis=1)
        ll, d1, d2 = family.kernel_score_curvature(arrays.y, arrays.trials, eta)
        w = arrays.weights
        # Observed information, floored at 0 so every block stays positive definite (it can be
        # negative in the tails of non-log-concave links such as cauchit).
        info = w * jnp.maximum(-d2, 0.0)
        stacked = jnp.concatenate(
            [(w * ll)[:, None], (w * d1)[:, None] * ZT, info[:, None] * outer], axis=1
        )
        S = _segsum(stacked, arrays)
        h = -S[:, 0] + 0.5 * jnp.sum(u**2, axis=1)
        grad = u - S[:, 1 : 1 + q]
        H = S[:, 1 + q :].reshape(-1, q, q) + eye
        return h, grad, H

    def cond(state):
        *_, it, done = state
        return (it < control.maxiter) & ~done

    def body(state):
        u, h0, grad, H, it, _ = state
        delta = -chol_solve(chol(H), grad)
        slack = 1e-12 * (1.0 + jnp.abs(h0))

        # Step-halving level by level (the objective separates over levels).
        def halve_cond(s):
            *_, k, worse = s
            return (k < control.max_halvings) & jnp.any(worse)

        def halve_body(s):
            step, _, _, _, k, worse = s
            step = jnp.where(worse, 0.5 * step, step)
            h, g, Hn = at(u + step[:, None] * delta)
            return step, h, g, Hn, k + 1, ~(h <= h0 + slack)

        ones = jnp.ones_like(h0)
        init = (2.0 * ones, h0, grad, H, 0, ones > 0)
        step, h, grad, H, _, _ = jax.lax.while_loop(halve_cond, halve_body, init)
        done = jnp.max(jnp.abs(delta)) < control.tol
        return u + step[:, None] * delta, h, grad, H, it + 1, done

    u0 = jax.lax.stop_gradient(u0)
    state = (u0, *at(u0), jnp.int32(0), jnp.array(False))
    u, _, _, _, it, done = jax.lax.while_loop(cond, body, state)
    return u, it, done


@partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def implicit_modes(x, arrays, u_star, mask, family, structure):
    """Identity on converged modes ``u_star = u*(x)``, with the derivatives of ``u*(x)``.

    By the implicit function theorem, with ``F(u, x) = 0`` the stationarity condition,
    ``du*/dx = -(dF/du)^{-1} dF/dx``, where ``dF/du`` is the observed Hessian block of each
    level. Because the primal is the identity, differentiating a function of these modes (to
    any order) never differentiates, or even re-runs, the Newton iteration that found them.
    """
    return u_star


@implicit_modes.defjvp
def _implicit_modes_jvp(family, structure, primals, tangents):
    x, arrays, u_star, mask = primals
    dx = tangents[0]
    # Calling the custom_jvp function again keeps higher derivatives (the exact Hessian of the
    # deviance) on this implicit rule.
    u = implicit_modes(x, arrays, u_star, mask, family, structure)

    def stationarity(xx):
        eta, ZT = linear_predictor(xx, u, arrays, structure, mask)
        d1, d2 = _score_terms(family, arrays, eta)
        # The observed Hessian block rides along as auxiliary output: eta and the score's
        # derivative are computed once for both.
        return u - _segsum(d1[:, None] * ZT, arrays), _block_hessian(-d2, ZT, arrays)

    _, dF, H = jax.jvp(stationarity, (x,), (dx,), has_aux=True)
    return u, -chol_solve(chol(H), dF)


def laplace_deviance(x, arrays, u_star, mask, family, structure):
    """Laplace approximation to ``-2 log L(beta, theta)`` at converged modes ``u_star``, less
    :func:`deviance_constant` (which does not depend on ``x``).

    Parameters
    ----------
    x : (p + n_theta,) array
        ``beta`` (in the preconditioned basis) followed by ``phi`` (see ``structure.py``).
    arrays : ModelArrays
    u_star : (G, Q) array
        The conditional modes at ``x`` (from :func:`solve_modes`).
    mask : (n_theta,) array
        1, or 0 for a variance held at the boundary.
    family, structure
        Static: the family and the random-effects layout.

    Differentiable in ``x`` to any order through :func:`implicit_modes`.
    """
    u = implicit_modes(x, arrays, u_star, mask, family, structure)
    eta, ZT = linear_predictor(x, u, arrays, structure, mask)
    ll = jnp.sum(arrays.weights * family.loglik_kernel(arrays.y, arrays.trials, eta))
    w = arrays.weights * family.fisher_weight(arrays.trials, eta)
    logdet = jnp.sum(chol_logdet(chol(_block_hessian(w, ZT, arrays))))
    return -2.0 * ll + jnp.sum(u**2) + logdet


def deviance_constant(arrays: ModelArrays, family: Family):
    """``-2 sum_i w_i c(y_i)``: the eta-free part of the deviance, left out of the inner loops."""
    return -2.0 * jnp.sum(arrays.weights * family.loglik_const(arrays.y, arrays.trials))


def deviance_and_gradient(x, arrays, u_star, mask, family, structure):
    """:func:`laplace_deviance` and its exact gradient in ``x``, by the adjoint method.

    With ``F(u, x) = 0`` the stationarity condition and ``H_obs = dF/du``, the gradient is
    ``dD/dx = dD/dx|_u - lambda' dF/dx|_u`` with ``lambda = H_obs^{-1} dD/du`` (one small solve
    per level). Written out for one grouping factor it needs three passes over the data,
    where reverse-mode autodiff of the same function makes about twenty. Per observation
    ``r_i = -2 k'_i + W'_i c_i + k''_i (lambda_g . T' z_i)`` with ``k`` the weighted
    log-density, ``W`` the Fisher weight and ``c_i = z_i' T A_g^{-1} T' z_i``; then
    ``dD/dbeta = X' r`` and
    ``dD/dT = sum_g [R_g u_g' + K_g lambda_g' + 2 S_g T A_g^{-1}]`` with ``R_g = sum r_i z_i``,
    ``K_g = sum k'_i z_i``, ``S_g = sum W_i z_i z_i'``.

    Differentiable in ``x`` (forward mode) through :func:`implicit_modes`, so ``jax.jacfwd`` of
    the gradient is the exact Hessian.
    """
    p = arrays.X.shape[1]
    u = implicit_modes(x, arrays, u_star, mask, family, structure)
    _, T = _split(x, arrays, structure, mask)
    eta, ZT = linear_predictor(x, u, arrays, structure, mask)
    Z, w, group = arrays.Z, arrays.weights, arrays.group
    eye = jnp.eye(Z.shape[1], dtype=Z.dtype)
    kernel = w * family.loglik_kernel(arrays.y, arrays.trials, eta)
    d1, d2 = _score_terms(family, arrays, eta)
    W, dW = jax.jvp(
        lambda e: w * family.fisher_weight(arrays.trials, e), (eta,), (jnp.ones_like(eta),)
    )
    zz = Z[:, :, None] * Z[:, None, :]
    sums = _segsum(jnp.stack([W, -d2], axis=1)[:, :, None, None] * zz[:, None], arrays)
    S, S_obs = sums[:, 0], sums[:, 1]
    A = jnp.einsum("ji,gjk,kl->gil", T, S, T) + eye
    H_obs = jnp.einsum("ji,gjk,kl->gil", T, S_obs, T) + eye
    LA = chol(A)
    A_inv = chol_inverse(LA)
    dev = -2.0 * jnp.sum(kernel) + jnp.sum(u**2) + jnp.sum(chol_logdet(LA))

    c = jnp.einsum("ni,nij,nj->n", ZT, A_inv[group], ZT)
    F = u - _segsum(d1[:, None] * ZT, arrays)
    dD_du = 2.0 * F + _segsum((dW * c)[:, None] * ZT, arrays)
    lam = chol_solve(chol(H_obs), dD_du)
    r = -2.0 * d1 + dW * c + d2 * jnp.sum(ZT * lam[group], axis=1)
    g_beta = arrays.X.T @ r
    RK = _segsum(jnp.stack([r, d1], axis=1)[:, :, None] * Z[:, None, :], arrays)
    g_T = RK[:, 0].T @ u + RK[:, 1].T @ lam + 2.0 * jnp.einsum("gij,jk,gkl->il", S, T, A_inv)
    theta = structure.theta_from_phi(x[p:], mask)
    layout = structure.theta_layout()
    g_theta = g_T[np.array([r_ for _, r_, _ in layout]), np.array([c_ for _, _, c_ in layout])]
    g_phi = g_theta * jnp.where(jnp.asarray(structure.diagonal), theta, 1.0)
    return dev, jnp.concatenate([g_beta, g_phi])


def conditional_variances(x, u, arrays, mask, family, structure):
    """Conditional covariance of ``b_g = T u_g``: ``T (T' Z_g' W Z_g T + I)^{-1} T'``.

    Shape ``(G, Q, Q)``.

    This is lme4's ``condVar``: the inverse of the Laplace Hessian, mapped to the ``b`` scale.
    """
    eta, ZT = linear_predictor(x, u, arrays, structure, mask)
    w = arrays.weights * family.fisher_weight(arrays.trials, eta)
    Hinv = chol_inverse(chol(_block_hessian(w, ZT, arrays)))
    _, T = _split(x, arrays, structure, mask)
    return jnp.einsum("ij,gjk,lk->gil", T, Hinv, T)
