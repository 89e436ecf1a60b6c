"""``"ipv6": true`` in the slirp network configuration: the container gets a static IPv6
address that the result names, a default route via the gateway, DNS at prefix + 3, and
the attachment's stack serves IPv6 (TCP to the host's ``::1`` via ``[fd00::2]``, DNS
AAAA via ``[fd00::3]`` to a test server on ``::1``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyslirp.cni import plugin
from pyslirp.stack.config import ConfigError, parse_cidr6
from pyslirp.wire import netparams
from tests.cni.cnirun import exec_plugin
from tests.cni.conftest import DNS_ADDR, DNS_NAME, slirp_conflist, wait_until
from tests.cni.test_protocol import conf
from tests.e2e import servers6 as servers6_script
from tests.nsutil import NetNS, UserNetNS

# ---- the configuration (no namespaces)


def test_ipv6_settings_default_prefix() -> None:
    s = plugin.parse_settings(conf(ipv6=True), {})
    assert (s["ipv6"], s["cidr6"], s["address6"], s["gateway6"], s["dns6"]) == \
        (True, "fd00::/64", "fd00::100", "fd00::2", "fd00::3")
    assert s["dns"]["nameservers"] == ["10.0.2.3", "fd00::3"]


def test_cidr6_picks_the_prefix_and_user_nameservers_follow_ours() -> None:
    s = plugin.parse_settings(conf(ipv6=True, cidr6="FD12:3456:789A:1::/64",
                                   dns={"nameservers": ["fd12:3456:789a:1::3", "192.0.2.1"]}),
                              {})
    assert (s["cidr6"], s["address6"], s["gateway6"]) == \
        ("fd12:3456:789a:1::/64", "fd12:3456:789a:1::100", "fd12:3456:789a:1::2")
    assert s["dns"]["nameservers"] == ["10.0.2.3", "fd12:3456:789a:1::3", "192.0.2.1"]


def test_without_ipv6_nothing_changes() -> None:
    s = plugin.parse_settings(conf(), {})
    assert s["ipv6"] is False and "address6" not in s
    assert s["dns"]["nameservers"] == ["10.0.2.3"]


@pytest.mark.parametrize(("fields", "needle"), [
    ({"ipv6": "yes"}, "invalid ipv6 'yes': expected true/false"),
    ({"ipv6": 1}, "invalid ipv6 1: expected true/false"),
    ({"cidr6": "fd00::/64"}, 'invalid cidr6: it applies only with "ipv6": true'),
    ({"ipv6": False, "cidr6": "fd00::/64"}, "applies only with"),
    ({"ipv6": True, "cidr6": "fd00::/48"}, "invalid cidr6 'fd00::/48': the prefix length "
                                           "must be 64"),
    ({"ipv6": True, "cidr6": "fd00::1/64"}, "invalid cidr6 'fd00::1/64': host bits are set "
                                            "(the network is fd00::/64)"),
    ({"ipv6": True, "cidr6": "fe80::/64"}, "not a unicast prefix"),
    ({"ipv6": True, "cidr6": "ff02::/64"}, "not a unicast prefix"),
    ({"ipv6": True, "cidr6": "fd00::"}, "invalid cidr6 'fd00::': expected an IPv6 PREFIX/64"),
    ({"ipv6": True, "cidr6": "10.0.2.0/24"}, "is not an IPv6 address"),
    ({"ipv6": True, "cidr6": 64}, "invalid cidr6 64"),
    ({"ipv6": True, "mtu": 1279}, "invalid mtu 1279: IPv6 needs at least 1280"),
])
def test_bad_ipv6_settings_are_error_7(fields: dict[str, Any], needle: str) -> None:
    out = plugin.run({"CNI_COMMAND": "STATUS"}, json.dumps(conf(**fields)).encode())
    assert out[0] == 1 and out[1] is not None
    assert out[1]["code"] == plugin.ERR_INVALID_CONFIG, out[1]
    assert needle in out[1]["msg"]


@pytest.mark.parametrize("text", [
    "fd00::/64", "FD00:0::/64", "2001:db8::/64", "fd00::/064", "fd00::/48", "fd00::1/64",
    "fe80::/64", "febf::/64", "fec0::/64", "ff00::/64", "::/64", "::ffff:0:0/96", "fd00::",
    "10.0.2.0/24", "fd00::/129", "fd00::/-1", "fd00:::/64", "1::/64", "fd00::%eth0/64",
])
def test_netparams_cidr6_agrees_with_the_stacks_rule(text: str) -> None:
    """The plugin cannot import ipaddress: its rule must accept what ``--cidr6`` accepts."""
    try:
        ours: str | None = netparams.format_ipv6(netparams.parse_cidr6(text)[0]) + "/64"
    except netparams.NetParamError:
        ours = None
    try:
        stack: str | None = str(parse_cidr6(text))
    except ConfigError:
        stack = None
    if text == "fd00::%eth0/64":  # ipaddress keeps the scope; a prefix has none
        assert ours is None
        return
    assert ours == stack


def test_pre_1_0_results_mark_the_ipv6_address_version_6() -> None:
    result = {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}],
              "ips": [{"address": "10.0.2.100/24", "interface": 0},
                      {"address": "fd00::100/64", "interface": 0}]}
    shaped = plugin.shape_result(result, "0.4.0")
    assert [ip["version"] for ip in shaped["ips"]] == ["4", "6"]


# ---- real namespaces through the engine


@pytest.fixture
def servers6() -> Iterator[dict[str, Any]]:
    """HTTP, UDP echo and an AAAA-answering DNS server on this namespace's ``::1``."""
    with servers6_script.running(4096) as info:
        yield info


def _ipv6_addrs(ns: Any) -> list[dict[str, Any]]:
    link = ns.link("eth0")
    assert link is not None
    return [a for a in link["addr_info"] if a["family"] == "inet6"]


@pytest.mark.e2e
@pytest.mark.parametrize("version", ["0.4.0", "1.1.0"])
def test_add_gives_the_static_address_route_and_dns(version: str, runtime_factory: Any,
                                                    netns_factory: Any) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(version, ipv6=True))
    out = rt.add("v6", ns.path)
    assert out.ok, out.doc
    ips = out.doc["ips"]
    v6 = {"address": "fd00::100/64", "gateway": "fd00::2", "interface": 0}
    if version < "1.0.0":
        v6["version"] = "6"
    assert ips[1] == v6 and len(ips) == 2
    assert out.doc["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.0.2.2"},
                                 {"dst": "::/0", "gw": "fd00::2"}]
    assert out.doc["dns"]["nameservers"] == ["10.0.2.3", "fd00::3"]
    # Exactly what the result says: the static global address (usable at once: not
    # tentative) and the link-local one, no SLAAC address beside it.
    addrs = _ipv6_addrs(ns)
    globals_ = [(a["local"], a["prefixlen"]) for a in addrs if a["scope"] == "global"]
    assert globals_ == [("fd00::100", 64)]
    assert not any(a.get("tentative") for a in addrs)
    routes6 = ns.ip_json("-6", "route")
    assert [r.get("gateway") for r in routes6 if r["dst"] == "default"] == ["fd00::2"]
    assert rt.check("v6", ns.path).ok
    assert rt.delete("v6", ns.path).ok
    assert ns.link("eth0") is None


@pytest.mark.e2e
def test_tcp_to_the_hosts_loopback_and_aaaa_over_ipv6(runtime_factory: Any, netns_factory: Any,
                                                      servers6: dict[str, Any]) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(ipv6=True, cidr6="fd12:3456:789a:1::/64",
                                        dnsUpstreams=[f"[::1]:{servers6['dns']}"]))
    out = rt.add("web6", ns.path)
    assert out.ok, out.doc
    # IPv6 only: whatever reaches the host now went over IPv6.
    ns.run(["ip", "-4", "route", "flush", "dev", "eth0"])
    ns.run(["ip", "-4", "addr", "flush", "dev", "eth0"])
    url = f"http://[fd12:3456:789a:1::2]:{servers6['http']}/"
    got = ns.run(f"curl -sS -g --fail --max-time 20 {url} | sha256sum", check=False)
    assert got.stdout.split()[:1] == [servers6["sha256"]], got.stderr
    dig = ns.run(["dig", "+short", "+time=3", "+tries=2", "AAAA", "@fd12:3456:789a:1::3",
                  "anything.test"], check=False)
    assert dig.stdout.split() == ["fd00::abcd"], dig.stderr
    assert rt.delete("web6", ns.path).ok


@pytest.mark.e2e
def test_check_notices_a_missing_ipv6_address_and_route(runtime_factory: Any,
                                                        netns_factory: Any) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(ipv6=True))
    assert rt.add("chk6", ns.path).ok
    assert rt.check("chk6", ns.path).ok
    ns.run(["ip", "-6", "route", "del", "default", "via", "fd00::2", "dev", "eth0"])
    out = rt.check("chk6", ns.path)
    assert out.code == plugin.ERR_CHECK_FAILED and "fd00::2" in out.msg, out.doc
    ns.run(["ip", "-6", "addr", "del", "fd00::100/64", "dev", "eth0"])
    out = rt.check("chk6", ns.path)
    assert out.code == plugin.ERR_CHECK_FAILED and "fd00::100/64" in out.msg, out.doc
    assert rt.delete("chk6", ns.path).ok
    assert wait_until(lambda: ns.link("eth0") is None)


#: A DNS server on ``fe80::1%llup0`` (one end of a veth pair), port 53, in a namespace of the
#: test: A DNS_ADDR for any name.
LINK_LOCAL_DNS = f"""
import socket, struct
ifindex = socket.if_nametoindex("llup0")
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("fe80::1", 53, 0, ifindex))
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(4096)
    end = 12
    while q[end]:
        end += 1 + q[end]
    answer = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("{DNS_ADDR}")
    s.sendto(q[:2] + b"\\x81\\x80\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x00" + q[12:end + 5]
             + answer, peer)
"""


@pytest.mark.e2e
def test_a_link_local_upstream_from_resolv_conf_answers(cni_bin: str, env: dict[str, str],
                                                        netns_factory: Any,
                                                        tmp_path: Path) -> None:
    """``nameserver fe80::1%llup0`` in resolv.conf: the engine (run in a namespace of the
    test's, where that server lives) forwards the container's queries to it."""
    upstream_ns: NetNS = netns_factory("llup")
    # lo up: a packet to one of the namespace's own addresses is delivered through it.
    upstream_ns.run("ip link set lo up && "
                    "ip link add llup0 type veth peer name llup1 && ip link set llup1 up && "
                    "ip link set llup0 up && "
                    "ip addr add fe80::1/64 dev llup0 nodad")
    server = upstream_ns.popen([sys.executable, "-c", LINK_LOCAL_DNS], stdout=subprocess.PIPE,
                               text=True)
    assert server.stdout is not None and server.stdout.readline() == "ready\n"
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver fe80::1%llup0\n")
    ns = netns_factory()
    config = {**conf(), "name": "slirptest"}
    extra = {**env, "PYSLIRP_RESOLV_CONF": str(resolv)}
    out = exec_plugin(cni_bin, "slirp", "ADD", config, container_id="ll", netns=ns.path,
                      ifname="eth0", extra_env=extra, prefix=upstream_ns.exec_prefix())
    assert out.ok, out.doc
    try:
        dig = ns.run(["dig", "+short", "+time=3", "+tries=2", "@10.0.2.3", DNS_NAME],
                     check=False)
        log = Path(env["PYSLIRP_RUNDIR"], "engine.log").read_text()
        assert dig.stdout.split() == [DNS_ADDR], (dig.stdout, dig.stderr, log.splitlines()[-3:])
    finally:
        exec_plugin(cni_bin, "slirp", "DEL", config, container_id="ll", netns=ns.path,
                    ifname="eth0", extra_env=extra, prefix=upstream_ns.exec_prefix())
    assert os.listdir(os.path.join(env["PYSLIRP_RUNDIR"], "attachments")) == []


@pytest.mark.e2e
def test_plugin_run_inside_a_rootless_runtimes_user_namespace(
        cni_bin: str, env: dict[str, str], servers6: dict[str, Any]) -> None:
    """Rootless: the plugin and its engine in the container's user namespace, which owns
    the netns; the IPv6 sysctls and the static address are set from there."""
    with UserNetNS("cni6-rootless") as ns:
        inside = ["nsenter", f"--target={ns.pid}", "--user", "--preserve-credentials"]
        config = {**conf(), "ipv6": True}
        out = exec_plugin(cni_bin, "slirp", "ADD", config, container_id="rl6", netns=ns.path,
                          ifname="eth0", extra_env=env, prefix=inside)
        assert out.ok, (out.doc, out.stderr)
        assert out.doc["ips"][1]["address"] == "fd00::100/64"
        url = f"http://[fd00::2]:{servers6['http']}/"
        got = ns.run(f"curl -sS -g --fail --max-time 20 {url} | sha256sum", check=False)
        assert got.stdout.split()[:1] == [servers6["sha256"]], got.stderr
        out = exec_plugin(cni_bin, "slirp", "DEL", {**config, "prevResult": out.doc},
                          container_id="rl6", netns=ns.path, ifname="eth0", extra_env=env,
                          prefix=inside)
        assert out.ok, out.doc


@pytest.mark.e2e
def test_disable_host_loopback_covers_ipv6(runtime_factory: Any, netns_factory: Any,
                                           servers6: dict[str, Any]) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(ipv6=True, disableHostLoopback=True))
    assert rt.add("noloop6", ns.path).ok
    got = ns.run(["curl", "-sS", "-g", "--max-time", "10",
                  f"http://[fd00::2]:{servers6['http']}/"], check=False)
    assert got.returncode != 0 and got.stdout == ""
    assert rt.delete("noloop6", ns.path).ok
