"""jit with the output returned as one flat array, for small fits where each buffer counts.

A compiled fit returns a PyTree of a dozen arrays (``LmmOutput``, ``FitOutput``). Each output
leaf is a buffer of its own that the runtime allocates, that ``block_until_ready`` waits on and
that numpy then converts: ~3 us per leaf, ~40 us of a 250 us sleepstudy ``lmer`` call. Here the
compiled program concatenates the leaves into one array (in the float type of the fit: the
integer counters and flags it carries are exact there) and the caller cuts numpy views of it.

The output's layout (tree structure, shapes, dtypes) is what tracing finds; it is recorded by
the traced function itself, keyed by the same signature as jit's cache (static arguments,
input tree, shapes and dtypes), so a call finds the layout of the program it ran. Should a
layout ever be missing, the caller runs the plain program instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FlatJit"]


def _signature(args: tuple, static: dict) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    shapes = tuple((tuple(leaf.shape), np.dtype(leaf.dtype)) for leaf in leaves)
    return treedef, shapes, tuple(sorted(static.items()))


class FlatJit:
    """``fn`` jitted to return its output as one flat array; ``plain`` is ``jax.jit(fn)``
    (compiled only if called: directly, or as the fallback).

    Parameters
    ----------
    fn : callable
        A pure function of array arguments and keyword-only static arguments, whose output is a
        PyTree of arrays.
    static_argnames : tuple of str
        The static keyword arguments, as for ``jax.jit``.
    float_dtype : callable
        ``float_dtype(*args)``: the float type to concatenate the output leaves in.
    """

    def __init__(self, fn: Callable, static_argnames: tuple[str, ...], float_dtype: Callable):
        self.plain = jax.jit(fn, static_argnames=static_argnames)
        self._layouts: dict = {}

        def flat(*args, **static):
            out = fn(*args, **static)
            leaves, treedef = jax.tree_util.tree_flatten(out)
            specs = tuple((tuple(leaf.shape), np.dtype(leaf.dtype)) for leaf in leaves)
            self._layouts[_signature(args, static)] = (treedef, specs)
            dtype = float_dtype(*args)
            return jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])

        self._flat = jax.jit(flat, static_argnames=static_argnames)

    def __call__(self, *args, **static):
        """``fn(*args, **static)`` with its leaves as numpy arrays (the call waits for them)."""
        flat = np.asarray(self._flat(*args, **static))
        layout = self._layouts.get(_signature(args, static))
        if layout is None:
            return jax.tree_util.tree_map(np.asarray, self.plain(*args, **static))
        treedef, specs = layout
        leaves, start = [], 0
        for shape, dtype in specs:
            size = math.prod(shape)
            leaves.append(flat[start : start + size].reshape(shape).astype(dtype, copy=False))
            start += size
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def cache_size(self) -> int:
        """Programs compiled for the flat call (one per signature)."""
        return self._flat._cache_size()
