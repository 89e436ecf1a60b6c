"""More floods from the guest: new UDP flows, ARP and DHCP storms, slowloris.

Each test floods pyslirp from the guest namespace while it serves, then checks
what a user would notice: pyslirp's resident memory grew by a bounded amount,
the flood shows in its counters, and a well-behaved download in the same
guest still arrives byte for byte (tests/e2e/test_floods.py has the SYN flood
and stalled uploads).
"""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.e2e.conftest import GATEWAY, Guest, Host, Slirp, StartSlirp, sha256_of_get
from tests.e2e.test_floods import _counters, _rss_kib
from tests.nsutil import wait_for

#: Growth of pyslirp's RSS a flood may cause (flow tables, allocator slack).
RSS_GROWTH_BOUND_MIB = 24

#: Datagrams from ever new guest ports (a new UDP flow each) to ever new gateway
#: ports, for SECONDS; prints how many were sent.
UDP_FLOWS_FLOOD = """
import socket, sys, time
gateway, seconds = sys.argv[1], float(sys.argv[2])
end, sent = time.monotonic() + seconds, 0
while time.monotonic() < end:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(4):
            s.sendto(b"x" * 64, (gateway, 30000 + sent % 20000))
            sent += 1
print(sent)
"""

#: Datagrams from one socket to ever new gateway ports for SECONDS, then from the same
#: socket to the host's UDP echo, up to ten times half a second apart; prints how many
#: were sent and "echoed" when the echo came back.
ONE_SOCKET_FLOOD = """
import socket, sys, time
gateway, seconds, echo = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end, sent = time.monotonic() + seconds, 0
while time.monotonic() < end:
    try:
        s.sendto(b"x" * 64, (gateway, 30000 + sent % 20000))
    except OSError:
        pass  # an ICMP error reported on the socket
    sent += 1
s.settimeout(0.5)
result = "lost"
for _ in range(10):
    s.sendto(b"after the flood", (gateway, echo))
    try:
        while s.recvfrom(2048)[0] != b"after the flood":
            pass
        result = "echoed"
        break
    except (socket.timeout, ConnectionRefusedError):
        pass
print(sent, result)
"""

#: Plain SYNs (raw frames on tap0, as a flooding tool would send them) to ever new
#: gateway ports for SECONDS; prints how many were sent.
RAW_SYN_FLOOD = """
import socket, struct, sys, time
gateway, seconds = socket.inet_aton(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("tap0", 0))
mac = s.getsockname()[4]
gw_mac = bytes.fromhex(sys.argv[3].replace(":", ""))
guest = socket.inet_aton("10.0.2.100")
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t & 0xFFFF) + (t >> 16)
    return ~((t & 0xFFFF) + (t >> 16)) & 0xFFFF
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0x4000, 64, 6, 0, guest, gateway)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
head = gw_mac + mac + b"\\x08\\x00" + ip
end, sent = time.monotonic() + seconds, 0
while time.monotonic() < end:
    for _ in range(64):
        sport, dport = 1024 + sent % 60000, 10000 + sent % 50000
        tcp = struct.pack("!HHIIBBHHH", sport, dport, sent, 0, 5 << 4, 2, 65535, 0, 0)
        pseudo = guest + gateway + struct.pack("!BBH", 0, 6, 20)
        tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
        try:
            s.send(head + tcp)
        except BlockingIOError:
            pass
        sent += 1
print(sent)
"""

#: A host server: accepts, answers "ok" and closes; prints its port first. (The flood
#: may hit its port too: those connections are reset by the guest, which has no
#: socket for them.)
OK_SERVER = """
import socket
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept()
    try:
        c.sendall(b"ok")
    except OSError:
        pass
    c.close()
"""

#: Connects to the gateway's PORT (a new destination for the guest) up to five times,
#: two seconds each; prints what the server said.
CONNECT_ONCE = """
import socket, sys
for _ in range(5):
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
            print(c.recv(16).decode())
            break
    except OSError:
        pass
"""

#: One datagram to the host's UDP echo from a fresh port (a new flow), sent up to
#: three times, a second apart; prints "echoed" when it came back.
UDP_ECHO_ONCE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
for _ in range(3):
    s.sendto(b"right after the flood", (sys.argv[1], int(sys.argv[2])))
    try:
        if s.recvfrom(2048)[0] == b"right after the flood":
            print("echoed")
            break
    except socket.timeout:
        pass
"""

#: Raw frames on tap0 for SECONDS: ARP requests (for the gateway and for addresses
#: nobody has) and DHCP DISCOVERs from ever new client MACs; prints the ARP replies
#: for the gateway that came back.
L2_STORM = """
import os, socket, struct, sys, time
kind, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("tap0", 0))
s.setblocking(False)
mac = s.getsockname()[4]
guest, gateway = socket.inet_aton("10.0.2.100"), socket.inet_aton("10.0.2.2")

def csum(b):
    if len(b) % 2:
        b += b"\\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t & 0xFFFF) + (t >> 16)
    return ~((t & 0xFFFF) + (t >> 16)) & 0xFFFF

def arp(i):
    target = gateway if i % 2 else socket.inet_aton("10.0.2.%d" % (20 + i % 200))
    return (b"\\xff" * 6 + mac + b"\\x08\\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + mac + guest + bytes(6) + target)

def discover(i):
    chaddr = b"\\x02" + struct.pack("!IB", i, 0)
    bootp = (struct.pack("!BBBBIHH", 1, 1, 6, 0, i, 0, 0x8000) + bytes(16) + chaddr
             + bytes(10 + 64 + 128) + b"\\x63\\x82\\x53\\x63" + b"\\x35\\x01\\x01\\xff")
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0,
                     bytes(4), b"\\xff" * 4)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return b"\\xff" * 6 + mac + b"\\x08\\x00" + ip + udp

build = arp if kind == "arp" else discover
end, sent, replies = time.monotonic() + seconds, 0, 0
while time.monotonic() < end:
    try:
        s.send(build(sent))
    except BlockingIOError:
        pass
    sent += 1
    while True:
        try:
            frame = s.recv(2048)
        except BlockingIOError:
            break
        if (frame[12:14], frame[20:22], frame[28:32]) == (b"\\x08\\x06", b"\\x00\\x02", gateway):
            replies += 1
print(sent, replies)
"""

#: COUNT connections to a host server that each send one byte every PERIOD seconds
#: and never finish; prints how many connected, then holds them until stdin closes.
SLOWLORIS = """
import socket, sys, time, select
host, port, count, period = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = []
for _ in range(count):
    s = socket.create_connection((host, port), timeout=10)
    s.send(b"G")
    socks.append(s)
print(len(socks), flush=True)
while not select.select([sys.stdin], [], [], period)[0]:
    for s in socks:
        s.send(b"E")
"""

#: A host server that accepts, reads a little at a time and never answers.
PATIENT_SERVER = """
import selectors, socket
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(512)
print(srv.getsockname()[1], flush=True)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is srv:
            sel.register(srv.accept()[0], selectors.EVENT_READ)
        elif not key.fileobj.recv(16):
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""


def _download_intact(guest: Guest, host: Host) -> None:
    assert sha256_of_get(guest, host.url("/payload")) == host.sha256


def _download_during(guest: Guest, host: Host, flood: subprocess.Popen[str]) -> str:
    """The well-behaved download while ``flood`` runs; then the flood's output."""
    try:
        _download_intact(guest, host)
        out, _ = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()
        flood.wait()
    return out


def test_a_flood_of_new_udp_flows_is_cut_and_a_download_survives(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    """A flood of new UDP flows is cut by admission, a download during it arrives
    intact, and a UDP exchange right after it works.

    (Before, the flood's flows filled the table for their 240 s idle timeout and
    every new flow, the exchange's too, was refused.)
    """
    slirp = start_slirp()
    _download_intact(guest, host)  # warm up, then the baseline
    before = _rss_kib(slirp.pid)
    flood = guest.popen([sys.executable, "-c", UDP_FLOWS_FLOOD, GATEWAY, "12"],
                        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    sent = int(_download_during(guest, host, flood))
    # The flood's flows fill the flow table, nobody answers them: a new flow right
    # after it still gets through (it takes the place of an unanswered one).
    assert guest.python(UDP_ECHO_ONCE, GATEWAY, str(host.echo)).stdout.strip() == "echoed"
    growth_mib = (_rss_kib(slirp.pid) - before) / 1024
    print(f"{sent} datagrams; pyslirp RSS grew by {growth_mib:.1f} MiB")
    assert growth_mib <= RSS_GROWTH_BOUND_MIB
    assert slirp.stop() == -signal.SIGTERM
    counters = _counters(slirp.log_text())
    cut = counters.get("drop.udp.flow_rate", 0) + counters.get("drop.udp.flow_limit", 0)
    assert cut > 0, counters  # admission held the new flows back
    assert counters["udp.flows_opened"] < sent // 4
    assert counters.get("udp.flows_evicted", 0) > 0, counters  # the table did fill up


def _assert_mostly_unread(slirp: Slirp, sent: int, engaged: str, unread: str,
                          refused: str) -> None:
    """Stop pyslirp; its counters say a flood filter was engaged and that most of the
    ``sent`` frames were never read, and what was read was refused as before."""
    assert slirp.stop() == -signal.SIGTERM
    counters = _counters(slirp.log_text())
    assert counters.get(engaged, 0) >= 1, counters
    assert counters[unread] > sent // 2 > counters[refused], (sent, counters)
    print(f"{sent} sent: {counters[refused]} refused after the read, "
          f"~{counters[unread]} never read")


def test_a_flood_from_one_socket_is_dropped_in_the_guests_kernel_and_lifted_after(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    """One socket sending to ever new ports: the TAP's flood filter drops most of it in
    the guest's kernel (pyslirp never reads those frames), a download meanwhile arrives
    intact, and once the flood stops the filter comes off: the same socket's datagram
    to a new destination (the echo) gets its reply."""
    slirp = start_slirp()
    _download_intact(guest, host)
    flood = guest.popen([sys.executable, "-c", ONE_SOCKET_FLOOD, GATEWAY, "6",
                         str(host.echo)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                        text=True)
    sent_text, result = _download_during(guest, host, flood).split()
    assert result == "echoed"
    _assert_mostly_unread(slirp, int(sent_text), "udp.flood_filter.engaged",
                          "drop.udp.flood_filtered", "drop.udp.new_destination_rate")


def test_a_syn_flood_is_dropped_in_the_guests_kernel_and_lifted_after(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    """Plain SYNs to ever new ports: the TAP's flood filter drops most of them in the
    guest's kernel, a download from a known peer meanwhile arrives intact, and once the
    flood stops the filter comes off: a connection to a new destination gets in."""
    slirp = start_slirp()
    server = host.ns.popen([sys.executable, "-c", OK_SERVER], stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        _download_intact(guest, host)  # the HTTP server becomes a known peer
        flood = guest.popen([sys.executable, "-c", RAW_SYN_FLOOD, GATEWAY, "6",
                             "52:55:0a:00:02:02"], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
        sent = int(_download_during(guest, host, flood))
        assert guest.python(CONNECT_ONCE, GATEWAY, port).stdout.strip() == "ok"
    finally:
        server.kill()
        server.wait()
    _assert_mostly_unread(slirp, sent, "tcp.syn_flood_filter.engaged",
                          "tcp.drop.syn_flood_filtered", "tcp.drop.new_flow_rate")


def test_arp_and_dhcp_storms_leave_memory_bounded_and_service_intact(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    slirp = start_slirp()
    _download_intact(guest, host)
    before = _rss_kib(slirp.pid)
    outputs = {}
    for kind in ("arp", "dhcp"):
        storm = guest.popen([sys.executable, "-c", L2_STORM, kind, "8"],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        outputs[kind] = [int(x) for x in _download_during(guest, host, storm).split()]
    growth_mib = (_rss_kib(slirp.pid) - before) / 1024
    print(f"storms (sent, gateway ARP replies): {outputs}; RSS grew by {growth_mib:.1f} MiB")
    assert growth_mib <= RSS_GROWTH_BOUND_MIB
    assert outputs["arp"][1] > 0  # the gateway kept answering ARP through the storm
    assert slirp.stop() == -signal.SIGTERM
    counters = _counters(slirp.log_text())
    # Every DISCOVER was answered or found the (16-address) pool exhausted; the
    # leases offered stayed within the pool.
    assert counters.get("dhcp.pool_exhausted", 0) > 0, counters
    assert counters.get("dhcp.offer", 0) + counters["dhcp.pool_exhausted"] > 100


def test_slowloris_connections_are_held_without_harm(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    count = 300
    slirp = start_slirp()
    server = host.ns.popen([sys.executable, "-c", PATIENT_SERVER], stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, text=True)
    loris: subprocess.Popen[str] | None = None
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        _download_intact(guest, host)
        before = _rss_kib(slirp.pid)
        loris = guest.popen([sys.executable, "-c", SLOWLORIS, GATEWAY, port, str(count), "2"],
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        assert loris.stdout is not None
        assert int(loris.stdout.readline()) == count
        wait_for(lambda: len(host.established_to(int(port))) >= 2 * count, timeout=20,
                 what="every slow connection established on the host")
        _download_intact(guest, host)
        growth_mib = (_rss_kib(slirp.pid) - before) / 1024
        print(f"{count} slow connections; pyslirp RSS grew by {growth_mib:.1f} MiB")
        assert growth_mib <= RSS_GROWTH_BOUND_MIB
        assert loris.poll() is None, "a slow connection failed"
    finally:
        if loris is not None:
            loris.kill()
            loris.wait()
        server.kill()
        server.wait()
    assert slirp.stop() == -signal.SIGTERM
    assert _counters(slirp.log_text())["tcp.flows_opened"] >= count
