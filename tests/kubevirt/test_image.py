"""kubevirt/Containerfile built and run: the sidecar image as KubeVirt would run it.

The image is built with podman from a base made here (tests/imageutil.py: a debootstrapped
bookworm with python3, cached outside the clone), with no package index reachable from the
build (``--network=none``): the wheels of the dependencies come from this machine's pip
through a read-only build volume, pyslirp itself is built in the image from the sources.

The container runs as the image says (uid 107) with no network but its own loopback (the
pod's stand-in) and the hook directory mounted at /var/run/kubevirt-hooks, the volume
virt-launcher shares with it. The test then is virt-launcher: Info, OnDefineDomain on a
real domain XML over the hook socket, QEMU started with the arguments from the answer
(in a mount namespace of its own where the same directory is at /var/run/kubevirt-hooks,
as in virt-launcher's container), and Shutdown when the VM is done.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.imageutil import (
    RUN_LIMITS,
    Podman,
    base_image,
    require_tools,
    shadowed,
    wheelhouse,
)
from tests.kubevirt.test_domain import qemu_args, validate
from tests.kubevirt.test_sidecar_vm import FETCH, MAC
from tests.nsutil import unix_listening
from tests.vm import guest
from tests.vm.test_vm import SERVERS, kernel  # noqa: F401 (fixture)

grpc = pytest.importorskip("grpc")

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/pyslirp-kubevirt-sidecar:test"
HOOKS = "/var/run/kubevirt-hooks"  # in the sidecar's and in virt-launcher's containers
#: Builds and containers see only local images and no network but their own loopback.
OFFLINE = ("--pull=never", "--network=none", *RUN_LIMITS)
#: What the image may add to its base: the venv with pyslirp, grpcio, protobuf, uvloop.
MAX_ADDED_BYTES = 80_000_000


@dataclass
class Built:
    podman: Podman
    work: Path
    base: str
    image: str


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    require_tools("podman", "runc", "debootstrap", "unshare", "nsenter",
                  apt="podman runc debootstrap util-linux")
    work = Path(tempfile.mkdtemp(prefix="pyslirp-img-", dir="/tmp"))
    podman = Podman(work / "podman")
    try:
        base = base_image(podman)
        wheels = wheelhouse(REPO / "pyproject.toml", work / "wheels")
        podman("build", *OFFLINE, "--volume", f"{wheels}:/mnt:ro",
               "--build-arg", f"BASE={base}",
               "--build-arg", "PIP_OPTIONS=--no-index --find-links /mnt",
               "--file", str(REPO / "kubevirt" / "Containerfile"), "--tag", IMAGE, str(REPO),
               timeout=900)
        yield Built(podman, work, base, IMAGE)
    finally:
        podman.close()
        shutil.rmtree(work, ignore_errors=True)


def test_image_holds_the_sidecar_and_nothing_to_build_with(built: Built,
                                                           record_property: Any) -> None:
    """The image runs as 107, has pyslirp with its gRPC dependencies, and no pip,
    setuptools, compiler, test extras, pip cache or sources; it stays small."""
    user = built.podman("image", "inspect", "--format", "{{.Config.User}}", built.image)
    assert user.stdout.strip() == "107:107"
    probe = built.podman(  # as root, to see /root too
        "run", "--rm", *OFFLINE, "--user", "0", "--entrypoint", "sh",
        built.image, "-c",
        "python3 -c 'import grpc, google.protobuf, uvloop, pyslirp.kubevirt' && echo imports-ok; "
        "for t in pip pip3 gcc cc; do command -v $t; done; "
        "python3 -c 'import importlib.util as u; print([m for m in (\"pip\", \"setuptools\", "
        "\"grpc_tools\", \"pytest\", \"scapy\") if u.find_spec(m)])'; "
        "find /src /root/.cache /mnt -mindepth 1 2>/dev/null; true")
    assert probe.stdout.split() == ["imports-ok", "[]"], probe.stdout + probe.stderr
    size, base_size = built.podman.image_size(built.image), built.podman.image_size(built.base)
    record_property("image_bytes", size)
    record_property("added_bytes", size - base_size)
    print(f"\nsidecar image {size / 1e6:.1f} MB, {(size - base_size) / 1e6:.1f} MB over its base")
    assert size - base_size < MAX_ADDED_BYTES, (size, base_size)


@dataclass
class PodSidecar:
    """The running sidecar container: ``hooks`` is the host side of its hook volume."""

    podman: Podman
    name: str
    pid: int
    hooks: Path
    channel: Any

    def define(self, protos: SimpleNamespace, xml: bytes, vmi: bytes) -> bytes:
        params = protos.api_v1alpha3_pb2.OnDefineDomainParams(domainXML=xml, vmi=vmi)
        stub = protos.api_v1alpha3_pb2_grpc.CallbacksStub(self.channel)
        result: bytes = stub.OnDefineDomain(params, timeout=30).domainXML
        return result

    def in_pod(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["nsenter", f"--net=/proc/{self.pid}/ns/net", *args],
                                text=True, **kw)


@pytest.fixture
def pod_sidecar(built: Built) -> Iterator[PodSidecar]:
    hooks = Path(tempfile.mkdtemp(prefix="hooks-", dir=built.work))
    os.chown(hooks, 107, 107)  # KubeVirt's hook volume is the sidecar user's
    name = f"pyslirp-sidecar-{hooks.name}"
    built.podman("run", "--detach", *OFFLINE, "--name", name,
                 "--volume", f"{hooks}:{HOOKS}", built.image, "--dns-upstream=127.0.0.1:9")
    channel = None
    try:
        pid = int(built.podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
        deadline = time.monotonic() + 60
        while not unix_listening(pid, f"{HOOKS}/slirp.sock"):
            logs = built.podman("logs", name, check=False).stderr
            assert time.monotonic() < deadline, "the sidecar did not listen: " + logs
            assert built.podman("inspect", "--format", "{{.State.Running}}",
                                name).stdout.strip() == "true", logs
            time.sleep(0.05)
        channel = grpc.insecure_channel(f"unix:{hooks / 'slirp.sock'}")
        yield PodSidecar(built.podman, name, pid, hooks, channel)
    finally:
        if channel is not None:
            channel.close()
        built.podman("rm", "--force", "--time", "0", name, check=False)


def test_sidecar_image_serves_virt_launcher_and_a_vm(
        pod_sidecar: PodSidecar, protos: SimpleNamespace, domain_xml: bytes, vmi_json: bytes,
        kernel: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    side = pod_sidecar
    ids = dict(line.split(":", 1) for line in
               Path(f"/proc/{side.pid}/status").read_text().splitlines())
    assert ids["Uid"].split() == ids["Gid"].split() == ["107"] * 4  # the image's USER
    info = protos.api_info_pb2_grpc.InfoStub(side.channel).Info(
        protos.api_info_pb2.InfoParams(), timeout=10)
    assert info.name == "network-slirp-binding"
    assert sorted(p.name for p in info.hookPoints) == ["OnDefineDomain", "Shutdown"]

    vmi = json.loads(vmi_json)
    iface = vmi["spec"]["domain"]["devices"]["interfaces"][0]
    iface["ports"] = [{"name": "http", "port": 8080}, {"name": "done", "port": 8081}]
    out = side.define(protos, domain_xml, json.dumps(vmi).encode())
    validate(out, tmp_path)
    nic = qemu_args(out)
    assert nic[:2] == ["-netdev", "stream,id=pyslirp-default,server=off,addr.type=unix,"
                                  f"addr.path={HOOKS}/pyslirp/default.sock"]
    stack_socket = side.hooks / "pyslirp" / "default.sock"
    st = stack_socket.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (107, 107, 0o600)

    _boot_guest(side, nic, kernel, tmp_path)

    shutdown = protos.api_v1alpha3_pb2_grpc.CallbacksStub(side.channel).Shutdown
    shutdown(protos.api_v1alpha3_pb2.ShutdownParams(), timeout=30)
    exited = side.podman("wait", side.name, timeout=60).stdout.strip()
    assert exited == "0", side.podman("logs", side.name, check=False).stderr
    # The hook volume is as the sidecar found it.
    assert list(side.hooks.iterdir()) == []


def _boot_guest(side: PodSidecar, nic: list[str], kernel_files: tuple[Path, Path],
                tmp_path: Path) -> None:
    """tests/kubevirt/test_sidecar_vm.py's guest, QEMU seeing the hook volume at HOOKS."""
    servers = side.in_pod(sys.executable, str(SERVERS), str(tmp_path / "state"),
                          "--size", str(1 << 20), stdout=subprocess.PIPE)
    qemu = None
    try:
        assert servers.stdout is not None
        served_file = json.loads(servers.stdout.readline())
        vmlinuz, modules = kernel_files
        initrd = tmp_path / "initrd.cpio"
        guest.build_initramfs(initrd, modules)
        console = tmp_path / "console.log"
        argv = guest.qemu_command(vmlinuz, initrd, "", console,
                                  f"vmtest_http={served_file['http']} vmtest_fwd=1 vmtest_dns=0",
                                  nic=nic)
        qemu = subprocess.Popen(shadowed(side.hooks.parent, {HOOKS: side.hooks}, argv),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "qemu.log", "wb"))  # noqa: SIM115
        con = guest.Console(console)
        assert con.wait_for(r"^VM: mac (\S+)", qemu, 180).group(1) == MAC
        lease = con.wait_for(r"^VM: lease (\S+) mask \S+ router (\S+) dns (\S+) mtu (\S+)",
                             qemu, 120)
        assert lease.groups() == ("10.0.2.15", "10.0.2.2", "10.0.2.3", "65520")
        assert con.wait_for(r"^VM: payload (\S+)", qemu, 120).group(1) == served_file["sha256"]
        served = con.wait_for(r"^VM: serving (\S+)", qemu, 60).group(1)
        # A client in the pod reaches the guest through the forwards of the VMI's ports.
        client = side.in_pod(sys.executable, "-c", FETCH, "8080", "8081",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        fetched, err = client.communicate(timeout=120)
        assert client.returncode == 0, err
        # Over the pod's IPv4 and IPv6 loopback (the image's stacks serve IPv6 by default).
        assert fetched.split() == ["127.0.0.1", str(256 * 1024), served,
                                   "[::1]", str(256 * 1024), served]
        con.wait_for(r"^VM: done", qemu, 60)
        assert qemu.wait(timeout=60) == 0, (tmp_path / "qemu.log").read_text()
    finally:
        for proc in (qemu, servers):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
