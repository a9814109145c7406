"""Complete and quasi-complete separation of a binomial response by the fixed effects.

When some combination ``X d`` of the fixed-effect columns is ``>= 0`` wherever every trial
succeeded, ``<= 0`` wherever every trial failed, ``= 0`` where both occurred, and not zero
everywhere, the likelihood keeps rising along ``beta + t d`` as ``t`` grows: the
maximum-likelihood estimate is infinite (Albert and Anderson, 1984). Random effects do not
change this, since their penalty stays finite. The optimiser then stops where the gradient
has become tiny, at large coefficients with huge standard errors.

The check is Konis's linear programme (R's ``detectseparation``): maximise
``sum_i s_i x_i'd`` subject to those sign constraints and ``|d_j| <= 1``, where ``s_i`` is +1
for all-success rows and -1 for all-failure ones. A positive optimum is a separating direction.
It runs only when a fit looks separated (extreme fitted probabilities or no convergence), so
ordinary fits pay nothing.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

__all__ = ["SeparationWarning", "separating_direction", "looks_separated"]

#: |eta| beyond which a fitted probability is within 3e-7 of 0 or 1: rare in data that are
#: not separated, and where a separated fit's optimiser stops.
EXTREME_ETA = 15.0


class SeparationWarning(UserWarning):
    """The fixed effects separate a binomial response: some estimates are infinite."""


def looks_separated(eta: np.ndarray, converged: bool) -> bool:
    """Whether a binomial fit with linear predictor ``eta`` deserves the separation check."""
    return (not converged) or bool(np.any(np.abs(eta) > EXTREME_ETA))


def separating_direction(
    X: np.ndarray, y: np.ndarray, trials: np.ndarray, tol: float = 1e-7
) -> np.ndarray | None:
    """A direction ``d`` (``|d_j| <= 1``) in which the fixed effects separate, or ``None``.

    Parameters
    ----------
    X : (n, p) array
        Fixed-effect columns of the rows with at least one trial.
    y, trials : (n,) arrays
        Successes and trials of those rows.
    tol : float
        The optimum, relative to the scale of ``X``, above which the data count as separated.
    """
    at_one = y >= trials
    at_zero = y <= 0
    s = np.where(at_one, 1.0, -1.0)
    bound = at_one | at_zero
    A = s[bound, None] * X[bound]
    # Rows seen with both outcomes pin the direction to zero there. Repeated rows add
    # nothing, and designs with categorical predictors repeat a great deal.
    A = np.unique(np.round(A, 12), axis=0)
    interior = np.unique(np.round(X[~bound], 12), axis=0)
    p = X.shape[1]
    res = linprog(
        c=-A.sum(axis=0),
        A_ub=-A if len(A) else None,
        b_ub=np.zeros(len(A)) if len(A) else None,
        A_eq=interior if len(interior) else None,
        b_eq=np.zeros(len(interior)) if len(interior) else None,
        bounds=[(-1.0, 1.0)] * p,
        method="highs",
    )
    if res.status != 0:
        return None
    scale = max(float(np.abs(X).max()), 1e-300) * max(len(A), 1)
    if -res.fun <= tol * scale:
        return None
    return res.x
