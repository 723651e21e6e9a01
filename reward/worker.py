"""Isolated verification: worker processes speaking JSON lines over pipes, with a hard timeout per job.

math-verify's own timeout is SIGALRM, which works only on the main thread of the main interpreter (not in
a Ray actor's executor thread) and cannot interrupt a long C-level operation such as a huge integer power.
So each verification (reward.verifiers.run_job) runs in a child process `python -m reward.worker`:
- a job that exceeds the timeout gets its worker SIGKILLed and replaced; its result is {"error": "timeout"};
- a worker that dies (segfault, kill, out of memory) is replaced; the job it was running has the result
  {"error": "crash"}; one that died while idle had no job: the next job runs on its replacement;
- an exception inside a job is {"error": "<type>"} and the worker keeps going.
The child limits its own address space (RLIMIT_AS) so a memory blow-up is a MemoryError, not an OOM of the
node, and its CPU time (RLIMIT_CPU) so that it dies even if its parent died while it was stuck.
Jobs and results are JSON, never pickle: the model's text is data, not code. Small jobs are pipelined
(several in flight per worker, which runs them in order) so that the pipe round trip is not paid per job;
each job's timer starts when the previous job's result arrives.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import selectors
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[1])  # the repository / site-packages dir holding `reward`
_MAX_START_FAILURES = 3
_PIPE_JOBS = 32          # jobs in flight per worker: pipelining hides the round trip of small jobs
_PIPE_BYTES = 32 << 10   # unread bytes per worker stdin, under Linux's 64 KiB pipe buffer


class _Slot:
    """One worker process: starting (until its ready line) or ready, and the jobs in flight to it."""

    def __init__(self, proc: subprocess.Popen, timeout_s: float, start_timeout_s: float):
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = bytearray()
        self.ready = False
        self.inflight: deque[tuple[int, int]] = deque()   # (job index, line bytes), in the order sent
        self.started_at = time.monotonic()                # when the head job (or the process) started
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s

    @property
    def waiting(self) -> bool:
        """Something with a deadline is going on: the process is starting or a job is in flight."""
        return bool(self.inflight) or not self.ready

    @property
    def deadline(self) -> float:
        return self.started_at + (self.timeout_s if self.ready else self.start_timeout_s)


class WorkerPool:
    """`workers` isolated processes; `run(jobs)` returns one result dict per job, in order, each with the
    "seconds" it ran, and never raises because of a job's content. One caller at a time (the grader actor,
    the CLI)."""

    def __init__(self, workers: int = 1, timeout_s: float = 5.0, memory_mb: int = 2048,
                 start_timeout_s: float = 120.0):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.start_timeout_s = float(start_timeout_s)
        self.restarts = 0
        self._start_failures = 0
        self._sel = selectors.DefaultSelector()
        self._slots = [self._spawn() for _ in range(workers)]

    # ------------------------------------------------------------------------------------- processes
    def _spawn(self) -> _Slot:
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.Popen(
            [sys.executable, "-m", "reward.worker", "--timeout", str(self.timeout_s),
             "--memory-mb", str(self.memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            close_fds=True, start_new_session=True)  # own session: a terminal's Ctrl-C reaches us, not it
        slot = _Slot(proc, self.timeout_s, self.start_timeout_s)
        self._sel.register(slot.fd, selectors.EVENT_READ, slot)
        return slot

    def _kill(self, slot: _Slot) -> None:
        try:
            self._sel.unregister(slot.fd)
        except (KeyError, ValueError):
            pass
        if slot.proc.poll() is None:
            slot.proc.kill()
        slot.proc.wait()
        for f in (slot.proc.stdin, slot.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def _replace(self, slot: _Slot, todo: deque) -> None:
        """Kill a worker and start another. The jobs queued behind its head job never started: they go back
        to the front of `todo` (the head job's result has been set by the caller)."""
        todo.extendleft(i for i, _ in reversed(list(slot.inflight)[1:]))
        if not slot.ready:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                code = slot.proc.poll()
                self._kill(slot)
                raise RuntimeError(f"grader worker failed to start {self._start_failures} times in a row "
                                   f"(last exit code {code}); run `{sys.executable} -m reward.worker` to see why")
        self._kill(slot)
        self.restarts += 1
        self._slots[self._slots.index(slot)] = self._spawn()

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots]

    def close(self) -> None:
        for s in self._slots:
            self._kill(s)
        self._slots = []
        self._sel.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._slots:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------------------------------- jobs
    def wait_ready(self) -> None:
        """Block until every worker has imported the verifiers (so a first timing excludes start-up)."""
        self.run([])

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        lines, todo = [b""] * len(jobs), deque()
        for i, job in enumerate(jobs):
            try:
                lines[i] = json.dumps(job).encode() + b"\n"
                todo.append(i)
            except (TypeError, ValueError) as e:  # e.g. numpy scalars in meta: a data bug, not a crash
                results[i] = {"error": f"BadInput: job is not JSON-serialisable ({e})", "seconds": 0.0}
        while True:
            for slot in list(self._slots):
                self._fill(slot, todo, lines, results)
            if not todo and not any(s.inflight for s in self._slots) and (jobs or all(s.ready for s in self._slots)):
                return results  # type: ignore[return-value]
            wait = min(s.deadline for s in self._slots if s.waiting) - time.monotonic()
            for key, _ in self._sel.select(max(0.0, wait)):
                self._read(key.data, results, todo)
            now = time.monotonic()
            for slot in list(self._slots):
                if slot.waiting and now >= slot.deadline:
                    if slot.inflight:
                        results[slot.inflight[0][0]] = {"error": "timeout", "seconds": now - slot.started_at}
                    self._replace(slot, todo)

    def _fill(self, slot: _Slot, todo: deque, lines: list[bytes], results: list) -> None:
        """Pipeline jobs to a ready worker. It runs them one after another, so only the head job runs and its
        timer restarts at each result. At most _PIPE_BYTES sit unread in its stdin pipe, so a write never
        blocks; a larger job goes alone, to a worker that is idle and therefore reading."""
        while slot.ready and todo and slot in self._slots:
            if not slot.inflight and slot.proc.poll() is not None:
                self._replace(slot, todo)   # died while idle (killed, OOM): no job was in it, none is lost
                return
            i = todo[0]
            queued = sum(n for _, n in slot.inflight)
            if slot.inflight and (len(slot.inflight) >= _PIPE_JOBS or queued + len(lines[i]) > _PIPE_BYTES):
                return
            todo.popleft()
            if not slot.inflight:
                slot.started_at = time.monotonic()
            slot.inflight.append((i, len(lines[i])))
            try:
                slot.proc.stdin.write(lines[i])
                slot.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                if len(slot.inflight) == 1:   # it was idle and already dead: the job never reached it
                    slot.inflight.clear()
                    todo.appendleft(i)
                    self._replace(slot, todo)
                else:
                    self._died(slot, results, todo)

    def _died(self, slot: _Slot, results: list, todo: deque) -> None:
        if slot.inflight:
            results[slot.inflight[0][0]] = {"error": "crash", "seconds": time.monotonic() - slot.started_at}
        self._replace(slot, todo)

    def _read(self, slot: _Slot, results: list, todo: deque) -> None:
        if slot not in self._slots:
            return  # replaced during this round
        try:
            data = os.read(slot.fd, 1 << 16)
        except OSError:
            data = b""
        if not data:  # EOF: the process died
            self._died(slot, results, todo)
            return
        slot.buf += data
        while b"\n" in slot.buf:
            line, _, rest = bytes(slot.buf).partition(b"\n")
            slot.buf = bytearray(rest)
            if not slot.ready:
                slot.ready = line.strip() == b'{"ready": true}'
                self._start_failures = 0 if slot.ready else self._start_failures
                continue
            if not slot.inflight:
                continue  # not expected: the protocol is one line per job
            try:
                out = json.loads(line)
            except ValueError:
                out = None
            if not isinstance(out, dict):
                out = {"error": "protocol"}
            now = time.monotonic()
            out["seconds"] = now - slot.started_at
            results[slot.inflight.popleft()[0]] = out
            slot.started_at = now


# --------------------------------------------------------------------------------------------- the child

def _limit_resources(timeout_s: float, memory_mb: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # RLIMIT_CPU's SIGXCPU would otherwise dump core
    try:
        with open("/proc/self/statm") as f:
            vsize = int(f.read().split()[0]) * resource.getpagesize()
        limit = vsize + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (OSError, ValueError):
        pass  # not Linux: no address-space cap, the parent's timeout still applies


def _cpu_backstop(timeout_s: float) -> None:
    # Normally the parent kills a stuck job at timeout_s of wall time. If the parent itself died, stdin
    # EOF ends an idle worker, and this soft CPU limit (SIGXCPU) ends a busy one.
    used = resource.getrusage(resource.RUSAGE_SELF)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = int(used.ru_utime + used.ru_stime + math.ceil(timeout_s)) + 2  # a job uses <= its wall time
    if hard == resource.RLIM_INFINITY or soft <= hard:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="forkrl verification worker (JSON jobs on stdin, results on stdout)")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--memory-mb", type=int, default=2048)
    args = ap.parse_args(argv)

    from cluster.runtime import startup_gc

    with startup_gc():
        from reward.math_answers import math_equal
        from reward.verifiers import safe_run_job

        # Import sympy, latex2sympy and math-verify before saying ready (two numbers would not need them).
        math_equal("x+1", "1+x")
    _limit_resources(args.timeout, args.memory_mb)
    # The protocol owns file descriptor 1; anything a library prints goes to stderr instead of being
    # read as a result.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write(b'{"ready": true}\n')
    out.flush()
    # One flush per result, never batched: the parent times each job from the previous job's result, so a
    # result held back behind a job that then hangs would be charged to the wrong job.
    for line in sys.stdin.buffer:
        _cpu_backstop(args.timeout)
        try:
            job = json.loads(line)
            result = safe_run_job(job) if isinstance(job, dict) else {"error": "BadInput: job is not an object"}
        except ValueError:
            result = {"error": "BadInput: job is not JSON"}
        out.write(json.dumps(result).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
