"""Versioned weight sync: learner rank 0 broadcasts named tensors to every generator worker.

A private process group (gloo on CPU, NCCL on GPU) that never touches the default process group of either
side (docs/architecture.md, docs/platform.md "Weight broadcast on CPU"). One sync is:

1. a header `[magic, manifest length]` (int64) then the manifest itself as msgpack bytes in a uint8 tensor:
   version, bucket size and (name, shape, dtype) of every tensor, in send order. No pickle: a receiver
   never executes anything the sender wrote.
2. the tensors packed into buckets of `bucket_bytes` (a larger tensor gets a bucket of its own), one
   broadcast per bucket. Both sides derive the same bucket layout from the manifest with `plan_buckets`.

The receiver receives into a bounded ring of bucket buffers (`receive_slots`; never a whole-model copy of a
large model: 3 x 128 MiB rather than 65 GB for a 32B model), kept between syncs (fresh buffers cost page faults on
every sync), and yields tensors as their bucket arrives, so a consumer such as vLLM's layer-wise reload
overlaps the receive. vLLM's layer-wise reload keeps the tensors it is given until their layer is complete
(a layer it never sees complete, until the end of the reload), so when the ring is smaller than the sync each
tensor is yielded as a copy of its own, made as its bucket is read: receive memory is the ring plus what the
consumer itself keeps. A sync that fits the ring is yielded as views, with no copy. Every
tensor-parallel worker receives whole tensors and its weight loaders keep their shard.
Every wait is bounded by a deadline derived once from `sync.timeout_s` (`Deadlines`): a dead or absent peer
raises `SyncError`, never hangs; the group is unusable afterwards and must be rebuilt. Both ends take the
run's `SyncConfig`.
"""

from __future__ import annotations

import math
import os
import queue
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist

from cluster.config import SyncConfig

MAGIC = 0x666B726C7773  # "fkrlws": rejects a peer speaking another protocol
_ALIGN = 64             # byte alignment of every tensor inside a bucket (any dtype view is legal)
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


BUCKET_SLACK_S = 5.0   # past the broadcast's own timeout, so a timed-out bucket is reported by the broadcast
INIT_SLACK_S = 30.0    # forming the group: every member starts its process (a vLLM worker) before it joins


@dataclass(frozen=True)
class Deadlines:
    """Every wait of a weight sync, in seconds, each derived from `sync.timeout_s` here and nowhere else."""

    collective_s: float   # each collective of the group: forming it, every broadcast
    bucket_s: float       # a receiver waiting for its receive thread to hand over one bucket
    apply_s: float        # the driver waiting for a generator's receive-and-reload call
    hung_s: float         # after a failed call, a generator still busy this much later is hung (replaced)
    group_init_s: float   # the driver waiting for every member to join the group

    @classmethod
    def of(cls, sync: SyncConfig) -> "Deadlines":
        t = sync.timeout_s
        return cls(collective_s=t, bucket_s=t + BUCKET_SLACK_S, apply_s=t, hung_s=t, group_init_s=t + INIT_SLACK_S)


def bucket_bytes(sync: SyncConfig) -> int:
    """sync.bucket_mb in bytes (at least 1)."""
    return max(1, int(sync.bucket_mb * (1 << 20)))


class SyncError(RuntimeError):
    """A weight sync failed (timeout, dead peer, bad manifest); the group must be rebuilt."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str                      # key of _DTYPES, e.g. "float32"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype].itemsize

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise SyncError(f"tensor {name!r}: dtype {dtype} cannot be synced")
        return cls(name, tuple(t.shape), dtype)


@dataclass(frozen=True)
class Manifest:
    version: int
    bucket_bytes: int
    specs: tuple[TensorSpec, ...]

    def encode(self) -> bytes:
        return msgpack.packb({"version": self.version, "bucket_bytes": self.bucket_bytes,
                              "tensors": [[s.name, list(s.shape), s.dtype] for s in self.specs]})

    @classmethod
    def decode(cls, data: bytes) -> "Manifest":
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
            version, bucket_bytes, rows = obj["version"], obj["bucket_bytes"], obj["tensors"]
        except Exception as e:  # malformed bytes or missing keys: name what was expected
            raise SyncError(f"weight manifest is not a msgpack map with version/bucket_bytes/tensors: {e}") from None
        if not isinstance(version, int) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise SyncError(f"weight manifest: bad version {version!r} or bucket_bytes {bucket_bytes!r}")
        specs = []
        for i, row in enumerate(rows):
            ok = (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                  and isinstance(row[1], list) and all(isinstance(d, int) and d >= 0 for d in row[1])
                  and row[2] in _DTYPES)
            if not ok:
                raise SyncError(f"weight manifest: tensor row {i} is not [name, shape, known dtype]: {row!r}")
            specs.append(TensorSpec(row[0], tuple(row[1]), row[2]))
        return cls(version, bucket_bytes, tuple(specs))


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    entries: tuple[tuple[int, int], ...]     # (index into specs, byte offset in the bucket)


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """Pack tensors in order into buckets of at most bucket_bytes (one larger tensor fills its own)."""
    buckets, entries, used = [], [], 0
    for i, s in enumerate(specs):
        start = -(-used // _ALIGN) * _ALIGN
        if entries and start + s.nbytes > bucket_bytes:
            buckets.append(Bucket(used, tuple(entries)))
            entries, start = [], 0
        entries.append((i, start))
        used = start + s.nbytes
    if entries:
        buckets.append(Bucket(used, tuple(entries)))
    return buckets


def _view(buf: torch.Tensor, offset: int, spec: TensorSpec) -> torch.Tensor:
    return buf[offset:offset + spec.nbytes].view(_DTYPES[spec.dtype]).view(spec.shape)


def _why(e: BaseException) -> str:
    """The first line of a c10d error (the rest is a C++ stack trace)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise SyncError("sync.backend is 'nccl' but this process sees no GPU")
    return backend


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ProcessGroupNCCL reads these when it is constructed (torch 2.13 ProcessGroupNCCL.hpp, ErrorHandlingMode).
# The default (TearDown, 1) lets the watchdog kill the whole process when a collective times out: learner rank 0
# would die with a dead generator. CleanUpOnly (2) aborts the communicator and leaves the error to the caller;
# blocking wait makes `work.wait()` raise that error in the waiting thread, as gloo does, so the recovery of
# docs/reliability.md (replace the generator, form a new group, push the current weights) works on GPUs too.
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_BLOCKING_WAIT": "1"}


def nccl_error_handling() -> None:
    """Set NCCL_ENV in this process (before any ProcessGroupNCCL exists); a value the user set is kept."""
    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)


def _open_group(host: str, port: int, rank: int, world_size: int, timeout_s: float, backend: str):
    """A process group of its own (TCPStore + backend object): the default group is never initialised."""
    timeout = timedelta(seconds=timeout_s)
    try:
        store = rendezvous_store(host, port, rank, world_size, timeout)
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            return store, dist.ProcessGroupGloo(store, rank, world_size, opts)
        nccl_error_handling()
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return store, dist.ProcessGroupNCCL(store, rank, world_size, opts)
    except (RuntimeError, OSError) as e:  # rendezvous timed out / refused: say who and where
        raise SyncError(f"weight-sync group {host}:{port} rank {rank}/{world_size} ({backend}) "
                        f"could not form within {timeout_s} s: {_why(e)}") from None


def rendezvous_store(host: str, port: int, rank: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """The TCPStore of a group's rendezvous at host:port. Rank 0 binds the listening socket itself, on `host`
    only (127.0.0.1 for a local run): TCPStore's own server listens on every interface (`::`, dual stack)
    whatever host it is given. Used by the weight-sync groups and the learner's process group."""
    if rank:
        return dist.TCPStore(host, port, world_size, False, timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, reuse_port=False)
    try:
        return dist.TCPStore(host, port, world_size, True, timeout, wait_for_workers=False,
                             master_listen_fd=listener.detach(), use_libuv=False)
    finally:
        listener.close()


class BroadcastGroup:
    """The private group itself: broadcasts from rank 0 with a timeout on every one (senders and receivers
    below are built on it; the weight-sync benchmark uses it raw)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float, backend: str):
        if not 0 <= rank < world_size or world_size < 2:
            raise SyncError(f"weight-sync rank {rank} outside world of size {world_size} (need >= 2 ranks)")
        self.backend = resolve_backend(backend)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self._store, self._pg = _open_group(host, port, rank, world_size, timeout_s, self.backend)

    def start(self, t: torch.Tensor):
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = timedelta(seconds=self.timeout_s)
        try:
            return self._pg.broadcast([t], opts)
        except RuntimeError as e:
            raise SyncError(f"weight-sync broadcast failed to start: {_why(e)}") from None

    def wait(self, work) -> None:
        try:
            work.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise SyncError(f"weight-sync broadcast failed or timed out after {self.timeout_s} s "
                            f"(dead or absent peer?): {_why(e)}") from None

    def broadcast(self, t: torch.Tensor) -> None:
        self.wait(self.start(t))

    def close(self) -> None:
        """Drop the group; an NCCL communicator is aborted first (a failed one may hold the GPU stream)."""
        if self.backend == "nccl" and self._pg is not None:
            try:
                self._pg.abort()
            except RuntimeError:
                pass
        self._pg = self._store = None


class WeightSender:
    """Learner rank 0's end (rank 0 of the group). Constructing it blocks until every receiver has joined,
    so the driver creates the sender and the receivers concurrently."""

    def __init__(self, host: str, port: int, world_size: int, sync: SyncConfig):
        self.group = BroadcastGroup(host, port, 0, world_size, Deadlines.of(sync).collective_s, sync.backend)
        self.bucket_bytes = bucket_bytes(sync)
        self._buffers: list[torch.Tensor] = []   # two bucket buffers: fill one while the other is on the wire

    def send(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]],
             specs: Sequence[TensorSpec] | None = None) -> dict[str, float]:
        """Broadcast `named_tensors` (HF checkpoint names) as weights `version`.

        `specs` announces names, shapes and dtypes up front so the tensors themselves may be produced lazily,
        e.g. gathered module by module from ZeRO-3 shards while earlier buckets are on the wire; without it
        the iterable is materialised first. The iterable must then yield exactly `specs`, in order.
        Returns {"bytes", "prepare_s" (first bucket packed + manifest sent), "send_s" (the rest)}.
        """
        t0 = time.perf_counter()
        if specs is None:
            named_tensors = list(named_tensors)
            specs = [TensorSpec.of(n, t) for n, t in named_tensors]
        manifest = Manifest(int(version), self.bucket_bytes, tuple(specs))
        buckets = plan_buckets(manifest.specs, manifest.bucket_bytes)
        g = self.group
        largest = max((b.nbytes for b in buckets), default=0)
        if not self._buffers or self._buffers[0].numel() < largest:
            self._buffers = [torch.empty(largest, dtype=torch.uint8, device=g.device) for _ in range(2)]
        it = iter(named_tensors)

        def pack(k: int) -> torch.Tensor:
            buf = self._buffers[k % 2]
            for i, offset in buckets[k].entries:
                spec = manifest.specs[i]
                name, t = next(it, (None, None))
                if name != spec.name or tuple(t.shape) != spec.shape or TensorSpec.of(name, t).dtype != spec.dtype:
                    got = None if t is None else (name, tuple(t.shape), str(t.dtype))
                    raise SyncError(f"tensor #{i} does not match the manifest: expected {spec}, got {got}")
                _view(buf, offset, spec).copy_(t.detach())
            return buf[:buckets[k].nbytes]

        # The first bucket is packed before the manifest goes out: receivers start their clock (and their
        # reload) when the manifest arrives, and the first bucket is the only one nothing overlaps with.
        first = pack(0) if buckets else None
        data = manifest.encode()
        g.broadcast(torch.tensor([MAGIC, len(data)], dtype=torch.int64, device=g.device))
        g.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(g.device))
        t1 = time.perf_counter()
        pending: list = [None, None]
        for k in range(len(buckets)):
            slot = k % 2
            if k:
                if pending[slot] is not None:
                    g.wait(pending[slot])   # bucket k-2 left this buffer
                pending[slot] = g.start(pack(k))
            else:
                pending[slot] = g.start(first)
        for w in pending:
            if w is not None:
                g.wait(w)
        if next(it, None) is not None:
            raise SyncError("more tensors than the manifest announced")
        return {"bytes": float(sum(s.nbytes for s in manifest.specs)), "prepare_s": t1 - t0,
                "send_s": time.perf_counter() - t1}

    def close(self) -> None:
        self.group.close()


RESIDENT_MAX_BYTES = 1 << 30   # sync.receive_buffers=None: weights up to this get a buffer per bucket


def receive_slots(sync: SyncConfig, n_buckets: int, total_bytes: int) -> int:
    """How many bucket buffers a receiver holds for a sync of `n_buckets` buckets, `total_bytes` in all
    (SyncConfig.receive_buffers); the memory arithmetic of `forkrl check` counts the same."""
    if sync.receive_buffers is not None:
        return min(n_buckets, sync.receive_buffers)
    return n_buckets if total_bytes <= RESIDENT_MAX_BYTES else min(n_buckets, 3)


class WeightReceiver:
    """A generator worker's end (rank >= 1)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, sync: SyncConfig):
        self.deadlines = Deadlines.of(sync)
        self.group = BroadcastGroup(host, port, rank, world_size, self.deadlines.collective_s, sync.backend)
        self.sync = sync
        self._buffers: list[torch.Tensor] = []
        self.timing: dict[str, float] = {}

    def receive_manifest(self) -> Manifest:
        """Block (up to the collective deadline) until the sender starts a sync; return what it will send."""
        g = self.group
        header = torch.zeros(2, dtype=torch.int64, device=g.device)
        g.broadcast(header)
        magic, length = header.tolist()
        if magic != MAGIC or not 0 < length < 1 << 31:
            raise SyncError(f"weight-sync header {header.tolist()} is not from a forkrl WeightSender")
        data = torch.empty(length, dtype=torch.uint8, device=g.device)
        g.broadcast(data)
        return Manifest.decode(data.cpu().numpy().tobytes())

    def _ensure_buffers(self, buckets: list[Bucket]) -> None:
        """`receive_slots` buffers of the largest bucket's size, kept while they suffice."""
        n = receive_slots(self.sync, len(buckets), sum(b.nbytes for b in buckets))
        size = max((b.nbytes for b in buckets), default=0)
        if len(self._buffers) != n or (n and self._buffers[0].numel() < size):
            # zero_() touches every page now rather than inside the timed receive of each sync
            self._buffers = [torch.zeros(size, dtype=torch.uint8, device=self.group.device) for _ in range(n)]

    def tensors(self, manifest: Manifest, copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) as each bucket arrives; a background thread receives later buckets meanwhile.

        Each tensor is a copy of its own (`copy`), or, with copy=False, a view of the ring of buffers that
        stays valid until the consumer asks for the first tensor of bucket k + 2 (then its buffer may be
        refilled): for a consumer that copies each tensor at once. When every bucket has a buffer of its own
        (buckets <= sync.receive_buffers) no buffer is refilled during the sync and views are yielded either
        way: they stay valid until the next sync.
        The generator must be exhausted (or closed) before the next collective on this group.
        """
        buckets = plan_buckets(manifest.specs, manifest.bucket_bytes)
        self._ensure_buffers(buckets)
        copy = copy and len(buckets) > len(self._buffers)   # a buffer per bucket: nothing is overwritten
        arrived: queue.Queue = queue.Queue()
        g, wait_s, n = self.group, self.deadlines.bucket_s, len(self._buffers)
        reading = {"k": -1}                 # the bucket the consumer is reading
        moved = threading.Condition()

        def receive() -> None:
            t0 = time.perf_counter()
            try:
                for k, bucket in enumerate(buckets):
                    with moved:             # bucket k reuses bucket k - n's buffer: wait until that is consumed
                        if k >= n and not moved.wait_for(lambda: reading["k"] >= k - n + 2, timeout=wait_s):
                            raise SyncError(f"bucket {k - n} was not consumed within {wait_s} s")
                    g.broadcast(self._buffers[k % n][:bucket.nbytes])
                    arrived.put(k)
            except BaseException as e:  # hand the failure to the consumer
                arrived.put(e)
            self.timing["receive_s"] = time.perf_counter() - t0

        def advance(k: int) -> None:
            with moved:
                reading["k"] = k
                moved.notify_all()

        thread = threading.Thread(target=receive, name="weight-receive", daemon=True)
        thread.start()
        try:
            for k, bucket in enumerate(buckets):
                advance(k)
                try:
                    got = arrived.get(timeout=wait_s)
                except queue.Empty:
                    raise SyncError(f"bucket {k} did not arrive within {wait_s} s") from None
                if isinstance(got, BaseException):
                    raise got
                for i, offset in bucket.entries:
                    spec = manifest.specs[i]
                    view = _view(self._buffers[k % n], offset, spec)
                    yield spec.name, view.clone() if copy else view
        finally:
            # a consumer that stops early must not leave a broadcast in flight under the next collective: the
            # receive thread takes the remaining buckets (into any buffer) so the group stays in step
            advance(len(buckets) + n)
            thread.join(wait_s)

    def close(self) -> None:
        self.group.close()
