"""Weight sync over a real gloo group between plain torch "learner" and "worker" ends.

Ranks run as threads of this process (each has its own TCPStore client and gloo group) except where a peer
must die, which is a real subprocess killed mid-sync. The engine side (vLLM reload) is tested in
test_generator.py.
"""

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from cluster.config import SyncConfig
from cluster.transport.weightsync import SyncError, TensorSpec, WeightReceiver, WeightSender, free_port

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(400, 1000, generator=g),                     # 1.6 MB: larger than a bucket
        "layers.0.q.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "layers.0.q.bias": torch.randn(3, generator=g),                         # odd size: alignment matters
        "layers.0.norm.weight": torch.randn(64, generator=g).half(),
        "step": torch.tensor([seed], dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
    }


def run(fn, *args):
    """Run fn in a thread; return a callable that joins it and returns its result or raises its error."""
    box = {}

    def body():
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # handed to the joining test
            box["err"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()

    def join(timeout=60):
        t.join(timeout)
        assert not t.is_alive(), "rank hung"
        if "err" in box:
            raise box["err"]
        return box["out"]
    return join


def connect(n_receivers: int, timeout_s: float = 10.0, bucket_mb: int = 1):
    port = free_port()
    world = n_receivers + 1
    sync = SyncConfig(timeout_s=timeout_s, bucket_mb=bucket_mb, backend="gloo")
    joins = [run(lambda r=r: WeightReceiver(HOST, port, r, world, sync)) for r in range(1, world)]
    sender = WeightSender(HOST, port, world, sync)
    return sender, [j() for j in joins]


def receive(rx: WeightReceiver):
    m = rx.receive_manifest()
    return m.version, {n: t.clone() for n, t in rx.tensors(m)}, [b.data_ptr() for b in rx._buffers]


@pytest.mark.timeout(120)
def test_two_receivers_get_every_tensor_bit_exact_with_version_and_reused_buffers():
    sender, rxs = connect(2)
    buffers = {}   # receiver index -> bucket buffer addresses seen at each sync
    for version, seed in ((1, 0), (2, 1)):
        weights = model(seed)
        joins = [run(receive, rx) for rx in rxs]
        stats = sender.send(version, weights.items())
        assert stats["bytes"] == sum(TensorSpec.of(n, t).nbytes for n, t in weights.items())
        for k, j in enumerate(joins):
            got_version, got, ptrs = j()
            assert got_version == version
            assert list(got) == list(weights)
            for name, t in weights.items():
                assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
            buffers.setdefault(k, []).append(ptrs)
    assert len(buffers[0][0]) == 2                              # the big tensor, then the rest: two buckets
    for k in buffers:                                           # same layout -> the same buffers reused
        assert buffers[k][0] == buffers[k][1]
    assert buffers[0][0] != buffers[1][0]
    for x in (sender, *rxs):
        x.close()


@pytest.mark.timeout(120)
def test_lazy_tensors_module_by_module_and_mismatch_is_an_error_on_both_sides():
    sender, (rx,) = connect(1, timeout_s=3.0)
    weights = model(3)
    specs = [TensorSpec.of(n, t) for n, t in weights.items()]
    produced = []

    def gather():  # what a ZeRO-3 learner does: materialise one module at a time while buckets fly
        for name, t in weights.items():
            produced.append(name)
            yield name, t.clone()

    j = run(receive, rx)
    sender.send(7, gather(), specs=specs)
    version, got, _ = j()
    assert version == 7 and produced == list(weights)
    assert all(torch.equal(got[n], t) for n, t in weights.items())

    def wrong_order():   # the learner yields out of order after the first bucket (the 1.6 MB embedding)
        items = list(weights.items())
        yield from [items[0], items[2], items[1], *items[3:]]

    j = run(receive, rx)
    with pytest.raises(SyncError, match="tensor #1 does not match the manifest"):
        sender.send(8, wrong_order(), specs=specs)
    # the receiver got the manifest and the first bucket, then nothing: an error within the timeout
    with pytest.raises(SyncError, match="timed out|did not arrive"):
        j()


@pytest.mark.timeout(60)
def test_absent_sender_is_an_error_within_the_timeout():
    with pytest.raises(SyncError, match="could not form within 1.0 s"):
        WeightReceiver(HOST, free_port(), 1, 2, SyncConfig(timeout_s=1.0))


@pytest.mark.timeout(60)
def test_sender_that_never_sends_is_an_error_within_the_timeout():
    sender, (rx,) = connect(1, timeout_s=1.5)
    with pytest.raises(SyncError, match="timed out"):
        rx.receive_manifest()
    sender.close()
    rx.close()


def _peer(code: str, port: int) -> subprocess.Popen:
    """A Python subprocess running `code`; returns once its imports are done (so that a short sync timeout
    measures the sync, not the interpreter's start)."""
    script = textwrap.dedent(f"""
        import os, torch
        from cluster.config import SyncConfig
        from cluster.transport.weightsync import TensorSpec, WeightReceiver, WeightSender
        port = {port}
        print("ready", flush=True)
    """) + textwrap.dedent(code)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.timeout(120)
def test_sender_process_dying_mid_sync_is_an_error_for_the_receiver():
    port = free_port()
    proc = _peer("""
        s = WeightSender("127.0.0.1", port, 2, SyncConfig(timeout_s=20, bucket_mb=1, backend="gloo"))
        specs = [TensorSpec(f"w{i}", (256, 1024), "float32") for i in range(4)]   # 1 MiB each: 4 buckets
        def dies():
            yield "w0", torch.ones(256, 1024)
            os._exit(3)                          # the learner dies while gathering the second module
        s.send(1, dies(), specs=specs)
    """, port)
    try:
        rx = WeightReceiver(HOST, port, 1, 2, SyncConfig(timeout_s=20))
        m = rx.receive_manifest()
        assert m.version == 1 and [s.name for s in m.specs] == ["w0", "w1", "w2", "w3"]
        got = []
        with pytest.raises(SyncError):
            for name, t in rx.tensors(m):
                got.append(name)
        assert got in ([], ["w0"])       # whatever arrived before the death, never the missing buckets
        assert proc.wait(30) == 3
    finally:
        proc.kill()


@pytest.mark.timeout(120)
def test_dead_receiver_is_an_error_for_the_sender():
    port = free_port()
    proc = _peer("""
        rx = WeightReceiver("127.0.0.1", port, 1, 2, SyncConfig(timeout_s=20, backend="gloo"))
        os._exit(0)                              # joins the group, then the generator crashes
    """, port)
    try:
        sender = WeightSender(HOST, port, 2, SyncConfig(timeout_s=2, bucket_mb=1, backend="gloo"))
        assert proc.wait(30) == 0
        with pytest.raises(SyncError):
            sender.send(1, model(0).items())
    finally:
        proc.kill()


@pytest.mark.timeout(120)
def test_receive_memory_is_a_bounded_ring_and_a_lagging_consumer_sees_intact_tensors():
    """12 buckets through sync.receive_buffers=3 buffers: the receiver never holds the whole model, and a
    consumer that keeps the previous bucket's views until the next bucket (as vLLM's layer-wise reload keeps a
    layer straddling two buckets) still reads every tensor intact."""
    port, world = free_port(), 2
    sync = SyncConfig(timeout_s=10.0, bucket_mb=0.25, backend="gloo", receive_buffers=3)
    join = run(lambda: WeightReceiver(HOST, port, 1, world, sync))
    sender = WeightSender(HOST, port, world, sync)
    rx = join()
    g = torch.Generator().manual_seed(7)
    weights = {f"layers.{i}.w": torch.randn(256, 256, generator=g) for i in range(12)}   # 256 KiB each

    def consume():
        m = rx.receive_manifest()
        held, ok = [], {}
        for name, t in rx.tensors(m, copy=False):
            held.append((name, t))               # views kept one tensor (= one bucket) longer
            if len(held) > 1:  # while reading bucket k, bucket k - 1 is still being checked
                old_name, old = held.pop(0)
                ok[old_name] = torch.equal(old, weights[old_name])
        for old_name, old in held:
            ok[old_name] = torch.equal(old, weights[old_name])
        return ok, len(rx._buffers), sum(b.numel() for b in rx._buffers)

    j = run(consume)
    sender.send(1, weights.items())
    ok, n_buffers, resident = j()
    assert ok == {name: True for name in weights}
    assert n_buffers == 3 and resident <= 3 * (256 * 256 * 4 + 64) < sum(t.nbytes for t in weights.values()) / 3
    for x in (sender, rx):
        x.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("buffers,views", [(4, True), (3, False)])
def test_a_sync_that_fits_the_ring_is_yielded_as_views_else_as_copies(buffers, views):
    """4 buckets: with 4 buffers no buffer is refilled during the sync, so the default copy is skipped (the
    tensors are views of the buffers and stay intact after the sync); with 3 each tensor is its own copy."""
    port, world = free_port(), 2
    sync = SyncConfig(timeout_s=10.0, bucket_mb=0.25, backend="gloo", receive_buffers=buffers)
    join = run(lambda: WeightReceiver(HOST, port, 1, world, sync))
    sender = WeightSender(HOST, port, world, sync)
    rx = join()
    g = torch.Generator().manual_seed(3)
    weights = {f"layers.{i}.w": torch.randn(256, 256, generator=g) for i in range(4)}   # one bucket each

    def consume():
        m = rx.receive_manifest()
        return list(rx.tensors(m))            # every tensor kept until the end, as vLLM may keep a layer

    j = run(consume)
    sender.send(1, weights.items())
    got = j()
    spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in rx._buffers]
    inside = [any(lo <= t.data_ptr() < hi for lo, hi in spans) for _, t in got]
    assert inside == [views] * len(weights)
    assert all(torch.equal(t, weights[name]) for name, t in got)
    for x in (sender, rx):
        x.close()
