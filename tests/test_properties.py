"""Property-based tests (hypothesis) over small random data and formulas: every fit ends in an
error of ours that names the problem, or in a result whose numbers are finite unless a warning
says why. Never an internal error (a JAX trace, a KeyError), never a silent NaN, and never a
change to the caller's data.

The examples are derandomised so that CI sees the same ones on every run; set
``HYPOTHESIS_PROFILE=explore`` to draw new ones (and more of them). Shapes are kept small
(at most 60 rows and 8 groups, one padded size) so that the examples share a few compiled
programs: compilation, not fitting, is what they cost.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import glmm_jax as gj

settings.register_profile(
    "ci",
    max_examples=15,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FORMULAS = ["y ~ x + (1 | g)", "y ~ x + c + (1 | g)", "y ~ x + (x | g)", "y ~ c + (1 | g/c)"]
FAMILIES = ["binomial", "poisson", "gaussian"]
#: What may go wrong with a covariate or a response; "none" weighs as much as the others
#: together, so that about half the examples reach a fit.
X_FLAWS = ["none"] * 5 + ["nan", "inf", "constant", "huge", "tiny"]
Y_FLAWS = ["none"] * 6 + ["nan", "inf", "negative", "fraction", "constant", "string"]


@st.composite
def problems(draw):
    """A small data frame with possible flaws, a formula and a family."""
    n = draw(st.integers(4, 60))
    n_groups = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    family = draw(st.sampled_from(FAMILIES))
    formula = draw(st.sampled_from(FORMULAS))
    x_flaw, y_flaw = draw(st.sampled_from(X_FLAWS)), draw(st.sampled_from(Y_FLAWS))

    g = rng.integers(0, n_groups, n)
    x = rng.normal(size=n)
    eta = 0.5 * x + rng.normal(size=n_groups)[g]
    if family == "binomial":
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    elif family == "poisson":
        y = rng.poisson(np.exp(eta)).astype(float)
    else:
        y = eta + rng.normal(size=n)
    rows = rng.choice(n, size=max(1, n // 10), replace=False)
    if x_flaw in ("nan", "inf"):
        x[rows] = np.nan if x_flaw == "nan" else np.inf
    elif x_flaw == "constant":
        x[:] = 2.0
    elif x_flaw in ("huge", "tiny"):
        x *= 1e4 if x_flaw == "huge" else 1e-4
    if y_flaw in ("nan", "inf"):
        y[rows] = np.nan if y_flaw == "nan" else np.inf
    elif y_flaw == "negative":
        y[rows] = -1.0
    elif y_flaw == "fraction":
        y[rows] += 0.5
    elif y_flaw == "constant":
        y[:] = y[0]
    frame = pd.DataFrame(
        {
            "y": y.astype(str) if y_flaw == "string" else y,
            "x": x,
            "g": [f"g{k}" for k in g],
            "c": rng.choice(["a", "b", "c"], n),
        }
    )
    return frame, formula, family


def _fit(formula, data, family):
    if family == "gaussian":
        return gj.lmer(formula, data)
    return gj.glmer(formula, data, family=family)


@given(problems())
def test_a_fit_ends_in_a_named_error_or_an_honest_result(problem):
    data, formula, family = problem
    before = data.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            m = _fit(formula, data, family)
        except (gj.DataError, gj.FormulaError) as err:
            # Ours, with a message a person can act on (no JAX or formulaic internals).
            text = str(err)
            event(f"refused: {type(err).__name__}")
            assert len(text) > 20 and "Traceback" not in text and "jax" not in text.lower()
            m = None
    pd.testing.assert_frame_equal(data, before)
    if m is None:
        return
    event(f"fitted ({family}, {'converged' if m.converged else 'not converged'})")
    numbers = np.concatenate([[m.loglik], m.fixef, m.se, m.theta])
    if not np.all(np.isfinite(numbers)):
        # A NaN or infinity must come with a warning: the fit did not converge, or its
        # Hessian is singular (standard errors not available).
        assert any(issubclass(w.category, gj.ConvergenceWarning) for w in caught), (
            f"silent non-finite result for {formula!r} ({family}): {numbers}"
        )
        estimates = np.concatenate([[m.loglik], m.fixef, m.theta])
        if not np.all(np.isfinite(estimates)):
            assert not m.converged
    else:
        assert m.nobs <= len(data)
        assert np.all(m.theta[m._design.structure.diagonal] >= 0)
