"""The trajectory bus: ScoredGroups from graders to learner ranks over one Redis stream per run.

Keys of run R (R matches [A-Za-z0-9_.-]{1,128}, so `forkrl:R:*` is a safe ACL pattern):
  forkrl:R:groups    the stream; one field `g` per entry holding `cluster.transport.codec` bytes
  forkrl:R:produced  set of group ids ever admitted to the stream (producer-side dedup)
  forkrl:R:trained   set of group ids whose optimizer step succeeded (recorded atomically with XACK)
  forkrl:R:marker    random token written once by `setup_run`; its absence means the server lost the run

Readers: one consumer per learner rank, named by the rank, in one consumer group (`learners`). Each rank
XREADGROUPs its own share, so every byte crosses the network once, straight into the process that trains
on it: a single reader that scatters would receive everything and send it again (twice the traffic, one
more process whose death stops training) and would have to ack on the ranks' behalf. Redis already balances
the share between consumers, and acks stay per rank, after that rank's optimizer step. Any process can be a
consumer given the QueueAddress (url, password, run id) and a name.

Guarantees:
- Bounded memory: a producer blocks (polling, up to `block_timeout_s`, counted) while the stream holds
  `max_undelivered` or more groups that no consumer has received. Undelivered = XLEN - pending, exact
  because acked and dropped entries are deleted (XACK+XDEL in one script); the check and the XADD are one
  Lua script, so the bound holds with any number of producers. MAXLEN ~ `maxlen` (> max_undelivered) is
  only a backstop; an entry it trims before training is counted as `dropped_trimmed`.
- At-least-once transport, at-most-once training: an entry stays pending until `ack()` (call it after the
  optimizer step succeeded). A consumer that dies between read and ack leaves its entries pending; another
  consumer reclaims them (XAUTOCLAIM) once they are idle for `claim_idle_s`, and a consumer restarted under
  the same name takes its own pending entries back at once. A live consumer's heartbeat thread keeps its
  entries' idle time near zero however long the step takes, so only dead consumers are reclaimed from
  (should a heartbeat stall past claim_idle_s anyway, the later ack finds the group already trained and
  counts `double_trained`, loudly).
  Duplicates are refused twice: `put` admits a group id once per run (a producer retry cannot double it),
  and `read` drops any group already in the trained set. The trained set is saved by `state_dict()` and
  merged back by `load_state_dict()`, so a restore after a server loss cannot retrain a group either.
  Order the learner as: read -> optimizer step -> ack -> checkpoint.
- Staleness: a group sampled with weights version v is dropped (acked, deleted, counted) when
  v < version - max_staleness at read time, and the read continues until it has `n` fresh groups.
- Server loss: every operation checks the run marker. A restart with AOF keeps everything and clients
  reconnect (retrying up to `reconnect_s`); a restart without it, or a FLUSHALL, raises `ServerLost` in every
  producer and consumer, even after someone re-ran `setup_run` (the token differs).

Counters (`stats()`) are cumulative for the object's lifetime, plus gauges of the stream's state.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from cluster.transport import codec
from cluster.config import QueueConfig
from cluster.types import ScoredGroup, StepStats

log = logging.getLogger("forkrl.queue")

GROUP = "learners"
SCHEMA = 1                  # of state_dict()
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_CHUNK = 500                # ids per script call (Lua's unpack has a stack limit near 8000)
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class QueueError(RuntimeError):
    """Base class of the queue's errors."""


class QueueAuthError(QueueError):
    """Missing or wrong password / user."""


class QueueUnavailable(QueueError):
    """The server cannot be reached (after retrying for `reconnect_s`)."""


class QueueFull(QueueError):
    """A producer waited `block_timeout_s` under backpressure."""


class QueueTimeout(QueueError):
    """A read did not get its groups in time (the ones it got stay reserved for the next read)."""


class ServerLost(QueueError):
    """The run's state is gone from the server (restart without AOF, flush, or setup_run never called)."""


@dataclass(frozen=True)
class QueueAddress:
    """Everything a process needs to reach a run's queue. The password never appears in repr()."""

    url: str
    run_id: str
    password: str | None = field(default=None, repr=False)
    username: str | None = None

    def __post_init__(self):
        if not _RUN_ID.match(self.run_id):
            raise QueueError(f"run_id {self.run_id!r} must match {_RUN_ID.pattern}")
        if urlparse(self.url).scheme not in ("redis", "rediss"):
            raise QueueError(f"queue.url must be redis:// or rediss://, got {self.display}")

    @classmethod
    def from_config(cls, cfg: QueueConfig, run_id: str) -> "QueueAddress":
        if cfg.url is None:
            raise QueueError("queue.url is not set (None means the embedded server: use open_queue)")
        return cls(cfg.url, run_id, cfg.password or os.environ.get("FORKRL_REDIS_PASSWORD"), cfg.username)

    @property
    def display(self) -> str:
        """scheme://host:port, without credentials: the only form of the address that is ever logged."""
        u = urlparse(self.url)
        return f"{u.scheme}://{u.hostname}:{u.port or 6379}"

    def connect(self, reconnect_s: float = 10.0) -> redis.Redis:
        """A checked connection: a wrong or missing password is a QueueAuthError here, at once."""
        u = urlparse(self.url)
        password = self.password or u.password or os.environ.get("FORKRL_REDIS_PASSWORD")
        user = self.username or u.username
        if not password:
            msg = (f"connecting to Redis at {self.display} WITHOUT A PASSWORD: anyone who can reach it can "
                   "read and forge training data. Set queue.password or FORKRL_REDIS_PASSWORD.")
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
        elif u.scheme == "redis" and u.hostname not in _LOOPBACK:
            log.warning("queue at %s: password and data travel unencrypted; prefer rediss://", self.display)
        # RESP2 pinned: the reply shapes parsed below do not depend on the server's or the URL's choice.
        kw = dict(username=user, password=password, socket_connect_timeout=5, socket_timeout=30, protocol=2)
        try:
            with redis.Redis.from_url(self.url, **kw, retry=Retry(NoBackoff(), 0)) as probe:
                probe.ping()
        except redis.AuthenticationError:
            if not password:
                raise QueueAuthError(f"{self.display} requires a password and none was given (queue.password, "
                                     "the URL, or FORKRL_REDIS_PASSWORD)") from None
            raise QueueAuthError(f"authentication to {self.display} as user {user or 'default'!r} failed: "
                                 "wrong password or user") from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise QueueUnavailable(f"cannot reach {self.display}: {e}") from None
        return redis.Redis.from_url(self.url, **kw, retry=_retry(reconnect_s))


def _retry(reconnect_s: float) -> Retry:
    """Exponential backoff capped at 0.5 s, with as many retries as fit in about reconnect_s."""
    backoff, total, n = ExponentialBackoff(cap=0.5, base=0.02), 0.0, 0
    while total < reconnect_s:
        n += 1
        total += backoff.compute(n)
    return Retry(backoff, n)


@dataclass(frozen=True)
class _Keys:
    stream: str
    produced: str
    trained: str
    marker: str

    @classmethod
    def of(cls, run_id: str) -> "_Keys":
        p = f"forkrl:{run_id}:"
        return cls(p + "groups", p + "produced", p + "trained", p + "marker")


# ----------------------------------------------------------------------------------------- Lua scripts
# Every script first checks the run marker, so a server that lost the run (or a new run under the same
# id) is an error and never a silently empty queue.

_LOST = "if redis.call('GET', KEYS[{k}]) ~= ARGV[{a}] then return redis.error_reply('FORKRL_LOST') end\n"

# KEYS stream, produced, marker; ARGV group, token, max_undelivered, maxlen, group_id, payload
# -> entry id | 0 (group id already admitted) | -1 (backpressure: too many undelivered)
_PUT = _LOST.format(k=3, a=2) + """
if redis.call('SISMEMBER', KEYS[2], ARGV[5]) == 1 then return 0 end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])[1]
if redis.call('XLEN', KEYS[1]) - pending >= tonumber(ARGV[3]) then return -1 end
redis.call('SADD', KEYS[2], ARGV[5])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'g', ARGV[6])
"""

# KEYS stream, trained, marker; ARGV group, token, k, ids[k], group_ids[0 or k]
# XACK + XDEL (+ SADD to trained when group ids are given) -> {acked, newly recorded}
_ACK = _LOST.format(k=3, a=2) + """
local k = tonumber(ARGV[3])
local ids = {unpack(ARGV, 4, 3 + k)}
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
local added = 0
if #ARGV > 3 + k then added = redis.call('SADD', KEYS[2], unpack(ARGV, 4 + k, 3 + 2 * k)) end
return {acked, added}
"""

# KEYS stream; ARGV group, consumer, ids...: reset the idle time of the entries this consumer still owns
# (without stealing back one that another consumer reclaimed) -> ids it no longer owns
_TOUCH = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""


# ------------------------------------------------------------------------------------------ run setup

def setup_run(addr: QueueAddress, reconnect_s: float = 10.0) -> None:
    """Create the run's stream, consumer group and marker. Idempotent; call once per (re)start of a run
    before any producer or consumer is created (after a server loss: then `load_state_dict`)."""
    keys = _Keys.of(addr.run_id)
    with addr.connect(reconnect_s) as conn, _errors(addr):
        try:
            conn.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        conn.set(keys.marker, secrets.token_hex(16), nx=True)


def delete_run(addr: QueueAddress, reconnect_s: float = 10.0) -> None:
    """Remove the run's keys (an external server at the end of a run)."""
    k = _Keys.of(addr.run_id)
    with addr.connect(reconnect_s) as conn, _errors(addr):
        conn.delete(k.stream, k.produced, k.trained, k.marker)


def open_queue(cfg: QueueConfig, run_id: str, data_dir: str | None = None):
    """The driver's entry point: (QueueAddress, LocalServer or None). Without `queue.url` an embedded Valkey
    is started (AOF in `data_dir` when `queue.aof`); the caller stops it at the end of the run."""
    server = None
    if cfg.url is None:
        from cluster.transport.valkey import start_valkey

        server = start_valkey(aof=cfg.aof, data_dir=data_dir)
        addr = QueueAddress(server.url, run_id, server.password)
    else:
        addr = QueueAddress.from_config(cfg, run_id)
    try:
        setup_run(addr, cfg.reconnect_s)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    return addr, server


_ACL_COMMANDS = (
    "ping", "echo", "get", "set", "del", "exists", "sadd", "sismember", "smismember", "sscan", "scard",
    "xadd", "xlen", "xpending", "xreadgroup", "xack", "xdel", "xautoclaim", "xclaim", "xrange",
    "xinfo|groups", "xgroup|create", "time", "eval", "evalsha", "script|load", "script|exists",
    "multi", "exec", "discard",
)


def create_acl_user(admin: redis.Redis, run_id: str, username: str, password: str | None = None) -> str:
    """Create (or reset) an ACL user that can run the queue of `run_id` and touch no other key:
    keys `forkrl:<run_id>:*` only, no pub/sub channels, only the commands the queue uses. Returns its
    password (generated when not given)."""
    if not _RUN_ID.match(run_id):
        raise QueueError(f"run_id {run_id!r} must match {_RUN_ID.pattern}")
    password = password or secrets.token_urlsafe(32)
    admin.execute_command("ACL", "SETUSER", username, "reset", "on", f">{password}",
                          f"~forkrl:{run_id}:*", "resetchannels", "-@all",
                          *(f"+{c}" for c in _ACL_COMMANDS))
    return password


@contextmanager
def _errors(addr: QueueAddress) -> Iterator[None]:
    """redis-py exceptions -> the queue's, with the address (never the password) in the message."""
    try:
        yield
    except redis.AuthenticationError as e:
        raise QueueAuthError(f"authentication to {addr.display} failed: {e}") from None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise QueueUnavailable(f"lost {addr.display} (retried): {e}") from None
    except redis.exceptions.NoPermissionError as e:
        raise QueueError(f"user {addr.username or 'default'!r} lacks a permission on {addr.display}: {e}") \
            from None
    except redis.ResponseError as e:
        if "FORKRL_LOST" in str(e) or "NOGROUP" in str(e):
            raise ServerLost(f"run {addr.run_id!r} is gone from {addr.display}: its marker or consumer "
                             "group is missing or was re-created (server restarted without AOF, flushed, or "
                             "setup_run not called). Restore from the last checkpoint.") from None
        raise


class _Endpoint:
    """What producers and consumers share: connection, keys, marker token, counters."""

    def __init__(self, addr: QueueAddress, cfg: QueueConfig, counters: dict[str, float]):
        self.addr, self.cfg, self.keys = addr, cfg, _Keys.of(addr.run_id)
        self.conn = addr.connect(cfg.reconnect_s)
        with _errors(addr):
            token = self.conn.get(self.keys.marker)
        if token is None:
            self.conn.close()
            raise ServerLost(f"run {addr.run_id!r} is not set up on {addr.display} (call setup_run first; "
                             "if it was, the server lost its data)")
        self.token = token
        self.counters = counters

    def depth(self) -> StepStats:
        """Gauges: entries in the stream, undelivered, pending (delivered, not acked), and the age in
        seconds of the oldest undelivered entry (0 when none)."""
        k = self.keys
        with _errors(self.addr):
            p = self.conn.pipeline(transaction=True)
            p.xlen(k.stream).xpending(k.stream, GROUP).xinfo_groups(k.stream).time()
            xlen, pend, groups, (sec, usec) = p.execute()
            last = next((g["last-delivered-id"] for g in groups if g["name"] in (GROUP, GROUP.encode())),
                        b"0-0")
            nxt = self.conn.xrange(k.stream, min=b"(" + _b(last), count=1)
        age = max(0.0, sec + usec / 1e6 - int(nxt[0][0].split(b"-")[0]) / 1e3) if nxt else 0.0
        return {"queue/depth": float(xlen), "queue/undelivered": float(max(0, xlen - pend["pending"])),
                "queue/pending": float(pend["pending"]), "queue/oldest_undelivered_s": age}

    def trainable(self, version: int, max_staleness: int = 0) -> int:
        """Groups on the stream that a read at `version` would return: entries that decode, were never
        trained, are fresh and distinct. Unlike `depth()` this leaves out a stranger's bytes and the stale
        and duplicate entries a read drops (a resumed run trains what a stopped one left, no more)."""
        k, seen, cursor = self.keys, set(), "-"
        with _errors(self.addr):
            while entries := self.conn.xrange(k.stream, min=cursor, count=_CHUNK):
                cursor = "(" + _s(entries[-1][0])
                groups = []
                for _, fields in entries:
                    try:
                        groups.append(codec.decode(fields.get(b"g")))
                    except codec.CodecError:
                        continue
                trained = self.conn.smismember(k.trained, [g.group_id for g in groups]) if groups else []
                seen |= {g.group_id for g, t in zip(groups, trained)
                         if not t and g.version >= version - max_staleness}
        return len(seen)

    def stats(self) -> StepStats:
        return {**self.counters, **self.depth()}

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _b(x: str | bytes) -> bytes:
    return x if isinstance(x, bytes) else x.encode()


def _s(x: str | bytes) -> str:
    return x.decode() if isinstance(x, bytes) else x


class Producer(_Endpoint):
    """Graders' side: `put` one ScoredGroup at a time."""

    def __init__(self, addr: QueueAddress, cfg: QueueConfig | None = None):
        super().__init__(addr, cfg or QueueConfig(), {
            "queue/produced": 0, "queue/produced_bytes": 0, "queue/put_duplicates": 0,
            "queue/backpressure_waits": 0, "queue/backpressure_s": 0.0})
        self._put = self.conn.register_script(_PUT)

    def put(self, group: ScoredGroup, timeout_s: float | None = None) -> bool:
        """Append `group`; False if its group id was already admitted in this run (nothing is added).
        Blocks while the learner is `max_undelivered` groups behind; QueueFull after `timeout_s`
        (default `block_timeout_s`). A group that cannot be encoded raises codec.CodecError."""
        data = codec.encode(group)
        k, c = self.keys, self.cfg
        timeout = c.block_timeout_s if timeout_s is None else timeout_s
        args = [GROUP, self.token, c.max_undelivered, c.maxlen, group.group_id, data]
        t0, pause, waited = time.monotonic(), 0.002, False
        while True:
            with _errors(self.addr):
                r = self._put(keys=[k.stream, k.produced, k.marker], args=args)
            if r != -1:
                break
            elapsed = time.monotonic() - t0
            if not waited:
                self.counters["queue/backpressure_waits"] += 1
                waited = True
            if elapsed >= timeout:
                self.counters["queue/backpressure_s"] += elapsed
                raise QueueFull(f"put of group {group.group_id!r} waited {elapsed:.1f} s: {c.max_undelivered} "
                                f"groups are undelivered on {self.addr.display} (queue.max_undelivered); "
                                "is the learner consuming?")
            time.sleep(min(pause, max(0.0, timeout - elapsed)))
            pause = min(pause * 2, 0.05)
        if waited:
            self.counters["queue/backpressure_s"] += time.monotonic() - t0
        if r == 0:
            self.counters["queue/put_duplicates"] += 1
            return False
        self.counters["queue/produced"] += 1
        self.counters["queue/produced_bytes"] += len(data)
        return True


@dataclass
class Batch:
    """Fresh groups returned by one read; pass `entry_ids` to `Consumer.ack` after the optimizer step."""

    groups: list[ScoredGroup]
    entry_ids: list[str]


_DROPS = ("stale", "duplicate", "malformed", "trimmed")


class Consumer(_Endpoint):
    """A learner rank's side: `read` n fresh groups, train, `ack` their entry ids."""

    def __init__(self, addr: QueueAddress, name: str, cfg: QueueConfig | None = None):
        if not name or len(name) > 200 or not name.isprintable():
            raise QueueError(f"consumer name {name!r} must be 1-200 printable characters")
        super().__init__(addr, cfg or QueueConfig(), {
            "queue/consumed": 0, "queue/acked": 0, **{f"queue/dropped_{r}": 0 for r in _DROPS},
            "queue/reclaimed": 0, "queue/recovered": 0, "queue/lost_ownership": 0,
            "queue/double_trained": 0})
        self.name = name
        self._ack = self.conn.register_script(_ACK)
        self._touch = self.conn.register_script(_TOUCH)
        self._lock = threading.Lock()
        self._inflight: dict[str, str] = {}                 # returned, not acked: entry id -> group id
        self._carry: list[tuple[str, ScoredGroup]] = []     # received, not yet returned (a read timed out)
        self._recover_own = True                            # the first read takes back our pending entries
        self._claim_cursor = "0-0"
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"queue-heartbeat-{name}", daemon=True)
        self._heartbeat.start()

    # ---- read

    def read(self, n: int, version: int, max_staleness: int = 0, timeout_s: float | None = None) -> Batch:
        """Exactly `n` groups with version >= `version` - `max_staleness`, none trained before. Stale,
        duplicate, malformed and trimmed entries met on the way are acked, deleted and counted. QueueTimeout
        after `timeout_s` (default `read_timeout_s`); the groups received so far are kept for the next read."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        timeout = self.cfg.read_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        with self._lock:
            carried, self._carry = self._carry, []
        kept = self._screen(carried, [], version, max_staleness)
        while len(kept) < n:
            remaining = deadline - time.monotonic()
            got = self._fetch(n - len(kept), min(remaining, 1.0))
            kept += self._screen(got, kept, version, max_staleness)
            if len(kept) < n and time.monotonic() >= deadline:
                with self._lock:
                    self._carry = kept
                raise QueueTimeout(f"consumer {self.name!r} got {len(kept)} of {n} fresh groups in {timeout} s "
                                   f"from {self.addr.display} (are the generators and graders running?)")
        with self._lock:
            self._carry = kept[n:]
            out = kept[:n]
            self._inflight.update((e, g.group_id) for e, g in out)
        self.counters["queue/consumed"] += n
        return Batch(groups=[g for _, g in out], entry_ids=[e for e, _ in out])

    def _fetch(self, need: int, block_s: float) -> list[tuple[str, ScoredGroup]]:
        """Up to `need` decoded entries: first our own pending ones (a restart under the same name), then
        others' entries idle for claim_idle_s, then new ones (blocking up to block_s when none so far)."""
        k, out, gone = self.keys, [], []
        with self._lock:
            mine = set(self._inflight) | {e for e, _ in self._carry}
        with _errors(self.addr):
            if self._recover_own:  # all of them at once: later they would mix with entries read here
                self._recover_own, cursor = False, "0"
                while entries := _entries(self.conn.xreadgroup(GROUP, self.name, {k.stream: cursor},
                                                               count=100)):
                    cursor = _s(entries[-1][0])
                    out += entries
                self.counters["queue/recovered"] += len(out)
            for _ in range(8 if len(out) < need else 0):  # each XAUTOCLAIM scans <= 10 x count entries
                p = self.conn.pipeline(transaction=False)
                p.get(k.marker).xautoclaim(k.stream, GROUP, self.name, int(self.cfg.claim_idle_s * 1000),
                                           start_id=self._claim_cursor, count=need - len(out))
                token, claim = p.execute()
                if token != self.token:
                    raise redis.ResponseError("FORKRL_LOST")
                self._claim_cursor = _s(claim[0])
                claimed = [(e, f) for e, f in claim[1] if _s(e) not in mine]
                # Redis >= 7 lists (and unlists) pending entries trimmed from the stream; ours in flight
                # are already decoded in memory, and their ack still records them.
                gone += [e for e in map(_s, claim[2] if len(claim) > 2 else []) if e not in mine]
                self.counters["queue/reclaimed"] += len(claimed)
                out += claimed
                if len(out) >= need or self._claim_cursor == "0-0":
                    break
            if len(out) < need:
                block = int(block_s * 1000) if not out and block_s >= 0.001 else None
                out += _entries(self.conn.xreadgroup(GROUP, self.name, {k.stream: ">"}, count=need - len(out),
                                                     block=block))
        decoded, malformed = [], []
        for eid, fields in out:
            eid = _s(eid)
            if not fields:            # in our pending list, but trimmed from the stream
                gone.append(eid)
                continue
            try:
                decoded.append((eid, codec.decode(fields.get(b"g"))))
            except codec.CodecError as e:
                log.warning("queue %s: dropping malformed entry %s: %s", self.addr.run_id, eid, e)
                malformed.append(eid)
        self._drop(gone, "trimmed")
        self._drop(malformed, "malformed")
        return decoded

    def _screen(self, items: list[tuple[str, ScoredGroup]], kept: list[tuple[str, ScoredGroup]],
                version: int, max_staleness: int) -> list[tuple[str, ScoredGroup]]:
        """Keep fresh, never-trained groups not already held by this consumer; drop the rest."""
        if not items:
            return []
        with _errors(self.addr):
            trained = self.conn.smismember(self.keys.trained, [g.group_id for _, g in items])
        held = set(self._inflight.values()) | {g.group_id for _, g in kept}
        keep, drops = [], {"stale": [], "duplicate": []}
        for (eid, g), was_trained in zip(items, trained):
            if was_trained or g.group_id in held:
                drops["duplicate"].append(eid)
            elif g.version < version - max_staleness:
                drops["stale"].append(eid)
            else:
                keep.append((eid, g))
                held.add(g.group_id)
        for reason, eids in drops.items():
            self._drop(eids, reason)
        return keep

    def _drop(self, eids: list[str], reason: str) -> None:
        if eids:
            self._run_ack(eids, None)
            self.counters[f"queue/dropped_{reason}"] += len(eids)

    def release(self, batch: Batch) -> None:
        """Give back the groups of a read that will not be trained (the step was abandoned, e.g. because
        another rank's read failed): the next read returns them first. They stay pending on this consumer."""
        with self._lock:
            for e in batch.entry_ids:
                self._inflight.pop(e, None)
            self._carry = list(zip(batch.entry_ids, batch.groups)) + self._carry
        self.counters["queue/consumed"] -= len(batch.entry_ids)

    # ---- ack

    def ack(self, entry_ids: list[str]) -> None:
        """Record the groups of these entries as trained, acknowledge and delete them, in one atomic
        script. Call after the optimizer step that used them succeeded."""
        with self._lock:
            unknown = [e for e in entry_ids if e not in self._inflight]
            if unknown:
                raise QueueError(f"consumer {self.name!r} cannot ack {unknown[:3]}: not returned by its read "
                                 "or already acked")
            gids = [self._inflight[e] for e in entry_ids]
        recorded = self._run_ack(list(entry_ids), gids)
        with self._lock:
            for e in entry_ids:
                del self._inflight[e]
        self.counters["queue/acked"] += len(entry_ids)
        if recorded < len(set(gids)):
            # Already in the trained set: this consumer looked dead (no heartbeat for claim_idle_s), its
            # entries were reclaimed and trained elsewhere too. Counted and loud; it should stay 0.
            self.counters["queue/double_trained"] += len(set(gids)) - recorded
            log.warning("queue %s: %d of %d groups acked by consumer %r had already been trained by another "
                        "consumer; raise queue.claim_idle_s", self.addr.run_id,
                        len(set(gids)) - recorded, len(entry_ids), self.name)

    def _run_ack(self, eids: list[str], gids: list[str] | None) -> int:
        """XACK + XDEL (+ record gids as trained) -> how many gids were newly recorded."""
        k, recorded = self.keys, 0
        for i in range(0, len(eids), _CHUNK):
            ids = eids[i:i + _CHUNK]
            args = [GROUP, self.token, len(ids), *ids, *(gids[i:i + _CHUNK] if gids is not None else [])]
            with _errors(self.addr):
                recorded += self._ack(keys=[k.stream, k.trained, k.marker], args=args)[1]
        return recorded

    # ---- heartbeat

    def _beat(self) -> None:
        period = self.cfg.claim_idle_s / 4
        while not self._stop.wait(period):
            with self._lock:
                ids = list(self._inflight) + [e for e, _ in self._carry]
            if not ids:
                continue
            try:
                lost = []
                for i in range(0, len(ids), _CHUNK):
                    lost += self._touch(keys=[self.keys.stream], args=[GROUP, self.name, *ids[i:i + _CHUNK]])
                if lost:
                    self.counters["queue/lost_ownership"] += len(lost)
                    log.warning("queue %s: %d entries held by consumer %r are no longer pending on it "
                                "(reclaimed after it looked dead for claim_idle_s, or trimmed by MAXLEN)",
                                self.addr.run_id, len(lost), self.name)
            except Exception as e:  # the main path reports server problems; never kill the process here
                log.debug("queue heartbeat of %r failed: %s", self.name, e)

    def close(self) -> None:
        self._stop.set()
        self._heartbeat.join(timeout=5)
        super().close()

    # ---- checkpoint

    def state_dict(self) -> dict:
        """The run's trained group ids (all ranks'), for the checkpoint. Take it after the step's acks."""
        with _errors(self.addr):
            ids = sorted(_s(x) for x in self.conn.sscan_iter(self.keys.trained, count=1000))
        return {"schema": SCHEMA, "run_id": self.addr.run_id, "trained": ids}

    def load_state_dict(self, state: dict) -> None:
        """Merge a checkpoint's trained ids back (e.g. into a server that lost the run, after setup_run):
        those groups are refused by put and dropped by read."""
        if state.get("schema") != SCHEMA or state.get("run_id") != self.addr.run_id:
            raise QueueError(f"queue state is for run {state.get('run_id')!r} schema {state.get('schema')!r}, "
                             f"expected run {self.addr.run_id!r} schema {SCHEMA}")
        ids = state["trained"]
        if not all(type(x) is str for x in ids):
            raise QueueError("queue state: trained ids must be strings")
        with _errors(self.addr):
            p = self.conn.pipeline(transaction=True)
            for i in range(0, len(ids), _CHUNK):
                p.sadd(self.keys.trained, *ids[i:i + _CHUNK]).sadd(self.keys.produced, *ids[i:i + _CHUNK])
            p.execute()


def _entries(res) -> list:
    """XREADGROUP reply for one stream -> [(entry id, fields)]."""
    return res[0][1] if res else []
