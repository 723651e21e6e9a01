"""cluster.tools.soak.alive: a process that exits while it is looked at is gone, not an error, and a zombie
(exited, not yet reaped) counts as gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from cluster.tools.soak import alive


def test_a_running_process_is_alive():
    assert alive(os.getpid())


def test_a_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30   # a hang guard, not a timing assertion
    while time.monotonic() < deadline:
        state = open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.02)
    assert state == "Z"
    assert not alive(child.pid)   # os.kill(pid, 0) still succeeds on a zombie
    child.wait()
    assert not alive(child.pid)   # reaped: /proc/<pid> is gone


def test_a_pid_that_never_existed_is_not_alive():
    limit = int(open("/proc/sys/kernel/pid_max").read())
    assert not alive(limit + 1)
