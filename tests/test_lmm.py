"""lmer: the profiled criterion, Satterthwaite's degrees of freedom, weights, routing, results.

The fits against lme4 are in test_reference.py (LMM_CASES).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import case_frame, fit_case, reference

import glmm_jax as gj
from glmm_jax.design import DataError, build_design
from glmm_jax.lmm import profiled_deviance


@pytest.fixture(scope="module")
def sleepstudy():
    return gj.datasets.load_sleepstudy()


@pytest.mark.parametrize(
    "case", ["sleepstudy_ml_uncorr", "sleepstudy_reml", "penicillin_crossed_lmm"]
)
def test_criterion_at_lme4s_theta_equals_lme4s(case):
    """The profiled criterion, evaluated at lme4's theta, is lme4's deviance / REML criterion
    (after the constant that preconditioning X adds to the REML one)."""
    ref, m = reference(case), fit_case(case)
    d = m._design
    phi = d.structure.phi_from_theta(np.atleast_1d(ref["theta"]))
    with jax.enable_x64(True):
        value = profiled_deviance(
            jnp.asarray(phi), d.arrays, jnp.ones(phi.size), d.structure, ref["reml"]
        )
    shift = -2.0 * np.linalg.slogdet(d.M)[1] if ref["reml"] else 0.0
    assert float(value) + shift == pytest.approx(ref["deviance_minus2ll"], abs=1e-6)


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize(
    "formula", ["Reaction ~ Days + (Days | Subject)", "diameter ~ 1 + (1 | plate) + (1 | sample)"]
)
def test_gradient_of_the_criterion_matches_finite_differences(formula, reml):
    data = gj.datasets.load("penicillin" if "plate" in formula else "sleepstudy")
    d = build_design(formula, data, gj.gaussian())
    n = d.structure.n_theta
    with jax.enable_x64(True):
        mask = jnp.ones(n)

        def f(phi):
            return profiled_deviance(phi, d.arrays, mask, d.structure, reml)

        phi = jnp.asarray(np.linspace(-0.4, 0.3, n))
        g = jax.jit(jax.grad(f))(phi)
        f_jit, h = jax.jit(f), 1e-6
        g_fd = [(f_jit(phi + h * e) - f_jit(phi - h * e)) / (2 * h) for e in np.eye(n)]
    np.testing.assert_allclose(g, g_fd, rtol=1e-5, atol=1e-5)


def test_satterthwaite_degrees_of_freedom():
    """Balanced designs where lmerTest's answer is known: 17 for both sleepstudy effects (18
    subjects), 5 for Dyestuff's intercept (6 batches)."""
    m = fit_case("sleepstudy_reml")
    np.testing.assert_allclose(m.df_satterthwaite.to_numpy(), [17.0, 17.0], atol=1e-3)
    table = m.coef_table()
    assert list(table.columns) == ["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]
    t = table["Estimate"] / table["Std. Error"]
    np.testing.assert_allclose(table["t value"], t)
    from scipy import stats

    np.testing.assert_allclose(table["Pr(>|t|)"], 2 * stats.t.sf(np.abs(t), table["df"]))
    dyestuff = fit_case("dyestuff_lmm")
    assert dyestuff.df_satterthwaite.iloc[0] == pytest.approx(5.0, abs=1e-3)


def test_constant_weights_rescale_sigma_only(sleepstudy):
    """Prior weights w make the residual variance sigma^2 / w: constant weights c leave the
    likelihood, the fixed effects and the random-effect variances unchanged and multiply
    sigma by sqrt(c)."""
    formula = "Reaction ~ Days + (Days | Subject)"
    m = gj.lmer(formula, sleepstudy, reml=False)
    w = gj.lmer(formula, sleepstudy, reml=False, weights=np.full(len(sleepstudy), 4.0))
    assert w.loglik == pytest.approx(m.loglik, abs=1e-6)
    assert w.sigma == pytest.approx(2.0 * m.sigma, rel=1e-5)
    np.testing.assert_allclose(w.fixef.to_numpy(), m.fixef.to_numpy(), rtol=1e-6)
    re_w, re_m = w.varcorr.iloc[:3], m.varcorr.iloc[:3]
    np.testing.assert_allclose(re_w.vcov.to_numpy(), re_m.vcov.to_numpy(), rtol=1e-4)
    # Unequal weights change the fit: the weighted rows count more.
    v = gj.lmer(formula, sleepstudy, reml=False, weights=1.0 + (sleepstudy["Days"] > 4))
    assert abs(v.fixef["Days"] - m.fixef["Days"]) > 1e-3


def test_glmer_with_gaussian_family_routes_to_lmer(sleepstudy):
    with pytest.warns(UserWarning, match="lmer"):
        m = gj.glmer("Reaction ~ Days + (Days | Subject)", sleepstudy, family="gaussian")
    assert isinstance(m, gj.LMMResult) and m.reml
    assert m.deviance == pytest.approx(fit_case("sleepstudy_reml").deviance, abs=1e-6)
    # Other links make a GLMM with a dispersion, fitted by glmer itself.
    log_link = gj.glmer(
        "Reaction ~ Days + (1 | Subject)", sleepstudy, family="gaussian", link="log"
    )
    assert not isinstance(log_link, gj.LMMResult) and log_link.converged
    assert log_link.sigma == pytest.approx(fit_case("sleepstudy_reml").sigma, rel=0.3)


def test_observation_level_factor_refused_for_gaussian(sleepstudy):
    data = sleepstudy.assign(obs=np.arange(len(sleepstudy)).astype(str))
    with pytest.raises(DataError, match="'obs' has one level per observation"):
        gj.lmer("Reaction ~ Days + (1 | Subject) + (1 | obs)", data)


def test_summary_simulate_predict(sleepstudy):
    m = fit_case("sleepstudy_reml")
    text = str(m.summary())
    assert "Linear mixed model fit by REML" in text
    assert "REML criterion at convergence: 1743.6" in text
    assert "Residual" in text and "t value" in text and "df" in text
    ml = fit_case("sleepstudy_ml_uncorr")
    assert "AIC" in str(ml.summary()) and list(ml.varcorr.grp) == [
        "Subject",
        "Subject.1",
        "Residual",
    ]
    assert m.varcorr.iloc[-1].tolist() == ["Residual", None, None, m.sigma**2, m.sigma]
    np.testing.assert_allclose(m.predict(sleepstudy), m.fitted(), atol=1e-9)
    sims = m.simulate(200, seed=2)
    # Simulated responses spread as the model says: residual plus random-effect variance.
    resid = sims.to_numpy() - m.predict(re_form="~0")[:, None]
    days = sleepstudy["Days"].to_numpy()
    vc = m.varcorr
    var_model = (
        vc.vcov.iloc[0] + 2 * days * vc.vcov.iloc[2] + days**2 * vc.vcov.iloc[1] + m.sigma**2
    )
    ratio = resid.var(axis=1).mean() / var_model.mean()
    assert 0.8 < ratio < 1.2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        singular = fit_case("dyestuff2_singular_lmm")
    assert singular.singular and singular.theta[0] == 0.0


@pytest.mark.filterwarnings("ignore::glmm_jax.SingularFitWarning")
def test_lmer_on_several_factors_with_vector_terms():
    """A crossed LMM with a vector term on the second factor fits and agrees with the dense
    criterion's optimum found from another start."""
    data = case_frame("sim_pois_crossed_offset").assign(
        y=lambda d: np.log1p(d["count"]) + 0.1 * d["z"]
    )
    formula = "y ~ z + (1 | site) + (z | year)"
    a = gj.lmer(formula, data, reml=False)
    b = gj.lmer(formula, data, reml=False, start={"theta": [0.5, 0.5, 0.0, 0.5]})
    assert a.converged and b.converged
    assert a.loglik == pytest.approx(b.loglik, abs=1e-6)
    assert list(a.ngroups) == ["site", "year"]
    assert isinstance(a.ranef["year"], pd.DataFrame) and a.ranef["year"].shape == (12, 2)
