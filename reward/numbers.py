r"""One number grammar for the numeric verifier, the math verifier's exact path and the vote keys
(docs/rewards.md "The number grammar (numeric verifier, math fast path, vote keys)"): a sign, a currency, an
integer / decimal (thousands grouped by ',', '{,}' or a space, the decimal comma only as '{,}'), a/b, \frac{a}{b} (\dfrac, \tfrac, \frac12), a mixed number, scientific notation
(1.5e3, 1.5\times 10^{3}), a percent sign (p% is p/100), a multiplier word, unit words, and "lhs =" before
it. Only ASCII digits are digits. Anything else is not one number.
"""

from __future__ import annotations

import re
from fractions import Fraction

from reward.extract import MAX_ANSWER_CHARS, TEXTLIKE, drop_commands, group_end


_MAX_EXPONENT = 1000   # |n| of 10^n in scientific notation; beyond it "a giant number" is not a number we value
FOREIGN_DIGIT = re.compile(r"(?![0-9])\d")          # full-width, Arabic-Indic, ... (Unicode category Nd)
SPACE_LIKE = re.compile(r"(?<!\\)\\[,;: ]|\\(?:thinspace|quad|qquad)(?![A-Za-z])|~|[\u00a0\u2009\u202f]")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])")
_INT = r"(?:[1-9]\d{0,2}(?:,\d{3})+|[1-9]\d{0,2}(?:\{,\}\d{3})+|[1-9]\d{0,2}(?: \d{3})+|\d+)"
_UNSIGNED = re.compile(
    rf"(?P<int>{_INT})?(?:(?<=\d)\{{,\}}(?P<comma>\d+)|\.(?P<frac>\d+))?"
    r"(?:[eE](?P<e1>[-+]?\d{1,6})"
    r"|\s*(?:\\times|\\cdot|×|·|\*)\s*10\s*\^\s*(?:\{\s*(?P<e2>[-+]?\d{1,6})\s*\}|(?P<e3>\d)))?",
    re.ASCII)
_TEXFRAC = re.compile(r"\\[dtc]?frac\s*(?:\{(?P<a>[^{}]*)\}|(?P<a1>\d))\s*(?:\{(?P<b>[^{}]*)\}|(?P<b1>\d))", re.ASCII)
_MIXED = re.compile(r"(?P<w>\d+)\s*(?P<f>\\[dtc]?frac.*|\d+\s*/\s*\d+)", re.ASCII)
_CURRENCY = re.compile(r"(?:US\$|\\\$|\$|€|£|¥|₹|₩|₽|USD|EUR|GBP|INR|Rs\.?)\s*")
UNIT = r"(?:[A-Za-z][A-Za-z'.]*|°[CF]?)(?:\^\{?[23]\}?|[²³])?"
_TAIL_TOKEN = re.compile(rf"(?:\\%|%|\\\$|[$€£¥₹₩₽]|{UNIT}(?:/{UNIT})*)\s*\Z")
PERCENT_WORDS = {"%", "\\%", "percent", "percentage", "pct"}
_MULTIPLIERS = {"hundred": 2, "thousand": 3, "million": 6, "billion": 9, "trillion": 12}
# Words that turn a number into a hedge, a range, a bound or another number: "5 or more", "about 5", "5 bn".
HEDGE_WORDS = frozenset("""or and to plus minus times more less fewer least most than over under about around
    approximately approx roughly nearly almost not no between from till until squared cubed half bn mn mil
    lakh crore dozen dozens hundreds thousands millions billions trillions""".split())
_PLAIN = re.compile(r"-?\d+(?:\.\d+)?", re.ASCII)
_LHS_BAD = re.compile(r"[,;<>≤≥≈±≠]|\\(?:le|ge|leq|geq|lt|gt|approx|pm|mp|neq|ne|sim)(?![A-Za-z])")


def _unsigned(t: str) -> Fraction | None:
    m = _UNSIGNED.fullmatch(t.strip())
    if m is None or not (m["int"] or m["frac"]):
        return None
    digits = re.sub(r"\D", "", m["int"] or "0")
    decimals = m["comma"] or m["frac"] or ""
    exp = int(m["e1"] or m["e2"] or m["e3"] or 0)
    if abs(exp) > _MAX_EXPONENT:
        return None
    return Fraction(int(digits + decimals), 10 ** len(decimals)) * Fraction(10) ** exp


def _signed(t: str) -> Fraction | None:
    t = t.strip()
    neg = t[:1] == "-"
    v = _unsigned(t[1:] if t[:1] in "+-" and t else t)
    return None if v is None else -v if neg else v


def _paren_end(s: str) -> int:
    """Index of the parenthesis closing s[0] == '(', else -1."""
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return i if ch == ")" else -1
    return -1


def _ratio(a: Fraction | None, b: Fraction | None) -> Fraction | None:
    return None if a is None or b is None or b == 0 else a / b


def _core(t: str) -> Fraction | None:
    """An unsigned number without currency or units: a decimal, a fraction or a mixed number."""
    if m := _TEXFRAC.fullmatch(t):
        return _ratio(_signed(m["a"] if m["a"] is not None else m["a1"]),
                      _signed(m["b"] if m["b"] is not None else m["b1"]))
    if t.count("/") == 1 and (v := _ratio(*map(_unsigned, t.split("/")))) is not None:
        return v
    if m := _MIXED.fullmatch(t):
        part = _core(m["f"])
        return None if part is None or not 0 < part < 1 else int(m["w"]) + part
    return _unsigned(t)


def _split_tail(t: str) -> tuple[str, list[str]]:
    """'$18 dollars' -> ('$18', ['dollars'])."""
    words: list[str] = []
    while (m := _TAIL_TOKEN.search(t)) and m.start() > 0:
        words.insert(0, m.group().strip())
        t = t[:m.start()].rstrip()
    return t, words


def unit_words_ok(words: list[str]) -> bool:
    """Are these words around a number only units (not a hedge like 'or more', not a variable like 'x')?"""
    return all(w.lower() not in HEDGE_WORDS and (len(re.sub(r"[^A-Za-z]", "", w)) > 1 or w[0] in "°$€£¥₹₩₽\\")
               for w in words)


def number_text(s: str) -> str | None:
    """s with LaTeX spacing, \\text{} wrappers, \\left/\\right and degree marks normalised; None if it holds
    a digit of another script or an unclosed command."""
    if FOREIGN_DIGIT.search(s):
        return None
    s = drop_commands(s, TEXTLIKE, keep=True)
    if s is None:
        return None
    s = _DEGREE.sub("°", s.replace("−", "-").replace("\\!", "").replace("\\left", "").replace("\\right", ""))
    s = re.sub(r"\bper\s+cent\b", "percent", SPACE_LIKE.sub(" ", s))
    return re.sub(r"\s+", " ", s).strip()


def _lhs_ok(lhs: str) -> bool:
    """'x' or '10 - 3' may stand before '= 7'; a number ('6 = 7'), a list or a bound may not."""
    lhs = lhs.strip()
    words = re.findall(r"[a-z]+", re.sub(r"\\[A-Za-z]+", " ", lhs).lower())  # LaTeX commands are not words
    return not lhs or (not _LHS_BAD.search(lhs) and numeric_value(lhs) is None and not HEDGE_WORDS.intersection(words))


def numeric_value(s: str | None) -> Fraction | None:
    """The value of s if it is exactly one number of the grammar above: '1,234.50' -> 2469/2,
    '\\frac{3}{4}' -> 3/4, '$18 dollars' -> 18, '50\\%' -> 1/2, '1e400' -> 10^400; else None
    ('10-3', '2^{10}', '4 or 5', '1, 2', '0x10', '٥')."""
    if s is None or len(s) > MAX_ANSWER_CHARS:
        return None
    if _PLAIN.fullmatch(s):  # the common case, at a fraction of the cost
        return Fraction(s)
    if (t := number_text(s)) is None:
        return None
    if "=" in t:
        lhs, _, t = t.partition("=")
        if "=" in t or not _lhs_ok(lhs):
            return None
    head, words = _split_tail(t.strip())
    scale = Fraction(1)
    if words and words[0].lower() in _MULTIPLIERS:
        scale *= 10 ** _MULTIPLIERS[words.pop(0).lower()]
    if words and words[0].lower() in PERCENT_WORDS:
        scale /= 100
        words.pop(0)
    if not unit_words_ok(words) or any(w.lower() in PERCENT_WORDS or w.lower() in _MULTIPLIERS for w in words):
        return None
    signs = ""
    for _ in range(8):  # '-$5', '$-5', '{5}', '(42)', '(-5)'; at most one sign
        if head[:1] in ("+", "-") and not signs:
            signs, head = head[0], head[1:].lstrip()
        elif m := _CURRENCY.match(head):
            head = head[m.end():]
        elif (head[:1], group_end(head, 0) if head[:1] == "{" else _paren_end(head)) in (("{", len(head) - 1),
                                                                                          ("(", len(head) - 1)):
            head = head[1:-1].strip()
        else:
            break
    neg = signs == "-"
    value = _core(head)
    if value is None:
        return None
    value *= scale
    return -value if neg else value


def numeric_key(s: str | None) -> str | None:
    """The exact value as 'p' or 'p/q' (the vote key of a number), None if s is not one number."""
    v = numeric_value(s)
    if v is None:
        return None
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


VALUE_KEY = re.compile(r"-?\d+(?:/\d+)?", re.ASCII)
