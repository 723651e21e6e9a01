"""Countdown (TinyZero): the answer is an arithmetic expression that uses each given number at most once and
equals the target (docs/rewards.md "Countdown").

A countdown answer is at most MAX_ANSWER_CHARS long (longer is no answer); within that, any expression is read
by the loop below (no recursion, no `ast`, nothing evaluated by Python), however long or deep.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction
from typing import Any

from reward.extract import BadInput


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
