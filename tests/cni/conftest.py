"""Fixtures for the CNI plugin tests: an installed plugin, a private runtime directory,
throwaway namespaces, and loopback servers (HTTP, DNS) for the data path.

Every test gets its own runtime directory (``PYSLIRP_RUNDIR``), so its engine is
its own; teardown stops that engine if it still runs and checks nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pyslirp.cni import install
from tests.cni.cnirun import Runtime
from tests.nsutil import NetNS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEBIAN_PLUGINS = "/usr/lib/cni"
HTTP_BODY = b"hello through slirp\n"
DNS_NAME = "web.cni.test"
DNS_ADDR = "198.18.0.7"


@pytest.fixture(scope="session")
def cni_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A plugin directory holding what ``pyslirp cni install`` writes."""
    d = tmp_path_factory.mktemp("cnibin")
    install.install(str(d))
    return str(d)


@pytest.fixture
def rundir() -> Iterator[str]:
    # Short, because the engine's socket path must fit in sun_path (108 bytes).
    d = tempfile.mkdtemp(prefix="pyslirp-cni-", dir="/tmp")
    try:
        yield d
    finally:
        stop_engine(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def env(rundir: str) -> dict[str, str]:
    return {"PYSLIRP_RUNDIR": rundir, "PYSLIRP_PYTHON": sys.executable,
            "PYSLIRP_CNI_IDLE_EXIT": "0.2"}


def engine_ping(rundir: str) -> dict[str, Any] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(os.path.join(rundir, "engine.sock"))
            s.sendall(b'{"op": "ping"}\n')
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            return None
    reply: dict[str, Any] = json.loads(data) if data else {}
    return reply or None


def engine_pid(rundir: str) -> int | None:
    reply = engine_ping(rundir)
    return int(reply["identity"]["pid"]) if reply else None


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def stop_engine(rundir: str) -> None:
    pid = engine_pid(rundir)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: not pid_alive(pid), 10):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def netns_factory() -> Iterator[Any]:
    made: list[NetNS] = []

    def make(tag: str = "cni") -> NetNS:
        ns = NetNS(tag)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in made:
            ns.close()


def slirp_conflist(version: str = "1.1.0", **fields: Any) -> dict[str, Any]:
    plugin = {"type": "slirp", **fields}
    return {"cniVersion": version, "name": "slirptest", "plugins": [plugin]}


def tcp_udp_mappings(tcp_port: int, udp_port: int,
                     host_ip: str | None = None) -> list[dict[str, Any]]:
    """``portMappings``: ``tcp_port`` to the container's TCP 8080, ``udp_port`` to its UDP
    5300, on ``host_ip`` (no ``hostIP`` without one: every address of the host)."""
    where = {} if host_ip is None else {"hostIP": host_ip}
    return [{"hostPort": tcp_port, "containerPort": 8080, "protocol": "tcp", **where},
            {"hostPort": udp_port, "containerPort": 5300, "protocol": "udp", **where}]


@pytest.fixture
def runtime_factory(cni_bin: str, env: dict[str, str]) -> Any:
    def make(conflist: dict[str, Any], cni_path: str | None = None) -> Runtime:
        return Runtime(cni_path or f"{cni_bin}:{DEBIAN_PLUGINS}", conflist, dict(env))
    return make


# ---------------------------------------------------------------- loopback servers


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(200)
        self.send_header("Content-Length", str(len(HTTP_BODY)))
        self.end_headers()
        self.wfile.write(HTTP_BODY)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class DnsServer:
    """Answers A DNS_ADDR for DNS_NAME, NXDOMAIN for anything else; counts queries."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            with contextlib.suppress(Exception):
                self.sock.sendto(self._answer(data), peer)

    def _answer(self, q: bytes) -> bytes:
        qid, _flags, _qd = struct.unpack_from("!HHH", q)
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode())
            i += q[i] + 1
        qtype = struct.unpack_from("!H", q, i + 1)[0]
        question = q[12:i + 5]
        name = ".".join(labels).lower()
        self.queries.append(name)
        if name == DNS_NAME and qtype == 1:
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + \
                socket.inet_aton(DNS_ADDR)
            return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + answer
        rcode = 0 if name == DNS_NAME else 3
        return struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, 0, 0, 0) + question

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    try:
        yield server
    finally:
        server.close()
