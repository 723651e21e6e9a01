"""The number grammar (reward.numbers.numeric_value), the math verifier's refusals and the countdown
evaluator: labelled edge cases, exact round trips of random rationals, and the evaluator against a recursive
Fraction reference on random expression trees."""

import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward.countdown import countdown_check, countdown_eval
from reward.extract import MAX_ANSWER_CHARS
from reward.math_answers import math_equal, math_value, prepare_math
from reward.numbers import numeric_key, numeric_value

F = Fraction

# (text, exact value or None = not one number, why)
GRAMMAR = [
    ("42", F(42), "integer"), ("-42", F(-42), "sign"), ("+42", F(42), "plus sign"), ("−4", F(-4), "U+2212 minus"),
    ("0", F(0), "zero"), ("-0", F(0), "minus zero"), ("007", F(7), "leading zeros"),
    ("3.25", F(13, 4), "decimal"), (".5", F(1, 2), "leading point"), ("-.5", F(-1, 2), "signed leading point"),
    ("12.00", F(12), "trailing zeros"), ("1,234", F(1234), "thousands comma"), ("1,234,567.5", F(2469135, 2), "groups"),
    ("1{,}000", F(1000), "LaTeX thousands"), ("1 000", F(1000), "space thousands"), ("1\\,000", F(1000), "thin space"),
    ("1\u2009000", F(1000), "U+2009"), ("1\u202f000 000", F(1000000), "U+202F"), ("3{,}5", F(7, 2), "decimal comma"),
    ("1{,}5000", F(3, 2), "decimal comma, 4 digits"), ("1,23", None, "bad grouping"), ("1,2345", None, "bad grouping"),
    ("12,34,567", None, "lakh grouping"), ("1, 000", None, "a list"), ("1,5", None, "a list, not 1.5"),
    ("1/2", F(1, 2), "slash"), ("-3/4", F(-3, 4), "signed slash"), ("3 / 4", F(3, 4), "spaced slash"),
    ("1/0", None, "division by zero"), ("1/2/3", None, "two slashes"), ("\\frac{3}{4}", F(3, 4), "frac"),
    ("\\dfrac{3}{4}", F(3, 4), "dfrac"), ("\\tfrac{3}{4}", F(3, 4), "tfrac"), ("\\frac12", F(1, 2), "frac12"),
    ("\\frac1{2}", F(1, 2), "half-braced"), ("\\frac{-1}{2}", F(-1, 2), "sign inside"),
    ("-\\frac{1}{2}", F(-1, 2), "sign"),
    ("\\frac{1.5}{3}", F(1, 2), "decimal in frac"), ("\\frac{1}{0}", None, "zero denominator"),
    ("\\frac123", None, "three digits"), ("\\frac{x}{2}", None, "variable"), ("3\\frac{1}{2}", F(7, 2), "mixed"),
    ("3 \\frac{1}{2}", F(7, 2), "mixed, space"), ("-3\\frac{1}{2}", F(-7, 2), "negative mixed"),
    ("3 1/2", F(7, 2), "mixed slash"), ("3\\frac{5}{2}", None, "improper mixed"), ("1e400", F(10) ** 400, "e notation"),
    ("1.5e3", F(1500), "e notation"), ("2E-3", F(1, 500), "negative exponent"), ("1e1001", None, "giant exponent"),
    ("3\\times 10^{5}", F(300000), "LaTeX scientific"), ("1.5 \\cdot 10^{-2}", F(3, 200), "cdot"),
    ("2×10^3", F(2000), "times sign"), ("10^{5}", None, "a bare power is an expression"), ("10^56", None, "10^5 6"),
    ("2^{10}", None, "power"), ("3\\times 10", None, "no exponent"), ("50\\%", F(1, 2), "percent"),
    ("50%", F(1, 2), "percent"), ("12.5 percent", F(1, 8), "percent word"), ("50 per cent", F(1, 2), "per cent"),
    ("\\frac{1}{2}\\%", F(1, 200), "percent of a fraction"), ("50\\%\\%", None, "two percents"),
    ("$18", F(18), "dollar"), ("\\$18", F(18), "escaped dollar"), ("-$5", F(-5), "minus dollar"),
    ("$-5", F(-5), "dollar minus"),
    ("€5", F(5), "euro"), ("5 €", F(5), "euro after"), ("USD 12", F(12), "currency word"),
    ("18 dollars", F(18), "unit word"),
    ("72 apples", F(72), "unit word"), ("5 \\text{ cm}", F(5), "text unit"), ("5\\mathrm{kg}", F(5), "mathrm unit"),
    ("5 km/h", F(5), "compound unit"), ("5 cm^2", F(5), "unit power"), ("30^\\circ", F(30), "degrees"),
    ("30^{\\circ}", F(30), "degrees braced"), ("30°C", F(30), "celsius"), ("5 million", F(5000000), "multiplier"),
    ("2.5 thousand", F(2500), "multiplier"), ("5 m", None, "one letter is a variable"), ("5x", None, "variable"),
    ("5 m^2", None, "variable squared"), ("5k", None, "ambiguous multiplier"), ("5 or more", None, "hedge"),
    ("5 or 6", None, "two numbers"), ("about 5", None, "word before"), ("5 and a half", None, "hedge"),
    ("5 dozen", None, "unvalued multiplier"), ("\\text{5}", F(5), "text wrapper"), ("{5}", F(5), "braces"),
    ("(42)", F(42), "parentheses"), ("(-5)", F(-5), "sign in parentheses"), ("-(-5)", None, "two signs: an expression"),
    ("--5", None, "two signs"), ("(1)(2)", None, "a product"),
    ("x = 5", F(5), "variable ="), ("10 - 3 = 7", F(7), "work ="), ("8 \\times 3 = 24", F(24), "work with times ="),
    ("6 = 7", None, "number = number"), ("x = 5 = 6", None, "two ="), ("x = 5 or x = 6", None, "two ="),
    ("x, y = 5", None, "list ="), ("x \\approx 5", None, "approximation"), ("\\approx 5", None, "approximation"),
    ("10-3", None, "expression"), ("\\sqrt{2}", None, "root"), ("2\\pi", None, "pi"), ("0x10", None, "hex"),
    ("0b101", None, "binary"), ("1, 2", None, "list"), ("[1, 2]", None, "interval"), ("3 < x < 5", None, "inequality"),
    ("400 \\pm 1", None, "plus-minus"), ("1 2", None, "two numbers"), ("3.5.2", None, "two points"),
    ("١٢", None, "Arabic-Indic digits"), ("۵", None, "Persian digits"), ("１２", None, "full-width digits"),
    ("1٢", None, "mixed scripts"), ("", None, "empty"), ("five", None, "word"), ("\\phantom{5}", None, "invisible"),
    ("5.", None, "a bare trailing point (clean_answer strips a final period)"),
    ("9" * (MAX_ANSWER_CHARS + 1), None, "too long"),
]


@pytest.mark.parametrize("text,value,why", GRAMMAR, ids=[f"{i}-{w}" for i, (_, _, w) in enumerate(GRAMMAR)])
def test_number_grammar(text, value, why):
    assert numeric_value(text) == value


def test_grammar_table_covers_both_outcomes():
    assert sum(v is None for _, v, _ in GRAMMAR) >= 40 and sum(v is not None for _, v, _ in GRAMMAR) >= 60


def _spell(v: Fraction, how: int) -> str:
    """One exact spelling of v (the grammar must read each back as v)."""
    sign = "-" if v < 0 else ""
    a = abs(v)
    if how == 0:
        return f"{sign}{a.numerator}/{a.denominator}"
    if how == 1:
        return f"{sign}\\frac{{{a.numerator}}}{{{a.denominator}}}"
    if how == 2:
        return f"{sign}{a.numerator:,}/{a.denominator:,}"
    if how == 3:
        return f"{sign}\\frac{{{a.numerator * 100}}}{{{a.denominator}}}\\%"   # p% is p/100
    return f"{sign}\\dfrac{{{a.numerator}}}{{{a.denominator}}} \\text{{ apples}}"


@settings(max_examples=300, deadline=None)
@given(n=st.integers(-10**30, 10**30), d=st.integers(1, 10**12), how=st.integers(0, 4))
def test_exact_round_trip_of_random_rationals(n, d, how):
    v = F(n, d)
    text = _spell(v, how)
    assert numeric_value(text) == v
    assert F(numeric_key(text)) == v


@settings(max_examples=300, deadline=None)
@given(int_part=st.integers(0, 10**15), decimals=st.text("0123456789", min_size=1, max_size=12),
       exp=st.integers(-1000, 1000), sign=st.sampled_from(["", "-"]))
def test_decimals_and_scientific_notation_are_exact(int_part, decimals, exp, sign):
    plain = F(int(f"{int_part}{decimals}"), 10 ** len(decimals))
    expected = (-plain if sign else plain) * F(10) ** exp
    assert numeric_value(f"{sign}{int_part}.{decimals}e{exp}") == expected
    assert numeric_value(f"{sign}{int_part}.{decimals} \\times 10^{{{exp}}}") == expected
    assert numeric_value(f"{sign}{int_part:,}.{decimals}") == (-plain if sign else plain)
    assert numeric_value(f"{sign}{int_part:,}.{decimals}".replace(",", " ")) == (-plain if sign else plain)


@pytest.mark.parametrize("text,why", [
    ("1 2", "latex2sympy adds numbers side by side (3)"), ("12 3", "15"), ("2(3)", "5, not 6"), ("(2)(3)", "5"),
    ("2\\frac{6}{3}", "4"), ("-1 2", "-3"), ("0.5 2", "0.5*2 would be fine, 0.5+2 is not"), ("3.5.2", "3.5 * 0.2"),
    ("5 = 6", "Eq(5, 6) is paid against 6 by math-verify"), ("5=6=7", "paid against 7"), ("x = 1 = 2", "chained"),
    ("x \\approx 3", "an approximation parses as its right side"), ("1, 2, \\ldots, 100", "ellipsis"),
    ("1, 2, ..., 100", "ellipsis"), ("٥", "Arabic-Indic digit"), ("x^{２}", "full-width digit"),
    ("5 \\text{ or more}", "hedge in a trailing unit"), ("\\frac{1}{2", "unbalanced"),
])
def test_math_refuses_what_it_would_misread(text, why):
    assert prepare_math(text) is None and math_value(text) is None
    assert not math_equal("3", text) or text == "3"


@pytest.mark.parametrize("text", ["\\log_2 8", "2^3 4", "x^{2} 3", "2(x+1)", "(2+1)(3)", "x=1, y=2",
                                  "\\frac{1}{\\text{e}}",
                                  "3\\sqrt{2} \\text{ cm}", "\\begin{pmatrix}1 & 2\\\\3 & 4\\end{pmatrix}"])
def test_math_reads_what_is_fine(text):
    assert prepare_math(text) is not None and math_value(text) is not None


def test_math_decimals_are_exact_not_rounded():
    assert not math_equal("\\frac{1}{3}", "0.333333") and not math_equal("\\frac{1}{3}", "0.3333333333")
    assert not math_equal("\\sqrt{2}", "1.414214") and not math_equal("\\frac{x}{3}", "0.333333x")
    assert math_equal("\\frac{x}{2}", "0.5x") and math_equal("\\frac{3}{10}", "0.1+0.2")


def test_percent_rule_is_the_same_in_expressions():
    assert math_equal("\\frac{\\pi}{100}", "\\pi\\%") and not math_equal("\\pi", "\\pi\\%")
    assert math_equal("\\frac{x}{100}", "x \\text{ percent}") and not math_equal("x", "x \\text{ percent}")
    assert math_equal("\\frac{1}{2}", "50\\%") and not math_equal("50", "50\\%") and not math_equal("50\\%", "50")
    assert numeric_value("50\\%") == numeric_value("0.5") and math_equal("0.5", "(25+25)\\%")
    assert not math_equal("50", "(25+25)\\%")


# ------------------------------------------------------------------------------------------------ countdown

def _tree(rng, numbers, depth):
    if depth == 0 or rng.random() < 0.3:
        return rng.choice(numbers)
    return (rng.choice("+-*/"), _tree(rng, numbers, depth - 1), _tree(rng, numbers, depth - 1))


def _value(t):
    """Recursive Fraction reference (None on division by zero)."""
    if isinstance(t, int):
        return F(t)
    op, a, b = t
    x, y = _value(a), _value(b)
    if x is None or y is None or (op == "/" and y == 0):
        return None
    return {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]


def _render(t, rng):
    """Fully parenthesised, with random spacing, so the evaluator's precedence is tested by the flat cases."""
    if isinstance(t, int):
        return str(t)
    op, a, b = t
    sp = rng.choice(["", " "])
    return f"({_render(a, rng)}{sp}{op}{sp}{_render(b, rng)})"


def _leaves(t):
    return [t] if isinstance(t, int) else _leaves(t[1]) + _leaves(t[2])


def test_countdown_evaluator_against_a_recursive_reference():
    rng = random.Random(0)
    for _ in range(2000):
        t = _tree(rng, list(range(0, 30)), rng.randint(0, 7))
        text = _render(t, rng)
        got = countdown_eval(text)
        want = _value(t)
        assert (got is None) == (want is None), text
        if got is not None:
            assert got[0] == want and got[1] == _leaves(t), text


@pytest.mark.parametrize("text,value", [
    ("1+2*3", 7), ("(1+2)*3", 9), ("8-3-2", 3), ("8/4/2", 1), ("8-3+2", 7), ("2*3-4/8", F(11, 2)), ("6/(1-3/4)", 24),
    ("((((8))))", 8), ("7", 7), ("0", 0),
])
def test_countdown_precedence_and_associativity(text, value):
    assert countdown_eval(text)[0] == value


@pytest.mark.parametrize("text", ["", "1+", "+1", "-8+32", "2**3", "8//2", "(1+2", "1+2)", "()", "1 2", "08", "1.5",
                                  "8/(4-4)", "x", "1e3", "3!", "2^3"])
def test_countdown_rejects(text):
    assert countdown_eval(text) is None


def test_countdown_long_and_deep_expressions_are_read_without_recursion():
    n = 450                                                     # 899 characters, under MAX_ANSWER_CHARS
    assert countdown_check("+".join(["1"] * n), [1] * n, n) == (True, "+".join(["1"] * n), None)
    deep = "(" * 480 + "8*3" + ")" * 480
    assert countdown_check(deep, [3, 8], 24)[0] and countdown_check(deep, [3], 24)[2].startswith("uses a number")
    ok, key, reason = countdown_check("+".join(["1"] * n), [1] * (n - 1), n)
    assert not ok and reason.startswith("uses a number")


_ALPHABET = st.sampled_from(list("0123456789+-*/^_(){}[]\\ =.,;:$%~xeEAnswerboxdtfac\n\x00\ud800é٥５½²°€") +
                            ["\\frac", "\\boxed{", "\\text{", "\\phantom{", "\\times", "10^", "{,}", "\\,", "Answer: ",
                             "####", "<answer>", "</answer>", "\\%", "\\approx", "\\left(", "\\right)"])


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(_ALPHABET, max_size=80))
def test_pure_readers_never_raise(parts):
    from reward.countdown import countdown_expression
    from reward.extract import extract_final, final_statements

    text = "".join(parts)
    final_statements(text)
    answer = extract_final(text)
    for s in (text, answer or ""):
        v = numeric_value(s)
        assert v is None or isinstance(v, Fraction)
        assert (numeric_key(s) is None) == (v is None)
        prepare_math(s)
        countdown_eval(s)
        countdown_expression(s)
