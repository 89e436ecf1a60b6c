"""podman (Debian's 4.3) with ``--network slirp4netns`` running pyslirp through the shim.

podman starts ``network_cmd_path`` from containers.conf (``[engine]``) as
``--disable-host-loopback --mtu=65520 --enable-sandbox --enable-seccomp
--enable-ipv6 -c -e 3 -r 4 --api-socket /run/libpod/ID.net --netns-type=path
/run/netns/netns-ID tap0`` (``--disable-host-loopback`` unless
``allow_host_loopback=true``), and with ``port_handler=slirp4netns`` adds
each ``-p`` over the API socket. A recorder in front of the shim keeps the
arguments; it ``exec``s the shim, so the PID podman holds is pyslirp.

podman runs with only its network namespace switched (``nsenter --net``) to
the session's "host" namespace, so pyslirp's host sockets reach nothing but
the test servers on its loopback (``ip netns exec`` would remount /sys and
hide the cgroup mounts runc needs). The container is a busybox tree
(``--rootfs``), its storage under the test's directory; flags as docs/testing.md
says (runc, cgroupfs, explicit rlimits).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyslirp.runtime import sandbox
from tests.e2e import servers6 as servers6_script
from tests.e2e.conftest import Host, alive
from tests.e2e.recorded import (
    MODES,
    fetch_published_port,
    install_recorded_shim,
    served_stack,
    stop_shared_engine,
    wait_until_ready,
)
from tests.e2e.servers import HELLO
from tests.netutil import free_port
from tests.podmanutil import busybox_rootfs, remove_pods, require_podman

pytestmark = pytest.mark.e2e

NET_BIND_SERVICE = 1 << sandbox.CAP_NET_BIND_SERVICE
INNER_PORT = 8080
BODY = "served from inside podman\n"


@dataclass
class PodRun:
    status: int
    output: str
    argv: list[str]
    inside: dict[str, str]
    host_fetch: str
    caps: dict[str, int]
    seccomp: str
    outlived: bool
    #: Served by the shared engine (caps and seccomp are the engine's).
    shared: bool


PodRunner = Callable[..., PodRun]

#: The container's IPv6 checks: wait (up to 10 s) for a global address on tap0 that is no
#: longer tentative (flag 0x40 in /proc/net/if_inet6), then fetch over IPv6.
_IPV6_PART = (
    "i=0; while [ $i -lt 100 ]; do "
    "a=$(awk '$6 == \"tap0\" && $4 == \"00\" && $5 !~ /^[4-7c-f]/ {{ print $1 }}' "
    "/proc/net/if_inet6); [ -n \"$a\" ] && break; i=$((i + 1)); sleep 0.1; done; "
    "echo \"addr6 ${{a:-none}}\" >> /tmp/inside.txt; "
    "echo \"route6 $(ip -6 route show default | head -n 1)\" >> /tmp/inside.txt; "
    "if wget -q -O /tmp/p6 'http://[fd00::2]:{port}/'; "
    "then echo \"fetch6 $(sha256sum /tmp/p6)\" >> /tmp/inside.txt; "
    "else echo 'fetch6 failed' >> /tmp/inside.txt; fi; ")


@pytest.fixture(params=MODES)
def podman_slirp(host: Host, request: pytest.FixtureRequest) -> Iterator[PodRunner]:
    """podman runs for one mode of the shim: a stack process per container, or the
    shared engine (``shim install --shared-engine``)."""
    require_podman("nsenter")
    # podman refuses a runroot longer than 50 characters: pytest's tmp_path is too deep.
    work = Path(tempfile.mkdtemp(prefix="pyslirp-pod-", dir="/tmp"))
    rootfs = busybox_rootfs(work / "rootfs",
                            ("sh", "wget", "ip", "cat", "httpd", "sleep", "awk", "echo",
                             "sha256sum"), ("www",))
    (rootfs / "www" / "index.html").write_text(BODY)
    shared_rundir = work / "rundir" if request.param == "shared" else None
    recorder = install_recorded_shim(work, shared_rundir)
    conf = work / "containers.conf"
    conf.write_text(f'[engine]\nnetwork_cmd_path = "{recorder}"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    base = ["nsenter", f"--net={host.ns.path}", "podman", "--root", str(work / "root"),
            "--runroot", str(work / "runroot"), "--runtime=runc", "--cgroup-manager=cgroupfs"]
    api_sockets: list[str] = []

    def run(network: str, http6: int | None = None) -> PodRun:
        """``http6``: also wait for a SLAAC address and fetch from ``[fd00::2]:http6``."""
        out, done = rootfs / "tmp" / "inside.txt", rootfs / "tmp" / "done"
        for f in (out, done, work / "argv.log"):
            f.unlink(missing_ok=True)
        host_port = free_port()
        script = (f"httpd -p {INNER_PORT} -h /www; "
                  + (_IPV6_PART.format(port=http6) if http6 else "") +
                  "echo \"addr $(ip -4 -o addr show tap0 | awk '{print $4}')\" >> /tmp/inside.txt; "
                  f"if wget -q -O - http://10.0.2.2:{host.http}/hello > /tmp/hello; "
                  "then echo \"gateway_fetch $(cat /tmp/hello)\" >> /tmp/inside.txt; "
                  "else echo 'gateway_fetch failed' >> /tmp/inside.txt; fi; "
                  "echo ready >> /tmp/inside.txt; "
                  "while [ ! -e /tmp/done ]; do sleep 0.05; done")
        argv = [*base, "run", "--rm", "--ulimit", "nofile=1024:1024", "--ulimit",
                "nproc=1024:1024", "--network", network,
                "-p", f"127.0.0.1:{host_port}:{INNER_PORT}", "--rootfs", str(rootfs),
                "sh", "-c", script]
        pod = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=env, text=True)
        try:
            def podman_output() -> str:
                pod.kill()
                return pod.communicate()[0]

            wait_until_ready(out, pod, 120, "the container", podman_output)
            stack = served_stack(work / "argv.log", shared_rundir)
            pid, args = stack.pid, stack.args
            api_sockets.extend(args[i + 1] for i, a in enumerate(args) if a == "--api-socket")
            fetch = fetch_published_port(host, host_port)  # podman adds it over the API
            done.touch()
            output, _ = pod.communicate(timeout=120)
            # podman's exit fd ends the stack with the container
            deadline = time.monotonic() + 30
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            done.touch()
            if pod.poll() is None:
                pod.kill()
                pod.wait(timeout=30)
        inside = dict(line.split(" ", 1) for line in out.read_text().splitlines() if " " in line)
        return PodRun(pod.returncode, output, args, inside, fetch, stack.caps, stack.seccomp,
                      alive(pid), shared_rundir is not None)

    try:
        yield run
    finally:
        remove_pods(base, env, work)
        if shared_rundir is not None:
            stop_shared_engine(shared_rundir)
        for path in api_sockets:  # under --enable-sandbox the stack cannot reach it any more
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(work, ignore_errors=True)


def test_podman_default_slirp4netns(podman_slirp: PodRunner,
                                    servers6: dict[str, object]) -> None:
    result = podman_slirp("slirp4netns:port_handler=slirp4netns", http6=servers6["http"])
    assert result.status == 0, result.output
    # podman 4.3's exact shape
    assert result.argv[:5] == ["--disable-host-loopback", "--mtu=65520", "--enable-sandbox",
                               "--enable-seccomp", "--enable-ipv6"]
    assert result.argv[5:10] == ["-c", "-e", "3", "-r", "4"]
    assert result.argv[10] == "--api-socket" and result.argv[11].startswith("/run/libpod/")
    assert result.argv[12] == "--netns-type=path" and result.argv[14] == "tap0"
    assert result.inside["addr"] == "10.0.2.100/24"
    assert result.inside["gateway_fetch"] == "failed"  # podman's default: no host loopback
    # IPv6 by default too: a SLAAC address, and no host loopback through [fd00::2] either.
    assert result.inside["addr6"].startswith("fd00000000000000"), result.inside
    assert result.inside["fetch6"] == "failed"
    assert result.host_fetch == BODY
    assert result.seccomp == "2"
    if not result.shared:  # the shared engine keeps its capabilities (docs/shared-engine.md)
        assert result.caps["CapEff"] == NET_BIND_SERVICE
    assert not result.outlived


@pytest.fixture
def servers6(host: Host) -> Iterator[dict[str, object]]:
    """An HTTP server on the host namespace's ``::1`` (tests/e2e/servers6.py)."""
    with servers6_script.running(4096, host.ns.popen) as info:
        yield info


def test_podman_slirp4netns_ipv6(podman_slirp: PodRunner, servers6: dict[str, object]) -> None:
    """podman passes ``--enable-ipv6`` (4.3 by default, as 5 does): the container's kernel
    takes a SLAAC address in fd00::/64 and a default route from our RA, and reaches the
    host's ``::1`` through ``[fd00::2]`` (with host loopback allowed)."""
    result = podman_slirp("slirp4netns:port_handler=slirp4netns,allow_host_loopback=true,"
                          "enable_ipv6=true", http6=servers6["http"])
    assert result.status == 0, result.output
    assert "--enable-ipv6" in result.argv
    addr6 = result.inside["addr6"]
    assert addr6.startswith("fd00000000000000") and addr6 != "fd00" + "0" * 28, addr6
    assert result.inside["route6"].startswith("default via fe80::"), result.inside
    assert result.inside["fetch6"].split()[0] == servers6["sha256"], result.inside
    assert result.host_fetch == BODY
    assert not result.outlived


def test_podman_allow_host_loopback(podman_slirp: PodRunner, host: Host) -> None:
    result = podman_slirp("slirp4netns:port_handler=slirp4netns,allow_host_loopback=true")
    assert result.status == 0, result.output
    assert "--disable-host-loopback" not in result.argv
    assert result.inside["gateway_fetch"] == HELLO.decode().strip()
    assert result.host_fetch == BODY
    assert not result.outlived
