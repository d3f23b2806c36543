"""Real redis-server processes for tests: a standalone server and a 3-master
Redis Cluster, on free 127.0.0.1 ports, started and stopped by the tests.

    from redis_servers import redis_server, redis_cluster   # pytest fixtures (module scope)
    from redis_servers import RedisServer, RedisClusterProcs, require_redis

Servers run with ``--save '' --appendonly no`` (nothing on disk but a temporary
working directory). When redis-server is missing, ``require_redis()`` skips —
except in CI (env ``CI`` set), where it fails with a message saying how to
install it (``make system-deps``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

START_TIMEOUT_S = 10.0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port. Cluster nodes also listen on port + 10000 (the
    cluster bus), so for them the port is at most 55535 and its bus port free."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not cluster:
            return port
        if port <= 55535 and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis cluster node")


def require_redis() -> None:
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if not missing:
        return
    message = f"{' and '.join(missing)} not installed (apt-get install redis-server, or make system-deps)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _wait_ping(port: int, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up (with a password: up and asking for it)
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer within {timeout} s")


class RedisServer:
    """One redis-server process. ``extra`` adds command-line options (e.g. cluster mode)."""

    def __init__(self, port: int | None = None, extra: tuple[str, ...] = ()):
        self.port = port or free_port(cluster="--cluster-enabled" in extra)
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="shardqa-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        require_redis()
        cmd = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.dir, "--protected-mode", "no", *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_ping(self.port, self.proc)
        except BaseException:
            # A server that never answered is still a process: stop it.
            self.stop()
            raise
        return self

    def cli(self, *args: str, timeout: float = 20.0) -> str:
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True, text=True, timeout=timeout, check=True,
        )
        return out.stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisClusterProcs:
    """A Redis Cluster of ``masters`` masters and no replicas, made with
    ``redis-cli --cluster create``; ready once every node says cluster_state:ok."""

    def __init__(self, masters: int = 3):
        self.nodes = [
            RedisServer(extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"))
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> "RedisClusterProcs":
        require_redis()
        try:
            for n in self.nodes:
                n.start()
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=60, check=True,
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
                    return self
                time.sleep(0.1)
            raise RuntimeError("the Redis cluster did not reach cluster_state:ok within 30 s")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> "RedisClusterProcs":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster():
    cluster = RedisClusterProcs(3).start()
    try:
        yield cluster
    finally:
        cluster.stop()
