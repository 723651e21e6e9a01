"""No silent hang: a thread of the driver that stops a run in which no step completes in time.

Every wait of the system has its own deadline where one can be put (weight syncs, queue reads, learner
set-up, grading jobs), but a Ray call into an actor that is alive and never answers (a process stopped by
the kernel, a deadlock in a library, a collective whose peer is gone) does not: the driver would sit idle
for hours. The watchdog bounds the time between two completed steps by

    limit = max(cluster.watchdog_floor_s, cluster.watchdog_multiple x median of the completed steps' times)

(only the floor until a step has completed: the first step compiles and warms up). Past it, it writes
every process's stack to RUN_DIR/hang-stacks.txt (the driver's threads from Python itself; each Ray actor
of the run, the queue server and the grader workers with py-spy, which comes with ray[default], run on the
actor's own node), logs the step and the phase the driver was in, records a `hang` event in the ledger
and interrupts the driver's main thread, which stops the run with exit code EXIT_HUNG (4). If the main
thread does not take the interrupt within cluster.watchdog_grace_s, the process exits with that code by itself.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.driver.system import System

log = logging.getLogger("forkrl")

EXIT_HUNG = 4          # no step completed within the watchdog's limit: stacks in RUN_DIR/hang-stacks.txt
STACKS = "hang-stacks.txt"
DUMP_TIMEOUT_S = 30.0  # per py-spy call


class Watchdog:
    """Started by `System` when its loop starts; `beat()` at the end of every step, `stop()` at the end."""

    def __init__(self, s: System, multiple: float, floor_s: float, grace_s: float = 120.0, poll_s: float = 1.0):
        self.s, self.multiple, self.floor_s, self.grace_s, self.poll_s = s, multiple, floor_s, grace_s, poll_s
        self.durations: list[float] = []
        self.last = time.monotonic()
        self.fired: str | None = None     # the error message, once it fired
        self._stop = threading.Event()
        self._taken = threading.Event()   # the main thread took the interrupt
        self._thread = threading.Thread(target=self._run, name="forkrl-watchdog", daemon=True)

    @property
    def enabled(self) -> bool:
        return self.multiple > 0

    def start(self) -> None:
        self.last = time.monotonic()
        if self.enabled:
            self._thread.start()

    def beat(self) -> None:
        now = time.monotonic()
        self.durations.append(now - self.last)
        self.last = now

    def limit(self) -> float:
        if not self.durations:
            return self.floor_s
        return max(self.floor_s, self.multiple * statistics.median(self.durations))

    def taken(self) -> None:
        """The main thread caught the interrupt and is stopping the run."""
        self._taken.set()

    def stop(self) -> None:
        self._stop.set()
        self._taken.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            waited, limit = time.monotonic() - self.last, self.limit()
            if waited > limit:
                self._fire(waited, limit)
                return

    def _fire(self, waited: float, limit: float) -> None:
        s = self.s
        phase, since = s.phase_now
        where = f"step {s.step + 1}, phase '{phase}' (entered {time.monotonic() - since:.0f} s ago)"
        median = f"{statistics.median(self.durations):.1f} s" if self.durations else "none yet"
        path = s.run_dir / STACKS
        try:
            write_stacks(path, s)
            stacks = f"every process's stack is in {path}"
        except Exception as e:  # noqa: BLE001 - the stop must happen whatever the dump did
            stacks = f"writing the stacks to {path} failed: {type(e).__name__}: {e}"
        self.fired = (f"no step completed in {waited:.0f} s (the watchdog's limit is {limit:.0f} s: "
                      f"cluster.watchdog_multiple = {self.multiple:g} x the median step time ({median}), at least "
                      f"cluster.watchdog_floor_s = {self.floor_s:g} s); stuck in {where}; {stacks}")
        log.error("HANG: %s", self.fired)
        try:
            s.log_event("hang", phase=phase, waited_s=round(waited, 1), limit_s=round(limit, 1), stacks=str(path))
        except Exception:  # noqa: BLE001
            pass
        _thread.interrupt_main()
        if not self._taken.wait(self.grace_s) and not self._stop.is_set():
            # the main thread is blocked in a call that never returns to Python (e.g. a ray.get on the hung
            # actor), so it cannot print the resume hint itself
            log.error("the driver's main thread did not stop within %.0f s of the interrupt: exiting with "
                      "code %d\ncontinue it from its last checkpoint with: forkrl train --resume %s",
                      self.grace_s, EXIT_HUNG, s.run_dir)
            logging.shutdown()
            os._exit(EXIT_HUNG)


# ---------------------------------------------------------------------------------------------- stacks

def write_stacks(path: Path, s: System) -> None:
    """The driver's threads, then every other process of the run (py-spy), into one text file."""
    targets = _targets(s)
    with ThreadPoolExecutor(max_workers=8) as pool:
        dumps = list(pool.map(lambda t: (t, _dump(*t)), targets))
    parts = [f"== driver (pid {os.getpid()})\n{driver_stacks()}"]
    parts += [f"== {label} (pid {pid}{'' if node is None else f', node {node[:12]}'})\n{text}"
              for (label, pid, node), text in dumps]
    path.write_text("\n".join(parts))


def driver_stacks() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"Thread {tid} ({names.get(tid, '?')}):\n{''.join(traceback.format_stack(frame))}"
                     for tid, frame in sys._current_frames().items())


def _targets(s: System) -> list[tuple[str, int, str | None]]:
    """(label, pid, Ray node id or None for this machine) of every process worth a stack: the run's live
    Ray actors from the GCS actor table (each dumped with its subprocesses: vLLM's engine, grader workers),
    else the pids.json the run last wrote; and the queue server."""
    out: list[tuple[str, int, str | None]] = []
    try:
        import ray
        from ray._private import state

        job = ray.get_runtime_context().get_job_id()
        here = ray.get_runtime_context().get_node_id()
        for a in state.actors().values():
            if a.get("State") == "ALIVE" and a.get("JobID") == job and a.get("Pid"):
                node = (a.get("Address") or {}).get("NodeID")
                out.append((f"actor {a.get('ActorClassName')}", int(a["Pid"]), None if node == here else node))
    except Exception as e:  # noqa: BLE001 - a private API: fall back to what the run recorded
        log.warning("watchdog: Ray's actor table is not readable (%s); using pids.json", e)
    try:
        pids = json.loads((s.run_dir / "pids.json").read_text())
    except (OSError, ValueError):
        pids = {}
    if not out:
        for key in ("generators", "learner", "grader_workers"):
            out += [(key.rstrip("s"), int(p), None) for p in pids.get(key) or []]
    if pids.get("queue_server"):
        out.append(("queue server", int(pids["queue_server"]), None))
    return out


def _py_spy() -> str | None:
    return shutil.which("py-spy") or next((str(p) for p in [Path(sys.executable).with_name("py-spy")]
                                           if p.is_file()), None)


def _dump(label: str, pid: int, node: str | None) -> str:
    """`py-spy dump` of pid and its subprocesses, without pausing them (a stopped process is read too);
    on another node through a Ray task placed on that node."""
    if node is not None:
        try:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            task = ray.remote(py_spy_dump).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            return ray.get(task.remote(pid), timeout=DUMP_TIMEOUT_S + 30)
        except Exception as e:  # noqa: BLE001
            return f"(no stack: the dump on node {node} failed: {type(e).__name__}: {e})"
    return py_spy_dump(pid)


def py_spy_dump(pid: int) -> str:
    exe = _py_spy()
    if exe is None:
        return "(no stack: py-spy is not installed; it comes with ray[default])"
    try:
        p = subprocess.run([exe, "dump", "--nonblocking", "--subprocesses", "--pid", str(pid)],
                           capture_output=True, text=True, timeout=DUMP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"(no stack: py-spy did not finish in {DUMP_TIMEOUT_S:.0f} s)"
    return (p.stdout + (f"\n(py-spy: {p.stderr.strip()})" if p.returncode else "")).strip()
