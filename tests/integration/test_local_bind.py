"""A local run listens on loopback only (docs/platform.md "What a local run listens on"): every listening TCP
socket of a live `forkrl train`'s process tree (the driver, its /metrics server and embedded Valkey, the
private Ray's GCS, raylet, dashboard and runtime-env agents, the autoscaler monitor and dashboard process
(when their fixed metrics ports are free: another Ray on the machine may hold them), and every actor:
generator with vLLM, graders, two learner ranks with their process group, the weight-sync group) is on
127.0.0.1. Sampled with psutil every 0.2 s of a real run with the tiny model: tests/e2e/test_train.py's async
run, which calls `check_loopback_only` (one run fewer in the suite).

Without the fix (cluster/driver/placement.py `_loopback_node`, cluster/transport/weightsync.py
`rendezvous_store` in learner/engine.py) the same run lists GCS, raylet, every core worker, the dashboard
agent's gRPC port and the learner's TCPStore on `*` (:: dual stack), the autoscaler monitor, the dashboard
process and the dashboard agent's metrics port on 0.0.0.0, and the runtime-env and dashboard agents on the
machine's address."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import psutil

from cluster.driver.placement import _loopback_node

# Sockets allowed off loopback, by process name, each with the reason it cannot be bound. None: every
# listener of a local run is bound to 127.0.0.1.
NOT_LOOPBACK_ALLOWED: dict[str, str] = {}


def is_loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:   # ::ffff:127.0.0.1 (an IPv6 gRPC socket)
        a = a.ipv4_mapped
    return a.is_loopback


def listeners(root_pid: int) -> set[tuple[int, str, str, int]]:
    """(pid, process, address, port) of every LISTEN TCP socket of root_pid and all its descendants (Ray's
    processes are the driver's children, the workers the raylet's)."""
    root = psutil.Process(root_pid)
    out = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = p.cmdline()
            # Ray sets worker titles (ray::Trainer); binaries and scripts by their file name
            first = cmd[0] if cmd else p.name()
            name = first if first.startswith("ray::") else \
                Path(next((a for a in cmd if a.endswith(".py")), first.split()[0])).name
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue   # a process that ended between the listing and the look
        out |= {(p.pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.1.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "fd00::2"]))


def test_loopback_node_is_restored():
    """The local-only switch is set for the private Ray's start only: this process joins clusters after."""
    import ray._private.ray_constants as rc
    from ray._private import services

    before = (os.environ.get(rc.ENABLE_RAY_CLUSTERS_ENV_VAR), rc.ENABLE_RAY_CLUSTER)
    with _loopback_node():
        assert os.environ[rc.ENABLE_RAY_CLUSTERS_ENV_VAR] == "0" and rc.ENABLE_RAY_CLUSTER is False
        assert is_loopback(services.resolve_ip_for_localhost("127.0.0.1"))   # no longer the machine's address
    assert (os.environ.get(rc.ENABLE_RAY_CLUSTERS_ENV_VAR), rc.ENABLE_RAY_CLUSTER) == before


def check_loopback_only(seen: set[tuple[int, str, str, int]], run_dir: Path, log: str) -> None:
    """The listeners sampled during a live run (`listeners`, several times): the run's processes were seen and
    none listens off loopback. The live run is tests/e2e/test_train.py's async run (two learner ranks), so
    the suite starts one run fewer."""
    table = "\n".join(f"{pid:>7} {name:32} {ip}:{port}" for pid, name, ip, port in sorted(seen, key=str))
    print(f"listening sockets of the run's process tree:\n{table}")   # pytest -s shows them
    names = {name for _, name, _, _ in seen}
    # the sampling saw the run's processes, or the assertion below would hold on nothing
    for want in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "valkey-server"):
        assert want in names, f"no listener of {want} seen:\n{table}"
    assert any(n.startswith("ray::Generator") for n in names) and any(n.startswith("ray::Trainer") for n in names)
    assert "private local Ray on 127.0.0.1 (loopback only)" in log

    pids = json.loads((run_dir / "pids.json").read_text())
    metrics_port = int((run_dir / "metrics_url").read_text().strip().rsplit(":", 1)[1].split("/")[0])
    assert (pids["driver"], metrics_port) in {(pid, port) for pid, _, _, port in seen}, table
    learner = set(pids["learner"])
    assert len({pid for pid, n, _, _ in seen if pid in learner}) == 2, table   # both ranks' listeners seen

    off = [(pid, name, ip, port) for pid, name, ip, port in seen
           if not is_loopback(ip) and not any(name.startswith(k) for k in NOT_LOOPBACK_ALLOWED)]
    assert not off, f"listening off loopback: {off}\nall listeners:\n{table}"
