"""Taking over a host port's socket from the plugin's caller (pyslirp.runtime.adopt).

A child process of the test stands in for podman/conmon: it binds (and for
TCP listens on) a loopback port and keeps it. The test process is the
"caller", so the child is in its CallerTree; a process outside the tree
(a sibling started with ``setsid`` and re-parented away) must never be
touched. Only loopback is used.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pyslirp.procfs import process_start_time
from pyslirp.runtime import adopt
from tests.runtime.test_hostfwd import GPORT, GUEST, Rig

HOLDER = r"""
import socket, sys
proto, listen, addr = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if family == socket.AF_INET6:  # as podman's reservation of an IPv6 hostIP
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind((addr, 0))
if listen and proto == "tcp":
    s.listen(8)
print(s.getsockname()[1], flush=True)
sys.stdin.read()  # hold the socket until the test closes our stdin
"""


class Holder:
    """A child process holding a socket on a loopback port until closed."""

    def __init__(self, proto: str = "tcp", listen: bool = True, detach: bool = False,
                 python: str = sys.executable, extra: tuple[str, ...] = (),
                 addr: str = "127.0.0.1") -> None:
        argv = [python, "-c", HOLDER, proto, "1" if listen else "0", addr, *extra]
        if detach:
            # Outside our process tree: a double fork, so its parent is not us.
            argv = ["setsid", "-f", *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.proto = proto
        self.addr = addr

    def listening(self) -> bool:
        return bool(adopt.socket_inodes(self.proto, self.addr, self.port))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def holders() -> Iterator[Any]:
    made: list[Holder] = []

    def make(*args: Any, **kw: Any) -> Holder:
        h = Holder(*args, **kw)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.close()


def test_socket_inodes_finds_exactly_the_listening_tcp_and_bound_udp_socket() -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as connected:
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        assert adopt.socket_inodes("tcp", "127.0.0.1", port) == set()  # bound only: unlisted
        tcp.listen(1)
        assert adopt.socket_inodes("tcp", "127.0.0.1", port) == {os.fstat(tcp.fileno()).st_ino}
        assert adopt.socket_inodes("tcp", "0.0.0.0", port) == set()  # another address
        udp.bind(("127.0.0.1", 0))
        uport = udp.getsockname()[1]
        assert adopt.socket_inodes("udp", "127.0.0.1", uport) == {os.fstat(udp.fileno()).st_ino}
        assert adopt.socket_inodes("tcp", "127.0.0.1", uport) == set()  # another protocol
        connected.bind(("127.0.0.1", 0))
        connected.connect(("127.0.0.1", uport))
        cport = connected.getsockname()[1]
        assert adopt.socket_inodes("udp", "127.0.0.1", cport) == set()  # connected: no server


def test_socket_inodes_finds_ipv6_sockets_by_exact_address() -> None:
    with socket.socket(socket.AF_INET6) as tcp, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp, socket.socket() as tcp4:
        tcp.bind(("::1", 0))
        port = tcp.getsockname()[1]
        tcp.listen(1)
        assert adopt.socket_inodes("tcp", "::1", port) == {os.fstat(tcp.fileno()).st_ino}
        assert adopt.socket_inodes("tcp", "0:0::1", port) == {os.fstat(tcp.fileno()).st_ino}
        assert adopt.socket_inodes("tcp", "::", port) == set()  # another address
        tcp4.bind(("127.0.0.1", port))
        tcp4.listen(1)  # the same port over IPv4 is another socket
        assert adopt.socket_inodes("tcp", "127.0.0.1", port) == {os.fstat(tcp4.fileno()).st_ino}
        assert adopt.socket_inodes("tcp", "::1", port) == {os.fstat(tcp.fileno()).st_ino}
        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        udp.bind(("::", 0))
        uport = udp.getsockname()[1]
        assert adopt.socket_inodes("udp", "::", uport) == {os.fstat(udp.fileno()).st_ino}
        assert adopt.socket_inodes("udp", "0.0.0.0", uport) == set()


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_childs_ipv6_socket_is_taken_over_and_serves(holders: Any, proto: str) -> None:
    h = holders(proto, addr="::1")
    tree = adopt.CallerTree(os.getpid())
    assert adopt.adopt(proto, "127.0.0.1", h.port, tree) is None  # not that family's port
    sock = adopt.adopt(proto, "::1", h.port, tree)
    assert sock is not None and sock.family == socket.AF_INET6
    with sock:
        sock.settimeout(5)
        if proto == "tcp":
            with socket.create_connection(("::1", h.port), timeout=5) as client:
                conn, _peer = sock.accept()
                with conn:
                    client.sendall(b"ping")
                    assert conn.recv(4) == b"ping"
        else:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as peer:
                peer.sendto(b"datagram", ("::1", h.port))
                assert sock.recvfrom(100)[0] == b"datagram"
    assert h.listening()


def test_a_childs_listening_socket_is_taken_over_and_serves_connections(holders: Any) -> None:
    h = holders("tcp")
    sock = adopt.adopt("tcp", "127.0.0.1", h.port, adopt.CallerTree(os.getpid()))
    assert sock is not None
    with sock, socket.create_connection(("127.0.0.1", h.port), timeout=5) as client:
        sock.settimeout(5)
        conn, _peer = sock.accept()  # the child never accepts: our copy does
        with conn:
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
    # Closing our duplicate leaves the child's reservation in place.
    assert h.listening()


def test_a_childs_bound_only_tcp_socket_is_found_by_probing_and_made_to_listen(
        holders: Any) -> None:
    h = holders("tcp", listen=False)
    tree = adopt.CallerTree(os.getpid())
    assert adopt.adopt("tcp", "127.0.0.1", h.port, tree) is None  # invisible in /proc/net/tcp
    sock = adopt.adopt("tcp", "127.0.0.1", h.port, tree, probe_unlisted=True)
    assert sock is not None
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        socket.create_connection(("127.0.0.1", h.port), timeout=5).close()


def test_a_childs_udp_socket_is_taken_over(holders: Any) -> None:
    h = holders("udp")
    sock = adopt.adopt("udp", "127.0.0.1", h.port, adopt.CallerTree(os.getpid()))
    assert sock is not None
    with sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        sock.settimeout(5)
        peer.sendto(b"datagram", ("127.0.0.1", h.port))
        assert sock.recvfrom(100)[0] == b"datagram"


def test_a_socket_outside_the_callers_tree_is_never_taken(holders: Any) -> None:
    stranger = holders("tcp", detach=True)
    child = holders("tcp")
    tree = adopt.CallerTree(os.getpid())
    assert adopt.find_holder("tcp", "127.0.0.1", stranger.port, tree, probe_unlisted=True) \
        is None
    assert adopt.adopt("tcp", "127.0.0.1", stranger.port, tree) is None
    # The tree of a sibling (not an ancestor of the holder) does not reach it either,
    # while ours does.
    sibling = holders("udp")
    assert adopt.adopt("tcp", "127.0.0.1", child.port,
                       adopt.CallerTree(sibling.proc.pid)) is None
    found = adopt.find_holder("tcp", "127.0.0.1", child.port, tree)
    assert found is not None and found[0] == child.proc.pid


def test_a_caller_whose_pid_was_reused_owns_nothing(holders: Any) -> None:
    h = holders("tcp")
    start = process_start_time(os.getpid())
    assert start is not None
    stale = adopt.CallerTree(os.getpid(), start=start + 1)
    assert stale.members() == []
    assert adopt.adopt("tcp", "127.0.0.1", h.port, stale) is None


def test_a_descendant_stays_eligible_after_its_parent_exits(holders: Any) -> None:
    # conmon daemonizes away from podman: a holder seen in the tree once stays in it.
    h = holders("tcp")
    tree = adopt.CallerTree(os.getpid())
    assert h.proc.pid in tree.members()
    tree.pid = -1  # as if the caller had exited
    assert h.proc.pid in tree.members()
    assert adopt.find_holder("tcp", "127.0.0.1", h.port, tree) is not None


CID = "639dccf12c4919f6289ca7cde8507e3e398e333b6ff60039a35a1f0c54438965"


def test_the_containers_conmon_counts_though_never_seen_as_a_descendant(
        holders: Any, tmp_path: Any) -> None:
    # podman hands its reservation to conmon, which double-forks at once: the monitor is
    # re-parented to init within milliseconds, and a poll that missed podman's copy and
    # the middle process (a busy machine) never sees it as a descendant. The holder here
    # is such a monitor: a program named conmon, detached from us, with -c CONTAINERID.
    conmon = tmp_path / "conmon"
    shutil.copy(os.path.realpath(sys.executable), conmon)
    h = holders("tcp", detach=True, python=str(conmon), extra=("-c", CID))
    assert adopt.find_holder("tcp", "127.0.0.1", h.port, adopt.CallerTree(os.getpid())) is None
    other = adopt.CallerTree(os.getpid(), container_id=CID.replace("6", "7"))
    assert adopt.adopt("tcp", "127.0.0.1", h.port, other) is None  # another container's
    assert not other.monitor_seen
    tree = adopt.CallerTree(os.getpid(), container_id=CID)
    sock = adopt.adopt("tcp", "127.0.0.1", h.port, tree)
    assert sock is not None
    # The reservations are conmon's inherited descriptors: a port it does not hold now
    # is not reserved (enable_port_reservation = false) and the engine may bind it.
    assert tree.monitor_seen
    with sock, socket.create_connection(("127.0.0.1", h.port), timeout=5) as client:
        conn, _ = sock.accept()
        with conn:
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"


def test_a_stranger_naming_the_container_is_not_its_monitor(holders: Any) -> None:
    # Only a program called conmon counts; any other process with the same argv is a stranger.
    h = holders("tcp", detach=True, extra=("-c", CID))
    tree = adopt.CallerTree(os.getpid(), container_id=CID)
    assert adopt.adopt("tcp", "127.0.0.1", h.port, tree, probe_unlisted=True) is None


def test_only_a_rootful_podman_counts_as_reserving_ports() -> None:
    assert not adopt.caller_reserves_ports(os.getpid())
    assert not adopt.caller_reserves_ports(2 ** 22 + 1)  # no such process


# ---- HostForwarder serving a handed-over socket --------------------------------------

@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def test_forwarder_serves_an_adopted_listener_and_closes_only_its_copy(
        rig: Rig, holders: Any) -> None:
    h = holders("tcp")
    sock = adopt.adopt("tcp", "127.0.0.1", h.port, adopt.CallerTree(os.getpid()))
    assert sock is not None
    rig.fwd.add("tcp", "127.0.0.1", h.port, GUEST, GPORT, sock=sock)
    rig.know_guest()
    client = socket.create_connection(("127.0.0.1", h.port), timeout=5)
    try:
        syn = rig.wait_frame(lambda f: bool(f.haslayer("TCP") and f["TCP"].flags == "S"))
        assert syn["IP"].dst == GUEST and syn["TCP"].dport == GPORT
    finally:
        client.close()
    rig.fwd.remove("tcp", "127.0.0.1", h.port)
    assert sock.fileno() == -1  # ours is closed ...
    assert h.listening()  # ... the holder's reservation is not


def test_forwarder_refuses_a_socket_that_is_not_what_the_forward_says(rig: Rig) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match="not listening"):
            rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT, sock=s)
        s.listen(1)
        with pytest.raises(ValueError, match="bound to"):
            rig.fwd.add("tcp", "127.0.0.1", port + 1, GUEST, GPORT, sock=s)
        with pytest.raises(ValueError, match="not AF_INET/SOCK_DGRAM"):
            rig.fwd.add("udp", "127.0.0.1", port, GUEST, GPORT, sock=s)
    assert rig.fwd.forwards == {}


def test_forwarder_serves_an_adopted_ipv6_listener(holders: Any) -> None:
    from scapy.layers.inet6 import IPv6

    from tests.runtime.test_hostfwd import Rig6
    rig6 = Rig6()
    try:
        h = holders("tcp", addr="::1")
        sock = adopt.adopt("tcp", "::1", h.port, adopt.CallerTree(os.getpid()))
        assert sock is not None
        with pytest.raises(ValueError, match="bound to"):  # not the address it says
            rig6.fwd.add("tcp", "::", h.port, "fd00::100", GPORT, sock=sock)
        rig6.fwd.add("tcp", "::1", h.port, "fd00::100", GPORT, sock=sock)
        rig6.know_guest()
        with socket.create_connection(("::1", h.port), timeout=5):
            syn = rig6.wait_frame(lambda f: bool(f.haslayer("TCP") and f["TCP"].flags == "S"))
        assert (syn[IPv6].src, syn[IPv6].dst) == ("fd00::2", "fd00::100")
        rig6.fwd.remove("tcp", "::1", h.port)
        assert h.listening()  # the holder's reservation stays
    finally:
        rig6.close()


def test_forwarder_serves_an_adopted_udp_socket(rig: Rig, holders: Any) -> None:
    h = holders("udp")
    sock = adopt.adopt("udp", "127.0.0.1", h.port, adopt.CallerTree(os.getpid()))
    assert sock is not None
    rig.fwd.add("udp", "127.0.0.1", h.port, GUEST, GPORT, sock=sock)
    rig.know_guest()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.sendto(b"to the guest", ("127.0.0.1", h.port))
        frame = rig.wait_frame(lambda f: bool(f.haslayer("UDP") and f["UDP"].dport == GPORT))
    assert bytes(frame["UDP"].payload) == b"to the guest"


def test_an_ipv6_only_wildcard_forward_leaves_the_ipv4_port_to_a_reservation() -> None:
    # The CNI engine binds the IPv6 half of "every address" at ADD, before rootful podman
    # reserves the IPv4 port: a dual-stack "::" would take that port from podman.
    from tests.runtime.test_hostfwd import Rig6
    rig6 = Rig6()
    try:
        port = rig6.fwd.add("tcp", "::", 0, "fd00::100", GPORT, v6only=True)
        with socket.socket() as reservation:
            reservation.bind(("0.0.0.0", port))
            reservation.listen(1)
    finally:
        rig6.close()
