"""The compiled core: exact derivatives, batching, compilation reuse, precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import batch_fits

import glmm_jax as gj
from glmm_jax.design import bucket, build_design
from glmm_jax.fit import _flat_fit
from glmm_jax.laplace import laplace_deviance, solve_modes, zero_modes
from glmm_jax.optimize import Control


def _design(formula, data, family="binomial", **kw):
    return build_design(formula, data, gj.get_family(family), **kw)


def _deviance_fn(design):
    arrays = jax.tree_util.tree_map(jnp.asarray, design.arrays)
    mask = jnp.ones(design.structure.n_theta)
    u0 = zero_modes(arrays, design.structure, arrays.X.dtype)
    inner = Control().inner

    def f(x):
        u = solve_modes(x, arrays, u0, mask, design.family, design.structure, inner)[0]
        return laplace_deviance(
            x, arrays, jax.lax.stop_gradient(u), mask, design.family, design.structure
        )

    return f


@pytest.mark.parametrize(
    "formula, family, link",
    [
        ("success ~ schavg + (1 | school)", "binomial", "logit"),
        ("success ~ standLRT + (standLRT | school)", "binomial", "probit"),
        ("success ~ standLRT + (1 | school) + (0 + standLRT | school)", "binomial", "cloglog"),
    ],
)
def test_gradient_and_hessian_match_finite_differences(exam, formula, family, link):
    d = build_design(formula, exam, gj.get_family(family, link))
    with jax.enable_x64(True):
        f = _deviance_fn(d)
        x = jnp.asarray(
            np.r_[np.linspace(-0.3, 0.4, d.p), np.linspace(-0.5, 0.2, d.structure.n_theta)]
        )
        f_jit, grad_jit = jax.jit(f), jax.jit(jax.grad(f))
        g = grad_jit(x)
        H = jax.jit(jax.hessian(f))(x)
        h = 1e-5
        eye = np.eye(x.size)
        g_fd = np.array([(f_jit(x + h * e) - f_jit(x - h * e)) / (2 * h) for e in eye])
        H_fd = np.array([(grad_jit(x + h * e) - grad_jit(x - h * e)) / (2 * h) for e in eye])
    np.testing.assert_allclose(g, g_fd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(H, H_fd, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(H, H.T, rtol=1e-8, atol=1e-8)


def _stacked_responses(exam, n_rep=3, seed=0):
    """Simulated 0/1 responses on the seed design, as padded arrays in fit order."""
    m = gj.glmer("success ~ schavg + (1 | school)", exam)
    sims = m.simulate(n_rep, seed=seed)
    return m, sims


def test_vmap_and_lax_map_equal_separate_fits(exam):
    m, sims = _stacked_responses(exam)
    d = _design("success ~ schavg + (1 | school)", exam)
    by_vmap, by_map = batch_fits(d, sims)
    for r in range(sims.shape[1]):
        data_r = exam.assign(success=sims.iloc[:, r].to_numpy())
        single = gj.glmer("success ~ schavg + (1 | school)", data_r)
        for batch in (by_vmap, by_map):
            assert -0.5 * float(batch.deviance[r]) == pytest.approx(single.loglik, abs=1e-8)
            beta = d.M @ np.asarray(batch.x[r, : d.p])
            np.testing.assert_allclose(beta, single.fixef.to_numpy(), rtol=1e-6, atol=1e-8)


def test_second_dataset_of_same_structure_does_not_recompile(exam):
    formula = "success ~ schavg + (1 | school)"
    gj.glmer(formula, exam)
    # A different dataset of the same structure and bucketed sizes: 60 fewer rows, another
    # response.
    rng = np.random.default_rng(7)
    other = exam.iloc[:-60].assign(success=lambda d: rng.permutation(d["success"].to_numpy()))
    assert bucket(len(other), 64) == bucket(len(exam), 64)
    assert other["school"].nunique() == exam["school"].nunique()
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        size_before = _flat_fit.cache_size()
        m = gj.glmer(formula, other)
        assert _flat_fit.cache_size() == size_before
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert m.nobs == len(other)


def test_float64_by_default_without_touching_global_flag(seed_fit):
    assert not jax.config.jax_enable_x64
    assert jnp.ones(1).dtype == jnp.float32
    assert seed_fit._design.arrays.X.dtype == np.float64


@pytest.mark.parametrize(
    "setup, env, synchronous",
    [
        ("", {}, True),  # imported first: synchronous
        ("", {"GLMM_JAX_SYNC_DISPATCH": "0"}, False),  # the user keeps JAX's default
        ("import jax.numpy as jnp; jnp.ones(1)\n", {}, False),  # JAX started first: untouched
    ],
)
def test_import_makes_cpu_dispatch_synchronous_while_that_is_still_open(setup, env, synchronous):
    """Importing glmm_jax turns JAX's asynchronous CPU dispatch off unless JAX has already
    started (then nothing changes, without error) or GLMM_JAX_SYNC_DISPATCH=0; fits agree."""
    import json
    import os
    import subprocess
    import sys

    code = setup + (
        "import json, jax, glmm_jax as gj\n"
        "m = gj.lmer('Reaction ~ Days + (Days | Subject)', gj.datasets.load_sleepstudy())\n"
        "print(json.dumps([jax.config.values['jax_cpu_enable_async_dispatch'], m.deviance]))\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "GLMM_JAX_SYNC_DISPATCH"}
    run = subprocess.run(
        [sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    asynchronous, deviance = json.loads(run.stdout.strip().splitlines()[-1])
    assert asynchronous is not synchronous
    assert deviance == pytest.approx(1743.6282719585, abs=1e-6)


def test_float32_option_close_to_float64(exam, seed_fit):
    m32 = gj.glmer("success ~ schavg + (1 | school)", exam, dtype="float32")
    assert m32._design.arrays.X.dtype == np.float32
    assert m32.converged, m32.fit_info
    assert m32.loglik == pytest.approx(seed_fit.loglik, abs=0.05)
    np.testing.assert_allclose(m32.fixef.to_numpy(), seed_fit.fixef.to_numpy(), atol=2e-3)
    with pytest.raises(ValueError, match="dtype"):
        gj.glmer("success ~ schavg + (1 | school)", exam, dtype="int8")


def test_bucket_sizes():
    assert bucket(1, 16) == 16
    assert bucket(4059, 64) == 4096
    assert bucket(4097, 64) == 5120
    for n in range(1, 5000, 37):
        b = bucket(n, 16)
        assert n <= b <= max(16, 1.25 * n + 1)


@pytest.mark.parametrize(
    "formula",
    ["normexam ~ standLRT + schavg + sex + (1 | school)", "normexam ~ 0 + standLRT + (1 | school)"],
)
def test_logdet_of_preconditioner(exam, formula):
    """``Design.logdet_M`` (from the triangular ``M``'s diagonal) is ``log |det M|``."""
    d = build_design(formula, exam, gj.gaussian())
    assert np.allclose(d.M, np.triu(d.M))
    assert d.logdet_M == pytest.approx(np.linalg.slogdet(d.M)[1], rel=1e-12, abs=1e-12)


def test_padding_changes_nothing(exam):
    """Padded rows and levels carry zero weight: the deviance equals the unpadded one."""
    d = _design("success ~ schavg + (1 | school)", exam)
    n, G = d.nobs, len(d.levels["school"])
    with jax.enable_x64(True):
        x = jnp.asarray([0.1, 0.2, -0.3])
        f_pad = _deviance_fn(d)(x)
        a = d.arrays
        trimmed = a._replace(
            X=a.X[:n],
            y=a.y[:n],
            trials=a.trials[:n],
            weights=a.weights[:n],
            offset=a.offset[:n],
            Z=a.Z[:n],
            group=a.group[:n],
            level_mask=a.level_mask[:G],
            Zr=a.Zr[:n],
            coupling=a.coupling._replace(
                rest=a.coupling.rest[:n], obs_pair=a.coupling.obs_pair[:n]
            ),
        )
        f_trim = _deviance_fn(d.__class__(**{**d.__dict__, "arrays": trimmed}))(x)
    assert float(f_pad) == pytest.approx(float(f_trim), rel=1e-12)


def test_start_values_are_used(exam, seed_fit):
    m = gj.glmer(
        "success ~ schavg + (1 | school)",
        exam,
        start={"fixef": seed_fit.fixef.to_numpy(), "theta": seed_fit.theta},
    )
    assert m.loglik == pytest.approx(seed_fit.loglik, abs=1e-8)
    assert m.fit_info.lbfgs_iterations <= 2
    with pytest.raises(ValueError, match="start"):
        gj.glmer("success ~ schavg + (1 | school)", exam, start={"fixef": [1.0]})


def test_data_frame_with_integer_groups_and_bool_response():
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(30), 20)
    x = rng.normal(size=g.size)
    eta = -0.5 + 0.8 * x + rng.normal(size=30)[g]
    df = pd.DataFrame({"y": rng.random(g.size) < 1 / (1 + np.exp(-eta)), "x": x, "g": g})
    m = gj.glmer("y ~ x + (1 | g)", df)
    assert m.converged and m.ngroups == {"g": 30}
    assert list(m.ranef["g"].index) == list(range(30))


def test_large_data_configuration_reaches_the_same_optimum(exam, seed_fit):
    """What big data get by default (Newton from the GLM start, BFGS between exact Hessians)
    against what small data get (L-BFGS first)."""
    big = Control(lbfgs_maxiter=0)
    m = gj.glmer("success ~ schavg + (1 | school)", exam, control=big)
    assert m.converged and m.fit_info.lbfgs_iterations == 0
    assert m.loglik == pytest.approx(seed_fit.loglik, abs=1e-8)
    np.testing.assert_allclose(m.fixef.to_numpy(), seed_fit.fixef.to_numpy(), rtol=1e-6)
    # Convergence is judged on an exact Hessian, so the standard errors agree too.
    np.testing.assert_allclose(m.se.to_numpy(), seed_fit.se.to_numpy(), rtol=1e-6)
    assert m.theta == pytest.approx(seed_fit.theta, rel=1e-6)


@pytest.mark.parametrize(
    "formula, family, link",
    [
        ("success ~ schavg + (1 | school)", "binomial", "logit"),
        ("success ~ standLRT + (standLRT | school)", "binomial", "probit"),
        ("success ~ standLRT + (1 | school) + (0 + standLRT | school)", "binomial", "cloglog"),
        ("success ~ schavg + (1 | school)", "binomial", "cauchit"),
        ("normexam ~ standLRT + (1 | school)", "poisson", "sqrt"),
    ],
)
def test_adjoint_gradient_equals_autodiff(exam, formula, family, link):
    """deviance_and_gradient's hand-derived adjoint, and its forward derivative, against
    reverse-mode autodiff of laplace_deviance, inside and on the boundary (theta_1 = 0)."""
    from glmm_jax.laplace import deviance_and_gradient

    data = exam.assign(normexam=np.round(np.abs(exam["normexam"]) * 3))
    d = build_design(formula, data, gj.get_family(family, link))
    nt = d.structure.n_theta
    with jax.enable_x64(True):
        a = jax.tree_util.tree_map(jnp.asarray, d.arrays)
        x = jnp.asarray(np.r_[np.linspace(-0.3, 0.4, d.p), np.linspace(-0.5, 0.2, nt)])
        if family == "poisson":
            x = x.at[0].set(1.0)
        for mask in (jnp.ones(nt), jnp.asarray(np.r_[0.0, np.ones(nt - 1)])):
            u0 = zero_modes(a, d.structure, a.X.dtype)
            u = solve_modes(x, a, u0, mask, d.family, d.structure, Control().inner)[0]

            def auto(xx, mask=mask, u=u):
                return laplace_deviance(xx, a, u, mask, d.family, d.structure)

            def adjoint(xx, mask=mask, u=u):
                return deviance_and_gradient(xx, a, u, mask, d.family, d.structure)

            # Compiled: op by op, the Hessians dispatch thousands of small programs.
            v, g = jax.jit(adjoint)(x)
            assert float(v) == pytest.approx(float(jax.jit(auto)(x)), rel=1e-12)
            np.testing.assert_allclose(g, jax.jit(jax.grad(auto))(x), rtol=1e-8, atol=1e-8)
            H = jax.jit(jax.jacfwd(lambda xx, adjoint=adjoint: adjoint(xx)[1]))(x)
            np.testing.assert_allclose(H, jax.jit(jax.hessian(auto))(x), rtol=1e-7, atol=1e-7)


def test_flat_output_call_equals_plain_jit(exam):
    """``FlatJit`` gives back the plain program's PyTree: same structure, dtypes and values
    (integer counters included), also when its recorded layout is missing (fallback)."""
    from glmm_jax._config import precision
    from glmm_jax.fit import _flat_fit

    d = _design("success ~ schavg + (1 | school)", exam)
    static = {"family": d.family, "structure": d.structure, "control": Control()}
    with precision():
        flat = _flat_fit(d.arrays, None, **static)
        plain = jax.tree_util.tree_map(np.asarray, _flat_fit.plain(d.arrays, None, **static))
        saved = dict(_flat_fit._layouts)
        _flat_fit._layouts.clear()
        try:
            fallback = _flat_fit(d.arrays, None, **static)
        finally:
            _flat_fit._layouts.update(saved)
    for got in (flat, fallback):
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(plain)
        leaves = zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(plain), strict=True)
        for a, b in leaves:
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
            # Two programs: XLA may fuse them differently, so floats to rounding only.
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert int(flat.newton_iterations) > 0 and flat.status.dtype.kind == "i"


def test_flat_jit_packs_inputs_of_several_dtypes_and_shapes():
    """``FlatJit`` packs its inputs into one array per dtype and cuts them out again in the
    program: values, zero-size leaves, ``None`` and integer leaves come through unchanged, and
    one program is compiled per signature."""
    from glmm_jax._flat import FlatJit

    def fn(tree, scale, *, power):
        a, (b, empty), codes = tree
        return {
            "sum": a.sum(axis=1) * scale + b,
            "count": jnp.sum(codes >= 0).astype(jnp.int32),
            "empty": empty * 2.0,
            "codes": codes**power,
        }

    flat = FlatJit(fn, ("power",), lambda tree, scale: tree[0].dtype)
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for n in (3, 5, 3):
            tree = (
                rng.normal(size=(n, 2)),
                (rng.normal(size=n), np.zeros((n, 0))),
                np.arange(n, dtype=np.int32) - 1,
            )
            got = flat(tree, np.float64(1.5), power=2)
            want = jax.tree_util.tree_map(np.asarray, flat.plain(tree, np.float64(1.5), power=2))
            assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
            leaves = zip(
                jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
            )
            for g, w in leaves:
                assert g.dtype == w.dtype and g.shape == w.shape
                np.testing.assert_array_equal(g, w)
            # The caller's arrays are left as they were (packing copies, never writes).
            np.testing.assert_array_equal(tree[2], np.arange(n, dtype=np.int32) - 1)
        assert flat.cache_size() == 2


@pytest.mark.parametrize(
    "subscripts, shape_a, shape_b",
    [
        ("gjk,kl->gjl", (5, 2, 2), (2, 2)),
        ("ji,gjl->gil", (2, 2), (5, 2, 2)),
        ("gjp,jl->gpl", (5, 2, 3), (2, 2)),
        ("gpq,gkq->pk", (5, 3, 2), (5, 3, 2)),
        ("gpq,p->gq", (5, 3, 2), (3,)),
        ("np,nk->pk", (7, 0), (7, 0)),  # no fixed effects
        ("gpq,gkq->pk", (600, 8, 4), (600, 8, 4)),  # over the size limit: jnp.einsum
    ],
)
def test_small_einsum_equals_einsum(subscripts, shape_a, shape_b):
    """The broadcast-and-sum contraction equals ``jnp.einsum``, also under ``vmap``."""
    from glmm_jax.blocks import small_einsum

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, *shape_a)), rng.normal(size=shape_b)
    with jax.enable_x64(True):
        got = jax.vmap(lambda x: small_einsum(subscripts, x, jnp.asarray(b)))(jnp.asarray(a))
        want = np.stack([np.einsum(subscripts, x, b) for x in a])
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_designs_of_one_structure_share_its_layouts(exam):
    """Equal random-effects structures are one ``ReStructure`` (its cached layouts are not
    rebuilt on every fit); a different structure is another."""
    a = _design("success ~ schavg + (1 | school)", exam)
    b = _design("success ~ schavg + (1 | school)", exam.iloc[:-60])
    c = _design("success ~ schavg + (schavg | school)", exam)
    assert a.structure is b.structure
    assert c.structure is not a.structure and c.structure != a.structure


@pytest.mark.parametrize("n", [5, 8])  # eliminated, and LAPACK's Cholesky above UNROLL_MAX
def test_gauss_jordan_solves_and_its_pivots_are_ratios_of_leading_minors(n):
    """``A^{-1} B`` as numpy's solve gives it, also under ``vmap``; the pivots are the ratios
    of successive leading minors (all positive exactly for a positive definite ``A``)."""
    from glmm_jax.blocks import gauss_jordan

    rng = np.random.default_rng(5)
    F = rng.normal(size=(4, n, n))
    A = F @ np.swapaxes(F, 1, 2) + 0.1 * np.eye(n)
    A[3] -= 30.0 * np.eye(n)  # indefinite: some pivot negative (or not finite)
    B = rng.normal(size=(4, n, 2))
    with jax.enable_x64(True):
        X, pivots = jax.vmap(gauss_jordan)(jnp.asarray(A), jnp.asarray(B))
        X, pivots = np.asarray(X), np.asarray(pivots)
    np.testing.assert_allclose(X[:3], np.linalg.solve(A[:3], B[:3]), rtol=1e-8, atol=1e-10)
    minors = np.stack([np.linalg.det(A[:3, :k, :k]) for k in range(1, n + 1)], 1)
    ratios = minors / np.concatenate([np.ones((3, 1)), minors[:, :-1]], 1)
    np.testing.assert_allclose(pivots[:3], ratios, rtol=1e-8)
    assert np.all(pivots[:3] > 0) and not np.all(pivots[3] > 0)


@pytest.mark.parametrize(
    "case", ["positive", "indefinite", "nearly_singular", "zero_pivot", "large"]
)
def test_newton_direction_equals_the_eigenvalue_formula(case):
    """The Gauss-Jordan shortcut gives the floored-eigenvalue step wherever it is taken, and
    the eigenvalue route takes over for indefinite and nearly singular Hessians, and where
    elimination without pivoting meets a zero pivot."""
    from glmm_jax.optimize import _newton_direction

    rng = np.random.default_rng(11)
    n = 8 if case == "large" else 3
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    ev = {
        "positive": [0.5, 2.0, 30.0],
        "indefinite": [-4.0, 0.3, 7.0],
        "nearly_singular": [1e-11, 1.0, 5.0],
        "zero_pivot": [1.0, 1.0, 1.0],
        "large": np.linspace(0.2, 9.0, n),
    }[case]
    H, g = Q @ np.diag(ev) @ Q.T, rng.normal(size=n)
    if case == "zero_pivot":
        # Eigenvalues -1, 1, 2 with H[0, 0] = 0: elimination divides by zero.
        H, ev = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]), [-1.0, 1.0, 2.0]
        Q = np.linalg.eigh(H)[1]
    floor = 1e-8 * max(np.max(np.abs(ev)), 1.0)
    want = -Q @ ((Q.T @ g) / np.maximum(np.abs(ev), floor))
    with jax.enable_x64(True):
        d, positive = jax.jit(_newton_direction)(jnp.asarray(H), jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(d), want, rtol=1e-8)
    assert bool(positive) == (min(ev) > 0)
