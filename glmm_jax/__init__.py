"""glmm_jax: generalized linear mixed models by maximum likelihood, lme4-style, on JAX.

>>> import glmm_jax as gj
>>> m = gj.glmer("success ~ schavg + (1 | school)", gj.datasets.load_exam(), family="binomial")
>>> print(m.summary())  # doctest: +SKIP
"""

from . import datasets
from ._config import enable_compilation_cache, prefer_synchronous_cpu_dispatch
from .batch import BatchResult, fit_batch, fit_batch_design
from .bootstrap import BootstrapResult, bootstrap
from .design import DataError, build_design
from .families import Binomial, Family, Gaussian, Poisson, binomial, gaussian, get_family, poisson
from .fit import fit_design, fit_lmm_design, glmer, glmer_nb, lmer
from .formula import FormulaError, FormulaSpec, parse_formula
from .links import Link, get_link
from .lmm import LmmOutput, fit_lmm_arrays
from .optimize import Control, FitOutput, Status, fit_arrays
from .power import PowerResult, power
from .results import ConvergenceWarning, FitInfo, GLMMResult, LMMResult, SingularFitWarning
from .separation import SeparationWarning
from .simulate import simulate_responses

# Importing the modules above starts no JAX backend, so this still decides: a small fit's two
# thread hand-offs cost more than the fit (see _config.prefer_synchronous_cpu_dispatch;
# GLMM_JAX_SYNC_DISPATCH=0 keeps JAX's asynchronous default).
prefer_synchronous_cpu_dispatch()

__version__ = "0.1.0"

__all__ = [
    "glmer",
    "glmer_nb",
    "lmer",
    "fit_batch",
    "fit_batch_design",
    "BatchResult",
    "bootstrap",
    "BootstrapResult",
    "power",
    "PowerResult",
    "simulate_responses",
    "fit_design",
    "fit_lmm_design",
    "fit_arrays",
    "fit_lmm_arrays",
    "LmmOutput",
    "build_design",
    "parse_formula",
    "FormulaSpec",
    "FormulaError",
    "DataError",
    "Family",
    "Binomial",
    "Poisson",
    "Gaussian",
    "binomial",
    "poisson",
    "gaussian",
    "get_family",
    "Link",
    "get_link",
    "Control",
    "FitOutput",
    "Status",
    "GLMMResult",
    "LMMResult",
    "FitInfo",
    "ConvergenceWarning",
    "SingularFitWarning",
    "SeparationWarning",
    "enable_compilation_cache",
    "prefer_synchronous_cpu_dispatch",
    "datasets",
]
