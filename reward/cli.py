"""`forkrl grade`: grade responses read from stdin, one JSON string per line, with the training verifiers.

A debugging tool: every response is verified in an isolated worker with the same hard timeout as in
training. Prints one JSON object per input line: {"line", "reward", "answer" (extracted), "correct",
"seconds"} plus "error" when the verification timed out or crashed; with --vote also "cluster", "label"
(the majority answer) and "votes" (its size), the reward then being agreement with the label (TTRL).
A line that is not a JSON string gets {"line", "error"} and the exit code is 1; bad options exit with 2.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from reward.verifiers import VERIFIERS, BadInput, countdown_task, gold_answer, parse_countdown_answer
from reward.vote import cluster_answers, majority
from reward.worker import WorkerPool


def _emit(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _read(stdin: IO[str], out: IO[str]):
    """Yield (line number, text) for each valid line; report the others."""
    for n, line in enumerate(stdin, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)
            if not isinstance(text, str):
                raise ValueError(f"got a JSON {type(text).__name__}")
        except ValueError as e:
            msg = f"line {n}: expected one JSON string per line ({str(e)[:120]})"
            print(f"forkrl grade: {msg}", file=sys.stderr)
            _emit(out, {"line": n, "error": msg})
            yield n, None
            continue
        yield n, text


def grade_stream(stdin: IO[str], stdout: IO[str], task: str, answer: str | None, vote: bool,
                 timeout: float) -> int:
    """Grade every stdin line; return the exit code (0 ok, 1 some lines were not JSON strings, 2 bad options)."""
    from cluster.config import RewardConfig

    def fail(msg: str) -> int:
        print(f"forkrl grade: {msg}", file=sys.stderr)
        return 2

    if task not in VERIFIERS:
        return fail(f"--task must be one of {', '.join(VERIFIERS)}, got {task!r}")
    if not timeout > 0:
        return fail(f"--timeout must be > 0 seconds, got {timeout}")
    gold, meta = answer, {}
    try:
        if task == "countdown":
            if answer is None:
                return fail("--answer is required for countdown: 'target=24 numbers=3,4,6,8'")
            meta, gold = parse_countdown_answer(answer), None
            countdown_task(meta)
        elif answer is None and not vote:
            return fail("--answer is required unless --vote is given")
        gold_answer(task, gold)
    except BadInput as e:
        return fail(f"--answer: {e}")

    bad = 0
    memory_mb = RewardConfig().worker_memory_mb
    with WorkerPool(1, timeout_s=timeout, memory_mb=memory_mb) as pool:
        def score(text: str) -> dict[str, Any]:
            res = pool.run([{"op": "score", "verifier": task, "text": text, "gold": gold, "meta": meta}])[0]
            res["seconds"] = round(res.get("seconds", 0.0), 6)  # time in the worker, from send to answer
            return res

        if not vote:
            for n, text in _read(stdin, stdout):
                if text is None:
                    bad += 1
                    continue
                res = score(text)
                _emit(stdout, {"line": n, "reward": 1.0 if res.get("correct") else 0.0,
                               "answer": res.get("answer"), "correct": res.get("correct"),
                               "seconds": res["seconds"], **({"error": res["error"]} if "error" in res else {})})
            return 1 if bad else 0

        rows = []
        for n, text in _read(stdin, stdout):
            if text is None:
                bad += 1
            else:
                rows.append((n, score(text)))

        def same_batch(queries):
            res = pool.run([{"op": "same", "verifier": task, "a": a, "b": b} for _, a, b in queries])
            return [bool(r.get("equal")) for r in res]

        clusters = cluster_answers([[r.get("key") for _, r in rows]], same_batch if task == "math" else None)[0]
        winner, agree = majority(clusters)
        label = rows[clusters.index(winner)][1].get("answer") if winner is not None else None
        votes = int(agree.sum())
        for (n, res), cl, ok in zip(rows, clusters, agree):
            _emit(stdout, {"line": n, "reward": 1.0 if ok else 0.0, "answer": res.get("answer"),
                           "correct": res.get("correct"), "seconds": res["seconds"], "cluster": cl,
                           "label": label, "votes": votes, **({"error": res["error"]} if "error" in res else {})})
    return 1 if bad else 0
