"""The servers the queue starts (cluster.transport.valkey) and what the queue does when one restarts."""

import os
import stat

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cluster.config import QueueConfig
from cluster.transport.queue import Consumer, Producer, QueueAddress, ServerLost, open_queue, setup_run
from cluster.types import Response, Rollout, ScoredGroup
from cluster.transport.valkey import LocalServer, redis_binary, valkey_binary

FAST = QueueConfig(claim_idle_s=0.4, read_timeout_s=10, reconnect_s=10)


def group(i: int) -> ScoredGroup:
    r = Response(np.arange(i, i + 5, dtype=np.int32), np.full(5, -0.5, np.float32))
    return ScoredGroup(Rollout(f"gen-{i}", "p", np.arange(3, dtype=np.int32), "prompt", [r], 0),
                       np.ones(1, np.float32), np.zeros(1, np.float32), ["1"])


def test_embedded_server_is_locked_down(valkey_server):
    admin = valkey_server.client()
    cfg = admin.config_get("*")
    assert cfg["bind"].split() == ["127.0.0.1"] and cfg["protected-mode"] == "yes"
    assert cfg["requirepass"] == valkey_server.password and len(valkey_server.password) >= 40
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=valkey_server.port, retry=Retry(NoBackoff(), 0)).ping()
    conf = valkey_server.data_dir / "server.conf"
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(valkey_server.data_dir).st_mode) == 0o700
    assert valkey_server.password not in repr(valkey_server)
    assert valkey_server.password not in valkey_server.log_path.read_text()


def test_open_queue_starts_and_the_caller_stops_the_embedded_server(tmp_path):
    addr, server = open_queue(QueueConfig(aof=True), "run-x", data_dir=str(tmp_path / "valkey"))
    try:
        assert server.running and addr.password == server.password and addr.url == server.url
        with Producer(addr) as p:
            assert p.put(group(0))
        assert any((tmp_path / "valkey" / "appendonlydir").iterdir())
    finally:
        server.stop()
    assert not server.running


@pytest.mark.parametrize("binary", [valkey_binary, redis_binary], ids=["valkey", "redis7"])
def test_restart_with_aof_keeps_pending_groups(binary, tmp_path):
    server = LocalServer(binary(), aof=True, data_dir=tmp_path).start()
    try:
        addr = QueueAddress(server.url, "aof-run", server.password)
        setup_run(addr)
        with Producer(addr, FAST) as p, Consumer(addr, "rank-0", FAST) as c:
            for i in range(3):
                p.put(group(i))
            b = c.read(2, 0)
            server.kill()                                   # SIGKILL, then the same port and directory
            server.start()
            c.ack(b.entry_ids)                              # the pending entries survived; clients reconnect
            b2 = c.read(1, 0)
            assert b2.groups[0].group_id == "gen-2"
            c.ack(b2.entry_ids)
            assert p.put(group(3)) and not p.put(group(0))
            assert c.state_dict()["trained"] == ["gen-0", "gen-1", "gen-2"]
            assert c.stats()["queue/double_trained"] == 0
    finally:
        server.stop()


@pytest.mark.parametrize("binary", [valkey_binary, redis_binary], ids=["valkey", "redis7"])
def test_restart_without_aof_is_detected(binary, tmp_path):
    server = LocalServer(binary(), aof=False, data_dir=tmp_path).start()
    try:
        addr = QueueAddress(server.url, "volatile-run", server.password)
        setup_run(addr)
        with Producer(addr, FAST) as p, Consumer(addr, "rank-0", FAST) as c:
            p.put(group(0))
            b = c.read(1, 0)
            server.kill()
            server.start()
            with pytest.raises(ServerLost, match="Restore from the last checkpoint"):
                c.ack(b.entry_ids)
            with pytest.raises(ServerLost):
                c.read(1, 0, timeout_s=1)
            with pytest.raises(ServerLost):
                p.put(group(1))
    finally:
        server.stop()


def test_embedded_server_dies_with_a_killed_driver(tmp_path):
    """A driver killed with SIGKILL leaves no orphan server on a data directory that a resume reuses."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time; from cluster.transport.valkey import start_valkey; "
            f"s = start_valkey(aof=True, data_dir={str(tmp_path / 'q')!r}); print(s._proc.pid, flush=True); "
            "time.sleep(600)")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    server_pid = int(driver.stdout.readline())
    os.kill(server_pid, 0)  # running
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:  # gone, or a zombie waiting for whichever init adopted it
            if open(f"/proc/{server_pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(server_pid, signal.SIGKILL)
        pytest.fail("the embedded server outlived its killed driver")
