"""Outer optimisation of the Laplace deviance over ``x = (beta, phi)``, as one pure function.

:func:`fit_arrays` is the compiled heart of a fit. It takes only arrays (plus static settings),
returns only arrays, and never raises, so it can be ``jax.jit``-ed, ``jax.vmap``-ed or
``jax.lax.map``-ped over replicate responses. The stages:

1. ``beta`` from the GLM without random effects (IRLS), ``theta = 1`` (lme4's start).
2. optax's L-BFGS direction with a backtracking line search, the inner modes warm-started from
   the last accepted point, until the deviance stops falling quickly.
3. Newton steps (eigenvalues made positive, backtracking line search) in the same loop once
   L-BFGS slows down, or from the start on large data or from a given start: the exact
   Hessian until one is positive definite and again near the optimum, BFGS updates in between.
4. When a variance ends near zero (``theta`` below ``boundary_theta``), Newton runs again with
   that variance fixed at exactly zero, and the lower deviance wins: this is how a singular fit
   is found and flagged without chasing ``log(0)``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .blocks import UNROLL_MAX, gauss_jordan, small_einsum
from .families import Family
from .laplace import (
    InnerControl,
    ModelArrays,
    conditional_variances,
    deviance_and_gradient,
    deviance_constant,
    laplace_deviance,
    newton_step_size,
    solve_modes,
    zero_modes,
)
from .structure import ReStructure

__all__ = ["Control", "FitOutput", "Status", "fit_arrays", "fit_stages", "glm_start"]


class Status:
    """Integer codes of :attr:`FitOutput.status`."""

    CONVERGED = 0
    MAXITER = 1  #: Newton polish hit its iteration limit
    LINESEARCH = 2  #: no step decreased the deviance before the gradient was small
    NONFINITE = 3  #: the deviance or its gradient is not finite
    #: the conditional modes at the optimum did not converge (the inner Newton iteration ran
    #: out of steps or step-halvings), so the Laplace deviance there is not trustworthy
    INNER = 4

    names = {
        0: "converged",
        1: "iteration limit",
        2: "line search failed",
        3: "non-finite",
        4: "conditional modes did not converge",
    }


@dataclasses.dataclass(frozen=True)
class Control:
    """Settings of a fit (lme4's ``glmerControl``). Hashable: a static argument of jit.

    Attributes
    ----------
    lbfgs_maxiter : int or None
        L-BFGS iterations at most; 0 goes straight to Newton. ``None`` (default) decides: from
        a supplied start (``refit_batch`` starts every replicate at the fitted model,
        ``power`` at the truth), Newton, which converges in a few steps near the optimum
        (seed model, 200 simulated refits: 2.3 ms per fit against 3.3 ms with L-BFGS first).
        From the default start, by the static shapes: L-BFGS first for small data (at most
        ``lbfgs_max_rows`` padded rows) or many parameters (more than ``lbfgs_min_params``),
        Newton otherwise. Measured on the seed model (4k rows, 3 parameters): L-BFGS first
        11 ms, Newton only 13 ms (10 Newton steps from the GLM start), since per-operation
        overhead dominates there and an L-BFGS step is cheaper than a Hessian; on 10^5 rows:
        274 ms against 199 ms, since the Hessian's few extra passes over the data cost less
        than the extra iterations.
    lbfgs_max_rows, lbfgs_min_params : int
        The thresholds of that choice.
    lbfgs_rtol : float
        L-BFGS stops when the deviance falls by less than this, relative, in one iteration.
    newton_maxiter : int
        Newton iterations at most.
    newton_tol : float
        Newton stops when the Newton decrement ``g' H^{-1} g`` is below this (always judged
        with the exact Hessian).
    exact_hessian_below : float
        Newton uses the exact Hessian on its first step and once the decrement falls below
        this; in between, BFGS updates from that exact start. On 10^6 rows an exact Hessian
        costs about three gradients, and a fit far from its start saves two or three. 1e-4
        rather than 1e-2 saves one more exact Hessian per fit (0.1 s of 1.5 s at 10^6 rows)
        and left the iteration counts of all seventeen GLMM reference fits unchanged but one
        (one more Newton step).
    gradient_tol : float
        A fit whose last line search failed still counts as converged when the largest free
        entry of the deviance gradient is below this (rounding stopped it at the optimum).
    boundary_theta : float
        A diagonal ``theta`` below this at the interior optimum makes the boundary fit (that
        variance fixed at zero) a candidate.
    singular_tol : float
        ``theta`` diagonals below this are reported singular (lme4's ``isSingular`` tolerance).
    max_log_step : float
        Largest change of a log standard deviation in one step (the direction is shortened,
        then the line search runs as usual).
    inner : InnerControl
        Settings of the conditional-mode iteration.
    """

    lbfgs_maxiter: int | None = None
    lbfgs_max_rows: int = 16384
    lbfgs_min_params: int = 12
    lbfgs_rtol: float = 1e-7
    newton_maxiter: int = 30
    newton_tol: float = 1e-11
    exact_hessian_below: float = 1e-4
    gradient_tol: float = 1e-3
    boundary_theta: float = 0.05
    singular_tol: float = 1e-4
    max_log_step: float = 3.0
    inner: InnerControl = InnerControl()


class FitOutput(NamedTuple):
    """Everything :func:`fit_arrays` returns; all arrays (a PyTree, so it maps over batches).

    Attributes
    ----------
    x : (p + n_theta,) optimum ``(beta, phi)`` in the preconditioned basis; for a family with a
        dispersion, ``(beta, log dispersion, phi)``.
    u : pair ``(u_1, u_r)`` of conditional modes (``laplace.py``).
    mask : (n_theta,) 0 where a variance is at the boundary.
    deviance : () Laplace deviance ``-2 log L``.
    grad : (p + n_theta,) gradient of the deviance (0 for fixed coordinates).
    hessian : (p + n_theta, p + n_theta) exact Hessian of the deviance.
    status : () int, see :class:`Status`.
    lbfgs_iterations, newton_iterations : () int.
    evaluations : () int
        Deviance evaluations in both stages: one with the gradient per iteration, plus each
        line-search trial (which solves the conditional modes afresh).
    condvar : tuple of (G_k, Q_k, Q_k)
        Conditional covariance of each level's random effects ``b_g``, one array per grouping
        factor.
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


def glm_start(arrays: ModelArrays, family: Family, maxiter: int = 25) -> jnp.ndarray:
    """``beta`` of the GLM without random effects, by IRLS from R's ``mustart``."""
    X, w = arrays.X, arrays.weights
    trials = jnp.where(arrays.trials > 0, arrays.trials, 1.0)
    ybar = arrays.y / trials
    link = family.link

    def loglik(eta):
        return jnp.sum(w * family.loglik_kernel(arrays.y, arrays.trials, eta))

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


def _newton_direction(H, g):
    """``(-|H|^{-1} g, H positive definite)``, ``|H|`` with ``H``'s eigenvectors and the
    magnitudes of its eigenvalues floored at ``1e-8 max(max |eigenvalue|, 1)``: Newton's step
    where ``H`` is safely positive definite, a descent direction where it is not.

    For a small ``H`` (at most ``UNROLL_MAX`` parameters) Gauss-Jordan elimination of
    ``[H | I | g]`` (:func:`blocks.gauss_jordan`, ~7 kernels) gives that same step whenever
    its pivots are positive (``H`` positive definite) and ``1 / ||H^{-1}||_F``, a lower bound
    on the smallest eigenvalue, is above the floor (``||H||_F`` bounds the largest):
    LAPACK's ``eigh`` costs ~3.7 us a call on CPU, one per Newton step, and runs only when
    that test fails (an indefinite or nearly singular ``H``).
    """

    def by_eigh():
        ev, V = jnp.linalg.eigh(H)
        floor = 1e-8 * jnp.maximum(jnp.max(jnp.abs(ev)), 1.0)
        step = small_einsum("ji,j->i", V, g) / jnp.maximum(jnp.abs(ev), floor)
        return -small_einsum("ij,j->i", V, step), ev[0] > 0

    n = H.shape[0]
    if n > UNROLL_MAX:
        return by_eigh()
    X, pivots = gauss_jordan(H, jnp.concatenate([np.eye(n, dtype=H.dtype), g[:, None]], 1))
    H_inv = X[:, :n]
    bound = 1.0 / jnp.sqrt(jnp.sum(H_inv**2))
    safe = (
        jnp.all(pivots > 0)
        & jnp.all(jnp.isfinite(X))
        & (bound >= 1e-8 * jnp.maximum(jnp.sqrt(jnp.sum(H**2)), 1.0))
    )
    return jax.lax.cond(safe, lambda: (-X[:, n], jnp.array(True)), by_eigh)


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


def _extend(value, x, d, alpha, v, u, go, max_doublings: int = 6):
    """Double an accepted step ``alpha`` along ``d`` while the deviance keeps falling (and
    ``go``). Returns ``(alpha, v, u, evaluations)`` at the longest step that lowered it."""

    def cond(s):
        return s[4]

    def body(s):
        alpha, v, u, k, _ = s
        v_try, u_try = value(x + 2.0 * alpha * d, u)
        better = v_try < v
        alpha, v, u = _where(better, (2.0 * alpha, v_try, u_try), (alpha, v, u))
        return alpha, v, u, k + 1, better & (k + 1 < max_doublings)

    alpha, v, u, k, _ = jax.lax.while_loop(cond, body, (alpha, v, u, 0, go))
    return alpha, v, u, k


_RUNNING, _SKIP, _BOUNDARY = -1, -2, -3


class _LoopState(NamedTuple):
    """Carry of :func:`_minimize`'s loop; ``v``, ``g``, ``H`` are at ``x_prev``."""

    x: jnp.ndarray
    u: jnp.ndarray
    opt_state: object
    newton: jnp.ndarray  # in the Newton phase
    lbfgs_its: jnp.ndarray
    newton_its: jnp.ndarray
    evaluations: jnp.ndarray
    v: jnp.ndarray
    g: jnp.ndarray
    H: jnp.ndarray
    status: jnp.ndarray
    x_prev: jnp.ndarray
    have_H: jnp.ndarray  # a positive definite exact Hessian has been computed in the Newton phase
    near: jnp.ndarray  # the decrement has fallen below exact_hessian_below


def _where(condition, a, b):
    """``jnp.where`` over matching PyTrees (the modes are a pair of arrays)."""
    return jax.tree_util.tree_map(lambda x, y: jnp.where(condition, x, y), a, b)


def _symmetric_free(H, both):
    """Symmetrise ``H`` and zero the rows and columns of fixed coordinates."""
    return jnp.where(both, 0.5 * (H + H.T), 0.0)


def _limit_log_step(d, watch, free, control: Control):
    """``d`` shortened so that no log standard deviation changes by more than
    ``max_log_step``: far from the optimum a Newton step can otherwise jump a variance to near
    zero, where the boundary stage would take over from a point that is not the interior
    optimum."""
    longest = jnp.max(jnp.where(watch & free, jnp.abs(d), 0.0))
    return d * jnp.minimum(1.0, control.max_log_step / jnp.maximum(longest, 1e-300))


def _newton_tolerance(v, control: Control):
    """The Newton decrement below which a fit has converged: ``newton_tol``, but no tolerance
    below the rounding of the deviance ``v`` itself (it matters in float32)."""
    return jnp.maximum(control.newton_tol, 10 * jnp.finfo(v.dtype).eps * (1.0 + jnp.abs(v)))


def _final_status(status, g, control: Control):
    """The status reported for a fit's chosen stage: a failed line search with a gradient
    below ``gradient_tol`` is rounding at the optimum (converged); an interior fit stopped at
    the boundary that the boundary stage could not improve on hit its limit."""
    status = jnp.where(
        (status == Status.LINESEARCH) & (jnp.max(jnp.abs(g)) < control.gradient_tol),
        Status.CONVERGED,
        status,
    )
    return jnp.where(status == _BOUNDARY, Status.MAXITER, status)


def _minimize(
    value, dev_and_grad, x0, u0, free, watch, allow_lbfgs, skip, control: Control, hessian=None
):
    """Minimise the deviance over the free coordinates of ``x``: L-BFGS, then Newton.

    ``value(x, u0) -> (v, u*)`` solves the modes warm-started at ``u0``;
    ``dev_and_grad(x, u*)`` is the deviance at converged modes and its exact gradient, itself
    differentiable (the Hessian is its forward derivative). ``u0`` must be the converged
    modes at ``x0``. One loop serves both phases, so the derivatives and the line search are
    traced once: optax's L-BFGS direction while the deviance falls fast, then Newton steps
    (eigenvalues flipped and floored so every step descends) with the exact Hessian until one
    is positive definite and again near the optimum, BFGS updates of it in between (from an
    indefinite matrix they would keep its negative curvature). Convergence is declared
    only on a step that used the exact Hessian, so the returned Hessian is exact. Coordinates in
    ``watch`` are log standard deviations: if Newton drives one below ``log(singular_tol)``
    (where lme4 calls a fit singular) the loop stops with status ``_BOUNDARY``, leaving the
    variance to the boundary stage.

    ``hessian(x, u*, g)``, if given, replaces the exact Hessian with a cheap approximation
    (lmer's average information, ``lmm.average_information``): it is computed on every Newton
    step and convergence is judged with it; it is then the returned Hessian. (An objective
    whose evaluations bring their Hessian, lmer's stencil, goes to :func:`fit_stages_joint`.)

    An accepted unit Newton step that takes a log standard deviation below
    ``log(boundary_theta)`` further down is doubled while the deviance keeps falling: there the
    criterion flattens like ``theta^2`` and Newton's own steps shrink to about ``-1/2``.
    With ``control.lbfgs_maxiter == 0`` (static) no L-BFGS direction is computed at all.

    Returns ``(x, u, deviance, grad, hessian, lbfgs_its, newton_its, evaluations, status)``, with
    the gradient and Hessian at the returned ``x`` (fixed coordinates zeroed) unless an
    iteration limit stopped it mid-way.
    """
    n = x0.shape[0]
    both = free[:, None] & free[None, :]
    opt = optax.scale_by_lbfgs(memory_size=10)
    log_zero = jnp.log(control.singular_tol)
    log_boundary = jnp.log(control.boundary_theta)

    def cond(state: _LoopState):
        return state.status == _RUNNING

    # A supplied Hessian approximation (lmer's average information) is cheap: it is taken on
    # every Newton step, and convergence is judged with it.
    def hessian_at(x, u, g):
        """The exact Hessian (forward derivative of the gradient), or the supplied one."""
        if hessian is not None:
            return hessian(x, u, g)
        return jax.jacfwd(lambda xx: dev_and_grad(xx, u)[1])(x)

    def bfgs(H, s, y):
        Hs = H @ s
        sHs, ys = jnp.dot(s, Hs), jnp.dot(y, s)
        ok = (sHs > 0) & (ys > 1e-10 * jnp.sqrt(jnp.dot(s, s) * jnp.dot(y, y)))
        safe = lambda a: jnp.where(ok, a, 1.0)  # noqa: E731
        return jnp.where(ok, H - jnp.outer(Hs, Hs) / safe(sHs) + jnp.outer(y, y) / safe(ys), H)

    def body(state: _LoopState):
        x, u, newton = state.x, state.u, state.newton
        it_l, it_n = state.lbfgs_its, state.newton_its
        v, g = dev_and_grad(x, u)
        g = jnp.where(free, g, 0.0)
        approximate = hessian is not None
        exact = newton & (~state.have_H | state.near | approximate)
        H = jax.lax.cond(
            exact,
            lambda: _symmetric_free(hessian_at(x, u, g), both),
            lambda: jnp.where(newton, bfgs(state.H, x - state.x_prev, g - state.g), state.H),
        )

        if control.lbfgs_maxiter == 0:
            opt_state, d_lbfgs = state.opt_state, -g
        else:
            updates, opt_state = opt.update(g, state.opt_state, x)
            d_lbfgs = jnp.where(jnp.dot(g, updates) > 0, -updates, -g)
        d_newton, positive = _newton_direction(jnp.where(both, H, np.eye(n, dtype=H.dtype)), g)
        d = jnp.where(free, jnp.where(newton, d_newton, d_lbfgs), 0.0)
        d = _limit_log_step(d, watch, free, control)
        decrement = -jnp.dot(g, d)
        converged = (exact | (approximate & newton)) & (decrement < _newton_tolerance(v, control))
        # A converged step needs no line search (under vmap both branches run, harmlessly).
        alpha, v_new, u_new, accepted, k = jax.lax.cond(
            converged,
            lambda: (jnp.asarray(0.0, x.dtype), v, u, jnp.array(True), 0),
            lambda: _backtrack(value, x, u, v, g, d),
        )
        # A variance on its way to zero: in log(sd) the criterion flattens like theta^2, so
        # Newton's steps shrink to about -1/2 each and would take a dozen iterations to reach
        # the boundary stage (Dyestuff2: 14 Newton steps against 3). Longer steps while they
        # keep lowering the deviance get there at one evaluation each.
        heading_to_zero = jnp.any(watch & free & (x < log_boundary) & (d < 0))
        extend = newton & accepted & ~converged & (alpha == 1.0) & heading_to_zero
        alpha, v_new, u_new, k_more = _extend(value, x, d, alpha, v_new, u_new, extend)
        k = k + k_more
        move = accepted & ~converged
        x_new = jnp.where(move, x + alpha * d, x)
        # Leave L-BFGS for Newton once its progress slows (or its step fails).
        slow = ~accepted | (v - v_new <= control.lbfgs_rtol * (1.0 + jnp.abs(v)))
        to_newton = newton | slow | (it_l + 1 >= control.lbfgs_maxiter)
        it_n = it_n + newton
        it_l = it_l + ~newton
        # A variance sliding to zero: stop and let the boundary stage fit it exactly.
        sliding = newton & jnp.any(watch & free & (x_new < log_zero))
        finite = jnp.isfinite(v) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(H))
        status = jnp.select(
            [~finite, converged, newton & ~accepted, sliding, it_n >= control.newton_maxiter],
            [Status.NONFINITE, Status.CONVERGED, Status.LINESEARCH, _BOUNDARY, Status.MAXITER],
            _RUNNING,
        )
        return _LoopState(
            x=x_new,
            u=_where(move, u_new, u),
            opt_state=opt_state,
            newton=to_newton,
            lbfgs_its=it_l,
            newton_its=it_n,
            evaluations=state.evaluations + 1 + k,
            v=v,
            g=g,
            H=H,
            status=status,
            x_prev=x,
            # BFGS starts only from a positive definite exact Hessian: updates of an indefinite
            # one keep its negative curvature, and Newton crawled (a 10-school seed design: 14
            # steps where the exact Hessian needed 2 once it was taken again).
            have_H=state.have_H | (exact & positive),
            near=state.near | (newton & (decrement < control.exact_hessian_below)),
        )

    false, zero = jnp.array(False), jnp.int32(0)
    state = _LoopState(
        x=x0,
        u=u0,
        opt_state=opt.init(x0),
        newton=~allow_lbfgs | (control.lbfgs_maxiter == 0),
        lbfgs_its=zero,
        newton_its=zero,
        evaluations=zero,
        v=jnp.zeros((), x0.dtype),
        g=jnp.zeros(n, x0.dtype),
        H=jnp.zeros((n, n), x0.dtype),
        status=jnp.where(skip, _SKIP, _RUNNING),
        x_prev=x0,
        have_H=false,
        near=false,
    )
    s = jax.lax.while_loop(cond, body, state)
    return s.x, s.u, s.v, s.g, s.H, s.lbfgs_its, s.newton_its, s.evaluations, s.status


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
        Starting ``(beta, phi)`` (``(beta, log dispersion, phi)`` for families with a
        dispersion); ``None`` starts from the GLM fit, Pearson's dispersion and ``theta = 1``.
        From a given start the optimiser takes Newton steps at once (unless ``control`` sets
        ``lbfgs_maxiter``).
    family, structure, control
        Static settings.

    Returns
    -------
    FitOutput
    """
    p = arrays.X.shape[1]
    n_theta = structure.n_theta
    dtype = arrays.X.dtype
    # Families with a dispersion phi (gaussian, Gamma, ...) carry log(phi) after beta:
    # x = (beta, log phi, phi_theta). Their log-density is kernel * w / phi + c(y, phi / w), so
    # the Laplace machinery runs unchanged on the weights w / phi.
    k = 0 if family.fixed_dispersion else 1
    if x0 is not None and control.lbfgs_maxiter is None:
        control = dataclasses.replace(control, lbfgs_maxiter=0)  # near the optimum: Newton
    if x0 is None:
        beta0 = glm_start(arrays, family)
        start = [beta0, jnp.log(_moment_dispersion(arrays, family, beta0))[None]][: 1 + k]
        x0 = jnp.concatenate([*start, jnp.zeros(n_theta, dtype)])
    u_zero = zero_modes(arrays, structure, dtype)

    def unpack(x):
        """``(beta, phi_theta)`` and the arrays with weights over the dispersion (or, for the
        negative binomial, with its size as the per-row family parameter)."""
        if not k:
            return x, arrays
        if family.size_in_trials:
            scaled = arrays._replace(trials=jnp.exp(x[p]) * jnp.ones_like(arrays.trials))
        else:
            scaled = arrays._replace(weights=arrays.weights * jnp.exp(-x[p]))
        return jnp.concatenate([x[:p], x[p + 1 :]]), scaled

    def dispersion_term(x):
        """``-2 sum c(y, phi / w)``: the eta-free part of the deviance, which depends on phi."""
        if not k:
            return 0.0
        used = arrays.weights > 0
        y = jnp.where(used, arrays.y, 1.0)  # padding: a harmless value, masked below
        if family.size_in_trials:
            c = arrays.weights * family.loglik_const(y, jnp.exp(x[p]))
        else:
            phi = jnp.exp(x[p]) / jnp.where(used, arrays.weights, 1.0)
            c = family.dispersion_const(y, arrays.trials, phi)
        return -2.0 * jnp.sum(jnp.where(used, c, 0.0))

    def objective(mask):
        def deviance(x, u_star):
            xi, a = unpack(x)
            return laplace_deviance(xi, a, u_star, mask, family, structure) + dispersion_term(x)

        def value(x, u):
            xi, a = unpack(x)
            u_star = solve_modes(xi, a, u, mask, family, structure, control.inner)[0]
            return deviance(x, u_star), u_star

        def dev_and_grad(x, u_star):
            if k:
                return jax.value_and_grad(deviance)(x, u_star)
            return deviance_and_gradient(x, arrays, u_star, mask, family, structure)

        return value, dev_and_grad

    mask, x, u, v, g, H, status, its_l, its_n, evals = fit_stages(
        objective, x0, u_zero, p + k, structure, control, arrays.X.shape[0]
    )
    xi, a = unpack(x)
    # The optimiser never asks whether the inner Newton iteration converged (a line-search
    # trial may stop it early, harmlessly); at the optimum it must have. Warm-started from the
    # final modes one Newton step tells (one pass over the data and one factorisation).
    # Rounding in the gradient's sums limits how small a Newton step can get: in float32 the
    # seed model's steps stall near 2e-3 (the objective's rounding, 1e-4, stops the
    # halvings). eps^(1/3) (5e-3 in float32, 6e-6 in float64) judges the modes at the
    # precision they can have; a mode error that size moves the deviance by its square.
    tol = max(control.inner.tol, float(np.finfo(dtype).eps ** (1 / 3)))
    inner_done = newton_step_size(xi, a, u, mask, family, structure) < tol
    # Modes that did not converge explain any other failure of the outer loop too.
    status = jnp.where((status != Status.NONFINITE) & ~inner_done, Status.INNER, status)
    condvar = conditional_variances(xi, u, a, mask, family, structure)
    if not k:
        v = v + deviance_constant(arrays, family)
    return FitOutput(x, u, mask, v, g, H, status, its_l, its_n, evals, condvar)


def _moment_dispersion(arrays: ModelArrays, family: Family, beta):
    """Pearson's estimate of the dispersion at the GLM fit: the optimiser's start (for the
    negative binomial, the moment estimate of its size)."""
    mu = family.mu(arrays.X @ beta + arrays.offset)
    w = arrays.weights
    if family.size_in_trials:
        excess = jnp.sum(w * ((arrays.y - mu) ** 2 - mu))
        return jnp.clip(jnp.sum(w * mu**2) / jnp.maximum(excess, 1e-8), 1e-2, 1e4)
    chi2 = jnp.sum(w * (arrays.y - mu) ** 2 / jnp.maximum(family.variance(mu), 1e-300))
    dof = jnp.maximum(jnp.sum(w > 0) - arrays.X.shape[1], 1)
    return jnp.maximum(chi2 / dof, 1e-8)


def fit_stages(objective, x0, u_zero, p: int, structure: ReStructure, control: Control, rows: int):
    """Minimise over ``x = (beta, phi)`` in two stages, the second on the boundary.

    ``objective(mask) -> (value, dev_and_grad[, hessian])`` as :func:`_minimize` takes them, for the
    variances held at zero where ``mask`` is 0; ``p`` leading entries of ``x`` are not
    variance parameters (0 for lmer, whose fixed effects are profiled out). The interior fit
    runs first; then, if it left a variance near zero, the fit with every such variance held at
    exactly zero, and the lower deviance wins. Both stages run through one traced body (a scan
    of length 2). Returns ``(mask, x, u, deviance, grad, hessian, status, lbfgs_iterations,
    newton_iterations, evaluations)``. ``rows`` (the padded number of rows) decides between
    L-BFGS and Newton first when ``control`` leaves it open.
    """
    # Settings left to the static shapes (see Control): small data favour cheap iterations.
    if control.lbfgs_maxiter is None:
        small = rows <= control.lbfgs_max_rows
        lbfgs = 100 if small or x0.shape[0] > control.lbfgs_min_params else 0
        control = dataclasses.replace(control, lbfgs_maxiter=lbfgs)
    dtype = x0.dtype
    diag = jnp.asarray(structure.diagonal)
    watch = jnp.concatenate([jnp.zeros(p, bool), diag])

    def stage(carry, k):
        x_prev, u_prev = carry
        candidate = (k == 1) & diag & (jnp.exp(x_prev[p:]) < control.boundary_theta)
        mask = jnp.where(candidate, 0.0, 1.0).astype(dtype)
        free = jnp.concatenate([jnp.ones(p, bool), ~candidate])
        skip = (k == 1) & ~jnp.any(candidate)
        x_start = jnp.where(k == 0, x0, x_prev)
        u_start = _where(k == 0, u_zero, u_prev)
        value, dev_and_grad, *hessian = objective(mask)
        u_start = jax.lax.cond(skip, lambda: u_start, lambda: value(x_start, u_start)[1])
        res = _minimize(
            value, dev_and_grad, x_start, u_start, free, watch, k == 0, skip, control, *hessian
        )
        return (res[0], res[1]), (mask, *res)

    _, stages = jax.lax.scan(stage, (x0, u_zero), jnp.arange(2))
    masks, xs, us, vs, gs, Hs, its_l, its_n, evals, statuses = stages
    use_boundary = (statuses[1] != _SKIP) & (vs[1] <= vs[0] + 1e-6)
    pick = use_boundary.astype(jnp.int32)
    mask, x, u, v, g, H, status = jax.tree_util.tree_map(
        lambda a: a[pick], (masks, xs, us, vs, gs, Hs, statuses)
    )
    status = _final_status(status, g, control)
    its = (its_l[0] + its_l[1], its_n[0] + its_n[1], jnp.sum(evals))
    return (mask, x, u, v, g, H, status, *its)


# Phases of fit_stages_joint's loop: what the evaluation of this iteration is for.
_START, _SEARCH, _EXTEND = 0, 1, 2


class _JointState(NamedTuple):
    """Carry of :func:`fit_stages_joint`'s loop, in few arrays: XLA compiles the select of
    each leaf of a loop's state to a kernel of its own, and these selects were half of an
    iteration's kernels when every quantity was a leaf.

    A *point* is one vector ``[v, x, g, vec(H)]``: a value, its coordinates, gradient and
    Hessian. ``base`` is the accepted point followed by the Newton direction ``d`` from it;
    ``best`` the longest improving step of an extension; ``first`` ``[mask, point, status]``
    at the end of the interior stage, for the comparison with the boundary stage; ``mask``
    the stage's (0 for a variance held at zero); ``alpha`` the step the next evaluation
    tries; ``counters`` ``[phase, tries, stage, stage iterations, Newton iterations,
    evaluations, status]``.
    """

    base: jnp.ndarray
    best: jnp.ndarray
    first: jnp.ndarray
    mask: jnp.ndarray
    alpha: jnp.ndarray
    counters: jnp.ndarray


def fit_stages_joint(
    evaluate,
    x0,
    p: int,
    structure: ReStructure,
    control: Control,
    max_halvings: int = 40,
    max_doublings: int = 6,
):
    """:func:`fit_stages` with Newton steps throughout, for an objective whose every
    evaluation gives its gradient and Hessian too: ``evaluate(x, mask) -> (v, g, H)``
    (lmer's with one grouping factor, from a stencil of values).

    The same iteration as :func:`_minimize` with :func:`_backtrack` and :func:`_extend`, and
    the boundary stage of :func:`fit_stages`, written as one loop with one evaluation per
    iteration: the iteration's phase says whether that evaluation starts a stage, is a trial
    of the line search (Armijo, halving from step 1) or doubles an accepted step toward a
    zero variance. Where the general optimiser nests the line search and the extension in
    the Newton loop and the loop in a scan over both stages, each layer with its own state
    and branches (~110 kernels per Newton step on sleepstudy, ~30 of them the stencil), this
    body is the evaluation, the Newton direction and a few selects. Accepted points are the
    same, so the optimum and its Newton iterations are.

    Returns ``(mask, x, (v, g, H), v, g, H, status, 0, newton_iterations, evaluations)`` as
    :func:`fit_stages` does.
    """
    n, k = x0.shape[0], x0.shape[0] - p
    dtype = x0.dtype
    m = 1 + 2 * n + n * n  # the length of a point
    diag = jnp.asarray(structure.diagonal)
    watch = jnp.concatenate([jnp.zeros(p, bool), diag])
    log_zero = jnp.log(control.singular_tol)
    log_boundary = jnp.log(control.boundary_theta)
    eye = np.eye(n, dtype=dtype)

    def pack(v, x, g, H):
        return jnp.concatenate([jnp.reshape(v, (1,)), x, g, H.reshape(-1)])

    def unpack(point):
        return point[0], point[1 : 1 + n], point[1 + n : 1 + 2 * n], point[1 + 2 * n : m]

    def body(s: _JointState) -> _JointState:
        v, x, g, H = unpack(s.base)
        d = s.base[m:]
        phase, tries, stage, stage_its, newton_its, evaluations, _ = s.counters
        free = jnp.concatenate([jnp.ones(p, bool), s.mask > 0])
        both = free[:, None] & free[None, :]
        trial = x + s.alpha * d
        v_t, g_t, H_t = evaluate(trial, s.mask)
        point = pack(v_t, trial, jnp.where(free, g_t, 0.0), _symmetric_free(H_t, both))
        start, search, extending = phase == _START, phase == _SEARCH, phase == _EXTEND
        tries = tries + 1
        armijo = v_t <= v + 1e-4 * s.alpha * jnp.dot(g, d)
        # An accepted unit step that takes a log standard deviation further below
        # log(boundary_theta): double it while the criterion keeps falling (_extend).
        heading = jnp.any(watch & free & (x < log_boundary) & (d < 0))
        extend = search & armijo & (s.alpha == 1.0) & heading
        better = extending & (v_t < s.best[0])
        best = jnp.where(extend | better, point, s.best)
        more = extend | (better & (tries < max_doublings))
        halve = search & ~armijo & (tries < max_halvings)
        failed = search & ~armijo & ~halve
        take = start | (search & armijo & ~extend) | (extending & ~more)
        # The point taken: the trial, or at the end of an extension its longest improving step.
        point = jnp.where(extending, best, point)
        v, x, g, H = unpack(point)
        d, _ = _newton_direction(jnp.where(both, H.reshape(n, n), eye), g)
        d = _limit_log_step(jnp.where(free, d, 0.0), watch, free, control)
        # As _minimize: a move that takes a variance below singular_tol ends the stage (the
        # boundary stage fits it), as does the iteration limit; then the new point's tests.
        sliding = ~start & jnp.any(watch & free & (x < log_zero))
        limit = stage_its >= control.newton_maxiter
        status = jnp.select(
            [
                sliding,
                limit,
                ~jnp.all(jnp.isfinite(point)),
                -jnp.dot(g, d) < _newton_tolerance(v, control),
            ],
            [_BOUNDARY, Status.MAXITER, Status.NONFINITE, Status.CONVERGED],
            _RUNNING,
        )
        status = jnp.where(take, status, jnp.where(failed, Status.LINESEARCH, _RUNNING))
        # A Newton iteration is a direction taken (none where the stage ends before one).
        counted = take & ~sliding & ~limit
        base = jnp.where(take, jnp.concatenate([point, d]), s.base)
        alpha = jnp.where(
            take, 1.0, jnp.where(halve, 0.5 * s.alpha, jnp.where(more, 2.0 * s.alpha, s.alpha))
        )
        phase = jnp.where(take | halve, _SEARCH, jnp.where(more, _EXTEND, phase))
        tries = jnp.where(take | extend, 0, tries)

        # The interior stage's end: the boundary stage starts where a variance is near zero,
        # from the same point (alpha 0: its first evaluation is there).
        ended = (status != _RUNNING) & (stage == 0)
        first = jnp.where(
            ended, jnp.concatenate([s.mask, base[:m], status.astype(dtype)[None]]), s.first
        )
        candidate = diag & (jnp.exp(base[1 + p : 1 + n]) < control.boundary_theta)
        boundary = ended & jnp.any(candidate)
        counters = jnp.stack(
            [
                jnp.where(boundary, _START, phase),
                jnp.where(boundary, 0, tries),
                stage + boundary,
                jnp.where(boundary, 0, stage_its + counted),
                newton_its + counted,
                evaluations + 1,
                jnp.where(boundary, _RUNNING, status),
            ]
        ).astype(jnp.int32)
        return _JointState(
            base=base,
            best=best,
            first=first,
            mask=jnp.where(boundary & candidate, 0.0, s.mask).astype(dtype),
            alpha=jnp.where(boundary, 0.0, alpha).astype(dtype),
            counters=counters,
        )

    zero = jnp.zeros(n, dtype)
    mask0 = jnp.ones(k, dtype)
    start = pack(jnp.zeros((), dtype), x0, zero, jnp.zeros((n, n), dtype))
    state = _JointState(
        base=jnp.concatenate([start, zero]),
        best=start,
        first=jnp.concatenate([mask0, start, jnp.full(1, _RUNNING, dtype)]),
        mask=mask0,
        alpha=jnp.zeros((), dtype),
        counters=jnp.array([_START, 0, 0, 0, 0, 0, _RUNNING], jnp.int32),
    )
    s = jax.lax.while_loop(lambda s: s.counters[6] == _RUNNING, body, state)
    _, _, stage, _, newton_its, evaluations, status = s.counters
    first_mask, first_point = s.first[:k], s.first[k : k + m]
    # The boundary fit wins where it ran and its deviance is no higher.
    use_boundary = (stage == 1) & (s.base[0] <= first_point[0] + 1e-6)
    mask = jnp.where(use_boundary, s.mask, first_mask)
    v, x, g, H = unpack(jnp.where(use_boundary, s.base[:m], first_point))
    H = H.reshape(n, n)
    status = _final_status(
        jnp.where(use_boundary, status, s.first[-1].astype(jnp.int32)), g, control
    )
    return (mask, x, (v, g, H), v, g, H, status, jnp.int32(0), newton_its, evaluations)
