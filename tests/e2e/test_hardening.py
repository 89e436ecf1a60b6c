"""A running pyslirp with --enable-sandbox, --enable-seccomp and --outbound-addr[6].

What an administrator can check from outside (``/proc/PID/status``,
``/proc/PID/root``) and what the guest notices: traffic still flows through
a sandboxed, syscall-filtered stack, and the host's servers see connections
and datagrams come from the outbound address.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from pyslirp.runtime import sandbox, seccomp
from tests.e2e.conftest import GATEWAY, Guest, Host, StartSlirp, alive, sha256_of_get
from tests.e2e.servers import HELLO
from tests.e2e.test_hostfwd import (
    add_fwd,
    api,
    client,
    port_unused_in,
    replay_api_tables,
    start_guest_server,
)

pytestmark = pytest.mark.e2e

NET_BIND_SERVICE = 1 << sandbox.CAP_NET_BIND_SERVICE


def _hello(guest: Guest, host: Host) -> str:
    return guest.run(["curl", "-sS", "--fail", "--max-time", "30",
                      host.url("/hello")]).stdout


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    raise AssertionError(name)


def test_sandboxed_stack_keeps_one_capability_and_a_bare_root(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    slirp = start_slirp("--enable-sandbox")
    assert sandbox.capabilities(slirp.pid) == {
        "CapInh": NET_BIND_SERVICE, "CapPrm": NET_BIND_SERVICE, "CapEff": NET_BIND_SERVICE,
        "CapBnd": NET_BIND_SERVICE, "CapAmb": 0}
    assert _status_field(slirp.pid, "NoNewPrivs") == "1"
    assert sorted(os.listdir(f"/proc/{slirp.pid}/root")) == ["etc", "run"]
    assert os.listdir(f"/proc/{slirp.pid}/root/etc") == os.listdir("/etc")
    # ...and it still serves: a small fetch and the whole payload, byte for byte.
    assert _hello(guest, host) == HELLO.decode()
    assert sha256_of_get(guest, host.url("/payload")) == host.sha256
    assert slirp.stop() == -signal.SIGTERM
    assert "sandbox: new mount namespace" in slirp.log_text()


def test_sandboxed_and_filtered_stack_serves_tcp_udp_and_dns(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    slirp = start_slirp("--enable-sandbox", "--enable-seccomp")
    assert _status_field(slirp.pid, "Seccomp") == "2"  # SECCOMP_MODE_FILTER
    assert sandbox.capabilities(slirp.pid)["CapEff"] == NET_BIND_SERVICE
    assert sha256_of_get(guest, host.url("/payload")) == host.sha256
    out = guest.run(["dig", "+short", "+time=5", "+tries=2", "@10.0.2.3",
                     "www.test.pyslirp", "A"]).stdout
    assert out.split() == ["198.18.0.1"]
    echo = guest.python(
        "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.settimeout(10); s.sendto(b'hardened', (sys.argv[1], int(sys.argv[2]))); "
        "print(s.recv(100).decode())", GATEWAY, str(host.echo)).stdout
    assert echo.strip() == "hardened"
    log = slirp.log_text()
    assert "the following syscalls will be blocked by seccomp: execve execveat" in log
    # a clean exit (the handler ran, then SIGTERM as slirp4netns): shutdown calls nothing blocked
    assert slirp.stop() == -signal.SIGTERM


def test_filtered_stack_keeps_rereading_resolv_conf(host: Host, guest: Guest,
                                                   start_slirp: StartSlirp) -> None:
    # No --dns-upstream: the resolv.conf watcher stats (and re-reads) /etc/resolv.conf every
    # 2 s; under sandbox + seccomp that must neither fail nor kill the stack. No DNS query
    # is made: the machine's resolver is never used by tests.
    slirp = start_slirp("--enable-sandbox", "--enable-seccomp", upstreams=[])
    time.sleep(5)
    assert alive(slirp.pid)
    assert _hello(guest, host) == HELLO.decode()
    log = slirp.log_text()
    assert "DNS upstreams from /etc/resolv.conf" in log
    assert "cannot read /etc/resolv.conf" not in log
    assert slirp.stop() == -signal.SIGTERM


def test_seccomp_alone_serves(host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    slirp = start_slirp("--enable-seccomp")
    assert _status_field(slirp.pid, "Seccomp") == "2"
    assert sandbox.capabilities(slirp.pid)["CapEff"] != NET_BIND_SERVICE  # no sandbox asked
    assert _hello(guest, host) == HELLO.decode()
    assert slirp.stop(signal.SIGINT) == -signal.SIGINT


def test_seccomp_backend_is_logged(host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    slirp = start_slirp("--enable-seccomp")
    version = seccomp.libseccomp_version()
    want = f"seccomp (libseccomp {version}" if version else "seccomp (built-in BPF"
    assert want in slirp.log_text()


# ---- --outbound-addr ----------------------------------------------------------------

def _echo_peers(host: Host, since: int) -> list[str]:
    return [line.split()[1].rsplit(":", 1)[0] + " " + line.split()[0]
            for line in host.echo_log().splitlines()[since:]]


def _tcp_and_udp_echo(guest: Guest, host: Host, tag: str) -> None:
    guest.python(
        "import socket,sys\n"
        "addr=(sys.argv[1], int(sys.argv[2]))\n"
        "t=socket.create_connection(addr, timeout=10); t.sendall(sys.argv[3].encode())\n"
        "assert t.recv(100)==sys.argv[3].encode(); t.close()\n"
        "u=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(10)\n"
        "u.sendto(sys.argv[3].encode(), addr); assert u.recv(100)==sys.argv[3].encode()\n",
        GATEWAY, str(host.echo), tag)


def test_outbound_addr_is_the_source_the_host_sees(host: Host, guest: Guest,
                                                   start_slirp: StartSlirp) -> None:
    before = len(host.echo_log().splitlines())
    slirp = start_slirp("--outbound-addr=127.0.0.2")
    _tcp_and_udp_echo(guest, host, "from-127.0.0.2")
    assert sorted(_echo_peers(host, before)) == ["127.0.0.2 tcp", "127.0.0.2 udp"]
    assert "outbound address: 127.0.0.2" in slirp.log_text()


def test_outbound_addr_by_interface_name(host: Host, guest: Guest,
                                        start_slirp: StartSlirp) -> None:
    # An interface of the test's own host namespace with a test address on it.
    host.run(["ip", "link", "add", "pyslirp-ob0", "type", "veth", "peer", "name", "pyslirp-ob1"])
    try:
        host.run(["ip", "addr", "add", "198.18.7.1/32", "dev", "pyslirp-ob0"])
        host.run(["ip", "link", "set", "pyslirp-ob0", "up"])
        before = len(host.echo_log().splitlines())
        start_slirp("--outbound-addr=pyslirp-ob0", "--outbound-addr6=lo")
        _tcp_and_udp_echo(guest, host, "from-dummy")
        assert sorted(_echo_peers(host, before)) == ["198.18.7.1 tcp", "198.18.7.1 udp"]
    finally:
        host.run(["ip", "link", "del", "pyslirp-ob0"], check=False)


def test_outbound_addr_with_sandbox_and_seccomp(host: Host, guest: Guest,
                                                start_slirp: StartSlirp) -> None:
    before = len(host.echo_log().splitlines())
    start_slirp("--outbound-addr=127.0.0.3", "--enable-sandbox", "--enable-seccomp")
    _tcp_and_udp_echo(guest, host, "hardened-outbound")
    assert sorted(_echo_peers(host, before)) == ["127.0.0.3 tcp", "127.0.0.3 udp"]


def test_enable_ipv6_still_serves_ipv4(host: Host, guest: Guest,
                                       start_slirp: StartSlirp) -> None:
    # podman and rootlesskit always pass -6; IPv4 must work beside it (IPv6: test_ipv6.py).
    start_slirp("--enable-ipv6")
    assert _hello(guest, host) == HELLO.decode()


def test_sandboxed_stack_removes_its_api_socket_on_exit(
        host: Host, guest: Guest, start_slirp: StartSlirp, tmp_path: Path) -> None:
    """After pivot_root the socket's path no longer resolves; the file must still go."""
    api = tmp_path / "api.sock"
    slirp = start_slirp("--enable-sandbox", "--enable-seccomp", f"--api-socket={api}")
    assert api.is_socket()
    assert slirp.stop() == -signal.SIGTERM
    assert not api.exists()


# ---- podman's command line: everything served after the sandbox hid the file system -----

#: What podman 4.3 passes (with -c, -e, -r and --api-socket added below and by start_slirp).
PODMAN_FLAGS = ("--disable-host-loopback", "--mtu=65520", "--enable-sandbox",
                "--enable-seccomp", "--enable-ipv6")


def test_podman_flags_serve_the_api_forwards_and_dns_inside_the_sandbox(
        host: Host, guest: Guest, start_slirp: StartSlirp, tmp_path: Path) -> None:
    """Nothing can be imported once the sandbox is up: whatever serving loads on first use
    (the API's JSON replies, get_stats, a forwarder's sockets, DNS) must have been loaded
    before it (runtime/sandbox.py's preload)."""
    api_path = tmp_path / "api.sock"
    exit_r, exit_w = os.pipe()
    try:
        slirp = start_slirp(*PODMAN_FLAGS, "-e", str(exit_r), f"--api-socket={api_path}",
                            pass_fds=(exit_r,))
    finally:
        os.close(exit_r)
    try:
        assert sorted(os.listdir(f"/proc/{slirp.pid}/root")) == ["etc", "run"]
        assert _status_field(slirp.pid, "Seccomp") == "2"
        # The JSON API, byte for byte as slirp4netns answers (errors included) ...
        replay_api_tables(api_path, host)
        stats = json.loads(api(api_path, b'{"execute":"get_stats"}'))
        assert "return" in stats, stats
        # ... a forward to a server in the guest, used from the host's loopback ...
        server = start_guest_server(host, guest)
        try:
            port = port_unused_in(host)
            add_fwd(api_path, "tcp", port, host_addr="127.0.0.1")
            assert client(host.ns, "who", "127.0.0.1", str(port))["reply"].startswith(
                GATEWAY + ":")
            got = client(host.ns, "get", "127.0.0.1", str(port))
            assert got["reply"] == f"{host.size} {host.sha256}"
        finally:
            server.kill()
            server.wait()
        # ... and DNS through the forwarder.
        out = guest.run(["dig", "+short", "+time=5", "+tries=2", "@10.0.2.3",
                         "www.test.pyslirp", "A"]).stdout
        assert out.split() == ["198.18.0.1"]
        assert slirp.proc.poll() is None
        log = slirp.log_text()
        for trouble in ("Traceback", "No module named", "cannot preload", "ERROR"):
            assert trouble not in log, log
    finally:
        os.close(exit_w)  # podman's way to stop it: the exit fd
    assert slirp.proc.wait(timeout=20) == 0
    assert not api_path.exists()
