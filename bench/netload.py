"""Small load generators and servers used by bench/run.py.

Theory of operation
-------------------
bench/run.py measures a network stack (pyslirp, slirp4netns, pasta) that links a
network namespace to the host.  The *servers* here run in the host's network
namespace on loopback (127.0.0.1); the *clients* run inside the namespace (the
runner starts them under ``nsenter --net``) and reach the host through the stack's
address for it (10.0.2.2).  Every client prints exactly one JSON object on stdout,
which the runner parses.  Nothing here ever talks to an address that is not
loopback or the namespace's own gateway/DNS address given on the command line.

Subcommands
  serve           all host-side servers in one process (threads, each blocked in a
                  system call, so they do not contend for the GIL):
                    rtt     echo every byte back (TCP_NODELAY) -- round-trip test
                    accept  accept and close at once -- connections-per-second test
                    hold    accept, send one byte, keep the socket open -- idle test
                    dns     answer every UDP DNS query with one A record
                    nagle   answer each pair of NAGLE_MSG-byte messages with one byte,
                            only once both are in -- the Nagle test
                  Prints ``{"ready": true}`` once every socket is bound.
  rtt             N one-byte ping-pongs over one TCP connection; p50/p99 in us and
                  the exchanges made (warm-up included, for CPU per round trip).
                  --gap S sleeps S seconds after each (paced exchanges: every one then
                  wakes a sleeping stack, and any timer it leaves behind wakes it again).
  connect         N sequential connect()+close(); connections per second.
  nagle           N exchanges over one TCP connection with Nagle's algorithm on (the
                  default): two small writes back to back, then read the answer; p50/p99
                  in us. Nagle holds the second write until the first is acknowledged and
                  the server answers only after both, so this times the stack's ACK of a
                  short segment with no reply to carry it (a delayed ACK's deadline).
  nagle-serve     the nagle server alone on --port (0: any), printing {"port": N}.
  dns             N DNS queries with a window of W outstanding; answered/s, lost.
  hold            open N connections, read the server's byte on each (so every one
                  is known to be established end to end), print, wait for a line on
                  stdin, close them all (the server closes its ends in turn).
  probe           retry one TCP connect until it succeeds or a deadline passes
                  (used to tell that a stack is really forwarding).

Deliberately not here: bulk throughput (iperf3 does that better than Python could).
Only the standard library is used, so the clients start fast in any Python 3.11.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import selectors
import socket
import struct
import sys
import threading
import time

_DNS_HEADER = struct.Struct("!HHHHHH")
# One answer: name pointer to the question (0xC00C), type A, class IN, TTL 60,
# rdlength 4, 127.0.0.1.  The address is never contacted; it only makes the
# reply a well-formed positive answer.
_DNS_ANSWER = struct.pack("!HHHIH4s", 0xC00C, 1, 1, 60, 4, bytes([127, 0, 0, 1]))


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _listener(bind: str, port: int, backlog: int = 4096) -> socket.socket:
    s = socket.socket(_family(bind), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    s.listen(backlog)
    return s


# ---------------------------------------------------------------- servers


def _echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
        except OSError:
            return


def _serve_rtt(lsock: socket.socket) -> None:
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


#: Bytes in each of the nagle test's two messages.
NAGLE_MSG = 10


def _answer_pairs(conn: socket.socket) -> None:
    with conn:
        try:
            while True:
                got = 0
                while got < 2 * NAGLE_MSG:
                    data = conn.recv(2 * NAGLE_MSG - got)
                    if not data:
                        return
                    got += len(data)
                conn.sendall(b"!")
        except OSError:
            return


def _serve_nagle(lsock: socket.socket) -> None:
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_answer_pairs, args=(conn,), daemon=True).start()


def cmd_nagle_serve(args: argparse.Namespace) -> int:
    lsock = _listener(args.bind, args.port)
    _emit({"port": lsock.getsockname()[1]})
    _serve_nagle(lsock)
    return 0


def _serve_accept(lsock: socket.socket) -> None:
    while True:
        conn, _ = lsock.accept()
        conn.close()


def _serve_hold(lsock: socket.socket) -> None:
    # Close our end as soon as the client closes its end: a stack keeps a host socket
    # per connection until both sides are closed, and half-closed leftovers from one
    # measurement would slow the stack down in the next.
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is lsock:
                conn, _ = lsock.accept()
                try:
                    conn.send(b"!")
                except OSError:
                    conn.close()
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()


def _dns_reply(query: bytes) -> bytes | None:
    if len(query) < 12:
        return None
    qid, flags, qd, _an, _ns, _ar = _DNS_HEADER.unpack_from(query)
    if flags & 0x8000 or qd != 1:
        return None
    # Find the end of the single question: labels, then QTYPE and QCLASS.
    i = 12
    n = len(query)
    while i < n and query[i] != 0:
        i += query[i] + 1
    end = i + 5
    if end > n:
        return None
    header = _DNS_HEADER.pack(qid, 0x8180 | (flags & 0x0100), 1, 1, 0, 0)
    return header + query[12:end] + _DNS_ANSWER


def _serve_dns(usock: socket.socket) -> None:
    while True:
        try:
            query, peer = usock.recvfrom(4096)
        except OSError:
            continue
        reply = _dns_reply(query)
        if reply is not None:
            with contextlib.suppress(OSError):
                usock.sendto(reply, peer)


def cmd_serve(args: argparse.Namespace) -> int:
    threads = []
    for name, target in (("rtt", _serve_rtt), ("accept", _serve_accept), ("hold", _serve_hold),
                         ("nagle", _serve_nagle)):
        port = getattr(args, f"{name}_port")
        if port:
            threads.append(threading.Thread(target=target, args=(_listener(args.bind, port),)))
    dns_error = None
    if args.dns:
        host, _, port_s = args.dns.rpartition(":")
        usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        usock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            usock.bind((host, int(port_s)))
            threads.append(threading.Thread(target=_serve_dns, args=(usock,)))
        except OSError as exc:
            dns_error = f"cannot bind DNS server to {args.dns}: {exc}"
            usock.close()
    for t in threads:
        t.daemon = True
        t.start()
    _emit({"ready": True, "dns_error": dns_error})
    # Serve until the runner closes our stdin (or kills us).
    sys.stdin.read()
    return 0


# ---------------------------------------------------------------- clients


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def _percentile(sorted_values: list[int], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[idx])


def cmd_rtt(args: argparse.Namespace) -> int:
    s = _connect(args.host, args.port, args.timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    one = b"x"
    clock = time.perf_counter_ns
    samples: list[int] = []
    with s:
        for i in range(args.warmup + args.count):
            t0 = clock()
            s.sendall(one)
            if not s.recv(1):
                raise SystemExit("rtt: server closed the connection")
            if i >= args.warmup:
                samples.append(clock() - t0)
            if args.gap:
                time.sleep(args.gap)
    samples.sort()
    _emit({
        "count": len(samples),
        "exchanges": args.warmup + args.count,   # warm-up included: the stack's work
        "p50_us": _percentile(samples, 0.50) / 1000.0,
        "p99_us": _percentile(samples, 0.99) / 1000.0,
    })
    return 0


def cmd_nagle(args: argparse.Namespace) -> int:
    s = _connect(args.host, args.port, args.timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # Nagle on (the default)
    first, second = b"a" * NAGLE_MSG, b"b" * NAGLE_MSG
    clock = time.perf_counter_ns
    samples: list[int] = []
    with s:
        for _ in range(args.count):
            t0 = clock()
            s.sendall(first)
            s.sendall(second)
            if not s.recv(1):
                raise SystemExit("nagle: server closed the connection")
            samples.append(clock() - t0)
    samples.sort()
    _emit({
        "answered": len(samples),
        "p50_us": _percentile(samples, 0.50) / 1000.0,
        "p99_us": _percentile(samples, 0.99) / 1000.0,
    })
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    errors = 0
    done = 0
    t0 = time.perf_counter()
    for _ in range(args.count):
        try:
            s = _connect(args.host, args.port, args.timeout)
        except OSError:
            errors += 1
            if errors > max(10, args.count // 100):
                break
            continue
        s.close()
        done += 1
    elapsed = time.perf_counter() - t0
    _emit({"count": done, "errors": errors, "seconds": elapsed,
           "conn_per_s": done / elapsed if elapsed > 0 else 0.0})
    return 0


def _dns_query(qid: int, name: bytes) -> bytes:
    # Standard query, recursion desired, one question: NAME A IN.
    return _DNS_HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def cmd_dns(args: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((args.server, args.port))
    s.settimeout(args.timeout)
    name = _encode_name("bench.pyslirp.test")
    outstanding: set[int] = set()
    sent = answered = lost = 0
    next_id = 1
    t0 = time.perf_counter()
    with s:
        while answered + lost < args.count:
            while len(outstanding) < args.window and sent < args.count:
                qid = next_id
                next_id = next_id % 0xFFFF + 1
                outstanding.add(qid)
                s.send(_dns_query(qid, name))
                sent += 1
            try:
                reply = s.recv(4096)
            except TimeoutError:
                # Whatever is still outstanding after a quiet spell is lost.
                lost += len(outstanding)
                outstanding.clear()
                if answered == 0 and lost >= args.window * 3:
                    break
                continue
            if len(reply) >= 12:
                rid = _DNS_HEADER.unpack_from(reply)[0]
                if rid in outstanding:
                    outstanding.discard(rid)
                    answered += 1
    elapsed = time.perf_counter() - t0
    _emit({"answered": answered, "lost": lost, "seconds": elapsed,
           "qps": answered / elapsed if elapsed > 0 else 0.0})
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    socks: list[socket.socket] = []
    error = None
    t0 = time.perf_counter()
    try:
        for _ in range(args.count):
            s = _connect(args.host, args.port, args.timeout)
            socks.append(s)
            if s.recv(1) != b"!":
                error = "server's greeting byte did not arrive"
                break
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    _emit({"connected": len(socks), "seconds": time.perf_counter() - t0, "error": error})
    sys.stdin.readline()
    for s in socks:
        s.close()
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.deadline
    last = ""
    while time.monotonic() < deadline:
        try:
            _connect(args.host, args.port, 1.0).close()
            _emit({"ok": True})
            return 0
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
    _emit({"ok": False, "error": last})
    return 1


def cmd_flood(args: argparse.Namespace) -> int:
    """Flood the stack from the guest for ``--seconds``: new TCP handshakes to ports
    nobody listens on (``syn``: each a new flow, at most ``--live`` open at once) or
    datagrams to ever new UDP ports (``udp``: each a new UDP flow). The stack answers
    with RSTs / ICMP and must keep serving the guest's real transfer meanwhile."""
    end = time.monotonic() + args.seconds
    sent = errors = 0
    if args.kind == "syn":
        live: collections.deque[socket.socket] = collections.deque()
        while time.monotonic() < end:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect((args.host, args.first_port + sent % args.ports))
            except BlockingIOError:
                pass
            except OSError:
                errors += 1
            live.append(s)
            sent += 1
            if len(live) > args.live:
                live.popleft().close()
        for s in live:
            s.close()
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            while time.monotonic() < end:
                try:
                    u.sendto(b"x" * 64, (args.host, args.first_port + sent % args.ports))
                except OSError:
                    errors += 1
                sent += 1
    _emit({"kind": args.kind, "sent": sent, "errors": errors})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser("serve")
    sp.add_argument("--bind", default="127.0.0.1")
    sp.add_argument("--rtt-port", type=int, default=0)
    sp.add_argument("--accept-port", type=int, default=0)
    sp.add_argument("--hold-port", type=int, default=0)
    sp.add_argument("--nagle-port", type=int, default=0)
    sp.add_argument("--dns", default="", help="ADDR:PORT for the test DNS server")
    sp.set_defaults(func=cmd_serve)

    for name, func, count in (("rtt", cmd_rtt, 20000), ("connect", cmd_connect, 3000),
                              ("hold", cmd_hold, 1000), ("probe", cmd_probe, 1),
                              ("nagle", cmd_nagle, 2000)):
        cp = sub.add_parser(name)
        cp.add_argument("--host", required=True)
        cp.add_argument("--port", type=int, required=True)
        cp.add_argument("--count", type=int, default=count)
        cp.add_argument("--timeout", type=float, default=5.0)
        cp.set_defaults(func=func)
        if name == "rtt":
            cp.add_argument("--warmup", type=int, default=200)
            cp.add_argument("--gap", type=float, default=0.0,
                            help="seconds to sleep after each exchange (default: none)")
        if name == "probe":
            cp.add_argument("--deadline", type=float, default=5.0)

    np_ = sub.add_parser("nagle-serve")
    np_.add_argument("--bind", default="127.0.0.1")
    np_.add_argument("--port", type=int, default=0)
    np_.set_defaults(func=cmd_nagle_serve)

    dp = sub.add_parser("dns")
    dp.add_argument("--server", required=True)
    dp.add_argument("--port", type=int, default=53)
    dp.add_argument("--count", type=int, default=20000)
    dp.add_argument("--window", type=int, default=8)
    dp.add_argument("--timeout", type=float, default=0.5)
    dp.set_defaults(func=cmd_dns)

    fp = sub.add_parser("flood")
    fp.add_argument("--kind", choices=["syn", "udp"], required=True)
    fp.add_argument("--host", required=True)
    fp.add_argument("--seconds", type=float, required=True)
    fp.add_argument("--first-port", type=int, default=40000)
    fp.add_argument("--ports", type=int, default=20000)
    fp.add_argument("--live", type=int, default=512)
    fp.set_defaults(func=cmd_flood)

    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
