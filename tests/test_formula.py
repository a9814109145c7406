"""The lme4 formula grammar: what parses, into what, and the errors that name the problem."""

from __future__ import annotations

import pytest

from glmm_jax.formula import FormulaError, RandomTerm, parse_formula


def test_seed_formula():
    spec = parse_formula("success ~ schavg + (1 | school)")
    assert spec.response.kind == "expr" and spec.response.exprs == ("success",)
    assert spec.fixed == "schavg"
    assert spec.random == (RandomTerm("1", ("school",), True),)
    assert spec.offsets == ()


def test_cbind_with_expression_arguments():
    spec = parse_formula("cbind(incidence, size - incidence) ~ period + (1 | herd)")
    assert spec.response.kind == "cbind"
    assert spec.response.exprs == ("incidence", "size - incidence")
    assert str(spec.response) == "cbind(incidence, size - incidence)"


def test_expression_response_and_offset():
    spec = parse_formula("I(incidence / size) ~ period + offset(log(size)) + (1 | herd)")
    assert spec.response.exprs == ("I(incidence / size)",)
    assert spec.offsets == ("log(size)",)
    assert spec.fixed == "period"


def test_uncorrelated_nested_and_interaction_groups():
    spec = parse_formula("y ~ x + (x || g) + (1 | a/b) + (1 | c:d) + (1 | e/f/h)")
    assert spec.random[0] == RandomTerm("x", ("g",), correlated=False)
    # lme4's findbars: a/b -> b:a and a, innermost first; e/f/h -> h:f:e, f:e, e.
    names = [t.group_name for t in spec.random[1:]]
    assert names == ["b:a", "a", "c:d", "h:f:e", "f:e", "e"]
    assert spec.random[1].group == ("b", "a")


def test_several_terms_on_one_factor_and_no_intercept():
    spec = parse_formula("y ~ 0 + x + (1 | g) + (0 + x | g)")
    assert spec.fixed == "0 + x"
    assert spec.grouping_factors == ("g",)
    assert [t.expr for t in spec.random] == ["1", "0 + x"]


def test_subtracted_intercept_and_only_random():
    assert parse_formula("y ~ x - 1 + (1 | g)").fixed == "x - 1"
    assert parse_formula("y ~ (1 | g)").fixed == "1"


def test_backticked_names():
    spec = parse_formula("`my y` ~ `a b` + (1 | `g h`)")
    assert spec.response.exprs == ("`my y`",)
    assert spec.fixed == "`a b`"
    assert spec.random[0].group == ("g h",)


def test_fixed_part_keeps_interactions_and_functions():
    spec = parse_formula("y ~ a*b + C(f) + I(x**2) + np.log(z) + (1 | g)")
    assert spec.fixed == "a*b + C(f) + I(x**2) + np.log(z)"


@pytest.mark.parametrize(
    "formula, message",
    [
        ("y x + (1 | g)", "exactly one '~'"),
        ("~ x + (1 | g)", "no response"),
        ("y ~ ", "no terms"),
        ("y ~ x + (1 | )", "no grouping factor"),
        ("y ~ x + (1 | g", "unbalanced"),
        ("y ~ x + 1 | g)", "unbalanced"),
        ("y ~ x | g", "inside parentheses"),
        ("y ~ (x | g | h)", "more than one '|'"),
        ("y ~ ( | g)", "nothing before '|'"),
        ("y ~ (1 | log(g))", "must be a column name"),
        ("cbind(a) ~ x + (1 | g)", "exactly two arguments"),
        ("y ~ x - (1 | g)", "cannot be subtracted"),
        ("y ~ x + offset(a, b) + (1 | g)", "offset() takes one"),
    ],
)
def test_errors_name_the_problem(formula, message):
    with pytest.raises(
        FormulaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")
    ):
        parse_formula(formula)


def test_non_string_formula():
    with pytest.raises(FormulaError, match="must be a string"):
        parse_formula(3)
