"""Shared fixtures: reference cases (vendored lme4 fits) and fitted models, fitted once."""

from __future__ import annotations

import atexit
import gc
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import pytest

# A compilation cache of the session's own (as on CI's clean machine, nothing compiled by
# other processes is read); the notebook and command-line subprocesses share it, and so do
# pytest-xdist's workers, which start after this runs and inherit the variable.
# GLMM_JAX_CACHE_DIR, if set, still wins.
if "GLMM_JAX_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="glmm_jax_test_cache_")
    os.environ["GLMM_JAX_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import glmm_jax as gj  # noqa: E402

HERE = Path(__file__).parent
REF_DIR = HERE / "reference"
DATA_DIR = Path(gj.datasets.__file__).parent / "data"
sys.path.insert(0, str(REF_DIR))

from prepare import load_case  # noqa: E402  (vendored from shared/reference)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Every compiled CPU program keeps memory mappings for its code until it is released; the
    whole suite in one process passed Linux's 65,530 mappings per process (vm.max_map_count),
    and the next compilation aborted the process (SIGABRT inside XLA, at ~60% of the suite).
    The batch tests alone leave 13,490 mappings, 1,428 after jax.clear_caches(). Programs come
    back from the session's persistent cache when a later module needs them.
    """
    yield
    jax.clear_caches()
    gc.collect()


#: One grouping factor, binomial and Poisson (issue 2).
GLMER_CASES = [
    "exam_logit",
    "exam_probit",
    "exam_slopes",
    "cbpp_cbind",
    "cbpp_weights",
    "contraception_logit",
    "contraception_slopes",
    "salamanders_pois",
    "mmmec_offset",
    "sim_singular_binom",
]

#: Several grouping factors (issue 3): lme4's fits from shared/reference, and those made by
#: reference/make_extra.R (vector terms with crossed factors, an observation-level factor, a
#: nesting).
CROSSED_CASES = [
    "grouseticks_pois",
    "verbagg_crossed",
    "sim_pois_crossed_offset",
    "cbpp_obs",
    "exam_crossed_slopes",
    "sim_pois_crossed_rest_slopes",
    "contraception_nested",
]

#: Linear mixed models (issue 4): lmer, REML and ML.
LMM_CASES = [
    "sleepstudy_reml",
    "sleepstudy_ml_uncorr",
    "exam_lmm_slopes_reml",
    "penicillin_crossed_lmm",
    "dyestuff_lmm",
    "dyestuff2_singular_lmm",
    "insteval_crossed_lmm",
]


def reference(case: str) -> dict:
    with open(REF_DIR / f"{case}.json") as f:
        return json.load(f)


def case_frame(case: str):
    return load_case(case, str(DATA_DIR), str(REF_DIR))


_FITS: dict[str, object] = {}


def fit_case(case: str):
    """Fit a reference case once per test session (compilation dominates the cost)."""
    if case not in _FITS:
        ref = reference(case)
        py = ref["py"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gj.SingularFitWarning)
            if py["family"] == "gaussian":
                _FITS[case] = gj.lmer(py["formula"], case_frame(case), reml=py["reml"])
                return _FITS[case]
            _FITS[case] = gj.glmer(
                py["formula"],
                case_frame(case),
                family=py["family"],
                link=py.get("link"),
                weights=py.get("weights"),
            )
    return _FITS[case]


def batch_fits(design, sims):
    """The compiled fit mapped over simulated responses (columns of ``sims``, in data order),
    by ``jax.vmap`` and by ``jax.lax.map``: ``(by_vmap, by_map)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from glmm_jax.fit import compiled_fit
    from glmm_jax.optimize import Control

    with jax.enable_x64(True):
        arrays = jax.tree_util.tree_map(jnp.asarray, design.arrays)
        Y = np.zeros((sims.shape[1], arrays.y.shape[0]))
        Y[:, : design.nobs] = sims.to_numpy().T[:, design.order]
        Y = jnp.asarray(Y)

        def one(y):
            return compiled_fit(
                arrays._replace(y=y),
                None,
                family=design.family,
                structure=design.structure,
                control=Control(),
            )

        return jax.vmap(one)(Y), jax.lax.map(one, Y)


@pytest.fixture(scope="session")
def exam():
    return gj.datasets.load_exam()


@pytest.fixture(scope="session")
def seed_fit():
    return fit_case("exam_logit")
