"""The trajectory bus against real servers (embedded Valkey and Debian Redis 7): every test runs on both."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import msgpack
import numpy as np
import pytest
import redis

from cluster.transport import codec
from cluster.config import QueueConfig
from cluster.transport.queue import (Consumer, Producer, QueueAddress, QueueAuthError, QueueError, QueueFull,
                                     QueueTimeout, ServerLost, create_acl_user, delete_run, setup_run)
from cluster.types import Response, Rollout, ScoredGroup

FAST = QueueConfig(claim_idle_s=0.4, block_timeout_s=5, read_timeout_s=10, reconnect_s=5)


def group(i: int, version: int = 0, g: int = 2, length: int = 6, seed: int | None = None) -> ScoredGroup:
    rng = np.random.default_rng(i if seed is None else seed)
    rs = [Response(rng.integers(0, 1000, length).astype(np.int32), rng.standard_normal(length).astype(np.float32),
                   text=f"r{j}") for j in range(g)]
    ro = Rollout(f"gen-{i}", f"p{i}", np.arange(4, dtype=np.int32), "prompt", rs, version, "gen", meta={"i": i})
    return ScoredGroup(ro, rng.standard_normal(g).astype(np.float32), rng.standard_normal(g).astype(np.float32),
                       ["1"] * g)


def same(a: ScoredGroup, b: ScoredGroup) -> bool:
    return codec.encode(a) == codec.encode(b)


def run_keys(addr):
    return {k: f"forkrl:{addr.run_id}:{k}" for k in ("groups", "produced", "trained", "marker")}


def test_servers_are_what_we_think(queue_server):
    info = queue_server.client().info("server")
    if "valkey" in queue_server.binary:
        assert info["server_name"] == "valkey"
    else:
        assert str(info["redis_version"]).startswith("7.")


def test_roundtrip_ack_and_counters(queue_addr):
    sent = [group(i, version=3) for i in range(5)]
    with Producer(queue_addr, FAST) as p, Consumer(queue_addr, "rank-0", FAST) as c:
        assert all(p.put(g) for g in sent)
        b1 = c.read(3, version=3)
        b2 = c.read(2, version=3)
        got = b1.groups + b2.groups
        assert [g.group_id for g in got] == [g.group_id for g in sent]      # stream order
        assert all(same(a, b) for a, b in zip(got, sent))
        s = c.stats()
        assert (s["queue/pending"], s["queue/undelivered"], s["queue/depth"]) == (5, 0, 5)
        c.ack(b1.entry_ids)
        c.ack(b2.entry_ids)
        with pytest.raises(QueueError, match="cannot ack"):
            c.ack(b1.entry_ids)                                               # twice is a bug, named
        s = c.stats()
        assert s["queue/consumed"] == 5 and s["queue/acked"] == 5
        assert (s["queue/pending"], s["queue/depth"]) == (0, 0)               # acked entries are deleted
        assert p.stats()["queue/produced"] == 5
        assert p.stats()["queue/produced_bytes"] == sum(len(codec.encode(g)) for g in sent)
        assert c.state_dict()["trained"] == sorted(g.group_id for g in sent)


def test_two_ranks_split_the_stream(queue_addr):
    with Producer(queue_addr, FAST) as p, Consumer(queue_addr, "rank-0", FAST) as c0, \
            Consumer(queue_addr, "rank-1", FAST) as c1:
        for i in range(8):
            p.put(group(i))
        b0, b1 = c0.read(4, 0), c1.read(4, 0)
        ids0, ids1 = {g.group_id for g in b0.groups}, {g.group_id for g in b1.groups}
        assert not ids0 & ids1 and ids0 | ids1 == {f"gen-{i}" for i in range(8)}
        c0.ack(b0.entry_ids)
        c1.ack(b1.entry_ids)
        assert len(c0.state_dict()["trained"]) == 8


def test_put_is_idempotent_per_group_id(queue_addr):
    with Producer(queue_addr, FAST) as p, Consumer(queue_addr, "rank-0", FAST) as c:
        assert p.put(group(1))
        assert not p.put(group(1, seed=99))           # same id, other content: refused, nothing added
        assert p.stats()["queue/put_duplicates"] == 1
        assert c.stats()["queue/depth"] == 1
        b = c.read(1, 0)
        c.ack(b.entry_ids)
        assert not p.put(group(1))                    # also after it was trained


def test_backpressure_blocks_then_proceeds(queue_addr):
    cfg = QueueConfig(max_undelivered=3, maxlen=100, claim_idle_s=5, block_timeout_s=30)
    with Producer(queue_addr, cfg) as p, Consumer(queue_addr, "rank-0", cfg) as c:
        for i in range(3):
            assert p.put(group(i))
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("ok", p.put(group(3))))
        t.start()
        t.join(0.5)
        assert t.is_alive()                           # blocked: 3 undelivered
        assert c.stats()["queue/depth"] == 3
        b = c.read(1, 0)                              # delivering one (not even acking) frees a slot
        t.join(20)
        assert not t.is_alive() and result["ok"] is True
        s = p.stats()
        assert s["queue/backpressure_waits"] == 1 and s["queue/backpressure_s"] > 0
        assert (s["queue/undelivered"], s["queue/pending"]) == (3, 1)
        with pytest.raises(QueueFull, match="max_undelivered"):
            p.put(group(4), timeout_s=0.2)
        assert p.stats()["queue/backpressure_waits"] == 2
        assert p.stats()["queue/produced"] == 4
        c.ack(b.entry_ids)


def test_backpressure_bound_is_exact_with_concurrent_producers(queue_addr):
    cfg = QueueConfig(max_undelivered=5, maxlen=100, block_timeout_s=0.3)
    producers = [Producer(queue_addr, cfg) for _ in range(4)]
    errors = []

    def fill(k, p):
        for i in range(10):
            try:
                p.put(group(100 * k + i))
            except QueueFull:
                errors.append(k)
                return

    threads = [threading.Thread(target=fill, args=(k, p)) for k, p in enumerate(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(errors) == [0, 1, 2, 3]
    assert sum(p.stats()["queue/produced"] for p in producers) == 5
    assert producers[0].stats()["queue/undelivered"] == 5
    for p in producers:
        p.close()


def test_staleness_drops_and_read_continues(queue_addr):
    with Producer(queue_addr, FAST) as p, Consumer(queue_addr, "rank-0", FAST) as c:
        for v in range(10):
            p.put(group(v, version=v))
        b = c.read(4, version=9, max_staleness=3)
        assert [g.version for g in b.groups] == [6, 7, 8, 9]
        s = c.stats()
        assert s["queue/dropped_stale"] == 6 and s["queue/consumed"] == 4
        assert (s["queue/depth"], s["queue/pending"]) == (4, 4)       # dropped ones acked and deleted
        c.ack(b.entry_ids)
        assert c.state_dict()["trained"] == sorted(f"gen-{v}" for v in range(6, 10))   # stale != trained


def test_read_timeout_keeps_what_it_got(queue_addr):
    with Producer(queue_addr, FAST) as p, Consumer(queue_addr, "rank-0", FAST) as c:
        p.put(group(0, version=5))
        p.put(group(1, version=5))
        with pytest.raises(QueueTimeout, match="2 of 3"):
            c.read(3, version=5, timeout_s=0.3)
        p.put(group(2, version=6))
        b = c.read(3, version=6, max_staleness=1)
        assert sorted(g.group_id for g in b.groups) == ["gen-0", "gen-1", "gen-2"]
        # carried groups are re-checked: they became stale here
        p.put(group(3, version=6))
        p.put(group(4, version=6))
        with pytest.raises(QueueTimeout):
            c.read(3, version=6, timeout_s=0.3)
        p.put(group(5, version=9))
        with pytest.raises(QueueTimeout):
            c.read(2, version=9, max_staleness=0, timeout_s=0.3)
        assert c.stats()["queue/dropped_stale"] == 2
        c.ack(b.entry_ids)


def test_malformed_entries_are_dropped_and_counted(queue_addr, queue_server):
    admin, k = queue_server.client(), run_keys(queue_addr)
    good = codec.encode(group(1))
    newer = msgpack.unpackb(good)
    newer["schema"] = 2
    admin.xadd(k["groups"], {"g": b"\x00junk"})
    admin.xadd(k["groups"], {"other": good})
    admin.xadd(k["groups"], {"g": msgpack.packb(newer)})
    admin.xadd(k["groups"], {"g": good[:-3]})
    admin.xadd(k["groups"], {"g": good})
    with Consumer(queue_addr, "rank-0", FAST) as c:
        b = c.read(1, 0)
        assert same(b.groups[0], group(1))
        s = c.stats()
        assert s["queue/dropped_malformed"] == 4 and s["queue/depth"] == 1


def _child_consumer(addr: QueueAddress, name: str, n: int) -> subprocess.Popen:
    """A separate Python process that reads n groups, reports them, and waits to be killed."""
    code = (
        "import json, sys, time\n"
        "from cluster.config import QueueConfig\n"
        "from cluster.transport.queue import Consumer, QueueAddress\n"
        "a = json.loads(sys.stdin.readline())\n"
        "c = Consumer(QueueAddress(a['url'], a['run_id'], a['password']), a['name'], QueueConfig(claim_idle_s=0.4))\n"
        "b = c.read(a['n'], version=0)\n"
        "print(json.dumps([g.group_id for g in b.groups]), flush=True)\n"
        "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    # the password goes through a pipe, not argv or the environment
    proc.stdin.write(json.dumps({"url": addr.url, "run_id": addr.run_id, "password": addr.password,
                                 "name": name, "n": n}) + "\n")
    proc.stdin.flush()
    return proc


def test_consumer_killed_between_read_and_ack(queue_addr):
    n = 12
    with Producer(queue_addr, FAST) as p:
        for i in range(n):
            p.put(group(i))
    child = _child_consumer(queue_addr, "rank-1", 5)
    try:
        taken = json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
        child.stdin.close()
    assert len(taken) == 5
    trained = Counter()
    with Consumer(queue_addr, "rank-0", FAST) as c:
        while sum(trained.values()) < n:
            b = c.read(4, version=0)
            trained.update(g.group_id for g in b.groups)
            c.ack(b.entry_ids)                          # "optimizer step succeeded"
        with pytest.raises(QueueTimeout):
            c.read(1, version=0, timeout_s=1.0)         # nothing left, nothing comes back twice
        s = c.stats()
        assert s["queue/reclaimed"] == 5 and s["queue/double_trained"] == 0
        assert (s["queue/pending"], s["queue/depth"]) == (0, 0)
        assert trained == Counter({f"gen-{i}": 1 for i in range(n)})
        assert sorted(c.state_dict()["trained"]) == sorted(trained)


def test_live_slow_consumer_is_not_reclaimed(queue_addr):
    """A step longer than claim_idle_s: the heartbeat keeps the entries with their consumer."""
    with Producer(queue_addr, FAST) as p, Consumer(queue_addr, "rank-0", FAST) as slow, \
            Consumer(queue_addr, "rank-1", FAST) as other:
        for i in range(3):
            p.put(group(i))
        b = slow.read(3, 0)
        time.sleep(4 * FAST.claim_idle_s)               # the "optimizer step"
        with pytest.raises(QueueTimeout):
            other.read(1, 0, timeout_s=0.5)
        assert other.stats()["queue/reclaimed"] == 0
        slow.ack(b.entry_ids)
        assert slow.stats()["queue/double_trained"] == 0 and slow.stats()["queue/lost_ownership"] == 0


def test_restarted_rank_takes_back_its_own_entries_at_once(queue_addr):
    cfg = QueueConfig(claim_idle_s=600)                # no reclaim could explain it
    with Producer(queue_addr, cfg) as p:
        for i in range(4):
            p.put(group(i))
    first = Consumer(queue_addr, "rank-0", cfg)
    b = first.read(3, 0)
    first.close()                                       # the rank "crashes" before its ack
    with Consumer(queue_addr, "rank-0", cfg) as again, Producer(queue_addr, cfg) as p:
        b2 = again.read(2, 0, timeout_s=5)
        b3 = again.read(2, 0, timeout_s=5)
        p.put(group(4))
        b4 = again.read(1, 0, timeout_s=5)
        got = [g.group_id for g in b2.groups + b3.groups + b4.groups]
        assert got[:3] == [g.group_id for g in b.groups] and got == [f"gen-{i}" for i in range(5)]
        s = again.stats()
        assert s["queue/recovered"] == 3 and s["queue/dropped_duplicate"] == 0
        again.ack(b2.entry_ids + b3.entry_ids + b4.entry_ids)


def test_maxlen_caps_the_stream_and_trimmed_entries_are_counted(queue_addr, queue_server):
    cfg = QueueConfig(maxlen=20, max_undelivered=10, claim_idle_s=0.05, read_timeout_s=10)
    admin, stream, total = queue_server.client(), run_keys(queue_addr)["groups"], 300
    with Producer(queue_addr, cfg) as p:
        for r in range(total // 10):
            for i in range(10):
                p.put(group(10 * r + i, length=1))
            # a consumer that takes entries and dies: they stay pending, only MAXLEN removes them
            admin.xreadgroup("learners", "dead", {stream: ">"}, count=10)
        depth = int(p.stats()["queue/depth"])
    node = int(admin.config_get("stream-node-max-entries")["stream-node-max-entries"])
    assert depth < total and depth <= cfg.maxlen + node     # approximate trimming: whole nodes
    assert admin.xpending(stream, "learners")["pending"] == total
    time.sleep(0.1)
    with Consumer(queue_addr, "rank-0", cfg) as c:
        b = c.read(depth, 0)
        assert [g.group_id for g in b.groups] == [f"gen-{i}" for i in range(total - depth, total)]
        with pytest.raises(QueueTimeout):
            c.read(1, 0, timeout_s=1.0)               # sweeps whatever trimmed entries are left pending
        s = c.stats()
        assert s["queue/reclaimed"] == depth and s["queue/dropped_trimmed"] == total - depth
        c.ack(b.entry_ids)
        assert c.stats()["queue/pending"] == 0


def test_wrong_or_missing_password_is_a_clear_error(queue_addr):
    bad = QueueAddress(queue_addr.url, queue_addr.run_id, "not-the-password")
    with pytest.raises(QueueAuthError, match="wrong password") as e:
        Producer(bad)
    assert "not-the-password" not in str(e.value)
    with pytest.warns(UserWarning, match="WITHOUT A PASSWORD"), \
            pytest.raises(QueueAuthError, match="requires a password"):
        Consumer(QueueAddress(queue_addr.url, queue_addr.run_id), "rank-0")
    assert queue_addr.password not in repr(queue_addr)


def test_acl_user_is_confined_to_its_run(queue_addr, queue_server):
    admin = queue_server.client()
    password = create_acl_user(admin, queue_addr.run_id, f"u-{queue_addr.run_id}")
    user_addr = QueueAddress(queue_addr.url, queue_addr.run_id, password, f"u-{queue_addr.run_id}")
    try:
        with Producer(user_addr, FAST) as p, Consumer(user_addr, "rank-0", FAST) as c:
            p.put(group(1))
            b = c.read(1, 0)
            c.ack(b.entry_ids)
            assert c.stats()["queue/acked"] == 1 and c.state_dict()["trained"] == ["gen-1"]
        admin.set("unrelated:key", "secret")
        u = redis.Redis.from_url(queue_addr.url, username=user_addr.username, password=password)
        with pytest.raises(redis.exceptions.NoPermissionError):
            u.get("unrelated:key")
        with pytest.raises(redis.exceptions.NoPermissionError):
            u.set("forkrl:another-run:groups", "x")
        for cmd in (("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "requirepass")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                u.execute_command(*cmd)
        with pytest.raises(redis.exceptions.ResponseError):   # not through a script either
            u.eval("return redis.call('GET', 'unrelated:key')", 0)
        with pytest.raises(QueueError, match="lacks a permission"):
            setup_run(QueueAddress(queue_addr.url, "another-run", password, user_addr.username))
        assert admin.get("unrelated:key") == b"secret" and not admin.exists("forkrl:another-run:groups")
    finally:
        admin.delete("unrelated:key")
        admin.execute_command("ACL", "DELUSER", user_addr.username)


def test_server_loss_is_detected_and_checkpoint_restores_dedup(queue_addr, queue_server):
    with Producer(queue_addr, FAST) as p, Consumer(queue_addr, "rank-0", FAST) as c:
        for i in range(3):
            p.put(group(i))
        b = c.read(2, 0)
        c.ack(b.entry_ids)
        state = c.state_dict()
        assert state["trained"] == ["gen-0", "gen-1"]
        delete_run(queue_addr)                           # what a restart without AOF does to the run
        with pytest.raises(ServerLost):
            c.read(1, 0, timeout_s=1)
        with pytest.raises(ServerLost):
            p.put(group(5))
        setup_run(queue_addr)                            # the driver restores the run...
        with pytest.raises(ServerLost):                  # ...old handles still refuse (new marker)
            p.put(group(5))
    with Producer(queue_addr, FAST) as p, Consumer(queue_addr, "rank-0", FAST) as c:
        c.load_state_dict(state)
        assert not p.put(group(0))                       # trained before the loss: refused
        assert p.put(group(5))
        admin = queue_server.client()                    # a writer bypassing put cannot sneak it in either
        admin.xadd(run_keys(queue_addr)["groups"], {"g": codec.encode(group(1))})
        p.put(group(6))
        b = c.read(2, 0)
        assert [g.group_id for g in b.groups] == ["gen-5", "gen-6"]
        assert c.stats()["queue/dropped_duplicate"] == 1
        c.ack(b.entry_ids)
        with pytest.raises(QueueError, match="expected run"):
            c.load_state_dict({**state, "run_id": "other"})


def test_setup_is_required(queue_server):
    addr = QueueAddress(queue_server.url, "never-set-up", queue_server.password)
    with pytest.raises(ServerLost, match="not set up"):
        Producer(addr)


def test_config_refuses_a_maxlen_that_would_trim_undelivered_groups():
    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="maxlen must be > queue.max_undelivered"):
        load_config(None, ["queue.maxlen=64", "queue.max_undelivered=64"])
