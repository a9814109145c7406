"""``glmer``: formula + data -> fitted model, as a pipeline of replaceable stages.

Like lme4's modular functions (``glFormula``, ``mkGlmerDevfun``, ``optimizeGlmer``,
``mkMerMod``), each stage is callable on its own:

1. :func:`glmm_jax.formula.parse_formula` - text to :class:`FormulaSpec`;
2. :func:`glmm_jax.design.build_design` - DataFrame to padded arrays;
3. :func:`fit_design` - the compiled fit (:func:`glmm_jax.optimize.fit_arrays`);
4. :class:`glmm_jax.results.GLMMResult` - lme4's vocabulary on the outputs.
"""

from __future__ import annotations

import time
import warnings

import jax
import numpy as np
import pandas as pd

from ._config import precision, resolve_dtype
from .design import Design, build_design
from .families import Family, get_family
from .formula import FormulaSpec
from .optimize import Control, fit_arrays
from .results import ConvergenceWarning, GLMMResult, SingularFitWarning

__all__ = ["glmer", "fit_design", "compiled_fit"]

#: The compiled core. Family, structure and control are static: one program per model
#: structure and bucketed shape, reused across datasets (and across processes via the
#: persistent compilation cache).
compiled_fit = jax.jit(fit_arrays, static_argnames=("family", "structure", "control"))


def fit_design(design: Design, control: Control | None = None, start=None) -> GLMMResult:
    """Run the compiled fit on a :class:`Design` and wrap the result.

    Parameters
    ----------
    design : Design
        From :func:`glmm_jax.design.build_design`.
    control : Control, optional
        Optimiser settings.
    start : dict, optional
        ``{"fixef": array, "theta": array}`` starting values on lme4's scales.

    Returns
    -------
    GLMMResult
    """
    control = Control() if control is None else control
    t0 = time.perf_counter()
    dtype = design.arrays.X.dtype
    with precision():
        # numpy arrays go straight in: jit's C++ dispatch transfers them all at once, where a
        # jnp.asarray per leaf costs ~65 us each (1 ms of the seed model's 10).
        x0 = None if start is None else np.asarray(_start_vector(design, start), dtype)
        out = compiled_fit(
            design.arrays, x0, family=design.family, structure=design.structure, control=control
        )
        out = jax.block_until_ready(out)
    result = GLMMResult(design, out, time.perf_counter() - t0, control)
    if result.singular:
        warnings.warn(
            "boundary (singular) fit: a variance component is estimated as zero",
            SingularFitWarning,
            stacklevel=3,
        )
    if not result.converged:
        warnings.warn(
            f"model failed to converge ({result.fit_info.status}; max|grad| = "
            f"{result.fit_info.gradient_norm:.3g})",
            ConvergenceWarning,
            stacklevel=3,
        )
    return result


def _start_vector(design: Design, start: dict) -> np.ndarray:
    p, nt = design.p, design.structure.n_theta
    beta = np.asarray(start.get("fixef", np.zeros(p)), float).reshape(-1)
    theta = np.asarray(start.get("theta", np.ones(nt) * design.structure.diagonal), float).reshape(
        -1
    )
    if beta.shape != (p,) or theta.shape != (nt,):
        raise ValueError(f"start needs fixef of length {p} and theta of length {nt}")
    theta = np.where(design.structure.diagonal, np.maximum(theta, 1e-4), theta)
    gamma = np.linalg.solve(design.M, beta)
    return np.concatenate([gamma, design.structure.phi_from_theta(theta)])


def glmer(
    formula: str | FormulaSpec,
    data: pd.DataFrame,
    family: str | Family = "binomial",
    link: str | None = None,
    weights=None,
    offset=None,
    nAGQ: int = 1,
    control: Control | None = None,
    start: dict | None = None,
    dtype: str = "float64",
) -> GLMMResult:
    """Fit a generalized linear mixed model by maximum likelihood (Laplace approximation).

    Parameters
    ----------
    formula : str
        An lme4 formula, e.g. ``"success ~ schavg + (1 | school)"`` or
        ``"cbind(incidence, size - incidence) ~ period + (1 | herd)"``.
    data : pandas.DataFrame
        The data; never modified. Rows with missing values in used columns are dropped with a
        warning. Categorical columns keep their level order (the first level is the reference).
    family : str or Family
        ``"binomial"`` or ``"poisson"``, or a :class:`Family` object.
    link : str, optional
        Link name; default the family's canonical link.
    weights : str or array-like, optional
        Prior weights (a column name or a vector); for a binomial proportion response, the
        number of trials.
    offset : str or array-like, optional
        Added to the linear predictor, with any ``offset()`` terms of the formula.
    nAGQ : int
        Quadrature points; only 1 (the Laplace approximation) is available.
    control : Control, optional
        Optimiser settings (lme4's ``glmerControl``).
    start : dict, optional
        ``{"fixef": ..., "theta": ...}`` starting values.
    dtype : {"float64", "float32"}
        Precision of the computation; float64 by default, without touching JAX's global flags.

    Returns
    -------
    GLMMResult

    Examples
    --------
    >>> from glmm_jax import glmer, datasets
    >>> m = glmer("success ~ schavg + (1 | school)", datasets.load_exam(), family="binomial")
    >>> round(m.loglik, 2)
    -2658.32
    """
    if nAGQ != 1:
        raise NotImplementedError(
            f"nAGQ={nAGQ}: adaptive Gauss-Hermite quadrature is not available yet; "
            "nAGQ=1 (the Laplace approximation) is"
        )
    fam = get_family(family, link)
    dt = resolve_dtype(dtype)
    design = build_design(formula, data, fam, weights=weights, offset=offset, dtype=dt)
    return fit_design(design, control=control, start=start)
