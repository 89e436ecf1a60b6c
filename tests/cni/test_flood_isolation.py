"""Two containers on one CNI engine: one floods, the other's transfer is intact.

The engine serves every attachment of a runtime dir in one process, so a
container that SYN-floods the gateway (bench/netload.py ``flood --kind syn``)
shares that process's CPU with its neighbour. The neighbour's download (a
host server's payload) must still arrive byte for byte; its rate beside the
flood is printed next to the unloaded one (a figure, not asserted: speed
lives in bench/).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cni.conftest import REPO, slirp_conflist

PAYLOAD = os.urandom(32 << 20)
NETLOAD = os.path.join(REPO, "bench", "netload.py")

#: Reads everything from HOST:PORT; prints its SHA-256 and the rate in bytes/s.
FETCH = """
import hashlib, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
h, n, t = hashlib.sha256(), 0, time.monotonic()
while chunk := s.recv(1 << 20):
    h.update(chunk)
    n += len(chunk)
print(h.hexdigest(), n / (time.monotonic() - t))
"""


@pytest.fixture
def payload_port() -> Iterator[int]:
    """A host server on loopback that sends PAYLOAD to each client, then closes."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            # A flood SYN that hit this port closes its socket at once.
            with conn, contextlib.suppress(OSError):
                conn.sendall(PAYLOAD)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


def _fetch(ns: Any, port: int) -> tuple[str, float]:
    out = ns.run([sys.executable, "-c", FETCH, "10.0.2.2", str(port)], timeout=120).stdout
    digest, rate = out.split()
    return digest, float(rate)


def test_a_syn_flood_from_one_container_leaves_the_other_s_download_intact(
        runtime_factory: Any, netns_factory: Any, payload_port: int) -> None:
    flooder_ns, victim_ns = netns_factory("flooder"), netns_factory("victim")
    rt = runtime_factory(slirp_conflist())
    assert rt.add("flooder", flooder_ns.path).ok
    assert rt.add("victim", victim_ns.path).ok
    want = hashlib.sha256(PAYLOAD).hexdigest()
    digest, unloaded = _fetch(victim_ns, payload_port)
    assert digest == want
    flood = flooder_ns.popen([sys.executable, NETLOAD, "flood", "--kind", "syn",
                              "--host", "10.0.2.2", "--seconds", "60"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        digest, flooded = _fetch(victim_ns, payload_port)
        still_flooding = flood.poll() is None
    finally:
        flood.kill()
        flood.wait()
    assert digest == want
    assert still_flooding, "the flood stopped early: it did not run beside the download"
    print(f"victim download: {unloaded * 8 / 1e9:.2f} Gbit/s unloaded, "
          f"{flooded * 8 / 1e9:.2f} Gbit/s beside the flood "
          f"({100 * flooded / unloaded:.0f} %)")
    assert rt.delete("flooder", flooder_ns.path).ok
    assert rt.delete("victim", victim_ns.path).ok
