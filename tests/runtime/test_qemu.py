"""QEMU socket back ends: the framing QEMU's -netdev stream/dgram speak, over real Unix sockets.

The stack behind the link is the real one; ARP for the gateway is the probe,
since every ARP request for 10.0.2.2 gets exactly one reply frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from pyslirp.runtime.attachment import Attachment
from pyslirp.runtime.qemu import (
    MAX_FRAME,
    QemuDgramDevice,
    QemuStreamDevice,
    bind_unix,
)
from pyslirp.stack.config import NetConfig
from tests.netutil import free_port
from tests.nsutil import wait_for

GUEST_MAC = "02:00:00:00:00:01"
OUR_MAC = "52:55:0a:00:02:02"


def arp_request(sender_ip: str = "10.0.2.15", target: str = "10.0.2.2") -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(op=1, hwsrc=GUEST_MAC, psrc=sender_ip, pdst=target))


def framed(frame: bytes) -> bytes:
    return struct.pack("!I", len(frame)) + frame


def is_arp_reply(frame: bytes, to_ip: str = "10.0.2.15") -> bool:
    eth = Ether(frame)
    return (ARP in eth and eth[ARP].op == 2 and eth[ARP].psrc == "10.0.2.2"
            and eth[ARP].pdst == to_ip and eth.src == OUR_MAC)


class StreamReader:
    """The QEMU end of a stream: reads length-prefixed frames with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def frame(self, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack_from("!I", self.buf)
                assert 14 <= n <= MAX_FRAME, f"corrupt framing: length {n}"
                if len(self.buf) >= 4 + n:
                    frame, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from pyslirp")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("pyslirp closed the connection")
            self.buf += chunk


class LoopThread:
    """An event loop in a thread serving one attachment; the test plays QEMU."""

    def __init__(self, factory: Callable[[asyncio.AbstractEventLoop], Attachment]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.attachment: Any = self.call(lambda: factory(self.loop))

    def call(self, fn: Callable[[], Any]) -> Any:
        done: asyncio.Future[Any] = asyncio.run_coroutine_threadsafe(self._run(fn), self.loop)
        return done.result(timeout=10)

    @staticmethod
    async def _run(fn: Callable[[], Any]) -> Any:
        return fn()

    def counters(self) -> dict[str, int]:
        return dict(self.call(lambda: self.attachment.stack.counters))

    def close(self) -> None:
        self.call(self.attachment.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def plain_config() -> NetConfig:
    return NetConfig(vnet_hdr=False, offload=False, disable_dns=True)


@pytest.fixture
def stream_link(tmp_path: Path) -> Iterator[tuple[LoopThread, str]]:
    path = str(tmp_path / "qemu.sock")
    listener = bind_unix(path, socket.SOCK_STREAM)
    server = LoopThread(lambda loop: Attachment(loop, QemuStreamDevice(listener.fileno()),
                                                plain_config()))
    try:
        yield server, path
    finally:
        server.close()
        listener.close()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def test_frame_split_into_single_bytes_is_reassembled(stream_link: tuple[LoopThread, str]) -> None:
    server, path = stream_link
    with connect(path) as qemu:
        for byte in framed(arp_request()):
            qemu.send(bytes([byte]))
        assert is_arp_reply(StreamReader(qemu).frame())


def test_many_frames_in_one_write_each_answered(stream_link: tuple[LoopThread, str]) -> None:
    server, path = stream_link
    with connect(path) as qemu:
        ips = [f"10.0.2.{i}" for i in range(15, 45)]
        qemu.sendall(b"".join(framed(arp_request(ip)) for ip in ips))
        reader = StreamReader(qemu)
        assert [Ether(reader.frame())[ARP].pdst for _ in ips] == ips


def test_runt_frame_is_counted_and_framing_survives(stream_link: tuple[LoopThread, str]) -> None:
    server, path = stream_link
    with connect(path) as qemu:
        qemu.sendall(framed(b"\x01\x02\x03") + framed(b"") + framed(arp_request()))
        assert is_arp_reply(StreamReader(qemu).frame())
    assert server.counters()["drop.rx.runt"] == 2


def test_bad_length_drops_the_connection_and_qemu_can_reconnect(
        stream_link: tuple[LoopThread, str], caplog: pytest.LogCaptureFixture) -> None:
    server, path = stream_link
    with connect(path) as qemu:
        qemu.sendall(struct.pack("!I", MAX_FRAME + 1) + b"\0" * 64)
        qemu.settimeout(5)
        assert qemu.recv(100) == b""  # we hung up
    assert "out of sync" in caplog.text and str(MAX_FRAME + 1) in caplog.text
    with connect(path) as qemu:
        qemu.sendall(framed(arp_request()))
        assert is_arp_reply(StreamReader(qemu).frame())


def test_largest_frame_is_accepted(stream_link: tuple[LoopThread, str]) -> None:
    server, path = stream_link
    big = arp_request() + b"\0" * (MAX_FRAME - len(arp_request()))
    with connect(path) as qemu:
        qemu.sendall(framed(big) + framed(arp_request("10.0.2.16")))
        reader = StreamReader(qemu)
        assert is_arp_reply(reader.frame(), to_ip="10.0.2.15")
        assert is_arp_reply(reader.frame(), to_ip="10.0.2.16")


def test_new_connection_replaces_the_old_one(stream_link: tuple[LoopThread, str]) -> None:
    server, path = stream_link
    old = connect(path)
    old.sendall(framed(arp_request()))
    assert is_arp_reply(StreamReader(old).frame())
    with connect(path) as new:
        new.sendall(framed(arp_request("10.0.2.16")))
        assert is_arp_reply(StreamReader(new).frame(), to_ip="10.0.2.16")
    old.settimeout(5)
    assert old.recv(100) == b""
    old.close()
    assert server.call(lambda: server.attachment.device.connections) == 2


def test_frames_while_nobody_is_connected_are_counted(stream_link: tuple[LoopThread, str]) -> None:
    server, path = stream_link
    server.call(lambda: server.attachment.stack.resolve_guest(bytes([10, 0, 2, 15])))
    assert server.counters()["drop.tx.no_peer"] == 1


def test_slow_reader_never_sees_a_cut_frame(stream_link: tuple[LoopThread, str]) -> None:
    """A full socket buffer holds frames back whole; none is ever sent in part."""
    server, path = stream_link
    n = 3000
    with connect(path) as qemu:
        qemu.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server.call(lambda: server.attachment.device._conn.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096))
        for i in range(0, n, 100):
            qemu.sendall(b"".join(framed(arp_request(f"10.0.{j // 250}.{j % 250 + 1}"))
                                  for j in range(i, i + 100)))
        assert server.call(lambda: server.attachment.device._out_bytes) > 0  # really held back
        reader = StreamReader(qemu)
        got = [Ether(reader.frame())[ARP].pdst for _ in range(n)]
    assert got == [f"10.0.{j // 250}.{j % 250 + 1}" for j in range(n)]


def test_plain_frames_only() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="plain frames"):
            Attachment(loop, QemuStreamDevice(0), NetConfig())
    finally:
        loop.close()


def test_bind_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        bind_unix(str(path), socket.SOCK_STREAM)
    assert path.read_text() == "precious"


def test_bind_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    bind_unix(path, socket.SOCK_STREAM).close()  # left behind, as by a killed pyslirp
    with bind_unix(path, socket.SOCK_STREAM), connect(path):
        pass


class DgramLink:
    """Our bound -netdev dgram socket served in a loop thread, and the test as QEMU."""

    def __init__(self, tmp_path: Path, config: NetConfig) -> None:
        self.path = str(tmp_path / "pyslirp.sock")
        #: The launcher's socket (the device serves a duplicate of it).
        self.sock = bind_unix(self.path, socket.SOCK_DGRAM)
        self.server = LoopThread(lambda loop: Attachment(
            loop, QemuDgramDevice(self.sock.fileno()), config))
        self.qemu = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.qemu.bind(str(tmp_path / "qemu.sock"))
        self.qemu.settimeout(5)
        self._served = True

    def stop_serving(self) -> None:
        if self._served:
            self._served = False
            self.qemu.close()
            self.server.close()

    def close(self) -> None:
        self.stop_serving()
        self.sock.close()


def test_dgram_one_frame_per_datagram_answered_to_the_sender(tmp_path: Path) -> None:
    link = DgramLink(tmp_path, plain_config())
    qemu, path, server = link.qemu, link.path, link.server
    try:
        qemu.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_FRAME)
        qemu.sendto(arp_request(), path)
        qemu.sendto(b"\0" * 10, path)
        qemu.sendto(arp_request("10.0.2.17") + b"\0" * MAX_FRAME, path)  # too big to be a frame
        qemu.sendto(arp_request("10.0.2.16"), path)
        assert is_arp_reply(qemu.recv(MAX_FRAME))
        assert is_arp_reply(qemu.recv(MAX_FRAME), to_ip="10.0.2.16")
        counters = server.counters()
        assert counters["drop.rx.runt"] == 1 and counters["drop.rx.too_big"] == 1
        # QEMU restarted: its socket file is gone; replies are dropped, not an error.
        os.unlink(str(tmp_path / "qemu.sock"))
        server.call(lambda: server.attachment.stack.resolve_guest(bytes([10, 0, 2, 15])))
        assert server.call(lambda: server.attachment.device.peer) is None
    finally:
        link.close()


def _filter_length(sock: socket.socket) -> int:
    """Instructions of the socket filter on ``sock`` (SO_GET_FILTER; 0: none). (The
    kernel returns the count of instructions as the length of what it copied.)"""
    return len(sock.getsockopt(socket.SOL_SOCKET, 26, 1024))


def _flood(qemu: socket.socket, path: str, count: int, first: int = 0) -> None:
    """``count`` datagrams from the VM's UDP port 41000 to ever new gateway ports."""
    frame = bytearray(bytes(Ether(src=GUEST_MAC, dst=OUR_MAC)
                            / IP(src="10.0.2.15", dst="10.0.2.2")
                            / UDP(sport=41000, chksum=0) / (b"x" * 64)))
    dport_at = len(frame) - 64 - 6
    for n in range(first, first + count):
        frame[dport_at:dport_at + 2] = (1024 + n % 60000).to_bytes(2, "big")
        qemu.sendto(frame, path)


def _flood_until_filtered(qemu: socket.socket, path: str, sock: socket.socket) -> None:
    sent = 0
    while not _filter_length(sock) and sent < 2_000_000:
        _flood(qemu, path, 1000, sent)
        sent += 1000
    assert _filter_length(sock) > 0, f"no filter after {sent} datagrams"


def _flood_config() -> NetConfig:
    return NetConfig(vnet_hdr=False, offload=False, disable_dns=True, new_flow_rate=200.0,
                     new_flow_burst=200)


def test_dgram_flood_is_dropped_by_a_socket_filter_until_it_stops(tmp_path: Path) -> None:
    """A VM flooding from one UDP socket over -netdev dgram: a socket filter on our
    socket drops most of it in the kernel (counted as an estimate), and comes off once
    the flood stops, also from the socket QEMU's launcher handed us."""
    link = DgramLink(tmp_path, _flood_config())
    qemu, path, sock, server = link.qemu, link.path, link.sock, link.server
    try:
        qemu.sendto(arp_request(), path)
        assert is_arp_reply(qemu.recv(MAX_FRAME))
        _flood_until_filtered(qemu, path, sock)
        _flood(qemu, path, 20000)
        # The flood stopped: the filter comes off within a few reviews.
        wait_for(lambda: _filter_length(sock) == 0, timeout=10, what="the filter to come off")
        counters = server.counters()
        assert counters["udp.flood_filter.engaged"] >= 1
        assert counters["drop.udp.flood_filtered"] > 0
        # Still served. (What we sent during the flood, ICMP errors for its closed ports,
        # filled this end's queue: read it first, or the reply is dropped as a full
        # queue drops any frame.)
        qemu.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                qemu.recv(MAX_FRAME)
        qemu.settimeout(5)
        qemu.sendto(arp_request("10.0.2.16"), path)
        while not is_arp_reply(qemu.recv(MAX_FRAME), to_ip="10.0.2.16"):
            pass
        link.stop_serving()
        assert _filter_length(sock) == 0
    finally:
        link.close()


def test_a_dgram_link_closed_mid_flood_leaves_the_socket_unfiltered(tmp_path: Path) -> None:
    """The socket is the launcher's too (we serve a duplicate): closing the link in the
    middle of a flood takes our filter off it."""
    link = DgramLink(tmp_path, _flood_config())
    try:
        _flood_until_filtered(link.qemu, link.path, link.sock)
        link.stop_serving()
        assert _filter_length(link.sock) == 0
    finally:
        link.close()


def test_cli_target_types(tmp_path: Path) -> None:
    from pyslirp import cli

    opts = cli.parse_args(["--target-type=qemu-stream", "--mtu=9000", "/run/vm.sock"])
    assert (opts.target_type, opts.target, opts.mtu) == ("qemu-stream", "/run/vm.sock", 9000)
    assert cli.parse_args(["--target-type", "qemu-dgram", "x"]).target_type == "qemu-dgram"
    assert cli.parse_args(["--target-type=netns", "123"]).pid == 123
    assert cli.parse_args(["123"]).target_type == "netns"


@pytest.mark.parametrize(("argv", "message"), [
    (["--target-type=bess", "x"], "--target-type must be one of netns, qemu-stream, qemu-dgram"),
    (["--target-type=qemu-stream"], "missing SOCKET argument for --target-type=qemu-stream"),
    (["--target-type=qemu-stream", "a", "b"], "takes one SOCKET argument, not also 'b'"),
    (["--target-type=qemu-stream", "-c", "a"], "--configure and --macaddress apply only to"),
    (["--target-type=qemu-dgram", "--netns-type=path", "a"],
     "--netns-type and --userns-path apply only to --target-type=netns"),
])
def test_cli_target_type_errors(argv: list[str], message: str) -> None:
    from pyslirp import cli

    with pytest.raises(cli.UsageError, match=message.replace("-", r"\-")):
        cli.parse_args(argv)


def test_pyslirp_serves_qemu_stream_until_sigterm(tmp_path: Path) -> None:
    """The real command: ready fd, ARP answered, API socket, SIGTERM exits 0, socket removed."""
    import signal
    import subprocess
    import sys

    path, api = str(tmp_path / "vm.sock"), str(tmp_path / "api.sock")
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyslirp", "--target-type=qemu-stream", f"--ready-fd={ready_w}",
         "--dns-upstream=127.0.0.1:9", "--pcap", str(tmp_path / "vm.pcap"), "--cidr=10.9.8.0/24",
         f"--api-socket={api}", path],
        pass_fds=(ready_w,), stderr=subprocess.PIPE, text=True)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        with connect(path) as qemu:
            qemu.sendall(framed(arp_request("10.9.8.15", "10.9.8.2")))
            reply = Ether(StreamReader(qemu).frame())
            assert reply[ARP].op == 2 and reply[ARP].psrc == "10.9.8.2"
        # A forward without guest_addr goes to the VM's DHCP address, not network + 100.
        from pyslirp.kubevirt.backends import api_request

        added = api_request(api, {"execute": "add_hostfwd", "arguments": {
            "proto": "tcp", "host_addr": "127.0.0.1", "host_port": free_port(),
            "guest_port": 80}})
        assert "return" in added, added
        listed = api_request(api, {"execute": "list_hostfwd"})
        assert [e["guest_addr"] for e in listed["entries"]] == ["10.9.8.15"]  # type: ignore
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    finally:
        os.close(ready_r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "QEMU connected" in err
    assert not os.path.exists(path)
    assert (tmp_path / "vm.pcap").stat().st_size > 24 + 2 * 16  # both frames captured


# --- --enable-sandbox / --enable-seccomp ------------------------------------------------

def _start_qemu_backend(tmp_path: Path, kind: str, *flags: str) -> tuple[Any, int, str, str]:
    import subprocess
    import sys

    path, api = str(tmp_path / "vm.sock"), str(tmp_path / "api.sock")
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyslirp", f"--target-type={kind}", f"--ready-fd={ready_w}",
         "--dns-upstream=127.0.0.1:9", f"--api-socket={api}", *flags, path],
        pass_fds=(ready_w,), stderr=subprocess.PIPE, text=True)
    os.close(ready_w)
    return proc, ready_r, path, api


def _status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _stop(proc: Any, ready_r: int) -> str:
    import signal

    os.close(ready_r)
    try:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return str(err)


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox test needs root")
def test_qemu_stream_runs_sandboxed_and_filtered_and_still_serves(tmp_path: Path) -> None:
    proc, ready_r, path, api = _start_qemu_backend(tmp_path, "qemu-stream",
                                                  "--enable-sandbox", "--enable-seccomp")
    try:
        assert os.read(ready_r, 1) == b"1", proc.communicate(timeout=20)[1]
        status = _status_fields(proc.pid)
        assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1")
        assert int(status["CapEff"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
        assert sorted(os.listdir(f"/proc/{proc.pid}/root")) == ["etc", "run"]
        with connect(path) as qemu:
            qemu.sendall(framed(arp_request()))
            reply = Ether(StreamReader(qemu).frame())
            assert reply[ARP].op == 2 and reply[ARP].psrc == "10.0.2.2"
        from pyslirp.kubevirt.backends import api_request

        added = api_request(api, {"execute": "add_hostfwd", "arguments": {
            "proto": "tcp", "host_addr": "127.0.0.1", "host_port": free_port(),
            "guest_port": 80}})
        assert "return" in added, added
    finally:
        err = _stop(proc, ready_r)
    assert proc.returncode == 0, err
    # Both socket files are gone although their directory is outside the sandbox's root.
    assert not os.path.exists(path) and not os.path.exists(api)


def test_qemu_dgram_runs_filtered_and_still_serves(tmp_path: Path) -> None:
    proc, ready_r, path, _api = _start_qemu_backend(tmp_path, "qemu-dgram", "--enable-seccomp")
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        assert os.read(ready_r, 1) == b"1", proc.communicate(timeout=20)[1]
        status = _status_fields(proc.pid)
        assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1")
        qemu.bind(str(tmp_path / "qemu.sock"))
        qemu.settimeout(10)
        qemu.sendto(arp_request(), path)
        assert is_arp_reply(qemu.recv(MAX_FRAME))
    finally:
        qemu.close()
        err = _stop(proc, ready_r)
    assert proc.returncode == 0, err


def test_qemu_dgram_refuses_the_sandbox_and_says_why(tmp_path: Path) -> None:
    proc, ready_r, path, _api = _start_qemu_backend(tmp_path, "qemu-dgram", "--enable-sandbox")
    try:
        _out, err = proc.communicate(timeout=20)
    finally:
        os.close(ready_r)
    assert proc.returncode == 1
    assert "--enable-sandbox is not supported with --target-type=qemu-dgram: replies go to " \
           "QEMU's socket by its path, which the sandbox hides" in err
    assert not os.path.exists(path)


# --- who may connect --------------------------------------------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may search, so only the socket's own mode keeps them out."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="pyslirp-qemu-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody(code: str, *args: str) -> str:
    """Run Python ``code`` as uid/gid 65534 (sys.argv[1:] = args); its stdout."""
    import subprocess
    import sys

    proc = subprocess.run([*NOBODY, sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=30, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


_TRY_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_socket_is_owner_only_whatever_the_umask(shared_dir: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        stream = bind_unix(str(shared_dir / "stream.sock"), socket.SOCK_STREAM)
        dgram = bind_unix(str(shared_dir / "dgram.sock"), socket.SOCK_DGRAM)
    finally:
        os.umask(old)
    with stream, dgram:
        for name in ("stream.sock", "dgram.sock"):
            assert (shared_dir / name).stat().st_mode & 0o777 == 0o600


def test_another_user_cannot_connect(shared_dir: Path) -> None:
    path = str(shared_dir / "vm.sock")
    old = os.umask(0)  # the widest a caller could have
    try:
        listener = bind_unix(path, socket.SOCK_STREAM)
    finally:
        os.umask(old)
    with listener:
        assert as_nobody(_TRY_CONNECT, path) == "refused"
        with connect(path):  # its owner still can
            pass


_CONNECT_AND_WAIT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.settimeout(20)
print("closed" if s.recv(100) == b"" else "got data")
"""


def test_another_users_connection_does_not_cut_the_vm_off(
        shared_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Even past the file mode (root, or a socket chmod'ed wide), the VM keeps its link."""
    path = str(shared_dir / "vm.sock")
    listener = bind_unix(path, socket.SOCK_STREAM)
    os.chmod(path, 0o666)  # let nobody reach accept(): the check under test is behind it
    server = LoopThread(lambda loop: Attachment(loop, QemuStreamDevice(listener.fileno()),
                                                plain_config()))
    try:
        with connect(path) as vm:
            reader = StreamReader(vm)
            vm.sendall(framed(arp_request()))
            assert is_arp_reply(reader.frame())
            assert as_nobody(_CONNECT_AND_WAIT, path) == "closed"
            vm.sendall(framed(arp_request("10.0.2.16")))
            assert is_arp_reply(reader.frame(), to_ip="10.0.2.16")
            assert server.call(lambda: (server.attachment.device.connections,
                                        server.attachment.device.refused)) == (1, 1)
        assert "refused a connection from uid 65534 gid 65534" in caplog.text
    finally:
        server.close()
        listener.close()


def test_after_the_vm_disconnects_another_user_may_connect(shared_dir: Path) -> None:
    """The check guards a live link only: the file mode decides who may connect at all."""
    path = str(shared_dir / "vm.sock")
    listener = bind_unix(path, socket.SOCK_STREAM)
    os.chmod(path, 0o666)
    server = LoopThread(lambda loop: Attachment(loop, QemuStreamDevice(listener.fileno()),
                                                plain_config()))
    try:
        with connect(path) as vm:
            vm.sendall(framed(arp_request()))
            assert is_arp_reply(StreamReader(vm).frame())
        deadline = time.monotonic() + 10
        while server.call(lambda: server.attachment.device.connected):
            assert time.monotonic() < deadline, "the closed connection was never noticed"
            time.sleep(0.01)
        code = _CONNECT_AND_WAIT.replace('print("closed"', 'import struct; f = bytes.fromhex('
                                         'sys.argv[2]); s.sendall(struct.pack("!I", len(f)) '
                                         '+ f); print("closed"')
        assert as_nobody(code, path, arp_request().hex()) == "got data"
    finally:
        server.close()
        listener.close()
