"""lme4 model formulas: a string in, a :class:`FormulaSpec` out.

The grammar is lme4's. A formula is ``response ~ terms``; the right-hand side holds

* fixed-effect terms, left to formulaic untouched (``x``, ``C(f)``, ``a*b``, ``I(x**2)``, ``0``);
* ``offset(expr)`` terms, evaluated as numbers and added to the linear predictor;
* random-effect terms ``(expr | g)`` (correlated) and ``(expr || g)`` (uncorrelated), where ``g``
  is a factor ``g``, an interaction ``a:b`` or a nesting ``a/b``
  (``= (expr | b:a) + (expr | a)``, as lme4 expands it).

The response is a column, an expression, or ``cbind(successes, failures)``.

This module only reads text: no data, no formulaic, no JAX. Errors name the offending text.
"""

from __future__ import annotations

import dataclasses
import functools
import re

__all__ = ["FormulaError", "FormulaSpec", "RandomTerm", "Response", "parse_formula"]


class FormulaError(ValueError):
    """A model formula that cannot be parsed; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class Response:
    """Left-hand side of a formula.

    Attributes
    ----------
    kind : {"expr", "cbind"}
        ``"cbind"`` for ``cbind(successes, failures)``; ``"expr"`` otherwise.
    exprs : tuple of str
        One expression, or the two arguments of ``cbind``.
    """

    kind: str
    exprs: tuple[str, ...]

    def __str__(self) -> str:
        return f"cbind({', '.join(self.exprs)})" if self.kind == "cbind" else self.exprs[0]


@dataclasses.dataclass(frozen=True)
class RandomTerm:
    """One random-effects term ``(expr | group)`` after expanding ``a/b``.

    Attributes
    ----------
    expr : str
        The formula of the random-effect covariates (``"1"``, ``"x"``, ``"0 + x"``).
    group : tuple of str
        The column names whose interaction is the grouping factor: ``("g",)`` or ``("a", "b")``.
    correlated : bool
        ``False`` for ``||``: each column gets its own independent variance.
    """

    expr: str
    group: tuple[str, ...]
    correlated: bool = True

    @property
    def group_name(self) -> str:
        """The grouping factor's name as lme4 prints it (``"a:b"`` for an interaction)."""
        return ":".join(self.group)

    def __str__(self) -> str:
        bar = "|" if self.correlated else "||"
        return f"({self.expr} {bar} {self.group_name})"


@dataclasses.dataclass(frozen=True)
class FormulaSpec:
    """A parsed lme4 formula.

    Attributes
    ----------
    formula : str
        The formula as given.
    response : Response
        The left-hand side.
    fixed : str
        The fixed-effects right-hand side for formulaic (random and offset terms removed).
    offsets : tuple of str
        Expressions inside ``offset(...)``.
    random : tuple of RandomTerm
        Random-effects terms in the order written, ``a/b`` expanded.
    """

    formula: str
    response: Response
    fixed: str
    offsets: tuple[str, ...]
    random: tuple[RandomTerm, ...]

    @property
    def grouping_factors(self) -> tuple[str, ...]:
        """Distinct grouping-factor names in order of first appearance."""
        return tuple(dict.fromkeys(t.group_name for t in self.random))


_OPEN, _CLOSE = "([{", ")]}"


def _scan(text: str):
    """Yield ``(index, char, depth)`` for characters outside backticks and quotes.

    ``depth`` is the bracket depth *before* the character. Unbalanced brackets raise.
    """
    depth, quote = 0, None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "`'\"":
            quote = ch
            continue
        if ch in _OPEN:
            yield i, ch, depth
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced ')' at position {i} in {text!r}")
            yield i, ch, depth
        else:
            yield i, ch, depth
    if quote:
        raise FormulaError(f"unterminated {quote} in {text!r}")
    if depth != 0:
        raise FormulaError(f"unbalanced '(' in {text!r}")


def _split_top(text: str, seps: str) -> list[tuple[str, str]]:
    """Split ``text`` at top-level separator characters; return ``(sep_before, piece)`` pairs."""
    pieces, start, sep = [], 0, "+"
    for i, ch, depth in _scan(text):
        if depth == 0 and ch in seps:
            pieces.append((sep, text[start:i]))
            start, sep = i + 1, ch
    pieces.append((sep, text[start:]))
    return pieces


def _wrapped(text: str, opener: str = "(") -> str | None:
    """Return the inside of ``text`` if all of it is one bracketed group, else ``None``."""
    text = text.strip()
    if not text.startswith(opener) or not text.endswith(")"):
        return None
    for i, ch, depth in _scan(text):
        if ch == ")" and depth == 0 and i != len(text) - 1:
            return None
    return text[len(opener) : -1]


def _call_args(text: str, name: str) -> list[str] | None:
    """If ``text`` is ``name(a, b, ...)``, return the top-level arguments."""
    m = re.match(rf"\s*{name}\s*\(", text)
    if not m:
        return None
    inside = _wrapped(text.strip()[m.end() - m.start() - 1 :].strip())
    if inside is None:
        return None
    return [a.strip() for _, a in _split_top(inside, ",")]


def _parse_group(text: str, where: str) -> list[tuple[str, ...]]:
    """``g`` -> [(g,)], ``a:b`` -> [(a, b)], ``a/b`` -> [(b, a), (a,)].

    A nesting expands as lme4's ``findbars`` does: innermost first, the interaction written
    inner to outer (``a/b`` -> ``b:a`` and ``a``), so factor names and level labels match lme4's.
    """
    text = text.strip()
    if not text:
        raise FormulaError(f"random term {where} has no grouping factor after '|'")
    nested = [p.strip() for _, p in _split_top(text, "/")]
    groups, prefix = [], ()
    for part in nested:
        raw = [n.strip() for _, n in _split_top(part, ":")]
        names = tuple(_strip_ticks(n) for n in raw)
        if any(not n for n in names):
            raise FormulaError(f"empty grouping factor name in {where}")
        for n, r in zip(names, raw, strict=True):
            if r == n and any(c in n for c in "()+*|~ "):
                raise FormulaError(
                    f"grouping factor {n!r} in {where} must be a column name, an interaction "
                    "a:b, or a nesting a/b"
                )
        prefix = names + prefix
        groups.append(prefix)
    return groups[::-1]


def _strip_ticks(name: str) -> str:
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] == "`" else name


def _parse_random(inside: str, where: str) -> list[RandomTerm]:
    bars = [(i, d) for i, ch, d in _scan(inside) if ch == "|" and d == 0]
    if not bars:
        raise FormulaError(f"{where} is not a random-effects term")
    first = bars[0][0]
    double = len(bars) == 2 and bars[1][0] == first + 1
    if len(bars) > (2 if double else 1):
        raise FormulaError(f"random term {where} has more than one '|'")
    expr = inside[:first].strip()
    group = inside[first + (2 if double else 1) :]
    if not expr:
        raise FormulaError(f"random term {where} has nothing before '|' (use 1 for an intercept)")
    return [RandomTerm(expr, g, correlated=not double) for g in _parse_group(group, where)]


def parse_formula(formula: str) -> FormulaSpec:
    """Parse an lme4 model formula.

    Parameters
    ----------
    formula : str
        For example ``"success ~ schavg + (1 | school)"`` or
        ``"cbind(incidence, size - incidence) ~ period + (1 | herd)"``.

    Returns
    -------
    FormulaSpec

    Raises
    ------
    FormulaError
        If the formula has no ``~``, no response, unbalanced brackets, or a malformed term.

    Examples
    --------
    >>> spec = parse_formula("y ~ x + (1 | a/b)")
    >>> [t.group_name for t in spec.random]
    ['b:a', 'a']
    """
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string, got {type(formula).__name__}")
    return _parse_formula(formula)


@functools.lru_cache(maxsize=512)
def _parse_formula(formula: str) -> FormulaSpec:
    """The parser behind :func:`parse_formula`; cached, since a spec is immutable."""
    tildes = [i for i, ch, d in _scan(formula) if ch == "~" and d == 0]
    if len(tildes) != 1:
        raise FormulaError(
            f"formula {formula!r} must have exactly one '~' separating response and terms"
        )
    lhs, rhs = formula[: tildes[0]].strip(), formula[tildes[0] + 1 :].strip()
    if not lhs:
        raise FormulaError(f"formula {formula!r} has no response on the left of '~'")
    if not rhs:
        raise FormulaError(f"formula {formula!r} has no terms on the right of '~'")

    cbind = _call_args(lhs, "cbind")
    if cbind is not None:
        if len(cbind) != 2 or not all(cbind):
            raise FormulaError(
                f"cbind() needs exactly two arguments (successes, failures): {lhs!r}"
            )
        response = Response("cbind", tuple(cbind))
    else:
        response = Response("expr", (lhs,))

    fixed, offsets, random = [], [], []
    for sign, piece in _split_top(rhs, "+-"):
        term = piece.strip()
        if not term:
            if sign == "-" or fixed or random or offsets:
                raise FormulaError(f"empty term in {rhs!r}")
            continue
        inside = _wrapped(term)
        if inside is not None and any(ch == "|" and d == 0 for _, ch, d in _scan(inside)):
            if sign == "-":
                raise FormulaError(f"random term {term} cannot be subtracted")
            random.extend(_parse_random(inside, term))
            continue
        off = _call_args(term, "offset")
        if off is not None:
            if len(off) != 1 or not off[0] or sign == "-":
                raise FormulaError(f"offset() takes one expression: {term!r}")
            offsets.append(off[0])
            continue
        if "|" in "".join(ch for _, ch, d in _scan(term)):
            raise FormulaError(f"'|' must be inside parentheses as (expr | group): {term!r}")
        fixed.append(f"{sign} {term}" if fixed or sign == "-" else term)
    fixed_rhs = " ".join(fixed) if fixed else "1"
    if fixed_rhs.startswith("- "):
        fixed_rhs = "1 " + fixed_rhs
    return FormulaSpec(formula, response, fixed_rhs, tuple(offsets), tuple(random))
