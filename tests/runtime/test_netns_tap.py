"""open_tap against real namespaces: the TAP appears where asked, configured, and carries frames.

Traffic in these tests goes only to the TAP inside namespaces the tests create.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyslirp.runtime import netns, tap
from pyslirp.runtime.tap import ConfigureSpec, TapError, TapHandle, open_tap
from pyslirp.stack.config import NetConfig
from pyslirp.wire import arp, ethernet, ipv4, udp, vnet
from pyslirp.wire.checksum import checksum, finish, partial_sum, pseudo_header_sum
from pyslirp.wire.errors import MalformedPacket
from tests import nsutil

pytestmark = pytest.mark.e2e

GUEST_MAC = bytes.fromhex("02aabbccdd01")
GW_MAC = bytes.fromhex("52550a000202")
GUEST_IP = ipv4.addr_from_str("10.0.2.100")
GW_IP = ipv4.addr_from_str("10.0.2.2")
CONFIGURE = ConfigureSpec.from_netconfig(NetConfig())


@pytest.fixture(autouse=True)
def _capable() -> None:
    nsutil.skip_unless_capable()


@pytest.fixture
def named_ns() -> Iterator[nsutil.NetNS]:
    with nsutil.NetNS("tap") as ns:
        yield ns


@pytest.fixture
def user_ns() -> Iterator[nsutil.UserNetNS]:
    with nsutil.UserNetNS("tapuser") as ns:
        yield ns


def _assert_configured(ns: nsutil.Namespace, handle: TapHandle, mtu: int) -> None:
    link = ns.link(handle.name)
    assert link is not None, f"{handle.name} not found in {ns}"
    assert link["mtu"] == mtu
    assert "UP" in link["flags"] and "LOWER_UP" in link["flags"]
    assert link["address"] == ethernet.mac_to_str(handle.mac)
    v4 = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
    assert v4 == [("10.0.2.100", 24)]
    lo = ns.link("lo")
    assert lo is not None and "UP" in lo["flags"]
    default = [r for r in ns.routes() if r["dst"] == "default"]
    assert [(r["gateway"], r["dev"]) for r in default] == [("10.0.2.2", handle.name)]


def _read_frame(fd: int, want: Callable[[bytes], bool], timeout: float = 10.0) -> bytes:
    """The first frame from the TAP that ``want`` accepts (IPv6 chatter etc. is skipped)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _ in range(1000):
        if not poller.poll(timeout * 1000):
            raise TimeoutError("no matching frame from the TAP")
        frame = os.read(fd, 65536)
        if want(frame):
            return frame
    raise AssertionError("too many unrelated frames")


def _is_ethertype(kind: int, hdr: int) -> Callable[[bytes], bool]:
    return lambda f: len(f) >= hdr + 14 and int.from_bytes(f[hdr + 12:hdr + 14], "big") == kind


def _trigger_udp(ns: nsutil.Namespace, payload: str = "hello") -> None:
    # bash's /dev/udp sends one datagram; the unresolved gateway makes the kernel ARP first.
    ns.run(["bash", "-c", f"echo -n {payload} > /dev/udp/10.0.2.2/9"])


def _arp_then_udp(ns: nsutil.Namespace, handle: TapHandle) -> tuple[bytes, memoryview]:
    """Make the namespace send UDP to the gateway; answer its ARP; return (ARP frame, UDP frame)."""
    hdr = vnet.HEADER_LEN if handle.vnet_hdr else 0
    _trigger_udp(ns)
    arp_frame = _read_frame(handle.fd, _is_ethertype(ethernet.ETHERTYPE_ARP, hdr))
    reply = (ethernet.header(handle.mac, GW_MAC, ethernet.ETHERTYPE_ARP)
             + arp.build(arp.OP_REPLY, GW_MAC, GW_IP, handle.mac, GUEST_IP))
    os.write(handle.fd, (vnet.PLAIN if handle.vnet_hdr else b"") + reply)
    udp_frame = _read_frame(handle.fd, _is_ethertype(ethernet.ETHERTYPE_IPV4, hdr))
    return arp_frame, memoryview(udp_frame)


# ---------------------------------------------------------------------------- open and configure


def test_path_netns_tap_is_created_configured_and_removed_on_close(named_ns: nsutil.NetNS) -> None:
    handle = open_tap(named_ns.path, "path", mtu=1500, configure=CONFIGURE, mac=GUEST_MAC)
    try:
        assert (handle.name, handle.vnet_hdr, handle.offload) == ("tap0", True, True)
        assert handle.mac == GUEST_MAC and handle.mtu == 1500
        assert not os.get_blocking(handle.fd) and not os.get_inheritable(handle.fd)
        _assert_configured(named_ns, handle, 1500)
        assert subprocess.run(["ip", "link", "show", "tap0"], capture_output=True).returncode != 0
    finally:
        handle.close()
    # Not persistent: the device goes with its last fd.
    nsutil.wait_for(lambda: named_ns.link("tap0") is None, what="tap0 to disappear")


def test_pid_target_in_its_own_user_namespace(user_ns: nsutil.UserNetNS) -> None:
    assert netns.pid_userns_differs(user_ns.pid)
    with open_tap(str(user_ns.pid), "pid", tapname="eth7", mtu=65520,
                  configure=CONFIGURE) as handle:
        assert (handle.name, handle.vnet_hdr, handle.offload) == ("eth7", True, True)
        assert handle.mtu == 65520
        _assert_configured(user_ns, handle, 65520)


def test_without_configure_the_tap_is_left_down_and_unaddressed(named_ns: nsutil.NetNS) -> None:
    with open_tap(named_ns.path, "path", mtu=9000) as handle:
        link = named_ns.link("tap0")
        assert link is not None and link["mtu"] == 9000
        assert "UP" not in link["flags"] and link["addr_info"] == []
        assert handle.mac == bytes.fromhex(link["address"].replace(":", ""))
        assert named_ns.routes() == []


def test_attaches_to_an_existing_persistent_tap(named_ns: nsutil.NetNS) -> None:
    named_ns.run(["ip", "tuntap", "add", "dev", "tapx", "mode", "tap"])
    with open_tap(named_ns.path, "path", tapname="tapx", configure=CONFIGURE) as handle:
        assert handle.name == "tapx" and handle.vnet_hdr
        _assert_configured(named_ns, handle, 1500)
    assert named_ns.link("tapx") is not None  # persistent: still there after we let go
    # A restarted pyslirp re-attaches and re-configures; our old route is no obstacle.
    with open_tap(named_ns.path, "path", tapname="tapx", configure=CONFIGURE) as handle:
        _assert_configured(named_ns, handle, 1500)


def test_configured_default_route_wins_over_an_existing_one(named_ns: nsutil.NetNS) -> None:
    # As with slirp4netns (same ioctl), ours goes in front of a default route already there.
    named_ns.run("ip link add veth0 type veth peer name veth1 && ip link set veth0 up && "
                 "ip link set veth1 up && ip addr add 198.18.0.1/24 dev veth0 && "
                 "ip route add default via 198.18.0.254")
    with open_tap(named_ns.path, "path", configure=CONFIGURE):
        chosen = named_ns.ip_json("route", "get", "192.0.2.1")  # a lookup; sends nothing
        assert (chosen[0]["gateway"], chosen[0]["dev"]) == ("10.0.2.2", "tap0")


def test_works_from_inside_a_running_uvloop_with_worker_threads(named_ns: nsutil.NetNS) -> None:
    # The runtime calls open_tap from its event loop, possibly with executor threads alive.
    uvloop = pytest.importorskip("uvloop")

    async def main() -> TapHandle:
        loop = asyncio.get_running_loop()
        busy = loop.run_in_executor(None, lambda: sum(range(3_000_000)))
        handle = open_tap(named_ns.path, "path", configure=CONFIGURE)
        await busy
        return handle

    with uvloop.run(main()) as handle:
        _assert_configured(named_ns, handle, 1500)


# ---------------------------------------------------------------------------- frames


def test_frames_carry_vnet_header_and_partial_checksum_with_offload(
        named_ns: nsutil.NetNS) -> None:
    with open_tap(named_ns.path, "path", configure=CONFIGURE, mac=GUEST_MAC) as handle:
        arp_frame, frame = _arp_then_udp(named_ns, handle)

        hdr = vnet.VnetHeader(memoryview(arp_frame))
        assert (hdr.flags, hdr.gso_type) == (0, vnet.GSO_NONE)
        eth = ethernet.EthernetFrame(memoryview(arp_frame)[vnet.HEADER_LEN:])
        assert (eth.dst, eth.src) == (ethernet.BROADCAST, GUEST_MAC)
        req = arp.ArpPacket(eth.payload)
        assert (req.op, req.sender_ip, req.target_ip) == (arp.OP_REQUEST, GUEST_IP, GW_IP)

        # Our ARP reply was accepted: the queued datagram comes out, addressed to our MAC,
        # with only the pseudo-header sum in it (the kernel left the checksum to us).
        hdr = vnet.VnetHeader(frame)
        assert hdr.flags & vnet.F_NEEDS_CSUM
        assert (hdr.csum_start, hdr.csum_offset) == (14 + 20, 6)
        eth = ethernet.EthernetFrame(frame[vnet.HEADER_LEN:])
        assert eth.dst == GW_MAC
        ip = ipv4.Ipv4Packet(eth.payload)
        dgram = udp.UdpDatagram(ip.payload)
        assert (ip.src, ip.dst, dgram.dst_port, bytes(dgram.payload)) == (
            GUEST_IP, GW_IP, 9, b"hello")
        with pytest.raises(MalformedPacket):
            udp.UdpDatagram(ip.payload, ip.src, ip.dst, verify_checksum=True)
        # Finishing the sum from csum_start, as the header asks, gives a valid datagram.
        fixed = bytearray(frame[vnet.HEADER_LEN:])
        start = hdr.csum_start
        csum = finish(partial_sum(fixed[start:]))
        fixed[start + hdr.csum_offset:start + hdr.csum_offset + 2] = csum.to_bytes(2, "big")
        ip = ipv4.Ipv4Packet(memoryview(fixed)[14:])
        udp.UdpDatagram(ip.payload, ip.src, ip.dst, verify_checksum=True)


_TCP = struct.Struct("!HHIIBBHHH")
TCP_SYN, TCP_ACK = 0x02, 0x10


def _tcp_frame(src_port: int, dst_port: int, seq: int, ack: int, flags: int,
               options: bytes = b"", window: int = 65535) -> bytes:
    """A gateway-to-guest TCP segment with complete checksums (vnet header included)."""
    seg = bytearray(_TCP.size + len(options))
    _TCP.pack_into(seg, 0, src_port, dst_port, seq, ack, (len(seg) // 4) << 4, flags, window, 0,
                   0)
    seg[_TCP.size:] = options
    seg[16:18] = checksum(seg, pseudo_header_sum(GW_IP, GUEST_IP, 6, len(seg))).to_bytes(2, "big")
    ip = bytearray(20)
    ipv4.build_header(ip, 0, GW_IP, GUEST_IP, ipv4.PROTO_TCP, len(seg))
    return (vnet.PLAIN + ethernet.header(GUEST_MAC, GW_MAC, ethernet.ETHERTYPE_IPV4)
            + bytes(ip) + bytes(seg))


def _tcp_of(frame: bytes) -> tuple[int, int, int, int] | None:
    """(src port, seq, flags, payload length) of a guest TCP frame, else None."""
    if int.from_bytes(frame[vnet.HEADER_LEN + 12:vnet.HEADER_LEN + 14], "big") != 0x0800:
        return None
    ip = ipv4.Ipv4Packet(memoryview(frame)[vnet.HEADER_LEN + 14:], verify_checksum=False)
    if ip.proto != ipv4.PROTO_TCP:
        return None
    sport, _dport, seq, _ack, off, flags, *_ = _TCP.unpack_from(ip.payload)
    return sport, seq, flags, len(ip.payload) - (off >> 4) * 4


def test_offload_delivers_tcp_super_frames(named_ns: nsutil.NetNS) -> None:
    # With TSO on, the namespace's TCP hands us segments bigger than the MTU, described
    # by the vnet header; this is what makes a Python stack fast (docs/architecture.md).
    with open_tap(named_ns.path, "path", configure=CONFIGURE, mac=GUEST_MAC) as handle:
        named_ns.popen(["bash", "-c", "exec 3<>/dev/tcp/10.0.2.2/5000; "
                                      "head -c 200000 /dev/zero >&3; sleep 30"])
        arp_req = arp.ArpPacket(memoryview(_read_frame(
            handle.fd, _is_ethertype(ethernet.ETHERTYPE_ARP, vnet.HEADER_LEN)))[26:])
        assert arp_req.target_ip == GW_IP
        os.write(handle.fd, vnet.PLAIN + ethernet.header(GUEST_MAC, GW_MAC, ethernet.ETHERTYPE_ARP)
                 + arp.build(arp.OP_REPLY, GW_MAC, GW_IP, GUEST_MAC, GUEST_IP))
        syn = _tcp_of(_read_frame(handle.fd, lambda f: (_tcp_of(f) or (0, 0, 0, 0))[2] == TCP_SYN))
        assert syn is not None
        sport, seq = syn[0], syn[1]
        mss = b"\x02\x04" + (1460).to_bytes(2, "big")
        os.write(handle.fd, _tcp_frame(5000, sport, 1000, seq + 1, TCP_SYN | TCP_ACK, mss))
        data = _read_frame(handle.fd, lambda f: (_tcp_of(f) or (0, 0, 0, 0))[3] > 1460)
        hdr = vnet.VnetHeader(memoryview(data))
        assert (hdr.gso_type & ~vnet.GSO_ECN, hdr.gso_size) == (vnet.GSO_TCPV4, 1460)
        assert hdr.flags & vnet.F_NEEDS_CSUM and (hdr.csum_start, hdr.csum_offset) == (34, 16)
        assert len(data) > vnet.HEADER_LEN + 1514


def _refuse(monkeypatch: pytest.MonkeyPatch, refuse: Callable[[int, Any], bool]) -> None:
    """Make the (forked) TAP helper see a kernel that rejects some ioctls with EINVAL."""
    real = tap._ioctl

    def fake(fd: Any, request: int, arg: Any) -> Any:
        if refuse(request, arg):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, request, arg)

    monkeypatch.setattr(tap, "_ioctl", fake)


def test_without_offloads_frames_are_plain_with_full_checksums(
        named_ns: nsutil.NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse(monkeypatch, lambda req, arg: req == tap.TUNSETOFFLOAD and arg != 0)
    with open_tap(named_ns.path, "path", configure=CONFIGURE) as handle:
        assert (handle.vnet_hdr, handle.offload, handle.uso) == (True, False, False)
        _, frame = _arp_then_udp(named_ns, handle)
        assert vnet.VnetHeader(frame).flags & vnet.F_NEEDS_CSUM == 0
        ip = ipv4.Ipv4Packet(frame[vnet.HEADER_LEN + 14:])
        udp.UdpDatagram(ip.payload, ip.src, ip.dst, verify_checksum=True)  # raises if partial


def test_uso_refused_keeps_tso(named_ns: nsutil.NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse(monkeypatch, lambda req, arg: req == tap.TUNSETOFFLOAD and bool(arg & tap.TUN_F_USO4))
    with open_tap(named_ns.path, "path") as handle:
        assert (handle.vnet_hdr, handle.offload, handle.uso) == (True, True, False)


@pytest.mark.parametrize(("want_vnet", "want_offload"), [(True, False), (False, True)])
def test_caller_can_turn_off_header_or_offloads(named_ns: nsutil.NetNS, want_vnet: bool,
                                                want_offload: bool) -> None:
    with open_tap(named_ns.path, "path", configure=CONFIGURE, mac=GUEST_MAC,
                  vnet_hdr=want_vnet, offload=want_offload) as handle:
        assert (handle.vnet_hdr, handle.offload, handle.uso) == (want_vnet, False, False)
        _, frame = _arp_then_udp(named_ns, handle)
        eth = ethernet.EthernetFrame(frame[vnet.HEADER_LEN if want_vnet else 0:])
        ip = ipv4.Ipv4Packet(eth.payload)
        udp.UdpDatagram(ip.payload, ip.src, ip.dst, verify_checksum=True)  # complete checksum


def test_without_vnet_header_frames_start_with_ethernet(
        named_ns: nsutil.NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse(monkeypatch, lambda req, arg: req == tap.TUNSETVNETHDRSZ)
    with open_tap(named_ns.path, "path", configure=CONFIGURE, mac=GUEST_MAC) as handle:
        assert (handle.vnet_hdr, handle.offload) == (False, False)
        _assert_configured(named_ns, handle, 1500)
        arp_frame, frame = _arp_then_udp(named_ns, handle)
        assert ethernet.EthernetFrame(memoryview(arp_frame)).src == GUEST_MAC
        eth = ethernet.EthernetFrame(frame)
        assert eth.dst == GW_MAC
        ip = ipv4.Ipv4Packet(eth.payload)
        assert bytes(udp.UdpDatagram(ip.payload, ip.src, ip.dst, True).payload) == b"hello"


# ---------------------------------------------------------------------------- errors


def test_missing_netns_path_is_a_clear_error() -> None:
    with pytest.raises(TapError, match=r"^netns path /nonexistent/ns does not exist$"):
        open_tap("/nonexistent/ns", "path")


def test_nonexistent_pid_is_a_clear_error() -> None:
    with pytest.raises(TapError, match=r"^no process with pid 2147483646$"):
        open_tap("2147483646", "pid")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target": "12ab", "netns_type": "pid"}, "invalid pid '12ab'"),
    ({"target": "/proc/self/ns/net", "netns_type": "cgroup"}, "invalid netns type 'cgroup'"),
    ({"target": "/proc/self/ns/net", "netns_type": "path", "tapname": "x" * 16},
     "invalid TAP name"),
    ({"target": "/proc/self/ns/net", "netns_type": "path", "mtu": 65522}, "MTU 65522"),
    ({"target": "/proc/self/ns/net", "netns_type": "path", "userns_path": "/nope"},
     "userns path /nope does not exist"),
])
def test_bad_arguments_are_rejected_before_forking(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TapError, match=message):
        open_tap(**kwargs)


def test_a_path_that_is_not_a_netns_fails_in_the_helper(tmp_path: Any) -> None:
    bogus = tmp_path / "not-a-netns"
    bogus.write_text("")
    with pytest.raises(TapError, match=rf"^cannot join network namespace {bogus}: "):
        open_tap(str(bogus), "path")


def test_userns_path_is_joined_first(named_ns: nsutil.NetNS, user_ns: nsutil.UserNetNS) -> None:
    # Once inside the other user namespace we hold no rights over a netns owned by ours:
    # the failure proves the join happened, and its message says which step failed.
    with pytest.raises(TapError, match=rf"^cannot join network namespace {named_ns.path}: "
                                       r"Operation not permitted \(it belongs to a user "
                                       r"namespace outside the one joined\)$"):
        open_tap(named_ns.path, "path", userns_path=user_ns.userns_path)


def test_unprivileged_caller_is_told_what_is_missing() -> None:
    # As nobody, with a namespace nobody made: by path without its user namespace, the
    # join is refused with a hint; by pid, the user namespace is joined automatically and
    # the next obstacle is this machine's root-only /dev/net/tun.
    code = textwrap.dedent("""
        import os, subprocess, time
        from pyslirp.runtime.tap import TapError, open_tap
        holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net",
                                   "sleep", "60"])
        try:
            # Until unshare has written the maps (gid last), joining would make us nobody.
            ours = os.stat("/proc/self/ns/net").st_ino
            while (os.stat(f"/proc/{holder.pid}/ns/net").st_ino == ours
                   or not open(f"/proc/{holder.pid}/gid_map").read().strip()):
                time.sleep(0.005)
            for target, kind in ((f"/proc/{holder.pid}/ns/net", "path"),
                                 (str(holder.pid), "pid")):
                try:
                    open_tap(target, kind)
                except TapError as exc:
                    print(exc)
        finally:
            holder.kill()
    """)
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    by_path, by_pid = proc.stdout.splitlines()
    assert by_path.endswith(": Operation not permitted (it belongs to another user namespace: "
                            "pass that one's path as the user namespace to join)")
    assert by_pid == "cannot open /dev/net/tun: Permission denied"


def test_device_errors_name_the_device(named_ns: nsutil.NetNS) -> None:
    # A name taken by a device of another kind cannot become a TAP.
    named_ns.run(["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"])
    with pytest.raises(TapError, match=r"^cannot create TAP device veth0: "):
        open_tap(named_ns.path, "path", tapname="veth0")


def _sleep_forever(*_args: object) -> None:
    time.sleep(600)


def _die_quietly(*_args: object) -> None:
    os._exit(3)


def _blow_up(*_args: object) -> None:
    raise RuntimeError("boom")


@pytest.mark.parametrize(("child_open", "message"), [
    (_sleep_forever, r"^TAP helper process did not answer within 0.5 s$"),
    (_die_quietly, r"^TAP helper process died without an answer \(exit status 3\)$"),
    (_blow_up, r"^TAP helper failed: RuntimeError: boom$"),
])
def test_a_misbehaving_helper_becomes_an_error_not_a_hang(
        named_ns: nsutil.NetNS, monkeypatch: pytest.MonkeyPatch,
        child_open: Callable[..., None], message: str) -> None:
    monkeypatch.setattr(tap, "_child_open", child_open)
    with pytest.raises(TapError, match=message):
        open_tap(named_ns.path, "path", timeout=0.5)


# ---------------------------------------------------------------------------- nsutil itself


def test_nsutil_namespaces_leave_nothing_behind() -> None:
    ns = nsutil.NetNS("cleanup")
    sleeper = ns.popen(["sleep", "60"])
    uns = nsutil.UserNetNS("cleanup")
    assert os.path.exists(ns.path) and os.path.exists(uns.path)
    ns.close()
    uns.close()
    assert not os.path.exists(ns.path)
    assert sleeper.poll() is not None
    assert not os.path.exists(f"/proc/{uns.pid}")


def test_nsutil_cleanup_stale_removes_only_dead_owners() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{nsutil.PREFIX}{dead.pid}-0-stale"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    with nsutil.NetNS("alive") as alive:
        removed = nsutil.cleanup_stale()
        assert stale in removed and alive.name not in removed
        assert os.path.exists(alive.path) and not os.path.exists(f"/run/netns/{stale}")


def test_nsutil_veth_joins_two_namespaces() -> None:
    with nsutil.NetNS("va") as a, nsutil.NetNS("vb") as b:
        nsutil.veth(a, "va0", b, "vb0", "198.18.0.1/24", "198.18.0.2/24")
        link = b.link("vb0")
        assert link is not None and "UP" in link["flags"]
        assert [x["local"] for x in link["addr_info"] if x["family"] == "inet"] == ["198.18.0.2"]
        # A lookup (sends nothing): a reaches b's address over the pair.
        assert a.ip_json("route", "get", "198.18.0.2")[0]["dev"] == "va0"
        # Traffic between namespaces we made: b answers a TCP connect from a.
        b.popen([sys.executable, "-c", "import socket\n"
                 "s = socket.create_server(('198.18.0.2', 7000))\n"
                 "c, _ = s.accept(); c.sendall(b'over the veth')"])
        got = a.run(["bash", "-c", "for i in $(seq 200); do "
                     "exec 3<>/dev/tcp/198.18.0.2/7000 2>/dev/null && break; sleep 0.05; "
                     "done; cat <&3"]).stdout
        assert got == "over the veth"


# ---------------------------------------------------------------------------- helper hygiene

_OPENAT = {"x86_64": 257, "aarch64": 56}
_NOBODY = 65534


def _children_of(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    # "pid (comm) state ppid ...": comm may hold spaces, so split after ')'
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    return found


def _blocked_in_openat(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] == str(_OPENAT[os.uname().machine])
    except (OSError, IndexError):
        return False


def _wait_for_blocked_helper(worker: subprocess.Popen[str], deadline: float) -> int:
    while time.monotonic() < deadline:
        assert worker.poll() is None, worker.communicate()
        for pid in _children_of(worker.pid):
            if _blocked_in_openat(pid):
                return pid
        time.sleep(0.01)
    raise AssertionError("the TAP helper never reached its first open")


def _same_uid_can_list_fds(pid: int) -> bool:
    """Whether a process of uid nobody (the helper's own uid here) may read /proc/PID/fd."""
    child = os.fork()
    if child == 0:  # pragma: no cover - forked
        code = 2
        try:
            os.setgroups([])
            os.setresgid(_NOBODY, _NOBODY, _NOBODY)
            os.setresuid(_NOBODY, _NOBODY, _NOBODY)
            os.listdir(f"/proc/{pid}/fd")
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"probe failed (exit {code})"
    return code == 0


@pytest.mark.skipif(os.uname().machine not in _OPENAT, reason="openat number unknown here")
def test_the_helper_keeps_no_parent_fds_and_cannot_be_inspected_by_its_uid() -> None:
    # An unprivileged engine (uid nobody, dumpable like any process that did not change
    # its ids) holds an fd that stands for another container's TAP. It asks for a TAP in
    # a "netns" that is a FIFO: the helper then blocks in its very first open, after
    # everything it does to protect itself, and can be looked at from outside.
    shared = tempfile.mkdtemp(prefix="pyslirp-helper-")
    fifo = os.path.join(shared, "netns")
    try:
        os.chmod(shared, 0o755)
        os.mkfifo(fifo, 0o666)
        code = textwrap.dedent(f"""
            import ctypes, os
            from pyslirp.runtime.tap import TapError, open_tap
            secret = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            os.setgroups([])
            os.setresgid({_NOBODY}, {_NOBODY}, {_NOBODY})
            os.setresuid({_NOBODY}, {_NOBODY}, {_NOBODY})
            # Changing ids made us non-dumpable; a process started as nobody is dumpable.
            assert ctypes.CDLL(None, use_errno=True).prctl(4, 1, 0, 0, 0) == 0
            print(secret, flush=True)
            try:
                open_tap({fifo!r}, "path", timeout=60)
            except TapError as exc:
                print(exc, flush=True)
        """)
        worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True, cwd=os.getcwd())
        try:
            assert worker.stdout is not None
            secret = int(worker.stdout.readline())
            helper = _wait_for_blocked_helper(worker, time.monotonic() + 30)
            fds = {int(n): os.readlink(f"/proc/{helper}/fd/{n}")
                   for n in os.listdir(f"/proc/{helper}/fd")}
            extra = {n: what for n, what in fds.items() if n > 2}
            assert secret not in fds
            assert len(extra) == 1 and next(iter(extra.values())).startswith("socket:"), fds
            # Precondition: the engine itself is open to its uid; its helper is not.
            assert os.stat(f"/proc/{worker.pid}/fd").st_uid == _NOBODY
            assert _same_uid_can_list_fds(worker.pid)
            assert os.stat(f"/proc/{helper}/fd").st_uid == 0
            assert not _same_uid_can_list_fds(helper)
            # Release it: it gets a FIFO where a namespace should be and says so.
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            out, _ = worker.communicate(timeout=30)
            assert out.startswith(f"cannot join network namespace {fifo}: "), out
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
