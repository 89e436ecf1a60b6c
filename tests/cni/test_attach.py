"""End to end: the ``slirp`` plugin attaching real namespaces through the shared engine.

Each test has its own runtime directory and therefore its own engine; the
container namespaces are made by the test and deleted afterwards. Guests only
talk to 10.0.2.2 (this host's loopback, where the test's HTTP server listens)
and 10.0.2.3 (forwarded to the test's DNS server on loopback).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pyslirp.cni import plugin
from tests.cni.cnirun import exec_plugin
from tests.cni.conftest import (
    DEBIAN_PLUGINS,
    DNS_ADDR,
    DNS_NAME,
    HTTP_BODY,
    REPO,
    DnsServer,
    engine_pid,
    pid_alive,
    slirp_conflist,
    tcp_udp_mappings,
    wait_until,
)
from tests.netutil import free_port
from tests.nsutil import NetNS, UserNetNS

pytestmark = pytest.mark.e2e

ALL_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def states(rundir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(rundir, "attachments")))


def engine_gone(rundir: str) -> bool:
    return not os.path.exists(os.path.join(rundir, "engine.sock")) and \
        engine_pid(rundir) is None


def curl(ns: NetNS, port: int) -> subprocess.CompletedProcess[str]:
    return ns.run(["curl", "-sS", "-m", "10", f"http://10.0.2.2:{port}/"], check=False)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_add_check_del_cycle(version: str, runtime_factory: Any, netns_factory: Any,
                             rundir: str) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(version))
    out = rt.add("ctr1", ns.path)
    assert out.ok, out.doc
    res = out.doc
    assert res["cniVersion"] == version
    link = ns.link("eth0")
    assert link is not None and "UP" in link["flags"]
    assert res["interfaces"] == [{"name": "eth0", "mac": link["address"], "sandbox": ns.path,
                                  **({"mtu": 1500} if version == "1.1.0" else {})}]
    ip = {"address": "10.0.2.100/24", "gateway": "10.0.2.2", "interface": 0}
    if version < "1.0.0":
        ip["version"] = "4"
    assert res["ips"] == [ip]
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.0.2.2"}]
    assert res["dns"] == {"nameservers": ["10.0.2.3"]}
    addrs = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
    assert addrs == [("10.0.2.100", 24)]
    assert any(r["dst"] == "default" and r["gateway"] == "10.0.2.2" for r in ns.routes())
    assert states(rundir) == ["slirptest:ctr1:eth0.json"]

    if version >= "0.4.0":
        assert rt.check("ctr1", ns.path).ok
    cached = rt.cache[("ctr1", "eth0")]
    assert rt.delete("ctr1", ns.path).ok
    assert ns.link("eth0") is None
    assert states(rundir) == []
    if version >= "0.4.0":
        rt.cache[("ctr1", "eth0")] = cached  # a CHECK after DEL must fail
        out = rt.check("ctr1", ns.path)
        assert out.code == plugin.ERR_NO_ATTACHMENT, out.doc
    assert rt.delete("ctr1", ns.path).ok  # DEL twice
    assert rt.delete("ctr1", None).ok     # and without a netns
    assert wait_until(lambda: engine_gone(rundir)), "the engine did not exit when idle"


def test_data_path_http_and_dns(runtime_factory: Any, netns_factory: Any, http_port: int,
                                dns_server: DnsServer) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(dnsUpstreams=[f"127.0.0.1:{dns_server.port}"]))
    assert rt.add("web", ns.path).ok
    got = curl(ns, http_port)
    assert got.returncode == 0, got.stderr
    assert got.stdout == HTTP_BODY.decode()
    dig = ns.run(["dig", "+short", "+time=3", "+tries=2", "@10.0.2.3", DNS_NAME])
    assert dig.stdout.split() == [DNS_ADDR]
    assert DNS_NAME in dns_server.queries
    assert rt.check("web", ns.path).ok
    assert rt.delete("web", ns.path).ok
    assert curl(ns, http_port).returncode != 0


def test_config_fields_reach_the_interface(runtime_factory: Any, netns_factory: Any,
                                           http_port: int) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(mtu=9000, cidr="10.99.0.0/24",
                                        macAddress="02:42:ac:11:00:02",
                                        dns={"search": ["corp.test"], "nameservers": ["10.99.0.3",
                                                                                      "192.0.2.1"]}))
    out = rt.add("cfg", ns.path)
    assert out.ok, out.doc
    link = ns.link("eth0")
    assert link["mtu"] == 9000 and link["address"] == "02:42:ac:11:00:02"
    assert out.doc["ips"][0] == {"address": "10.99.0.100/24", "gateway": "10.99.0.2",
                                 "interface": 0}
    assert out.doc["interfaces"][0]["mtu"] == 9000
    assert out.doc["dns"] == {"nameservers": ["10.99.0.3", "192.0.2.1"],
                              "search": ["corp.test"]}
    got = ns.run(["curl", "-sS", "-m", "10", f"http://10.99.0.2:{http_port}/"], check=False)
    assert got.stdout == HTTP_BODY.decode(), got.stderr
    assert rt.delete("cfg", ns.path).ok


def test_disable_host_loopback(runtime_factory: Any, netns_factory: Any, http_port: int) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(disableHostLoopback=True))
    assert rt.add("noloop", ns.path).ok
    assert curl(ns, http_port).returncode != 0
    assert rt.delete("noloop", ns.path).ok


def test_add_twice_is_an_error(runtime_factory: Any, netns_factory: Any, rundir: str) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist())
    assert rt.add("dup", ns.path).ok
    out = rt.add("dup", ns.path)
    assert out.code == plugin.ERR_EXISTS and "dup" in out.msg
    assert ns.link("eth0") is not None  # the first attachment is untouched
    assert rt.check("dup", ns.path).ok
    assert rt.delete("dup", ns.path).ok


def test_add_fails_cleanly_when_the_name_is_taken(runtime_factory: Any, netns_factory: Any,
                                                  rundir: str) -> None:
    ns = netns_factory()
    ns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"])
    rt = runtime_factory(slirp_conflist())
    out = rt.add("taken", ns.path)
    assert out.code == plugin.ERR_SETUP_FAILED and "eth0" in out.msg
    assert states(rundir) == []
    assert ns.link("eth0") is not None  # the veth is left alone


ECHO_SERVER = """
import socket, sys, threading
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 8080)); t.listen(8)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5300))
def udp():
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(b"udp:" + data, peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, _ = t.accept()
    c.sendall(b"tcp:" + c.recv(2048)); c.close()
"""


def test_port_mappings_forward_host_ports(runtime_factory: Any, netns_factory: Any,
                                          rundir: str) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(capabilities={"portMappings": True}))
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    mappings = tcp_udp_mappings(tcp_port, udp_port, "127.0.0.1")
    out = rt.add("pm", ns.path, runtime_config={"portMappings": mappings})
    assert out.ok, out.doc
    server = ns.popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as c:
        c.sendall(b"ping")
        assert c.recv(100) == b"tcp:ping"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(10)
        u.sendto(b"ping", ("127.0.0.1", udp_port))
        assert u.recvfrom(100)[0] == b"udp:ping"
    assert rt.delete("pm", ns.path, runtime_config={"portMappings": mappings}).ok
    with pytest.raises(ConnectionRefusedError), \
            socket.create_connection(("127.0.0.1", tcp_port), timeout=10):
        pass


def test_port_mapping_on_a_taken_port_fails_cleanly(runtime_factory: Any, netns_factory: Any,
                                                    rundir: str) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist(capabilities={"portMappings": True}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = rt.add("busy", ns.path, runtime_config={"portMappings": [
            {"hostPort": port, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}]})
    assert out.code == plugin.ERR_SETUP_FAILED and str(port) in out.msg, out.doc
    assert ns.link("eth0") is None and states(rundir) == []
    assert rt.add("busy", ns.path, runtime_config={"portMappings": []}).ok
    assert rt.delete("busy", ns.path).ok


def test_netns_path_kinds(runtime_factory: Any, netns_factory: Any, http_port: int) -> None:
    """/var/run/netns/NAME and /proc/PID/ns/net work like /run/netns/NAME."""
    rt = runtime_factory(slirp_conflist())
    a, b = netns_factory(), netns_factory()
    holder = b.popen(["sleep", "600"])
    assert wait_until(lambda: b.pids())
    paths = {"a": "/var/run/netns/" + a.name, "b": f"/proc/{b.pids()[0]}/ns/net"}
    for cid, path in paths.items():
        out = rt.add(cid, path)
        assert out.ok, out.doc
        assert out.doc["interfaces"][0]["sandbox"] == path
    for ns in (a, b):
        assert curl(ns, http_port).stdout == HTTP_BODY.decode()
    for cid, path in paths.items():
        assert rt.check(cid, path).ok
        assert rt.delete(cid, path).ok
    holder.kill()


def test_chained_with_debian_tuning(runtime_factory: Any, netns_factory: Any,
                                    http_port: int) -> None:
    conflist = {"cniVersion": "1.0.0", "name": "slirptest", "plugins": [
        {"type": "slirp", "mtu": 4000},
        {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.accept_local": "1"},
         "promisc": True},
    ]}
    ns = netns_factory()
    rt = runtime_factory(conflist)
    out = rt.add("tuned", ns.path)
    assert out.ok, (out.doc, out.stderr)
    assert out.doc["interfaces"][0]["name"] == "eth0"
    assert out.doc["ips"][0]["address"] == "10.0.2.100/24"
    assert ns.run(["cat", "/proc/sys/net/ipv4/conf/eth0/accept_local"]).stdout.strip() == "1"
    assert "PROMISC" in ns.link("eth0")["flags"]
    assert curl(ns, http_port).stdout == HTTP_BODY.decode()
    out = rt.check("tuned", ns.path)
    assert out.ok, out.doc
    assert rt.delete("tuned", ns.path).ok
    assert ns.link("eth0") is None


def test_check_notices_a_missing_route_and_address(runtime_factory: Any,
                                                   netns_factory: Any) -> None:
    ns = netns_factory()
    rt = runtime_factory(slirp_conflist())
    assert rt.add("chk", ns.path).ok
    ns.run(["ip", "route", "del", "default"])
    out = rt.check("chk", ns.path)
    assert out.code == plugin.ERR_CHECK_FAILED and "route" in out.msg
    ns.run(["ip", "addr", "flush", "dev", "eth0"])
    out = rt.check("chk", ns.path)
    assert out.code == plugin.ERR_CHECK_FAILED and "address" in out.msg
    ns.run(["ip", "link", "del", "eth0"])
    out = rt.check("chk", ns.path)
    assert not out.ok and "eth0" in out.msg, out.doc
    assert rt.delete("chk", ns.path).ok


def test_twenty_containers_at_once(runtime_factory: Any, netns_factory: Any, http_port: int,
                                   rundir: str) -> None:
    rt = runtime_factory(slirp_conflist())
    spaces = {f"ctr{i:02d}": netns_factory() for i in range(20)}
    with ThreadPoolExecutor(20) as pool:
        outs = list(pool.map(lambda kv: rt.add(kv[0], kv[1].path), spaces.items()))
    assert all(o.ok for o in outs), [o.doc for o in outs if not o.ok]
    engines = {state["engine"]["pid"] for _path, state in plugin.list_states(rundir)}
    assert len(engines) == 1 and len(states(rundir)) == 20  # one engine serves them all
    with open(os.path.join(rundir, "engine.log")) as f:
        log = f.read()
    assert log.count(" serving ") == 1 and "another engine" not in log  # and only one started
    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(lambda ns: curl(ns, http_port), spaces.values()))
    assert [g.stdout for g in got] == [HTTP_BODY.decode()] * 20, [g.stderr for g in got]
    with ThreadPoolExecutor(20) as pool:
        dels = list(pool.map(lambda kv: rt.delete(kv[0], kv[1].path), spaces.items()))
    assert all(d.ok for d in dels)
    assert states(rundir) == []
    assert wait_until(lambda: engine_gone(rundir))


def test_engine_killed_then_del_and_gc_clean_up(runtime_factory: Any, netns_factory: Any,
                                                rundir: str) -> None:
    rt = runtime_factory(slirp_conflist())
    spaces = {c: netns_factory() for c in ("k1", "k2", "k3", "k4")}
    for cid, ns in spaces.items():
        assert rt.add(cid, ns.path).ok
    pid = engine_pid(rundir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid))

    out = rt.check("k1", spaces["k1"].path)
    assert out.code == plugin.ERR_ENGINE_GONE and "gone" in out.msg
    # The TAP dies with the engine's fds (the kernel finishes that a moment later);
    # then simulate one that is still there for k2.
    assert wait_until(lambda: spaces["k2"].link("eth0") is None)
    spaces["k2"].run(["ip", "tuntap", "add", "dev", "eth0", "mode", "tap"])
    for cid in ("k1", "k2"):
        assert rt.delete(cid, spaces[cid].path).ok
        assert spaces[cid].link("eth0") is None
    assert states(rundir) == ["slirptest:k3:eth0.json", "slirptest:k4:eth0.json"]
    out = rt.gc([("k4", "eth0")])
    assert out.ok, out.doc
    assert states(rundir) == ["slirptest:k4:eth0.json"]
    assert rt.delete("k4", spaces["k4"].path).ok
    assert states(rundir) == []
    assert wait_until(lambda: engine_gone(rundir))
    for ns in spaces.values():
        assert [lk["ifname"] for lk in ns.links()] == ["lo"]


def test_gc_deletes_live_attachments_not_listed(runtime_factory: Any, netns_factory: Any,
                                                http_port: int, rundir: str) -> None:
    rt = runtime_factory(slirp_conflist())
    keep, drop = netns_factory(), netns_factory()
    assert rt.add("keep", keep.path).ok
    assert rt.add("drop", drop.path).ok
    assert rt.gc([("keep", "eth0")]).ok
    assert drop.link("eth0") is None
    assert states(rundir) == ["slirptest:keep:eth0.json"]
    assert curl(keep, http_port).stdout == HTTP_BODY.decode()
    other = runtime_factory({**slirp_conflist(), "name": "othernet"})
    assert other.gc([]).ok  # another network's GC leaves ours alone
    assert states(rundir) == ["slirptest:keep:eth0.json"]
    assert rt.delete("keep", keep.path).ok


def test_container_in_its_own_user_namespace(runtime_factory: Any, http_port: int) -> None:
    """A rootless container's netns belongs to a user namespace of its own."""
    rt = runtime_factory(slirp_conflist())
    with UserNetNS("cni-userns") as ns:
        out = rt.add("uns", ns.path)
        assert out.ok, out.doc
        assert curl(ns, http_port).stdout == HTTP_BODY.decode()
        assert rt.check("uns", ns.path).ok
        assert rt.delete("uns", ns.path).ok
        assert ns.link("eth0") is None


def test_plugin_run_inside_a_rootless_runtimes_user_namespace(cni_bin: str, env: dict[str, str],
                                                              rundir: str,
                                                              http_port: int) -> None:
    """The runtime (and so the plugin and its engine) lives in the user namespace too."""
    with UserNetNS("cni-rootless") as ns:
        inside = ["nsenter", f"--target={ns.pid}", "--user", "--preserve-credentials"]
        conf = {"cniVersion": "1.1.0", "name": "slirptest", "type": "slirp"}
        out = exec_plugin(cni_bin, "slirp", "ADD", conf, container_id="rl", netns=ns.path,
                          ifname="eth0", extra_env=env, prefix=inside)
        assert out.ok, (out.doc, out.stderr)
        pid = engine_pid(rundir)
        assert pid is not None
        assert os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat(ns.userns_path).st_ino
        assert curl(ns, http_port).stdout == HTTP_BODY.decode()
        out = exec_plugin(cni_bin, "slirp", "DEL", {**conf, "prevResult": out.doc},
                          container_id="rl", netns=ns.path, ifname="eth0", extra_env=env,
                          prefix=inside)
        assert out.ok, out.doc
        assert ns.link("eth0") is None
        assert wait_until(lambda: engine_gone(rundir))


def test_netns_deleted_before_del(runtime_factory: Any, rundir: str) -> None:
    """Runtimes often delete the namespace first: CHECK then fails, DEL still cleans up."""
    rt = runtime_factory(slirp_conflist())
    ns = NetNS("cni-gone")
    path = ns.path
    try:
        assert rt.add("gone", path).ok
    finally:
        ns.close()
    out = rt.check("gone", path)
    assert out.code == plugin.ERR_INVALID_ENV and "CNI_NETNS" in out.msg, out.doc
    assert rt.delete("gone", path).ok
    assert rt.delete("gone", None).ok
    assert states(rundir) == []
    assert wait_until(lambda: engine_gone(rundir))


def test_engine_is_detached_from_the_plugin(cni_bin: str, env: dict[str, str], rundir: str,
                                            netns_factory: Any) -> None:
    """Own session, stdio on /dev/null and the log, none of the runtime's descriptors."""
    ns = netns_factory()
    leaked_r, leaked_w = os.pipe()  # an inheritable descriptor the "runtime" leaks to us
    os.set_inheritable(leaked_r, True)
    os.set_inheritable(leaked_w, True)
    envs = {**os.environ, **env, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "det",
            "CNI_NETNS": ns.path, "CNI_IFNAME": "eth0", "CNI_PATH": cni_bin}
    try:
        proc = subprocess.Popen([os.path.join(cni_bin, "slirp")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=envs,
                                pass_fds=(leaked_r, leaked_w))
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        runtime_pipes = {os.fstat(f.fileno()).st_ino
                         for f in (proc.stdin, proc.stdout, proc.stderr)}
        out, err = proc.communicate(b'{"cniVersion": "1.1.0", "name": "slirptest", '
                                    b'"type": "slirp"}', timeout=60)
        assert proc.returncode == 0, err
        pid = engine_pid(rundir)
        assert pid is not None
        links = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(
            f"/proc/{pid}/fd")}
        assert links[0] == links[1] == "/dev/null"
        assert links[2] == os.path.join(rundir, "engine.log")
        leaked = {f"pipe:[{ino}]" for ino in runtime_pipes | {os.fstat(leaked_r).st_ino}}
        assert not leaked & set(links.values())
        assert os.getsid(pid) != os.getsid(0)
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
    conf = {"cniVersion": "1.1.0", "name": "slirptest", "type": "slirp"}
    assert exec_plugin(cni_bin, "slirp", "DEL", conf, container_id="det", netns=ns.path,
                       ifname="eth0", extra_env=env).ok


@pytest.mark.parametrize("name", ["10-slirp.conflist", "10-slirp.json", "20-slirp6.conflist"])
def test_example_configurations_work(name: str, runtime_factory: Any, netns_factory: Any,
                                     http_port: int) -> None:
    with open(os.path.join(REPO, "cni", name)) as f:
        conf = json.load(f)
    if "plugins" not in conf:  # the single-plugin form, as libcni wraps it
        conf = {"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": [conf]}
    rt = runtime_factory(conf, cni_path=f"{os.path.join(REPO, 'cni')}:{DEBIAN_PLUGINS}")
    ns = netns_factory()
    out = rt.add("example", ns.path, runtime_config={"portMappings": []})
    assert out.ok, (out.doc, out.stderr)
    assert curl(ns, http_port).stdout == HTTP_BODY.decode()
    assert rt.check("example", ns.path).ok
    assert rt.delete("example", ns.path).ok
