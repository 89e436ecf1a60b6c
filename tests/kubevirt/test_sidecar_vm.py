"""The whole binding: a real VM started with the QEMU arguments the sidecar put in its domain.

What virt-launcher would do, minus libvirt: ask the sidecar (in its own
network namespace, standing in for the pod) for the domain, take the
``<qemu:commandline>`` arguments from the answer and start QEMU with them.
The guest must then get its lease, carry the VMI's MAC, fetch a file from
the pod's loopback through 10.0.2.2, take a SLAAC address from the stack's
router advertisements (IPv6 is on by default, as under QEMU's own user
networking) and fetch from the pod's ``::1`` through ``[fd00::2]``, and serve
a port that a client in the pod reaches through the forward the sidecar set up
from the VMI's ``ports``, over IPv4 and IPv6 (the pod's ``[::1]`` reaches the
VM's SLAAC address).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.kubevirt.test_domain import qemu_args
from tests.kubevirt.test_sidecar import Sidecar, sidecar  # noqa: F401 (fixture)
from tests.vm import guest
from tests.vm.test_vm import SERVERS, SERVERS6, kernel  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

MAC = "02:42:ac:11:00:02"


def in_pod(side: Sidecar, *args: str, **kw: object) -> subprocess.Popen[str]:
    """Run a command in the sidecar's network namespace."""
    return subprocess.Popen(["nsenter", f"--net=/proc/{side.proc.pid}/ns/net", *args],
                            text=True, **kw)  # type: ignore[call-overload]


FETCH = """
import hashlib, socket, sys, urllib.request
for host in ("127.0.0.1", "[::1]"):
    url = f"http://{host}:{sys.argv[1]}/guest.bin"
    body = urllib.request.urlopen(url, timeout=60).read()
    print(host, len(body), hashlib.sha256(body).hexdigest(), flush=True)
socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=30).close()
"""


def test_vm_runs_on_the_domain_the_sidecar_returned(
        sidecar: Sidecar, protos: SimpleNamespace, domain_xml: bytes, vmi_json: bytes,  # noqa: F811
        kernel: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    vmi = json.loads(vmi_json)
    iface = vmi["spec"]["domain"]["devices"]["interfaces"][0]
    iface["ports"] = [{"name": "http", "port": 8080}, {"name": "done", "port": 8081}]
    out = sidecar.define(protos, domain_xml, json.dumps(vmi).encode())
    nic = qemu_args(out)
    assert nic[0] == "-netdev" and nic[2] == "-device" and "virtio-net-pci" in nic[3]

    servers = in_pod(sidecar, sys.executable, str(SERVERS), str(tmp_path / "state"),
                     "--size", str(1 << 20), stdout=subprocess.PIPE)
    servers6 = in_pod(sidecar, sys.executable, str(SERVERS6), str(1 << 20),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    qemu = None
    try:
        assert servers.stdout is not None and servers6.stdout is not None
        info = json.loads(servers.stdout.readline())
        info6 = json.loads(servers6.stdout.readline())
        vmlinuz, modules = kernel
        initrd = tmp_path / "initrd.cpio"
        guest.build_initramfs(initrd, modules)
        console = tmp_path / "console.log"
        qemu = subprocess.Popen(
            guest.qemu_command(vmlinuz, initrd, "", console,
                               f"vmtest_http={info['http']} vmtest_fwd=1 vmtest_dns=0 "
                               f"vmtest_http6={info6['http']}", nic=nic),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "qemu.log", "wb"))  # noqa: SIM115
        con = guest.Console(console)
        assert con.wait_for(r"^VM: mac (\S+)", qemu, 180).group(1) == MAC
        # The VMI's model (virtio, KubeVirt's default) is the NIC the guest found.
        assert con.wait_for(r"^VM: driver (\S+)", qemu, 60).group(1) == "virtio_net"
        lease = con.wait_for(r"^VM: lease (\S+) mask \S+ router (\S+) dns (\S+) mtu (\S+)",
                             qemu, 120)
        # virtio: the 65520-byte link MTU the sidecar chose, by DHCP and by the device.
        assert lease.groups() == ("10.0.2.15", "10.0.2.2", "10.0.2.3", "65520")
        assert con.wait_for(r"^VM: link mtu (\d+)", qemu, 10).group(1) == "65520"
        assert con.wait_for(r"^VM: payload (\S+)", qemu, 120).group(1) == info["sha256"]
        # 02:42:ac:11:00:02 -> interface identifier 0042:acff:fe11:0002 (RFC 4291 A).
        assert con.wait_for(r"^VM: ipv6 addr (\S+)", qemu, 60).group(1) == \
            "fd00000000000000" + "0042acfffe110002"
        con.wait_for(r"^VM: ping6 fd00::2 ok", qemu, 30)
        assert con.wait_for(r"^VM: payload6 (\S+)", qemu, 120).group(1) == info6["sha256"]
        served = con.wait_for(r"^VM: serving (\S+)", qemu, 60).group(1)

        client = in_pod(sidecar, sys.executable, "-c", FETCH, "8080", "8081",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        fetched, err = client.communicate(timeout=120)
        assert client.returncode == 0, err
        # The same file over the pod's IPv4 and IPv6 loopback: the ports are forwarded
        # to the VM's IPv4 address and to the IPv6 address it took by SLAAC.
        assert fetched.split() == ["127.0.0.1", str(256 * 1024), served,
                                   "[::1]", str(256 * 1024), served]
        con.wait_for(r"^VM: done", qemu, 60)
        assert qemu.wait(timeout=60) == 0
    finally:
        for proc in (qemu, servers, servers6):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
