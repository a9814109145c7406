"""Bad input and numerical edge cases (issue 6): an error that names the problem, or a correct
result with a warning that says what was done. Never a JAX trace, never a silent NaN.

Most checks stop in ``build_design`` (no compilation); the fits reuse the seed model's
structure (binomial, two fixed effects, one grouping factor) wherever they can, so they share
one compiled program.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest

import glmm_jax as gj
from glmm_jax.families import get_family
from glmm_jax.laplace import InnerControl

SEED = "success ~ schavg + (1 | school)"


def design(formula, data, family="binomial", **kwargs):
    return gj.build_design(formula, data, get_family(family), **kwargs)


@pytest.fixture(scope="module")
def small():
    """60 rows, 6 groups: counts, proportions and a positive response."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(6), 10)
    x = rng.normal(size=60)
    return pd.DataFrame(
        {
            "g": pd.Categorical(g),
            "x": x,
            "n": rng.integers(1, 6, 60),
            "count": rng.poisson(np.exp(0.3 * x + 0.5)),
            "pos": rng.gamma(2.0, np.exp(0.2 * x)),
            "y01": (rng.random(60) < 0.5).astype(int),
        }
    )


# -- formulas, families, links ------------------------------------------------------------------


@pytest.mark.parametrize(
    "formula, column",
    [
        ("success ~ schavgg + (1 | school)", "schavgg"),
        ("succes ~ schavg + (1 | school)", "succes"),
        ("success ~ schavg + (1 | skool)", "skool"),
        ("success ~ schavg + (1 | school/klass)", "klass"),
        ("success ~ schavg + (1 + slope | school)", "slope"),
        ("success ~ schavg + offset(log(expo)) + (1 | school)", "expo"),
        ("cbind(success, fails) ~ schavg + (1 | school)", "fails"),
        ("success ~ C(kind) + (1 | school)", "kind"),
        ("success ~ schavg + `odd name` + (1 | school)", "odd name"),
    ],
)
def test_unknown_columns_are_named(exam, formula, column):
    with pytest.raises(gj.DataError, match=f"'{column}' in formula .* not found in data"):
        gj.glmer(formula, exam)


@pytest.mark.parametrize(
    "formula, message",
    [
        ("success ~ schavg + (1 | school", "unbalanced"),
        ("success schavg + (1 | school)", "exactly one '~'"),
        ("~ schavg + (1 | school)", "no response"),
        ("success ~ ", "no terms"),
        ("success ~ schavg + (1 | )", "no grouping factor"),
        ("success ~ schavg + ( | school)", "nothing before '|'"),
        ("success ~ schavg + (1 | school) +", "empty term"),
        ("success ~ schavg + (1 | school) | x", "inside parentheses"),
        ("cbind(success) ~ schavg + (1 | school)", "exactly two arguments"),
        ("success ~ (schavg > 0) + (1 | school)", r"cannot parse '\(schavg > 0\)'.*operator '>'"),
    ],
)
def test_formula_syntax_errors_say_what_is_wrong(exam, formula, message):
    with pytest.raises(gj.FormulaError, match=message):
        gj.glmer(formula, exam)


def test_unknown_family_and_link_list_the_valid_ones(exam):
    with pytest.raises(ValueError, match="unknown family 'binomal'; valid families: binomial"):
        gj.glmer(SEED, exam, family="binomal")
    with pytest.raises(ValueError, match="unknown link 'logist'; valid links: logit, probit"):
        gj.glmer(SEED, exam, link="logist")
    with pytest.raises(ValueError, match="'logit' is not available for the poisson family"):
        gj.glmer(SEED, exam, family="poisson", link="logit")
    # A family object takes a link by name, as lme4's binomial(link = "probit") does.
    assert gj.Binomial("probit") == gj.binomial("probit")
    with pytest.raises(ValueError, match="valid links"):
        gj.Poisson("logg")


# -- responses, per family ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, values, message",
    [
        ("binomial", lambda d: d.y01 * 2, r"must lie in \[0, 1\]"),
        ("binomial", lambda d: np.where(d.y01 == 1, "yes", "no"), "must be numeric .* not str"),
        ("binomial", lambda d: pd.Categorical(d.g), "two-level factor; it has 6 levels"),
        ("poisson", lambda d: d["count"] - 3, "non-negative count; found .* negative value"),
        ("negative_binomial", lambda d: -d["count"] - 1, "non-negative count"),
        ("poisson", lambda d: d.g.astype(str), "must be numeric, got str values"),
        ("Gamma", lambda d: d.pos - d.pos.min(), "must be positive; 1 values are zero"),
        ("inverse.gaussian", lambda d: -d.pos, "must be positive"),
        ("gaussian", lambda d: pd.Categorical(d.g), "must be numeric, got category values"),
    ],
)
def test_responses_outside_the_family_are_refused(small, family, values, message):
    data = small.assign(y=values(small))
    with pytest.raises(gj.DataError, match=message):
        design("y ~ x + (1 | g)", data, family)


def test_binomial_forms_of_the_response(small):
    # Proportions with weights = trials are counts; outside [0, 1] they are refused.
    prop = small.assign(p=small.y01 / 1.0)
    d = design("p ~ x + (1 | g)", prop, weights=small.n)
    np.testing.assert_array_equal(d.trials, small.n)
    with pytest.raises(gj.DataError, match=r"weights= .* proportion in \[0, 1\]"):
        design("p ~ x + (1 | g)", prop.assign(p=prop.p + 1), weights=small.n)
    # cbind() counts must be non-negative; a boolean response is 0/1.
    failures = np.where(np.arange(60) == 4, -1, small.n - small.y01)
    with pytest.raises(gj.DataError, match="non-negative counts; found 1 negative value"):
        design("cbind(y01, f) ~ x + (1 | g)", small.assign(f=failures))
    booleans = design("b ~ x + (1 | g)", small.assign(b=small.y01 == 1))
    np.testing.assert_array_equal(booleans.y_mean, small.y01)
    with pytest.warns(UserWarning, match="non-integer number of successes"):
        design("q ~ x + (1 | g)", small.assign(q=small.y01 * 0.5))


def test_non_integer_counts_warn(small):
    with pytest.warns(UserWarning, match="'c' has 60 non-integer values"):
        design("c ~ x + (1 | g)", small.assign(c=small["count"] + 0.5), "poisson")


# -- missing, infinite and empty data -----------------------------------------------------------


@pytest.mark.parametrize(
    "column, formula",
    [
        ("success", SEED),
        ("schavg", SEED),
        ("school", SEED),
        ("standLRT", "success ~ schavg + (standLRT | school)"),
    ],
)
def test_missing_values_drop_rows_with_a_count(exam, column, formula):
    data = exam.copy()
    data.loc[[5, 17, 400], column] = np.nan
    with pytest.warns(UserWarning, match="dropped 3 of 4059 rows with missing values"):
        d = design(formula, data)
    assert d.nobs == 4056
    assert list(d.index) == [i for i in exam.index if i not in (5, 17, 400)]


@pytest.mark.parametrize(
    "values, dtype",
    [
        ([1.0, np.nan, 3.0], "float64"),
        ([1.0, 2.0, 3.0], "float64"),
        ([np.inf, -np.inf, 3.0], "float64"),  # a NaN sum without a NaN value
        ([1, 2, 3], "int64"),
        ([True, False, True], "bool"),
        (["a", None, "b"], "object"),
        (["a", None, "b"], "category"),
        (["a", "c", "b"], "category"),
        (["a", None, "b"], "string"),
        ([1, None, 3], "Int64"),
        ([1.0, None, np.nan], "Float64"),
        (["2020-01-01", None, "2020-01-03"], "datetime64[ns]"),
    ],
)
def test_missing_values_are_found_in_every_column_dtype(values, dtype):
    """The design's fast test for missing values (numeric values, categorical codes) agrees
    with pandas' notna on every dtype a column can have (``None``: every row has a value)."""
    from glmm_jax.design import _Columns, _present

    column = pd.Series(values, dtype=dtype)
    present = _present(_Columns(pd.DataFrame({"x": column})).values("x"))
    expected = column.notna().to_numpy()
    # None only when nothing is missing; a mask may come back all True (the inf case).
    assert present is not None or expected.all()
    np.testing.assert_array_equal(expected if present is None else present, expected)


@pytest.mark.parametrize("internal", [True, False])
def test_column_values_are_read_only_views_and_duplicates_are_refused(monkeypatch, internal):
    """The design reads columns as arrays (pandas' internal getter, or the public fallback
    when it is missing): same values, read-only for numpy dtypes, the Categorical as it is;
    a column name that appears twice is a clear error."""
    from glmm_jax import design

    df = pd.DataFrame({"y": [1.0, 2.0, 3.0], "n": [1, 2, 3], "g": pd.Categorical(list("aba"))})
    if not internal:
        monkeypatch.delattr(pd.DataFrame, "_get_column_array", raising=False)
    columns = design._Columns(df)
    y, n, g = columns.values("y"), columns.values("n"), columns.values("g")
    np.testing.assert_array_equal(y, df["y"].to_numpy())
    np.testing.assert_array_equal(n, df["n"].to_numpy())
    assert isinstance(g, pd.Categorical) and list(g) == ["a", "b", "a"]
    assert not y.flags.writeable and not n.flags.writeable
    assert columns.values("y") is y  # read once
    twice = pd.concat([df, df[["y"]]], axis=1)
    with pytest.raises(gj.DataError, match="'y' appears more than once"):
        design._Columns(twice).values("y")


def test_rows_an_expression_makes_nan_are_dropped(exam):
    # log of a negative value is NaN: R's model frame drops the row, and so do we.
    data = exam.assign(v=np.where(exam.index < 10, -1.0, 1.0 + exam.schavg**2))
    with pytest.warns(UserWarning, match="dropped 10 of 4059 rows"):
        d = design("success ~ log(v) + (1 | school)", data)
    assert d.nobs == 4049
    # A missing offset (as a vector) drops its row as well.
    off = np.zeros(len(exam))
    off[0] = np.nan
    with pytest.warns(UserWarning, match="dropped 1 of 4059"):
        assert design(SEED, exam, offset=off).nobs == 4058


@pytest.mark.parametrize(
    "formula, column, where",
    [
        (SEED, "success", "response 'success'"),
        (SEED, "schavg", "fixed-effect column 'schavg'"),
        ("success ~ schavg + (standLRT | school)", "standLRT", "random-effect column 'standLRT'"),
        ("success ~ schavg + offset(standLRT) + (1 | school)", "standLRT", "offset"),
    ],
)
def test_infinite_values_are_refused_and_located(exam, formula, column, where):
    data = exam.assign(**{column: exam[column].astype(float)})
    data.loc[7, column] = np.inf
    with pytest.raises(gj.DataError, match=f"{where}.* has 1 infinite value"):
        design(formula, data)


def test_infinite_values_from_an_expression(exam):
    with pytest.raises(gj.DataError, match=r"'log\(z\)' has 4059 infinite values"):
        design("success ~ log(z) + (1 | school)", exam.assign(z=0.0))


def test_empty_and_all_incomplete_frames_are_refused(exam):
    with pytest.raises(gj.DataError, match="data has no rows"):
        design(SEED, exam.iloc[:0])
    with pytest.raises(gj.DataError, match="no complete rows left"):
        design(SEED, exam.assign(schavg=np.nan))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: -w, "non-negative; found 4059 negative values"),
        (lambda w: np.where(np.arange(w.size) == 3, np.nan, w), "1 missing value"),
        (lambda w: np.where(np.arange(w.size) < 2, np.inf, w), "2 infinite values"),
    ],
)
def test_bad_weights_are_refused(exam, change, message):
    with pytest.raises(gj.DataError, match=f"weights .*{message}"):
        design("normexam ~ schavg + (1 | school)", exam, "gaussian", weights=change(np.ones(4059)))


# -- grouping factors ---------------------------------------------------------------------------


def test_grouping_factor_level_counts(exam, small):
    with pytest.raises(gj.DataError, match="'one' has 1 level"):
        design("success ~ schavg + (1 | one)", exam.assign(one="a"))
    obs = exam.assign(obs=np.arange(len(exam)))
    for family, formula in [("binomial", "success"), ("gaussian", "normexam")]:
        with pytest.raises(gj.DataError, match="'obs' has one level per observation"):
            design(f"{formula} ~ schavg + (1 | obs)", obs, family)
    # Counts, and binomial responses with more than one trial, identify that variance.
    small = small.assign(obs=np.arange(60))
    assert design("count ~ x + (1 | obs)", small, "poisson").levels["obs"].size == 60
    binom = design("cbind(y01, n - y01) ~ x + (1 | obs)", small.assign(n=small.n + 1))
    assert binom.levels["obs"].size == 60


def test_unused_levels_are_dropped(exam):
    school = pd.Categorical(exam.school, categories=[*exam.school.cat.categories, "empty"])
    m = gj.glmer(SEED, exam.assign(school=school))
    assert m.ngroups == {"school": 65}
    assert "empty" not in m.ranef["school"].index
    assert m.loglik == pytest.approx(-2658.3174, abs=1e-4)


# -- the fixed effects: aliasing, separation, scale ---------------------------------------------


def test_aliased_columns_are_dropped_with_a_warning(exam):
    data = exam.assign(double=2 * exam.schavg)
    with pytest.warns(UserWarning, match="rank deficient: dropping 1 column.*: double"):
        m = gj.glmer("success ~ schavg + double + (1 | school)", data)
    assert list(m.fixef.index) == ["(Intercept)", "schavg"]
    assert m.loglik == pytest.approx(-2658.3174, abs=1e-4)


def _finite(m):
    values = [m.loglik, *m.fixef, *m.se, *m.theta]
    return np.all(np.isfinite(values))


def test_complete_separation_warns_and_stays_finite(exam):
    data = exam.assign(sep=exam.success.astype(float))
    with pytest.warns(gj.SeparationWarning, match=r"\(\(Intercept\), sep\)"):
        m = gj.glmer("success ~ sep + (1 | school)", data)
    assert _finite(m)
    assert abs(m.fixef["sep"]) > 10 and m.se["sep"] > 100
    assert m.loglik > -1e-6  # every response is fitted: the likelihood's supremum is 1


def test_quasi_complete_separation_names_the_separating_column(exam):
    rng = np.random.default_rng(0)
    q = np.where(exam.success == 1, rng.integers(0, 2, len(exam)), 0).astype(float)
    with pytest.warns(gj.SeparationWarning, match=r"fixed effects \(q\)"):
        m = gj.glmer("success ~ q + schavg + (1 | school)", exam.assign(q=q))
    assert _finite(m)
    assert m.fixef["q"] > 10
    # The other coefficient stays finite and near its value without q.
    assert abs(m.fixef["schavg"] - 1.5) < 0.3


@pytest.mark.parametrize("scale", [1e4, 1e-4])
def test_predictor_scale_does_not_change_the_fit(exam, seed_fit, scale):
    m = gj.glmer("success ~ x + (1 | school)", exam.assign(x=exam.schavg * scale))
    assert m.loglik == pytest.approx(seed_fit.loglik, abs=1e-7)
    assert m.fixef["x"] * scale == pytest.approx(seed_fit.fixef["schavg"], rel=1e-6)
    assert m.se["x"] * scale == pytest.approx(seed_fit.se["schavg"], rel=1e-5)
    np.testing.assert_allclose(m.theta, seed_fit.theta, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e4, 1e-4])
def test_random_slope_scale_does_not_change_the_fit(scale):
    # The random-effect columns are standardised too (design.re_column_scale); ML, since the
    # REML criterion itself moves by 2 log(scale) with X (as lme4's does).
    sleep = gj.datasets.load_sleepstudy()
    a = gj.lmer("Reaction ~ Days + (Days | Subject)", sleep, reml=False)
    b = gj.lmer("Reaction ~ h + (h | Subject)", sleep.assign(h=sleep.Days * scale), reml=False)
    assert b.converged
    assert b.deviance == pytest.approx(a.deviance, abs=1e-6)
    assert b.fixef["h"] * scale == pytest.approx(a.fixef["Days"], rel=1e-6)
    # theta's slope row, the slope's random effects and their sds carry the units.
    np.testing.assert_allclose(b.theta * [1, scale, scale], a.theta, rtol=1e-5)
    np.testing.assert_allclose(b.ranef["Subject"].h * scale, a.ranef["Subject"].Days, rtol=1e-5)
    np.testing.assert_allclose(
        b.ranef_sd["Subject"].h * scale, a.ranef_sd["Subject"].Days, rtol=1e-5
    )
    assert not b.singular


# -- convergence ---------------------------------------------------------------------------------


def test_inner_newton_failure_is_a_status_and_a_warning(exam):
    # No Newton steps allowed: the conditional modes never count as converged.
    control = gj.Control(inner=InnerControl(maxiter=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = gj.glmer(SEED, exam, control=control)
    messages = [str(w.message) for w in caught]
    assert any("conditional modes did not converge" in t for t in messages)
    # Not converged, but not separated either: the check must not cry wolf.
    assert not any(issubclass(w.category, gj.SeparationWarning) for w in caught)
    assert not m.converged
    assert m.fit_info.status == "conditional modes did not converge"
    assert "Model failed to converge: conditional modes did not converge" in str(m.summary())
    assert _finite(m)


# -- prediction, immutability, pickling ----------------------------------------------------------


def test_predict_with_unseen_levels(seed_fit, exam):
    new = exam.head(4).assign(school=pd.Categorical(["new", "new", "1", "1"]))
    pred = seed_fit.predict(new, type="link")
    population = seed_fit.predict(new, re_form="~0", type="link")
    # Unseen levels get the population-level prediction; seen ones their random effect.
    np.testing.assert_allclose(pred[:2], population[:2])
    assert not np.allclose(pred[2:], population[2:])
    with pytest.raises(gj.DataError, match=r"levels of 'school' not in the fit: \['new'\]"):
        seed_fit.predict(new, allow_new_levels=False)


def test_nothing_the_caller_passed_is_modified(exam):
    data = exam.copy()
    data.loc[3, "schavg"] = np.nan
    weights = np.ones(len(data))
    offset = np.zeros(len(data))
    before = data.copy(), weights.copy(), offset.copy()
    with pytest.warns(UserWarning, match="dropped 1"):
        m = gj.glmer(SEED, data, weights=weights, offset=offset)
    m.predict(data.dropna())
    m.simulate(2, seed=1)
    pd.testing.assert_frame_equal(data, before[0])
    np.testing.assert_array_equal(weights, before[1])
    np.testing.assert_array_equal(offset, before[2])


def test_results_pickle(exam):
    sleep = gj.datasets.load_sleepstudy()
    m = gj.lmer("Reaction ~ Days + (Days | Subject)", sleep)
    m2 = pickle.loads(pickle.dumps(m))
    assert m2.deviance == m.deviance
    pd.testing.assert_frame_equal(m2.varcorr, m.varcorr)
    assert str(m2.summary()) == str(m.summary())
    np.testing.assert_allclose(m2.df_satterthwaite, m.df_satterthwaite)
