"""jit with the inputs passed and the output returned as flat arrays, for small fits where each
buffer counts.

A compiled fit takes a PyTree of arrays (``ModelArrays``: half a dozen to a dozen and a half
leaves) and returns another (``LmmOutput``, ``FitOutput``: a dozen). jit's dispatch costs ~2 us
for each input leaf it transfers, and each output leaf is a buffer of its own that the runtime
allocates, that ``block_until_ready`` waits on and that numpy then converts (~3 us a leaf):
together more than a third of a ~0.3 ms sleepstudy ``lmer`` call. Here the caller packs the
input leaves into one numpy array per dtype, the compiled program cuts them out again (slices
of a parameter cost nothing there) and concatenates its output leaves into one array (in the
float type of the fit: the integer counters and flags it carries are exact there), and the
caller cuts numpy views of it.

Both layouts (tree structures, shapes, dtypes) are kept per call signature (static arguments,
input tree, shapes and dtypes): the input's is found before the call and passed to the program
as a static argument, so jit compiles one program per signature as before; the output's is
recorded by the traced function itself. Should an output layout ever be missing, the caller
runs the plain program instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FlatJit"]


def _pieces(leaves, flat_dtype) -> tuple:
    """For each leaf: its slice of the flat array, the shape to give it (``None``: the slice
    has it, a vector) and the dtype to cast it to (``None``: the flat array's). Worked out
    once per signature, so that a call only slices (:func:`_cut`): ~0.3 us a leaf, where
    finding sizes and casting every leaf cost ~1 us."""
    pieces, start = [], 0
    for leaf in leaves:
        shape, size = tuple(leaf.shape), math.prod(leaf.shape)
        dtype = np.dtype(leaf.dtype)
        pieces.append(
            (
                slice(start, start + size),
                None if len(shape) == 1 else shape,
                None if dtype == flat_dtype else dtype,
            )
        )
        start += size
    return tuple(pieces)


def _cut(flat, pieces) -> list:
    """The leaves that :func:`_pieces` describes, cut out of ``flat`` (numpy or traced)."""
    leaves = []
    for where, shape, cast in pieces:
        leaf = flat[where] if shape is None else flat[where].reshape(shape)
        leaves.append(leaf if cast is None else leaf.astype(cast))
    return leaves


class _InputLayout:
    """How a signature's input leaves are packed: one flat array per dtype (in order of first
    appearance), each the concatenation of its leaves (:func:`_pieces` of that group). The
    object itself is the program's static argument (hashed by identity: one per signature)."""

    def __init__(self, leaves, treedef):
        self.treedef = treedef
        dtypes = tuple(dict.fromkeys(np.dtype(leaf.dtype) for leaf in leaves))
        self.groups = tuple(
            [i for i, leaf in enumerate(leaves) if np.dtype(leaf.dtype) == dt] for dt in dtypes
        )
        self.pieces = tuple(
            _pieces([leaves[i] for i in group], dt)
            for group, dt in zip(self.groups, dtypes, strict=True)
        )

    def pack(self, leaves) -> list[np.ndarray]:
        """One numpy array per dtype: the leaves raveled and concatenated (a lone leaf
        raveled only, a view)."""
        return [
            np.concatenate([leaves[i].reshape(-1) for i in group])
            if len(group) > 1
            else leaves[group[0]].reshape(-1)
            for group in self.groups
        ]

    def unpack(self, flats):
        """The input PyTree cut out of the flat arrays (inside the traced program)."""
        leaves = [None] * sum(len(group) for group in self.groups)
        for group, flat, pieces in zip(self.groups, flats, self.pieces, strict=True):
            for i, leaf in zip(group, _cut(flat, pieces), strict=True):
                leaves[i] = leaf
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


class FlatJit:
    """``fn`` jitted to take its inputs and return its output as flat arrays; ``plain`` is
    ``jax.jit(fn)`` (compiled only if called: directly, or as the fallback).

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
        # signature -> its input layout; input layout -> the output's (treedef, pieces).
        self._inputs: dict = {}
        self._layouts: dict = {}

        def flat(*flats, layout: _InputLayout, **static):
            args = layout.unpack(flats)
            out = fn(*args, **static)
            leaves, treedef = jax.tree_util.tree_flatten(out)
            dtype = np.dtype(float_dtype(*args))
            self._layouts[layout] = (treedef, _pieces(leaves, dtype))
            return jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])

        self._flat = jax.jit(flat, static_argnames=("layout", *static_argnames))

    def _input(self, args: tuple, static: dict) -> tuple[_InputLayout, list]:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (
            treedef,
            tuple((leaf.shape, leaf.dtype) for leaf in leaves),
            tuple(sorted(static.items())),
        )
        layout = self._inputs.get(key)
        if layout is None:
            layout = self._inputs[key] = _InputLayout(leaves, treedef)
        return layout, leaves

    def __call__(self, *args, **static):
        """``fn(*args, **static)`` with its leaves as numpy arrays (the call waits for them)."""
        layout, leaves = self._input(args, static)
        flat = np.asarray(self._flat(*layout.pack(leaves), layout=layout, **static))
        output = self._layouts.get(layout)
        if output is None:
            return jax.tree_util.tree_map(np.asarray, self.plain(*args, **static))
        treedef, pieces = output
        return jax.tree_util.tree_unflatten(treedef, _cut(flat, pieces))

    def cache_size(self) -> int:
        """Programs compiled for the flat call (one per signature)."""
        return self._flat._cache_size()
