"""HostForwarder with a real Attachment whose "TAP" is a datagram socketpair.

The test plays the guest with scapy on the other end of the pair, and the
host clients are ordinary sockets on this machine's loopback (nothing else
is ever contacted). The loop runs in the test thread between steps.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP
from scapy.packet import Packet, Raw

from pyslirp.runtime.hostfwd import HostForwarder
from pyslirp.stack.config import NetConfig
from tests.netutil import free_port
from tests.runtime.linkrig import GUEST, GUEST_MAC, LinkRig

GATEWAY = "10.0.2.2"
GPORT = 8000


class Rig(LinkRig):
    def __init__(self) -> None:
        super().__init__(NetConfig(vnet_hdr=False, offload=False))
        self.fwd = HostForwarder(self.att)
        self.seen: list[Packet] = []

    def wait_frame(self, match: Callable[[Packet], bool], timeout: float = 5.0) -> Packet:
        """The first frame (oldest first, kept across calls) that ``match`` accepts."""
        for _ in range(int(timeout / 0.02)):
            self.seen += self.frames()
            for i, f in enumerate(self.seen):
                if match(f):
                    del self.seen[i]
                    return f
            self.spin()
        raise AssertionError("no such frame")


    def close(self) -> None:
        self.fwd.close()
        super().close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def is_syn(f: Packet) -> bool:
    return TCP in f and f[TCP].flags == "S"


def tcp_client(port: int, bind: tuple[str, int] | None = None) -> socket.socket:
    s = socket.socket()
    if bind is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(bind)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))  # the kernel accepts; the loop sees it on the next spin
    return s


def test_first_connection_asks_for_the_guest_mac_then_sends_a_syn_from_the_gateway(
        rig: Rig) -> None:
    port = free_port()
    rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT)
    with tcp_client(port) as c:
        arp = rig.wait_frame(lambda f: ARP in f)
        assert (arp[ARP].op, arp[ARP].pdst, arp[ARP].psrc) == (1, GUEST, GATEWAY)
        rig.send(ARP(op=2, hwsrc=GUEST_MAC, psrc=GUEST, hwdst=rig.our_mac, pdst=GATEWAY))
        syn = rig.wait_frame(is_syn)
        assert (syn[IP].src, syn[IP].dst) == (GATEWAY, GUEST)
        assert (syn[TCP].sport, syn[TCP].dport) == (c.getsockname()[1], GPORT)


def test_guest_refusal_resets_the_host_client(rig: Rig) -> None:
    rig.know_guest()
    port = free_port()
    rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT)
    with tcp_client(port) as c:
        syn = rig.wait_frame(is_syn)
        rig.send(IP(src=GUEST, dst=GATEWAY) / TCP(sport=GPORT, dport=syn[TCP].sport, flags="RA",
                                                  seq=0, ack=syn[TCP].seq + 1))
        rig.spin(0.05)
        with pytest.raises(ConnectionResetError):
            c.recv(10)


def test_accepted_guest_gets_the_client_bytes_and_the_client_the_guest_bytes(rig: Rig) -> None:
    rig.know_guest()
    port = free_port()
    rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT)
    with tcp_client(port) as c:
        c.sendall(b"hello guest")  # waits in the host socket until the guest accepted
        syn = rig.wait_frame(is_syn)
        sport, iss = syn[TCP].sport, syn[TCP].seq
        rig.send(IP(src=GUEST, dst=GATEWAY) / TCP(sport=GPORT, dport=sport, flags="SA", seq=5000,
                                                  ack=iss + 1, window=65535))
        data = rig.wait_frame(lambda f: Raw in f)
        assert bytes(data[Raw]) == b"hello guest"
        assert data[TCP].seq == iss + 1
        rig.send(IP(src=GUEST, dst=GATEWAY) / TCP(sport=GPORT, dport=sport, flags="PA",
                                                  seq=5001, ack=iss + 12, window=65535)
                 / Raw(b"hello host"))
        rig.spin(0.05)
        assert c.recv(100) == b"hello host"


def test_two_loopback_peers_with_one_port_get_distinct_four_tuples(rig: Rig) -> None:
    rig.know_guest()
    port = free_port()
    rig.fwd.add("tcp", "0.0.0.0", port, GUEST, GPORT)
    cport = free_port()
    with tcp_client(port, ("127.0.0.1", cport)), tcp_client(port, ("127.0.0.2", cport)):
        first = rig.wait_frame(is_syn)
        second = rig.wait_frame(is_syn)
    ports = {first[TCP].sport, second[TCP].sport}
    assert first[IP].src == second[IP].src == GATEWAY
    assert len(ports) == 2 and cport in ports


def test_a_taken_port_or_a_duplicate_is_refused(rig: Rig) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as info:
            rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT)
        assert info.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError):
            rig.fwd.add("tcp", "0.0.0.0", port, GUEST, GPORT)
    uport = free_port(socket.SOCK_DGRAM)
    rig.fwd.add("udp", "127.0.0.1", uport, GUEST, GPORT)
    for addr in ("127.0.0.1", "0.0.0.0"):
        with pytest.raises(OSError) as info:
            rig.fwd.add("udp", addr, uport, GUEST, GPORT + 1)
        assert info.value.errno == errno.EADDRINUSE
    assert list(rig.fwd.forwards) == [("udp", "127.0.0.1", uport)]


def test_remove_closes_the_listener(rig: Rig) -> None:
    port = free_port()
    rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT)
    rig.fwd.remove("tcp", "127.0.0.1", port)
    with pytest.raises(ConnectionRefusedError):
        tcp_client(port)
    with pytest.raises(OSError):
        rig.fwd.remove("tcp", "127.0.0.1", port)
    rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT)  # free again


def udp_client(port: int, bind: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def is_udp(f: Packet) -> bool:
    return UDP in f


def test_udp_in_and_the_reply_back_through_the_port_the_peer_used(rig: Rig) -> None:
    rig.know_guest()
    p1, p2 = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    rig.fwd.add("udp", "127.0.0.1", p1, GUEST, GPORT)
    rig.fwd.add("udp", "127.0.0.1", p2, GUEST, GPORT)  # two host ports, one guest port
    with udp_client(p1) as a, udp_client(p2, "127.0.0.3") as b:
        for client, port in ((a, p1), (b, p2)):
            client.send(b"ping")
            frame = rig.wait_frame(is_udp)
            assert (frame[IP].src, frame[UDP].sport) == (GATEWAY, client.getsockname()[1])
            assert (frame[IP].dst, frame[UDP].dport) == (GUEST, GPORT)
            assert bytes(frame[UDP].payload) == b"ping"
            rig.send(IP(src=GUEST, dst=GATEWAY) / UDP(sport=GPORT, dport=frame[UDP].sport)
                     / Raw(b"pong"))
            # connect()ed: only a reply from the very port it sent to gets through.
            assert client.recv(100) == b"pong"
            assert client.getpeername() == ("127.0.0.1", port)
        # Removing one host port leaves the other working.
        rig.fwd.remove("udp", "127.0.0.1", p1)
        b.send(b"again")
        assert bytes(rig.wait_frame(is_udp)[UDP].payload) == b"again"
        a.send(b"lost")
        rig.spin(0.05)
        with pytest.raises(ConnectionRefusedError):
            a.recv(100)


def test_udp_waits_for_the_guest_mac(rig: Rig) -> None:
    port = free_port(socket.SOCK_DGRAM)
    rig.fwd.add("udp", "127.0.0.1", port, GUEST, GPORT)
    with udp_client(port) as c:
        c.send(b"early")
        rig.wait_frame(lambda f: ARP in f)
        rig.send(ARP(op=2, hwsrc=GUEST_MAC, psrc=GUEST, hwdst=rig.our_mac, pdst=GATEWAY))
        assert bytes(rig.wait_frame(is_udp)[UDP].payload) == b"early"


def test_close_releases_every_port(rig: Rig) -> None:
    tport, uport = free_port(), free_port(socket.SOCK_DGRAM)
    rig.fwd.add("tcp", "127.0.0.1", tport, GUEST, GPORT)
    rig.fwd.add("udp", "127.0.0.1", uport, GUEST, GPORT)
    rig.fwd.close()
    assert rig.fwd.forwards == {}
    for kind, port in ((socket.SOCK_STREAM, tport), (socket.SOCK_DGRAM, uport)):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", port))


def test_api_drives_the_forwarder(rig: Rig) -> None:
    from pyslirp.api import ApiHandler

    handler = ApiHandler(rig.fwd, GUEST)
    port = free_port()
    add: Any = (b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1",'
                b'"host_port":%d,"guest_port":80}}' % port)
    assert handler.reply_for(add, final=True) == b'{"return":{"id":1}}'
    assert handler.reply_for(add, final=True) == (
        b'{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}')
    assert handler.reply_for(b'{"execute":"remove_hostfwd","arguments":{"id":1}}',
                             final=True) == b'{"return":{}}'
    with pytest.raises(ConnectionRefusedError):
        tcp_client(port)


def test_close_while_waiting_for_the_guest_mac_closes_the_waiting_connection(rig: Rig) -> None:
    port = free_port()
    rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT)
    with tcp_client(port) as c:
        rig.wait_frame(lambda f: ARP in f)  # accepted, now waiting for the guest's answer
        rig.fwd.close()
        with pytest.raises(ConnectionResetError):  # reset, as the guest never took it
            c.recv(10)


def spin_until(rig: Rig, done: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if done():
            return
        rig.spin()
    raise AssertionError("condition not reached")


def test_connections_parked_for_the_guest_mac_are_capped(rig: Rig) -> None:
    """While the guest's MAC is unknown, accepted connections wait, but only so many:
    the rest are reset at once instead of holding descriptors."""
    rig.fwd.max_parked = 3
    port = free_port()
    rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT)
    clients = [tcp_client(port) for _ in range(5)]
    try:
        counters = rig.att.stack.link.counters
        spin_until(rig, lambda: counters.get("hostfwd.tcp_parked_full", 0) == 2)
        assert rig.fwd._parked == 3
        for c in clients[3:]:
            with pytest.raises(ConnectionResetError):
                c.recv(10)
        # The guest answers ARP: the parked three go through, in order.
        rig.send(ARP(op=2, hwsrc=GUEST_MAC, psrc=GUEST, hwdst=rig.our_mac, pdst=GATEWAY))
        ports = [rig.wait_frame(is_syn)[TCP].sport for _ in range(3)]
        assert ports == [c.getsockname()[1] for c in clients[:3]]
        assert rig.fwd._parked == 0
    finally:
        for c in clients:
            c.close()


def test_a_parked_connection_is_reset_when_the_guest_mac_stays_unknown(rig: Rig) -> None:
    rig.fwd.park_timeout = 0.2
    port = free_port()
    rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT)
    with tcp_client(port) as c:
        counters = rig.att.stack.link.counters
        spin_until(rig, lambda: counters.get("hostfwd.tcp_guest_mac_timeout", 0) == 1)
        with pytest.raises(ConnectionResetError):
            c.recv(10)
        assert rig.fwd._parked == 0 and len(rig.att.stack.tcp) == 0
        assert not [f for f in rig.frames() if is_syn(f)]


class _OutOfFds:
    """A listening socket whose accept() fails with EMFILE while ``failing``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failing = True
        self.calls = 0

    def accept(self) -> Any:
        self.calls += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def test_out_of_fds_pauses_the_listener_instead_of_spinning(rig: Rig) -> None:
    rig.know_guest()
    port = free_port()
    rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT)
    fwd = rig.fwd.forwards[("tcp", "127.0.0.1", port)]
    flaky = _OutOfFds(fwd.sock)
    fwd.sock = flaky  # type: ignore[assignment]
    with tcp_client(port) as c:
        rig.spin(0.3)
        assert 1 <= flaky.calls <= 3  # a level-triggered busy loop would call it thousands of times
        assert rig.att.stack.link.counters["hostfwd.accept_error"] == flaky.calls
        flaky.failing = False
        syn = rig.wait_frame(is_syn)  # once descriptors are back, the connection goes through
        assert syn[TCP].sport == c.getsockname()[1]


@pytest.mark.parametrize(("peer", "seen"), [
    ("127.0.0.1", GATEWAY), ("127.9.9.9", GATEWAY), ("10.0.2.100", GATEWAY),
    ("10.0.2.77", GATEWAY), ("198.18.0.2", "198.18.0.2"), ("10.0.3.1", "10.0.3.1"),
])
def test_source_address_the_guest_sees(rig: Rig, peer: str, seen: str) -> None:
    assert rig.fwd._as_seen_by_guest(peer) == socket.inet_aton(seen)


# ---- IPv6 (with -6) --------------------------------------------------------------------------

GATEWAY6 = "fd00::2"
#: The SLAAC address GUEST_MAC gives in fd00::/64 (EUI-64).
GUEST_EUI64 = "fd00::ff:fe00:64"


class Rig6(Rig):
    def __init__(self) -> None:
        LinkRig.__init__(self, NetConfig(vnet_hdr=False, offload=False, enable_ipv6=True))
        self.fwd = HostForwarder(self.att)
        self.seen = []


@pytest.fixture
def rig6() -> Iterator[Rig6]:
    r = Rig6()
    yield r
    r.close()


def tcp6_client(port: int, addr: str = "::1") -> socket.socket:
    s = socket.create_connection((addr, port), timeout=5)
    return s


def test_ipv6_forward_without_a_guest_address_follows_what_the_guest_shows(rig6: Rig6) -> None:
    from scapy.layers.inet6 import ICMPv6ND_NS, IPv6

    rig6.know_guest()
    port = free_port()
    rig6.fwd.add("tcp", "::1", port, "", GPORT)
    dsts = []
    with tcp6_client(port):  # nothing learned yet: the SLAAC address of the guest's MAC
        dsts.append(rig6.wait_frame(is_syn)[IPv6].dst)
    # A DAD probe (from ::, to a group we do not join) names the address it will have ...
    rig6.send(IPv6(src="::", dst="ff02::1:ff00:99", hlim=255) / ICMPv6ND_NS(tgt="fd00::99"))
    with tcp6_client(port):
        dsts.append(rig6.wait_frame(is_syn)[IPv6].dst)
    # ... and a packet from an address of the prefix is the guest's for sure.
    rig6.send(IPv6(src="fd00::7", dst="fd00::2") / UDP(sport=5000, dport=9))
    with tcp6_client(port) as c:
        syn = rig6.wait_frame(is_syn)
        dsts.append(syn[IPv6].dst)
        assert (syn[IPv6].src, syn[TCP].sport) == (GATEWAY6, c.getsockname()[1])
    assert dsts == [GUEST_EUI64, "fd00::99", "fd00::7"]


def test_dual_stack_udp_forward_serves_both_families_and_answers_each(rig6: Rig6) -> None:
    from scapy.layers.inet6 import IPv6

    rig6.know_guest()
    port = free_port(socket.SOCK_DGRAM)
    rig6.fwd.add("udp", "::", port, "", GPORT)
    c4 = udp_client(port)
    c6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    c6.settimeout(5)
    c6.connect(("::1", port))
    with c4, c6:
        c4.send(b"four")
        f4 = rig6.wait_frame(is_udp)
        assert (f4[IP].src, f4[IP].dst, f4[UDP].sport) == (GATEWAY, GUEST, c4.getsockname()[1])
        c6.send(b"six")
        f6 = rig6.wait_frame(is_udp)
        assert (f6[IPv6].src, f6[IPv6].dst) == (GATEWAY6, GUEST_EUI64)
        assert f6[UDP].sport == c6.getsockname()[1]
        rig6.send(IP(src=GUEST, dst=GATEWAY) / UDP(sport=GPORT, dport=f4[UDP].sport) / b"r4")
        rig6.send(IPv6(src=GUEST_EUI64, dst=GATEWAY6) / UDP(sport=GPORT, dport=f6[UDP].sport)
                  / b"r6")
        assert c4.recv(100) == b"r4"
        assert c6.recv(100) == b"r6"
        # The guest's IPv6 address changes: the forward moves to it, the old endpoint goes.
        rig6.send(IPv6(src="fd00::7", dst=GATEWAY6) / UDP(sport=5000, dport=9))
        c6.send(b"moved")
        assert rig6.wait_frame(lambda f: IPv6 in f and UDP in f
                               and bytes(f[UDP].payload) == b"moved")[IPv6].dst == "fd00::7"
        udp = rig6.att.stack.udp
        guest_keys = {k for k, flow in udp.flows.items() if flow.forward}
        eui64 = socket.inet_pton(socket.AF_INET6, GUEST_EUI64)
        assert (eui64, GPORT) not in guest_keys
        assert (socket.inet_pton(socket.AF_INET6, "fd00::7"), GPORT) in guest_keys
        c4.send(b"still")  # the socket is still watched after the old flow went
        assert bytes(rig6.wait_frame(is_udp)[UDP].payload) == b"still"
    rig6.fwd.remove("udp", "::", port)
    assert not any(flow.forward for flow in rig6.att.stack.udp.flows.values())


def test_ipv6_loopback_udp_forward_leaves_the_guest_ipv4_port_alone(rig6: Rig6) -> None:
    """``::1`` without a guest address: no IPv4 peer can come, so the guest's own IPv4 flows
    from that port keep going out as before (a dual-stack ``::`` takes them over)."""
    udp = rig6.att.stack.udp
    guest4 = socket.inet_aton(GUEST)
    rig6.fwd.add("udp", "::1", free_port(socket.SOCK_DGRAM), "", GPORT)
    assert (guest4, GPORT) not in udp.flows
    rig6.fwd.add("udp", "::", free_port(socket.SOCK_DGRAM), "", GPORT)
    assert udp.flows[(guest4, GPORT)].forward


def test_ipv6_addresses_need_ipv6(rig: Rig) -> None:
    with pytest.raises(ValueError, match="IPv6 is not enabled"):
        rig.fwd.add("tcp", "::1", free_port(), "", GPORT)
    with pytest.raises(ValueError, match="IPv6 is not enabled"):
        rig.fwd.add("tcp", "127.0.0.1", free_port(), "fd00::100", GPORT)
    assert rig.fwd.forwards == {}
