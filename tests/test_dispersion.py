"""GLMMs whose family has a dispersion (Gamma, inverse gaussian, gaussian with other links),
estimated jointly with the rest by maximising the Laplace likelihood, as glmmTMB does."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import case_frame, reference

import glmm_jax as gj
from glmm_jax.design import DataError


@pytest.fixture(scope="module")
def cake_fit():
    ref = reference("cake_gamma_tmb")
    return gj.glmer(ref["py"]["formula"], case_frame("cake_gamma_tmb"), family="Gamma", link="log")


def test_gamma_matches_glmmtmb(cake_fit):
    """glmmTMB (and the PyPI glmm package, -829.2738) maximise the Laplace likelihood with the
    dispersion; lme4's Gamma log-likelihood differs by 30 (tests/reference/README.md).
    R codes temperature with polynomial contrasts, so only recipe's coefficients compare."""
    ref, m = reference("cake_gamma_tmb"), cake_fit
    assert m.converged
    assert m.loglik >= ref["loglik"] - 1e-4
    assert m.loglik - ref["loglik"] < 5e-3
    assert m.aic == pytest.approx(ref["AIC"], abs=0.01)
    assert m.sigma == pytest.approx(ref["sigma"], rel=1e-3)
    sd = m.varcorr.set_index("grp").loc["recipe:replicate", "sdcor"]
    assert sd == pytest.approx(ref["varcorr_sd"]["recipe:replicate"], rel=2e-3)
    np.testing.assert_allclose(m.fixef.to_numpy()[1:3], ref["fixef"][1:3], atol=1e-4)
    np.testing.assert_allclose(m.se.to_numpy()[1:3], ref["se"][1:3], rtol=2e-3)
    assert m.varcorr.iloc[-1].grp == "Residual"
    assert m.dispersion == pytest.approx(m.sigma**2)
    assert "Residual" in str(m.summary())


def test_start_values_include_the_dispersion(cake_fit):
    ref = reference("cake_gamma_tmb")
    start = {"fixef": cake_fit.fixef, "theta": cake_fit.theta, "dispersion": cake_fit.dispersion}
    m = gj.glmer(
        ref["py"]["formula"], case_frame("cake_gamma_tmb"), family="Gamma", link="log", start=start
    )
    assert m.loglik == pytest.approx(cake_fit.loglik, abs=1e-6)
    assert m.fit_info.evaluations < cake_fit.fit_info.evaluations
    with pytest.raises(ValueError, match="dispersion must be positive"):
        gj.glmer(
            ref["py"]["formula"],
            case_frame("cake_gamma_tmb"),
            family="Gamma",
            link="log",
            start={**start, "dispersion": 0.0},
        )


def test_gamma_simulate_and_positive_response(cake_fit):
    sims = cake_fit.simulate(50, seed=1)
    assert np.all(sims.to_numpy() > 0)
    cv = (sims.to_numpy() / cake_fit.fitted()[:, None]).std()
    # Simulated spread: the dispersion and the random effects, not orders of magnitude off.
    assert 0.1 < cv < 0.5
    bad = case_frame("cake_gamma_tmb").assign(angle=lambda d: d["angle"] - 30.0)
    with pytest.raises(DataError, match="Gamma response 'angle' must be positive"):
        gj.glmer("angle ~ recipe + (1 | recipe:replicate)", bad, family="Gamma", link="log")


@pytest.mark.parametrize("family, link", [("inverse.gaussian", "log"), ("gaussian", "log")])
def test_dispersion_families_recover_simulated_parameters(family, link):
    rng = np.random.default_rng(11)
    G, per = 60, 25
    g = np.repeat(np.arange(G), per)
    x = rng.normal(size=g.size)
    mu = np.exp(0.5 + 0.3 * x + rng.normal(scale=0.4, size=G)[g])
    if family == "inverse.gaussian":
        phi = 0.2
        y = rng.wald(mu, 1.0 / phi)
    else:
        phi = 0.3**2
        y = mu + rng.normal(scale=0.3, size=g.size)
    data = pd.DataFrame({"y": y, "x": x, "g": g})
    m = gj.glmer("y ~ x + (1 | g)", data, family=family, link=link)
    assert m.converged
    np.testing.assert_allclose(m.fixef.to_numpy(), [0.5, 0.3], atol=0.15)
    assert m.varcorr.sdcor.iloc[0] == pytest.approx(0.4, abs=0.12)
    assert m.dispersion == pytest.approx(phi, rel=0.2)
    # The exact Hessian gives usable standard errors.
    assert np.all(np.isfinite(m.se)) and np.all(m.se < 0.2)


def test_negative_binomial_matches_glmmtmb():
    """The size is estimated jointly (glmmTMB's nbinom2), not by glmer.nb's alternation, which
    stops 0.05 lower in loglik (tests/reference/README.md)."""
    ref = reference("salamanders_nb_tmb")
    m = gj.glmer_nb(ref["py"]["formula"], case_frame("salamanders_nb_tmb"))
    assert m.converged
    assert m.loglik >= ref["loglik"] - 1e-4
    assert m.loglik - ref["loglik"] < 5e-3
    assert m.aic == pytest.approx(ref["AIC"], abs=0.01)
    assert m.nb_size == pytest.approx(ref["sigma"], rel=1e-3) and m.sigma == m.nb_size
    assert m.varcorr.sdcor.iloc[0] == pytest.approx(ref["varcorr_sd"]["site"], rel=2e-3)
    np.testing.assert_allclose(m.fixef.to_numpy(), ref["fixef"], atol=1e-3)
    np.testing.assert_allclose(m.se.to_numpy(), ref["se"], rtol=2e-3)
    assert list(m.varcorr.grp) == ["site"]  # no residual row for a count family
    # Simulated counts are overdispersed as the fitted size says: var = mu + mu^2 / size.
    sims = m.simulate(400, seed=3).to_numpy()
    mu = m.fitted()
    assert np.all(sims >= 0) and np.all(sims == np.round(sims))
    assert sims.var(axis=1).mean() > 1.5 * mu.mean()
