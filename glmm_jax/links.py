"""Link functions: ``eta = g(mu)``, as pure ``jax.numpy`` functions.

Each :class:`Link` carries the link ``g``, its inverse and ``dmu/deta``. Binomial links also
carry a numerically stable ``log(mu), log(1 - mu)`` pair so that log-likelihoods, and their
autodiff derivatives, stay finite far in the tails (probit at eta = -40, logit at eta = 800).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr, ndtri

__all__ = ["Link", "get_link", "LINKS"]

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Link:
    """A link function of a generalized linear model.

    Parameters
    ----------
    name : str
        lme4's name (``"logit"``, ``"probit"``, ...).
    linkfun : callable
        ``mu -> eta``.
    linkinv : callable
        ``eta -> mu``.
    mu_eta : callable
        ``eta -> dmu/deta``.
    log_mu_pair : callable, optional
        ``eta -> (log mu, log(1 - mu))`` computed stably, for links onto (0, 1).
    dlog_mu_pair : callable, optional
        ``eta -> (d log mu / d eta, d log(1 - mu) / d eta)`` in closed form; where absent, the
        family differentiates ``log_mu_pair`` instead.
    log_mu_eta : callable, optional
        ``eta -> log(dmu/deta)`` in closed form, for Fisher weights that stay finite where
        ``dmu/deta`` or ``1 - mu`` round to zero.
    """

    name: str
    linkfun: Callable[[Array], Array]
    linkinv: Callable[[Array], Array]
    mu_eta: Callable[[Array], Array]
    log_mu_pair: Callable[[Array], tuple[Array, Array]] | None = None
    dlog_mu_pair: Callable[[Array], tuple[Array, Array]] | None = None
    log_mu_eta: Callable[[Array], Array] | None = None

    # Links are singletons looked up by name: hashing by name keeps jit's static-argument cache
    # shared between equal links.
    def __hash__(self) -> int:
        return hash(("Link", self.name))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Link) and other.name == self.name

    def __repr__(self) -> str:
        return f"Link({self.name!r})"

    # Pickle by name: the functions are module-level singletons.
    def __reduce__(self):
        return (get_link, (self.name,))


def _log_pair_clipped(linkinv):
    # Fallback for links without a closed form: clip mu away from 0 and 1.
    def pair(eta):
        tiny = jnp.finfo(jnp.result_type(eta, jnp.float32)).tiny
        mu = jnp.clip(linkinv(eta), tiny, 1.0 - jnp.finfo(jnp.result_type(eta)).eps)
        return jnp.log(mu), jnp.log1p(-mu)

    return pair


def _softplus(x):
    # log(1 + e^x) without overflow; cheaper to evaluate and differentiate than logaddexp.
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _sigmoid(eta):
    # lax.logistic: one primitive, stable in both tails, derivative s (1 - s) at every order.
    return jax.lax.logistic(eta)


def _log_phi(eta):
    """Log of the standard normal density."""
    return -0.5 * eta**2 - 0.5 * jnp.log(2 * jnp.pi)


def _exp_capped(eta):
    # exp(eta) for cloglog, capped below float64 overflow: mu is 1 to machine precision there.
    return jnp.exp(jnp.minimum(eta, 700.0))


def _cloglog_inv(eta):
    return -jnp.expm1(-_exp_capped(eta))


def _probit_dpair(eta):
    # phi / Phi as exp of a difference of logs: finite deep in both tails.
    return jnp.exp(_log_phi(eta) - log_ndtr(eta)), -jnp.exp(_log_phi(eta) - log_ndtr(-eta))


def _cloglog_dpair(eta):
    e = _exp_capped(eta)
    # e / expm1(e), written so that no derivative of it forms inf / inf for large e.
    return e * jnp.exp(-e) / -jnp.expm1(-e), -e


def _cloglog_pair(eta):
    e = _exp_capped(eta)
    # log(1 - exp(-e)) is log(-expm1(-e)); for tiny e that is log(e) to first order, exact here.
    return jnp.log(-jnp.expm1(-e)), -e


def _cauchit_inv(eta):
    return 0.5 + jnp.arctan(eta) / jnp.pi


def _log_inv(eta):
    return jnp.exp(eta)


LINKS: dict[str, Link] = {
    "logit": Link(
        "logit",
        linkfun=lambda mu: jnp.log(mu) - jnp.log1p(-mu),
        linkinv=_sigmoid,
        mu_eta=lambda eta: _sigmoid(eta) * _sigmoid(-eta),
        log_mu_pair=lambda eta: (-_softplus(-eta), -_softplus(eta)),
        dlog_mu_pair=lambda eta: (_sigmoid(-eta), -_sigmoid(eta)),
        log_mu_eta=lambda eta: -_softplus(-eta) - _softplus(eta),
    ),
    "probit": Link(
        "probit",
        linkfun=ndtri,
        linkinv=ndtr,
        mu_eta=lambda eta: jnp.exp(_log_phi(eta)),
        log_mu_pair=lambda eta: (log_ndtr(eta), log_ndtr(-eta)),
        dlog_mu_pair=_probit_dpair,
        log_mu_eta=_log_phi,
    ),
    "cloglog": Link(
        "cloglog",
        linkfun=lambda mu: jnp.log(-jnp.log1p(-mu)),
        linkinv=_cloglog_inv,
        mu_eta=lambda eta: jnp.exp(jnp.minimum(eta, 700.0) - _exp_capped(eta)),
        log_mu_pair=_cloglog_pair,
        dlog_mu_pair=_cloglog_dpair,
        log_mu_eta=lambda eta: eta - _exp_capped(eta),
    ),
    "cauchit": Link(
        "cauchit",
        linkfun=lambda mu: jnp.tan(jnp.pi * (mu - 0.5)),
        linkinv=_cauchit_inv,
        mu_eta=lambda eta: 1.0 / (jnp.pi * (1.0 + eta**2)),
        log_mu_pair=_log_pair_clipped(_cauchit_inv),
        log_mu_eta=lambda eta: -jnp.log(jnp.pi * (1.0 + eta**2)),
    ),
    "log": Link(
        "log",
        linkfun=jnp.log,
        linkinv=_log_inv,
        mu_eta=_log_inv,
        log_mu_pair=_log_pair_clipped(_log_inv),
    ),
    "identity": Link(
        "identity",
        linkfun=lambda mu: mu,
        linkinv=lambda eta: eta,
        mu_eta=jnp.ones_like,
        log_mu_pair=_log_pair_clipped(lambda eta: eta),
    ),
    "sqrt": Link(
        "sqrt",
        linkfun=jnp.sqrt,
        linkinv=lambda eta: eta**2,
        mu_eta=lambda eta: 2.0 * eta,
    ),
    "inverse": Link(
        "inverse",
        linkfun=lambda mu: 1.0 / mu,
        linkinv=lambda eta: 1.0 / eta,
        mu_eta=lambda eta: -1.0 / eta**2,
    ),
    "1/mu^2": Link(
        "1/mu^2",
        linkfun=lambda mu: 1.0 / mu**2,
        linkinv=lambda eta: 1.0 / jnp.sqrt(eta),
        mu_eta=lambda eta: -0.5 * eta**-1.5,
    ),
}


def get_link(link: str | Link) -> Link:
    """Return the :class:`Link` named ``link`` (or ``link`` itself if it is one).

    Raises
    ------
    ValueError
        If the name is unknown; the message lists the valid names.
    """
    if isinstance(link, Link):
        return link
    try:
        return LINKS[link]
    except (KeyError, TypeError):
        raise ValueError(f"unknown link {link!r}; valid links: {', '.join(LINKS)}") from None
