"""Several grouping factors: the blocked Cholesky against dense algebra, derivatives, lme4's
conventions (term order, nesting, observation-level factors) and results per factor.

The fits against lme4 are in test_reference.py (CROSSED_CASES).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import batch_fits, case_frame, fit_case, reference

import glmm_jax as gj
import glmm_jax.design as design_module
from glmm_jax.blocked import DenseCoupling, SparseCoupling
from glmm_jax.design import DataError, build_design
from glmm_jax.laplace import (
    _split,
    conditional_variances,
    deviance_and_gradient,
    laplace_deviance,
    linear_predictor,
    solve_modes,
    zero_modes,
)
from glmm_jax.optimize import Control


def crossed_frame(n=600, G1=40, G2=8, nested=False, seed=0):
    """Poisson counts with a random intercept and slope on ``a`` and an intercept on ``b``;
    ``b`` crosses ``a``, or is nested in it (three ``b`` levels per ``a``)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, G1, n)
    b = 3 * a + rng.integers(0, 3, n) if nested else rng.integers(0, G2, n)
    x = rng.normal(size=n)
    ua, sa = rng.normal(scale=0.6, size=G1), rng.normal(scale=0.3, size=G1)
    ub = rng.normal(scale=0.4, size=b.max() + 1)
    eta = 0.3 + 0.5 * x + ua[a] + sa[a] * x + ub[b]
    return pd.DataFrame(
        {"y": rng.poisson(np.exp(eta)), "x": x, "a": a.astype(str), "b": b.astype(str)}
    )


def _design(formula, data, layout=None, monkeypatch=None, family="poisson"):
    if layout == "sparse":
        monkeypatch.setattr(design_module, "MAX_DENSE_COUPLING", 0)
    elif layout == "dense":
        monkeypatch.setattr(design_module, "DENSE_COST_RATIO", 1e12)
    d = build_design(formula, data, gj.get_family(family))
    kind = {"dense": DenseCoupling, "sparse": SparseCoupling}.get(layout)
    if kind is not None:
        assert isinstance(d.arrays.coupling, kind)
    return d


def _dense_ZLambda(d, x, mask):
    """``Z Lambda`` as one dense ``(n, G Q + R)`` matrix, straight from the design's indices."""
    a = d.arrays
    _, T, T_rest = _split(x, a, d.structure, mask)
    ZT, ZTr = np.asarray(a.Z @ T), np.asarray(a.Zr @ T_rest)
    n, (G, Q) = a.X.shape[0], (a.level_mask.shape[0], a.Z.shape[1])
    R = sum(
        m.shape[0] * d.structure.factor_q(f)
        for m, f in zip(a.rest_levels, d.structure.factors[1:], strict=True)
    )
    M = np.zeros((n, G * Q + R))
    rows = np.arange(n)
    for j in range(Q):
        M[rows, a.group * Q + j] += ZT[:, j]
    rest = np.asarray(a.coupling.rest)
    for c in range(rest.shape[1]):
        M[rows, G * Q + rest[:, c]] += ZTr[:, c]
    return M


FORMULAS = ["y ~ x + (1 | a) + (1 | b)", "y ~ x + (x | a) + (1 | b)", "y ~ x + (1 | a) + (x | b)"]


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("formula", FORMULAS)
def test_blocked_algebra_equals_dense_algebra(formula, layout, monkeypatch):
    """Modes, deviance and conditional variances from the blocked factorisation against the
    same quantities from one dense Hessian."""
    d = _design(formula, crossed_frame(), layout, monkeypatch)
    fam, st = d.family, d.structure
    with jax.enable_x64(True):
        a = jax.tree_util.tree_map(jnp.asarray, d.arrays)
        x = jnp.asarray(np.r_[0.2, 0.4, np.linspace(-0.6, -0.2, st.n_theta)])
        mask = jnp.ones(st.n_theta)
        u, _, converged = solve_modes(
            x, a, zero_modes(a, st, x.dtype), mask, fam, st, Control().inner
        )
        assert bool(converged)
        dev = float(laplace_deviance(x, a, u, mask, fam, st))
        condvar = conditional_variances(x, u, a, mask, fam, st)
        eta = np.asarray(linear_predictor(x, u, a, st, mask)[0])
        W = np.asarray(a.weights * fam.fisher_weight(a.trials, jnp.asarray(eta)))
        d1 = np.asarray(a.weights * fam.score(a.y, a.trials, jnp.asarray(eta)))
        kernel = np.asarray(a.weights * fam.loglik_kernel(a.y, a.trials, jnp.asarray(eta)))
        M = _dense_ZLambda(d, x, mask)
        eta_fixed = np.asarray(a.X @ x[:2] + a.offset)
    u_flat = np.concatenate([np.asarray(u[0]).ravel(), np.asarray(u[1])])
    # Stationarity of the inner problem, and eta, from the dense matrix.
    np.testing.assert_allclose(u_flat - M.T @ d1, 0.0, atol=1e-6)
    np.testing.assert_allclose(eta, eta_fixed + M @ u_flat, atol=1e-10)
    H = M.T @ (W[:, None] * M) + np.eye(M.shape[1])
    dense_dev = -2 * kernel.sum() + u_flat @ u_flat + np.linalg.slogdet(H)[1]
    assert dev == pytest.approx(dense_dev, rel=1e-12)
    # Conditional covariances: the diagonal blocks of H^{-1} on the b scale.
    H_inv = np.linalg.inv(H)
    blocks = st.lambda_blocks(np.asarray(st.theta_from_phi(np.asarray(x[2:]))))
    offset = 0
    for T, V in zip(blocks, condvar, strict=True):
        G_k, q = V.shape[:2]
        for g in range(G_k):
            idx = offset + g * q + np.arange(q)
            np.testing.assert_allclose(V[g], T @ H_inv[np.ix_(idx, idx)] @ T.T, atol=1e-10)
        offset += G_k * q


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_gradient_and_hessian_match_finite_differences(layout, monkeypatch):
    d = _design("y ~ x + (x | a) + (1 | b)", crossed_frame(), layout, monkeypatch)
    fam, st = d.family, d.structure
    with jax.enable_x64(True):
        a = jax.tree_util.tree_map(jnp.asarray, d.arrays)
        mask = jnp.ones(st.n_theta)
        u0 = zero_modes(a, st, jnp.float64)

        def f(x):
            u = solve_modes(x, a, u0, mask, fam, st, Control().inner)[0]
            return laplace_deviance(x, a, jax.lax.stop_gradient(u), mask, fam, st)

        def gradient(x):
            u = solve_modes(x, a, u0, mask, fam, st, Control().inner)[0]
            return deviance_and_gradient(x, a, jax.lax.stop_gradient(u), mask, fam, st)[1]

        x = jnp.asarray([0.2, 0.4, -0.5, 0.1, -0.8, -0.9])
        f_jit, g_jit = jax.jit(f), jax.jit(gradient)
        g = g_jit(x)
        H = jax.jit(jax.jacfwd(gradient))(x)
        h, eye = 1e-5, np.eye(x.size)
        g_fd = np.array([(f_jit(x + h * e) - f_jit(x - h * e)) / (2 * h) for e in eye])
        H_fd = np.array([(g_jit(x + h * e) - g_jit(x - h * e)) / (2 * h) for e in eye])
    np.testing.assert_allclose(g, g_fd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(H, H_fd, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(H, H.T, atol=1e-8)


def test_nested_layouts_agree_and_match_the_interaction_spelling(monkeypatch):
    """A nested design fits the same through both layouts, and ``(1 | a/b)`` is
    ``(1 | b:a) + (1 | a)`` with lme4's names."""
    data = crossed_frame(n=500, G1=30, nested=True)
    fits = {}
    for layout in ("sparse", "dense"):
        with monkeypatch.context() as mp:
            d = _design("y ~ x + (1 | a/b)", data, layout, mp)
            fits[layout] = gj.fit.fit_design(d)
    sparse, dense = fits["sparse"], fits["dense"]
    assert sparse.loglik == pytest.approx(dense.loglik, abs=1e-8)
    np.testing.assert_allclose(sparse.theta, dense.theta, atol=1e-6)
    assert list(sparse.ngroups) == ["b:a", "a"]
    explicit = gj.glmer("y ~ x + (1 | a) + (1 | b:a)", data, family="poisson")
    assert explicit.loglik == pytest.approx(sparse.loglik, abs=1e-8)
    assert sparse.ranef["b:a"].index[0].endswith(":" + sparse.ranef["b:a"].index[0].split(":")[1])


def test_grouseticks_nested_spelling_matches_lme4():
    """BROOD is nested in LOCATION, so ``(1 | LOCATION/BROOD)`` is the reference model."""
    ref, m = reference("grouseticks_pois"), fit_case("grouseticks_pois")
    nested = gj.glmer(
        "TICKS ~ YEAR + cHEIGHT + (1 | INDEX) + (1 | LOCATION/BROOD)",
        case_frame("grouseticks_pois"),
        family="poisson",
    )
    assert nested.loglik == pytest.approx(m.loglik, abs=1e-6)
    assert nested.loglik >= ref["loglik"] - 1e-4
    assert nested.ngroups == {"INDEX": 403, "BROOD:LOCATION": 118, "LOCATION": 63}


def test_term_order_follows_lme4():
    """lme4 orders random terms by decreasing number of levels, whatever the formula's order."""
    m = fit_case("verbagg_crossed")
    swapped = gj.glmer(
        "r2 ~ Anger + Gender + btype + situ + (1 | item) + (1 | id)",
        case_frame("verbagg_crossed"),
        family="binomial",
    )
    assert swapped.loglik == pytest.approx(m.loglik, abs=1e-8)
    np.testing.assert_allclose(swapped.theta, m.theta, atol=1e-7)
    assert list(swapped.varcorr.grp) == ["id", "item"] == list(swapped.ngroups)


def test_observation_level_factor_rules():
    data = crossed_frame(n=200).assign(obs=lambda d: np.arange(len(d)).astype(str))
    counts = gj.glmer("y ~ x + (1 | a) + (1 | obs)", data, family="poisson")
    assert counts.converged and counts.ngroups["obs"] == 200
    binary = data.assign(y=(data["y"] > 1).astype(int))
    with pytest.raises(DataError, match="'obs' has one level per observation"):
        gj.glmer("y ~ x + (1 | a) + (1 | obs)", binary, family="binomial")
    # Binomial counts with several trials identify it (cbpp_obs matches lme4).
    assert fit_case("cbpp_obs").ngroups["obs"] == 56


def test_single_level_factor_refused():
    data = crossed_frame(n=100).assign(one="only")
    with pytest.raises(DataError, match="'one' has 1 level"):
        gj.glmer("y ~ x + (1 | a) + (1 | one)", data, family="poisson")


def test_too_many_effects_outside_the_largest_factor_refused():
    n = 45_000
    data = pd.DataFrame({"y": np.ones(n), "a": np.arange(n) // 2, "b": np.arange(n) % 21_000})
    with pytest.raises(DataError, match="21000 random effects lie outside .* at most 20000"):
        build_design("y ~ 1 + (1 | a) + (1 | b)", data, gj.get_family("poisson"))


def test_results_per_factor():
    m = fit_case("sim_pois_crossed_offset")
    df = case_frame("sim_pois_crossed_offset")
    assert set(m.ranef) == {"site", "year"} == set(m.condvar) == set(m.ranef_sd)
    assert set(m.ranef_frame().grpvar) == {"site", "year"}
    assert "groups:  site, 300; year, 12" in str(m.summary())
    # Conditional prediction adds each factor's mode to the population-level prediction.
    rows = df.iloc[:3]
    expected = (
        m.predict(rows, re_form="~0")
        + m.ranef["site"].loc[rows["site"], "(Intercept)"].to_numpy()
        + m.ranef["year"].loc[rows["year"], "(Intercept)"].to_numpy()
    )
    np.testing.assert_allclose(m.predict(rows), expected, atol=1e-10)
    np.testing.assert_allclose(m.predict(df), m.predict(), atol=1e-10)
    # A new level of one factor drops that factor's effect only.
    new = rows.assign(site="new site")
    pop_year = m.predict(rows, re_form="~0") + m.ranef["year"].loc[rows["year"]].to_numpy()[:, 0]
    np.testing.assert_allclose(m.predict(new), pop_year, atol=1e-10)
    with pytest.raises(DataError, match="levels of 'site' not in the fit"):
        m.predict(new, allow_new_levels=False)
    sims = m.simulate(3, seed=1)
    assert sims.shape == (len(df), 3)
    assert np.all(sims.to_numpy() >= 0)
    # Fresh effects of both factors: the simulated totals spread like the data's, not wildly.
    assert 0.2 < sims.sum().mean() / df["count"].sum() < 5


def test_vmap_and_lax_map_equal_separate_fits_with_crossed_factors():
    data = crossed_frame(n=400, G1=30, G2=6)
    formula = "y ~ x + (1 | a) + (1 | b)"
    m = gj.glmer(formula, data, family="poisson")
    sims = m.simulate(2, seed=3)
    by_vmap, by_map = batch_fits(m._design, sims)
    for r in range(2):
        single = gj.glmer(formula, data.assign(y=sims.iloc[:, r].to_numpy()), family="poisson")
        for batch in (by_vmap, by_map):
            assert -0.5 * float(batch.deviance[r]) == pytest.approx(single.loglik, abs=1e-8)
