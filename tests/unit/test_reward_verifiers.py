"""Verifiers in-process (the isolation is tested in tests/integration/test_grader_*.py)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.data.tasks import synthetic_problems
from reward.countdown import countdown_check, countdown_expression, parse_countdown_answer
from reward.extract import MAX_ANSWER_CHARS, BadInput, extract_final
from reward.math_answers import math_equal
from reward.numbers import numeric_key
from reward.verifiers import gold_answer, resolve_verifier, run_job, safe_run_job, score_response

# The labelled table: (gold, prediction, equivalent?). 70 pairs, 48 equivalent, 22 not.
EQUIVALENCE_TABLE = [
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", True), ("\\frac{1}{2}", "1/2", True), ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac{3}{4}", "\\frac{6}{8}", True), ("\\frac{1}{3}", "0.333", False), ("\\frac{2}{3}", "\\frac{3}{2}", False),
    ("-\\frac{1}{2}", "-0.5", True), ("-\\frac{1}{2}", "0.5", False), ("\\frac{7}{2}", "3\\frac{1}{2}", True),
    ("1.25", "\\frac{5}{4}", True), ("0.1", "\\frac{1}{10}", True), ("0.1", "0.01", False),
    # integers and formatting
    ("1000", "1,000", True), ("1000", "1{,}000", True), ("42", "42.0", True), ("42", "43", False),
    ("-7", "7", False), ("12", "12.00", True), ("5", "\\text{5}", True), ("5", "5 \\text{ cm}", True),
    ("10", "\\$10", True), ("100", "10^2", True), ("1000000", "10^6", True), ("2^{10}", "1024", True),
    ("2^{10}", "1000", False), ("0", "-0", True), ("10^{-3}", "0.001", True), ("1.5\\times 10^{3}", "1500", True),
    # percentages
    ("50\\%", "0.5", True), ("50\\%", "50", False),       # p% is p/100 (docs/rewards.md) ("25\\%", "\\frac{1}{4}", True), ("25\\%", "0.3", False),
    # radicals, pi, expressions
    ("\\sqrt{2}", "2^{1/2}", True), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\sqrt{8}", "2\\sqrt{2}", True), ("\\sqrt{8}", "3\\sqrt{2}", False), ("2\\pi", "\\pi \\cdot 2", True),
    ("\\pi", "3.14", False), ("\\pi r^2", "r^2\\pi", True), ("x^2+2x+1", "(x+1)^2", True),
    ("x^2-1", "(x-1)(x+1)", True), ("x^2+1", "(x+1)^2", False), ("2x+1", "1+2x", True), ("\\frac{x}{2}", "0.5x", True),
    ("\\sin^2 x + \\cos^2 x", "1", True), ("\\log_2 8", "3", True), ("e^{0}", "1", True), ("3\\sqrt{3}", "\\sqrt{27}", True),
    ("\\sqrt{3}", "1.732", False), ("\\frac{1}{2}", "\\frac{1}{2}+\\epsilon", False),
    # intervals
    ("(1,2]", "(1, 2]", True), ("(1,2]", "[1,2]", False), ("[0,\\infty)", "[0, \\infty)", True),
    ("(-\\infty,3)", "(-\\infty,3]", False), ("(0,1)\\cup(2,3)", "(2,3)\\cup(0,1)", True),
    # sets and tuples
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True), ("\\{1,2\\}", "\\{1,3\\}", False), ("1, 2", "2, 1", True),
    ("\\{1,2\\}", "\\{1,2,3\\}", False), ("(1,2)", "(1, 2)", True),
    # equations, matrices, choices, infinity
    ("x=3", "3", True), ("3", "x = 3", True), ("y=2x+1", "y = 1 + 2x", True), ("x=3", "x=4", False),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False),
    ("\\text{(A)}", "A", True), ("\\text{(A)}", "B", False), ("\\infty", "\\infty", True), ("\\infty", "-\\infty", False),
]


def test_table_is_large_and_balanced():
    assert len(EQUIVALENCE_TABLE) >= 60
    assert 15 <= sum(not eq for *_, eq in EQUIVALENCE_TABLE) <= len(EQUIVALENCE_TABLE) - 15


@pytest.mark.parametrize("gold,pred,equivalent", EQUIVALENCE_TABLE)
def test_math_equivalence_table(gold, pred, equivalent):
    assert math_equal(gold, pred) is equivalent
    # the same through the whole math verifier: extraction from a response, gold normalisation
    res = score_response("math", f"We simplify step by step, so the result is $\\boxed{{{pred}}}$.", gold, {})
    assert res["answer"] == pred and res["correct"] is equivalent


@pytest.mark.parametrize("text,answer", [
    ("\\boxed{1} then \\boxed{2}", "1, 2"),             # several statements are one answer
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed {7}", "7"),
    ("Answer: 5", "5"),
    ("answer : $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("Answer: \\boxed{9}.", "9"),
    ("\\boxed{1}\nFinal Answer: 3", "1, 3"),
    ("Answer: 3\nso \\boxed{4}", "3, 4"),
    ("\\boxed{4}\nAnswer: \\boxed{4}.", "4"),            # the same answer stated twice is one
    ("#### 1,234", "1,234"),
    ("<answer>(8*3)-4</answer>", "(8*3)-4"),
    ("Answer: \\(x+1\\)", "x+1"),
    ("The answer is 5", None),                 # no format, no answer: no last-number fallback
    ("so \\boxed{12", None),                   # unclosed
    ("\\boxed{}", None),
    ("Answer:   ", None),
    ("Final Answer:\n$\\boxed{5}$", "5"),           # an empty Answer line is a heading, not an empty answer
    ("\\boxed{} then Answer: 5", None),               # an empty box is a malformed statement
    ("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 5) + "}", None),
    ("\\boxed{" + "{" * 10_000 + "}" * 10_000 + "}", None),
    ("\\boxed{}" * 10_000, None),
    ("\\boxed{3}" * 10_000, "3"),
    ("\\boxed{\ud83d 2\x00}", "? 2"),            # answers go on the stream: valid UTF-8, no NULs
])
def test_extract_final(text, answer):
    assert extract_final(text) == answer


@pytest.mark.parametrize("text,gold,correct", [
    ("Answer: 1,234.", "1234", True), ("Answer: $18 dollars.", "18", True), ("#### 72", "72", True),
    ("Answer: 72 apples", "72", True), ("Answer: 3/4", "0.75", True), ("Answer: \\frac{3}{4}", "0.75", True),
    ("Answer: -5", "5", False), ("Answer: 5.5", "5", False), ("The answer is 5", "5", False),
    ("Answer: 12.00", "12", True), ("Answer: 1,000,000", "1000000", True), ("\\boxed{42}", "42", True),
    ("Answer: 10 - 3 = 7", "7", True), ("Answer: −4", "-4", True), ("Answer: 0.50", "1/2", True),
    ("Answer: 7", "Natalia sold 48/2 = 24 clips. #### 7", True), ("Answer: 7", "#### 1,007", False),
])
def test_numeric_verifier(text, gold, correct):
    assert score_response("numeric", text, gold, {})["correct"] is correct


def test_numeric_keys_are_canonical():
    assert numeric_key("0.5") == numeric_key("1/2") == numeric_key("\\frac{1}{2}") == "1/2"
    assert numeric_key("1,000") == numeric_key("1000.0") == "1000"
    assert numeric_key("9" * 5000) is None                 # too long: not a number we parse
    assert numeric_key("1/0") is None and numeric_key("no digits") is None


COUNTDOWN = {"numbers": [3, 4, 6, 8], "target": 24}


@pytest.mark.parametrize("text,correct", [
    ("Answer: (8-6)*3*4", True), ("Answer: 8*3", True),          # each number at most once: subsets allowed
    ("Answer: (8-6)*3*4 = 24", True), ("Answer: 24 = 8*3", True), ("\\boxed{8 \\times 3}", True),
    ("Answer: 6/(1-3/4)", False),                                 # 1 is not given
    ("Answer: 8 × (6 − 3)", True), ("Answer: 6 ÷ (4 − 3) × 4", False), ("Answer: 8/(4-3)*3", False),
    ("Answer: 8*3*1", False), ("Answer: 8+8+8", False),          # unlisted number, reused number
    ("Answer: 8*3+4", False),                                     # wrong value
    ("Answer: 2**3*3", False), ("Answer: -8+32", False), ("Answer: 8/(4-4)", False),
    ("Answer: __import__('os').system('true')", False), ("Answer: (lambda: 24)()", False),
    ("Answer: " + "(" * 300 + "8*3" + ")" * 300, True),           # deeper than Python's parser allows: still read
    ("no answer", False),
])
def test_countdown_verifier(text, correct):
    assert score_response("countdown", text, None, COUNTDOWN)["correct"] is correct


def test_countdown_exact_rationals_and_synthetic_tasks():
    assert countdown_check("6/(1-3/4)", [1, 3, 4, 6], 24)[0]       # Fraction arithmetic, not floats
    assert countdown_expression("$(8-6) \\cdot 12 = 24$") == "(8-6) * 12"
    for fmt in ("answer_line", "boxed"):
        for p in synthetic_problems("countdown", 40, "train", seed=1, difficulty=3, answer_format=fmt):
            assert score_response("countdown", p.solution, p.gold, p.meta)["correct"], p.solution
        for p in synthetic_problems("arith", 40, "train", seed=1, difficulty=3, answer_format=fmt):
            verifier = resolve_verifier("auto", p.meta["task"])
            assert score_response(verifier, p.solution, p.gold, p.meta)["correct"], p.solution
            wrong = p.solution.replace(p.gold, str(int(p.gold) + 1))
            assert score_response(verifier, wrong, p.gold, p.meta)["correct"] is False


def test_exact_and_resolution():
    assert score_response("exact", "Answer: Paris", "Paris", {})["correct"] is True
    assert score_response("exact", "Answer: paris", "Paris", {})["correct"] is False
    assert [resolve_verifier("auto", t) for t in ("arith", "countdown", "math", None, "numeric")] == \
        ["numeric", "countdown", "math", "math", "numeric"]
    assert resolve_verifier("exact", "arith") == "exact"


def test_label_free_and_bad_inputs():
    assert score_response("math", "\\boxed{2}", None, {}) == {"answer": "2", "key": "2", "correct": None, "reason": None}
    assert gold_answer("math", "The answer is \\boxed{\\frac12}") == "\\frac12"
    with pytest.raises(BadInput, match="gold answer"):
        gold_answer("numeric", "seven")
    with pytest.raises(BadInput, match="meta\\['numbers'\\]"):
        score_response("countdown", "Answer: 1", None, {"target": 3})
    with pytest.raises(BadInput, match="target=24 numbers"):
        parse_countdown_answer("24 3,4")
    assert parse_countdown_answer("target=24 numbers=3,4,6,8") == COUNTDOWN
    assert safe_run_job({"op": "score", "verifier": "countdown", "text": "x", "meta": {}})["error"].startswith(
        "BadInput: countdown needs")
    assert safe_run_job({"op": "nope"})["error"].startswith("BadInput: unknown job op")
    assert safe_run_job({"op": "score"}) == {"error": "KeyError"}
    assert run_job({"op": "same", "verifier": "math", "a": "0.5", "b": "\\frac{1}{2}"}) == {"equal": True}
    assert run_job({"op": "same", "verifier": "numeric", "a": "1/2", "b": "1"}) == {"equal": False}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet=st.sampled_from(list("0123456789+-*/(){}\\ =.,:$%xAnswerboxd\n\x00\ud800é")),
                    max_size=200),
       verifier=st.sampled_from(["numeric", "countdown", "exact"]))
def test_never_raises_on_model_output(text, verifier):
    res = score_response(verifier, text, "24", COUNTDOWN)
    assert set(res) == {"answer", "key", "correct", "reason"} and isinstance(res["correct"], bool)
