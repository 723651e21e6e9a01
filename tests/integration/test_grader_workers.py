"""The isolated verification workers (reward.worker.WorkerPool): real processes, real hangs, real kills."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.tools.soak import alive
from reward.verifiers import run_inline
from reward.worker import WorkerPool

HANG = {"op": "score", "verifier": "math", "text": "\\boxed{10^{10^{10^{10}}}}", "gold": "1"}
OK = {"op": "score", "verifier": "math", "text": "\\boxed{\\frac{2}{4}}", "gold": "0.5"}
ROOT = str(Path(__file__).resolve().parents[2])


def wait_gone(pids, limit_s=90.0):
    deadline = time.monotonic() + limit_s  # a hang guard, not a timing assertion
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def strip(results):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in results]


@pytest.mark.timeout(120)
def test_parallel_results_equal_inline_and_keep_order():
    jobs = []
    for i in range(12):
        jobs.append({"op": "score", "verifier": "numeric", "text": f"Answer: {i % 5}", "gold": "3"})
        jobs.append({"op": "score", "verifier": "countdown", "text": f"Answer: {i}+3", "meta": {"numbers": [3, i],
                                                                                               "target": 8}})
        jobs.append({"op": "same", "verifier": "math", "a": "0.5", "b": ["1/2", "\\frac13", "\\dfrac{2}{4}"][i % 3]})
    jobs.append({"op": "score", "verifier": "countdown", "text": "x", "meta": {}})           # BadInput
    with WorkerPool(2, timeout_s=30) as pool:
        got = pool.run(jobs)
        assert pool.restarts == 0
        # a job that cannot even be encoded (numpy ints in meta) is an error result, not an exception
        bad = pool.run([OK, {"op": "score", "verifier": "countdown", "text": "Answer: 8*3",
                             "meta": {"numbers": np.array([3, 8]), "target": 24}}, OK])
    assert strip(got) == run_inline(jobs)
    assert bad[0]["correct"] and bad[2]["correct"] and "not JSON-serialisable" in bad[1]["error"]
    assert all(0 < r["seconds"] < 30 for r in got)   # measured in the worker, inside the pool's timeout


@pytest.mark.timeout(120)
def test_timeout_kills_and_replaces_the_worker():
    with WorkerPool(1, timeout_s=1.0) as pool:
        pool.wait_ready()
        first = pool.pids()[0]
        got = pool.run([HANG, OK, HANG, OK])
        assert [r.get("error") for r in got] == ["timeout", None, "timeout", None]
        assert got[1]["correct"] is True and got[3]["correct"] is True
        assert pool.restarts == 2 and pool.pids()[0] != first and not alive(first)
        assert pool.run([]) == []


@pytest.mark.timeout(120)
def test_a_killed_worker_is_a_crash_and_is_replaced():
    with WorkerPool(1, timeout_s=60.0) as pool:
        pool.wait_ready()
        pid = pool.pids()[0]
        out = {}
        t = threading.Thread(target=lambda: out.update(r=pool.run([HANG])))
        t.start()
        time.sleep(1.0)                 # the job is on its way to (or inside) the hung sympy call
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert out["r"][0]["error"] == "crash"
        assert pool.run([OK])[0]["correct"] is True and pool.pids()[0] != pid


@pytest.mark.timeout(120)
def test_a_worker_killed_while_idle_is_replaced_and_its_next_job_retried():
    """The job never reached the dead worker (its pipe was already broken or it was seen dead before the
    job was written): the job runs on the replacement, it is no crash."""
    with WorkerPool(2, timeout_s=60.0) as pool:
        pool.wait_ready()
        dead = pool.pids()
        for pid in dead:
            os.kill(pid, signal.SIGKILL)
        assert wait_gone(dead) == []    # exited (the pool has not reaped them yet)
        got = pool.run([OK, OK, OK])
        assert [r.get("error") for r in got] == [None, None, None] and all(r["correct"] for r in got)
        assert pool.restarts == 2 and not set(pool.pids()) & set(dead)


def test_resource_limits_are_applied():
    with WorkerPool(1, timeout_s=2.0, memory_mb=256) as pool:
        pool.wait_ready()
        limits = Path(f"/proc/{pool.pids()[0]}/limits").read_text()
    space = next(l for l in limits.splitlines() if l.startswith("Max address space")).split()
    core = next(l for l in limits.splitlines() if l.startswith("Max core file size")).split()
    assert space[3] != "unlimited" and int(space[3]) < 64 * 2**30
    assert core[4] == "0"


@pytest.mark.timeout(180)
def test_workers_do_not_outlive_their_parent():
    """The parent dies hard (SIGKILL, no cleanup): the idle worker sees EOF, the hung one hits its CPU cap."""
    script = (
        "import json, sys, threading, time\n"
        "from reward.worker import WorkerPool\n"
        "p = WorkerPool(2, timeout_s=1.0)\n"
        "p.wait_ready()\n"
        f"threading.Thread(target=p.run, args=([{HANG!r}],), daemon=True).start()\n"
        "time.sleep(0.5)\n"
        "print(json.dumps(p.pids()), flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        pids = json.loads(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    assert len(pids) == 2
    assert wait_gone(pids) == []
