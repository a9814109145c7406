"""Parametric bootstrap of a fitted model, as lme4's ``bootMer`` and MixedModels.jl's
``parametricbootstrap``.

Simulate responses from the fit (new random effects, lme4's default), refit every one in a
single batch (``batch.py``), and read the distribution of the estimates.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .batch import BatchResult, _warn_failures

__all__ = ["BootstrapResult", "bootstrap"]


def bootstrap(result, nsim: int = 1000, seed: int | None = None, **kwargs) -> BootstrapResult:
    """Parametric bootstrap of a fitted GLMM or LMM.

    Parameters
    ----------
    result : GLMMResult or LMMResult
        The fit to bootstrap.
    nsim : int
        Number of bootstrap replicates.
    seed : int, optional
        Seed of the simulation; the same seed gives the same replicates.
    **kwargs
        Passed to ``result.refit_batch`` (``chunk_size``, ``progress``, ``control``).

    Returns
    -------
    BootstrapResult

    Examples
    --------
    >>> import glmm_jax as gj
    >>> m = gj.glmer("success ~ schavg + (1 | school)", gj.datasets.load_exam())
    >>> boot = gj.bootstrap(m, nsim=100, seed=1)
    >>> list(boot.confint().columns)
    ['2.5 %', '97.5 %']
    """
    if nsim < 1:
        raise ValueError(f"nsim must be at least 1, got {nsim}")
    batch = result.refit_batch(result.simulate(nsim=nsim, seed=seed), **kwargs)
    _warn_failures(batch, "bootstrap")
    return BootstrapResult(result, batch)


class BootstrapResult:
    """The replicates of a parametric bootstrap.

    Attributes
    ----------
    original : GLMMResult or LMMResult
        The bootstrapped fit.
    batch : BatchResult
        Every replicate's fit.
    estimates : DataFrame
        ``nsim x`` parameters: the fixed effects, then the variance components
        (``BatchResult.varcorr``'s names).
    """

    def __init__(self, original, batch: BatchResult):
        self.original = original
        self.batch = batch
        self.estimates = batch.estimates()

    @property
    def nsim(self) -> int:
        return self.batch.nsim

    @property
    def n_failed(self) -> int:
        """Replicates whose fit did not converge (left out of the summaries)."""
        return int((~self.batch.converged).sum())

    def _used(self) -> pd.DataFrame:
        return self.estimates[self.batch.converged]

    def confint(self, level: float = 0.95) -> pd.DataFrame:
        """Percentile intervals of every parameter (lme4's ``confint(method = "boot")``),
        over the replicates that converged."""
        if not 0 < level < 1:
            raise ValueError(f"level must be between 0 and 1, got {level}")
        a = (1 - level) / 2
        q = self._used().quantile([a, 1 - a]).T
        q.columns = [f"{100 * a:.3g} %", f"{100 * (1 - a):.3g} %"]
        return q

    def std_error(self) -> pd.Series:
        """Bootstrap standard deviation of every parameter."""
        return self._used().std(ddof=1).rename("std_error")

    def bias(self) -> pd.Series:
        """Mean of the replicates less the original estimate, for every parameter."""
        original = _original_estimates(self.original, self.estimates.columns)
        return (self._used().mean() - original).rename("bias")

    def to_frame(self) -> pd.DataFrame:
        """The replicates' tidy rows (``BatchResult.to_frame``)."""
        return self.batch.to_frame()

    def __repr__(self) -> str:
        return (
            f"<BootstrapResult: {self.nsim} replicates of {self.original.formula!r}, "
            f"{self.n_failed} failed>"
        )


def _original_estimates(result, columns) -> pd.Series:
    """The fit's own estimates under the batch's parameter names."""
    from .batch import _variance_components

    sigma = getattr(result, "sigma", None)
    has_sigma = "sigma" in columns
    vc = _variance_components(
        np.asarray(result.theta)[None, :],
        result._design.structure,
        np.array([result._scale]),
        np.array([sigma]) if has_sigma else None,
    )
    return pd.concat([result.fixef, vc.iloc[0]])
