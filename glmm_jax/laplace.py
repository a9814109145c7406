"""The Laplace-approximate deviance of a GLMM, as pure JAX.

Notation (lme4's, Bates et al. 2015): ``eta = offset + X beta + Z Lambda_theta u``, ``u ~ N(0, I)``.
Every level ``g`` of a grouping factor has its own ``u_g`` (length ``Q``, the factor's number of
random-effect columns) and the same ``Q x Q`` lower-triangular block ``T`` of ``Lambda``, so
the first factor contributes ``(T' z_i)' u_{g(i)}`` to ``eta_i``. The modes are held as a pair
``u = (u_1, u_r)``: ``u_1`` ``(G, Q)`` for the first (largest) grouping factor and ``u_r`` the
other factors' effects stacked into one vector (empty with one factor; see ``blocked.py``).

* The conditional mode ``u*`` maximises ``sum_i w_i log p(y_i | eta_i) - |u|^2 / 2``. With one
  grouping factor the problem separates by level, so :func:`solve_modes` runs a damped Newton
  iteration on all levels at once, with step-halving per level; with several it takes Newton
  steps with the blocked Cholesky factor of ``blocked.py`` and halves the whole step.
* The Laplace deviance (``-2 log L``) at ``u*`` is
  ``-2 sum_i w_i log p(y_i | u*) + |u*|^2 + log det(Lambda' Z' W Z Lambda + I)``
  with ``W`` the expected (Fisher) information, as lme4's PIRLS weights.
* Derivatives of ``u*`` come from the implicit function theorem (a ``custom_jvp`` whose primal
  is the identity on the converged modes), never from differentiating the Newton iterations, so
  gradients and the exact Hessian of the deviance are cheap, exact, and compile small.
* :func:`deviance_and_gradient` writes the gradient out by the adjoint method for one grouping
  factor (three passes over the data) and takes reverse-mode autodiff for several; the
  optimiser uses it, and its forward derivative as the exact Hessian.
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

from . import blocked
from .blocked import DenseCoupling, SparseCoupling
from .blocks import chol, chol_inverse, chol_logdet, chol_solve
from .families import Family
from .structure import ReStructure

__all__ = [
    "ModelArrays",
    "InnerControl",
    "solve_modes",
    "newton_step_size",
    "implicit_modes",
    "laplace_deviance",
    "hessian_logdet",
    "deviance_and_gradient",
    "deviance_constant",
    "conditional_variances",
    "linear_predictor",
    "zero_modes",
]


class ModelArrays(NamedTuple):
    """The numbers of one model, padded to bucketed sizes (padding has weight 0).

    Attributes
    ----------
    X : (n, p) fixed-effects matrix (preconditioned: see ``design.py``).
    y : (n,) response; successes for the binomial.
    trials : (n,) binomial trials (1 otherwise); during a negative binomial fit, its size
        (``optimize.fit_arrays`` sets it from the parameters).
    weights : (n,) prior weights; 0 marks padding. During a fit of a family with a dispersion
        they are divided by it (``optimize.fit_arrays``).
    offset : (n,) offset of the linear predictor.
    Z : (n, Q) random-effect covariates of the first (largest) grouping factor.
    group : (n,) int32 its level codes, sorted ascending.
    level_mask : (G,) 1 for a level that occurs, 0 for padding.
    Zr : (n, C) random-effect covariates of the other grouping factors, side by side
        (``C = 0`` with one factor).
    rest_levels : tuple of (G_k,) arrays
        For each other factor, 1 for a level that occurs, 0 for padding.
    coupling : DenseCoupling or SparseCoupling
        Where each row's other effects sit in ``u_r``, and the index arrays of the blocked
        Cholesky factorisation (``blocked.py``).
    """

    X: jnp.ndarray
    y: jnp.ndarray
    trials: jnp.ndarray
    weights: jnp.ndarray
    offset: jnp.ndarray
    Z: jnp.ndarray
    group: jnp.ndarray
    level_mask: jnp.ndarray
    Zr: jnp.ndarray
    rest_levels: tuple
    coupling: DenseCoupling | SparseCoupling


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


def _several(structure: ReStructure) -> bool:
    return len(structure.factors) > 1


def rest_shapes(arrays: ModelArrays, structure: ReStructure) -> list[tuple[int, int]]:
    """``(G_k, Q_k)`` of each grouping factor after the first, as laid out in ``u_r``."""
    return [
        (m.shape[0], structure.factor_q(f))
        for m, f in zip(arrays.rest_levels, structure.factors[1:], strict=True)
    ]


def _rest_size(arrays: ModelArrays, structure: ReStructure) -> int:
    return sum(G * q for G, q in rest_shapes(arrays, structure))


def zero_modes(arrays: ModelArrays, structure: ReStructure, dtype):
    """``u = (u_1, u_r)`` of zeros: the modes' shapes."""
    u1 = jnp.zeros((arrays.level_mask.shape[0], arrays.Z.shape[1]), dtype)
    return u1, jnp.zeros(_rest_size(arrays, structure), dtype)


def lambda_factors(phi, structure: ReStructure, mask):
    """The first factor's block ``T`` and the block-diagonal ``T`` of the others, at ``phi``."""
    T, *others = structure.lambda_blocks(structure.theta_from_phi(phi, mask))
    T_rest = jax.scipy.linalg.block_diag(*others) if others else jnp.zeros((0, 0), phi.dtype)
    return T, T_rest


def _split(x, arrays: ModelArrays, structure: ReStructure, mask):
    """``beta``, the first factor's block ``T`` and the block-diagonal ``T`` of the others."""
    p = arrays.X.shape[1]
    return x[:p], *lambda_factors(x[p:], structure, mask)


def linear_predictor(x, u, arrays: ModelArrays, structure: ReStructure, mask):
    """``eta`` and the rows of ``Z Lambda`` (first factor, others) at ``x = (beta, phi)``."""
    beta, T, T_rest = _split(x, arrays, structure, mask)
    u1, ur = u
    ZT, ZTr = arrays.Z @ T, arrays.Zr @ T_rest
    eta = arrays.X @ beta + arrays.offset + jnp.sum(ZT * u1[arrays.group], axis=1)
    if _several(structure):
        eta = eta + jnp.sum(ZTr * ur[arrays.coupling.rest], axis=1)
    return eta, ZT, ZTr


def _segsum(values, arrays: ModelArrays):
    return jax.ops.segment_sum(
        values, arrays.group, num_segments=arrays.level_mask.shape[0], indices_are_sorted=True
    )


def _rest_sum(values, arrays: ModelArrays, R: int):
    """Sum ``(n, C, ...)`` values into the ``R`` effects of ``u_r`` they multiply."""
    flat = values.reshape(-1, *values.shape[2:])
    return jax.ops.segment_sum(flat, arrays.coupling.rest.reshape(-1), num_segments=R)


def _gradient_of_modes(u, d1, ZT, ZTr, arrays: ModelArrays):
    """``u - Lambda' Z' d1``: the gradient of the inner objective (``d1`` the weighted score)."""
    u1, ur = u
    return u1 - _segsum(d1[:, None] * ZT, arrays), ur - _rest_sum(
        d1[:, None] * ZTr, arrays, ur.shape[0]
    )


def _hessian_factor(w, ZT, ZTr, arrays: ModelArrays, structure: ReStructure, differentiable):
    """Cholesky factor of ``Lambda' Z' diag(w) Z Lambda + I``: blockwise with one factor,
    blocked (``blocked.py``) with several, in a form cheap to differentiate if asked."""
    if not _several(structure):
        return chol(_block_hessian(w, ZT, arrays))
    G, R = arrays.level_mask.shape[0], _rest_size(arrays, structure)
    blocks = blocked.assemble(w, ZT, ZTr, arrays.group, G, arrays.coupling, R)
    return blocked.factor(*blocks, arrays.coupling, differentiable)


def _hessian_solve(F, b, arrays: ModelArrays, structure: ReStructure):
    b1, br = b
    if not _several(structure):
        return chol_solve(F, b1), br
    return blocked.solve(F, b1, br, arrays.coupling)


def _hessian_logdet(F, structure: ReStructure):
    if not _several(structure):
        return jnp.sum(chol_logdet(F))
    return blocked.logdet(F)


def _row_inverse_products(F, ZT, ZTr, arrays: ModelArrays, structure: ReStructure):
    """``H^{-1} a_i`` on row ``i``'s own coordinates, for each row ``a_i`` of ``Z Lambda``.

    ``a_i`` is ``ZT_i`` on its level's block of ``u_1`` and ``ZTr_i`` on the effects
    ``coupling.rest[i]`` of ``u_r``; the result is the pair ``(P1, Pr)`` of shapes ``(n, Q)`` and
    ``(n, C)``. Only the blocks of ``H^{-1}`` that rows touch are formed
    (:func:`blocked.selected_inverse`).
    """
    if not _several(structure):
        return jnp.einsum("nij,nj->ni", chol_inverse(F)[arrays.group], ZT), ZTr
    X11, X21, S_inv = blocked.selected_inverse(F, arrays.coupling)
    c = arrays.coupling
    q = ZT.shape[1]
    # The coupling block of each row and rest column: (n, C, Q).
    if isinstance(c, DenseCoupling):
        X21_rows = X21.reshape(-1, q)[c.obs_cell]
    else:
        X21_rows = X21[c.obs_pair]
    S_rows = S_inv[c.rest[:, :, None], c.rest[:, None, :]]
    P1 = jnp.einsum("nij,nj->ni", X11[arrays.group], ZT) + jnp.einsum("ncq,nc->nq", X21_rows, ZTr)
    Pr = jnp.einsum("ncq,nq->nc", X21_rows, ZT) + jnp.einsum("ncd,nd->nc", S_rows, ZTr)
    return P1, Pr


@partial(jax.custom_jvp, nondiff_argnums=(5,))
def hessian_logdet(w, ZT, ZTr, F, arrays: ModelArrays, structure: ReStructure):
    """``log det H`` with ``H = Lambda' Z' diag(w) Z Lambda + I``, from its factor ``F``.

    ``F`` must be :func:`_hessian_factor` of the same ``(w, ZT, ZTr)``; the derivative is taken
    through those alone, as ``tr(H^{-1} dH) = sum_i dw_i a_i' H^{-1} a_i
    + 2 w_i da_i' H^{-1} a_i`` (``a_i`` row ``i`` of ``Z Lambda``), which needs only the blocks
    of ``H^{-1}`` that rows touch. Reverse-mode autodiff through the factorisation instead
    would carry the dense block's inverse through every step of the assembly.
    """
    return _hessian_logdet(F, structure)


@hessian_logdet.defjvp
def _hessian_logdet_jvp(structure, primals, tangents):
    w, ZT, ZTr, F, arrays = primals
    dw, dZT, dZTr = tangents[:3]
    # Calling the custom_jvp function again keeps higher derivatives on this rule; F's own
    # tangent carries them into the selected inverse below.
    value = hessian_logdet(w, ZT, ZTr, F, arrays, structure)
    P1, Pr = _row_inverse_products(F, ZT, ZTr, arrays, structure)
    quad = jnp.sum(ZT * P1, axis=1) + jnp.sum(ZTr * Pr, axis=1)
    cross = jnp.sum(dZT * P1, axis=1) + jnp.sum(dZTr * Pr, axis=1)
    return value, jnp.sum(dw * quad + 2.0 * w * cross)


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

    ``u0`` and ``u*`` are pairs ``(u_1, u_r)``. Not differentiable (the iteration is never
    differentiated): :func:`implicit_modes` attaches the derivatives of the converged modes.
    """
    u0 = jax.lax.stop_gradient(u0)
    if _several(structure):
        return _solve_modes_blocked(x, arrays, u0, mask, family, structure, control)
    u1, it, done = _solve_modes_one(x, arrays, u0[0], mask, family, structure, control)
    return (u1, u0[1]), it, done


def newton_step_size(x, arrays, u, mask, family, structure):
    """The largest entry of the Newton step for the modes at ``u``: below the inner tolerance
    where the modes have converged. One pass over the data and one factorisation, where a
    second :func:`solve_modes` would compile the whole iteration again."""
    u = jax.lax.stop_gradient(u)
    if _several(structure):
        _, grad, F = _inner_blocked(x, arrays, mask, family, structure)(u)
        return _largest(_hessian_solve(F, grad, arrays, structure))
    _, grad, H = _inner_one(x, arrays, mask, family, structure)(u[0])
    return jnp.max(jnp.abs(chol_solve(chol(H), grad)))


def _inner_one(x, arrays, mask, family, structure):
    """One grouping factor: ``at(u) -> (h, grad, H)``, the inner objective per level, its
    gradient and its Newton Hessian at modes ``u`` (``(G, Q)``).

    Each call is one pass over the data: the log-density, score and curvature come from one
    elementwise evaluation, and every per-level sum from one stacked segment sum.
    """
    beta, T, _ = _split(x, arrays, structure, mask)
    # Loop invariants, hoisted by hand: XLA does not move them out of the while loop.
    eta_fixed = arrays.X @ beta + arrays.offset
    ZT = arrays.Z @ T
    q = ZT.shape[1]
    outer = (ZT[:, :, None] * ZT[:, None, :]).reshape(-1, q * q)
    eye = jnp.eye(q, dtype=ZT.dtype)

    def at(u):
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

    return at


def _solve_modes_one(x, arrays, u0, mask, family, structure, control: InnerControl):
    """One grouping factor: Newton on every level at once, step-halving level by level.

    Each trial point costs one pass over the data (:func:`_inner_one`); an accepted trial's
    sums are the next Newton step's inputs.
    """
    at = _inner_one(x, arrays, mask, family, structure)

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

        # A step below the tolerance is the last: it is taken without evaluating the
        # objective after it (Newton's step there cannot fail to descend, and the modes are
        # the iteration's result, not an input to another step). This saves one of the
        # two or three passes over the data of a warm-started solve.
        done = jnp.max(jnp.abs(delta)) < control.tol
        ones = jnp.ones_like(h0)
        init = (jnp.where(done, 1.0, 2.0) * ones, h0, grad, H, 0, (ones > 0) & ~done)
        step, h, grad, H, _, _ = jax.lax.while_loop(halve_cond, halve_body, init)
        return u + step[:, None] * delta, h, grad, H, it + 1, done

    state = (u0, *at(u0), jnp.int32(0), jnp.array(False))
    u, _, _, _, it, done = jax.lax.while_loop(cond, body, state)
    return u, it, done


def _largest(delta):
    """The largest entry, in absolute value, of a step ``(delta_1, delta_r)`` for the modes of
    several grouping factors (both parts non-empty)."""
    return jnp.maximum(jnp.max(jnp.abs(delta[0])), jnp.max(jnp.abs(delta[1])))


def _inner_blocked(x, arrays, mask, family, structure):
    """Several grouping factors: ``at(u) -> (h, grad, F)``, the inner objective, its gradient
    and the blocked Cholesky factor of its Newton Hessian at modes ``u = (u_1, u_r)``."""
    beta, T, T_rest = _split(x, arrays, structure, mask)
    eta_fixed = arrays.X @ beta + arrays.offset
    ZT, ZTr = arrays.Z @ T, arrays.Zr @ T_rest
    rest = arrays.coupling.rest

    def at(u):
        u1, ur = u
        eta = eta_fixed + jnp.sum(ZT * u1[arrays.group], axis=1) + jnp.sum(ZTr * ur[rest], axis=1)
        ll, d1, d2 = family.kernel_score_curvature(arrays.y, arrays.trials, eta)
        w = arrays.weights
        h = -jnp.sum(w * ll) + 0.5 * (jnp.sum(u1**2) + jnp.sum(ur**2))
        grad = _gradient_of_modes(u, w * d1, ZT, ZTr, arrays)
        # Observed information floored at 0, as with one factor, so H stays positive definite.
        F = _hessian_factor(w * jnp.maximum(-d2, 0.0), ZT, ZTr, arrays, structure, False)
        return h, grad, F

    return at


def _solve_modes_blocked(x, arrays, u0, mask, family, structure, control: InnerControl):
    """Several grouping factors: Newton steps with the blocked Cholesky factor of the Hessian.

    The objective no longer separates by level, so a step is halved as a whole until the
    objective does not rise. Each trial costs one pass over the data and one factorisation.
    """
    at = _inner_blocked(x, arrays, mask, family, structure)

    def cond(state):
        *_, it, done = state
        return (it < control.maxiter) & ~done

    def body(state):
        u, h0, grad, F, it, _ = state
        delta = jax.tree_util.tree_map(jnp.negative, _hessian_solve(F, grad, arrays, structure))
        slack = 1e-12 * (1.0 + jnp.abs(h0))

        def halve_cond(s):
            *_, k, worse = s
            return (k < control.max_halvings) & worse

        def halve_body(s):
            step, _, _, _, k, _ = s
            step = 0.5 * step
            h, g, Fn = at(jax.tree_util.tree_map(lambda a, d: a + step * d, u, delta))
            return step, h, g, Fn, k + 1, ~(h <= h0 + slack)

        # As with one factor: a step below the tolerance is taken without a trial.
        done = _largest(delta) < control.tol
        init = (jnp.where(done, 1.0, 2.0).astype(h0.dtype), h0, grad, F, 0, ~done)
        step, h, grad, F, _, _ = jax.lax.while_loop(halve_cond, halve_body, init)
        u = jax.tree_util.tree_map(lambda a, d: a + step * d, u, delta)
        return u, h, grad, F, it + 1, done

    state = (u0, *at(u0), jnp.int32(0), jnp.array(False))
    u, _, _, _, it, done = jax.lax.while_loop(cond, body, state)
    return u, it, done


@partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def implicit_modes(x, arrays, u_star, mask, family, structure):
    """Identity on converged modes ``u_star = u*(x)``, with the derivatives of ``u*(x)``.

    By the implicit function theorem, with ``F(u, x) = 0`` the stationarity condition,
    ``du*/dx = -(dF/du)^{-1} dF/dx``, where ``dF/du`` is the observed Hessian of the inner
    problem. Because the primal is the identity, differentiating a function of these modes (to
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

    def stationarity(xx, weights, trials):
        a = arrays._replace(weights=weights, trials=trials)
        eta, ZT, ZTr = linear_predictor(xx, u, a, structure, mask)
        d1, d2 = _score_terms(family, a, eta)
        # The observed Hessian's pieces ride along as auxiliary output: eta and the score's
        # derivative are computed once for both.
        return _gradient_of_modes(u, d1, ZT, ZTr, a), (-d2, ZT, ZTr)

    # With an estimated dispersion the weights carry 1 / dispersion, or the trials the
    # negative binomial's size (optimize.py), so their tangents move the modes too;
    # otherwise they are data, and left out of the jvp (zero tangents there still cost an
    # elementwise pass each, ~15% of a 10^6-row fit).
    if family.fixed_dispersion:
        fn = partial(stationarity, weights=arrays.weights, trials=arrays.trials)
        _, dF, (info, ZT, ZTr) = jax.jvp(fn, (x,), (dx,), has_aux=True)
    else:
        primals_in = (x, arrays.weights, arrays.trials)
        tangents_in = (dx, tangents[1].weights, tangents[1].trials)
        _, dF, (info, ZT, ZTr) = jax.jvp(stationarity, primals_in, tangents_in, has_aux=True)
    F = _hessian_factor(info, ZT, ZTr, arrays, structure, True)
    du = _hessian_solve(F, dF, arrays, structure)
    return u, jax.tree_util.tree_map(jnp.negative, du)


def laplace_deviance(x, arrays, u_star, mask, family, structure):
    """Laplace approximation to ``-2 log L(beta, theta)`` at converged modes ``u_star``, less
    :func:`deviance_constant` (which does not depend on ``x``).

    Parameters
    ----------
    x : (p + n_theta,) array
        ``beta`` (in the preconditioned basis) followed by ``phi`` (see ``structure.py``).
    arrays : ModelArrays
    u_star : pair of arrays
        The conditional modes ``(u_1, u_r)`` at ``x`` (from :func:`solve_modes`).
    mask : (n_theta,) array
        1, or 0 for a variance held at the boundary.
    family, structure
        Static: the family and the random-effects layout.

    Differentiable in ``x`` to any order through :func:`implicit_modes`.
    """
    u = implicit_modes(x, arrays, u_star, mask, family, structure)
    eta, ZT, ZTr = linear_predictor(x, u, arrays, structure, mask)
    ll = jnp.sum(arrays.weights * family.loglik_kernel(arrays.y, arrays.trials, eta))
    w = _laplace_weights(family, arrays, eta)
    F = _hessian_factor(w, ZT, ZTr, arrays, structure, True)
    logdet = hessian_logdet(w, ZT, ZTr, F, arrays, structure)
    return -2.0 * ll + jnp.sum(u[0] ** 2) + jnp.sum(u[1] ** 2) + logdet


def _laplace_weights(family: Family, arrays: ModelArrays, eta):
    """The weights of the Hessian in the Laplace log-determinant: the expected (Fisher)
    information, as lme4's PIRLS weights, or the observed information for the families whose
    reference is glmmTMB (``Family.observed_information``), as TMB's Laplace approximation."""
    if family.observed_information:
        return -_score_terms(family, arrays, eta)[1]
    return arrays.weights * family.fisher_weight(arrays.trials, eta)


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

    With several grouping factors the gradient is reverse-mode autodiff of
    :func:`laplace_deviance` (through the same implicit derivatives of the modes).

    Differentiable in ``x`` (forward mode) through :func:`implicit_modes`, so ``jax.jacfwd`` of
    the gradient is the exact Hessian.
    """
    if _several(structure):
        return jax.value_and_grad(laplace_deviance)(x, arrays, u_star, mask, family, structure)
    p = arrays.X.shape[1]
    u_pair = implicit_modes(x, arrays, u_star, mask, family, structure)
    u = u_pair[0]
    _, T, _ = _split(x, arrays, structure, mask)
    eta, ZT, _ = linear_predictor(x, u_pair, arrays, structure, mask)
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
    """Conditional covariance of each level's effects ``b_g = T u_g``, factor by factor.

    A tuple with one ``(G_k, Q_k, Q_k)`` array per grouping factor (padded levels included):
    ``T`` times the matching diagonal block of ``(Lambda' Z' W Z Lambda + I)^{-1}`` times
    ``T'``. This is lme4's ``condVar``: the inverse of the Laplace Hessian on the ``b`` scale.
    """
    eta, ZT, ZTr = linear_predictor(x, u, arrays, structure, mask)
    F = _hessian_factor(_laplace_weights(family, arrays, eta), ZT, ZTr, arrays, structure, False)
    return variances_from_factor(F, x[arrays.X.shape[1] :], arrays, mask, structure)


def variances_from_factor(F, phi, arrays: ModelArrays, mask, structure: ReStructure):
    """:func:`conditional_variances` from the Hessian's factor ``F`` at ``theta(phi)``."""
    if _several(structure):
        inverses = blocked.inverse_blocks(F, arrays.coupling, rest_shapes(arrays, structure))
    else:
        inverses = (chol_inverse(F),)
    blocks = structure.lambda_blocks(structure.theta_from_phi(phi, mask))
    return tuple(
        jnp.einsum("ij,gjk,lk->gil", T, V, T) for T, V in zip(blocks, inverses, strict=True)
    )
