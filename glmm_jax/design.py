"""DataFrame + formula -> the arrays of a model, and what ``predict`` needs for new data.

This module and ``results.py`` are the only places that touch pandas and formulaic. The arrays
handed to the compiled fit are

* sorted by grouping level (segment sums then walk memory in order),
* padded to bucketed sizes (rows with weight 0, levels with no rows), so datasets of the same
  model structure and similar size share one compiled program,
* preconditioned: ``X`` is replaced by ``X M`` with orthonormal-like columns (``M`` from a
  pivoted QR), so the optimiser sees a well-scaled problem whatever the units of the
  predictors; estimates are mapped back with ``beta = M gamma``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings

import formulaic
import numpy as np
import pandas as pd
from scipy.linalg import lapack

from .blocked import DenseCoupling, SparseCoupling
from .families import Binomial, Family
from .formula import FormulaError, FormulaSpec, parse_formula
from .laplace import ModelArrays
from .structure import ReStructure, Term

__all__ = ["Design", "build_design", "bucket", "DataError"]


class DataError(ValueError):
    """The data cannot be used with the model; the message names the column or problem."""


@functools.lru_cache(maxsize=1024)
def bucket(n: int, minimum: int = 16) -> int:
    """Smallest size ``>= n`` of the form ``2^k * {1, 1.25, 1.5, 1.75}`` (at most 25% padding)."""
    size = minimum
    while size < n:
        k = size.bit_length() - 1
        base = 1 << k
        steps = [base + base // 4 * j for j in range(1, 5)]
        size = next(s for s in steps if s > size)
    return size


def rest_bucket(levels: int) -> int:
    """Padded levels of a grouping factor after the largest: :func:`bucket` up to 512, then
    the next multiple of 64. Their effects share one dense block whose factorisation costs the
    cube of its size, so the 25% steps of ``bucket`` would cost up to twice the time (InstEval's
    1,128 instructors: 1,152 rather than 1,280, and its Cholesky and inverse 27% cheaper)."""
    return bucket(levels, 16) if levels <= 512 else -(-levels // 64) * 64


#: Designs of at most this many rows are permuted into their padded arrays without first
#: testing for constant columns (the test costs more than the permutation there).
SMALL_ROWS = 4096


class _Columns:
    """A DataFrame whose columns the design reads as arrays, each once.

    pandas 3 builds a new Series on every ``df[name]`` (~6 us), where the design needs only
    the values: :meth:`values` gives them as pandas stores them, through
    ``DataFrame._get_column_array`` (~0.4 us; a long-standing internal method, with
    ``df.iloc[:, i]`` as the fallback should it go). Offers what the design's readers use:
    ``values(name)``, ``columns``, ``len``, ``index``; formulaic gets the frame itself
    (:func:`_frame_of`).
    """

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self.columns = frame.columns
        self.index = frame.index
        self._read: dict = {}

    def values(self, name):
        """Column ``name``'s values: a read-only numpy array for numpy dtypes (a view of the
        frame's data), pandas' ExtensionArray (Categorical, string, nullable) otherwise."""
        values = self._read.get(name)
        if values is None:
            values = self._read[name] = _column_values(self.frame, name)
        return values

    def __len__(self) -> int:
        return len(self.index)


def _column_values(frame: pd.DataFrame, name):
    """:meth:`_Columns.values` of a DataFrame."""
    loc = frame.columns.get_loc(name)
    if not isinstance(loc, (int, np.integer)):  # a slice or mask: the name is not unique
        raise DataError(f"column {name!r} appears more than once in data")
    get = getattr(frame, "_get_column_array", None)
    if get is not None:
        values = get(loc)
    else:
        column = frame.iloc[:, loc]
        values = column.to_numpy() if isinstance(column.dtype, np.dtype) else column.array
    if isinstance(values, np.ndarray):
        # The design only reads; a read-only view makes sure of it for the user's data.
        values = values.view()
        values.flags.writeable = False
    return values


def _read_column(data, name):
    """Column ``name``'s values from a :class:`_Columns` or a DataFrame (prediction's)."""
    return data.values(name) if isinstance(data, _Columns) else _column_values(data, name)


def _frame_of(data) -> pd.DataFrame:
    """The DataFrame behind ``data`` (a :class:`_Columns` or a DataFrame), for formulaic."""
    return data.frame if isinstance(data, _Columns) else data


def _lme4_name(name: str) -> str:
    return "(Intercept)" if name == "Intercept" else name


@functools.lru_cache(maxsize=256)
def _required_variables(spec: FormulaSpec) -> tuple[str, ...]:
    exprs = [spec.fixed, *spec.offsets, *spec.response.exprs]
    exprs += [t.expr for t in spec.random]
    names: list[str] = []
    for expr in exprs:
        try:
            found = formulaic.Formula(f"0 + {expr}" if expr not in ("1", "0") else expr)
            names += sorted(found.required_variables)
        except Exception as exc:  # formulaic's parse errors
            # formulaic colours the offending token for terminals; a message is plain text.
            reason = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
            raise FormulaError(
                f"cannot parse {expr!r} in formula {spec.formula!r}: {reason}"
            ) from None
    for term in spec.random:
        names += list(term.group)
    return tuple(dict.fromkeys(names))


def _numeric_or_refuse(col, what: str, expr: str) -> np.ndarray:
    """``col`` (a column's values, or a Series) as floats, or a :class:`DataError` naming
    ``what`` if it is not numeric.

    Strings are refused rather than parsed ("1" and "yes" alike), and so are categoricals:
    R's model frame does the same for a numeric role.
    """
    dtype = col.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "biuf":
        # Plain numpy numbers: pandas' dtype tests below cost ~7 us each.
        return np.asarray(col, dtype=float)
    if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)) or (
        isinstance(dtype, pd.CategoricalDtype)
    ):
        raise DataError(f"{what} {expr!r} must be numeric, got {dtype} values")
    return np.asarray(col, dtype=float)


def _evaluate(expr: str, data: pd.DataFrame, what: str) -> np.ndarray:
    """A numeric vector from a column name or an expression on the columns."""
    name = expr[1:-1] if expr.startswith("`") and expr.endswith("`") else expr
    if name in data.columns:
        return _numeric_or_refuse(_read_column(data, name), what, expr)
    try:
        with np.errstate(all="ignore"):  # log(0), 1/0: non-finite values are reported below
            mm = formulaic.model_matrix(f"0 + I({expr})", _frame_of(data), na_action="ignore")
    except Exception as exc:
        raise DataError(f"cannot evaluate {what} {expr!r}: {exc}") from None
    if mm.shape[1] != 1:
        raise DataError(f"{what} {expr!r} must be numeric, not categorical")
    return _numeric_or_refuse(mm.iloc[:, 0], what, expr)


def _factor_codes(data: pd.DataFrame, group: tuple[str, ...]) -> tuple[np.ndarray, pd.Index]:
    """Integer codes and level labels of a grouping factor (an interaction if several columns)
    on complete rows (no missing values in ``group``'s columns).

    Levels keep a Categorical's order (else sorted, as R's ``factor``); unused levels are dropped.
    """
    cats = []
    for col in group:
        s = _read_column(data, col)
        if isinstance(s.dtype, pd.CategoricalDtype):
            c = s
            # Dropping unused levels copies; skip it when every level occurs (the usual case).
            # The rows are complete here (no code -1), so the codes count as they are.
            if not np.bincount(c.codes, minlength=len(c.categories)).all():
                c = c.remove_unused_categories()
        else:
            c = pd.Categorical(s)
        cats.append(c)
    if len(cats) == 1:
        codes = cats[0].codes.astype(np.int64)
        labels = cats[0].categories.rename(group[0])
    else:
        # Interaction a:b: codes in the order of (a, b), labels "a:b" as lme4 writes them.
        combined = np.zeros(len(data), dtype=np.int64)
        for c in cats:
            combined = combined * len(c.categories) + np.asarray(c.codes)
        used, codes = np.unique(combined, return_inverse=True)
        parts = []
        rem = used.copy()
        for c in reversed(cats):
            parts.append(np.asarray(c.categories)[rem % len(c.categories)].astype(str))
            rem //= len(c.categories)
        labels = pd.Index(
            [":".join(p) for p in zip(*reversed(parts), strict=True)], name=":".join(group)
        )
    return codes, labels


@dataclasses.dataclass
class Design:
    """A model's arrays and the metadata to interpret them.

    Attributes
    ----------
    spec : FormulaSpec
    family : Family
    structure : ReStructure
    arrays : ModelArrays
        Padded, sorted numpy arrays for the compiled fit.
    nobs : int
        Observations used (after dropping incomplete rows).
    fixef_names : list of str
    M : (p, p) array
        ``beta = M gamma`` maps preconditioned coefficients back to the user's columns.
    levels : dict
        Grouping factor -> level labels (``pd.Index``), largest factor first (lme4's order).
    order : (nobs,) array
        Position in the used rows of each sorted row.
    index : pd.Index
        Index labels of the used rows of the caller's DataFrame.
    y_mean : (nobs,) array
        Response on the mean's scale (a proportion for the binomial), in data order.
    fixed_spec, random_specs
        formulaic model specs to rebuild the matrices for new data: one for the fixed part,
        and per grouping factor one per random term (``None`` for a random intercept, whose
        column is all ones).
    factor_columns : dict
        Grouping factor -> the data columns whose interaction it is.
    factor_codes, factor_Z : dict
        Grouping factor -> level code and random-effect covariates of each used row, in data
        order.
    """

    spec: FormulaSpec
    family: Family
    structure: ReStructure
    arrays: ModelArrays
    nobs: int
    fixef_names: list[str]
    M: np.ndarray
    levels: dict[str, pd.Index]
    order: np.ndarray
    index: pd.Index
    y_mean: np.ndarray
    trials: np.ndarray
    prior_weights: np.ndarray
    offset: np.ndarray
    fixed_spec: object
    random_specs: dict[str, list]
    factor_columns: dict[str, tuple[str, ...]]
    factor_codes: dict[str, np.ndarray]
    factor_Z: dict[str, np.ndarray]
    dropped_columns: list[str]
    re_scale: dict[str, np.ndarray]

    @property
    def p(self) -> int:
        return len(self.fixef_names)

    @functools.cached_property
    def logdet_M(self) -> float:
        """``log |det M|``: ``M`` is triangular (the inverse of a QR factor, see
        :func:`_preconditioner`), so the sum of the logs of its diagonal."""
        # In Python over the p entries: numpy's four calls cost ~4 us on every lmer fit.
        return sum(math.log(abs(m)) for m in self.M.diagonal().tolist())

    @functools.cached_property
    def theta_scale(self) -> np.ndarray:
        """lme4's ``theta`` is the fit's ``theta`` times this (see :func:`re_column_scale`).

        The arrays hold ``Z S^-1`` per factor, so the fit's ``Lambda'`` is ``S Lambda``; a
        ``theta`` entry in row ``r`` of its factor's block is divided by ``S[r]``.
        """
        factors = self.structure.factors
        layout = self.structure.theta_layout()
        return np.array([1.0 / self.re_scale[factors[f]][r] for f, r, _ in layout])


def _check_columns(data: pd.DataFrame, names: list[str], formula: str) -> None:
    missing = [n for n in names if n not in data.columns]
    if missing:
        listed = ", ".join(repr(m) for m in missing)
        raise DataError(
            f"column{'s' if len(missing) > 1 else ''} {listed} in formula {formula!r} not found "
            f"in data; available columns: {', '.join(map(str, data.columns))}"
        )


def _vector_arg(value, data: pd.DataFrame, name: str) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in data.columns:
            raise DataError(f"{name} column {value!r} not found in data")
        value = data[value]
    # A copy: the design keeps it (prior weights, offset), and the caller's array stays theirs.
    arr = np.array(value, dtype=float).reshape(-1)
    if arr.shape[0] != len(data):
        raise DataError(f"{name} has length {arr.shape[0]} but data has {len(data)} rows")
    return arr


@dataclasses.dataclass(frozen=True)
class NumericColumns:
    """A fixed part made only of numeric columns (``x + z``, ``0 + x``), built without formulaic.

    Gives the matrix formulaic would, in microseconds instead of milliseconds; it offers the
    two members of formulaic's ``ModelSpec`` that prediction uses.
    """

    intercept: bool
    columns: tuple[str, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        return (("Intercept",) if self.intercept else ()) + self.columns

    def matrix(self, data: pd.DataFrame) -> np.ndarray:
        """The model matrix as a numpy array."""
        values = np.empty((len(data), len(self.column_names)))
        if self.intercept:
            values[:, 0] = 1.0
        for j, c in enumerate(self.columns, start=int(self.intercept)):
            values[:, j] = np.asarray(_read_column(data, c), dtype=float)
        return values

    def get_model_matrix(self, data: pd.DataFrame, na_action=None) -> pd.DataFrame:
        return pd.DataFrame(self.matrix(data), columns=list(self.column_names), index=data.index)

    @classmethod
    def match(cls, rhs: str, data: pd.DataFrame) -> NumericColumns | None:
        """The spec for ``rhs`` if it is ``[0 +|1 +] col + col ...`` of numeric columns."""
        if "-" in rhs:
            return None
        terms = [t.strip() for t in rhs.split("+")]
        columns = tuple(t for t in terms if t not in ("0", "1"))
        for c in columns:
            if not c.isidentifier() or c not in data.columns:
                return None
            dtype = _read_column(data, c).dtype
            if isinstance(dtype, np.dtype) and dtype.kind in "iuf":
                continue  # plain numeric: pandas' dtype tests below take ~7 us each
            if not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
                return None
        if len(set(columns)) != len(columns):
            return None
        return cls(intercept="0" not in terms, columns=columns)


def _fixed_matrix(spec: FormulaSpec, data: pd.DataFrame):
    simple = NumericColumns.match(spec.fixed, data)
    if simple is not None:
        names = [_lme4_name(c) for c in simple.column_names]
        return simple.matrix(data), names, simple
    with np.errstate(all="ignore"):  # log(0), 1/0: non-finite values are reported later
        mm = formulaic.model_matrix(spec.fixed, _frame_of(data), na_action="ignore")
    names = [_lme4_name(c) for c in mm.columns]
    return np.asarray(mm, dtype=float), names, mm.model_spec


def _drop_aliased(X: np.ndarray, names: list[str]):
    """Drop columns that are linear combinations of earlier ones, with a warning (lme4 does).

    Column order decides which of an aliased set survives: the earlier columns, as in lme4.
    Returns ``(X, names, dropped, R)`` with ``R`` the triangular QR factor of the kept columns
    of ``X``, reused for the preconditioner.
    """
    if X.shape[1] == 0:
        return X, names, [], np.zeros((0, 0))
    R = _qr_r(X)
    # The rank test is that of the columns scaled to unit length, X / s = Q (R / s): the norms
    # of R's columns are X's (no pass over the rows for them).
    # (In Python over the p columns: the array calls cost ~1 us each on a small design.)
    # With fewer rows than columns R has min(n, p) rows: the columns past them are dependent.
    squares = np.einsum("ij,ij->j", R, R).tolist()
    diagonal = R.diagonal().tolist()
    d = [
        abs(r) / math.sqrt(s) if s > 0 else abs(r) for r, s in zip(diagonal, squares, strict=False)
    ]
    d_max = max(max(d, default=0.0), 1e-300)
    keep = [j for j, dj in enumerate(d) if dj > 1e-7 * d_max]
    if len(keep) == X.shape[1]:
        return X, names, [], R
    dropped = [names[j] for j in range(X.shape[1]) if j not in set(keep)]
    warnings.warn(
        f"fixed-effect model matrix is rank deficient: dropping {len(dropped)} column(s): "
        f"{', '.join(dropped)}",
        stacklevel=4,
    )
    X = X[:, keep]
    return X, [names[j] for j in keep], dropped, _qr_r(X)


@functools.lru_cache(maxsize=64)
def _upper(rows: int, cols: int) -> np.ndarray:
    upper = np.triu(np.ones((rows, cols)))
    upper.flags.writeable = False
    return upper


def _qr_r(X: np.ndarray) -> np.ndarray:
    """The triangular factor ``R`` of ``X = Q R``, ``(min(n, p), p)``, as ``np.linalg.qr(X,
    mode="r")`` gives it, straight from LAPACK's ``geqrf`` (numpy's wrapper and ``np.triu``
    cost ~8 us on a small design, the routine ~1 us)."""
    factored = lapack.dgeqrf(np.asarray(X, dtype=np.float64))[0]
    k = min(X.shape)
    return factored[:k] * _upper(k, X.shape[1])


def _preconditioner(R: np.ndarray, n: float) -> np.ndarray:
    """``M`` such that ``X M`` has orthogonal columns of unit root-mean-square (``X = Q R``);
    ``R`` is square and of full rank (:func:`_drop_aliased` made it so)."""
    if R.shape[0] == 0:
        return np.zeros((0, 0))
    # LAPACK's triangular inverse: ~1 us, where np.linalg.inv's wrapper costs ~6 (and
    # scipy.linalg.inv's checks 0.6 ms).
    return lapack.dtrtri(R)[0] * np.sqrt(max(n, 1.0))


def _response(spec: FormulaSpec, family: Family, data: pd.DataFrame, weights):
    """``(y counts, trials, prior weights, y on the mean scale)`` for the family.

    Only evaluation and the errors of kind (a non-numeric response, cbind() outside the
    binomial); the values are checked by :func:`_check_response` once incomplete rows are gone.
    """
    r = spec.response
    if r.kind == "cbind":
        if not isinstance(family, Binomial):
            raise DataError(
                f"cbind() responses are only for the binomial family, not {family.name}"
            )
        s = _evaluate(r.exprs[0], data, "cbind() successes")
        f = _evaluate(r.exprs[1], data, "cbind() failures")
        trials = s + f
        w = np.ones_like(s) if weights is None else weights
        with np.errstate(all="ignore"):
            ymean = np.divide(s, trials, out=np.zeros_like(s), where=trials > 0)
        return s, trials, w, ymean
    expr = r.exprs[0]
    name = expr[1:-1] if expr.startswith("`") and expr.endswith("`") else expr
    col = _read_column(data, name) if name in data.columns else None
    if isinstance(family, Binomial) and col is not None:
        if isinstance(col.dtype, pd.CategoricalDtype):
            # A two-level factor response: the first level is failure, as in R.
            levels = col.remove_unused_categories().categories
            if len(levels) != 2:
                raise DataError(
                    f"binomial response {name!r} must be 0/1, proportions, or a two-level "
                    f"factor; it has {len(levels)} levels"
                )
            col = np.asarray(col) == levels[1]
        elif not (pd.api.types.is_numeric_dtype(col.dtype) or col.dtype == bool):
            raise DataError(
                f"binomial response {name!r} must be numeric (0/1 or proportions), boolean, "
                f"or a two-level pandas Categorical (its first category is failure), not "
                f"{col.dtype} values"
            )
    v = (
        _evaluate(expr, data, "response")
        if col is None
        else _numeric_or_refuse(col, "response", expr)
    )
    if isinstance(family, Binomial):
        trials = np.ones_like(v) if weights is None else weights
        return v * trials, trials, np.ones_like(v), v
    w = np.ones_like(v) if weights is None else weights
    return v, np.ones_like(v), w, v


def _values(mask: np.ndarray, adjective: str) -> str:
    """``"1 negative value"``, ``"3 negative values"``: how many ``mask`` marks."""
    k = int(np.sum(mask))
    return f"{k} {adjective} value{'s' if k != 1 else ''}"


def _check_response(spec: FormulaSpec, family: Family, y, trials, ymean, weighted: bool):
    """Refuse responses outside the family's support; warn about non-integer counts."""
    expr = spec.response.exprs[0]
    if isinstance(family, Binomial):
        if spec.response.kind == "cbind":
            negative = (y < 0) | (trials - y < 0)
            if np.any(negative):
                raise DataError(
                    "cbind() successes and failures must be non-negative counts; found "
                    f"{_values(negative, 'negative')}"
                )
        elif np.any(outside := (ymean < 0) | (ymean > 1)):
            if weighted:
                raise DataError(
                    f"binomial response {expr!r} with weights= (the numbers of trials) must be "
                    f"a proportion in [0, 1]; found {_values(outside, 'out-of-range')}"
                )
            raise DataError(
                f"binomial response {expr!r} must lie in [0, 1] (0/1 or proportions with "
                "weights=trials), or use cbind(successes, failures)"
            )
        counts = np.concatenate([y, trials - y])
        if np.any(np.abs(counts - np.round(counts)) > 1e-7):
            warnings.warn("non-integer number of successes in a binomial GLMM", stacklevel=4)
    elif family.name in ("poisson", "negative_binomial"):
        if np.any(y < 0):
            raise DataError(
                f"{family.name} response {expr!r} must be a non-negative count; "
                f"found {_values(y < 0, 'negative')}"
            )
        fractional = np.abs(y - np.round(y)) > 1e-7
        if np.any(fractional):
            # R's dpois and dnbinom warn and return 0 here; the gamma-function extension of
            # the log-density is used instead, so the fit goes on (a quasi-likelihood).
            warnings.warn(
                f"{family.name} response {expr!r} has {_values(fractional, 'non-integer')}; "
                "the log-likelihood uses the gamma-function extension of the log-density there",
                stacklevel=4,
            )
    elif family.name in ("Gamma", "inverse.gaussian") and np.any(y <= 0):
        raise DataError(
            f"{family.name} response {expr!r} must be positive; {int(np.sum(y <= 0))} "
            "values are zero or negative"
        )


#: Effects outside the largest grouping factor are held in one dense block (``blocked.py``):
#: above this many, its ``R x R`` factor would exhaust memory, so such models are refused.
MAX_DENSE_EFFECTS = 20_000
#: Pairs of (level, effect) pairs that share a level of the largest factor, at most.
MAX_PAIR_PAIRS = 50_000_000
#: Entries of the dense layout of the coupling block, at most (``blocked.DenseCoupling``).
MAX_DENSE_COUPLING = 20_000_000
#: The dense layout is used while its product costs at most this many times the sparse
#: layout's pairs of pairs (a matrix product runs several times faster per entry than the
#: gathers and scatters of the sparse one).
DENSE_COST_RATIO = 4


@dataclasses.dataclass
class _Factor:
    """One grouping factor of a design: its levels, rows and terms, before padding."""

    name: str
    columns: tuple[str, ...]
    codes: np.ndarray
    labels: pd.Index
    Z: np.ndarray
    terms: list
    specs: list


def _grouping_factors(spec: FormulaSpec, df: pd.DataFrame) -> list[_Factor]:
    """The model's grouping factors, largest first, with their random-effect columns.

    lme4 orders random terms by decreasing number of levels (stable), and so does ``theta``;
    the largest factor keeps a block-diagonal Hessian block (``blocked.py``).
    """
    factors: dict[str, _Factor] = {}
    for rt in spec.random:
        name = rt.group_name
        if name not in factors:
            codes, labels = _factor_codes(df, rt.group)
            factors[name] = _Factor(name, rt.group, codes, labels, None, [], [])
        f = factors[name]
        if rt.expr.strip() == "1":
            # The random intercept, by far the commonest term: no formulaic round trip.
            cols, Zt = ["(Intercept)"], np.ones((len(df), 1))
            f.specs.append(None)
        elif (simple := NumericColumns.match(rt.expr, df)) is not None:
            # Numeric columns such as (Days | Subject): the matrix in microseconds, where
            # formulaic takes a millisecond (most of a small lmer fit's time).
            cols, Zt = [_lme4_name(c) for c in simple.column_names], simple.matrix(df)
            f.specs.append(simple)
        else:
            with np.errstate(all="ignore"):  # non-finite values are reported by the caller
                mm = formulaic.model_matrix(rt.expr, _frame_of(df), na_action="ignore")
            cols = [_lme4_name(c) for c in mm.columns]
            f.specs.append(mm.model_spec)
            Zt = np.asarray(mm, dtype=float)
        if rt.correlated:
            f.terms.append(Term(name, tuple(cols)))
        else:
            f.terms.extend(Term(name, (c,)) for c in cols)
        f.Z = Zt if f.Z is None else np.concatenate([f.Z, Zt], axis=1)
    return sorted(factors.values(), key=lambda f: -len(f.labels))


@functools.lru_cache(maxsize=256)
def _re_structure(terms: tuple[Term, ...]) -> ReStructure:
    """One :class:`ReStructure` per distinct structure: its layouts are cached on the instance
    (~20 us to rebuild on every fit), and jit compares a static argument it has seen before
    by identity first."""
    return ReStructure(terms)


def _check_factors(ordered: list[_Factor], n: int, family: Family, trials) -> None:
    """Refuse grouping factors whose variance cannot be estimated, and designs too large."""
    for f in ordered:
        G = len(f.labels)
        if G < 2:
            raise DataError(
                f"grouping factor {f.name!r} has {G} level in the data used; a random effect "
                "needs at least 2 levels"
            )
        if G == n and not family.observation_level_identifiable(trials):
            raise DataError(
                f"grouping factor {f.name!r} has one level per observation ({n}): its variance "
                f"cannot be identified for this {family.name} response (an observation-level "
                "random effect needs counts, or binomial responses with more than one trial)"
            )
    rest = sum(len(f.labels) * f.Z.shape[1] for f in ordered[1:])
    if rest > MAX_DENSE_EFFECTS:
        raise DataError(
            f"{rest} random effects lie outside the largest grouping factor "
            f"({ordered[0].name!r}); the dense block that couples them would need "
            f"{rest**2 * 8 / 2**30:.1f} GiB, and at most {MAX_DENSE_EFFECTS} are supported"
        )


def _coupling(group: np.ndarray, rest: np.ndarray, n_pad: int, G_pad: int, q: int, R: int):
    """Index arrays of the blocked Cholesky factorisation (``blocked.py``), padded.

    ``group`` holds the sorted first-factor codes of the used rows, ``rest`` ``(n, C)`` the
    position in ``u_r`` of each row's other effects, ``q`` the first factor's effects per level.
    The dense layout is chosen where its matrix product costs at most a few times the sparse
    layout's pairs of pairs (crossed designs); the sparse one otherwise (nested designs).
    """
    n, C = rest.shape
    if C == 0:
        # One grouping factor: nothing to couple.
        none = np.zeros(0, np.int32)
        rows0 = np.zeros((n_pad, 0), np.int32)
        return SparseCoupling(rows0, rows0, none, none, none, none, none, none)
    key = (group[:, None].astype(np.int64) * R + rest).reshape(-1)
    pairs, obs_pair = np.unique(key, return_inverse=True)
    P = len(pairs)
    pair_level, pair_rest = pairs // R, pairs % R
    # Every pair of pairs p <= p' that share a level: pairs are sorted by level, so the
    # partners of pair p are the rest of its level's contiguous run.
    per_level = np.bincount(pair_level, minlength=G_pad)
    starts = np.cumsum(per_level) - per_level
    partners = per_level[pair_level] - (np.arange(P) - starts[pair_level])
    M = int(partners.sum())

    def rows(a, value):
        a = a.reshape(n, C).astype(np.int32)
        return np.pad(a, ((0, n_pad - n), (0, 0)), constant_values=value)

    dense_size, ordered_pairs = G_pad * R * q, 2 * M - P
    if dense_size <= MAX_DENSE_COUPLING and dense_size * R <= DENSE_COST_RATIO * ordered_pairs * q:
        return DenseCoupling(rest=rows(rest, 0), obs_cell=rows(key, 0))
    if M > MAX_PAIR_PAIRS:
        raise DataError(
            f"the grouping factors cross too densely: {M} pairs of effects share a level of "
            f"the largest factor (at most {MAX_PAIR_PAIRS} are supported)"
        )
    left = np.repeat(np.arange(P), partners)
    right = left + np.arange(M) - np.repeat(np.cumsum(partners) - partners, partners)
    # Padding points at a last, dummy pair that no weighted row touches (its value is zero).
    P_pad, M_pad = bucket(P + 1, 16), bucket(M, 64)
    dummy = P_pad - 1

    def fill(a, size, value):
        return np.pad(a.astype(np.int32), (0, size - len(a)), constant_values=value)

    return SparseCoupling(
        rest=rows(rest, 0),
        obs_pair=rows(obs_pair, dummy),
        pair_level=fill(pair_level, P_pad, G_pad - 1),
        pair_rest=fill(pair_rest, P_pad, 0),
        pp_left=fill(left, M_pad, dummy),
        pp_right=fill(right, M_pad, dummy),
        pp_level=fill(pair_level[left], M_pad, G_pad - 1),
        pp_flat=fill(pair_rest[left] * R + pair_rest[right], M_pad, 0),
    )


def _level_mask(levels: int, padded: int, dtype) -> np.ndarray:
    """1 for each of ``levels`` levels, 0 for the padding up to ``padded``."""
    mask = np.zeros(padded, dtype=dtype)
    mask[:levels] = 1.0
    return mask


def re_column_scale(Z: np.ndarray) -> np.ndarray:
    """Divisors of the random-effect columns ``Z`` (``(n, q)``) of one grouping factor.

    A column whose root mean square lies outside [0.1, 10] (a covariate in units that make it
    1e4 or 1e-4) is divided by it, so that its variance parameter is of order one like the
    others: the optimiser's steps and tolerances then mean the same for every covariate,
    whatever its units, as the fixed effects' preconditioner does for ``X``. Columns on
    ordinary scales, and intercepts, are left as they are. ``theta``, the conditional modes and
    their variances are mapped back to the user's units for reporting.
    """
    # One einsum (np.mean's dispatch costs ~7 us), then Python over the q columns: the six
    # array calls of the comparisons took ~1 us each on a small design.
    n = max(Z.shape[0], 1)
    scale = []
    for square in np.einsum("ij,ij->j", Z, Z).tolist():
        rms = math.sqrt(square / n)
        scale.append(rms if 0.0 < rms and (rms < 0.1 or rms > 10.0) else 1.0)
    return np.array(scale)


def _scaled(Z: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``Z / scale``, without a copy in the usual case of nothing to scale."""
    return Z if all(s == 1.0 for s in scale.tolist()) else Z / scale


def _check_weights(w: np.ndarray) -> None:
    """Weights are data, not something to drop: missing, infinite or negative ones are refused."""
    if np.any(np.isnan(w)):
        raise DataError(f"weights have {_values(np.isnan(w), 'missing')}; every row needs one")
    if np.any(np.isinf(w)):
        raise DataError(f"weights have {_values(np.isinf(w), 'infinite')}; they must be finite")
    if np.any(w < 0):
        raise DataError(f"weights must be non-negative; found {_values(w < 0, 'negative')}")


@dataclasses.dataclass
class _ModelFrame:
    """Every array a model reads, evaluated on the complete rows, before any checks."""

    response: str
    y: np.ndarray
    trials: np.ndarray
    prior_weights: np.ndarray
    ymean: np.ndarray
    X: np.ndarray
    names: list[str]
    fixed_spec: object
    offset: np.ndarray
    factors: list[_Factor]

    def _parts(self):
        """``(what, values)`` for every evaluated vector, ``what`` naming it for a message."""
        yield f"response {self.response!r}", self.ymean
        yield f"response {self.response!r} (trials)", self.trials
        for name, x in zip(self.names, self.X.T, strict=True):
            yield f"fixed-effect column {name!r}", x
        yield "offset", self.offset
        for f in self.factors:
            cols = [c for t in f.terms for c in t.names]
            for name, z in zip(cols, f.Z.T, strict=True):
                yield f"random-effect column {name!r} of {f.name!r}", z

    @functools.cached_property
    def all_finite(self) -> bool:
        """Whether every evaluated value is finite (no NaN, no Inf), from one sum per array.

        The usual case, and then :meth:`nan_rows` and :meth:`check_finite` have nothing to
        scan for (their column-by-column passes took ~40 us of a small design). A sum that
        overflows reads as not finite, and the scans then look.
        """
        arrays = (self.ymean, self.trials, self.X, self.offset, *(f.Z for f in self.factors))
        # a.sum(), not np.sum(a): the function's dispatch costs ~1 us a call here.
        with np.errstate(over="ignore", invalid="ignore"):
            return math.isfinite(sum(float(a.sum()) for a in arrays))

    def nan_rows(self) -> np.ndarray:
        """Rows where an evaluated value is NaN (an expression of complete columns)."""
        bad = np.zeros(len(self.y), dtype=bool)
        if self.all_finite:
            return bad
        for _, values in self._parts():
            bad |= np.isnan(values)
        return bad

    def check_finite(self) -> None:
        """Refuse infinite values, naming where they are (R: NA/NaN/Inf in 'x')."""
        if self.all_finite:
            return
        for what, values in self._parts():
            if np.any(np.isinf(values)):
                raise DataError(
                    f"{what} has {_values(np.isinf(values), 'infinite')} (Inf or -Inf, from "
                    "the data or an expression such as log(0)); remove those rows or "
                    "transform the variable"
                )


def _model_frame(spec: FormulaSpec, family: Family, df: pd.DataFrame, w, off_vector) -> _ModelFrame:
    y, trials, prior_w, ymean = _response(spec, family, df, w)
    X, names, fixed_spec = _fixed_matrix(spec, df)
    off = np.zeros(len(df)) if off_vector is None else off_vector.copy()
    for expr in spec.offsets:
        off = off + _evaluate(expr, df, "offset")
    factors = _grouping_factors(spec, df)
    return _ModelFrame(
        str(spec.response), y, trials, prior_w, ymean, X, names, fixed_spec, off, factors
    )


def _present(values) -> np.ndarray | None:
    """Whether each row of a column (its :meth:`_Columns.values`) has a value, or ``None``
    when every row has one: from the values of plain numeric columns (their sum is NaN only
    if one is) and the codes of categorical ones (pandas' ``notna`` on sleepstudy's three
    columns took ~80 us of a 400 us design), by pandas' own test for every other dtype
    (nullable, object, datetime)."""
    dtype = values.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "biuf":
        if dtype.kind != "f":
            return None
        with np.errstate(over="ignore", invalid="ignore"):  # inf - inf: the mask decides
            total = values.sum()
        return None if total == total else ~np.isnan(values)
    if isinstance(dtype, pd.CategoricalDtype):
        codes = values.codes
        return None if codes.min(initial=0) >= 0 else codes >= 0
    present = ~pd.isna(values)
    return None if present.all() else present


def build_design(
    formula: str | FormulaSpec,
    data: pd.DataFrame,
    family: Family,
    weights=None,
    offset=None,
    dtype=np.float64,
) -> Design:
    """Evaluate ``formula`` on ``data`` and return the :class:`Design` of the model.

    Rows with a missing value in any column the model uses, or in ``offset``, or made NaN by
    an expression (``log`` of a negative value), are dropped with a warning that counts them.
    ``data`` itself is never modified.

    Raises
    ------
    DataError
        Missing columns, an empty frame, non-numeric or out-of-range responses, infinite
        values (named by column), missing, infinite or negative weights. Also grouping
        factors with one level, or with one level per observation where that variance cannot
        be identified, or too many effects outside the largest factor.
    FormulaError
        A formula, or an expression in it, that cannot be parsed.
    """
    spec = formula if isinstance(formula, FormulaSpec) else parse_formula(formula)
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if not spec.random:
        raise ValueError(
            f"formula {spec.formula!r} has no random-effects term such as (1 | group); "
            "for a model without random effects use a GLM"
        )
    used = list(_required_variables(spec))
    _check_columns(data, used, spec.formula)
    if len(data) == 0:
        raise DataError("data has no rows")
    w_all = _vector_arg(weights, data, "weights")
    off_all = _vector_arg(offset, data, "offset")
    if w_all is not None:
        _check_weights(w_all)

    columns = _Columns(data)
    # The rows to keep; None while that is all of them (the usual case: no mask to combine).
    complete = None
    for col in used:
        present = _present(columns.values(col))
        if present is not None:
            complete = present if complete is None else complete & present
    if off_all is not None and np.isnan(off_all).any():
        complete = ~np.isnan(off_all) if complete is None else complete & ~np.isnan(off_all)
    # An expression can make NaN from complete columns (log of a negative value): such rows are
    # incomplete too, as in R's model frame. Dropping them and evaluating again ends, as every
    # round drops at least one row.
    while True:
        # Read-only from here on: the full frame when nothing was dropped (no copy).
        df = columns if complete is None else _Columns(data.loc[complete, used])
        if len(df) == 0:
            raise DataError(
                f"no complete rows left to fit the model: each of the {len(data)} rows has a "
                "missing value in a column the model uses"
            )
        rows = slice(None) if complete is None else complete
        w = None if w_all is None else w_all[rows]
        off = None if off_all is None else off_all[rows]
        frame = _model_frame(spec, family, df, w, off)
        if frame.all_finite:
            break
        nan_rows = frame.nan_rows()
        if not nan_rows.any():
            break
        if complete is None:
            complete = np.ones(len(data), dtype=bool)
        complete[np.flatnonzero(complete)[nan_rows]] = False
    n_dropped = len(data) - len(df)
    if n_dropped:
        warnings.warn(
            f"dropped {n_dropped} of {len(data)} rows with missing values in the model's columns",
            stacklevel=3,
        )
    frame.check_finite()
    y, trials, prior_w, ymean = frame.y, frame.trials, frame.prior_weights, frame.ymean
    _check_response(spec, family, y, trials, ymean, weighted=w is not None)
    X, names, dropped, R = _drop_aliased(frame.X, frame.names)
    fixed_spec, off, factors = frame.fixed_spec, frame.offset, frame.factors

    n = len(df)
    _check_factors(factors, n, family, trials)
    first = factors[0]
    re_scale = {f.name: re_column_scale(f.Z) for f in factors}
    terms = [t for f in factors for t in f.terms]
    structure = _re_structure(tuple(terms))

    M = _preconditioner(R, float(n))
    # A stable radix sort on narrow integer codes: O(n), where argsort on int64 is O(n log n).
    G = len(first.labels)
    narrow = np.uint16 if G <= 65535 else np.uint32  # np.iinfo costs ~3 us
    order = np.argsort(first.codes.astype(narrow), kind="stable")
    n_pad, G_pad = bucket(n, 64), bucket(G, 16)

    small = n <= SMALL_ROWS

    def pad(a, fill=0.0):
        # Filled arrays rather than np.pad, which costs ~8 us a call on small arrays.
        out = np.empty((n_pad, *a.shape[1:]), dtype=dtype)
        out[n:] = fill
        if small:
            # Fancy indexing: ~0.4 us on sleepstudy, where np.take's dispatch and the constant
            # test below cost ~2 us each (seven arrays a design).
            out[:n] = a[order]
        elif a.size and (a == a.flat[0]).all():
            # A constant (unit weights and trials, no offset, a random intercept's ones): no
            # permutation needed, which saves ~15 ms per array at 10^6 rows. (The array
            # method, not np.all: the function's dispatch costs ~2 us a call.)
            out[:n] = a.flat[0]
        else:
            # take into place: 14 ms for a (10^6, 2) matrix, where a[order] takes 74 ms.
            a.astype(dtype, copy=False).take(order, axis=0, out=out[:n])
        return out

    group = np.empty(n_pad, dtype=np.int32)
    group[n:] = G - 1
    group[:n] = first.codes[order]
    others = factors[1:]
    rest_levels = tuple(
        _level_mask(len(f.labels), rest_bucket(len(f.labels)), dtype) for f in others
    )
    if others:
        Zr = np.concatenate([_scaled(f.Z, re_scale[f.name]) for f in others], axis=1)
        rest, offset = [], 0
        for f, mask in zip(others, rest_levels, strict=True):
            q = f.Z.shape[1]
            rest.append(offset + f.codes[:, None] * q + np.arange(q)[None, :])
            offset += mask.shape[0] * q
        rest = np.concatenate(rest, axis=1)[order]
        coupling = _coupling(group[:n], rest, n_pad, G_pad, first.Z.shape[1], offset)
    else:
        Zr = np.zeros((n, 0))
        coupling = _coupling(group[:n], np.zeros((n, 0), np.int64), n_pad, G_pad, 1, 0)

    arrays = ModelArrays(
        X=pad(X @ M),
        y=pad(y),
        trials=pad(trials, 1.0),
        weights=pad(prior_w),
        offset=pad(off),
        Z=pad(_scaled(first.Z, re_scale[first.name])),
        group=group,
        level_mask=_level_mask(G, G_pad, dtype),
        Zr=pad(Zr),
        rest_levels=rest_levels,
        coupling=coupling,
    )
    return Design(
        spec=spec,
        family=family,
        structure=structure,
        arrays=arrays,
        nobs=n,
        fixef_names=names,
        M=M,
        levels={f.name: f.labels for f in factors},
        order=order,
        index=df.index,
        y_mean=ymean,
        trials=trials,
        prior_weights=prior_w,
        offset=off,
        fixed_spec=fixed_spec,
        random_specs={f.name: f.specs for f in factors},
        factor_columns={f.name: f.columns for f in factors},
        factor_codes={f.name: f.codes for f in factors},
        factor_Z={f.name: f.Z for f in factors},
        dropped_columns=dropped,
        re_scale=re_scale,
    )
