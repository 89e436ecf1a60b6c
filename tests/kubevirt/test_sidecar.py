"""``pyslirp kubevirt-sidecar`` as virt-launcher sees it: a gRPC client on the hook socket.

The sidecar runs in a network namespace of its own, as it would in a pod
(``unshare --net`` with only loopback up), so the ports it forwards are that
namespace's and nothing on the machine is touched. The client is generated
from the .proto files (conftest.py). Each test starts a fresh sidecar.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from xml.dom import minidom

import pytest

from pyslirp.kubevirt.domain import QEMU_NS
from tests.kubevirt.test_domain import qemu_args, validate
from tests.nsutil import unix_listening

grpc = pytest.importorskip("grpc")

pytestmark = pytest.mark.e2e


class Sidecar:
    def __init__(self, hooks: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.hooks = hooks
        self.socket = hooks / "slirp.sock"
        self.data = hooks / "pyslirp"
        self.proc = proc
        self.log = log
        self.channel = grpc.insecure_channel(f"unix:{self.socket}")

    def stub(self, protos: SimpleNamespace, version: str) -> Any:
        if version == "info":
            return protos.api_info_pb2_grpc.InfoStub(self.channel)
        return getattr(protos, f"api_{version}_pb2_grpc").CallbacksStub(self.channel)

    def define(self, protos: SimpleNamespace, xml: bytes, vmi: bytes,
               version: str = "v1alpha3") -> bytes:
        params = getattr(protos, f"api_{version}_pb2").OnDefineDomainParams(domainXML=xml, vmi=vmi)
        result: bytes = self.stub(protos, version).OnDefineDomain(params, timeout=30).domainXML
        return result

    def pyslirp_pids(self) -> list[int]:
        """pyslirp stacks started by the sidecar (its children)."""
        out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in out.splitlines() if "qemu-stream" in line]

    def listening(self, kind: str, port: int) -> bool:
        """Is ``port`` bound in the sidecar's network namespace (its /proc/PID/net/*)?"""
        table = Path(f"/proc/{self.proc.pid}/net/{kind}").read_text().splitlines()[1:]
        want = f":{port:04X}"
        return any(line.split()[1].endswith(want) and
                   (kind.startswith("udp") or line.split()[3] == "0A") for line in table)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Sidecar]:
    with run_sidecar(tmp_path) as side:
        yield side


@contextlib.contextmanager
def run_sidecar(tmp_path: Path, *options: str) -> Iterator[Sidecar]:
    """The sidecar in a network namespace of its own (the pod's), with ``options``."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed")
    hooks = tmp_path / "kubevirt-hooks"
    hooks.mkdir()
    log = tmp_path / "sidecar.log"
    # Private files (the stacks' API sockets) under the test's directory, so even a
    # sidecar killed with SIGKILL leaves nothing behind in the machine's /tmp.
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen(
        ["unshare", "--net", "--", "sh", "-c",
         'ip link set lo up && exec "$@"', "sh",
         sys.executable, "-m", "pyslirp", "kubevirt-sidecar", "--socket",
         str(hooks / "slirp.sock"), "--dns-upstream=127.0.0.1:9", *options],
        stdin=subprocess.DEVNULL, stderr=open(log, "wb"),  # noqa: SIM115
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    side = Sidecar(hooks, proc, log)
    try:
        deadline = time.monotonic() + 30
        # Listening, not only bound: the file is there from bind(), before listen().
        while not unix_listening(proc.pid, side.socket):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the sidecar did not listen: " + log.read_text()
            time.sleep(0.05)
        yield side
    finally:
        side.channel.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Nothing may outlive the sidecar: no stack, no socket.
        assert not side.pyslirp_pids()


def test_hook_socket_is_owner_only(tmp_path: Path) -> None:
    """virt-launcher runs as the sidecar's user or as root; nobody else may call the hook."""
    import tempfile

    hooks = Path(tempfile.mkdtemp(prefix="pyslirp-hooks-test-"))
    hooks.chmod(0o755)  # searchable by anyone: only the socket's mode keeps them out
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen(
        ["unshare", "--net", "--", sys.executable, "-m", "pyslirp", "kubevirt-sidecar",
         "--socket", str(hooks / "slirp.sock"), "--dns-upstream=127.0.0.1:9"],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    try:
        deadline = time.monotonic() + 30
        while not (hooks / "slirp.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no hook socket"
            time.sleep(0.05)
        assert (hooks / "slirp.sock").stat().st_mode & 0o777 == 0o600
        nobody = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-c", "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
             "    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused')\n",
             str(hooks / "slirp.sock")], capture_output=True, text=True, timeout=30, cwd="/")
        assert nobody.stdout.strip() == "refused", nobody.stdout + nobody.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(hooks)


def test_info(sidecar: Sidecar, protos: SimpleNamespace) -> None:
    info = sidecar.stub(protos, "info").Info(protos.api_info_pb2.InfoParams(), timeout=10)
    assert info.name == "network-slirp-binding"
    assert list(info.versions) == ["v1alpha1", "v1alpha2", "v1alpha3"]
    assert sorted(p.name for p in info.hookPoints) == ["OnDefineDomain", "Shutdown"]


def test_on_define_domain_starts_a_stack_and_points_qemu_at_it(
        sidecar: Sidecar, protos: SimpleNamespace, domain_xml: bytes, vmi_json: bytes,
        tmp_path: Path) -> None:
    out = sidecar.define(protos, domain_xml, vmi_json)
    args = qemu_args(out)
    sock = sidecar.data / "default.sock"
    assert args[:2] == ["-netdev", "stream,id=pyslirp-default,server=off,addr.type=unix,"
                                   f"addr.path={sock}"]
    assert args[2] == "-device" and '"driver":"virtio-net-pci"' in args[3]
    assert '"mac":"02:42:ac:11:00:02"' in args[3]
    validate(out, tmp_path)
    # The stack listens where QEMU will connect, for QEMU's user (107) only (root still can).
    st = sock.stat()
    assert sock.is_socket() and (st.st_uid, st.st_gid, st.st_mode & 0o777) == (107, 107, 0o600)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu:
        qemu.connect(str(sock))
    # The VMI's ports are forwarded in the pod's (here: the sidecar's) network namespace,
    # over IPv4 and IPv6 (IPv6 is on by default).
    for kind in ("tcp", "tcp6"):
        assert sidecar.listening(kind, 8080) and sidecar.listening(kind, 2222)
    assert sidecar.listening("udp", 5353) and sidecar.listening("udp6", 5353)
    # The hook directory holds only the hook socket and the data subdirectory.
    assert sorted(p.name for p in sidecar.hooks.iterdir()) == ["pyslirp", "slirp.sock"]
    [pid] = sidecar.pyslirp_pids()

    again = sidecar.define(protos, out, vmi_json)
    assert again == out  # nothing more changes ...
    assert sidecar.define(protos, domain_xml, vmi_json) == out
    assert sidecar.pyslirp_pids() == [pid]  # ... and the running stack is reused


def _stack_args(side: Sidecar) -> list[str]:
    [pid] = side.pyslirp_pids()
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_stacks_serve_ipv6_unless_disabled(sidecar: Sidecar, protos: SimpleNamespace,
                                           domain_xml: bytes, vmi_json: bytes,
                                           tmp_path: Path) -> None:
    """IPv6 on by default (QEMU's user networking had it); ``--disable-ipv6`` turns it off."""
    sidecar.define(protos, domain_xml, vmi_json)
    args = _stack_args(sidecar)
    assert "-6" in args and "--cidr6=fd00::/64" in args
    short = Path(tempfile.mkdtemp(prefix="pyslirp-kv-", dir="/tmp"))  # sun_path: 108 bytes
    try:
        with run_sidecar(short, "--disable-ipv6") as v4only:
            v4only.define(protos, domain_xml, vmi_json)
            assert not any(a == "-6" or a.startswith("--cidr6") for a in _stack_args(v4only))
            # The VMI's ports over IPv4 only.
            assert v4only.listening("tcp", 8080) and not v4only.listening("tcp6", 8080)
            assert v4only.listening("udp", 5353) and not v4only.listening("udp6", 5353)
    finally:
        shutil.rmtree(short)


@pytest.mark.parametrize("version", ["v1alpha1", "v1alpha2"])
def test_older_callback_versions(sidecar: Sidecar, protos: SimpleNamespace, domain_xml: bytes,
                                 vmi_json: bytes, version: str) -> None:
    out = sidecar.define(protos, domain_xml, vmi_json, version=version)
    assert len(minidom.parseString(out).getElementsByTagNameNS(QEMU_NS, "arg")) == 4


def test_changed_ports_restart_the_stack(sidecar: Sidecar, protos: SimpleNamespace,
                                         domain_xml: bytes, vmi_json: bytes) -> None:
    sidecar.define(protos, domain_xml, vmi_json)
    [first] = sidecar.pyslirp_pids()
    sidecar.define(protos, domain_xml, vmi_json.replace(b'"port":2222', b'"port":2223'))
    [second] = sidecar.pyslirp_pids()
    assert second != first
    assert sidecar.listening("tcp", 2223) and not sidecar.listening("tcp", 2222)


@pytest.mark.parametrize(("xml", "vmi", "message"), [
    (b"<domain><name>", None, "the domain XML does not parse"),
    (None, b'{"spec":{"networks":[{"name":"default","pod":{}}],"domain":{"devices":'
           b'{"interfaces":[{"name":"default","masquerade":{}}]}}}}',
     "no interface of the VMI's pod network ('default') has binding {name: slirp}"),
    (None, b"VMI", "the VMI is not valid JSON"),
    (None, "dup", "interface default: port 8080/TCP is declared twice"),
])
def test_bad_input_is_a_clear_error_and_starts_nothing(
        sidecar: Sidecar, protos: SimpleNamespace, domain_xml: bytes, vmi_json: bytes,
        xml: bytes | None, vmi: bytes | str | None, message: str) -> None:
    if vmi == "dup":
        vmi = vmi_json.replace(b'{"port":2222}', b'{"port":2222},{"port":8080}')
    assert isinstance(vmi, bytes | None)
    with pytest.raises(grpc.RpcError) as err:
        sidecar.define(protos, xml or domain_xml, vmi or vmi_json)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert not sidecar.pyslirp_pids()
    assert not sidecar.data.exists() or not list(sidecar.data.iterdir())


@pytest.mark.parametrize(("bind", "message"), [
    ("s=socket.socket(); s.bind(('0.0.0.0',8080))",
     "cannot forward port 8080/TCP: the pod's port is in use"),
    ("s=socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, "
     "socket.IPV6_V6ONLY, 1); s.bind(('::',8080))",
     "cannot forward port 8080/TCP over IPv6: the pod's port is in use"),
], ids=["ipv4", "ipv6"])
def test_a_port_in_use_fails_and_leaves_no_stack(sidecar: Sidecar, protos: SimpleNamespace,
                                                 domain_xml: bytes, vmi_json: bytes,
                                                 bind: str, message: str) -> None:
    # Somebody in the pod already listens on 8080 (on IPv4, or on IPv6 only).
    squatter = subprocess.Popen(
        ["nsenter", f"--net=/proc/{sidecar.proc.pid}/ns/net", sys.executable, "-c",
         f"import socket,sys,time; {bind}; s.listen(); "
         "print('ok',flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "ok"
        with pytest.raises(grpc.RpcError) as err:
            sidecar.define(protos, domain_xml, vmi_json)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert message in err.value.details()
        assert not sidecar.pyslirp_pids()
    finally:
        squatter.kill()
        squatter.wait()


def test_pre_cloud_init_iso_passes_data_through(sidecar: Sidecar,
                                                protos: SimpleNamespace) -> None:
    params = protos.api_v1alpha3_pb2.PreCloudInitIsoParams(
        cloudInitData=b'{"userData":"x"}', cloudInitNoCloudSource=b"{}", vmi=b"{}")
    result = sidecar.stub(protos, "v1alpha3").PreCloudInitIso(params, timeout=10)
    assert (result.cloudInitData, result.cloudInitNoCloudSource) == (b'{"userData":"x"}', b"{}")


def test_shutdown_stops_stacks_and_exits(sidecar: Sidecar, protos: SimpleNamespace,
                                         domain_xml: bytes, vmi_json: bytes) -> None:
    sidecar.define(protos, domain_xml, vmi_json)
    [pid] = sidecar.pyslirp_pids()
    sidecar.stub(protos, "v1alpha3").Shutdown(protos.api_v1alpha3_pb2.ShutdownParams(),
                                              timeout=30)
    assert sidecar.proc.wait(timeout=30) == 0, sidecar.log.read_text()
    assert not os.path.exists(f"/proc/{pid}") or \
        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert not sidecar.socket.exists()
    assert not sidecar.data.exists()


def test_sidecar_killed_takes_its_stacks_along(sidecar: Sidecar, protos: SimpleNamespace,
                                               domain_xml: bytes, vmi_json: bytes) -> None:
    sidecar.define(protos, domain_xml, vmi_json)
    [pid] = sidecar.pyslirp_pids()
    sidecar.proc.kill()
    sidecar.proc.wait()
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "pyslirp outlived its sidecar"
