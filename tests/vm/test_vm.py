"""A real VM on pyslirp: QEMU (TCG) boots a Debian kernel + busybox guest on -netdev stream.

Inside, the guest (tests/vm/guest.py's /init) takes a DHCP lease, resolves a
name through 10.0.2.3 (pyslirp forwards to the test's DNS server on
127.0.0.1), fetches a file from the host's loopback through 10.0.2.2 and
prints its hash; then it serves a file on port 8080 that the host fetches
through a port forward added on pyslirp's API socket, and powers off once
the host connects to a second forwarded port. The host side compares every
hash. The guest talks only to 10.0.2.2 and 10.0.2.3.

Needs qemu-system-x86 and busybox-static (scripts/test-all installs them) and
a Debian kernel, fetched once into the test cache (tests/vm/guest.py). Boot to
power-off takes about 15 s under TCG.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyslirp.kubevirt.backends import api_request
from pyslirp.stack.config import NetConfig
from tests.netutil import free_port
from tests.vm import guest

pytestmark = pytest.mark.vm

SERVERS = Path(__file__).resolve().parent.parent / "e2e" / "servers.py"
SERVERS6 = SERVERS.with_name("servers6.py")
PAYLOAD_SIZE = 1 << 20
BOOT_TIMEOUT = 180.0


def _missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    if not os.path.exists(guest.BUSYBOX):
        return "busybox-static is not installed"
    if shutil.which("apt-get") is None:
        return "apt-get is needed to fetch a Debian kernel"
    return None


@pytest.fixture(scope="module")
def kernel() -> tuple[Path, Path]:
    why = _missing()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(why)  # a skipped VM test would make a green CI mean nothing
        pytest.skip(why)
    return guest.debian_kernel()


def _stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Vm:
    qemu: subprocess.Popen[bytes]
    console: guest.Console
    servers: dict[str, object]
    state: Path
    forwards: dict[int, int]  # guest port -> host port on 127.0.0.1

    def wait_for(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        return self.console.wait_for(pattern, self.qemu, timeout)


@contextlib.contextmanager
def boot(tmp: Path, kernel: tuple[Path, Path], backend: str,
         forward: bool, ipv6: bool = False) -> Iterator[Vm]:
    """Servers on loopback, pyslirp serving ``backend``, then QEMU booting the guest.

    With ``ipv6``, pyslirp runs with ``-6`` and an HTTP server on ``::1``
    (tests/e2e/servers6.py) gives the guest a second payload over IPv6."""
    vmlinuz, modules = kernel
    initrd = tmp / "initrd.cpio"
    guest.build_initramfs(initrd, modules)
    procs: list[subprocess.Popen[bytes] | subprocess.Popen[str]] = []
    try:
        servers = subprocess.Popen([sys.executable, str(SERVERS), str(tmp / "state"),
                                    "--size", str(PAYLOAD_SIZE)],
                                   stdout=subprocess.PIPE, text=True)
        procs.append(servers)
        assert servers.stdout is not None
        info = json.loads(servers.stdout.readline())
        cmdline = f"vmtest_http={info['http']} vmtest_fwd={int(forward)}"
        if ipv6:
            servers6 = subprocess.Popen([sys.executable, str(SERVERS6), str(PAYLOAD_SIZE)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
            procs.append(servers6)
            assert servers6.stdout is not None
            info6 = json.loads(servers6.stdout.readline())
            info["sha256_6"] = info6["sha256"]
            cmdline += f" vmtest_http6={info6['http']}"

        sock, api = str(tmp / "vm.sock"), str(tmp / "api.sock")
        ready_r, ready_w = os.pipe()
        slirp = subprocess.Popen(
            [sys.executable, "-m", "pyslirp", f"--target-type=qemu-{backend}",
             *(["-6"] if ipv6 else []),
             f"--dns-upstream=127.0.0.1:{info['dns']}", f"--api-socket={api}",
             f"--ready-fd={ready_w}", f"--pcap={tmp / 'vm.pcap'}", sock],
            pass_fds=(ready_w,), stderr=open(tmp / "pyslirp.log", "wb"))  # noqa: SIM115
        procs.append(slirp)
        os.close(ready_w)
        with open(ready_r, "rb") as ready:
            assert ready.read(1) == b"1", (tmp / "pyslirp.log").read_text()

        forwards: dict[int, int] = {}
        if forward:
            for guest_port in (8080, 8081):
                host_port = free_port()
                reply = api_request(api, {"execute": "add_hostfwd", "arguments": {
                    "proto": "tcp", "host_addr": "127.0.0.1", "host_port": host_port,
                    "guest_addr": "10.0.2.15", "guest_port": guest_port}})
                assert "return" in reply, reply
                forwards[guest_port] = host_port

        if backend == "stream":
            netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}"
        else:
            netdev = (f"dgram,id=n0,local.type=unix,local.path={tmp / 'qemu.sock'},"
                      f"remote.type=unix,remote.path={sock}")
        console = tmp / "console.log"
        qemu = subprocess.Popen(
            guest.qemu_command(vmlinuz, initrd, netdev, console,
                               cmdline),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp / "qemu.log", "wb"))  # noqa: SIM115
        procs.append(qemu)
        yield Vm(qemu, guest.Console(console), info, tmp / "state", forwards)
        assert _stop(slirp) == 0, (tmp / "pyslirp.log").read_text()
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _hostfwd_available() -> bool:
    try:
        import pyslirp.runtime.hostfwd  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def vm(kernel: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    with boot(tmp_path_factory.mktemp("vm"), kernel, "stream",
              forward=_hostfwd_available(), ipv6=True) as running:
        yield running


def test_guest_gets_its_lease_by_dhcp(vm: Vm) -> None:
    m = vm.wait_for(r"^VM: lease (\S+) mask (\S+) router (\S+) dns (\S+) mtu (\S+)")
    assert m.groups() == ("10.0.2.15", "255.255.255.0", "10.0.2.2", "10.0.2.3", "1500")
    assert re.search(rf"^VM: mac {guest.GUEST_MAC}$", vm.console.text(), re.M)
    assert re.search(r"^VM: driver e1000$", vm.console.text(), re.M)


def test_guest_resolves_a_name_through_10_0_2_3(vm: Vm) -> None:
    m = vm.wait_for(r"^VM: dns (.*)$")
    assert "Address: 198.18.0.1" in m.group(1)
    # ... and it was our loopback server that answered, not anybody else.
    assert "udp test.pyslirp. A" in (vm.state / "dns.log").read_text()


def test_guest_fetches_a_file_from_host_loopback(vm: Vm) -> None:
    m = vm.wait_for(r"^VM: payload (\S+)")
    assert m.group(1) == vm.servers["sha256"]


def test_guest_takes_a_slaac_address_and_fetches_over_ipv6(vm: Vm) -> None:
    """pyslirp -6 on -netdev stream: the guest's kernel forms its address from our RA
    (EUI-64 of its MAC in fd00::/64), routes via our link-local address, pings the
    gateway and fetches from the host's ::1 through [fd00::2]."""
    addr = vm.wait_for(r"^VM: ipv6 addr (\S+)").group(1)
    # 52:54:00:12:34:56 -> interface identifier 5054:00ff:fe12:3456 (RFC 4291 A).
    assert addr == "fd00000000000000505400fffe123456"
    route = vm.wait_for(r"^VM: ipv6 route (.*)$").group(1)
    router = ipaddress.IPv6Address(NetConfig().link_local6)  # what sends our RAs
    assert route.startswith(f"default via {router} dev eth0"), route
    vm.wait_for(r"^VM: ping6 fd00::2 ok")
    payload = vm.wait_for(r"^VM: payload6 (\S+)").group(1)
    assert payload == vm.servers["sha256_6"]


def test_host_reaches_a_guest_server_through_a_port_forward(vm: Vm) -> None:
    if not vm.forwards:
        pytest.skip("port forwarding (pyslirp.runtime.hostfwd) is not there yet")
    served = vm.wait_for(r"^VM: serving (\S+)").group(1)
    url = f"http://127.0.0.1:{vm.forwards[8080]}/guest.bin"
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
    assert len(body) == 256 * 1024
    assert hashlib.sha256(body).hexdigest() == served
    # Let the guest finish: it waits for a connection on its port 8081.
    with socket.create_connection(("127.0.0.1", vm.forwards[8081]), timeout=30):
        pass
    vm.wait_for(r"^VM: done", timeout=60)
    assert vm.qemu.wait(timeout=60) == 0


def test_dgram_backend_serves_a_vm(kernel: tuple[Path, Path], tmp_path: Path) -> None:
    """-netdev dgram: the same guest, DHCP and a download; one frame per datagram."""
    with boot(tmp_path, kernel, "dgram", forward=False) as dgram_vm:
        lease = dgram_vm.wait_for(r"^VM: lease (\S+) .* router (\S+)")
        assert lease.groups() == ("10.0.2.15", "10.0.2.2")
        payload = dgram_vm.wait_for(r"^VM: payload (\S+)")
        assert payload.group(1) == dgram_vm.servers["sha256"]
        dgram_vm.wait_for(r"^VM: done")
        started = time.monotonic()
        while dgram_vm.qemu.poll() is None and time.monotonic() - started < 60:
            time.sleep(0.2)
        assert dgram_vm.qemu.returncode == 0
