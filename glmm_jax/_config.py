"""Process-level settings: 64-bit precision scoped to our calls, the persistent compile cache,
synchronous dispatch on CPU.

We never flip the user's global ``jax_enable_x64``: every public entry point runs its JAX work
inside :func:`precision`, a context that turns 64-bit types on for that call only.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

__all__ = [
    "precision",
    "resolve_dtype",
    "enable_compilation_cache",
    "default_cache_dir",
    "prefer_synchronous_cpu_dispatch",
]

_CACHE_STATE = {"configured": False}


def resolve_dtype(dtype) -> np.dtype:
    """``"float64"`` (default) or ``"float32"`` as a numpy dtype; anything else raises."""
    dt = np.dtype(dtype)
    if dt not in (np.float64, np.float32):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    return dt


class precision:
    """Run the enclosed JAX work with 64-bit types enabled (needed for float64 fits):
    ``with precision(): ...``.

    float32 fits run inside it too: their arrays are float32, so the arithmetic is float32.
    (A class rather than a generator context: ~0.5 us a use instead of ~2, on every fit.)
    """

    __slots__ = ("_x64",)

    def __enter__(self) -> None:
        enable_compilation_cache()  # returns at once after the first time
        self._x64 = jax.enable_x64(True)
        self._x64.__enter__()

    def __exit__(self, *exc) -> None:
        self._x64.__exit__(*exc)


def default_cache_dir() -> Path:
    """``$GLMM_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/glmm_jax``, else ``~/.cache/glmm_jax``."""
    env = os.environ.get("GLMM_JAX_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glmm_jax"


def enable_compilation_cache(
    path: str | os.PathLike | None = None, *, force: bool = False
) -> Path | None:
    """Turn on JAX's persistent compilation cache so compiled fits survive the process.

    Called automatically before the first fit. It leaves alone a cache directory the user
    configured for JAX themselves; ``GLMM_JAX_CACHE_DIR=off`` (or ``none``) disables it.

    Parameters
    ----------
    path : path-like, optional
        Cache directory; default :func:`default_cache_dir`.
    force : bool
        Configure again even if already configured.

    Returns
    -------
    Path or None
        The directory in use, or ``None`` when disabled.
    """
    if _CACHE_STATE["configured"] and not force:
        return _CACHE_STATE.get("path")
    _CACHE_STATE["configured"] = True
    if os.environ.get("GLMM_JAX_CACHE_DIR", "").lower() in ("off", "none", "0"):
        _CACHE_STATE["path"] = None
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and path is None:
        _CACHE_STATE["path"] = Path(current)
        return Path(current)
    target = Path(path) if path is not None else default_cache_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        _CACHE_STATE["path"] = None
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    # Only programs worth caching: a fit compiles for seconds, the small eager ops for far less.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    _CACHE_STATE["path"] = target
    return target


def prefer_synchronous_cpu_dispatch() -> bool:
    """Run JAX's CPU computations on the calling thread (``jax_cpu_enable_async_dispatch``
    off), if that is still to be decided; called when glmm_jax is imported.

    By default JAX hands each CPU computation to a worker thread and the caller waits for it
    to finish: two thread wake-ups per call, which on a small fit cost more than the fit (a
    whole sleepstudy ``lmer`` call on a 2-core machine: ~0.58 ms asynchronous, ~0.45 ms
    synchronous; the compiled fit itself is ~0.15 ms). A fit always waits for its result, so
    it loses nothing; other JAX code in the process then also runs synchronously on CPU (it
    no longer overlaps Python with computation; GPU dispatch is unchanged).

    Left alone when JAX has already started its backends (the setting no longer applies:
    import glmm_jax before running JAX code to have it), and when the environment sets
    ``GLMM_JAX_SYNC_DISPATCH=0`` (or ``false``, ``no``, ``off``).

    Returns
    -------
    bool
        Whether dispatch was made synchronous here.
    """
    if os.environ.get("GLMM_JAX_SYNC_DISPATCH", "").lower() in ("0", "false", "no", "off"):
        return False
    try:
        from jax._src import xla_bridge  # no public test for started backends

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return False
    if started or not jax.config.values.get("jax_cpu_enable_async_dispatch", False):
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
