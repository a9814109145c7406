"""Shared fixtures: reference cases (vendored lme4 fits) and fitted models, fitted once."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

import glmm_jax as gj

HERE = Path(__file__).parent
REF_DIR = HERE / "reference"
DATA_DIR = Path(gj.datasets.__file__).parent / "data"
sys.path.insert(0, str(REF_DIR))

from prepare import load_case  # noqa: E402  (vendored from shared/reference)

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
