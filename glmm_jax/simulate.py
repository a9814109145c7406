"""Responses simulated from a model with given parameters: the start of every bootstrap, power
analysis and simulation study.

:func:`simulate_responses` draws new random effects and then the response, for a design and
parameters on lme4's scales, one replicate per key of ``jax.random.split(key, nsim)``: the
draws of replicate ``i`` depend on the seed and ``i`` alone, so a study simulated in chunks
equals the same study simulated at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._config import precision
from .design import Design
from .families import Binomial, Gamma, Gaussian

__all__ = ["simulate_responses", "to_fit_scale"]


def simulate_responses(
    design: Design,
    beta,
    theta,
    *,
    dispersion: float = 1.0,
    scale: float = 1.0,
    nsim: int = 1,
    seed: int | None = None,
    start: int = 0,
) -> np.ndarray:
    """Simulate ``nsim`` responses of ``design``'s model with new random effects.

    Parameters
    ----------
    design : Design
        The model's design (its rows, covariates, grouping factors, trials and weights).
    beta : (p,) array
        Fixed effects, in the order of ``design.fixef_names``.
    theta : (n_theta,) array
        lme4's relative covariance factor parameters.
    dispersion : float
        ``sigma^2`` (gaussian), the dispersion (Gamma), or the size (negative binomial);
        ignored by the binomial and Poisson families.
    scale : float
        The random effects are ``scale * Lambda u``: ``sigma`` for a linear mixed model
        (whose ``theta`` is relative to it), 1 for a GLMM.
    nsim, seed : int
        Number of replicates and the seed of ``jax.random.key``.
    start : int
        Index of the first replicate: ``start=k, nsim=m`` gives replicates ``k .. k+m-1`` of
        the study with that seed.

    Returns
    -------
    (nobs, nsim) numpy array
        In the caller's row order, on the scale of the response as given: 0/1 or proportions
        (binomial with weights), successes for ``cbind`` responses, counts, or values.
    """
    d = design
    family = d.family
    if not (family.fixed_dispersion or isinstance(family, (Gaussian, Gamma))) and not (
        family.size_in_trials
    ):
        raise NotImplementedError(f"simulating from the {family.name} family")
    beta = np.asarray(beta, dtype=float)
    n = d.nobs
    eta_fixed = np.empty(n)
    gamma = np.linalg.solve(d.M, beta)  # the preconditioned coefficients
    eta_fixed[d.order] = d.arrays.X[:n] @ gamma + d.arrays.offset[:n]
    blocks = d.structure.lambda_blocks(np.asarray(theta, dtype=float))
    factors = [
        (d.factor_Z[f], d.factor_codes[f], len(d.levels[f]), T)
        for f, T in zip(d.structure.factors, blocks, strict=True)
    ]
    cbind = d.spec.response.kind == "cbind"

    def one(key):
        *keys_u, key_y = jax.random.split(key, 1 + len(factors))
        eta = jnp.asarray(eta_fixed)
        for k, (Z, codes, G, T) in zip(keys_u, factors, strict=True):
            b = scale * jax.random.normal(k, (G, T.shape[0])) @ jnp.asarray(T).T
            eta = eta + jnp.sum(jnp.asarray(Z) * b[codes], axis=1)
        mu = family.link.linkinv(eta)
        return _draw(key_y, mu)

    def _draw(key, mu):
        w = jnp.asarray(d.prior_weights)
        if isinstance(family, Gaussian):
            return mu + jax.random.normal(key, mu.shape) * jnp.sqrt(dispersion / w)
        if isinstance(family, Gamma):
            shape = w / dispersion
            return mu * jax.random.gamma(key, shape) / shape
        if family.size_in_trials:
            return family.simulate(key, mu, jnp.full(mu.shape, dispersion))
        y = family.simulate(key, mu, jnp.asarray(d.trials))
        if isinstance(family, Binomial) and not cbind:
            y = y / jnp.asarray(d.trials)
        return y

    with precision():
        keys = jax.random.split(jax.random.key(0 if seed is None else seed), start + nsim)
        return np.asarray(jax.vmap(one)(keys[start:])).T


def to_fit_scale(design: Design, Y) -> np.ndarray:
    """Responses ``(nobs, R)`` in the caller's row order and scale -> the fit's ``y``.

    Returns ``(R, n_pad)``: rows sorted as the design's arrays, binomial proportions turned into
    successes, padding zero.
    """
    d = design
    Y = np.asarray(Y, dtype=float)
    if isinstance(d.family, Binomial) and d.spec.response.kind != "cbind":
        Y = Y * d.trials[:, None]
    out = np.zeros((Y.shape[1], d.arrays.y.shape[0]), dtype=d.arrays.y.dtype)
    out[:, : d.nobs] = Y[d.order].T
    return out
