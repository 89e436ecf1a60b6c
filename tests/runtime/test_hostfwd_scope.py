"""A port forward listens where it was asked to, and nowhere else.

``add_hostfwd`` with ``host_addr 127.0.0.1`` must not be reachable on another address of
the host (here 127.0.0.2, a second loopback address every Linux has), and one bound to
127.0.0.2 not on 127.0.0.1: a forward meant for local clients only must not become one
for anybody who can reach another address of the machine. Host clients are ordinary
sockets on this machine's loopback; the guest is the test on a socketpair (LinkRig).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from scapy.layers.inet import TCP, UDP

from tests.netutil import free_port
from tests.runtime.linkrig import GUEST
from tests.runtime.test_hostfwd import GPORT, Rig


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def _tcp_refused(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((addr, port)) != 0


@pytest.mark.parametrize(("bound", "other"), [("127.0.0.1", "127.0.0.2"),
                                              ("127.0.0.2", "127.0.0.1")])
def test_tcp_forward_is_reachable_only_on_its_host_addr(rig: Rig, bound: str, other: str) -> None:
    port = free_port()
    rig.fwd.add("tcp", bound, port, GUEST, GPORT)
    rig.know_guest()
    assert _tcp_refused(other, port)
    rig.spin()
    assert not [f for f in rig.frames() if TCP in f], "a refused client reached the guest"
    with socket.create_connection((bound, port), timeout=5):
        # The listener is real: the guest is offered the connection.
        rig.wait_frame(lambda f: TCP in f and f[TCP].flags == "S" and f[TCP].dport == GPORT)


@pytest.mark.parametrize(("bound", "other"), [("127.0.0.1", "127.0.0.2"),
                                              ("127.0.0.2", "127.0.0.1")])
def test_udp_forward_is_reachable_only_on_its_host_addr(rig: Rig, bound: str, other: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    rig.fwd.add("udp", bound, port, GUEST, GPORT)
    rig.know_guest()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.connect((other, port))
        client.send(b"to the wrong address")
        # Nobody bound there: the host's kernel answers port unreachable.
        client.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            client.recv(100)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"to the right one", (bound, port))
        got = rig.wait_frame(lambda f: UDP in f and f[UDP].dport == GPORT)
    assert bytes(got[UDP].payload) == b"to the right one"
    assert not [f for f in rig.seen if UDP in f and b"wrong" in bytes(f[UDP].payload)]
