"""Estimates against lme4 1.1-31 (tests/reference, copied from shared/reference).

Tolerances (tests/reference/README.md): a correct fit has loglik >= lme4's - 1e-4; where lme4
converged without warnings, estimates match it. Fixed effects are compared in units of their
standard error (a difference of 1% of an SE is statistically nothing, and is about what lme4's
own stopping rule leaves); standard errors within 2%, since lme4 takes its Hessian by finite
differences and ours is exact. Where lme4 warned, its estimates are compared more loosely: the
higher optimum wins.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import CROSSED_CASES, GLMER_CASES, LMM_CASES, fit_case, reference

CASES = GLMER_CASES + CROSSED_CASES + LMM_CASES


def r_name(name: str | None) -> str | None:
    """formulaic's column name as R writes it: ``period[T.2]`` -> ``period2``, ``**`` -> ``^``."""
    if name is None:
        return None
    return re.sub(r"\[T\.(.*?)\]", r"\1", name).replace("**", "^").replace(" ", "")


def _warned(ref) -> bool:
    msgs = ref["conv_messages"]
    return bool(msgs) and not ref["singular"]


@pytest.mark.parametrize("case", CASES)
def test_loglik_at_least_lme4(case):
    ref, m = reference(case), fit_case(case)
    assert m.loglik >= ref["loglik"] - 1e-4
    # Not wildly above either: that would mean a different likelihood, not a better optimum.
    assert m.loglik - ref["loglik"] < 5e-3
    assert m.converged
    assert m.nobs == ref["nobs"]
    assert m.ngroups == ref["ngroups"]
    assert m.df_resid == ref["df_resid"]
    assert m.aic == pytest.approx(-2 * m.loglik + 2 * (ref["nobs"] - ref["df_resid"]))
    assert m.aic == pytest.approx(ref["AIC"], abs=0.01)
    assert m.bic == pytest.approx(ref["BIC"], abs=0.01)


@pytest.mark.parametrize("case", CASES)
def test_fixed_effects_and_standard_errors(case):
    ref, m = reference(case), fit_case(case)
    se_ref = np.asarray(ref["se"])
    tol = 0.05 if _warned(ref) else 0.01
    names = np.atleast_1d(ref["fixef_names"])
    assert [r_name(n) for n in m.fixef.index] == [n.replace(" ", "") for n in names]
    np.testing.assert_array_less(np.abs(m.fixef.to_numpy() - ref["fixef"]) / se_ref, tol)
    np.testing.assert_allclose(m.se.to_numpy(), se_ref, rtol=0.02)
    np.testing.assert_allclose(
        m.vcov.to_numpy(), np.asarray(ref["vcov_fixef"]), rtol=0.05, atol=1e-3 * se_ref.max() ** 2
    )


@pytest.mark.parametrize("case", CASES)
def test_variance_components(case):
    ref, m = reference(case), fit_case(case)
    theta = np.atleast_1d(ref["theta"])
    np.testing.assert_allclose(m.theta, theta, atol=2e-3 if _warned(ref) else 1e-3)
    assert m.singular == ref["singular"]
    vc = m.varcorr
    for row, r in zip(vc.itertuples(), ref["varcorr"], strict=True):
        assert row.grp == r["grp"]
        assert r_name(row.var1) == r["var1"]
        # Absolute on GLMM scales; relative for LMM variances in the response's units.
        assert row.vcov == pytest.approx(r["vcov"], rel=1e-3, abs=2e-3)
        assert row.sdcor == pytest.approx(r["sdcor"], rel=1e-3, abs=2e-3)


@pytest.mark.parametrize("case", CASES)
def test_conditional_modes_and_sds(case):
    ref, m = reference(case), fit_case(case)
    for factor, r in ref["ranef"].items():
        # Align by level label: order can differ where R sorted integer codes numerically.
        modes = m.ranef[factor].set_axis(m.ranef[factor].index.astype(str)).loc[r["levels"]]
        sds = m.ranef_sd[factor].set_axis(m.ranef_sd[factor].index.astype(str)).loc[r["levels"]]
        assert [r_name(c) for c in modes.columns] == list(np.atleast_1d(r["terms"]))
        shape = modes.shape
        np.testing.assert_allclose(modes.to_numpy(), np.reshape(r["modes"], shape), atol=5e-3)
        np.testing.assert_allclose(sds.to_numpy(), np.reshape(r["condsd"], shape), atol=5e-3)


def test_singular_fit_is_exactly_on_the_boundary():
    m = fit_case("sim_singular_binom")
    assert m.theta[0] == 0.0
    assert m.varcorr.vcov.iloc[0] == 0.0
    assert np.all(m.ranef["g"].to_numpy() == 0.0)
    assert "singular" in str(m.summary())


def test_weights_and_cbind_give_the_same_fit():
    a, b = fit_case("cbpp_cbind"), fit_case("cbpp_weights")
    assert a.loglik == pytest.approx(b.loglik, abs=1e-8)
    np.testing.assert_allclose(a.fixef.to_numpy(), b.fixef.to_numpy(), atol=1e-6)
