"""Verifiers: extract the final answer of a response and decide whether it is right (docs/algorithms.md 6).

Everything here is pure and has no timeout of its own: sympy can hang or exhaust memory on adversarial
output (10^{10^{10}}, (10^6)!), so the grader runs these functions in isolated worker processes
(reward/worker.py) that are killed on a hard timeout. Work crosses that process boundary as plain JSON
"jobs" (`run_job`), never pickle.

Verifiers (`RewardConfig.verifier`); the rules are written down in docs/rewards.md:
- math:      math-verify equivalence (fractions, LaTeX, intervals, sets, expressions) of the final answer
             against the gold answer, where both are parsed completely (never a fragment); two numbers of
             the number grammar are compared exactly.
- numeric:   GSM8K style: the final answer must be exactly one number of the number grammar (currency and
             unit words around it allowed), compared exactly as a rational (0.5 == 1/2 == \\frac{1}{2}).
- countdown: the final answer is an arithmetic expression (+ - * / and parentheses, read by a loop, never
             evaluated by Python) that uses each given number at most once and equals the target (TinyZero).
- exact:     the stripped final answer equals the stripped gold string.
Percent, in every verifier: p% is the number p/100.

The final answer is what the response states as final: its \\boxed{...}, "Answer: ..." lines (the DAPO
prompt format), GSM8K "#### ..." lines and <answer>...</answer> tags. One distinct statement is the answer;
several different ones are one answer, their list (so hedging over boxes is never paid for its last box).
No "last number anywhere" fallback: the format is enforced by the extractor, as in every paper we follow.
"""

from __future__ import annotations

import bisect
import functools
import logging
import re
from collections import Counter
from fractions import Fraction
from collections.abc import Callable
from typing import Any

VERIFIERS = ("math", "numeric", "countdown", "exact")
# RewardConfig.verifier == "auto": the task kind in Rollout.meta["task"] picks the verifier; file data is math.
TASK_VERIFIER = {"arith": "numeric", "numeric": "numeric", "gsm8k": "numeric", "countdown": "countdown",
                 "math": "math", "exact": "exact"}

# A final answer longer than this is unextractable: real final answers are short, and sympy on a long one
# only burns the timeout (a 1 MB \boxed{...} or 10k nested braces score 0 at once).
MAX_ANSWER_CHARS = 1000

log = logging.getLogger(__name__)
# math-verify warns once per process that its signal timeouts are off; we time out in the parent instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)


class BadInput(ValueError):
    """The gold answer or task data (not the model output) is unusable; the message names the field."""


def resolve_verifier(setting: str, task: str | None) -> str:
    if setting != "auto":
        return setting
    return TASK_VERIFIER.get(task or "", "math")


# ---------------------------------------------------------------------------------------------- extraction

_ANSWER_LINE = re.compile(r"(?i)\banswer\s*[:：]\s*([^\n]*)")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_BOX = re.compile(r"\\boxed\s*\{")
_BRACES = re.compile(r"[{}]")
_MAX_STATEMENTS = 100  # more distinct final answers than this is not an answer


def _group_end(text: str, open_at: int) -> int:
    """Index of the brace closing the one at text[open_at], or -1 if unclosed within MAX_ANSWER_CHARS."""
    depth = 0
    for m in _BRACES.finditer(text, open_at, open_at + MAX_ANSWER_CHARS + 2):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return m.start()
    return -1


def _boxes(text: str) -> list[tuple[int, int, str | None]] | None:
    """(start, end, content) of each outermost \\boxed{...}; None if any box is unclosed or too long (such a
    text has no well-formed final answer). Scanned from the end so that a hostile unclosed box stops it at
    once; a box inside another is part of the outer one's content."""
    found: list[tuple[int, int, str | None]] = []
    for m in reversed(list(_BOX.finditer(text))):
        end = _group_end(text, m.end() - 1)
        if end < 0:
            return None
        while found and found[-1][0] < end:
            found.pop()  # a box inside this one is part of its content
        found.append((m.start(), end, text[m.end():end]))
    return found[::-1]


def _tags(text: str) -> list[tuple[int, int, str]]:
    out, pos = [], 0
    while (start := text.find("<answer>", pos)) >= 0:
        end = text.find("</answer>", start)
        if end < 0:
            break
        nxt = text.rfind("<answer>", start, end)  # the innermost opening tag before this closing one
        out.append((nxt, end, text[nxt + len("<answer>"):end]))
        pos = end + len("</answer>")
    return out


def _unbox(s: str) -> str | None:
    """'\\boxed{\\boxed{5}}' -> '5'; a box that is only part of the content ('5 \\boxed{6}') -> None."""
    while (m := _BOX.match(s)) and _group_end(s, m.end() - 1) == len(s) - 1:
        s = s[m.end():-1].strip()
    return None if "\\boxed" in s else s


def final_statements(text: str) -> list[str] | None:
    """Every final-answer statement of a response, cleaned, in order, without repeats: each \\boxed{...},
    each "Answer: ..." line, "#### ..." line and <answer>...</answer> tag (a line or tag holding a box is
    that box; an empty line is not a statement). None when a box or tag is empty, or a statement is unclosed
    or too long: a malformed statement is no answer."""
    boxes = _boxes(text)
    if boxes is None:
        return None
    starts = [s for s, _, _ in boxes]

    def holds_box(lo: int, hi: int) -> bool:
        i = bisect.bisect_left(starts, lo)
        return i < len(starts) and starts[i] <= hi

    items = [(s, c) for s, _, c in boxes]
    for pattern in (_ANSWER_LINE, _HASHES):  # an empty line ("Final Answer:" then the box below) is a heading
        items += [(m.start(), m.group(1)) for m in pattern.finditer(text)
                  if m.group(1).strip() and not holds_box(m.start(1), m.end(1))]
    items += [(s, c) for s, e, c in _tags(text) if not holds_box(s, e)]
    out: list[str] = []
    for _, content in sorted(items, key=lambda sc: sc[0]):
        clean = clean_answer(content)
        clean = None if clean is None else _unbox(clean)
        if not clean:
            return None
        if clean not in out:
            out.append(clean)
            if len(out) > _MAX_STATEMENTS:
                return None
    return out


def clean_answer(s: str | None) -> str | None:
    """Strip whitespace, $ / \\( \\) delimiters, a trailing period and invisible \\phantom{...} groups;
    None if empty or too long."""
    if s is None:
        return None
    s = s.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return None
    # Answers travel on the stream (msgpack, UTF-8): lone surrogates become '?', NULs are dropped.
    s = s.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    s = drop_commands(s, _INVISIBLE)
    if s is None:
        return None
    for _ in range(3):
        before = s
        s = s.strip().rstrip(".").strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$")
        if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2]
        if s == before:
            break
    return s or None


def extract_final(text: str) -> str | None:
    """The final answer of a response (module docstring): its one final-answer statement, or, when it states
    several different ones, all of them as one comma-separated list (math reads it as a set: an answer
    hedged over several boxes is the set of them, never its last box). None when there is none."""
    found = final_statements(text)
    if not found:
        return None
    joined = ", ".join(found)
    return joined if len(joined) <= MAX_ANSWER_CHARS else None


# A LaTeX command with one brace argument, e.g. \text{...}: where it is and where its argument ends.
_INVISIBLE = ("phantom", "hphantom", "vphantom")
_TEXTLIKE = ("text", "textrm", "textnormal", "textbf", "textit", "textsf", "texttt", "mathrm", "mathbf",
             "mathit", "mathsf", "mathtt", "mathnormal", "mbox")


@functools.lru_cache(maxsize=None)
def _command_re(names: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\\(?:" + "|".join(names) + r")\s*\{")


def _commands(s: str, names: tuple[str, ...]) -> list[tuple[int, int, int]] | None:
    """(start, argument start, closing brace) of each \\name{...} of s, in order; None if one is unclosed."""
    out = []
    for m in _command_re(names).finditer(s):
        end = _group_end(s, m.end() - 1)
        if end < 0:
            return None
        out.append((m.start(), m.end(), end))
    return out


def drop_commands(s: str, names: tuple[str, ...], keep: bool = False) -> str | None:
    """Remove each \\name{arg} of s (keep=True: replace it by arg). None if one is unclosed."""
    for _ in range(len(s)):
        found = _commands(s, names)
        if found is None:
            return None
        if not found:
            return s
        start, arg, end = found[-1]  # the last one holds no other command after its start
        s = s[:start] + (s[arg:end] if keep else "") + s[end + 1:]
    return s


# ------------------------------------------------------------------------------------------------- numbers
# One number grammar (docs/rewards.md) for the numeric verifier, the math verifier's exact path and the vote
# keys: a sign, a currency, an integer / decimal (thousands grouped by ',', '{,}' or a space, the decimal
# comma only as '{,}'), a/b, \frac{a}{b} (\dfrac, \tfrac, \frac12), a mixed number, scientific notation
# (1.5e3, 1.5\times 10^{3}), a percent sign (p% is p/100), a multiplier word, unit words, and "lhs =" before
# it. Only ASCII digits are digits. Anything else is not one number.

_MAX_EXPONENT = 1000   # |n| of 10^n in scientific notation; beyond it "a giant number" is not a number we value
_FOREIGN_DIGIT = re.compile(r"(?![0-9])\d")          # full-width, Arabic-Indic, ... (Unicode category Nd)
_SPACE_LIKE = re.compile(r"(?<!\\)\\[,;: ]|\\(?:thinspace|quad|qquad)(?![A-Za-z])|~|[\u00a0\u2009\u202f]")
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
_UNIT = r"(?:[A-Za-z][A-Za-z'.]*|°[CF]?)(?:\^\{?[23]\}?|[²³])?"
_TAIL_TOKEN = re.compile(rf"(?:\\%|%|\\\$|[$€£¥₹₩₽]|{_UNIT}(?:/{_UNIT})*)\s*\Z")
_PERCENT_WORDS = {"%", "\\%", "percent", "percentage", "pct"}
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
    if _FOREIGN_DIGIT.search(s):
        return None
    s = drop_commands(s, _TEXTLIKE, keep=True)
    if s is None:
        return None
    s = _DEGREE.sub("°", s.replace("−", "-").replace("\\!", "").replace("\\left", "").replace("\\right", ""))
    s = re.sub(r"\bper\s+cent\b", "percent", _SPACE_LIKE.sub(" ", s))
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
    if words and words[0].lower() in _PERCENT_WORDS:
        scale /= 100
        words.pop(0)
    if not unit_words_ok(words) or any(w.lower() in _PERCENT_WORDS or w.lower() in _MULTIPLIERS for w in words):
        return None
    signs = ""
    for _ in range(8):  # '-$5', '$-5', '{5}', '(42)', '(-5)'; at most one sign
        if head[:1] in ("+", "-") and not signs:
            signs, head = head[0], head[1:].lstrip()
        elif m := _CURRENCY.match(head):
            head = head[m.end():]
        elif (head[:1], _group_end(head, 0) if head[:1] == "{" else _paren_end(head)) in (("{", len(head) - 1),
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


_VALUE_KEY = re.compile(r"-?\d+(?:/\d+)?", re.ASCII)


# ----------------------------------------------------------------------------------------------- countdown
# A countdown answer is at most MAX_ANSWER_CHARS long (longer is no answer); within that, any expression is
# read by the loop below (no recursion, no `ast`, nothing evaluated by Python), however long or deep.

_CD_TOKEN = re.compile(r"\s*(?:(0|[1-9]\d*)|([-+*/()]))", re.ASCII)
_CD_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _cd_apply(values: list[Fraction], op: str) -> None:
    b, a = values.pop(), values.pop()
    if op == "/" and b == 0:
        raise ZeroDivisionError
    values.append(a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b)


def countdown_eval(expr: str) -> tuple[Fraction, list[int], str] | None:
    """(value, numbers used, canonical text) of an expression of integers, + - * / and parentheses
    (operator precedence and left associativity as in arithmetic); None if it is not one (unary minus,
    **, //, anything else) or divides by zero."""
    values: list[Fraction] = []
    ops: list[str] = []
    used: list[int] = []
    tokens: list[str] = []
    pos, want_operand = 0, True
    while pos < len(expr.rstrip()):
        m = _CD_TOKEN.match(expr, pos)
        if m is None:
            return None
        pos, (num, sym) = m.end(), m.groups()
        tokens.append(num or sym)
        try:
            if num is not None:
                if not want_operand:
                    return None
                used.append(int(num))
                values.append(Fraction(int(num)))
                want_operand = False
            elif sym == "(":
                if not want_operand:
                    return None
                ops.append(sym)
            elif sym == ")":
                if want_operand:
                    return None
                while ops and ops[-1] != "(":
                    _cd_apply(values, ops.pop())
                if not ops:
                    return None
                ops.pop()
            else:
                if want_operand:
                    return None
                while ops and ops[-1] != "(" and _CD_PREC[ops[-1]] >= _CD_PREC[sym]:
                    _cd_apply(values, ops.pop())
                ops.append(sym)
                want_operand = True
        except ZeroDivisionError:
            return None
    if want_operand or "(" in ops:
        return None
    try:
        while ops:
            _cd_apply(values, ops.pop())
    except ZeroDivisionError:
        return None
    return values[0], used, "".join(tokens)


def countdown_expression(answer: str | None) -> str | None:
    """Normalise the extracted answer to a bare expression ('$(8-6)\\times 12 = 24$' -> '(8-6) * 12')."""
    if answer is None:
        return None
    s = (answer.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/").replace("×", "*")
         .replace("÷", "/").replace("−", "-").replace("$", "").replace("\\left", "").replace("\\right", ""))
    parts = [p.strip() for p in s.split("=")]
    # "(8-6)*12 = 24" and "24 = (8-6)*12": the side with an operator is the expression.
    expr = next((p for p in parts if re.search(r"[+\-*/]", p)), parts[0])
    return expr or None


def countdown_check(expr: str | None, numbers: list[int], target: int) -> tuple[bool, str | None, str | None]:
    """(correct, canonical expression, reason when wrong): uses each given number at most once and equals the
    target exactly (fractions, not floats)."""
    if expr is None:
        return False, None, "no answer"
    read = countdown_eval(expr)
    if read is None:
        return False, None, "not an expression of integers, + - * / and parentheses (or divides by zero)"
    value, used, key = read
    if Counter(used) - Counter(numbers):
        return False, key, "uses a number that is not given, or a given number twice"
    if value != target:
        return False, key, "wrong value"
    return True, key, None


def countdown_task(meta: dict[str, Any]) -> tuple[list[int], int]:
    numbers, target = meta.get("numbers"), meta.get("target")
    if (not isinstance(numbers, list) or not numbers or not all(type(n) is int for n in numbers)
            or type(target) is not int):
        raise BadInput("countdown needs meta['numbers'] (list of int) and meta['target'] (int), "
                       f"got numbers={numbers!r} target={target!r}")
    return numbers, target


def parse_countdown_answer(spec: str) -> dict[str, Any]:
    """'target=24 numbers=3,4,6,8' (the `forkrl grade --answer` format) -> {"target": 24, "numbers": [...]}."""
    fields = dict(part.split("=", 1) for part in spec.split() if "=" in part)
    try:
        meta = {"target": int(fields["target"]), "numbers": [int(x) for x in fields["numbers"].split(",")]}
    except (KeyError, ValueError):
        raise BadInput(f"countdown answer must look like 'target=24 numbers=3,4,6,8', got {spec!r}") from None
    return meta


# ---------------------------------------------------------------------------------------------------- math
# math-verify's parser (latex2sympy) reads the whole answer or nothing: we call it directly on the full
# answer, never through math-verify's regex extraction (which falls back to a number or fraction found inside
# an answer it cannot parse) and never with its string fallback (which compared truncated parses). Its unit
# stripping is off: it cut '\frac{1}{\text{e}^2}' to '\frac{1}{' and paid that against any other '\frac{1}{'.
# Answers it reads wrongly rather than not at all are refused first (prepare_math).

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
    if _FOREIGN_DIGIT.search(s) or _UNCERTAIN.search(s):
        return None
    cmds = _commands(s, _TEXTLIKE)
    if cmds is None:
        return None
    if cmds and cmds[-1][2] == len(s) - 1 and s[:cmds[-1][0]].strip():   # a trailing unit: '3\sqrt{2} \text{ cm}'
        start, arg, end = cmds[-1]
        words = s[arg:end].split()
        if not all(re.fullmatch(_UNIT, w) for w in words) or not unit_words_ok(words):
            return None
        if not _PERCENT_WORDS.intersection(w.lower() for w in words):  # 'x \text{ percent}' is x/100
            s = s[:start]
    s = drop_commands(s, _TEXTLIKE, keep=True)
    if s is None:
        return None
    s = _SPACE_LIKE.sub(" ", s.replace("\\!", ""))
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


@functools.lru_cache(maxsize=4096)  # every response of a group is scored against the same gold
def gold_answer(verifier: str, gold: str | None) -> str | None:
    """Normalise a dataset gold answer (it may itself be '\\boxed{..}', '$..$' or a GSM8K '#### 72'); several
    boxes are one answer, as in a response. Numeric: its exact value key ('p' or 'p/q')."""
    if gold is None:
        return None
    text = str(gold)
    final = extract_final(text) if ("\\boxed" in text or "####" in text) else clean_answer(text)
    if final is None:
        raise BadInput(f"gold answer {text[:80]!r} is empty, malformed or longer than {MAX_ANSWER_CHARS} characters")
    if verifier == "numeric":
        key = numeric_key(final)
        if key is None:
            raise BadInput(f"gold answer {text[:80]!r} is not one number (verifier numeric; see docs/rewards.md)")
        return key
    return final


# ------------------------------------------------------------------------------------------------ the jobs

def score_response(verifier: str, text: str, gold: str | None, meta: dict[str, Any]) -> dict[str, Any]:
    """-> {"answer": extracted final answer or None, "key": its canonical form for voting or None,
    "correct": against the gold answer (countdown: against meta), None when there is nothing to check,
    "reason": why it is not correct when that is not simply a different answer, else None}."""
    if verifier not in VERIFIERS:
        raise BadInput(f"unknown verifier {verifier!r} (choose from {', '.join(VERIFIERS)})")
    answer = extract_final(text)
    if verifier == "countdown":
        numbers, target = countdown_task(meta)
        ok, key, reason = countdown_check(countdown_expression(answer), numbers, target)
        return {"answer": answer, "key": key or answer, "correct": ok, "reason": reason}
    ref = gold_answer(verifier, gold)
    if answer is None:
        return {"answer": None, "key": None, "correct": None if ref is None else False, "reason": "no answer"}
    reason = None
    if verifier == "numeric":
        key = numeric_key(answer)
        correct = key is not None and key == ref
        if key is None:
            reason = "not one number"
    elif verifier == "exact":
        key, correct = answer, answer == ref
    else:
        key, correct = math_key(answer), ref is not None and math_equal(ref, answer)
        if ref is not None and not correct and (math_value(answer) is None or math_value(ref) is None):
            reason = "not read completely (only the identical answer is paid)"
    return {"answer": answer, "key": key, "correct": None if ref is None else correct, "reason": reason}


def answers_equal(verifier: str, a: str, b: str) -> bool:
    """Are two canonical keys (from score_response) the same answer? Only math needs more than ==."""
    return a == b or (verifier == "math" and math_equal(a, b))


def needs_check(verifier: str, a: str, b: str) -> bool:
    """Does answers_equal(a, b) need a verification job, or do the keys decide it? Keys of other verifiers
    and two exact values ('1/2', '3') are equal exactly when they are the same string."""
    return verifier == "math" and a != b and not (_VALUE_KEY.fullmatch(a) and _VALUE_KEY.fullmatch(b))


def same_batch_via(run: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], verifier_of: Callable[[int], str]
                   ) -> Callable[[list[tuple[int, str, str]]], list[bool]]:
    """The vote's same_batch (reward.vote) on top of a job runner (a worker pool's run, or run_inline):
    one "same" job per query the keys do not decide; a failed job is "not equal"."""
    def same_batch(queries: list[tuple[int, str, str]]) -> list[bool]:
        todo = [i for i, (g, a, b) in enumerate(queries) if needs_check(verifier_of(g), a, b)]
        out = [False] * len(queries)
        if todo:
            res = run([{"op": "same", "verifier": verifier_of(queries[i][0]), "a": queries[i][1], "b": queries[i][2]}
                       for i in todo])
            for i, r in zip(todo, res):
                out[i] = bool(r.get("equal"))
        return out
    return same_batch


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """The unit of isolated work. {"op": "score", verifier, text, gold, meta} -> score_response(...);
    {"op": "same", verifier, a, b} -> {"equal": bool}."""
    op = job.get("op")
    if op == "score":
        return score_response(job["verifier"], job["text"], job.get("gold"), job.get("meta") or {})
    if op == "same":
        return {"equal": answers_equal(job["verifier"], job["a"], job["b"])}
    raise BadInput(f"unknown job op {op!r} (score | same)")


def safe_run_job(job: dict[str, Any]) -> dict[str, Any]:
    """run_job that never raises: an exception becomes {"error": ...}. Only our own BadInput messages are
    included; str() of a sympy exception can itself hang on a huge expression."""
    try:
        return run_job(job)
    except BadInput as e:
        return {"error": f"BadInput: {e}"}
    except Exception as e:  # noqa: BLE001 - model output must never crash the grader
        return {"error": type(e).__name__}


def run_inline(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """In-process verify_fn without isolation or timeout: for trusted inputs (tests, the benchmark baseline)."""
    return [safe_run_job(j) for j in jobs]
