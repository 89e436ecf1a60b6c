"""``runtimeConfig.portMappings`` over IPv6 on an ``"ipv6": true`` network.

A mapping with an IPv6 ``hostIP`` forwards to the container's IPv6 address
(prefix + 0x100); one without ``hostIP`` (podman's ``-p 8080:80``) serves IPv4
clients (to the IPv4 address) and IPv6 clients (to the IPv6 address) alike; an
IPv6 ``hostIP`` on a network without IPv6 is CNI error 7 naming the mapping.
Clients run on this namespace's loopback, servers in the container's namespace.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from pyslirp.cni import daemon, plugin
from tests.cni.cnirun import exec_plugin
from tests.cni.conftest import slirp_conflist, tcp_udp_mappings, wait_until
from tests.cni.test_protocol import conf
from tests.netutil import free_port

# ---- the configuration (no namespaces)


def _mappings(*host_ips: str) -> dict[str, Any]:
    return {"runtimeConfig": {"portMappings": [
        {"hostPort": 8000 + i, "containerPort": 80, "protocol": "tcp", "hostIP": ip}
        for i, ip in enumerate(host_ips)]}}


@pytest.fixture
def run(cni_bin: str, env: dict[str, str], rundir: str) -> Any:
    """ADD through the installed plugin; refused before any namespace is looked at."""
    def go(command: str, config: Any) -> Any:
        return exec_plugin(cni_bin, "slirp", command, config, container_id="c1",
                           ifname="eth0", netns="/proc/self/ns/net", extra_env=dict(env))
    return go


def test_ipv6_host_ips_are_taken_in_their_canonical_spelling() -> None:
    s = plugin.parse_settings(conf(ipv6=True, **_mappings("::1", "::", "2001:DB8::0:1",
                                                          "127.0.0.1", "")), {})
    assert [m["hostIP"] for m in s["portMappings"]] == \
        ["::1", "::", "2001:db8::1", "127.0.0.1", ""]


def test_an_ipv6_host_ip_without_ipv6_is_error_7_naming_the_mapping(run: Any) -> None:
    out = run("ADD", conf(**_mappings("127.0.0.1", "::1")))
    assert out.code == plugin.ERR_INVALID_CONFIG, out.doc
    assert out.msg == ("invalid runtimeConfig.portMappings[1].hostIP: '::1' is an IPv6 "
                       'address, but network slirptest serves IPv4 only (set "ipv6": true)')


@pytest.mark.parametrize(("host_ip", "problem"), [
    ("fe80::1", "link-local host addresses are not served"),
    ("fe80::1%eth0", "a zone (%IFNAME) is not served"),
    ("ff02::1", "a multicast address is no host address"),
    ("::ffff:127.0.0.1", "it is IPv4-mapped; use the IPv4 address"),
    ("[::1]", "expected an IPv4 or IPv6 address, without brackets"),
    ("::1::", "expected an IPv4 or IPv6 address"),
    ("localhost", "expected an IPv4 or IPv6 address"),
])
def test_bad_host_ips_are_error_7(run: Any, host_ip: str, problem: str) -> None:
    out = run("ADD", conf(ipv6=True, **_mappings(host_ip)))
    assert out.code == plugin.ERR_INVALID_CONFIG, out.doc
    assert "runtimeConfig.portMappings[0].hostIP" in out.msg and problem in out.msg, out.msg


def test_a_mapping_without_host_ip_is_an_ipv4_and_an_ipv6_only_forward() -> None:
    s = plugin.parse_settings(conf(ipv6=True, **_mappings("", "::1", "0.0.0.0")), {})
    binds = [[(p.host_ip, p.guest_ip, p.v6only, p.optional) for p in daemon._binds(m, s, None)]
             for m in s["portMappings"]]
    assert binds == [[("0.0.0.0", "10.0.2.100", False, False), ("::", "fd00::100", True, True)],
                     [("::1", "fd00::100", True, False)],
                     [("0.0.0.0", "10.0.2.100", False, False)]]
    s4 = plugin.parse_settings(conf(**_mappings("")), {})
    assert [(p.host_ip, p.guest_ip) for p in daemon._binds(s4["portMappings"][0], s4, None)] \
        == [("0.0.0.0", "10.0.2.100")]


class _HostWithoutIPv6:
    """A HostForwarder stand-in on a host whose kernel has no IPv6 (ipv6.disable=1)."""

    def __init__(self, attachment: Any) -> None:
        self.added: list[tuple[str, int, str, bool]] = []
        self.closed = False

    def add(self, proto: str, host_ip: str, port: int, guest_ip: str, guest_port: int,
            sock: Any = None, v6only: bool = False) -> int:
        if ":" in host_ip:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        self.added.append((host_ip, port, guest_ip, v6only))
        return port

    def close(self) -> None:
        self.closed = True


def test_a_host_without_ipv6_serves_mappings_without_host_ip_over_ipv4(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No hostIP: the IPv6 half is skipped where the host has no IPv6 at all; an explicit
    IPv6 hostIP there is an error naming it."""
    monkeypatch.setattr(daemon, "_forwarder_class", lambda: _HostWithoutIPv6)
    engine = daemon.AttachmentDaemon.__new__(daemon.AttachmentDaemon)
    s = plugin.parse_settings(conf(ipv6=True, **_mappings("")), {})
    forwarder, pending = engine._forward_ports(None, s, None, "c1")
    assert forwarder.added == [("0.0.0.0", 8000, "10.0.2.100", False)] and pending == []
    s = plugin.parse_settings(conf(ipv6=True, **_mappings("", "::1")), {})
    with pytest.raises(daemon.RequestError) as err:
        engine._forward_ports(None, s, None, "c1")
    assert err.value.code == plugin.ERR_SETUP_FAILED
    assert err.value.msg == ("cannot forward tcp port [::1]:8001: Address family not "
                             "supported by protocol")


# ---- real namespaces through the engine

#: In the container: a dual-stack TCP server on port 8080 that reads a length-prefixed
#: blob, answers with the peer it saw and the blob's SHA-256, then the blob reversed;
#: and a UDP echo on port 5300 that prefixes the peer's address.
SERVER = r"""
import hashlib, json, socket, struct, threading
t = socket.socket(socket.AF_INET6); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); t.bind(("::", 8080)); t.listen(8)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); u.bind(("::", 5300))
def udp():
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(peer[0].encode() + b" " + data, peer)
threading.Thread(target=udp, daemon=True).start()
def serve(c, peer):
    with c:
        f = c.makefile("rb")
        n = struct.unpack("!I", f.read(4))[0]
        blob = f.read(n)
        head = json.dumps({"peer": peer[0], "local": c.getsockname()[0],
                           "sha256": hashlib.sha256(blob).hexdigest()})
        c.sendall(head.encode() + b"\n" + blob[::-1])
print("ready", flush=True)
while True:
    c, peer = t.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

BLOB = os.urandom(1 << 21)


def _exchange(addr: str, port: int) -> dict[str, Any]:
    """Send BLOB through ``addr:port``; the server's answer, its reply checked by hash."""
    with socket.create_connection((addr, port), timeout=20) as c:
        c.sendall(len(BLOB).to_bytes(4, "big") + BLOB)
        c.shutdown(socket.SHUT_WR)
        f = c.makefile("rb")
        head = json.loads(f.readline())
        back = f.read()
    assert head["sha256"] == hashlib.sha256(BLOB).hexdigest()
    assert hashlib.sha256(back).digest() == hashlib.sha256(BLOB[::-1]).digest()
    return head


def _udp(addr: str, port: int) -> bytes:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as u:
        u.settimeout(10)
        u.sendto(b"ping", (addr, port))
        return u.recvfrom(2048)[0]


def _server(ns: Any) -> subprocess.Popen[str]:
    server = ns.popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return server


def _refused(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.e2e
def test_ipv6_host_ip_mappings_reach_the_containers_ipv6_address(
        runtime_factory: Any, netns_factory: Any) -> None:
    """``hostIP: "::1"`` (TCP and UDP): a client on the host's ``[::1]`` reaches the server
    on the container's IPv6 address, data both ways intact; the server sees the gateway
    ``fd00::2`` as the source (a loopback client has no address the container could
    answer). IPv4 clients of that port are not served: the mapping names IPv6."""
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(ipv6=True, capabilities={"portMappings": True}))
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    mappings = tcp_udp_mappings(tcp_port, udp_port, "::1")
    out = rt.add("pm6", ns.path, runtime_config={"portMappings": mappings})
    assert out.ok, out.doc
    _server(ns)
    head = _exchange("::1", tcp_port)
    assert (head["peer"], head["local"]) == ("fd00::2", "fd00::100")
    assert _udp("::1", udp_port) == b"fd00::2 ping"
    assert _refused("127.0.0.1", tcp_port)
    assert rt.delete("pm6", ns.path, runtime_config={"portMappings": mappings}).ok
    assert _refused("::1", tcp_port)


@pytest.mark.e2e
def test_a_mapping_without_host_ip_serves_ipv4_and_ipv6_clients(
        runtime_factory: Any, netns_factory: Any) -> None:
    """podman's ``-p PORT:8080`` (no ``hostIP``) on an ``"ipv6": true`` network: a client
    on ``127.0.0.1`` reaches the container's IPv4 address, one on ``[::1]`` its IPv6
    address, each seen as its family's gateway; TCP and UDP."""
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(ipv6=True, capabilities={"portMappings": True}))
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    mappings = tcp_udp_mappings(tcp_port, udp_port)
    out = rt.add("pm46", ns.path, runtime_config={"portMappings": mappings})
    assert out.ok, out.doc
    _server(ns)
    head4 = _exchange("127.0.0.1", tcp_port)
    assert (head4["peer"], head4["local"]) == ("::ffff:10.0.2.2", "::ffff:10.0.2.100")
    head6 = _exchange("::1", tcp_port)
    assert (head6["peer"], head6["local"]) == ("fd00::2", "fd00::100")
    assert _udp("127.0.0.1", udp_port) == b"::ffff:10.0.2.2 ping"
    assert _udp("::1", udp_port) == b"fd00::2 ping"
    assert rt.delete("pm46", ns.path, runtime_config={"portMappings": mappings}).ok
    assert _refused("127.0.0.1", tcp_port) and _refused("::1", tcp_port)


@pytest.mark.e2e
def test_an_ipv6_port_someone_holds_fails_the_add_naming_it(
        runtime_factory: Any, netns_factory: Any, rundir: str) -> None:
    """The IPv6 half of a mapping without ``hostIP`` is no afterthought: a port taken on
    ``[::]`` (IPv6 only) fails ADD with the address and port, and nothing is left."""
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(ipv6=True, capabilities={"portMappings": True}))
    with socket.socket(socket.AF_INET6) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        taken.bind(("::", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = rt.add("busy6", ns.path, runtime_config={"portMappings": [
            {"hostPort": port, "containerPort": 80, "protocol": "tcp"}]})
        assert out.code == plugin.ERR_SETUP_FAILED, out.doc
        assert f"cannot forward tcp port [::]:{port}" in out.msg, out.msg
    assert ns.link("eth0") is None
    assert wait_until(lambda: os.listdir(os.path.join(rundir, "attachments")) == [], 10)
    assert _refused("127.0.0.1", port)  # the IPv4 half was closed again
