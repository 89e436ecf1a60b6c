"""Test servers on the host namespace's ``::1`` only, for tests/e2e/test_ipv6_flows.py.

``python3 servers6.py SIZE`` serves HTTP (GET / sends SIZE pseudo-random bytes, POST
answers the sha256 of the body), a UDP echo and a DNS server answering every AAAA
question with ``fd00::abcd``, and prints one JSON line: the ports and the payload's hash.
Tests start it with :func:`running`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

AAAA_ANSWER = "fd00::abcd"


@contextlib.contextmanager
def running(size: int, popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
            ) -> Iterator[dict[str, Any]]:
    """This script serving a SIZE-byte payload for the block; yields the JSON line it printed.

    ``popen`` starts it: ``subprocess.Popen`` for this process's namespace, or a
    namespace's ``popen`` (tests/nsutil.py) for that namespace's ``::1``.
    """
    proc = popen([sys.executable, str(Path(__file__).resolve()), str(size)],
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        yield json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


class Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main() -> None:
    size = int(sys.argv[1])
    payload = random.Random(6).randbytes(size)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:  # noqa: N802
            left = int(self.headers["Content-Length"])
            digest = hashlib.sha256()
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
            body = digest.hexdigest().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http = Server6(("::1", 0), Handler)
    echo = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    echo.bind(("::1", 0))
    dns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    dns.bind(("::1", 0))
    for target in (http.serve_forever, lambda: _echo(echo), lambda: _dns(dns)):
        threading.Thread(target=target, daemon=True).start()
    print(json.dumps({"http": http.server_address[1], "echo": echo.getsockname()[1],
                      "dns": dns.getsockname()[1],
                      "sha256": hashlib.sha256(payload).hexdigest()}), flush=True)
    sys.stdin.read()  # until the test closes our stdin


def _echo(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def _dns(sock: socket.socket) -> None:
    while True:
        query, peer = sock.recvfrom(4096)
        end = 12
        while query[end]:
            end += 1 + query[end]
        question = query[12:end + 5]
        qtype = int.from_bytes(query[end + 1:end + 3], "big")
        answers = 1 if qtype == 28 else 0
        reply = query[:2] + b"\x81\x80\x00\x01" + answers.to_bytes(2, "big") + bytes(4)
        reply += question
        if answers:
            reply += (b"\xc0\x0c\x00\x1c\x00\x01\x00\x00\x00\x3c\x00\x10"
                      + socket.inet_pton(socket.AF_INET6, AAAA_ANSWER))
        sock.sendto(reply, peer)


if __name__ == "__main__":
    main()
