"""Response distributions of a GLMM, as pure ``jax.numpy`` functions.

A :class:`Family` knows its log-density, its variance function and its link. The estimator
asks it for four things per observation, all as functions of the linear predictor ``eta``:

* ``loglik(y, trials, eta)``: the log-density, constants included (so log-likelihoods match R's),
  split as ``loglik_kernel(y, trials, eta) + loglik_const(y, trials)`` so that the inner loops
  never recompute the (costly, eta-free) normalising constants;
* ``fisher_weight(trials, eta)``: ``trials * (dmu/deta)^2 / V(mu)``, the expected information,
  used in the Laplace log-determinant exactly as lme4's PIRLS weights are;
* ``dev_resid``, ``variance`` and ``simulate`` for residuals and parametric simulation.

Responses are stored in counts: for the binomial, ``y`` is the number of successes out of
``trials``. The user-facing mean ``mu`` is the probability, as in R.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln, xlogy

from .links import Link, _softplus, get_link

__all__ = [
    "Family",
    "Binomial",
    "Poisson",
    "Gaussian",
    "Gamma",
    "InverseGaussian",
    "NegativeBinomial",
    "binomial",
    "poisson",
    "gaussian",
    "get_family",
    "FAMILIES",
]

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Family:
    """Base class: a response distribution with a link.

    Subclasses implement :meth:`_kernel`, :meth:`loglik_const`, :meth:`variance`,
    :meth:`dev_resid`,
    :meth:`mustart` and :meth:`simulate`. Instances are immutable and hashable, so they can be
    static arguments of ``jax.jit``.
    """

    link: Link
    name: str = dataclasses.field(default="", init=False)
    valid_links: tuple[str, ...] = dataclasses.field(default=(), init=False, repr=False)
    # True for families whose dispersion is fixed at 1 (binomial, poisson).
    fixed_dispersion: bool = dataclasses.field(default=True, init=False, repr=False)
    # The Laplace log-determinant with the observed information (glmmTMB's, the reference for
    # these families) instead of the expected one (lme4's); the two agree for canonical links.
    observed_information: bool = dataclasses.field(default=False, init=False, repr=False)
    # A family parameter carried in ``trials`` (the negative binomial's size), not a dispersion
    # dividing the weights.
    size_in_trials: bool = dataclasses.field(default=False, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.link, Link):
            # Binomial("probit") as well as Binomial(get_link("probit")); frozen, hence setattr.
            object.__setattr__(self, "link", get_link(self.link))
        if self.link.name not in self.valid_links:
            raise ValueError(
                f"link {self.link.name!r} is not available for the {self.name} family; "
                f"valid links: {', '.join(self.valid_links)}"
            )

    def mu(self, eta: Array) -> Array:
        """Mean of the response (a probability for the binomial) at ``eta``."""
        return self.link.linkinv(eta)

    def _log_mu(self, eta: Array) -> Array:
        """``log mu``: exactly ``eta`` for the log link, floored at the smallest positive
        number otherwise (for the count families' kernels)."""
        if self.link.name == "log":
            return eta
        tiny = jnp.finfo(jnp.result_type(eta)).tiny
        return jnp.log(jnp.maximum(self.link.linkinv(eta), tiny))

    def fisher_weight(self, trials: Array, eta: Array) -> Array:
        """Expected information about ``eta`` in one observation: ``m (dmu/deta)^2 / V(mu)``."""
        mu = self.mu(eta)
        tiny = jnp.finfo(jnp.result_type(eta)).tiny
        return trials * self.link.mu_eta(eta) ** 2 / jnp.maximum(self.variance(mu), tiny)

    def loglik(self, y: Array, trials: Array, eta: Array) -> Array:
        """Log-density of each observation at ``eta``, normalising constants included."""
        return self.loglik_kernel(y, trials, eta) + self.loglik_const(y, trials)

    def loglik_kernel(self, y: Array, trials: Array, eta: Array) -> Array:
        """The part of :meth:`loglik` that depends on ``eta``.

        Its derivative in ``eta`` is :meth:`score` (a ``custom_jvp``), so every derivative the
        estimator takes, to any order, runs through the short closed-form score rather than
        through autodiff of the log-density.
        """
        return _kernel(self, y, trials, eta)

    def _kernel(self, y: Array, trials: Array, eta: Array) -> Array:  # pragma: no cover
        raise NotImplementedError

    def score(self, y: Array, trials: Array, eta: Array) -> Array:
        """``d loglik / d eta`` per observation (autodiff of the kernel unless overridden)."""
        return jax.jvp(lambda e: self._kernel(y, trials, e), (eta,), (jnp.ones_like(eta),))[1]

    def kernel_score_curvature(self, y: Array, trials: Array, eta: Array):
        """``(kernel, score, d score / d eta)`` in one pass, for the (undifferentiated) inner loop.

        Families override this where the three share costly subexpressions.
        """
        d1, d2 = jax.jvp(lambda e: self.score(y, trials, e), (eta,), (jnp.ones_like(eta),))
        return self._kernel(y, trials, eta), d1, d2

    def loglik_const(self, y: Array, trials: Array) -> Array:  # pragma: no cover
        """The part of :meth:`loglik` that does not depend on ``eta``."""
        raise NotImplementedError

    def variance(self, mu: Array) -> Array:  # pragma: no cover
        raise NotImplementedError

    def dev_resid(self, y: Array, trials: Array, mu: Array) -> Array:  # pragma: no cover
        raise NotImplementedError

    def mustart(self, y: Array, trials: Array) -> Array:  # pragma: no cover
        raise NotImplementedError

    def simulate(self, key: Array, mu: Array, trials: Array) -> Array:  # pragma: no cover
        raise NotImplementedError

    def observation_level_identifiable(self, trials) -> bool:
        """Whether a grouping factor with one level per observation has an identifiable
        variance: an overdispersion term for counts, not for a 0/1 or gaussian response."""
        return True

    def dispersion_const(self, y: Array, trials: Array, phi: Array) -> Array:
        """For families with a dispersion ``phi`` (``fixed_dispersion`` False): the
        ``eta``-free part ``c(y, phi)`` of the log-density ``kernel / phi + c(y, phi)``, where
        ``phi`` is the dispersion over the prior weight."""
        raise NotImplementedError  # pragma: no cover

    def __str__(self) -> str:
        return f"{self.name}({self.link.name})"


@dataclasses.dataclass(frozen=True)
class Binomial(Family):
    """Binomial responses: ``y`` successes out of ``trials``, mean ``mu`` a probability.

    Parameters
    ----------
    link : Link
        One of logit (default), probit, cloglog, cauchit, log.
    """

    name: str = dataclasses.field(default="binomial", init=False)
    valid_links: tuple[str, ...] = dataclasses.field(
        default=("logit", "probit", "cloglog", "cauchit", "log"), init=False, repr=False
    )

    def _kernel(self, y, trials, eta):
        if self.link.name == "logit":
            return y * eta - trials * _softplus(eta)
        log_mu, log1m_mu = self.link.log_mu_pair(eta)
        # y * log(mu) with y = 0 must be 0 even where log(mu) is -inf (log link, mu = 0).
        return jnp.where(y > 0, y * log_mu, 0.0) + jnp.where(
            trials > y, (trials - y) * log1m_mu, 0.0
        )

    def loglik_const(self, y, trials):
        return gammaln(trials + 1.0) - gammaln(y + 1.0) - gammaln(trials - y + 1.0)

    def fisher_weight(self, trials, eta):
        if self.link.name == "logit":
            p = self.link.linkinv(eta)
            return trials * p * (1.0 - p)
        if self.link.log_mu_eta is None:
            return super().fisher_weight(trials, eta)
        # m mu'^2 / (mu (1 - mu)) in logs: finite, with finite derivatives, where 1 - mu or mu'
        # round to zero (cloglog at eta = 5 gave 1e183 instead of about 1e-62).
        log_mu, log1m_mu = self.link.log_mu_pair(eta)
        return trials * jnp.exp(2.0 * self.link.log_mu_eta(eta) - log_mu - log1m_mu)

    def kernel_score_curvature(self, y, trials, eta):
        if self.link.name != "logit":
            return super().kernel_score_curvature(y, trials, eta)
        # One exponential and one log1p per observation for all three. The barrier keeps XLA
        # from fusing (and so recomputing) the exponential into each of the three outputs:
        # measured 20 -> 10 ms per 10^6 observations.
        e = jax.lax.optimization_barrier(jnp.exp(-jnp.abs(eta)))
        p = jnp.where(eta >= 0, 1.0, e) / (1.0 + e)
        softplus = jnp.maximum(eta, 0.0) + jnp.log1p(e)
        return y * eta - trials * softplus, y - trials * p, -trials * p * (1.0 - p)

    def score(self, y, trials, eta):
        if self.link.name == "logit":
            return y - trials * self.link.linkinv(eta)
        if self.link.dlog_mu_pair is None:
            return super().score(y, trials, eta)
        a, b = self.link.dlog_mu_pair(eta)
        return y * a + (trials - y) * b

    def variance(self, mu):
        return mu * (1.0 - mu)

    def dev_resid(self, y, trials, mu):
        p = y / jnp.where(trials > 0, trials, 1.0)
        return 2.0 * trials * (xlogy(p, p / mu) + xlogy(1.0 - p, (1.0 - p) / (1.0 - mu)))

    def observation_level_identifiable(self, trials) -> bool:
        # A Bernoulli response has no variance left over for a per-observation effect.
        return bool(np.any(np.asarray(trials) > 1))

    def mustart(self, y, trials):
        # R's binomial()$initialize: (m y + 0.5) / (m + 1) on the proportion scale.
        return (y + 0.5) / (trials + 1.0)

    def simulate(self, key, mu, trials):
        return jax.random.binomial(key, trials, mu).astype(mu.dtype)


@dataclasses.dataclass(frozen=True)
class Poisson(Family):
    """Poisson counts with mean ``mu``.

    Parameters
    ----------
    link : Link
        One of log (default), sqrt, identity.
    """

    name: str = dataclasses.field(default="poisson", init=False)
    valid_links: tuple[str, ...] = dataclasses.field(
        default=("log", "sqrt", "identity"), init=False, repr=False
    )

    def _kernel(self, y, trials, eta):
        return jnp.where(y > 0, y * self._log_mu(eta), 0.0) - self.mu(eta)

    def score(self, y, trials, eta):
        if self.link.name == "log":
            return y - jnp.exp(eta)
        return super().score(y, trials, eta)

    def fisher_weight(self, trials, eta):
        if self.link.name == "log":
            return trials * jnp.exp(eta)
        return super().fisher_weight(trials, eta)

    def kernel_score_curvature(self, y, trials, eta):
        if self.link.name != "log":
            return super().kernel_score_curvature(y, trials, eta)
        mu = jax.lax.optimization_barrier(jnp.exp(eta))
        return jnp.where(y > 0, y * eta, 0.0) - mu, y - mu, -mu

    def loglik_const(self, y, trials):
        return -gammaln(y + 1.0)

    def variance(self, mu):
        return mu

    def dev_resid(self, y, trials, mu):
        return 2.0 * (xlogy(y, y / mu) - (y - mu))

    def mustart(self, y, trials):
        return y + 0.1

    def simulate(self, key, mu, trials):
        return jax.random.poisson(key, mu).astype(mu.dtype)


@dataclasses.dataclass(frozen=True)
class Gaussian(Family):
    """Normal responses with mean ``mu`` and variance ``sigma^2 / w``.

    With the identity link this is the linear mixed model, fitted by :func:`glmm_jax.lmer`
    (``sigma`` is profiled out there). Here the kernel is the log-density at ``sigma = 1``,
    which is what simulation and residuals need.

    Parameters
    ----------
    link : Link
        One of identity (default), log, inverse.
    """

    name: str = dataclasses.field(default="gaussian", init=False)
    valid_links: tuple[str, ...] = dataclasses.field(
        default=("identity", "log", "inverse"), init=False, repr=False
    )
    fixed_dispersion: bool = dataclasses.field(default=False, init=False, repr=False)
    observed_information: bool = dataclasses.field(default=True, init=False, repr=False)

    def _kernel(self, y, trials, eta):
        return -0.5 * (y - self.mu(eta)) ** 2

    def loglik_const(self, y, trials):
        return self.dispersion_const(y, trials, jnp.ones_like(y))

    def dispersion_const(self, y, trials, phi):
        return -0.5 * jnp.log(2.0 * jnp.pi * phi)

    def variance(self, mu):
        return jnp.ones_like(mu)

    def dev_resid(self, y, trials, mu):
        return (y - mu) ** 2

    def mustart(self, y, trials):
        return y

    def simulate(self, key, mu, trials):
        return mu + jax.random.normal(key, mu.shape, mu.dtype)

    def observation_level_identifiable(self, trials) -> bool:
        # The residual is already a per-observation normal effect.
        return False


@dataclasses.dataclass(frozen=True)
class Gamma(Family):
    """Gamma responses with mean ``mu`` and variance ``phi mu^2`` (shape ``1 / phi``).

    Parameters
    ----------
    link : Link
        One of inverse (canonical, R's default), log, identity.
    """

    name: str = dataclasses.field(default="Gamma", init=False)
    valid_links: tuple[str, ...] = dataclasses.field(
        default=("inverse", "log", "identity"), init=False, repr=False
    )
    fixed_dispersion: bool = dataclasses.field(default=False, init=False, repr=False)
    observed_information: bool = dataclasses.field(default=True, init=False, repr=False)

    def _kernel(self, y, trials, eta):
        if self.link.name == "log":
            return -y * jnp.exp(-eta) - eta
        mu = self.mu(eta)
        return -y / mu - jnp.log(mu)

    def loglik_const(self, y, trials):
        return self.dispersion_const(y, trials, jnp.ones_like(y))

    def dispersion_const(self, y, trials, phi):
        return jnp.log(y / phi) / phi - jnp.log(y) - gammaln(1.0 / phi)

    def variance(self, mu):
        return mu**2

    def dev_resid(self, y, trials, mu):
        return -2.0 * (jnp.log(y / mu) - (y - mu) / mu)

    def mustart(self, y, trials):
        return y

    def simulate(self, key, mu, trials):
        # Unit dispersion; results rescale with the fitted one.
        return mu * jax.random.gamma(key, 1.0, mu.shape, mu.dtype)


@dataclasses.dataclass(frozen=True)
class InverseGaussian(Family):
    """Inverse gaussian responses with mean ``mu`` and variance ``phi mu^3``.

    Parameters
    ----------
    link : Link
        One of 1/mu^2 (canonical), inverse, identity, log.
    """

    name: str = dataclasses.field(default="inverse.gaussian", init=False)
    valid_links: tuple[str, ...] = dataclasses.field(
        default=("1/mu^2", "inverse", "identity", "log"), init=False, repr=False
    )
    fixed_dispersion: bool = dataclasses.field(default=False, init=False, repr=False)
    # Its observed information turns negative where y < mu / 2, which can make a level's
    # Laplace Hessian indefinite: use the expected information, as lme4 does.
    observed_information: bool = dataclasses.field(default=False, init=False, repr=False)

    def _kernel(self, y, trials, eta):
        mu = self.mu(eta)
        # y = 0 only on padding rows (weight 0; real responses are checked positive): keep
        # their kernel finite so that 0 * kernel stays 0.
        y_safe = jnp.where(y > 0, y, 1.0)
        return -((y - mu) ** 2) / (2.0 * mu**2 * y_safe)

    def loglik_const(self, y, trials):
        return self.dispersion_const(y, trials, jnp.ones_like(y))

    def dispersion_const(self, y, trials, phi):
        return -0.5 * jnp.log(2.0 * jnp.pi * phi * y**3)

    def variance(self, mu):
        return mu**3

    def dev_resid(self, y, trials, mu):
        return (y - mu) ** 2 / (y * mu**2)

    def mustart(self, y, trials):
        return y

    def simulate(self, key, mu, trials):  # pragma: no cover - not offered by results yet
        raise NotImplementedError("simulating inverse gaussian responses is not available")


@dataclasses.dataclass(frozen=True)
class NegativeBinomial(Family):
    """Negative binomial counts (NB2): mean ``mu``, variance ``mu + mu^2 / size``.

    The size (lme4's ``theta`` of ``glmer.nb``, glmmTMB's ``sigma`` for ``nbinom2``) is
    estimated jointly with the rest. It enters the fit as the per-row family parameter that
    the binomial uses for its trials (``ModelArrays.trials``), so that every derivative
    follows it.

    Parameters
    ----------
    link : Link
        One of log (default), sqrt, identity.
    """

    name: str = dataclasses.field(default="negative_binomial", init=False)
    valid_links: tuple[str, ...] = dataclasses.field(
        default=("log", "sqrt", "identity"), init=False, repr=False
    )
    fixed_dispersion: bool = dataclasses.field(default=False, init=False, repr=False)
    observed_information: bool = dataclasses.field(default=True, init=False, repr=False)
    #: The size rides in ``trials``, not as a divisor of the weights.
    size_in_trials: bool = dataclasses.field(default=True, init=False, repr=False)

    def loglik_kernel(self, y, trials, eta):
        # Plain autodiff: the kernel depends on the size as well as on eta.
        return self._kernel(y, trials, eta)

    def _kernel(self, y, size, eta):
        log_mu = self._log_mu(eta)
        return y * log_mu - (y + size) * jnp.logaddexp(log_mu, jnp.log(size))

    def fisher_weight(self, size, eta):
        mu = self.mu(eta)
        return self.link.mu_eta(eta) ** 2 / (mu + mu**2 / size)

    def loglik_const(self, y, size):
        return size * jnp.log(size) + gammaln(y + size) - gammaln(size) - gammaln(y + 1.0)

    def dispersion_const(self, y, size, phi):
        return self.loglik_const(y, size)

    def variance(self, mu):  # at size 1; results use the fitted size
        return mu + mu**2

    def dev_resid(self, y, size, mu):
        return 2.0 * (xlogy(y, y / mu) - (y + size) * jnp.log((y + size) / (mu + size)))

    def mustart(self, y, trials):
        return y + 0.1

    def simulate(self, key, mu, size):
        k1, k2 = jax.random.split(key)
        rate = mu * jax.random.gamma(k1, size, mu.shape, mu.dtype) / size
        return jax.random.poisson(k2, rate).astype(mu.dtype)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kernel(family, y, trials, eta):
    return family._kernel(y, trials, eta)


@_kernel.defjvp
def _kernel_jvp(family, primals, tangents):
    y, trials, eta = primals
    # The response is data: only eta carries a tangent.
    deta = tangents[2]
    return _kernel(family, y, trials, eta), family.score(y, trials, eta) * deta


FAMILIES = {
    "binomial": (Binomial, "logit"),
    "poisson": (Poisson, "log"),
    "gaussian": (Gaussian, "identity"),
    "gamma": (Gamma, "inverse"),
    "inverse.gaussian": (InverseGaussian, "1/mu^2"),
    "negative_binomial": (NegativeBinomial, "log"),
}


def binomial(link: str | Link = "logit") -> Binomial:
    """The binomial family with the given link (lme4's ``binomial(link = ...)``)."""
    return Binomial(get_link(link))


def poisson(link: str | Link = "log") -> Poisson:
    """The Poisson family with the given link (lme4's ``poisson(link = ...)``)."""
    return Poisson(get_link(link))


def gaussian(link: str | Link = "identity") -> Gaussian:
    """The gaussian family with the given link (R's ``gaussian(link = ...)``)."""
    return Gaussian(get_link(link))


def get_family(family: str | Family, link: str | Link | None = None) -> Family:
    """Resolve ``family`` (a name or a :class:`Family`) and an optional ``link``.

    Raises
    ------
    ValueError
        For an unknown family or a link the family does not support; the message lists the
        valid choices.
    """
    if isinstance(family, Family):
        if link is None or get_link(link) == family.link:
            return family
        return type(family)(get_link(link))
    if not isinstance(family, str) or family.lower() not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    cls, default_link = FAMILIES[family.lower()]
    return cls(get_link(default_link if link is None else link))
