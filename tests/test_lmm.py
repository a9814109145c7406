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
from glmm_jax.lmm import (
    _criterion,
    average_information,
    cross_products,
    envelope_deviance,
    moment_start,
    pls,
    pls_from_cross_products,
    profiled_deviance,
    value_gradient_hessian,
)


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
        value = jax.jit(
            lambda p: profiled_deviance(p, d.arrays, jnp.ones(phi.size), d.structure, ref["reml"])
        )(jnp.asarray(phi))
    shift = -2.0 * np.linalg.slogdet(d.M)[1] if ref["reml"] else 0.0
    assert float(value) + shift == pytest.approx(ref["deviance_minus2ll"], abs=1e-6)


@pytest.mark.parametrize("reml", [True, False])
def test_cross_products_give_the_pls_over_the_data(reml):
    """With one grouping factor the criterion from per-level cross-products is the PLS solved
    over the rows: same criterion, fixed effects, modes and R_X'R_X, with weights, an offset,
    a response far from zero and a variance held at zero by the mask."""
    df = gj.datasets.load_sleepstudy()
    rng = np.random.default_rng(3)
    w = rng.uniform(0.5, 2.0, len(df))
    off = rng.normal(size=len(df))
    df = df.assign(Reaction=df["Reaction"] + 1e4)
    d = build_design("Reaction ~ Days + (Days | Subject)", df, gj.gaussian(), weights=w, offset=off)
    p = d.p
    with jax.enable_x64(True):
        a = jax.tree_util.tree_map(jnp.asarray, d.arrays)
        cp = cross_products(a)
        for phi, mask in [
            ([0.1, 0.3, -1.2], [1.0, 1.0, 1.0]),
            ([-2.0, -0.5, 0.4], [1.0, 1.0, 1.0]),
            ([0.2, 0.1, -1.0], [1.0, 1.0, 0.0]),
        ]:
            phi, mask = jnp.asarray(phi), jnp.asarray(mask)
            ours = pls_from_cross_products(phi, cp, mask, d.structure)
            full = pls(phi, a, mask, d.structure)
            np.testing.assert_allclose(
                _criterion(ours, p, reml), _criterion(full, p, reml), rtol=1e-11
            )
            np.testing.assert_allclose(ours.beta, full.beta, rtol=1e-9)
            np.testing.assert_allclose(ours.u[0], full.u[0], rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(ours.RX2, full.RX2, rtol=1e-10)


def test_stencil_derivatives_match_autodiff():
    """The gradient and Hessian from values on a stencil (value_gradient_hessian) agree with
    autodiff's to the accuracy the optimiser needs, at lme4's start and at the optimum, and
    with a variance held at zero (its row and column exactly zero)."""
    d = build_design(
        "Reaction ~ Days + (Days | Subject)", gj.datasets.load_sleepstudy(), gj.gaussian()
    )
    with jax.enable_x64(True):
        cp = cross_products(jax.tree_util.tree_map(jnp.asarray, d.arrays))
        for mask in [jnp.ones(3), jnp.array([1.0, 1.0, 0.0])]:

            def f(phi, mask=mask):
                return _criterion(pls_from_cross_products(phi, cp, mask, d.structure), d.p, True)

            for phi in [jnp.array([0.0, 0.0, 0.0]), jnp.array([-0.03, 0.015, -1.47])]:
                v, g, H = value_gradient_hessian(f, phi)
                assert float(v) == float(f(phi))
                exact_g, exact_H = jax.grad(f)(phi), jax.hessian(f)(phi)
                np.testing.assert_allclose(g, exact_g, atol=1e-6)
                scale = float(jnp.max(jnp.abs(exact_H)))
                np.testing.assert_allclose(H, exact_H, atol=1e-4 * scale)
                if mask[2] == 0.0:
                    assert float(g[2]) == 0.0 and np.all(np.asarray(H[2]) == 0.0)


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize(
    "formula", ["Reaction ~ 0 + (Days | Subject)", "Reaction ~ 0 + Days + (Days | Subject)"]
)
def test_one_factor_fit_is_a_stationary_point_of_the_criterion_over_the_rows(formula, reml):
    """The cross-product fit ends where the criterion computed over the rows (the PLS of the
    several-factor path) is stationary, also without fixed effects (which once failed to
    reshape an empty array) and on the badly scaled no-intercept model, where the previous
    path stopped 0.034 short in log-likelihood (PyPI glmm agrees with this optimum to 1e-11)."""
    m = gj.lmer(formula, gj.datasets.load_sleepstudy(), reml=reml)
    assert m.converged
    d = m._design
    phi = jnp.asarray(np.asarray(m._out.x)[d.p :])
    with jax.enable_x64(True):
        mask = jnp.ones(phi.size)

        def over_rows(ph):
            return profiled_deviance(ph, d.arrays, mask, d.structure, reml)

        value, grad = jax.value_and_grad(over_rows)(phi)
    assert float(value) == pytest.approx(float(m._out.deviance), abs=1e-8)
    assert np.max(np.abs(np.asarray(grad))) < 1e-4


def test_a_variance_heading_to_zero_reaches_the_boundary_in_few_steps():
    """Dyestuff2's batch variance is zero: in log(sd) Newton's steps toward it shrink to -1/2
    each (14 iterations); doubling the accepted steps while the criterion falls takes 3."""
    m = fit_case("dyestuff2_singular_lmm")
    assert m.singular and m.converged
    assert m.fit_info.newton_iterations <= 5


@pytest.mark.parametrize("tol", [1e-4, 0.3, 0.0])
def test_singular_is_lme4s_test_of_theta_on_the_fit_scale(tol):
    """``singular`` is ``theta < singular_tol`` on the diagonal (on the fit's scale, a dropped
    entry being 0) whatever the tolerance: Dyestuff2's zero variance is singular unless the
    tolerance is 0, sleepstudy's slope sd (0.23 on the fit's scale) is below 0.3 only. (The
    results are rebuilt from the same fits with the tolerance: the optimiser also reads it.)"""
    from glmm_jax.results import LMMResult

    fits = [
        fit_case("dyestuff2_singular_lmm"),
        gj.lmer("Reaction ~ Days + (Days | Subject)", gj.datasets.load("sleepstudy")),
    ]
    control = gj.Control(singular_tol=tol)
    for fit in fits:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gj.SingularFitWarning)
            m = LMMResult(fit._design, fit._out, 0.0, control, fit.reml)
        diag = m._design.structure.diagonal
        theta = (m.theta / m._design.theta_scale)[diag]
        assert m.singular == bool(np.any(theta < tol))
    assert LMMResult(fits[0]._design, fits[0]._out, 0.0, control, True).singular == (tol > 0)


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


# One grouping factor with a vector term, two crossed scalar ones, and a vector term on the
# second of two crossed factors (the blocked algebra's coupling and rest blocks).
GRADIENT_CASES = [
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
    ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    ("sim_pois_crossed_offset", "y ~ z + (1 | site) + (z | year)"),
]


def _lmm_design(name, formula):
    if name == "sim_pois_crossed_offset":
        data = case_frame(name).assign(y=lambda d: np.log1p(d["count"]) + 0.1 * d["z"])
    else:
        data = gj.datasets.load(name)
    return build_design(formula, data, gj.gaussian())


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("name, formula", GRADIENT_CASES)
def test_envelope_gradient_equals_the_exact_gradient(name, formula, reml):
    """The optimiser's cheap gradient (solution held fixed, selected inverse for log det H)
    equals the gradient of the criterion differentiated through the whole PLS solve."""
    d = _lmm_design(name, formula)
    n = d.structure.n_theta
    with jax.enable_x64(True):
        mask, st = jnp.ones(n), d.structure
        phi = jnp.asarray(np.linspace(-0.7, 0.2, n))
        v_exact, g_exact = jax.jit(
            jax.value_and_grad(lambda p: profiled_deviance(p, d.arrays, mask, st, reml))
        )(phi)
        v_env, g_env = jax.jit(
            jax.value_and_grad(lambda p: envelope_deviance(p, d.arrays, mask, st, reml))
        )(phi)
    assert float(v_env) == pytest.approx(float(v_exact), rel=1e-12)
    np.testing.assert_allclose(g_env, g_exact, rtol=1e-8, atol=1e-8)
    assert np.max(np.abs(np.asarray(g_exact))) > 1e-2  # not at a stationary point


@pytest.mark.parametrize("name, formula", GRADIENT_CASES)
def test_average_information_approximates_the_hessian_at_the_optimum(name, formula):
    """The average information, which the lmer fit takes as its Hessian, is within a few
    percent of the criterion's Hessian (differences of the exact gradient) at the optimum."""
    d = _lmm_design(name, formula)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = gj.fit.fit_lmm_design(d, reml=False)
    st, n = d.structure, d.structure.n_theta
    with jax.enable_x64(True):
        mask = jnp.ones(n)
        phi = jnp.asarray(np.asarray(m._out.x[d.p :]))
        # Compiled: op by op, these dispatch hundreds of small programs.
        sol = jax.jit(lambda p: pls(p, d.arrays, mask, st, False))(phi)
        AI = jax.jit(lambda p, s: average_information(p, s, d.arrays, mask, st, False))(phi, sol)
        AI = np.asarray(AI)
        grad = jax.jit(jax.grad(lambda p: profiled_deviance(p, d.arrays, mask, st, False)))
        h = 1e-5
        H = np.array([(grad(phi + h * e) - grad(phi - h * e)) / (2 * h) for e in np.eye(n)])
    scale = np.max(np.abs(H))
    np.testing.assert_allclose(AI, AI.T, atol=1e-8 * scale)
    if name != "sim_pois_crossed_offset":
        np.testing.assert_allclose(AI, H, atol=0.05 * scale)
    else:
        # 12 years: observed and expected information differ more; what Newton needs is a
        # well-scaled step, i.e. the eigenvalues of AI^{-1} H near 1 (on the interior
        # coordinates: the last variance is at its boundary).
        interior = np.ix_(range(3), range(3))
        ratio = np.linalg.eigvals(np.linalg.solve(AI[interior], H[interior])).real
        assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio


@pytest.mark.filterwarnings("ignore::glmm_jax.SingularFitWarning")
def test_moment_start_is_near_the_optimum():
    """The moment estimates that start an lmer fit land near lme4's theta, for scalar and
    vector terms alike; a zero variance starts at the lower clip."""
    cases = [
        "penicillin_crossed_lmm",
        "dyestuff_lmm",
        "dyestuff2_singular_lmm",
        "sleepstudy_reml",
        # Two scalar terms of one factor, estimated jointly: apart, the intercepts' spread
        # would hold the slopes' (theta 3.6 for lme4's 0.95).
        "sleepstudy_ml_uncorr",
    ]
    for case in cases:
        ref, m = reference(case), fit_case(case)
        d = m._design
        with jax.enable_x64(True):
            phi0 = np.asarray(moment_start(d.arrays, d.structure))
        theta0 = d.structure.theta_from_phi(phi0) * d.theta_scale
        theta = np.atleast_1d(ref["theta"])
        if case == "dyestuff2_singular_lmm":
            assert theta0 == pytest.approx([0.05])
            continue
        diagonal = d.structure.diagonal
        np.testing.assert_allclose(theta0[diagonal], theta[diagonal], rtol=0.35, err_msg=case)
        # Off the diagonal (a correlation's share of a slope's sd): near in absolute terms.
        scale = np.max(np.abs(theta))
        np.testing.assert_allclose(theta0[~diagonal], theta[~diagonal], atol=0.1 * scale)


def test_moment_start_leaves_a_term_without_enough_levels_at_one():
    """A slope over one value per level has no per-level coefficient: with fewer usable levels
    than the term has columns, the term starts at theta = 1 (phi = 0), never at NaN."""
    df = gj.datasets.load_sleepstudy()
    df = df[df["Days"] < 2].copy()
    # Every subject but two observed on one day only: two usable levels for a 2 x 2 block.
    keep = (df["Days"] == 0) | df["Subject"].isin(df["Subject"].unique()[:2])
    d = build_design("Reaction ~ Days + (Days | Subject)", df[keep], gj.gaussian())
    with jax.enable_x64(True):
        phi0 = np.asarray(moment_start(d.arrays, d.structure))
    np.testing.assert_array_equal(phi0, 0.0)


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
