"""Random-effects layout: which columns belong to which term, and theta <-> Lambda.

lme4 writes the random effects as ``b = Lambda_theta u`` with ``u ~ N(0, I)``. For one grouping
factor, ``Lambda`` is block-diagonal with the same ``Q x Q`` lower-triangular block ``T`` for
every level, where ``Q`` is the number of random-effect columns of all terms on that factor and
``T`` is itself block-diagonal by term. ``theta`` lists, term by term, the lower triangle of each
term's block column by column (lme4's order).

The optimiser does not see ``theta`` directly: it sees ``phi``, equal to ``theta`` except that
diagonal entries are logged (a log-Cholesky parameterisation), so every ``phi`` is valid and
the variance can approach zero smoothly. A boundary (singular) fit is represented by a mask that
sets chosen diagonal entries to exactly zero.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

__all__ = ["Term", "ReStructure"]


@dataclasses.dataclass(frozen=True)
class Term:
    """One random-effects term after expanding ``||`` into single columns.

    Attributes
    ----------
    group : str
        The grouping factor's name.
    names : tuple of str
        The term's random-effect columns, lme4-style (``"(Intercept)"``, ``"standLRT"``).
    """

    group: str
    names: tuple[str, ...]

    @property
    def q(self) -> int:
        """Number of random effects per level."""
        return len(self.names)

    @functools.cached_property
    def n_theta(self) -> int:
        """Entries of the term's lower-triangular block."""
        return self.q * (self.q + 1) // 2


@dataclasses.dataclass(frozen=True)
class ReStructure:
    """The random-effects structure of a model: terms and their grouping factors.

    Hashable and free of data, so it is a static argument of the compiled fit: two datasets
    with the same structure (and the same bucketed sizes) share one compiled program.

    Attributes
    ----------
    terms : tuple of Term
        Terms in lme4's order.
    """

    terms: tuple[Term, ...]

    # Derived layouts are cached on the instance (a frozen dataclass has a __dict__, which
    # functools.cached_property writes to directly): results read them several times per fit,
    # ~10 us each time to rebuild. Equality and hashing use ``terms`` only.
    @functools.cached_property
    def factors(self) -> tuple[str, ...]:
        """Distinct grouping factors in order of first appearance."""
        return tuple(dict.fromkeys(t.group for t in self.terms))

    def factor_terms(self, factor: str) -> tuple[Term, ...]:
        """The terms on one grouping factor."""
        return tuple(t for t in self.terms if t.group == factor)

    def factor_q(self, factor: str) -> int:
        """Random effects per level of ``factor``, over all of its terms."""
        return sum(t.q for t in self.factor_terms(factor))

    def factor_names(self, factor: str) -> tuple[str, ...]:
        """Column names of the factor's block, in block order."""
        return tuple(n for t in self.factor_terms(factor) for n in t.names)

    @functools.cached_property
    def n_theta(self) -> int:
        """Length of theta (and of phi)."""
        return sum(t.n_theta for t in self.terms)

    def theta_layout(self) -> list[tuple[int, int, int]]:
        """For each theta entry: ``(factor index, row, col)`` in the factor's ``Q x Q`` block."""
        return list(self._layout)

    @functools.cached_property
    def term_columns(self) -> tuple[tuple[Term, int, int], ...]:
        """``(term, factor index, first column in the factor's block)`` for every term."""
        offsets = dict.fromkeys(self.factors, 0)
        out = []
        for term in self.terms:
            out.append((term, self.factors.index(term.group), offsets[term.group]))
            offsets[term.group] += term.q
        return tuple(out)

    @functools.cached_property
    def _layout(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(
            (f, o + row, o + col)
            for term, f, o in self.term_columns
            for col in range(term.q)
            for row in range(col, term.q)
        )

    @functools.cached_property
    def diagonal(self) -> np.ndarray:
        """Boolean array over theta: True where the entry is on a block diagonal (read-only)."""
        diagonal = np.array([r == c for _, r, c in self._layout], dtype=bool)
        diagonal.flags.writeable = False
        return diagonal

    def theta_from_phi(self, phi, mask=None):
        """lme4's ``theta`` from the unconstrained ``phi``; ``mask`` zeroes chosen diagonals.

        numpy in, numpy out; otherwise ``jax.numpy``.
        """
        diag = self.diagonal
        if isinstance(phi, np.ndarray):
            # In place on a copy: each np.where is ~1.5 us of a ~20 us result construction.
            theta = phi.copy()
            theta[diag] = np.exp(phi[diag]) if mask is None else np.exp(phi[diag]) * mask[diag]
            return theta
        xp = jnp
        theta = xp.where(diag, xp.exp(xp.where(diag, phi, 0.0)), phi)
        if mask is not None:
            theta = xp.where(diag, theta * mask, theta)
        return theta

    def phi_from_theta(self, theta: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`theta_from_phi` (diagonals must be positive)."""
        theta = np.asarray(theta, dtype=float)
        return np.where(self.diagonal, np.log(np.where(self.diagonal, theta, 1.0)), theta)

    @functools.cached_property
    def _block_index(self) -> tuple[np.ndarray, ...]:
        """Per factor, the ``Q x Q`` array of positions in ``theta`` of each block entry, with
        ``n_theta`` (one past the end) where the block is zero."""
        out = []
        for f, factor in enumerate(self.factors):
            q = self.factor_q(factor)
            index = np.full((q, q), self.n_theta)
            for i, (ff, row, col) in enumerate(self._layout):
                if ff == f:
                    index[row, col] = i
            index.flags.writeable = False
            out.append(index)
        return tuple(out)

    def lambda_blocks(self, theta) -> list:
        """One lower-triangular ``Q x Q`` block ``T`` per factor, from ``theta``.

        A numpy ``theta`` gives numpy blocks (no JAX dispatch, for results); anything else
        gives ``jax.numpy`` blocks (inside the compiled fit). A gather from static positions
        (into ``theta`` followed by a zero): inside jit it fuses with its consumers, where a
        scatter into zeros is a kernel of its own, once per evaluation.
        """
        xp = np if isinstance(theta, np.ndarray) else jnp
        padded = xp.concatenate([theta, xp.zeros(1, theta.dtype)])
        return [padded[index] for index in self._block_index]

    def theta_names(self) -> list[str]:
        """lme4's names of the theta entries (``school.(Intercept)``, ``school.x.(Intercept)``)."""
        names = []
        for term in self.terms:
            for col in range(term.q):
                for row in range(col, term.q):
                    if row == col:
                        names.append(f"{term.group}.{term.names[row]}")
                    else:
                        names.append(f"{term.group}.{term.names[row]}.{term.names[col]}")
        return names
