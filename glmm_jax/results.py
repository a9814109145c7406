"""The fitted model: lme4's vocabulary (fixef, ranef, varcorr, vcov, summary) on numpy/pandas.

Everything here is computed from the compiled fit's outputs, copied to numpy once, so a result
pickles, prints and predicts without holding device memory.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math

import jax
import numpy as np
import pandas as pd
import scipy.stats

from ._config import precision
from .batch import fixef_covariance
from .design import DataError, Design, _evaluate, _lme4_name
from .families import Binomial
from .laplace import rest_shapes
from .lmm import lmm_conditional_variances
from .optimize import FitOutput, Status
from .simulate import simulate_responses

__all__ = ["GLMMResult", "LMMResult", "FitInfo", "ConvergenceWarning", "SingularFitWarning"]


class ConvergenceWarning(UserWarning):
    """The optimiser stopped without meeting its convergence criteria."""


class SingularFitWarning(UserWarning):
    """A variance component is estimated as zero (lme4's "boundary (singular) fit")."""


@dataclasses.dataclass(frozen=True)
class FitInfo:
    """How the optimisation went.

    Attributes
    ----------
    converged : bool
    status : str
        ``"converged"``, ``"iteration limit"``, ``"line search failed"`` or ``"non-finite"``.
    lbfgs_iterations, newton_iterations : int
    evaluations : int
        Laplace deviance evaluations: one with the gradient per iteration, plus each
        line-search trial (which solves the conditional modes afresh).
    gradient_norm : float
        Largest absolute entry of the deviance gradient at the optimum (free parameters).
    seconds : float
        Wall time of the fit, compilation included if it compiled.
    """

    converged: bool
    status: str
    lbfgs_iterations: int
    newton_iterations: int
    evaluations: int
    gradient_norm: float
    seconds: float


def _np(fn, *args) -> np.ndarray:
    """Call a family/link function (jax.numpy) in float64 and return a numpy array."""
    with precision():
        return np.asarray(fn(*(np.asarray(a, dtype=float) for a in args)))


def _signif_stars(p: float) -> str:
    if not np.isfinite(p):
        return ""
    for cut, star in ((0.001, "***"), (0.01, "**"), (0.05, "*"), (0.1, ".")):
        if p < cut:
            return star
    return ""


def _format_table(df: pd.DataFrame, index=True) -> str:
    return df.to_string(index=index)


def _left_table(df: pd.DataFrame) -> str:
    """Left-aligned columns, one space apart, as lme4 prints its random-effects table."""
    cols = [[str(c)] + [str(v) for v in df[c]] for c in df.columns]
    widths = [max(map(len, col)) for col in cols]
    rows = zip(*cols, strict=True)
    return "\n".join(
        " " + " ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows
    )


def _to_numpy(out):
    """The fit's outputs as numpy arrays; outputs that already are (the flat call's, see
    ``fit``) are returned as they are, without a tree_map's ~10 us."""
    if isinstance(out.x, np.ndarray):
        return out
    return jax.tree_util.tree_map(np.asarray, out)


class GLMMResult:
    """A fitted generalized linear mixed model (lme4's ``glmerMod``).

    Created by :func:`glmm_jax.glmer`; not meant to be built by hand.

    Attributes
    ----------
    formula : str
    family : Family
    nobs : int
    ngroups : dict
        Grouping factor -> number of levels.
    fixef : pandas.Series
        Fixed-effect estimates.
    vcov : pandas.DataFrame
        Covariance of the fixed effects, from the exact Hessian of the Laplace deviance over all
        parameters (lme4's default ``use.hessian = TRUE``).
    se : pandas.Series
        Standard errors of the fixed effects.
    theta : numpy.ndarray
        lme4's relative covariance factor parameters.
    varcorr : pandas.DataFrame
        Columns grp, var1, var2, vcov, sdcor like ``as.data.frame(VarCorr(m))``.
    ranef : dict
        Grouping factor -> DataFrame of conditional modes (levels x terms).
    ranef_sd : dict
        Grouping factor -> DataFrame of conditional standard deviations.
    loglik, deviance, aic, bic : float
        ``deviance`` is ``-2 loglik`` as in lme4's summary table.
    df_resid : int
    singular, converged : bool
    fit_info : FitInfo
    """

    def __init__(
        self, design: Design, out: FitOutput, seconds: float, control, data_name: str = "data"
    ):
        out = _to_numpy(out)
        self._design = design
        self._out = out
        self._control = control
        self._seconds = seconds
        self.formula = design.spec.formula
        self.family = design.family
        self.data_name = data_name
        structure = design.structure
        p = design.p
        self.nobs = design.nobs

        x = out.x
        k = self._dispersion_slots()
        #: The dispersion (``sigma^2`` of a gaussian, ``1 / shape`` of a Gamma); 1 for the
        #: binomial and Poisson.
        self.dispersion = float(np.exp(x[p])) if k else 1.0
        if self.family.size_in_trials:
            #: The negative binomial's size (lme4's ``glmer.nb`` theta).
            self.nb_size = self.dispersion

        self.deviance = float(out.deviance)
        self.loglik = -0.5 * self.deviance
        self.df = p + structure.n_theta + k
        self.aic = self.deviance + 2 * self.df
        self.bic = self.deviance + self.df * math.log(self.nobs)
        self.df_resid = self.nobs - self.df

        # A diagonal theta entry, exp(phi) times its mask (0 where the boundary stage dropped
        # it), below singular_tol on the fit's scale (where every random-effect column has
        # unit size). In Python over the few entries: numpy's calls on tiny arrays cost ~1-2
        # us each here. What the fit's warnings do not need is worked out on first use:
        # theta, fit_info, fixef, vcov.
        tol = control.singular_tol
        log_tol = math.log(tol) if tol > 0 else -math.inf
        self.singular = any(
            (0.0 < tol) if m <= 0.0 else (v < log_tol)
            for v, m, d in zip(
                x[p + k :].tolist(), out.mask.tolist(), structure.diagonal.tolist(), strict=True
            )
            if d
        )
        self._status = int(out.status)
        self.converged = self._status == Status.CONVERGED

    @functools.cached_property
    def theta(self) -> np.ndarray:
        """lme4's relative covariance factor parameters (``getME(m, "theta")``)."""
        d, out = self._design, self._out
        phi = out.x[d.p + self._dispersion_slots() :]
        return d.structure.theta_from_phi(phi, out.mask) * d.theta_scale

    @functools.cached_property
    def ngroups(self) -> dict[str, int]:
        """Grouping factor -> number of levels."""
        return {f: len(lv) for f, lv in self._design.levels.items()}

    @functools.cached_property
    def fit_info(self) -> FitInfo:
        """How the optimisation went (:class:`FitInfo`)."""
        out, p, k = self._out, self._design.p, self._dispersion_slots()
        # The gradient over the free parameters: dropped variances (mask 0) do not count.
        g = np.abs(out.grad)
        g[p + k :][out.mask <= 0] = 0.0
        return FitInfo(
            converged=self.converged,
            status=Status.names.get(self._status, str(self._status)),
            lbfgs_iterations=int(out.lbfgs_iterations),
            newton_iterations=int(out.newton_iterations),
            evaluations=int(out.evaluations),
            gradient_norm=float(g.max()) if g.size else 0.0,
            seconds=self._seconds,
        )

    @functools.cached_property
    def _beta(self) -> np.ndarray:
        """The fixed effects on the user's scale (the fit's are of the preconditioned X M)."""
        return self._design.M @ self._out.x[: self._design.p]

    @functools.cached_property
    def _cov_beta(self) -> np.ndarray:
        return self._fixef_covariance(self._out)

    def _fixef_variances(self) -> np.ndarray:
        """The diagonal of ``vcov`` (for the fit's check that it is available)."""
        return self._cov_beta.diagonal()

    def _dispersion_slots(self) -> int:
        """1 where ``x`` carries a log dispersion after ``beta`` (see ``optimize.fit_arrays``)."""
        return 0 if self._design.family.fixed_dispersion else 1

    @property
    def sigma(self) -> float:
        """Square root of the dispersion (lme4's ``sigma``): 1 for binomial and Poisson; for
        the negative binomial its size, as glmmTMB's ``sigma``."""
        if self.family.size_in_trials:
            return self.dispersion
        return math.sqrt(self.dispersion)

    def _row_parameter(self) -> np.ndarray:
        """The family's per-row parameter: binomial trials, or the negative binomial's size."""
        d = self._design
        return np.full(d.nobs, self.dispersion) if self.family.size_in_trials else d.trials

    def _fixef_covariance(self, out) -> np.ndarray:
        """Covariance of the fixed effects from the exact Hessian over all parameters."""
        d = self._design
        k = self._dispersion_slots()
        return fixef_covariance(out.hessian[None], out.mask[None], d.p, k, d.M)[0]

    # The pandas objects are built on first access: they cost more than the arithmetic.
    @functools.cached_property
    def fixef(self) -> pd.Series:
        """Fixed-effect estimates (lme4's ``fixef``)."""
        return pd.Series(self._beta, index=self._design.fixef_names, name="Estimate")

    @functools.cached_property
    def vcov(self) -> pd.DataFrame:
        """Covariance of the fixed effects, from the exact Hessian (lme4's ``vcov``)."""
        names = self._design.fixef_names
        return pd.DataFrame(self._cov_beta, index=names, columns=names)

    @functools.cached_property
    def se(self) -> pd.Series:
        """Standard errors of the fixed effects."""
        se = np.sqrt(np.diag(self._cov_beta))
        return pd.Series(se, index=self._design.fixef_names, name="Std. Error")

    # ---------------------------------------------------------------- random effects
    def _blocks(self) -> dict[str, np.ndarray]:
        """Grouping factor -> its relative covariance factor ``T`` (lme4's Lambda block)."""
        structure = self._design.structure
        blocks = structure.lambda_blocks(self.theta)
        return dict(zip(structure.factors, (np.asarray(T) for T in blocks), strict=True))

    @functools.cached_property
    def _modes(self) -> dict[str, np.ndarray]:
        """Grouping factor -> conditional modes on the ``u`` scale, ``(levels, Q)``."""
        d = self._design
        u1, ur = self._out.u
        first, *others = d.structure.factors
        modes = {first: u1[: len(d.levels[first])]}
        offset = 0
        for factor, (G_pad, q) in zip(others, rest_shapes(d.arrays, d.structure), strict=True):
            block = ur[offset : offset + G_pad * q].reshape(G_pad, q)
            modes[factor] = block[: len(d.levels[factor])]
            offset += G_pad * q
        return modes

    @functools.cached_property
    def _b(self) -> dict[str, np.ndarray]:
        """Grouping factor -> conditional modes ``b = T u`` of each level, ``(levels, Q)``."""
        blocks = self._blocks()
        return {f: u @ blocks[f].T for f, u in self._modes.items()}

    @functools.cached_property
    def ranef(self) -> dict[str, pd.DataFrame]:
        """Grouping factor -> conditional modes ``b`` (levels x terms), lme4's ``ranef``."""
        d = self._design
        return {
            f: pd.DataFrame(b, index=d.levels[f], columns=list(d.structure.factor_names(f)))
            for f, b in self._b.items()
        }

    @functools.cached_property
    def ranef_sd(self) -> dict[str, pd.DataFrame]:
        """Grouping factor -> conditional standard deviations of the modes."""
        out = {}
        for factor, modes in self.ranef.items():
            V = self.condvar[factor]
            sd = np.sqrt(np.maximum(np.diagonal(V, axis1=1, axis2=2), 0.0))
            out[factor] = pd.DataFrame(sd, index=modes.index, columns=modes.columns)
        return out

    @functools.cached_property
    def varcorr(self) -> pd.DataFrame:
        """Variances, covariances, sds and correlations: lme4's ``as.data.frame(VarCorr(m))``."""
        structure = self._design.structure
        blocks = self._blocks()
        rows = []
        for factor in structure.factors:
            T = blocks[factor]
            offset = 0
            for k, term in enumerate(structure.factor_terms(factor)):
                # lme4 names a factor's second and later terms grp.1, grp.2 (make.unique).
                grp = term.group if k == 0 else f"{term.group}.{k}"
                q = term.q
                Tt = T[offset : offset + q, offset : offset + q]
                S = Tt @ Tt.T
                sds = np.sqrt(np.diag(S))
                for i in range(q):
                    rows.append((grp, term.names[i], None, S[i, i], sds[i]))
                for j in range(q):
                    for i in range(j + 1, q):
                        ok = sds[i] > 0 and sds[j] > 0
                        # Clipped: a singular fit's correlation of exactly +-1 rounds past it.
                        corr = float(np.clip(S[i, j] / (sds[i] * sds[j]), -1, 1)) if ok else np.nan
                        rows.append((grp, term.names[j], term.names[i], S[i, j], corr))
                offset += q
        if self._dispersion_slots() and not self.family.size_in_trials:
            rows.append(("Residual", None, None, self.dispersion, self.sigma))
        return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

    @functools.cached_property
    def condvar(self) -> dict[str, np.ndarray]:
        """Grouping factor -> conditional covariance of each level's effects, ``(G, Q, Q)``."""
        d = self._design
        # The fit's effects are S b for its columns Z S^-1 (design.re_column_scale).
        return {
            f: np.asarray(V)[: len(d.levels[f])] / np.outer(d.re_scale[f], d.re_scale[f])
            for f, V in zip(d.structure.factors, self._condvar_blocks(), strict=True)
        }

    def _condvar_blocks(self) -> tuple:
        return self._out.condvar

    def ranef_frame(self) -> pd.DataFrame:
        """Tidy conditional modes, as ``as.data.frame(ranef(m))``.

        Columns grpvar, term, grp, condval, condsd.
        """
        frames = []
        for factor, modes in self.ranef.items():
            sds = self.ranef_sd[factor]
            for term in modes.columns:
                frames.append(
                    pd.DataFrame(
                        {
                            "grpvar": factor,
                            "term": term,
                            "grp": modes.index.astype(str),
                            "condval": modes[term].to_numpy(),
                            "condsd": sds[term].to_numpy(),
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True)

    # ---------------------------------------------------------------- predictions
    def _eta_fit(self, with_random: bool) -> np.ndarray:
        """Linear predictor on the fitted rows, in the caller's row order."""
        d = self._design
        n, p = d.nobs, d.p
        a = d.arrays
        eta = np.empty(n)
        eta[d.order] = a.X[:n] @ self._out.x[:p] + a.offset[:n]
        if with_random:
            for f, b in self._b.items():
                eta += np.sum(d.factor_Z[f] * b[d.factor_codes[f]], axis=1)
        return eta

    def _eta_new(
        self, newdata: pd.DataFrame, with_random: bool, allow_new_levels: bool
    ) -> np.ndarray:
        d = self._design
        if not isinstance(newdata, pd.DataFrame):
            raise DataError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
        X = np.asarray(d.fixed_spec.get_model_matrix(newdata, na_action="ignore"), dtype=float)
        cols = [_lme4_name(c) for c in d.fixed_spec.column_names]
        keep = [cols.index(c) for c in d.fixef_names]
        eta = X[:, keep] @ self.fixef.to_numpy()
        for expr in d.spec.offsets:
            eta = eta + _evaluate(expr, newdata, "offset")
        if not with_random:
            return eta
        for factor, b in self._b.items():
            columns = d.factor_columns[factor]
            missing = [c for c in columns if c not in newdata.columns]
            if missing:
                raise DataError(f"newdata lacks grouping column(s) {', '.join(missing)}")
            labels = newdata[list(columns)].astype(str).agg(":".join, axis=1)
            codes = pd.Index(d.levels[factor].astype(str)).get_indexer(labels)
            if not allow_new_levels and np.any(codes < 0):
                unseen = sorted(set(labels[codes < 0]))[:5]
                raise DataError(f"newdata has levels of {factor!r} not in the fit: {unseen}")
            Z = np.concatenate(
                [
                    np.ones((len(newdata), 1))
                    if s is None
                    else np.asarray(s.get_model_matrix(newdata, na_action="ignore"), float)
                    for s in d.random_specs[factor]
                ],
                axis=1,
            )
            # Unseen levels get the population-level prediction (random effects 0).
            contrib = np.sum(Z * b[np.maximum(codes, 0)], axis=1)
            eta = eta + np.where(codes >= 0, contrib, 0.0)
        return eta

    def predict(
        self,
        newdata: pd.DataFrame | None = None,
        re_form=None,
        type: str = "link",
        allow_new_levels: bool = True,
    ) -> np.ndarray:
        """Predictions, as lme4's ``predict.merMod``.

        Parameters
        ----------
        newdata : DataFrame, optional
            Rows to predict for; default the rows used in the fit.
        re_form : None or "~0"
            ``None`` includes the random effects (conditional prediction); ``"~0"`` (or ``"NA"``,
            ``False``) gives the population-level prediction.
        type : {"link", "response"}
        allow_new_levels : bool
            Unseen grouping levels get the population-level prediction; if False they raise.

        Returns
        -------
        numpy.ndarray
        """
        if type not in ("link", "response"):
            raise ValueError(f"type must be 'link' or 'response', got {type!r}")
        with_random = re_form is None or (
            isinstance(re_form, str) and re_form.strip() not in ("~0", "NA", "~ 0")
        )
        if re_form is False:
            with_random = False
        if newdata is None:
            eta = self._eta_fit(with_random)
        else:
            eta = self._eta_new(newdata, with_random, allow_new_levels)
        if type == "link":
            return eta
        return _np(self.family.link.linkinv, eta)

    def fitted(self) -> np.ndarray:
        """Fitted means (probabilities for the binomial), random effects included."""
        return self.predict(type="response")

    def residuals(self, type: str = "deviance") -> np.ndarray:
        """Residuals of the fitted rows: ``"deviance"`` (default), ``"pearson"``, ``"response"``,
        ``"working"``, as R's ``residuals.glmResp``."""
        d = self._design
        eta = self._eta_fit(True)
        mu = _np(self.family.link.linkinv, eta)
        y = d.y_mean
        if type == "response":
            return y - mu
        if type == "working":
            return (y - mu) / _np(self.family.link.mu_eta, eta)
        # On the proportion scale a binomial observation weighs as its number of trials.
        wt = d.prior_weights * (d.trials if isinstance(self.family, Binomial) else 1.0)
        if type == "pearson":
            if self.family.size_in_trials:
                variance = mu + mu**2 / self.dispersion
            else:
                variance = _np(self.family.variance, mu)
            return (y - mu) * np.sqrt(wt) / np.sqrt(variance)
        if type == "deviance":
            counts = y * d.trials
            dr = _np(self.family.dev_resid, counts, self._row_parameter(), mu) * d.prior_weights
            return np.sign(y - mu) * np.sqrt(np.maximum(dr, 0.0))
        raise ValueError(
            f"unknown residual type {type!r}; use deviance, pearson, response or working"
        )

    def simulate(self, nsim: int = 1, seed: int | None = None) -> pd.DataFrame:
        """Simulate responses from the fitted model with new random effects (lme4's default).

        Returns a DataFrame of ``nobs`` rows and ``nsim`` columns ``sim_1 ...``, on the scale of
        the response as given: 0/1 or proportions (binomial with weights), successes for
        ``cbind`` responses, counts for the Poisson. ``refit_batch`` takes it as it is.
        """
        d = self._design
        Y = simulate_responses(
            d,
            self.fixef.to_numpy(),
            self.theta,
            dispersion=self.dispersion,
            scale=self._scale,
            nsim=nsim,
            seed=seed,
        )
        return pd.DataFrame(Y, index=d.index, columns=[f"sim_{i + 1}" for i in range(nsim)])

    def refit_batch(self, responses, **kwargs):
        """Refit this model to each column of ``responses`` in one compiled, mapped call.

        ``responses`` is ``(nobs, R)`` (an array, or a DataFrame such as :meth:`simulate`'s), in
        the order and on the scale of this fit's response. Every replicate starts from this
        fit's estimates (as lme4's ``refit``). Keyword arguments go to
        :func:`glmm_jax.batch.fit_batch_design` (``chunk_size``, ``progress``, ``control``,
        ``start``).

        Returns
        -------
        BatchResult
        """
        from .batch import fit_batch_design

        kwargs.setdefault("control", self._control)
        kwargs.setdefault("start", self._out.x)
        if isinstance(self, LMMResult):
            kwargs.setdefault("reml", self.reml)
        return fit_batch_design(self._design, responses, **kwargs)

    #: Scale of the spherical random effects (``sigma`` for a linear mixed model).
    _scale = 1.0

    # ---------------------------------------------------------------- printing
    def coef_table(self) -> pd.DataFrame:
        """Estimate, Std. Error, z value, Pr(>|z|) for the fixed effects."""
        z = self.fixef / self.se
        p = 2 * scipy.stats.norm.sf(np.abs(z))
        return pd.DataFrame(
            {"Estimate": self.fixef, "Std. Error": self.se, "z value": z, "Pr(>|z|)": p}
        )

    def summary(self) -> Summary:
        """lme4-style summary; prints as text, renders as HTML in notebooks."""
        return Summary(self)

    def __repr__(self) -> str:
        return (
            f"<GLMMResult {self.formula!r} family={self.family} nobs={self.nobs} "
            f"loglik={self.loglik:.4f} converged={self.converged} singular={self.singular}>"
        )

    def _repr_html_(self) -> str:
        return self.summary()._repr_html_()


#: How summary() prints each column of coef_table(); p-values get ".3g".
_compiled_lmm_condvar = jax.jit(lmm_conditional_variances, static_argnames=("structure",))

_COEF_FORMATS = {
    "Estimate": ".5g",
    "Std. Error": ".5g",
    "df": ".2f",
    "z value": ".3f",
    "t value": ".3f",
}


def _num(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if np.isfinite(x) else "NaN"


class Summary:
    """The text of ``summary(glmerMod)``; ``str()`` for text, ``_repr_html_`` for notebooks."""

    def __init__(self, result: GLMMResult):
        self.result = result

    def _random_table(self) -> pd.DataFrame:
        r = self.result
        rows = []
        vc = r.varcorr
        for _, row in vc[vc.var2.isna()].iterrows():
            corr = vc[(vc.grp == row.grp) & vc.var2.notna() & (vc.var2 == row.var1)]
            rows.append(
                {
                    "Groups": row.grp,
                    "Name": row.var1,
                    "Variance": _num(row.vcov),
                    "Std.Dev.": _num(row.sdcor),
                    "Corr": " ".join(f"{c:.2f}" for c in corr.sdcor) if len(corr) else "",
                }
            )
        table = pd.DataFrame(rows)
        table["Name"] = table["Name"].fillna("")
        if not (table["Corr"] != "").any():
            table = table.drop(columns="Corr")
        dup = table["Groups"].duplicated()
        table.loc[dup, "Groups"] = ""
        return table

    def _coef_strings(self) -> pd.DataFrame:
        """``coef_table()`` as lme4 prints it, whatever its columns (z or t tests), with the
        significance stars of its last column, the p-value."""
        t = self.result.coef_table()
        out = pd.DataFrame(index=t.index)
        for column in t:
            spec = _COEF_FORMATS.get(column, ".3g")
            out[column] = [format(v, spec) for v in t[column]]
        out[""] = t[t.columns[-1]].map(_signif_stars)
        return out

    def _corr_strings(self) -> pd.DataFrame | None:
        r = self.result
        if len(r.fixef) < 2:
            return None
        sd = np.sqrt(np.diag(r.vcov.to_numpy()))
        C = r.vcov.to_numpy() / np.outer(sd, sd)
        short = [n[:6] if n != "(Intercept)" else "(Intr)" for n in r.fixef.index]
        rows = {}
        for i, name in enumerate(r.fixef.index[1:], start=1):
            rows[name] = [f"{C[i, j]:.3f}" if j < i else "" for j in range(len(short) - 1)]
        return pd.DataFrame.from_dict(rows, orient="index", columns=short[:-1])

    def _header(self) -> list[str]:
        r = self.result
        return [
            "Generalized linear mixed model fit by maximum likelihood (Laplace Approximation) "
            "[glmm_jax]",
            f" Family: {r.family.name}  ( {r.family.link.name} )",
            f"Formula: {r.formula}",
        ]

    def _fit_stats(self) -> pd.DataFrame:
        r = self.result
        return pd.DataFrame(
            [
                [
                    f"{r.aic:.1f}",
                    f"{r.bic:.1f}",
                    f"{r.loglik:.1f}",
                    f"{r.deviance:.1f}",
                    str(r.df_resid),
                ]
            ],
            columns=["AIC", "BIC", "logLik", "deviance", "df.resid"],
        )

    def _residual_quantiles(self) -> pd.DataFrame:
        res = self.result.residuals("pearson")
        q = np.quantile(res, [0, 0.25, 0.5, 0.75, 1])
        return pd.DataFrame([[f"{v:.4f}" for v in q]], columns=["Min", "1Q", "Median", "3Q", "Max"])

    def _groups_line(self) -> str:
        r = self.result
        groups = "; ".join(f"{f}, {n}" for f, n in r.ngroups.items())
        return f"Number of obs: {r.nobs}, groups:  {groups}"

    def _messages(self) -> list[str]:
        r = self.result
        msgs = []
        if r.singular:
            msgs.append("boundary (singular) fit: a variance component is estimated as zero")
        if not r.converged:
            msgs.append(
                f"Model failed to converge: {r.fit_info.status} "
                f"(max|grad| = {r.fit_info.gradient_norm:.3g})"
            )
        return msgs

    def __str__(self) -> str:
        lines = self._header()
        stats = self._fit_stats()
        lines += [""] if stats is None else ["", _format_table(stats, index=False), ""]
        lines += ["Scaled residuals: ", _format_table(self._residual_quantiles(), index=False), ""]
        lines += ["Random effects:", _left_table(self._random_table())]
        lines += [self._groups_line(), "", "Fixed effects:", _format_table(self._coef_strings())]
        lines += ["---", "Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1"]
        corr = self._corr_strings()
        if corr is not None:
            lines += ["", "Correlation of Fixed Effects:", _format_table(corr)]
        msgs = self._messages()
        if msgs:
            lines += [""] + msgs
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        esc = html.escape
        parts = [f"<p>{'<br>'.join(esc(h) for h in self._header())}</p>"]
        stats = self._fit_stats()
        if stats is not None:
            parts.append(stats.to_html(index=False))
        parts.append("<p><b>Random effects</b></p>" + self._random_table().to_html(index=False))
        parts.append(f"<p>{esc(self._groups_line())}</p>")
        parts.append("<p><b>Fixed effects</b></p>" + self._coef_strings().to_html())
        for m in self._messages():
            parts.append(f"<p><b>{esc(m)}</b></p>")
        return "<div class='glmm-jax-summary'>" + "\n".join(parts) + "</div>"


class LMMResult(GLMMResult):
    """A fitted linear mixed model (lme4's ``lmerMod``), created by :func:`glmm_jax.lmer`.

    Adds to :class:`GLMMResult`: ``sigma`` (residual standard deviation), ``reml``, and
    Satterthwaite degrees of freedom for the fixed effects (``df_satterthwaite``, lmerTest's
    method) with t tests in ``coef_table()``. ``vcov`` is ``sigma^2 (R_X' R_X)^{-1}``,
    conditional on ``theta`` as lme4's; ``varcorr`` is on the response scale with a
    ``Residual`` row; ``loglik`` is the REML log-likelihood for a REML fit (as lme4's
    ``logLik``) and ``deviance`` the REML criterion.
    """

    def __init__(self, design: Design, out, seconds: float, control, reml: bool):
        self.reml = reml
        # One transfer of the outputs to numpy, before anything reads them (a float() of a
        # device array is a transfer of its own, ~50 us on a small fit).
        out = _to_numpy(out)
        self._sigma = float(out.sigma)
        super().__init__(design, out, seconds, control)
        self.dispersion = self._sigma**2
        if reml:
            # The fit's REML criterion is that of the preconditioned X M; lme4's is of X.
            self.deviance -= 2.0 * design.logdet_M
            self.loglik = -0.5 * self.deviance
        self.df = design.p + design.structure.n_theta + 1
        self.aic = self.deviance + 2 * self.df
        self.bic = self.deviance + self.df * math.log(self.nobs)
        self.df_resid = self.nobs - self.df

    def _dispersion_slots(self) -> int:
        # sigma is profiled out of the fit: x = (beta, phi).
        return 0

    def _condvar_blocks(self) -> tuple:
        # Computed on first use, not by the fit (see lmm.LmmOutput).
        d, out = self._design, self._out
        with precision():
            return _compiled_lmm_condvar(
                d.arrays, out.x[d.p :], out.mask, out.sigma, structure=d.structure
            )

    @property
    def sigma(self) -> float:
        """Residual standard deviation."""
        return self._sigma

    def _fixef_covariance(self, out) -> np.ndarray:
        M = self._design.M
        return self._sigma**2 * (M @ out.cov_unscaled @ M.T)

    def _fixef_variances(self) -> np.ndarray:
        # The diagonal alone, in one call: vcov itself is built on first use.
        M = self._design.M
        return self._sigma**2 * np.einsum("ij,jk,ik->i", M, self._out.cov_unscaled, M)

    @property
    def _scale(self) -> float:
        return self.sigma

    @functools.cached_property
    def varcorr(self) -> pd.DataFrame:
        """Variances, covariances, sds and correlations on the response's scale, with the
        residual as the last row: lme4's ``as.data.frame(VarCorr(m))``."""
        vc = super().varcorr.copy()
        variance = vc.var2.isna()
        vc["vcov"] *= self.sigma**2
        vc.loc[variance, "sdcor"] *= self.sigma
        residual = pd.DataFrame(
            [("Residual", None, None, self.sigma**2, self.sigma)], columns=vc.columns
        )
        out = pd.concat([vc, residual], ignore_index=True)
        out["var2"] = out["var2"].astype(object).where(out["var2"].notna(), None)
        return out

    @functools.cached_property
    def df_satterthwaite(self) -> pd.Series:
        """Satterthwaite's denominator degrees of freedom of each fixed effect (lmerTest)."""
        from .lmm import satterthwaite_df

        d, out = self._design, self._out
        p = d.p
        free = tuple(int(i) for i in np.flatnonzero(out.mask > 0))
        with precision():
            df = jax.jit(satterthwaite_df, static_argnames=("free", "structure", "reml"))(
                out.x[p:],
                np.log(self.sigma),
                d.arrays,
                out.mask,
                d.M,
                free=free,
                structure=d.structure,
                reml=self.reml,
            )
        return pd.Series(np.asarray(df), index=d.fixef_names, name="df")

    def coef_table(self) -> pd.DataFrame:
        """Estimate, Std. Error, df (Satterthwaite), t value, Pr(>|t|) for the fixed effects."""
        t = self.fixef / self.se
        df = self.df_satterthwaite
        p = 2 * scipy.stats.t.sf(np.abs(t), df)
        return pd.DataFrame(
            {"Estimate": self.fixef, "Std. Error": self.se, "df": df, "t value": t, "Pr(>|t|)": p}
        )

    def summary(self) -> LMMSummary:
        """lmer/lmerTest-style summary; prints as text, renders as HTML in notebooks."""
        return LMMSummary(self)

    def __repr__(self) -> str:
        crit = "REML" if self.reml else "ML"
        return (
            f"<LMMResult {self.formula!r} {crit} nobs={self.nobs} sigma={self.sigma:.4g} "
            f"loglik={self.loglik:.4f} converged={self.converged} singular={self.singular}>"
        )


class LMMSummary(Summary):
    """The text of ``summary(lmerMod)`` with lmerTest's t tests."""

    def _header(self) -> list[str]:
        r = self.result
        how = "REML" if r.reml else "maximum likelihood"
        lines = [
            f"Linear mixed model fit by {how}. t-tests use Satterthwaite's method [glmm_jax]",
            f"Formula: {r.formula}",
        ]
        if r.reml:
            lines += ["", f"REML criterion at convergence: {r.deviance:.1f}"]
        return lines

    def _fit_stats(self) -> pd.DataFrame | None:
        r = self.result
        return None if r.reml else super()._fit_stats()

    def _residual_quantiles(self) -> pd.DataFrame:
        r = self.result
        res = r.residuals("pearson") / r.sigma
        q = np.quantile(res, [0, 0.25, 0.5, 0.75, 1])
        return pd.DataFrame([[f"{v:.4f}" for v in q]], columns=["Min", "1Q", "Median", "3Q", "Max"])
