"""The watchdog's last resort (cluster/driver/watchdog.py): a driver whose main thread never takes the interrupt
(blocked in a system call, as in a ray.get on a stopped actor) still exits with EXIT_HUNG and names the resume
command. Run in a subprocess, since that path ends in os._exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import logging, os, sys, time
from pathlib import Path
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
import cluster.driver.watchdog as w

class FakeSystem:   # the attributes the watchdog reads; its stack dump of other processes fails and is reported
    run_dir = Path(sys.argv[1])
    step = 3
    phase_now = ("generate", time.monotonic())
    def log_event(self, *a, **k):
        pass

w.Watchdog(FakeSystem(), multiple=3, floor_s=0.5, grace_s=1.0, poll_s=0.1).start()
r, _ = os.pipe()
os.read(r, 1)   # a system call that the simulated interrupt (_thread.interrupt_main) does not break
print("not reached")
"""


def test_a_main_thread_that_never_takes_the_interrupt_still_exits_hung_with_the_resume_command(tmp_path):
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 4, p.stderr[-3000:]
    assert "HANG: no step completed in" in p.stderr and "stuck in step 4, phase 'generate'" in p.stderr
    assert "did not stop within 1 s of the interrupt: exiting with code 4" in p.stderr
    assert f"continue it from its last checkpoint with: forkrl train --resume {tmp_path}" in p.stderr
    assert "not reached" not in p.stdout
