"""`forkrl grade`: grade responses read from stdin, one JSON string per line, with the training verifiers.

A debugging tool: every response is verified in an isolated worker with the same hard timeout as in
training. The output fields, exit codes and limits are documented in `forkrl grade --help` (cluster/cli.py)
and docs/rewards.md. Stdin is read as bytes and decoded here (invalid UTF-8 replaced, whatever the locale),
so that one bad line never stops the others.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import IO, Any

from reward.countdown import countdown_task, parse_countdown_answer
from reward.extract import BadInput
from reward.verifiers import VERIFIERS, gold_answer, same_batch_via
from reward.vote import cluster_answers, majority
from reward.worker import WorkerPool


def _emit(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _decoded(stdin: IO) -> Iterator[str]:
    """Lines of stdin as text: bytes (sys.stdin.buffer, a binary stream) are decoded as UTF-8 with invalid
    sequences replaced, so neither the locale nor a broken line decides what the others get."""
    for line in getattr(stdin, "buffer", stdin):
        yield line.decode("utf-8", "replace") if isinstance(line, bytes) else line


def _read(stdin: IO, out: IO[str]) -> Iterator[tuple[int, str | None]]:
    """Yield (line number, text) for each non-empty line, text None for a line that is not a JSON string
    (reported on stdout and stderr)."""
    for n, line in enumerate(_decoded(stdin), 1):
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


def grade_stream(stdin: IO, stdout: IO[str], task: str, answer: str | None, vote: bool, timeout: float) -> int:
    """Grade every stdin line (text or bytes); return the exit code (0 ok, 1 some lines were not JSON
    strings, 2 bad options)."""
    from pydantic import ValidationError

    from cluster.config import RewardConfig

    def fail(msg: str) -> int:
        print(f"forkrl grade: {msg}", file=sys.stderr)
        return 2

    if task not in VERIFIERS:
        return fail(f"--task must be one of {', '.join(VERIFIERS)}, got {task!r}")
    try:  # the same rule as the config field reward.timeout_s
        cfg = RewardConfig(timeout_s=timeout)
    except ValidationError as e:
        return fail(f"--timeout {timeout}: {e.errors()[0]['msg']} (seconds, as reward.timeout_s)")
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
    with WorkerPool(1, timeout_s=cfg.timeout_s, memory_mb=cfg.worker_memory_mb) as pool:
        def score(text: str) -> dict[str, Any]:
            res = pool.run([{"op": "score", "verifier": task, "text": text, "gold": gold, "meta": meta}])[0]
            res["seconds"] = round(res.get("seconds", 0.0), 6)  # time in the worker, from send to answer
            return res

        def row(n: int, res: dict[str, Any]) -> dict[str, Any]:
            out = {"line": n, "reward": 1.0 if res.get("correct") else 0.0, "answer": res.get("answer"),
                   "correct": res.get("correct"), "seconds": res["seconds"]}
            out.update({k: res[k] for k in ("reason", "error") if res.get(k) is not None})
            return out

        if not vote:
            for n, text in _read(stdin, stdout):
                if text is None:
                    bad += 1
                else:
                    _emit(stdout, row(n, score(text)))
            return 1 if bad else 0

        rows = []
        for n, text in _read(stdin, stdout):
            if text is None:
                bad += 1
            else:
                rows.append((n, score(text)))
        keys = [r.get("key") for _, r in rows]
        clusters = cluster_answers([keys], same_batch_via(pool.run, lambda g: task))[0]
        winner, agree = majority(clusters)
        label = min(k for k, c in zip(keys, clusters) if c == winner) if winner is not None else None
        votes = int(agree.sum())
        for (n, res), cl, ok in zip(rows, clusters, agree):
            _emit(stdout, {**row(n, res), "reward": 1.0 if ok else 0.0, "cluster": cl, "label": label,
                           "votes": votes})
    return 1 if bad else 0
