"""Many responses, one design: a batch of fits in one compiled, mapped call.

Power analyses, parametric bootstraps and simulation studies all fit one model structure to
many responses. The compiled fit (``optimize.fit_arrays`` or ``lmm.fit_lmm_arrays``) is a pure
function of arrays that never raises, so the batch is that function mapped over the response
axis:

* on CPU, ``jax.lax.map`` (one replicate after another inside one compiled call): ``vmap``
  would run every replicate's while-loops to the slowest one's count, about 4x slower here;
* on GPU, ``jax.vmap``, whose lanes run in parallel;
* in chunks of replicates, so memory stays bounded and a progress bar can move;
* over every local device, with ``jax.shard_map``: each device maps its own share of a chunk.
  On several hosts, start each with ``jax.distributed.initialize()`` and give each its own
  seeds or replicate range (``simulate_responses(start=...)``); results are per replicate, so
  they concatenate.

A replicate whose fit fails keeps its status code and NaN estimates; it never stops the batch.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial

import jax
import numpy as np
import pandas as pd

from ._config import precision, resolve_dtype
from .design import DataError, Design, _lme4_name, build_design
from .families import Binomial, Family, Gaussian, get_family
from .formula import FormulaSpec, parse_formula
from .lmm import fit_lmm_arrays
from .optimize import Control, Status, fit_arrays
from .simulate import to_fit_scale

__all__ = ["BatchResult", "fit_batch", "fit_batch_design"]

#: Replicates per compiled call on CPU (``lax.map`` inside): big enough that the call's
#: overhead vanishes, small enough for a progress bar to move.
CPU_CHUNK = 128
#: Runs expected to take longer than this many seconds show a progress bar (if tqdm is there).
PROGRESS_AFTER = 3.0
#: Signatures (settings, chunk and array shapes) of the chunk programs this process has run.
_COMPILED: set = set()


def _fit_chunk(arrays, x0, Y, *, family, structure, control, reml, lmm, vectorize):
    """The fits of one chunk of responses ``Y`` ``(r, n_pad)``, all from the start ``x0``
    (``None``: each replicate's own default start): a batched output PyTree."""

    def one(y):
        a = arrays._replace(y=y)
        if lmm:
            phi0 = None if x0 is None else x0[arrays.X.shape[1] :]
            return fit_lmm_arrays(a, phi0, structure=structure, reml=reml, control=control)
        return fit_arrays(a, x0, family=family, structure=structure, control=control)

    return jax.vmap(one)(Y) if vectorize else jax.lax.map(one, Y)


_STATIC = ("family", "structure", "control", "reml", "lmm", "vectorize")
_compiled_chunk = jax.jit(_fit_chunk, static_argnames=_STATIC)


@partial(jax.jit, static_argnames=(*_STATIC, "mesh"))
def _compiled_sharded_chunk(arrays, x0, Y, *, mesh, **static):
    """:func:`_fit_chunk` with the replicates split over the devices of ``mesh``."""
    spec = jax.sharding.PartitionSpec
    local = jax.shard_map(
        partial(_fit_chunk, **static),
        mesh=mesh,
        in_specs=(spec(), spec(), spec("replicates")),
        out_specs=spec("replicates"),
        check_vma=False,
    )
    return local(arrays, x0, Y)


def _validate_responses(design: Design, responses) -> np.ndarray:
    """``responses`` -> a float ``(nobs, R)`` array, with errors that name the problem."""
    if isinstance(responses, pd.DataFrame):
        Y = responses.to_numpy(dtype=float)
    elif isinstance(responses, (list, tuple)):
        Y = np.column_stack([np.asarray(c, dtype=float) for c in responses])
    else:
        try:
            Y = np.asarray(responses, dtype=float)
        except (TypeError, ValueError) as e:
            raise DataError(f"responses must be numeric: {e}") from None
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2 or Y.shape[0] != design.nobs:
        raise DataError(
            f"responses must have one row per observation used by the model ({design.nobs}) "
            f"and one column per replicate; got shape {Y.shape}"
        )
    if Y.shape[1] == 0:
        raise DataError("responses has no columns (replicates)")
    if not np.all(np.isfinite(Y)):
        bad = np.flatnonzero(~np.all(np.isfinite(Y), axis=0))
        raise DataError(
            f"responses must be finite; replicates {bad[:5].tolist()} have NaN or Inf values"
        )
    fam = design.family
    if isinstance(fam, Binomial):
        cbind = design.spec.response.kind == "cbind"
        upper = design.trials[:, None] if cbind else 1.0
        if np.any((Y < 0) | (Y > upper)):
            what = "successes within 0..trials" if cbind else "in [0, 1] (0/1 or proportions)"
            raise DataError(f"binomial responses must be {what}")
    elif fam.name in ("poisson", "negative_binomial") and np.any(Y < 0):
        raise DataError(f"{fam.name} responses must be non-negative")
    elif fam.name in ("Gamma", "inverse.gaussian") and np.any(Y <= 0):
        raise DataError(f"{fam.name} responses must be positive")
    return Y


def _is_lmm(family: Family) -> bool:
    """A gaussian family with the identity link: a linear mixed model (``lmer``)."""
    return isinstance(family, Gaussian) and family.link.name == "identity"


def fit_batch_design(
    design: Design,
    responses,
    *,
    reml: bool = True,
    control: Control | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    devices=None,
    start=None,
) -> BatchResult:
    """Fit ``design``'s model to every column of ``responses``: the engine of :func:`fit_batch`.

    Parameters
    ----------
    design : Design
        From :func:`glmm_jax.build_design` (or a fitted result's).
    responses : (nobs, R) array, list of columns, or DataFrame
        One response per column, in the design's row order and on its response's scale.
    reml : bool
        REML or ML for a gaussian identity model (a linear mixed model); ignored otherwise.
    control : Control, optional
        Optimiser settings, shared by every replicate.
    chunk_size : int, optional
        Replicates per compiled call, at most; default 128 on CPU (chunks run concurrently, one
        per core), and on GPU as many as a quarter of the device's memory holds, per device.
    progress : bool, optional
        Show a tqdm progress bar; by default only when the run is expected to take more than a
        few seconds (judged after the first chunk).
    devices : list of jax.Device, optional
        Devices to spread replicates over; default all local devices of the default backend.
    start : array, optional
        Every replicate's starting point in the compiled fit's parameters (a fit's
        ``_out.x``: ``refit_batch`` starts from the fitted model, as lme4's ``refit`` does).
        From a start the optimiser takes Newton steps at once, unless ``control`` sets
        ``lbfgs_maxiter`` (see :class:`~glmm_jax.optimize.Control`).

    Returns
    -------
    BatchResult
    """
    control = Control() if control is None else control
    Y = to_fit_scale(design, _validate_responses(design, responses))
    R = Y.shape[0]
    devices = list(jax.local_devices() if devices is None else devices)
    gpu = devices[0].platform != "cpu"
    static = dict(
        family=design.family,
        structure=design.structure,
        control=control,
        reml=bool(reml),
        lmm=_is_lmm(design.family),
        vectorize=gpu,
    )
    # CPU: chunks run concurrently, one per core (XLA runs a small fit on one core, so two
    # concurrent streams nearly double the throughput on two cores: seed model 5.5 -> 3.1 ms
    # per fit). GPU and several devices: one chunk at a time, spread over the devices.
    workers = _cpu_workers() if (not gpu and len(devices) == 1) else 1
    if chunk_size is None:
        chunk_size = (_gpu_chunk(design, devices[0]) if gpu else CPU_CHUNK) * len(devices)
    # A multiple of the workers, so that none idles while the last chunks run.
    n_chunks = workers * math.ceil(R / (workers * max(1, chunk_size)))
    # Equal chunks (one compiled program per chunk shape), a multiple of 8 replicates and of
    # the device count, so that few shapes are ever compiled. The last chunk is padded with
    # fits that are thrown away: 200 replicates on two cores make two chunks of 104 (4%
    # padding), where chunks of at most 64 made four of 56 (12%).
    unit = math.lcm(8, len(devices))
    chunk = math.ceil(math.ceil(R / n_chunks) / unit) * unit
    n_chunks = math.ceil(R / chunk)
    if len(devices) > 1:
        mesh = jax.sharding.Mesh(np.array(devices), ("replicates",))
        run = partial(_compiled_sharded_chunk, mesh=mesh, **static)
    else:
        run = partial(_compiled_chunk, **static)
    arrays = design.arrays
    x0 = None if start is None else np.asarray(start, dtype=arrays.X.dtype)
    if len(devices) == 1:
        with precision():
            arrays = jax.device_put(arrays, devices[0])

    def fit_chunk(c):
        Yc = Y[c * chunk : (c + 1) * chunk]
        r = Yc.shape[0]
        if r < chunk:
            # Pad the last chunk with copies of its first response; dropped below.
            Yc = np.concatenate([Yc, np.repeat(Yc[:1], chunk - r, axis=0)])
        with precision():  # a per-thread setting: each worker enters it
            out = run(arrays, x0, Yc)
            return jax.tree_util.tree_map(lambda a: np.asarray(a)[:r], out)

    t0 = time.perf_counter()
    outputs: list = [None] * n_chunks
    # A program's first call compiles it (and writes the persistent cache): make that call
    # alone, so that concurrent workers never compile, or write, the same program twice.
    signature = (
        tuple(static.items()),
        len(devices),
        chunk,
        None if x0 is None else x0.shape,
        tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(arrays)),
    )
    bar = None

    def finished(c, result):
        """Keep chunk ``c``'s result; after the first, decide on a progress bar."""
        nonlocal bar
        outputs[c] = result
        if sum(o is not None for o in outputs) == 1:
            expected = (time.perf_counter() - t0) * n_chunks / workers
            if progress or (progress is None and expected > PROGRESS_AFTER and n_chunks > 1):
                bar = _progress_bar(R)
        if bar is not None:
            bar.update(result.status.shape[0])

    first = signature not in _COMPILED
    if first:
        finished(0, fit_chunk(0))
        _COMPILED.add(signature)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fit_chunk, c): c for c in range(int(first), n_chunks)}
        for future in as_completed(futures):
            finished(futures[future], future.result())
    if bar is not None:
        bar.close()
    out = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outputs)
    return BatchResult(design, out, time.perf_counter() - t0, reml=bool(reml))


def _cpu_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _gpu_chunk(design: Design, device) -> int:
    """Replicates whose vmapped fit fits in a quarter of the device's memory."""
    try:
        limit = device.memory_stats()["bytes_limit"]
    except (AttributeError, KeyError, TypeError, RuntimeError):
        limit = 8 * 2**30
    a = design.arrays
    # Each lane holds a few dozen row-length temporaries (eta, weights, scores, the data's
    # copies inside the loops) and its modes; an overestimate is harmless.
    per_replicate = 64 * (a.X.shape[0] * (a.X.shape[1] + a.Z.shape[1] + 8)) * a.X.itemsize
    return int(max(1, min(10_000, limit // 4 // per_replicate)))


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc="fits", unit="fit")


def fit_batch(
    formula: str | FormulaSpec,
    data: pd.DataFrame,
    responses,
    family: str | Family = "binomial",
    link: str | None = None,
    weights=None,
    offset=None,
    reml: bool = True,
    control: Control | None = None,
    dtype: str = "float64",
    chunk_size: int | None = None,
    progress: bool | None = None,
    devices=None,
) -> BatchResult:
    """Fit one model to many responses in one compiled, mapped call.

    The design (fixed effects, grouping factors, weights, offset, trials) comes from ``data``
    once; each column of ``responses`` takes the place of the formula's response. Supports
    every model :func:`glmer` and :func:`lmer` fit; a gaussian family with the identity link
    is a linear mixed model (REML unless ``reml=False``).

    Parameters
    ----------
    formula : str
        An lme4 formula. Its response column may be missing from ``data`` (``responses``
        replace it); for ``cbind(s, f)`` the trials ``s + f`` come from ``data``.
    data : pandas.DataFrame
        The covariates and grouping factors; never modified.
    responses : (nobs, R) array, list of R columns, or DataFrame
        In ``data``'s row order (after any rows with missing values are dropped), on the
        response's own scale: 0/1 or proportions (binomial; successes for ``cbind``), counts,
        or values.
    family, link, weights, offset, dtype
        As in :func:`glmer`.
    reml : bool
        For a linear mixed model: REML (default) or ML.
    control : Control, optional
        Optimiser settings, shared by every replicate.
    chunk_size, progress, devices
        See :func:`fit_batch_design`.

    Returns
    -------
    BatchResult

    Examples
    --------
    >>> import numpy as np, glmm_jax as gj
    >>> exam = gj.datasets.load_exam()
    >>> m = gj.glmer("success ~ schavg + (1 | school)", exam)
    >>> batch = m.refit_batch(m.simulate(nsim=20, seed=1))
    >>> batch.fixef.shape
    (20, 2)
    """
    fam = get_family(family, link)
    spec = formula if isinstance(formula, FormulaSpec) else parse_formula(formula)
    data = _with_response(spec, data, fam)
    design = build_design(
        spec, data, fam, weights=weights, offset=offset, dtype=resolve_dtype(dtype)
    )
    return fit_batch_design(
        design,
        responses,
        reml=reml,
        control=control,
        chunk_size=chunk_size,
        progress=progress,
        devices=devices,
    )


def _with_response(spec: FormulaSpec, data: pd.DataFrame, family: Family) -> pd.DataFrame:
    """``data``, with a stand-in response column (values the family accepts) if it has none:
    the design needs one, the batch replaces it."""
    r = spec.response
    if r.kind == "cbind":
        return data
    name = r.exprs[0].strip("`")
    if name in data.columns:
        return data
    if not name.isidentifier():
        raise DataError(
            f"the response {r.exprs[0]!r} is not a column of data; name a column in the formula"
        )
    n = len(data)
    stand_in = np.arange(n) % 2 if isinstance(family, Binomial) else np.ones(n)
    return data.assign(**{name: stand_in.astype(float)})


class BatchResult:
    """The fits of one model to many responses (from :func:`fit_batch` or ``refit_batch``).

    Attributes
    ----------
    nsim : int
        Number of replicates ``R``.
    loglik, deviance : (R,) arrays
        Log-likelihood (REML log-likelihood for a REML fit, as lme4's ``logLik``) and
        ``-2 loglik``.
    fixef, se : DataFrame
        ``R x p`` fixed effects and their standard errors (lme4's names as columns).
    theta : (R, n_theta) array
        lme4's relative covariance factor parameters.
    varcorr : DataFrame
        ``R x`` variance components: ``sd__<term>|<group>`` and ``cor__<a>.<b>|<group>`` (the
        names of broom.mixed), and ``sigma`` for families with a residual scale.
    sigma : (R,) array or None
        Residual standard deviation (linear mixed models and dispersion families).
    converged : (R,) bool array
    status : (R,) int array
        :class:`glmm_jax.Status` codes; ``status_names`` gives their names.
    iterations : (R,) int array
        Outer iterations (L-BFGS and Newton).
    seconds : float
        Wall time of the whole batch.

    Replicates whose fit failed (non-finite deviance or gradient) hold NaN estimates.
    """

    def __init__(self, design: Design, out, seconds: float, reml: bool = True):
        self._design = design
        self._out = out
        self.seconds = seconds
        d, s = design, design.structure
        p, names = d.p, d.fixef_names
        lmm = _is_lmm(d.family)
        self.reml = bool(reml) and lmm
        self.nsim = int(out.x.shape[0])
        self.status = np.asarray(out.status, dtype=int)
        self.converged = self.status == Status.CONVERGED
        self.iterations = np.asarray(out.lbfgs_iterations + out.newton_iterations, dtype=int)
        failed = self.status == Status.NONFINITE
        x = np.where(failed[:, None], np.nan, out.x)
        k = 0 if (lmm or d.family.fixed_dispersion) else 1
        beta = x[:, :p] @ d.M.T
        phi = x[:, p + k :]
        mask = np.asarray(out.mask)
        theta = np.where(s.diagonal, np.exp(np.where(s.diagonal, phi, 0.0)) * mask, phi)
        self.theta = theta * d.theta_scale
        deviance = np.where(failed, np.nan, np.asarray(out.deviance, dtype=float))
        if self.reml:
            # The fit's REML criterion is that of the preconditioned X M; lme4's is of X.
            deviance = deviance - 2.0 * d.logdet_M
        self.deviance = deviance
        self.loglik = -0.5 * deviance
        if lmm:
            self.sigma = np.where(failed, np.nan, np.asarray(out.sigma, dtype=float))
            cov = self.sigma[:, None, None] ** 2 * (d.M @ np.asarray(out.cov_unscaled) @ d.M.T)
            scale = self.sigma
        else:
            cov = fixef_covariance(np.asarray(out.hessian), mask, p, k, d.M)
            if k and not d.family.size_in_trials:
                self.sigma = np.sqrt(np.exp(x[:, p]))
            else:
                self.sigma = None
            scale = np.ones(self.nsim)
        self.dispersion = np.exp(x[:, p]) if k else None
        with np.errstate(invalid="ignore"):
            se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
        self.fixef = pd.DataFrame(beta, columns=names)
        self.fixef.index.name = "replicate"
        self.se = pd.DataFrame(se, columns=names)
        self.se.index.name = "replicate"
        self.varcorr = _variance_components(self.theta, s, scale, self.sigma)

    @property
    def status_names(self) -> pd.Series:
        """The status of each replicate, in words."""
        return pd.Series([Status.names.get(int(c), str(c)) for c in self.status], name="status")

    def to_frame(self) -> pd.DataFrame:
        """One tidy row per replicate and parameter (broom.mixed's ``tidy`` layout).

        Columns: ``replicate``, ``effect`` (``"fixed"`` or ``"ran_pars"``), ``term``,
        ``estimate``, ``std_error`` (NaN for variance components), ``loglik``, ``converged``
        and ``status``.
        """
        R = self.nsim
        fixed = self.fixef.stack(future_stack=True).rename("estimate").reset_index()
        fixed.columns = ["replicate", "term", "estimate"]
        fixed["std_error"] = self.se.to_numpy().ravel()
        fixed.insert(1, "effect", "fixed")
        vc = self.varcorr.stack(future_stack=True).rename("estimate").reset_index()
        vc.columns = ["replicate", "term", "estimate"]
        vc["std_error"] = np.nan
        vc.insert(1, "effect", "ran_pars")
        frame = pd.concat([fixed, vc], ignore_index=True)
        per = pd.DataFrame(
            {"loglik": self.loglik, "converged": self.converged, "status": self.status_names},
            index=pd.RangeIndex(R, name="replicate"),
        )
        frame = frame.join(per, on="replicate")
        return frame.sort_values(["replicate", "effect"], kind="stable", ignore_index=True)

    def estimates(self) -> pd.DataFrame:
        """``R x`` (fixed effects, then variance components): one column per parameter."""
        return pd.concat([self.fixef, self.varcorr], axis=1)

    def __len__(self) -> int:
        return self.nsim

    def __repr__(self) -> str:
        ok = int(self.converged.sum())
        return (
            f"<BatchResult: {self.nsim} fits of {self._design.spec.formula!r} "
            f"({self._design.family.name}), {ok} converged, {self.seconds:.2f} s>"
        )


def fixef_covariance(H, mask, p: int, k: int, M) -> np.ndarray:
    """Covariance of the fixed effects, ``(R, p, p)``, from the Hessians ``(R, m, m)`` of the
    deviance over all parameters (the observed information is half of it), for a batch of
    fits or one (``GLMMResult``, with ``R = 1``).

    ``k`` is the number of dispersion slots after the ``p`` fixed effects. Coordinates held at
    the boundary get an identity row and column, so the inverse's free
    block is the free submatrix's inverse; a Hessian that is not positive definite gives NaN.
    """
    R, m = H.shape[:2]
    free = np.concatenate([np.ones((R, p + k), bool), mask > 0], axis=1)
    both = free[:, :, None] & free[:, None, :]
    eye = np.broadcast_to(np.eye(m), H.shape)
    A = np.where(both, 0.5 * (H + np.swapaxes(H, 1, 2)), np.where(eye > 0, 1.0, 0.0))
    A = np.where(np.isfinite(A), A, 0.0)
    ok = np.all(np.linalg.eigvalsh(A) > 0, axis=1) & np.all(np.isfinite(H), axis=(1, 2))
    cov = np.linalg.inv(np.where(ok[:, None, None], 0.5 * A, eye))[:, :p, :p]
    cov = M @ cov @ M.T
    return np.where(ok[:, None, None], cov, np.nan)


def _variance_components(theta, structure, scale, sigma) -> pd.DataFrame:
    """``R x`` standard deviations and correlations of every grouping factor's effects."""
    R = theta.shape[0]
    layout = structure.theta_layout()
    columns = {}
    for f, factor in enumerate(structure.factors):
        names = structure.factor_names(factor)
        q = len(names)
        T = np.zeros((R, q, q))
        for i, (ff, r, c) in enumerate(layout):
            if ff == f:
                T[:, r, c] = theta[:, i]
        Sigma = scale[:, None, None] ** 2 * (T @ np.swapaxes(T, 1, 2))
        sd = np.sqrt(np.diagonal(Sigma, axis1=1, axis2=2))
        for j, name in enumerate(names):
            columns[f"sd__{_lme4_name(name)}|{factor}"] = sd[:, j]
        # Correlations only within a term (``||`` terms are uncorrelated by construction).
        offset = 0
        for term in structure.factor_terms(factor):
            for a in range(offset, offset + term.q):
                for b in range(a + 1, offset + term.q):
                    with np.errstate(invalid="ignore", divide="ignore"):
                        # Clipped: a singular fit's correlation of exactly +-1 rounds past it.
                        cor = np.clip(Sigma[:, b, a] / (sd[:, a] * sd[:, b]), -1.0, 1.0)
                    pair = f"{_lme4_name(names[a])}.{_lme4_name(names[b])}"
                    columns[f"cor__{pair}|{factor}"] = cor
            offset += term.q
    if sigma is not None:
        columns["sigma"] = sigma
    frame = pd.DataFrame(columns)
    frame.index.name = "replicate"
    return frame


def _warn_failures(batch: BatchResult, what: str) -> None:
    bad = int((~batch.converged).sum())
    if bad:
        warnings.warn(
            f"{bad} of {batch.nsim} {what} fits did not converge "
            f"({batch.status_names[~batch.converged].value_counts().to_dict()})",
            RuntimeWarning,
            stacklevel=3,
        )
