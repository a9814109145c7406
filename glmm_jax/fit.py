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

import numpy as np
import pandas as pd

from ._config import precision, resolve_dtype
from ._flat import FlatJit
from .design import Design, build_design
from .families import Binomial, Family, Gaussian, gaussian, get_family
from .formula import FormulaSpec
from .lmm import fit_lmm_arrays, lmm_inputs
from .optimize import Control, fit_arrays
from .results import ConvergenceWarning, GLMMResult, LMMResult, SingularFitWarning
from .separation import SeparationWarning, looks_separated, separating_direction

__all__ = [
    "glmer",
    "glmer_nb",
    "lmer",
    "fit_design",
    "fit_lmm_design",
    "compiled_fit",
    "compiled_lmm",
]


def _fit_dtype(arrays, *_):
    return arrays.X.dtype


# The compiled cores, called with their output as one flat array (``_flat.FlatJit``): a small
# fit's dozen output buffers cost more than its last Newton step.
_flat_fit = FlatJit(fit_arrays, ("family", "structure", "control"), _fit_dtype)
_flat_lmm = FlatJit(fit_lmm_arrays, ("structure", "reml", "control"), _fit_dtype)
#: The compiled core. Family, structure and control are static: one program per model
#: structure and bucketed shape, reused across datasets (and across processes via the
#: persistent compilation cache).
compiled_fit = _flat_fit.plain
#: The compiled core of ``lmer``, likewise.
compiled_lmm = _flat_lmm.plain


def fit_design(design: Design, control: Control | None = None, start=None) -> GLMMResult:
    """Run the compiled fit on a :class:`Design` and wrap the result.

    Parameters
    ----------
    design : Design
        From :func:`glmm_jax.design.build_design`.
    control : Control, optional
        Optimiser settings.
    start : dict, optional
        ``{"fixef": array, "theta": array}`` starting values on lme4's scales, and
        ``"dispersion"`` for a family with a dispersion or size.

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
        out = _flat_fit(
            design.arrays, x0, family=design.family, structure=design.structure, control=control
        )
    result = GLMMResult(design, out, time.perf_counter() - t0, control)
    _warn_about(result)
    if isinstance(design.family, Binomial):
        _warn_about_separation(design, np.asarray(out.x), result.converged)
    return result


def _warn_about(result: GLMMResult) -> None:
    if result.singular:
        warnings.warn(
            "boundary (singular) fit: a variance component is estimated as zero",
            SingularFitWarning,
            stacklevel=4,
        )
    if not result.converged:
        warnings.warn(
            f"model failed to converge ({result.fit_info.status}; max|grad| = "
            f"{result.fit_info.gradient_norm:.3g})",
            ConvergenceWarning,
            stacklevel=4,
        )
    if not result.converged:
        return
    variances = result._fixef_variances()
    # NaN fails both comparisons: one test for "finite and non-negative".
    if not (0.0 <= variances.min(initial=0.0) and variances.max(initial=0.0) < np.inf):
        unavailable = ~(np.isfinite(variances) & (variances >= 0))
        names = [n for n, bad in zip(result._design.fixef_names, unavailable, strict=True) if bad]
        warnings.warn(
            "the Hessian of the deviance at the optimum is singular, so the standard errors of "
            f"{', '.join(names)} are not available (NaN): the model is over-parameterised, "
            "for example random-effect columns that are collinear",
            ConvergenceWarning,
            stacklevel=4,
        )


def _warn_about_separation(design: Design, x: np.ndarray, converged: bool) -> None:
    """Warn, naming the coefficients, when the fixed effects separate a binomial response."""
    a, n = design.arrays, design.nobs
    X = np.asarray(a.X[:n])
    eta = X @ x[: design.p] + np.asarray(a.offset[:n])
    if not looks_separated(eta, converged):
        return
    y, trials = np.asarray(a.y[:n]), np.asarray(a.trials[:n])
    used = trials > 0
    d = separating_direction(X[used], y[used], trials[used])
    if d is None:
        return
    # The direction in the preconditioned basis, mapped to the user's coefficients.
    direction = design.M @ d
    involved = np.abs(direction) > 1e-6 * np.abs(direction).max()
    names = ", ".join(n for n, k in zip(design.fixef_names, involved, strict=True) if k)
    warnings.warn(
        f"complete or quasi-complete separation: a combination of the fixed effects ({names}) "
        "separates the successes from the failures, so their maximum-likelihood estimates are "
        "infinite; the estimates reported are where the optimiser stopped and their standard "
        "errors are meaningless. Drop or merge the separating predictors, or use a penalised "
        "fit",
        SeparationWarning,
        stacklevel=4,
    )


def _start_phi(design: Design, start: dict) -> np.ndarray:
    """``phi`` from ``start["theta"]`` on lme4's scale (default 1 on the diagonals); diagonals
    are kept off zero, where ``log`` would be ``-inf``."""
    structure = design.structure
    nt = structure.n_theta
    theta = np.asarray(start.get("theta", np.ones(nt) * structure.diagonal), float).reshape(-1)
    if theta.shape != (nt,):
        raise ValueError(f"start needs theta of length {nt}, got {theta.size}")
    theta = theta / design.theta_scale  # to the fit's scale (design.re_column_scale)
    theta = np.where(structure.diagonal, np.maximum(theta, 1e-4), theta)
    return structure.phi_from_theta(theta)


def _start_vector(design: Design, start: dict) -> np.ndarray:
    """``x0`` from ``start``: ``fixef`` and ``theta`` on lme4's scales, and for a family with a
    dispersion (or the negative binomial's size) ``dispersion``, default 1."""
    p = design.p
    beta = np.asarray(start.get("fixef", np.zeros(p)), float).reshape(-1)
    if beta.shape != (p,):
        raise ValueError(f"start needs fixef of length {p}, got {beta.size}")
    gamma = np.linalg.solve(design.M, beta)
    extra = []
    if not design.family.fixed_dispersion:
        dispersion = float(start.get("dispersion", 1.0))
        if not dispersion > 0:
            raise ValueError(f"start's dispersion must be positive, got {dispersion}")
        extra = [np.log(dispersion)]
    return np.concatenate([gamma, extra, _start_phi(design, start)])


def fit_lmm_design(
    design: Design, reml: bool = True, control: Control | None = None, start=None
) -> LMMResult:
    """Run the compiled linear-mixed-model fit on a :class:`Design` and wrap the result.

    ``start`` may give ``{"theta": array}`` on lme4's scale.
    """
    control = Control() if control is None else control
    structure = design.structure
    phi0 = None if start is None else _start_phi(design, start).astype(design.arrays.X.dtype)
    t0 = time.perf_counter()
    with precision():
        arrays = lmm_inputs(design.arrays, structure)
        out = _flat_lmm(arrays, phi0, structure=structure, reml=reml, control=control)
    result = LMMResult(design, out, time.perf_counter() - t0, control, reml)
    _warn_about(result)
    return result


def lmer(
    formula: str | FormulaSpec,
    data: pd.DataFrame,
    reml: bool = True,
    weights=None,
    offset=None,
    control: Control | None = None,
    start: dict | None = None,
    dtype: str = "float64",
) -> LMMResult:
    """Fit a linear mixed model by REML (default) or maximum likelihood, as lme4's ``lmer``.

    The fixed effects and the residual standard deviation are profiled out, so the optimiser
    sees ``theta`` only; any random-effects structure that :func:`glmer` takes works here.

    Parameters
    ----------
    formula : str
        An lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.
    data : pandas.DataFrame
        The data; never modified.
    reml : bool
        REML (default, lme4's ``REML = TRUE``) or maximum likelihood.
    weights : str or array-like, optional
        Prior weights: observation ``i`` has residual variance ``sigma^2 / w_i``.
    offset : str or array-like, optional
        Added to the linear predictor, with any ``offset()`` terms of the formula.
    control : Control, optional
        Optimiser settings.
    start : dict, optional
        ``{"theta": ...}`` starting values on lme4's scale.
    dtype : {"float64", "float32"}

    Returns
    -------
    LMMResult
        With ``sigma``, the REML criterion in ``summary()`` for REML fits, and t tests with
        Satterthwaite degrees of freedom (``coef_table()``, ``df_satterthwaite``).

    Examples
    --------
    >>> from glmm_jax import lmer, datasets
    >>> m = lmer("Reaction ~ Days + (Days | Subject)", datasets.load_sleepstudy())
    >>> round(m.deviance, 2)  # the REML criterion
    1743.63
    """
    design = build_design(
        formula, data, gaussian(), weights=weights, offset=offset, dtype=resolve_dtype(dtype)
    )
    return fit_lmm_design(design, reml=reml, control=control, start=start)


def glmer_nb(formula: str | FormulaSpec, data: pd.DataFrame, **kwargs) -> GLMMResult:
    """A negative binomial GLMM (NB2, log link), lme4's ``glmer.nb``.

    The size is estimated jointly with the rest by maximising the Laplace likelihood (as
    glmmTMB's ``nbinom2``), not by lme4's alternation; it is ``result.nb_size``. Other
    arguments as :func:`glmer`.
    """
    return glmer(formula, data, family="negative_binomial", **kwargs)


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
        ``"binomial"``, ``"poisson"``, ``"negative_binomial"``, ``"Gamma"``,
        ``"inverse.gaussian"`` or ``"gaussian"`` (names are case-insensitive), or a
        :class:`Family` object. A dispersion (gaussian, Gamma, inverse gaussian) or a size
        (negative binomial) is estimated jointly with the rest by maximising the Laplace
        likelihood (glmmTMB's estimate). ``"gaussian"`` with the
        identity link is routed to :func:`lmer` (REML, as lme4 does), with a warning.
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
        ``{"fixef": ..., "theta": ...}`` starting values on lme4's scales, with
        ``"dispersion"`` (or the negative binomial's size) for the families that have one.
        From a given start the optimiser takes Newton steps at once, rather than L-BFGS first
        (``control.lbfgs_maxiter`` decides when set).
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
    if isinstance(fam, Gaussian) and fam.link.name == "identity":
        # lme4's glmer does the same: a gaussian identity GLMM is a linear mixed model.
        warnings.warn(
            "family='gaussian' with the identity link is a linear mixed model: fitted by "
            "lmer() with REML=True, as lme4's glmer() does; call lmer() directly to choose "
            "REML or ML",
            UserWarning,
            stacklevel=2,
        )
        return lmer(formula, data, True, weights, offset, control, start, dtype)
    dt = resolve_dtype(dtype)
    design = build_design(formula, data, fam, weights=weights, offset=offset, dtype=dt)
    return fit_design(design, control=control, start=start)
