r"""The math verifier (docs/rewards.md "The math verifier").

math-verify's parser (latex2sympy) reads the whole answer or nothing: we call it directly on the full
answer, never through math-verify's regex extraction (which falls back to a number or fraction found inside
an answer it cannot parse) and never with its string fallback (which compared truncated parses). Its unit
stripping is off: it cut '\frac{1}{\text{e}^2}' to '\frac{1}{' and paid that against any other '\frac{1}{'.
Answers it reads wrongly rather than not at all are refused first (prepare_math).
"""

from __future__ import annotations

import functools
import logging
import re

from reward.extract import TEXTLIKE, drop_commands, find_commands
from reward.numbers import FOREIGN_DIGIT, PERCENT_WORDS, SPACE_LIKE, UNIT, numeric_key, numeric_value, unit_words_ok

# math-verify warns once per process that its signal timeouts are off; we time out in the parent instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)


_UNCERTAIN = re.compile(r"\\(?:approx|sim|simeq|cong|ldots|cdots|dots|vdots|lesssim|gtrsim)(?![A-Za-z])|≈|\.\.|…")
# Two plain numbers side by side: latex2sympy adds them ('1 2' -> 3, '2(3)' -> 5, '2\frac{6}{3}' -> 4).
_NUM_ATOM = (r"(?:\d+(?:\.\d+)?(?![\d.])|\(\s*\d+(?:\.\d+)?\s*\)|\[\s*\d+(?:\.\d+)?\s*\]|\\\{\s*\d+(?:\.\d+)?\s*\\\}"
             r"|\\[dtc]?frac\s*(?:\{\s*\d+\s*\}|\d)\s*(?:\{\s*\d+\s*\}|\d))")
_ADJACENT = re.compile(rf"(?<![\^_\d.]){_NUM_ATOM}\s*(?={_NUM_ATOM})", re.ASCII)
_BAD_DECIMAL = re.compile(r"\d\.\d+\.", re.ASCII)          # '3.5.2' -> 3.5 * 0.2
_DECIMAL = re.compile(r"(?<![\d.])(\d+)\.(\d+)", re.ASCII)
_PERCENT = re.compile(r"\\%|%|\bper\s?cent(?:age)?\b|\bpct\b")
_PIECES = re.compile(r"[,;]|\\text\{\s*and\s*\}")


def prepare_math(s: str) -> str | None:
    """The answer as latex2sympy should read it, or None when it cannot be read with certainty: digits of
    another script, an approximation or ellipsis, plain numbers side by side, an equation between numbers
    ('5 = 6', which math-verify pays against 6), a hedge after the answer ('5 \\text{ or more}')."""
    if FOREIGN_DIGIT.search(s) or _UNCERTAIN.search(s):
        return None
    cmds = find_commands(s, TEXTLIKE)
    if cmds is None:
        return None
    if cmds and cmds[-1][2] == len(s) - 1 and s[:cmds[-1][0]].strip():   # a trailing unit: '3\sqrt{2} \text{ cm}'
        start, arg, end = cmds[-1]
        words = s[arg:end].split()
        if not all(re.fullmatch(UNIT, w) for w in words) or not unit_words_ok(words):
            return None
        if not PERCENT_WORDS.intersection(w.lower() for w in words):  # 'x \text{ percent}' is x/100
            s = s[:start]
    s = drop_commands(s, TEXTLIKE, keep=True)
    if s is None:
        return None
    s = SPACE_LIKE.sub(" ", s.replace("\\!", ""))
    if _ADJACENT.search(s) or _BAD_DECIMAL.search(s):
        return None
    for piece in _PIECES.split(s):
        if piece.count("=") > 1 or ("=" in piece and numeric_value(piece.partition("=")[0]) is not None):
            return None
    s = _PERCENT.sub("/100", s)                                # the one percent rule: p% is p/100
    s = _DECIMAL.sub(lambda m: f"(\\frac{{{m[1]}{m[2]}}}{{1{'0' * len(m[2])}}})", s)  # exact, no float rounding
    return s if s.count("{") == s.count("}") else None


@functools.lru_cache(maxsize=4096)
def math_value(s: str):
    """The sympy value of a final answer (an exact Rational when it is one number of the grammar), or None
    when it is not read completely."""
    import sympy

    v = numeric_value(s)
    if v is not None:
        return sympy.Rational(v.numerator, v.denominator)
    prepared = prepare_math(s)
    if prepared is None:
        return None
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig, latex2sympy, normalize_latex
    from math_verify.grader import should_treat_as_complex

    norm = normalize_latex(prepared, NormalizationConfig(basic_latex=True, units=False, malformed_operators=True,
                                                         nits=True, boxed="none", equations=False))
    if not norm.strip() or norm.count("{") != norm.count("}"):
        return None
    try:
        return latex2sympy(norm, is_real=not should_treat_as_complex(norm), convert_degrees=False,
                           normalization_config=None)
    except Exception:  # noqa: BLE001 - not parsed is not parsed, whatever latex2sympy raises
        return None


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def math_equal(gold: str, pred: str) -> bool:
    """math-verify equivalence of two final answers (gold first: math-verify is not symmetric). Two numbers
    of the grammar are compared exactly; otherwise both must be parsed completely, or only the identical
    text is equal."""
    from math_verify import verify

    if _same_text(gold, pred):
        return True
    g, p = numeric_value(gold), numeric_value(pred)
    if g is not None and p is not None:
        return g == p
    ge, pe = math_value(gold), math_value(pred)
    return ge is not None and pe is not None and bool(verify(ge, pe, timeout_seconds=None))


def math_key(answer: str) -> str:
    """The vote key: the exact value of a number ('0.5', '50\\%', '\\frac{2}{4}' -> '1/2'), else the answer."""
    return numeric_key(answer) or " ".join(answer.split())
