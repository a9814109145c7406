"""Families and links: densities against scipy, derivatives against finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import glmm_jax as gj
from glmm_jax.links import LINKS

ETA = np.array([-30.0, -4.0, -0.7, 0.0, 0.3, 2.5, 25.0])


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("name", list(LINKS))
def test_link_round_trip_and_derivative(name):
    link = LINKS[name]
    eta = {
        "log": np.array([-3.0, -0.5, 0.2, 1.5]),
        "inverse": np.array([0.5, 1.0, 2.0]),
        "1/mu^2": np.array([0.25, 1.0, 4.0]),
        "sqrt": np.array([0.5, 1.0, 3.0]),
    }.get(name, np.array([-3.0, -0.5, 0.0, 0.4, 2.0]))
    mu = link.linkinv(jnp.asarray(eta))
    np.testing.assert_allclose(link.linkfun(mu), eta, rtol=1e-10, atol=1e-10)
    fd = (link.linkinv(jnp.asarray(eta + 1e-6)) - link.linkinv(jnp.asarray(eta - 1e-6))) / 2e-6
    np.testing.assert_allclose(link.mu_eta(jnp.asarray(eta)), fd, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("link", ["logit", "probit", "cloglog", "cauchit", "log"])
def test_binomial_loglik_matches_scipy(link):
    fam = gj.binomial(link)
    # Moderate eta: scipy forms p first and loses the digits of 1 - p in the upper tail.
    eta = np.array([-3.0, -0.7, -0.1]) if link == "log" else np.array([-3.0, -0.7, 0.0, 1.2, 2.0])
    k = len(eta)
    y, m = np.arange(k) % 4 * 1.0, np.full(k, 5.0)
    p = np.asarray(fam.mu(jnp.asarray(eta)))
    np.testing.assert_allclose(
        fam.loglik(y, m, jnp.asarray(eta)), stats.binom.logpmf(y, m, p), rtol=1e-10
    )


def test_binomial_tails_are_exact():
    # log(1 - p) in closed form: -exp(eta) (cloglog), log Phi(-eta) (probit), -softplus (logit).
    eta = jnp.asarray([3.0, 8.0, 30.0])
    zeros, ones = jnp.zeros(3), jnp.ones(3)
    np.testing.assert_allclose(
        gj.binomial("cloglog").loglik(zeros, ones, eta), -np.exp(eta), rtol=1e-14
    )
    np.testing.assert_allclose(
        gj.binomial("probit").loglik(zeros, ones, eta),
        stats.norm.logsf(np.asarray(eta)),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        gj.binomial().loglik(ones, ones, -eta), -np.log1p(np.exp(eta)), rtol=1e-14
    )


@pytest.mark.parametrize("link", ["log", "sqrt", "identity"])
def test_poisson_loglik_matches_scipy(link):
    fam = gj.poisson(link)
    eta = np.array([0.3, 1.0, 2.5])
    mu = np.asarray(fam.mu(jnp.asarray(eta)))
    y = np.array([0.0, 2.0, 7.0])
    np.testing.assert_allclose(
        fam.loglik(y, 1.0, jnp.asarray(eta)), stats.poisson.logpmf(y, mu), rtol=1e-10
    )


@pytest.mark.parametrize(
    "fam",
    [gj.binomial(link) for link in ("logit", "probit", "cloglog", "cauchit")] + [gj.poisson()],
)
def test_score_is_derivative_of_kernel_and_finite_in_tails(fam):
    y = np.where(np.arange(ETA.size) % 2 == 0, 1.0, 0.0) * (1 if fam.name == "binomial" else 3)
    m = np.ones_like(ETA)
    eta = ETA if fam.name == "binomial" else np.clip(ETA, -5, 5)
    score = np.asarray(fam.score(y, m, jnp.asarray(eta)))
    h = 1e-6
    fd = (
        np.asarray(fam._kernel(y, m, jnp.asarray(eta + h)))
        - np.asarray(fam._kernel(y, m, jnp.asarray(eta - h)))
    ) / (2 * h)
    ok = np.abs(eta) < 20  # finite differences lose all digits deep in the tails
    np.testing.assert_allclose(score[ok], fd[ok], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(score))
    # Through the custom_jvp, autodiff of the kernel returns the score, second order included.
    g = jax.grad(lambda e: jnp.sum(fam.loglik_kernel(y, m, e)))(jnp.asarray(eta))
    np.testing.assert_allclose(g, score, rtol=1e-12, atol=1e-12)
    d2 = jax.jvp(
        lambda e: fam.score(y, m, e), (jnp.asarray(eta),), (jnp.ones_like(jnp.asarray(eta)),)
    )[1]
    assert np.all(np.isfinite(np.asarray(d2)))


def test_fisher_weight_equals_observed_information_for_canonical_links():
    eta = jnp.asarray([-2.0, 0.0, 1.5])
    for fam, y, m in (
        (gj.binomial(), jnp.asarray([1.0, 2.0, 0.0]), jnp.asarray([3.0, 4.0, 2.0])),
        (gj.poisson(), jnp.asarray([0.0, 1.0, 5.0]), jnp.ones(3)),
    ):
        d2 = jax.jvp(lambda e, fam=fam, y=y, m=m: fam.score(y, m, e), (eta,), (jnp.ones(3),))[1]
        np.testing.assert_allclose(-d2, fam.fisher_weight(m, eta), rtol=1e-12)


def test_unknown_family_and_link_list_the_choices():
    with pytest.raises(ValueError, match="valid families: binomial, poisson"):
        gj.get_family("gamma-ish")
    with pytest.raises(ValueError, match="valid links: log, sqrt, identity"):
        gj.get_family("poisson", "logit")
    with pytest.raises(ValueError, match="unknown link"):
        gj.get_link("nope")


def test_family_objects_are_hashable_and_picklable():
    import pickle

    a, b = gj.binomial("probit"), gj.get_family("binomial", "probit")
    assert a == b and hash(a) == hash(b)
    assert pickle.loads(pickle.dumps(a)) == a
    assert gj.get_family(a, "logit") == gj.binomial()
