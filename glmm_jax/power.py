"""Power by simulation (what simr's ``powerSim`` and ``powerCurve`` do), as batches of fits.

For each sample size: build the design, simulate responses from the true parameters
(``simulate.py``), fit them all in one batch (``batch.py``), test, and count rejections. The
Monte Carlo interval is Clopper-Pearson's, as simr's ``binom.test``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import scipy.stats

from ._config import resolve_dtype
from .batch import _is_lmm, _with_response, fit_batch_design
from .design import DataError, Design, build_design
from .families import Family, Gaussian, get_family
from .fit import _start_phi, _start_vector
from .formula import FormulaSpec, parse_formula
from .optimize import Control
from .simulate import simulate_responses

__all__ = ["PowerResult", "power"]


def power(
    formula: str | FormulaSpec,
    data: pd.DataFrame | Callable[[int], pd.DataFrame],
    *,
    fixef: Mapping[str, float],
    test: str,
    method: str = "wald",
    varcorr: Mapping[str, float | np.ndarray] | None = None,
    theta=None,
    sigma: float | None = None,
    dispersion: float | None = None,
    family: str | Family = "binomial",
    link: str | None = None,
    weights=None,
    offset=None,
    sizes=None,
    nsim: int = 200,
    alpha: float = 0.05,
    level: float = 0.95,
    seed: int = 0,
    control: Control | None = None,
    progress: bool | None = None,
    dtype: str = "float64",
) -> PowerResult:
    """Estimate the power of a test on a GLMM or LMM by simulation, over sample sizes.

    Parameters
    ----------
    formula : str
        The model, e.g. ``"success ~ schavg + (1 | school)"``; its response column need not
        be in ``data`` (it is simulated).
    data : DataFrame or callable
        The design: covariates and grouping factors. A callable ``data(size)`` builds one for
        each of ``sizes`` (say, ``size`` schools), which makes a power curve.
    fixef : mapping
        True fixed effects by lme4 name (``"(Intercept)"``, ``"schavg"``); every coefficient
        of the model is needed.
    test : str
        The fixed-effect coefficient tested (``method="wald"``) or the fixed-effect term
        dropped (``method="lrt"``).
    method : {"wald", "lrt"}
        A two-sided Wald z test of ``coefficient = 0``, or a likelihood-ratio test of the model
        against the one without ``test`` (both fitted by maximum likelihood, chi-squared
        reference). For linear mixed models the Wald test uses the REML fit.
    varcorr : mapping, optional
        True random-effect standard deviations by grouping factor: a number for a factor with
        one effect, a covariance matrix for a vector term. Or give lme4's ``theta``.
    theta : array, optional
        lme4's relative covariance factor parameters (instead of ``varcorr``).
    sigma : float, optional
        Residual standard deviation: required for gaussian models.
    dispersion : float, optional
        Gamma dispersion or negative binomial size: required for those families.
    family, link, weights, offset, dtype
        As in :func:`glmm_jax.glmer`.
    sizes : sequence of int, optional
        Values passed to ``data`` when it is a callable.
    nsim : int
        Simulated responses per size.
    alpha : float
        Significance level of the test.
    level : float
        Confidence level of the Monte Carlo interval of the power.
    seed : int
        Seed; the same seed gives the same answer.
    control, progress
        As in :func:`glmm_jax.fit_batch`.

    Returns
    -------
    PowerResult
        ``.table``: one row per size with ``nsim``, ``failed``, ``rejections``, ``power``,
        ``lower``, ``upper``.

    Examples
    --------
    >>> import glmm_jax as gj
    >>> exam = gj.datasets.load_exam()
    >>> pw = gj.power("success ~ schavg + (1 | school)", exam,
    ...               fixef={"(Intercept)": 0.0, "schavg": 0.3}, varcorr={"school": 0.5},
    ...               test="schavg", nsim=50, seed=1)
    >>> list(pw.table.columns)
    ['size', 'nsim', 'failed', 'rejections', 'power', 'lower', 'upper']
    """
    method = method.lower()
    if method not in ("wald", "lrt"):
        raise ValueError(f"method must be 'wald' or 'lrt', got {method!r}")
    if not 0 < alpha < 1 or not 0 < level < 1:
        raise ValueError("alpha and level must lie between 0 and 1")
    if nsim < 1:
        raise ValueError(f"nsim must be at least 1, got {nsim}")
    if callable(data):
        if sizes is None:
            raise ValueError("data is a function of the size: give sizes=[...]")
        frames = [(s, data(s)) for s in sizes]
    else:
        if sizes is not None:
            raise ValueError("sizes needs data to be a function size -> DataFrame")
        frames = [(None, data)]
    fam = get_family(family, link)
    spec = formula if isinstance(formula, FormulaSpec) else parse_formula(formula)
    lmm = _is_lmm(fam)
    control = Control() if control is None else control
    rows = []
    for i, (size, frame) in enumerate(frames):
        placeholder = _with_response(spec, frame, fam)
        design = build_design(
            spec, placeholder, fam, weights=weights, offset=offset, dtype=resolve_dtype(dtype)
        )
        beta = _true_fixef(design, fixef)
        disp, scale = _dispersion(design, lmm, sigma, dispersion)
        th = _true_theta(design, varcorr, theta, scale)
        Y = simulate_responses(
            design, beta, th, dispersion=disp, scale=scale, nsim=nsim, seed=seed + i
        )
        start = _start(design, beta, th, disp, lmm)
        fit = dict(control=control, progress=progress, start=start)
        if method == "wald":
            if test not in design.fixef_names:
                raise DataError(
                    f"test {test!r} is not a coefficient of the model: {design.fixef_names}"
                )
            batch = fit_batch_design(design, Y, reml=True, **fit)
            z = (batch.fixef[test] / batch.se[test]).to_numpy()
            ok = batch.converged & np.isfinite(z)
            reject = np.abs(z) > scipy.stats.norm.ppf(1 - alpha / 2)
        else:
            reduced = _reduced_design(spec, placeholder, fam, design, test, weights, offset, dtype)
            full = fit_batch_design(design, Y, reml=False, **fit)
            keep = [design.fixef_names.index(n) for n in reduced.fixef_names]
            red_start = _start(reduced, beta[keep], th, disp, lmm)
            small = fit_batch_design(reduced, Y, reml=False, **{**fit, "start": red_start})
            stat = 2.0 * (full.loglik - small.loglik)
            df = design.p - reduced.p
            ok = full.converged & small.converged & np.isfinite(stat)
            reject = scipy.stats.chi2.sf(np.maximum(stat, 0.0), df) < alpha
        n_ok, k = int(ok.sum()), int((reject & ok).sum())
        lower, upper = _clopper_pearson(k, n_ok, level)
        rows.append(
            {
                "size": size,
                "nsim": nsim,
                "failed": nsim - n_ok,
                "rejections": k,
                "power": k / n_ok if n_ok else np.nan,
                "lower": lower,
                "upper": upper,
            }
        )
        if n_ok < nsim:
            warnings.warn(
                f"{nsim - n_ok} of {nsim} simulated fits failed"
                + (f" at size {size}" if size is not None else "")
                + "; power is over the others",
                RuntimeWarning,
                stacklevel=2,
            )
    return PowerResult(pd.DataFrame(rows), test=test, method=method, alpha=alpha, level=level)


@dataclasses.dataclass
class PowerResult:
    """Estimated power, one row per sample size (``size`` is None for a single design).

    Attributes
    ----------
    table : DataFrame
        Columns ``size``, ``nsim``, ``failed``, ``rejections``, ``power`` and the Monte Carlo
        interval ``lower``, ``upper`` (Clopper-Pearson at ``level``).
    test, method : str
    alpha, level : float
    """

    table: pd.DataFrame
    test: str
    method: str
    alpha: float
    level: float

    def __repr__(self) -> str:
        head = (
            f"Power for a {self.method} test of {self.test!r} at alpha = {self.alpha} "
            f"({100 * self.level:g}% Monte Carlo intervals):"
        )
        return head + "\n" + self.table.to_string(index=False)


def _true_fixef(design: Design, fixef: Mapping[str, float]) -> np.ndarray:
    names = design.fixef_names
    missing = [n for n in names if n not in fixef]
    unknown = [n for n in fixef if n not in names]
    if missing or unknown:
        raise DataError(
            f"fixef must give every coefficient of the model, {names}: "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unknown {unknown}" if unknown else "")
        )
    return np.array([float(fixef[n]) for n in names])


def _true_theta(design: Design, varcorr, theta, scale: float) -> np.ndarray:
    """lme4's theta from the true standard deviations (relative to ``scale``) or as given."""
    s = design.structure
    if theta is not None:
        if varcorr is not None:
            raise ValueError("give varcorr or theta, not both")
        theta = np.asarray(theta, dtype=float).reshape(-1)
        if theta.shape != (s.n_theta,):
            raise ValueError(f"theta must have {s.n_theta} entries, got {theta.size}")
        return theta
    if varcorr is None:
        raise ValueError("give the true random-effect standard deviations, varcorr={...}")
    unknown = [f for f in varcorr if f not in s.factors]
    if unknown or set(varcorr) != set(s.factors):
        raise DataError(
            f"varcorr must give every grouping factor of the model, {list(s.factors)}; "
            f"got {list(varcorr)}"
        )
    out = np.zeros(s.n_theta)
    for f, factor in enumerate(s.factors):
        q = s.factor_q(factor)
        value = np.asarray(varcorr[factor], dtype=float)
        Sigma = value.reshape(1, 1) ** 2 if value.ndim == 0 else value
        if Sigma.shape != (q, q):
            raise DataError(
                f"varcorr[{factor!r}] must be a standard deviation (one effect) or a {q} x {q} "
                f"covariance matrix; got shape {value.shape}"
            )
        try:
            T = np.linalg.cholesky(Sigma + 1e-300 * np.eye(q)) / scale
        except np.linalg.LinAlgError:
            raise DataError(
                f"varcorr[{factor!r}] is not a positive semi-definite covariance"
            ) from None
        for i, (ff, r, c) in enumerate(s.theta_layout()):
            if ff == f:
                out[i] = T[r, c]
    return out


def _dispersion(design: Design, lmm: bool, sigma, dispersion) -> tuple[float, float]:
    """``(dispersion, scale)`` of the simulation; ``scale`` multiplies ``Lambda u``."""
    fam = design.family
    if isinstance(fam, Gaussian):
        if sigma is None or not sigma > 0:
            raise ValueError("a gaussian model needs the residual standard deviation, sigma=...")
        return float(sigma) ** 2, (float(sigma) if lmm else 1.0)
    if fam.fixed_dispersion:
        return 1.0, 1.0
    if dispersion is None or not dispersion > 0:
        raise ValueError(f"the {fam.name} family needs its dispersion (or size), dispersion=...")
    return float(dispersion), 1.0


def _start(design: Design, beta, theta, dispersion: float, lmm: bool) -> np.ndarray:
    """The compiled fit's parameters at the truth: every replicate starts there (a linear
    mixed model's have no dispersion slot: sigma is profiled out)."""
    if lmm:
        return np.concatenate(
            [np.linalg.solve(design.M, beta), _start_phi(design, {"theta": theta})]
        )
    return _start_vector(design, {"fixef": beta, "theta": theta, "dispersion": dispersion})


def _reduced_design(spec, data, fam, design, term, weights, offset, dtype) -> Design:
    """The design without the fixed-effect term ``term`` (formulaic's ``- term``)."""
    reduced = dataclasses.replace(
        spec, formula=f"{spec.formula} - {term}", fixed=f"{spec.fixed} - {term}"
    )
    small = build_design(
        reduced, data, fam, weights=weights, offset=offset, dtype=resolve_dtype(dtype)
    )
    if small.p >= design.p:
        raise DataError(
            f"test {term!r} is not a term of the fixed effects {design.fixef_names}; "
            "name a term as written in the formula"
        )
    return small


def _clopper_pearson(k: int, n: int, level: float) -> tuple[float, float]:
    if n == 0:
        return np.nan, np.nan
    a = (1 - level) / 2
    lower = scipy.stats.beta.ppf(a, k, n - k + 1) if k > 0 else 0.0
    upper = scipy.stats.beta.ppf(1 - a, k + 1, n - k) if k < n else 1.0
    return float(lower), float(upper)
