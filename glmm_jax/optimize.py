"""Outer optimisation of the Laplace deviance over ``x = (beta, phi)``, as one pure function.

:func:`fit_arrays` is the compiled heart of a fit. It takes only arrays (plus static settings),
returns only arrays, and never raises, so it can be ``jax.jit``-ed, ``jax.vmap``-ed or
``jax.lax.map``-ped over replicate responses. The stages:

1. ``beta`` from the GLM without random effects (IRLS), ``theta = 1`` (lme4's start).
2. optax's L-BFGS direction with a backtracking line search, the inner modes warm-started from
   the last accepted point, until the deviance stops falling quickly.
3. Newton polish with the exact Hessian (eigenvalues made positive, backtracking line search),
   from the L-BFGS point. When a variance heads to zero (``theta`` below ``boundary_theta``),
   the same polish also runs with that variance fixed at exactly zero, and the lower deviance
   wins: this is how a singular fit is found and flagged without chasing ``log(0)``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .families import Family
from .laplace import InnerControl, ModelArrays, laplace_deviance, solve_modes
from .structure import ReStructure

__all__ = ["Control", "FitOutput", "Status", "fit_arrays", "glm_start"]


class Status:
    """Integer codes of :attr:`FitOutput.status`."""

    CONVERGED = 0
    MAXITER = 1  #: Newton polish hit its iteration limit
    LINESEARCH = 2  #: no step decreased the deviance before the gradient was small
    NONFINITE = 3  #: the deviance or its gradient is not finite

    names = {0: "converged", 1: "iteration limit", 2: "line search failed", 3: "non-finite"}


@dataclasses.dataclass(frozen=True)
class Control:
    """Settings of a fit (lme4's ``glmerControl``). Hashable: a static argument of jit.

    Attributes
    ----------
    lbfgs_maxiter : int
        L-BFGS iterations at most (0 skips straight to Newton).
    lbfgs_rtol : float
        L-BFGS stops when the deviance falls by less than this, relative, in one iteration.
    newton_maxiter : int
        Newton iterations at most.
    newton_tol : float
        Newton stops when the Newton decrement ``g' H^{-1} g`` is below this.
    gradient_tol : float
        A fit is reported converged only if the largest free gradient entry is below this
        (scaled by ``1 + |deviance| / n``-free units: the deviance gradient itself).
    boundary_theta : float
        A diagonal ``theta`` below this after L-BFGS makes the boundary fit a candidate.
    singular_tol : float
        ``theta`` diagonals below this are reported singular (lme4's ``isSingular`` tolerance).
    inner : InnerControl
        Settings of the conditional-mode iteration.
    """

    lbfgs_maxiter: int = 100
    lbfgs_rtol: float = 1e-7
    newton_maxiter: int = 30
    newton_tol: float = 1e-11
    gradient_tol: float = 1e-3
    boundary_theta: float = 0.05
    singular_tol: float = 1e-4
    inner: InnerControl = InnerControl()


class FitOutput(NamedTuple):
    """Everything :func:`fit_arrays` returns; all arrays (a PyTree, so it maps over batches).

    Attributes
    ----------
    x : (p + n_theta,) optimum ``(beta, phi)`` in the preconditioned basis.
    u : (G, Q) conditional modes.
    mask : (n_theta,) 0 where a variance is at the boundary.
    deviance : () Laplace deviance ``-2 log L``.
    grad : (p + n_theta,) gradient of the deviance (0 for fixed coordinates).
    hessian : (p + n_theta, p + n_theta) exact Hessian of the deviance.
    status : () int, see :class:`Status`.
    lbfgs_iterations, newton_iterations : () int.
    evaluations : () int
        Deviance evaluations (each with its own conditional-mode solve) in both stages.
    """

    x: jnp.ndarray
    u: jnp.ndarray
    mask: jnp.ndarray
    deviance: jnp.ndarray
    grad: jnp.ndarray
    hessian: jnp.ndarray
    status: jnp.ndarray
    lbfgs_iterations: jnp.ndarray
    newton_iterations: jnp.ndarray
    evaluations: jnp.ndarray


def glm_start(arrays: ModelArrays, family: Family, maxiter: int = 25) -> jnp.ndarray:
    """``beta`` of the GLM without random effects, by IRLS from R's ``mustart``."""
    X, w = arrays.X, arrays.weights
    trials = jnp.where(arrays.trials > 0, arrays.trials, 1.0)
    ybar = arrays.y / trials
    link = family.link

    def loglik(eta):
        return jnp.sum(w * family.loglik(arrays.y, arrays.trials, eta))

    def step(eta):
        mu, dmu = family.mu(eta), link.mu_eta(eta)
        W = w * family.fisher_weight(arrays.trials, eta)
        z = eta - arrays.offset + (ybar - mu) / jnp.where(dmu == 0, 1.0, dmu)
        A = X.T @ (W[:, None] * X)
        beta = jnp.linalg.solve(A + 1e-10 * jnp.eye(A.shape[0], dtype=A.dtype), X.T @ (W * z))
        return beta, X @ beta + arrays.offset

    def cond(state):
        _, _, _, it, done = state
        return (it < maxiter) & ~done

    def body(state):
        beta, eta, ll, it, _ = state
        beta_new, eta_new = step(eta)
        ll_new = loglik(eta_new)
        ok = jnp.isfinite(ll_new) & jnp.all(jnp.isfinite(beta_new)) & (ll_new >= ll - 1e-8)
        done = ~ok | (jnp.abs(ll_new - ll) < 1e-10 * (1.0 + jnp.abs(ll_new)))
        return (
            jnp.where(ok, beta_new, beta),
            jnp.where(ok, eta_new, eta),
            jnp.where(ok, ll_new, ll),
            it + 1,
            done,
        )

    eta0 = link.linkfun(family.mustart(arrays.y, trials))
    beta0, eta1 = step(eta0)
    ll1 = loglik(eta1)
    ok = jnp.isfinite(ll1) & jnp.all(jnp.isfinite(beta0))
    beta0 = jnp.where(ok, beta0, jnp.zeros_like(beta0))
    eta1 = jnp.where(ok, eta1, X @ beta0 + arrays.offset)
    state = (beta0, eta1, jnp.where(ok, ll1, loglik(eta1)), jnp.int32(1), jnp.array(False))
    return jax.lax.while_loop(cond, body, state)[0]


def _backtrack(value, x, u, v, g, d, max_halvings: int = 40):
    """Armijo backtracking from step 1 along ``d``; ``value(x, u0) -> (v, u*)`` warm-starts modes.

    Returns ``(alpha, v_new, u_new, accepted, evaluations)``. A non-finite trial value counts as
    no decrease.
    """
    slope = jnp.dot(g, d)

    def ok(alpha, v_try):
        return v_try <= v + 1e-4 * alpha * slope

    def cond(s):
        alpha, v_try, _, k = s
        return (k < max_halvings) & ~ok(alpha, v_try)

    def body(s):
        alpha, _, _, k = s
        alpha = 0.5 * alpha
        v_try, u_try = value(x + alpha * d, u)
        return alpha, v_try, u_try, k + 1

    # Start "one halving before" step 1 so that the objective has a single call site.
    init = (jnp.asarray(2.0, x.dtype), jnp.asarray(jnp.inf, x.dtype), u, 0)
    alpha, v_new, u_new, k = jax.lax.while_loop(cond, body, init)
    return alpha, v_new, u_new, ok(alpha, v_new), k


def _lbfgs(value, dev, x0, u0, control: Control):
    """optax's L-BFGS direction with backtracking; modes warm-started from the last point.

    ``value(x, u0) -> (v, u*)`` solves the modes; ``dev(x, u*)`` is the deviance at converged
    modes (differentiable). Returns ``(x, u, iterations, evaluations)``.
    """
    opt = optax.scale_by_lbfgs(memory_size=10)

    def cond(state):
        *_, it, done = state
        return (it < control.lbfgs_maxiter) & ~done

    def body(state):
        x, u, v, opt_state, it, evals, _ = state
        g = jax.grad(dev)(x, u)
        updates, opt_state = opt.update(g, opt_state, x)
        d = -updates
        d = jnp.where(jnp.dot(g, d) < 0, d, -g)
        alpha, v_new, u_new, accepted, k = _backtrack(value, x, u, v, g, d)
        done = ~accepted | ~jnp.all(jnp.isfinite(g)) | (v - v_new <= control.lbfgs_rtol * (1.0 + jnp.abs(v)))
        keep = accepted & jnp.isfinite(v_new)
        return (
            jnp.where(keep, x + alpha * d, x),
            jnp.where(keep, u_new, u),
            jnp.where(keep, v_new, v),
            opt_state,
            it + 1,
            evals + 1 + k,
            done,
        )

    v0, u0 = value(x0, u0)
    state = (x0, u0, v0, opt.init(x0), jnp.int32(0), jnp.int32(1), ~jnp.isfinite(v0))
    x, u, _, _, it, evals, _ = jax.lax.while_loop(cond, body, state)
    return x, u, it, evals


_RUNNING, _SKIP = -1, -2


def _newton(value, dev, x0, u0, free, skip, control: Control):
    """Safeguarded Newton on the free coordinates; ``u0`` must be the converged modes at ``x0``.

    Returns ``(x, u, deviance, grad, hessian, iterations, evaluations, status)``, the
    derivatives at the returned ``x`` (fixed coordinates zeroed) unless the iteration limit
    stopped it mid-way.
    """
    n = x0.shape[0]
    both = free[:, None] & free[None, :]

    def cond(state):
        *_, status = state
        return status == _RUNNING

    def body(state):
        x, u, _, _, _, it, evals, _ = state
        v, g = jax.value_and_grad(dev)(x, u)
        H = jax.hessian(dev)(x, u)
        g = jnp.where(free, g, 0.0)
        H = jnp.where(both, 0.5 * (H + H.T), 0.0)
        # Modified Newton: flip and floor the eigenvalues so the step always descends.
        ev, V = jnp.linalg.eigh(jnp.where(both, H, jnp.eye(n, dtype=H.dtype)))
        floor = 1e-8 * jnp.maximum(jnp.max(jnp.abs(ev)), 1.0)
        d = jnp.where(free, -V @ ((V.T @ g) / jnp.maximum(jnp.abs(ev), floor)), 0.0)
        converged = -jnp.dot(g, d) < control.newton_tol
        alpha, v_new, u_new, accepted, k = _backtrack(value, x, u, v, g, d)
        move = ~converged & accepted
        finite = jnp.isfinite(v) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(H))
        status = jnp.where(
            ~finite,
            Status.NONFINITE,
            jnp.where(
                converged,
                Status.CONVERGED,
                jnp.where(
                    ~accepted,
                    Status.LINESEARCH,
                    jnp.where(it + 1 >= control.newton_maxiter, Status.MAXITER, _RUNNING),
                ),
            ),
        )
        return (
            jnp.where(move, x + alpha * d, x),
            jnp.where(move, u_new, u),
            v,
            g,
            H,
            it + 1,
            evals + 1 + k,
            status,
        )

    z = jnp.zeros((), x0.dtype)
    state = (x0, u0, z, jnp.zeros(n, x0.dtype), jnp.zeros((n, n), x0.dtype), jnp.int32(0),
             jnp.int32(0), jnp.where(skip, _SKIP, _RUNNING))
    return jax.lax.while_loop(cond, body, state)


def fit_arrays(
    arrays: ModelArrays,
    x0: jnp.ndarray | None,
    *,
    family: Family,
    structure: ReStructure,
    control: Control = Control(),
) -> FitOutput:
    """Fit one model to its arrays: the pure, compiled, batchable core of ``glmer``.

    Parameters
    ----------
    arrays : ModelArrays
        The model's data, padded to bucketed shapes.
    x0 : array or None
        Starting ``(beta, phi)``; ``None`` starts from the GLM fit and ``theta = 1``.
    family, structure, control
        Static settings.

    Returns
    -------
    FitOutput
    """
    p = arrays.X.shape[1]
    n_theta = structure.n_theta
    dtype = arrays.X.dtype
    if x0 is None:
        x0 = jnp.concatenate([glm_start(arrays, family), jnp.zeros(n_theta, dtype)])
    G = arrays.level_mask.shape[0]
    u0 = jnp.zeros((G, arrays.Z.shape[1]), dtype)
    ones = jnp.ones(n_theta, dtype)

    def objective(mask):
        def value(x, u):
            u_star = solve_modes(x, arrays, u, mask, family, structure, control.inner)[0]
            return laplace_deviance(x, arrays, u_star, mask, family, structure), u_star

        def dev(x, u_star):
            return laplace_deviance(x, arrays, u_star, mask, family, structure)

        return value, dev

    value, dev = objective(ones)
    x1, u1, n_lbfgs, evals_lbfgs = _lbfgs(value, dev, x0, u0, control)

    # Polish twice through one traced body: the interior fit, and the fit with every variance
    # that L-BFGS drove towards zero held at exactly zero (skipped when there is none).
    diag = jnp.asarray(structure.diagonal)
    candidate = diag & (jnp.exp(x1[p:]) < control.boundary_theta)
    masks = jnp.stack([ones, jnp.where(candidate, 0.0, 1.0).astype(dtype)])
    frees = jnp.stack(
        [jnp.ones(p + n_theta, bool), jnp.concatenate([jnp.ones(p, bool), ~candidate])]
    )
    skips = jnp.stack([jnp.array(False), ~jnp.any(candidate)])

    def polish(config):
        mask, free, skip = config
        value, dev = objective(mask)
        u_start = solve_modes(x1, arrays, u1, mask, family, structure, control.inner)[0]
        return _newton(value, dev, x1, u_start, free, skip, control)

    xs, us, vs, gs, Hs, its, evals, statuses = jax.lax.map(polish, (masks, frees, skips))
    # The boundary model is nested in the interior one: take it unless the interior deviance is
    # lower by more than rounding, so a variance that is truly zero is reported as exactly zero.
    pick = (jnp.any(candidate) & (vs[1] <= vs[0] + 1e-6)).astype(jnp.int32)
    x, u, v, g, H, it, status = (a[pick] for a in (xs, us, vs, gs, Hs, its, statuses))
    evaluations = evals_lbfgs + jnp.sum(evals)
    status = jnp.where(
        (status == Status.LINESEARCH) & (jnp.max(jnp.abs(g)) < control.gradient_tol),
        Status.CONVERGED,
        status,
    )
    return FitOutput(x, u, masks[pick], v, g, H, status, n_lbfgs, it, evaluations)
