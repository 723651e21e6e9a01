"""Verifiers: extract the final answer of a response and decide whether it is right (docs/algorithms.md 6).

Everything here is pure and has no timeout of its own: sympy can hang or exhaust memory on adversarial
output (10^{10^{10}}, (10^6)!), so the grader runs these functions in isolated worker processes
(reward/worker.py) that are killed on a hard timeout. Work crosses that process boundary as plain JSON
"jobs" (`run_job`), never pickle.

Verifiers (`RewardConfig.verifier`):
- math:      math-verify equivalence (fractions, decimals, LaTeX, percentages, intervals, sets) of the final
             answer against the gold answer (Skywork-OR1 / TRL accuracy_reward use math-verify the same way).
- numeric:   GSM8K style: the last number of the final answer, commas, units and a trailing period ignored,
             compared exactly as a rational (0.5 == 1/2 == \\frac{1}{2}).
- countdown: the final answer is an arithmetic expression (+ - * / and parentheses, parsed with `ast`, never
             evaluated by Python) that uses each given number at most once and equals the target (TinyZero).
- exact:     the stripped final answer equals the stripped gold string.

The final answer is whichever comes last in the text: the last brace-matched \\boxed{...}, an
"Answer: ..." line (the DAPO prompt format), a GSM8K "#### ..." line or an <answer>...</answer> tag.
No "last number anywhere" fallback: the format is enforced by the extractor, as in every paper we follow.
"""

from __future__ import annotations

import ast
import functools
import logging
import re
from collections import Counter
from fractions import Fraction
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
_BRACES = re.compile(r"[{}]")


def _last_boxed(text: str) -> tuple[int, str | None]:
    """Position and content of the last \\boxed{...} (brace-matched); content None if unclosed or too long."""
    start = text.rfind("\\boxed")
    if start < 0:
        return -1, None
    i = start + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return start, None
    depth = 0
    for m in _BRACES.finditer(text, i):
        if m.start() - i > MAX_ANSWER_CHARS + 1:
            return start, None
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return start, text[i + 1:m.start()]
    return start, None


def _last_match(pattern: re.Pattern, text: str) -> tuple[int, str | None]:
    last = None
    for last in pattern.finditer(text):
        pass
    return (last.start(), last.group(1)) if last else (-1, None)


def _last_answer_tag(text: str) -> tuple[int, str | None]:
    # rfind, not a lazy DOTALL regex: that is quadratic on many unclosed tags.
    end = text.rfind("</answer>")
    if end < 0:
        return -1, None
    start = text.rfind("<answer>", 0, end)
    return (start, text[start + len("<answer>"):end]) if start >= 0 else (-1, None)


def clean_answer(s: str | None) -> str | None:
    """Strip whitespace, $ / \\( \\) delimiters and a trailing period; None if empty or too long."""
    if s is None:
        return None
    s = s.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return None
    # Answers travel on the stream (msgpack, UTF-8): lone surrogates become '?', NULs are dropped.
    s = s.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
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
    """The final answer of a response (module docstring), cleaned; None when there is none."""
    found = [_last_boxed(text), _last_match(_ANSWER_LINE, text), _last_match(_HASHES, text),
             _last_answer_tag(text)]
    pos, content = max(found, key=lambda pc: pc[0])
    if pos < 0:
        return None
    # "Answer: \boxed{5}" has its box inside the line: the box starts later and wins.
    return clean_answer(content)


# ------------------------------------------------------------------------------------------------- numeric

_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(rf"(-?)\s*({_NUM})(?:\s*/\s*(-?)\s*({_NUM}))?")


def numeric_value(s: str | None) -> Fraction | None:
    """The last number in s as an exact rational: '1,234.50' -> 2469/2, '\\frac{3}{4}' -> 3/4, '$18.' -> 18."""
    if s is None or len(s) > MAX_ANSWER_CHARS:
        return None
    s = s.replace("−", "-").replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    s = _FRAC.sub(r"(\1)/(\2)", s).replace("(", "").replace(")", "")
    last = None
    for last in _NUMBER.finditer(s):
        pass
    if last is None:
        return None
    sign, num, dsign, den = last.groups()
    try:
        value = Fraction(num.replace(",", ""))
        if den is not None:
            d = Fraction(den.replace(",", ""))
            if d == 0:
                return None
            value /= -d if dsign else d
    except (ValueError, ZeroDivisionError):
        return None
    return -value if sign else value


def numeric_key(s: str | None) -> str | None:
    v = numeric_value(s)
    if v is None:
        return None
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


# ----------------------------------------------------------------------------------------------- countdown

_CD_CHARS = re.compile(r"[\d\s+\-*/()]+")
_CD_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}


def _cd_eval(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _cd_eval(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _CD_OPS:
        return _CD_OPS[type(node.op)](_cd_eval(node.left, used), _cd_eval(node.right, used))
    raise ValueError(f"not allowed in a countdown expression: {type(node).__name__}")


def countdown_expression(answer: str | None) -> str | None:
    """Normalise the extracted answer to a bare expression ('$(8-6)\\times 12 = 24$' -> '(8-6)*12')."""
    if answer is None:
        return None
    s = (answer.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/").replace("×", "*")
         .replace("÷", "/").replace("−", "-").replace("$", "").replace("\\left", "").replace("\\right", ""))
    parts = [p.strip() for p in s.split("=")]
    # "(8-6)*12 = 24" and "24 = (8-6)*12": the side with an operator is the expression.
    expr = next((p for p in parts if re.search(r"[+\-*/]", p)), parts[0])
    return expr or None


def countdown_check(expr: str | None, numbers: list[int], target: int) -> tuple[bool, str | None]:
    """(correct, canonical expression). Uses each given number at most once and equals the target; never eval."""
    if expr is None or not _CD_CHARS.fullmatch(expr) or "**" in expr or "//" in expr:
        return False, None
    try:
        tree = ast.parse(expr, mode="eval")
        used: list[int] = []
        value = _cd_eval(tree, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return False, None
    ok = not (Counter(used) - Counter(numbers)) and value == target
    return ok, ast.unparse(tree).replace(" ", "")


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

@functools.lru_cache(maxsize=4096)
def _parse_math(s: str) -> tuple:
    from math_verify import parse

    # parsing_timeout=None: math-verify's SIGALRM timeout only works on a main thread; the worker's parent
    # enforces the hard timeout instead.
    return tuple(parse("\\boxed{" + s + "}", parsing_timeout=None))


def math_equal(gold: str, pred: str) -> bool:
    """math-verify equivalence of two final answers (gold first: math-verify is not symmetric)."""
    from math_verify import verify

    if gold.strip() == pred.strip():
        return True
    g, p = _parse_math(gold), _parse_math(pred)
    return bool(g and p) and bool(verify(list(g), list(p), timeout_seconds=None))


def gold_answer(verifier: str, gold: str | None) -> str | None:
    """Normalise a dataset gold answer (it may itself be '\\boxed{..}', '$..$' or a GSM8K '#### 72')."""
    if gold is None:
        return None
    if verifier == "numeric":
        key = numeric_key(gold)
        if key is None:
            raise BadInput(f"gold answer {gold[:80]!r} has no number (verifier numeric)")
        return key
    text = str(gold)
    final = extract_final(text) if ("\\boxed" in text or "####" in text) else clean_answer(text)
    if final is None:
        raise BadInput(f"gold answer {text[:80]!r} is empty or longer than {MAX_ANSWER_CHARS} characters")
    return final


# ------------------------------------------------------------------------------------------------ the jobs

def score_response(verifier: str, text: str, gold: str | None, meta: dict[str, Any]) -> dict[str, Any]:
    """-> {"answer": extracted final answer or None, "key": its canonical form for voting or None,
    "correct": against the gold answer (countdown: against meta), None when there is nothing to check}."""
    if verifier not in VERIFIERS:
        raise BadInput(f"unknown verifier {verifier!r} (choose from {', '.join(VERIFIERS)})")
    answer = extract_final(text)
    if verifier == "countdown":
        numbers, target = countdown_task(meta)
        ok, key = countdown_check(countdown_expression(answer), numbers, target)
        return {"answer": answer, "key": key or answer, "correct": ok}
    ref = gold_answer(verifier, gold)
    if verifier == "numeric":
        key = numeric_key(answer)
        return {"answer": answer, "key": key, "correct": None if ref is None else key is not None and key == ref}
    if answer is None:
        return {"answer": None, "key": None, "correct": None if ref is None else False}
    if verifier == "exact":
        return {"answer": answer, "key": answer, "correct": None if ref is None else answer == ref}
    return {"answer": answer, "key": answer, "correct": None if ref is None else math_equal(ref, answer)}


def answers_equal(verifier: str, a: str, b: str) -> bool:
    """Are two canonical keys (from score_response) the same answer? Only math needs more than ==."""
    return a == b or (verifier == "math" and math_equal(a, b))


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
