"""`forkrl bench queue`: ScoredGroups through the trajectory bus vs raw stream commands on the same server.

value    groups/s through Producer.put -> Consumer.read -> Consumer.ack (encode, backpressure check, dedup,
         decode, staleness screen, XACK+XDEL+trained record), in steps of `batch` groups, one process.
baseline groups/s of the same server doing only XADD (one per group) + XREADGROUP COUNT batch + XACK for
         random byte strings of the encoded group's size, same steps, measured in the same run.
Rounds alternate (ours, raw, ours, raw, ...) and each side reports its median round, so a noisy
neighbour hurts both sides alike. Also reported: MB/s of encoded payload through each path.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator

import numpy as np

from cluster.tools.bench import row

CASES = {"8x1024": (8, 1024), "16x4096": (16, 4096)}   # responses x tokens per response
BATCH = 16              # groups per learner step (rollout.prompts_per_step)
STEPS = 16              # steps per timed round
ROUNDS = 3


def realistic_group(i: int, g: int, length: int, rng: np.random.Generator):
    from cluster.types import Response, Rollout, ScoredGroup

    responses = [Response(rng.integers(0, 151_000, length).astype(np.int32),
                          -rng.exponential(0.5, length).astype(np.float32),
                          text="".join(rng.choice(list("abcdefgh ij0123456789+=\n"), 4 * length)),
                          finish_reason="stop") for _ in range(g)]
    ro = Rollout(f"gen0-{i}", f"train-{i % 997}", rng.integers(0, 151_000, 256).astype(np.int32),
                 "Solve: " + "x" * 1000, responses, version=i // BATCH, generator_id="gen0", gold="42",
                 meta={"task": "arith", "numbers": [3, 7, 11]}, timing={"generate_s": 1.5, "grade_s": 0.1})
    rewards = rng.integers(0, 2, g).astype(np.float32)
    return ScoredGroup(ro, rewards, (rewards - rewards.mean()).astype(np.float32), ["42"] * g,
                       {"correct": rewards, "format": np.ones(g, np.float32)})


def _ours(addr, groups, cfg) -> float:
    from cluster.transport.queue import Consumer, Producer

    with Producer(addr, cfg) as p, Consumer(addr, "bench-rank-0", cfg) as c:
        t0 = time.perf_counter()
        for s in range(0, len(groups), BATCH):
            for g in groups[s:s + BATCH]:
                p.put(g)
            b = c.read(BATCH, version=groups[s].version, max_staleness=1)
            c.ack(b.entry_ids)
        return time.perf_counter() - t0


def _raw(conn, stream: str, payloads: list[bytes]) -> float:
    conn.xgroup_create(stream, "g", id="0", mkstream=True)
    t0 = time.perf_counter()
    for s in range(0, len(payloads), BATCH):
        for data in payloads[s:s + BATCH]:
            conn.xadd(stream, {"g": data})
        entries = conn.xreadgroup("g", "c", {stream: ">"}, count=BATCH)[0][1]
        conn.xack(stream, "g", *[e for e, _ in entries])
    dt = time.perf_counter() - t0
    conn.delete(stream)
    return dt


def run(case: str | None = None) -> Iterator[dict]:
    from cluster.transport import codec
    from cluster.config import QueueConfig
    from cluster.transport.queue import QueueAddress, delete_run, setup_run
    from cluster.transport.valkey import start_valkey

    if case is not None and case not in CASES:
        raise KeyError(f"unknown queue case {case!r}; choose from {', '.join(CASES)}")
    server = start_valkey()
    try:
        conn = server.client()
        for name, (g, length) in CASES.items():
            if case not in (None, name):
                continue
            rng = np.random.default_rng(0)
            n = BATCH * STEPS
            template = [realistic_group(i, g, length, rng) for i in range(BATCH)]
            size = len(codec.encode(template[0]))
            cfg = QueueConfig(max_undelivered=4 * BATCH, maxlen=1000)
            ours, raw = [], []
            for r in range(ROUNDS + 1):                 # round 0 warms up both paths and is not counted
                groups = []
                for i in range(n):                      # fresh ids per round: the bus refuses repeats
                    t = template[i % BATCH]
                    groups.append(type(t)(type(t.rollout)(**{**t.rollout.__dict__, "group_id": f"r{r}-{i}",
                                                             "version": i // BATCH}),
                                          t.rewards, t.advantages, t.answers, t.components))
                addr = QueueAddress(server.url, f"bench-{name}-{r}", server.password)
                setup_run(addr)
                dt = _ours(addr, groups, cfg)
                delete_run(addr)
                payloads = [os.urandom(size) for _ in range(BATCH)] * STEPS
                dt_raw = _raw(conn, f"bench-raw-{name}-{r}", payloads)
                if r:
                    ours.append(dt)
                    raw.append(dt_raw)
            t, t_raw = statistics.median(ours), statistics.median(raw)
            yield row("queue.throughput", n / t, n / t_raw, "groups/s", name, "ratio >= 0.5",
                      mb_s=n * size / t / 1e6, baseline_mb_s=n * size / t_raw / 1e6, group_bytes=size,
                      batch=BATCH, server="valkey " + str(conn.info("server")["valkey_version"]))
    finally:
        server.stop()
