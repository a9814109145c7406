"""The result object: lme4's vocabulary, predictions, residuals, simulation, bad input."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import fit_case
from scipy import stats

import glmm_jax as gj

SEED = "success ~ schavg + (1 | school)"


def test_summary_has_lme4_layout(seed_fit):
    text = str(seed_fit.summary())
    for piece in (
        "Laplace Approximation",
        "Family: binomial  ( logit )",
        f"Formula: {SEED}",
        "AIC",
        "BIC",
        "logLik",
        "deviance",
        "df.resid",
        "-2658.3",
        "5316.6",
        "4056",
        "Scaled residuals:",
        "Random effects:",
        "Number of obs: 4059, groups:  school, 65",
        "Fixed effects:",
        "Pr(>|z|)",
        "***",
        "Correlation of Fixed Effects:",
    ):
        assert piece in text, piece
    html = seed_fit._repr_html_()
    assert "<table" in html and "school" in html and "schavg" in html


def test_coefficient_table_is_consistent(seed_fit):
    t = seed_fit.coef_table()
    np.testing.assert_allclose(t["z value"], seed_fit.fixef / seed_fit.se)
    np.testing.assert_allclose(t["Pr(>|z|)"], 2 * stats.norm.sf(np.abs(t["z value"])))
    np.testing.assert_allclose(np.sqrt(np.diag(seed_fit.vcov)), seed_fit.se)
    assert seed_fit.vcov.index.tolist() == ["(Intercept)", "schavg"]


def test_fit_record(seed_fit):
    info = seed_fit.fit_info
    assert info.converged and info.status == "converged"
    assert info.newton_iterations >= 1 and info.evaluations >= info.newton_iterations
    assert info.gradient_norm < 1e-3 and info.seconds > 0


def test_varcorr_with_correlation():
    m = fit_case("exam_slopes")
    vc = m.varcorr
    assert list(vc.columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    corr = vc[vc.var2.notna()].iloc[0]
    sd = vc[vc.var2.isna()].set_index("var1").sdcor
    assert corr.sdcor == pytest.approx(corr.vcov / (sd["(Intercept)"] * sd["standLRT"]))
    assert "Corr" in str(m.summary())


def test_ranef_frame_and_condvar(seed_fit):
    tidy = seed_fit.ranef_frame()
    assert list(tidy.columns) == ["grpvar", "term", "grp", "condval", "condsd"]
    assert len(tidy) == 65
    np.testing.assert_allclose(tidy.condsd, np.sqrt(seed_fit.condvar["school"][:, 0, 0]))


def test_predict_variants(exam, seed_fit):
    m = seed_fit
    eta = m.predict()
    np.testing.assert_allclose(m.fitted(), 1 / (1 + np.exp(-eta)))
    np.testing.assert_allclose(m.predict(type="response"), m.fitted())
    pop = m.predict(re_form="~0")
    X = np.column_stack([np.ones(len(exam)), exam["schavg"]])
    np.testing.assert_allclose(pop, X @ m.fixef.to_numpy())
    np.testing.assert_allclose(m.predict(re_form="NA"), pop)
    # New data with the fitted rows reproduces the in-sample predictions, in the given order.
    rows = exam.iloc[[5, 3000, 17]]
    np.testing.assert_allclose(m.predict(rows), eta[[5, 3000, 17]])
    np.testing.assert_allclose(m.predict(rows, re_form="~0"), pop[[5, 3000, 17]])


def test_unseen_levels(exam, seed_fit):
    new = pd.DataFrame({"schavg": [0.1, 0.1], "school": ["1", "no such school"]})
    pred = seed_fit.predict(new)
    b1 = seed_fit.ranef["school"].loc["1"].iloc[0]
    base = seed_fit.fixef["(Intercept)"] + 0.1 * seed_fit.fixef["schavg"]
    np.testing.assert_allclose(pred, [base + b1, base])
    with pytest.raises(gj.DataError, match="not in the fit"):
        seed_fit.predict(new, allow_new_levels=False)
    with pytest.raises(ValueError, match="type"):
        seed_fit.predict(type="probability")


def test_residuals(exam, seed_fit):
    m = seed_fit
    y = exam["success"].to_numpy()
    mu = m.fitted()
    np.testing.assert_allclose(m.residuals("response"), y - mu)
    np.testing.assert_allclose(m.residuals("pearson"), (y - mu) / np.sqrt(mu * (1 - mu)))
    np.testing.assert_allclose(m.residuals("working"), (y - mu) / (mu * (1 - mu)))
    # For 0/1 data the saturated log-likelihood is 0, so the squared deviance residuals sum
    # to -2 log p(y | b).
    ll = np.sum(stats.bernoulli.logpmf(y, mu))
    assert np.sum(m.residuals() ** 2) == pytest.approx(-2 * ll, rel=1e-10)
    with pytest.raises(ValueError, match="residual type"):
        m.residuals("studentized")


def test_binomial_residuals_use_trials():
    m = fit_case("cbpp_cbind")
    d = m._design
    mu = m.fitted()
    np.testing.assert_allclose(
        m.residuals("pearson"), (d.y_mean - mu) * np.sqrt(d.trials) / np.sqrt(mu * (1 - mu))
    )


def test_simulate(exam, seed_fit):
    a = seed_fit.simulate(3, seed=11)
    assert a.shape == (len(exam), 3) and list(a.columns) == ["sim_1", "sim_2", "sim_3"]
    assert set(np.unique(a.to_numpy())) <= {0.0, 1.0}
    pd.testing.assert_frame_equal(a, seed_fit.simulate(3, seed=11))
    assert not a.equals(seed_fit.simulate(3, seed=12))
    many = seed_fit.simulate(200, seed=1).to_numpy().mean()
    assert many == pytest.approx(exam["success"].mean(), abs=0.03)
    counts = fit_case("cbpp_cbind").simulate(2, seed=0).to_numpy()
    assert np.all(counts == np.round(counts)) and counts.max() > 1


def test_pickle_round_trip(seed_fit, exam):
    m2 = pickle.loads(pickle.dumps(seed_fit))
    assert m2.loglik == seed_fit.loglik
    pd.testing.assert_series_equal(m2.fixef, seed_fit.fixef)
    np.testing.assert_allclose(m2.predict(exam.head()), seed_fit.predict(exam.head()))
    assert str(m2.summary()) == str(seed_fit.summary())


def test_callers_data_is_not_modified(exam):
    df = exam.copy()
    df.loc[3, "schavg"] = np.nan
    before = df.copy()
    with pytest.warns(UserWarning, match="dropped 1 of 4059 rows"):
        m = gj.glmer(SEED, df)
    pd.testing.assert_frame_equal(df, before)
    assert m.nobs == 4058
    assert len(m.fitted()) == 4058


def test_unknown_column_is_named(exam):
    with pytest.raises(gj.DataError, match="'schavgg'.*not found"):
        gj.glmer("success ~ schavgg + (1 | school)", exam)
    with pytest.raises(gj.DataError, match="'skool'"):
        gj.glmer("success ~ schavg + (1 | skool)", exam)
    with pytest.raises(gj.DataError, match="weights column 'nope'"):
        gj.glmer(SEED, exam, weights="nope")


def test_bad_formula_and_family(exam):
    with pytest.raises(gj.FormulaError):
        gj.glmer("success ~ schavg + (1 | school", exam)
    with pytest.raises(ValueError, match="valid families"):
        gj.glmer(SEED, exam, family="gaussian-ish")
    with pytest.raises(ValueError, match="no random-effects term"):
        gj.glmer("success ~ schavg", exam)


def test_response_checks(exam):
    with pytest.raises(gj.DataError, match=r"must lie in \[0, 1\]"):
        gj.glmer("normexam ~ schavg + (1 | school)", exam)
    with pytest.raises(gj.DataError, match="only for the binomial"):
        gj.glmer("cbind(success, 1 - success) ~ schavg + (1 | school)", exam, family="poisson")
    with pytest.raises(gj.DataError, match="two-level factor"):
        gj.glmer("vr ~ schavg + (1 | school)", exam)
    with pytest.raises(gj.DataError, match="non-negative"):
        gj.glmer(SEED, exam, weights=-np.ones(len(exam)))
    with pytest.raises(gj.DataError, match="length"):
        gj.glmer(SEED, exam, weights=np.ones(3))


def test_two_level_factor_response_is_recoded(exam):
    df = exam.assign(passed=pd.Categorical(np.where(exam.success == 1, "yes", "no"), ["no", "yes"]))
    a = gj.glmer("passed ~ schavg + (1 | school)", df)
    assert a.loglik == pytest.approx(gj.glmer(SEED, exam).loglik, abs=1e-8)


def test_adaptive_quadrature_not_yet(exam):
    with pytest.raises(NotImplementedError, match="nAGQ"):
        gj.glmer(SEED, exam, nAGQ=5)


def test_offset_argument_equals_offset_term():
    df = gj.datasets.load_mmmec()
    a = gj.glmer("deaths ~ uvb + offset(log(expected)) + (1 | region)", df, family="poisson")
    b = gj.glmer("deaths ~ uvb + (1 | region)", df, family="poisson", offset=np.log(df["expected"]))
    assert a.loglik == pytest.approx(b.loglik, abs=1e-8)
    np.testing.assert_allclose(
        a.predict(df.head()), b.predict(df.head()) + np.log(df["expected"].head()), rtol=1e-10
    )


def test_aliased_column_is_dropped_with_warning(exam):
    df = exam.assign(schavg2=2 * exam["schavg"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = gj.glmer("success ~ schavg + schavg2 + (1 | school)", df)
    assert any("schavg2" in str(w.message) for w in caught)
    assert list(m.fixef.index) == ["(Intercept)", "schavg"]
    assert m.loglik == pytest.approx(gj.glmer(SEED, exam).loglik, abs=1e-6)


def test_numeric_fast_path_matches_formulaic(exam):
    """Fixed parts of plain numeric columns skip formulaic; the matrix and predictions agree."""
    import formulaic

    from glmm_jax.design import NumericColumns

    for rhs in ("schavg", "0 + schavg + standLRT", "1 + standLRT"):
        fast = NumericColumns.match(rhs, exam)
        assert fast is not None
        slow = formulaic.model_matrix(rhs, exam)
        pd.testing.assert_frame_equal(
            fast.get_model_matrix(exam),
            pd.DataFrame(np.asarray(slow), columns=slow.columns, index=exam.index),
        )
    for rhs in ("sex", "schavg - 1", "I(schavg**2)", "schavg:standLRT"):
        assert NumericColumns.match(rhs, exam) is None
    m = gj.glmer("success ~ 0 + schavg + standLRT + (1 | school)", exam)
    X = exam[["schavg", "standLRT"]].to_numpy()
    np.testing.assert_allclose(m.predict(exam.head(), re_form="~0"), X[:5] @ m.fixef.to_numpy())
