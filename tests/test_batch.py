"""Batches of fits (fit_batch, refit_batch), simulation, the parametric bootstrap and power."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import glmm_jax as gj
from glmm_jax.design import DataError

SEED = "success ~ schavg + (1 | school)"


@pytest.fixture(scope="module")
def sleepstudy():
    return gj.datasets.load_sleepstudy()


@pytest.fixture(scope="module")
def seed_model(exam):
    return gj.glmer(SEED, exam)


@pytest.fixture(scope="module")
def sims(seed_model):
    return seed_model.simulate(nsim=6, seed=11)


def test_batch_equals_one_at_a_time(exam, sims):
    """fit_batch from a formula runs the same compiled fit as glmer, replicate by replicate."""
    batch = gj.fit_batch(SEED, exam.drop(columns="success"), sims.to_numpy(), progress=False)
    assert batch.nsim == 6 and batch.converged.all()
    for i in range(6):
        one = gj.glmer(SEED, exam.assign(success=sims.iloc[:, i]))
        assert batch.loglik[i] == pytest.approx(one.loglik, abs=1e-8)
        np.testing.assert_allclose(batch.fixef.iloc[i], one.fixef, atol=1e-8)
        np.testing.assert_allclose(batch.se.iloc[i], one.se, rtol=1e-6)
        np.testing.assert_allclose(batch.theta[i], one.theta, atol=1e-8)
        assert batch.varcorr["sd__(Intercept)|school"][i] == pytest.approx(one.theta[0])


def test_refit_takes_newton_steps_from_the_fitted_start(exam):
    """refit_batch starts at the fitted model and goes straight to Newton; it reaches the
    optima that L-BFGS first reaches. On 10 schools these three replicates used to stop at
    the iteration limit short of the optimum: BFGS updates kept the negative curvature of
    an indefinite first Hessian."""
    small = exam[exam.school.isin(exam.school.unique()[:10])]
    m = gj.glmer(SEED, small)
    Y = m.simulate(nsim=200, seed=1).iloc[:, [2, 155, 198]]
    newton = m.refit_batch(Y, progress=False)
    lbfgs = m.refit_batch(Y, progress=False, control=gj.Control(lbfgs_maxiter=100))
    assert newton.converged.all() and lbfgs.converged.all()
    assert np.all(np.asarray(newton._out.lbfgs_iterations) == 0)
    np.testing.assert_allclose(newton.loglik, lbfgs.loglik, atol=1e-8)
    np.testing.assert_allclose(newton.theta, lbfgs.theta, atol=1e-5)


@pytest.mark.filterwarnings("ignore::glmm_jax.SingularFitWarning")
def test_lmm_batch_equals_lmer(sleepstudy):
    formula = "Reaction ~ Days + (Days | Subject)"
    m = gj.lmer(formula, sleepstudy)
    Y = m.simulate(nsim=3, seed=5)
    batch = m.refit_batch(Y, progress=False)
    assert batch.reml and batch.converged.all()
    for i in range(3):
        one = gj.lmer(formula, sleepstudy.assign(Reaction=Y.iloc[:, i]))
        assert batch.loglik[i] == pytest.approx(one.loglik, abs=1e-6)
        np.testing.assert_allclose(batch.fixef.iloc[i], one.fixef, rtol=1e-6)
        np.testing.assert_allclose(batch.se.iloc[i], one.se, rtol=1e-5)
        assert batch.sigma[i] == pytest.approx(one.sigma, rel=1e-6)
        vc = one.varcorr
        sd_days = vc[(vc.grp == "Subject") & (vc.var1 == "Days") & vc.var2.isna()].sdcor
        assert batch.varcorr["sd__Days|Subject"][i] == pytest.approx(float(sd_days.iloc[0]), 1e-5)
    cor = batch.varcorr["cor__(Intercept).Days|Subject"]
    assert np.all(np.abs(cor) <= 1)


def test_results_layout_and_tidy_frame(seed_model, sims):
    batch = seed_model.refit_batch(sims, progress=False)
    assert list(batch.fixef.columns) == ["(Intercept)", "schavg"]
    assert batch.se.shape == (6, 2) and batch.theta.shape == (6, 1)
    assert list(batch.varcorr.columns) == ["sd__(Intercept)|school"]
    assert (batch.status == gj.Status.CONVERGED).all() and (batch.iterations > 0).all()
    assert list(batch.status_names.unique()) == ["converged"]
    tidy = batch.to_frame()
    assert len(tidy) == 6 * 3
    assert list(tidy.columns) == [
        "replicate",
        "effect",
        "term",
        "estimate",
        "std_error",
        "loglik",
        "converged",
        "status",
    ]
    row = tidy[(tidy.replicate == 2) & (tidy.term == "schavg")].iloc[0]
    assert (
        row.estimate == batch.fixef.loc[2, "schavg"] and row.std_error == batch.se.loc[2, "schavg"]
    )
    assert np.isnan(tidy[tidy.effect == "ran_pars"].std_error).all()
    assert batch.estimates().shape == (6, 3)


def test_a_failed_replicate_keeps_its_status_and_nans(exam):
    """A response whose deviance overflows fails alone; the others fit."""
    d = gj.build_design("y ~ schavg + (1 | school)", exam.assign(y=1.0), gj.poisson())
    Y = np.full((d.nobs, 3), 2.0)
    Y[:, 1] = 1e308
    batch = gj.fit_batch_design(d, Y, progress=False)
    assert batch.status_names.tolist() == ["converged", "non-finite", "converged"]
    assert batch.fixef.iloc[1].isna().all() and np.isnan(batch.loglik[1])
    assert np.isfinite(batch.loglik[[0, 2]]).all()


def test_chunks_and_seeds_are_deterministic(seed_model):
    """The same seed gives the same replicates, simulated at once or in pieces, and fitting
    in chunks of any size gives the same estimates."""
    d = seed_model._design
    beta, theta = seed_model.fixef.to_numpy(), seed_model.theta
    Y = gj.simulate_responses(d, beta, theta, nsim=10, seed=3)
    np.testing.assert_array_equal(Y, gj.simulate_responses(d, beta, theta, nsim=10, seed=3))
    np.testing.assert_array_equal(
        Y[:, 4:], gj.simulate_responses(d, beta, theta, nsim=6, seed=3, start=4)
    )
    assert not np.array_equal(Y, gj.simulate_responses(d, beta, theta, nsim=10, seed=4))
    a = seed_model.refit_batch(Y, progress=False)
    b = seed_model.refit_batch(Y, chunk_size=3, progress=False)
    np.testing.assert_array_equal(a.fixef.to_numpy(), b.fixef.to_numpy())


def test_simulated_responses_follow_the_model(seed_model, sleepstudy):
    Y = seed_model.simulate(nsim=200, seed=1).to_numpy()
    assert set(np.unique(Y)) == {0.0, 1.0}
    # The mean success rate matches the data's (the model reproduces the margin).
    assert Y.mean() == pytest.approx(seed_model._design.y_mean.mean(), abs=0.02)
    m = gj.lmer("Reaction ~ Days + (Days | Subject)", sleepstudy)
    S = m.simulate(nsim=400, seed=2).to_numpy()
    # Within-subject spread on day 0: residual plus intercept variance.
    vc = m.varcorr
    sd0 = vc[(vc.grp == "Subject") & (vc.var1 == "(Intercept)") & vc.var2.isna()].sdcor.iloc[0]
    day0 = (sleepstudy.Days == 0).to_numpy()
    assert S[day0].std() == pytest.approx(np.hypot(sd0, m.sigma), rel=0.08)


def test_response_errors_name_the_problem(seed_model, exam):
    d = seed_model._design
    with pytest.raises(DataError, match="one row per observation"):
        gj.fit_batch_design(d, np.zeros((10, 2)))
    bad = np.zeros((d.nobs, 2))
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match=r"replicates \[1\]"):
        gj.fit_batch_design(d, bad)
    with pytest.raises(DataError, match=r"binomial responses must be in \[0, 1\]"):
        gj.fit_batch_design(d, np.full((d.nobs, 1), 2.0))
    pois = gj.build_design("y ~ schavg + (1 | school)", exam.assign(y=1.0), gj.poisson())
    with pytest.raises(DataError, match="non-negative"):
        gj.fit_batch_design(pois, -np.ones((pois.nobs, 1)))
    with pytest.raises(DataError, match="one row per observation"):
        gj.fit_batch(SEED, exam.drop(columns="success"), np.zeros((5, 2)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bootstrap_intervals_are_close_to_wald(seed_model):
    boot = gj.bootstrap(seed_model, nsim=200, seed=7, progress=False)
    assert boot.nsim == 200 and boot.n_failed == 0
    ci = boot.confint(0.95)
    assert list(ci.columns) == ["2.5 %", "97.5 %"]
    assert list(ci.index) == ["(Intercept)", "schavg", "sd__(Intercept)|school"]
    for name in ["(Intercept)", "schavg"]:
        est, se = seed_model.fixef[name], seed_model.se[name]
        width = 2 * 1.96 * se
        assert ci.loc[name, "2.5 %"] == pytest.approx(est - 1.96 * se, abs=0.15 * width)
        assert ci.loc[name, "97.5 %"] == pytest.approx(est + 1.96 * se, abs=0.15 * width)
        assert boot.std_error()[name] == pytest.approx(se, rel=0.2)
    # The variance component's interval covers the estimate, and the bias is small.
    sd = seed_model.theta[0]
    assert ci.iloc[2, 0] < sd < ci.iloc[2, 1]
    assert abs(boot.bias()["sd__(Intercept)|school"]) < 0.1 * sd
    assert boot.to_frame().replicate.nunique() == 200


def test_power_of_a_null_effect_is_near_the_test_size(exam):
    pw = gj.power(
        SEED,
        exam.drop(columns="success"),
        fixef={"(Intercept)": 0.0, "schavg": 0.0},
        varcorr={"school": 0.5},
        test="schavg",
        nsim=200,
        seed=2,
        progress=False,
    )
    row = pw.table.iloc[0]
    assert row.nsim == 200 and row.failed == 0
    assert 0.01 <= row.power <= 0.11
    assert row.lower <= 0.05 <= row.upper
    assert "wald test of 'schavg'" in repr(pw)


def test_power_curve_and_likelihood_ratio_test(exam):
    schools = exam["school"].unique()

    def make(k):
        return exam[exam["school"].isin(schools[:k])].drop(columns="success")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pw = gj.power(
            SEED,
            make,
            sizes=[20, 65],
            fixef={"(Intercept)": 0.0, "schavg": 1.0},
            varcorr={"school": 0.4},
            test="schavg",
            method="lrt",
            nsim=40,
            seed=1,
            progress=False,
        )
    t = pw.table
    assert list(t["size"]) == [20, 65] and (t.nsim == 40).all()
    assert (t.lower <= t.power).all() and (t.power <= t.upper).all()
    # A large effect on all 65 schools is found almost always.
    assert t.power.iloc[1] > 0.85


def test_power_input_errors(exam):
    kw = dict(varcorr={"school": 0.5}, test="schavg", nsim=5, progress=False)
    with pytest.raises(DataError, match=r"missing \['schavg'\]"):
        gj.power(SEED, exam, fixef={"(Intercept)": 0.0}, **kw)
    with pytest.raises(DataError, match="every grouping factor"):
        gj.power(SEED, exam, fixef={"(Intercept)": 0, "schavg": 0}, **{**kw, "varcorr": {"x": 1}})
    with pytest.raises(DataError, match="not a term"):
        gj.power(
            SEED, exam, fixef={"(Intercept)": 0, "schavg": 0}, method="lrt", **{**kw, "test": "z"}
        )
    with pytest.raises(ValueError, match="sigma"):
        gj.power(
            "y ~ x + (1 | g)",
            pd.DataFrame({"x": np.arange(20.0), "g": np.repeat(list("abcd"), 5)}),
            fixef={"(Intercept)": 0, "x": 0},
            varcorr={"g": 1.0},
            family="gaussian",
            test="x",
            nsim=5,
        )


def test_replicates_shard_over_devices():
    """With four (forced) CPU devices, the batch is split over them by shard_map and gives the
    single-device results."""
    code = (
        "import json, numpy as np, jax, glmm_jax as gj\n"
        "assert len(jax.devices()) == 4\n"
        "exam = gj.datasets.load_exam()\n"
        "m = gj.glmer('success ~ schavg + (1 | school)', exam)\n"
        "b = m.refit_batch(m.simulate(nsim=10, seed=4), progress=False)\n"
        "print(json.dumps(b.loglik.tolist()))\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    sharded = json.loads(run.stdout.strip().splitlines()[-1])
    m = gj.glmer(SEED, gj.datasets.load_exam())
    here = m.refit_batch(m.simulate(nsim=10, seed=4), progress=False)
    np.testing.assert_allclose(sharded, here.loglik, atol=1e-8)


def test_power_for_a_linear_mixed_model(sleepstudy):
    """The gaussian path: REML Wald test, sigma given, a covariance matrix for a vector term."""
    pw = gj.power(
        "Reaction ~ Days + (Days | Subject)",
        sleepstudy.drop(columns="Reaction"),
        fixef={"(Intercept)": 250.0, "Days": 10.0},
        varcorr={"Subject": np.array([[600.0, 10.0], [10.0, 35.0]])},
        sigma=25.0,
        family="gaussian",
        test="Days",
        nsim=30,
        seed=3,
        progress=False,
    )
    # Days: 10 +- ~1.5 with 18 subjects, so it is found every time.
    assert pw.table.power.iloc[0] == 1.0 and pw.table.failed.iloc[0] == 0
