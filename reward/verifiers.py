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

import functools
from collections.abc import Callable
from typing import Any

from reward.countdown import countdown_check, countdown_expression, countdown_task
from reward.extract import MAX_ANSWER_CHARS, BadInput, clean_answer, extract_final
from reward.math_answers import math_equal, math_key, math_value
from reward.numbers import VALUE_KEY, numeric_key

VERIFIERS = ("math", "numeric", "countdown", "exact")
# RewardConfig.verifier == "auto": the task kind in Rollout.meta["task"] picks the verifier; file data is math.
TASK_VERIFIER = {"arith": "numeric", "organism": "numeric", "numeric": "numeric", "gsm8k": "numeric",
                 "countdown": "countdown", "math": "math", "exact": "exact"}


def resolve_verifier(setting: str, task: str | None) -> str:
    if setting != "auto":
        return setting
    return TASK_VERIFIER.get(task or "", "math")


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
    return verifier == "math" and a != b and not (VALUE_KEY.fullmatch(a) and VALUE_KEY.fullmatch(b))


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
