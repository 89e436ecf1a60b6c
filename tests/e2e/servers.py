"""The servers the end-to-end tests talk to, on the loopback of the "host" namespace.

Run as a script inside that namespace (``nsenter --net=... python servers.py DIR``),
it starts, in one process:

* an HTTP server: ``GET /payload`` sends a deterministic payload (``--size``
  bytes from a seeded RNG, also written to ``DIR/payload.bin`` so a guest can
  upload the same bytes), ``GET /hello`` a short text, ``POST /upload``
  answers ``{"bytes": n, "sha256": hex}`` of the body it received;
* a TCP and UDP echo server on one port, logging every UDP datagram and TCP
  connection to ``DIR/echo.log``;
* an authoritative DNS server for ``pyslirp.`` on UDP and TCP (one port):
  ``test.pyslirp.`` and every name under it has ``A 198.18.0.1``, other names
  in the zone are NXDOMAIN, names outside it REFUSED; each query is logged to
  ``DIR/dns.log`` as ``proto name type``;
* nothing at all on the "dead" port (:data:`DEAD_PORT`), which
  the tests use as an upstream or destination nobody answers.

When everything listens, it prints one JSON line with the ports and the
payload's sha256 on stdout. It runs until killed. Nothing here is imported
by pyslirp; the test harness imports the constants and :func:`make_payload`.
Besides the standard library it imports only :mod:`tests.netutil`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (see above): the repository root makes ``tests`` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.netutil import free_port  # noqa: E402 (needs the path above when run as a script)

TEST_NAME = "test.pyslirp."
TEST_ADDR = "198.18.0.1"
ZONE = "pyslirp."
DEFAULT_SIZE = 100 * 1024 * 1024
DEFAULT_SEED = 20240601
HELLO = b"hello from the host\n"
#: Nobody listens here in the host namespace. Below the ephemeral range, so no socket
#: that pyslirp binds for a flow can land on it by chance.
DEAD_PORT = 9
_CHUNK = 1 << 20


def make_payload(size: int, seed: int = DEFAULT_SEED) -> bytes:
    return random.Random(seed).randbytes(size)


# ---- HTTP ---------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    server_version = "pyslirp-test/1"
    payload = memoryview(b"")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib name)
        pass

    def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/hello":
            self._send(200, HELLO)
        elif self.path == "/payload":
            data = self.payload
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for off in range(0, len(data), _CHUNK):
                self.wfile.write(data[off:off + _CHUNK])
        else:
            self._send(404, b"not found\n")

    def do_POST(self) -> None:
        if self.path != "/upload":
            self._send(404, b"not found\n")
            return
        h = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    chunk = self.rfile.read(min(left, _CHUNK))
                    if not chunk:
                        return
                    h.update(chunk)
                    n += len(chunk)
                    left -= len(chunk)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                chunk = self.rfile.read(min(left, _CHUNK))
                if not chunk:
                    return  # the client went away; nothing to answer
                h.update(chunk)
                n += len(chunk)
                left -= len(chunk)
        body = json.dumps({"bytes": n, "sha256": h.hexdigest()}).encode() + b"\n"
        self._send(200, body, "application/json")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


# ---- DNS ----------------------------------------------------------------------------

_DNS_HEADER = struct.Struct("!HHHHHH")
_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 255: "ANY"}
RCODE_NXDOMAIN = 3
RCODE_REFUSED = 5
RCODE_FORMERR = 1


def _read_name(msg: bytes, off: int) -> tuple[str, int]:
    labels = []
    while True:
        n = msg[off]
        off += 1
        if n == 0:
            break
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(msg[off:off + n].decode("ascii", "replace"))
        off += n
    return ".".join(labels).lower() + ".", off


def dns_answer(query: bytes, log: list[str] | None = None, proto: str = "udp") -> bytes | None:
    """The authoritative answer to ``query`` (None for garbage that deserves no reply)."""
    if len(query) < 12:
        return None
    ident, flags, qdcount, _, _, _ = _DNS_HEADER.unpack_from(query)
    if flags & 0x8000:
        return None  # a response, not a query
    rd = flags & 0x0100
    try:
        if qdcount != 1:
            raise ValueError("one question expected")
        name, off = _read_name(query, 12)
        qtype, qclass = struct.unpack_from("!HH", query, off)
        question = query[12:off + 4]
    except (ValueError, IndexError, struct.error):
        return _DNS_HEADER.pack(ident, 0x8000 | rd | RCODE_FORMERR, 0, 0, 0, 0)
    if log is not None:
        log.append(f"{proto} {name} {_TYPES.get(qtype, qtype)}")
    answers = b""
    if name == TEST_NAME or name.endswith("." + TEST_NAME):
        rcode = 0
        if qtype in (1, 255) and qclass == 1:
            answers = (b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4)
                       + socket.inet_aton(TEST_ADDR))
    elif name == ZONE or name.endswith("." + ZONE):
        rcode = RCODE_NXDOMAIN
    else:
        return _DNS_HEADER.pack(ident, 0x8000 | rd | RCODE_REFUSED, 1, 0, 0, 0) + question
    aa = 0x0400
    return (_DNS_HEADER.pack(ident, 0x8000 | aa | rd | rcode, 1, 1 if answers else 0, 0, 0)
            + question + answers)


class _LogFile:
    """Append-only log, one line per event, flushed at once so the test sees it immediately."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
        self._lock = threading.Lock()

    def add(self, line: str) -> None:
        with self._lock:
            self._f.write(line + "\n")


class _DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, log: _LogFile) -> None:
        self.log = log
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        lines: list[str] = []
        reply = dns_answer(data, lines, "udp")
        for line in lines:
            self.log.add(line)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _dns_tcp(log: _LogFile, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readexactly(2)
            query = await reader.readexactly(struct.unpack("!H", head)[0])
            lines: list[str] = []
            reply = dns_answer(query, lines, "tcp")
            for line in lines:
                log.add(line)
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


# ---- echo ---------------------------------------------------------------------------

class _EchoUdp(asyncio.DatagramProtocol):
    def __init__(self, log: _LogFile) -> None:
        self.log = log
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.log.add(f"udp {addr[0]}:{addr[1]} {data[:64]!r}")
        if self.transport is not None:
            self.transport.sendto(data, addr)


async def _echo_tcp(log: _LogFile, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    log.add(f"tcp {peer[0]}:{peer[1]} open")
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


# ---- main ---------------------------------------------------------------------------

async def _serve_async(state: Path, echo_port: int, dns_port: int,
                       ready: threading.Event) -> None:
    loop = asyncio.get_running_loop()
    echo_log = _LogFile(state / "echo.log")
    dns_log = _LogFile(state / "dns.log")
    await loop.create_datagram_endpoint(lambda: _EchoUdp(echo_log),
                                        local_addr=("127.0.0.1", echo_port))
    await asyncio.start_server(lambda r, w: _echo_tcp(echo_log, r, w), "127.0.0.1", echo_port,
                               backlog=1024)
    await loop.create_datagram_endpoint(lambda: _DnsUdp(dns_log),
                                        local_addr=("127.0.0.1", dns_port))
    await asyncio.start_server(lambda r, w: _dns_tcp(dns_log, r, w), "127.0.0.1", dns_port,
                               backlog=128)
    ready.set()
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("state", type=Path, help="directory for payload.bin and the logs")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    state: Path = args.state
    state.mkdir(parents=True, exist_ok=True)

    payload = make_payload(args.size, args.seed)
    (state / "payload.bin").write_bytes(payload)
    _Handler.payload = memoryview(payload)
    http = _HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()

    # Each serves TCP and UDP on one port.
    echo_port = free_port(socket.SOCK_STREAM, socket.SOCK_DGRAM)
    dns_port = free_port(socket.SOCK_STREAM, socket.SOCK_DGRAM)
    while dns_port == echo_port:
        dns_port = free_port(socket.SOCK_STREAM, socket.SOCK_DGRAM)
    ready = threading.Event()
    threading.Thread(target=asyncio.run, args=(_serve_async(state, echo_port, dns_port, ready),),
                     daemon=True).start()
    if not ready.wait(30):
        print("servers: echo/DNS did not start", file=sys.stderr)
        return 1
    info = {"http": http.server_address[1], "echo": echo_port, "dns": dns_port,
            "dead": DEAD_PORT, "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": str(state / "payload.bin")}
    print(json.dumps(info), flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
