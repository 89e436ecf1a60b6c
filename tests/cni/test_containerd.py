"""A second real CNI runtime: containerd's ``ctr run --cni`` (Debian's containerd 1.6) on ``slirp``.

The containerd is the test's own: its root, state, socket, runc root and FIFO directory
are below the test's directory, with the CRI plugin (which would bring its own CNI set-up)
and the /opt plugin (which would write /opt/containerd) switched off. Its shims put their
sockets in /run/containerd/s whatever the configuration says, so containerd runs in a
mount namespace of its own with the test's directory mounted there.

``ctr run --cni`` takes no configuration or plugin directory: go-cni's defaults,
/etc/cni/net.d (the first file by name) and /opt/cni/bin, are all it reads. So ctr runs
in a mount namespace of its own in which the test's directories are mounted over those
two (an overlay on the nearest existing parent where one does not exist): ctr, the
plugin and the engine it starts see the test's configuration, and the machine's
directories are never written. The configuration is the shipped cni/10-slirp.conflist
(slirp, then Debian's ``tuning``) with the test's runtime directory and its DNS server
on loopback added to the slirp entry.

ctr runs ADD between creating and starting the task, and DEL after the task is deleted,
with no network namespace left (``CNI_NETNS`` empty). The image is a busybox-static root
imported with podman and brought in with ``ctr images import``: no registry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyslirp.cni import install
from tests.cni.conftest import (
    DEBIAN_PLUGINS,
    DNS_ADDR,
    DNS_NAME,
    HTTP_BODY,
    REPO,
    DnsServer,
    engine_pid,
    stop_engine,
    wait_until,
)
from tests.imageutil import Podman, busybox_image, require_tools, shadowed
from tests.nsutil import unix_listening
from tests.podmanutil import busybox_rootfs, require_podman

pytestmark = pytest.mark.e2e

IMAGE = "localhost/pyslirp-test-busybox:latest"
NAMESPACE = "pyslirp-test"

CONFIG = """\
version = 2
root = "{work}/root"
state = "{work}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{work}/containerd.sock"
[ttrpc]
  address = "{work}/containerd.sock.ttrpc"
"""

@dataclass
class Containerd:
    work: Path
    proc: subprocess.Popen[bytes]
    rundir: Path

    @property
    def socket(self) -> Path:
        return self.work / "containerd.sock"

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", str(self.socket), "--namespace", NAMESPACE,
                               *args], capture_output=True, text=True, timeout=timeout)

    def run_cni(self, container_id: str, script: str) -> subprocess.CompletedProcess[str]:
        """``ctr run --cni --rm`` of the busybox image, in the shadowing mount namespace.

        The script's output goes to a file in a bind-mounted directory, not through ctr:
        ctr may stop copying a task's output when the task exits, and then lines written
        last (on a loaded machine, all but the first) never arrive."""
        out = self.work / f"out-{container_id}"
        out.mkdir()
        ctr = ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, "run", "--cni",
               "--rm", "--fifo-dir", str(self.work / "fifo"), "--runc-root",
               str(self.work / "runc"), "--mount",
               f"type=bind,src={out},dst=/out,options=rbind:rw", IMAGE, container_id,
               "sh", "-c", f"{{ {script}\n}} >/out/stdout 2>/out/stderr"]
        cni = {"/etc/cni/net.d": self.work / "net.d", "/opt/cni/bin": self.work / "bin"}
        proc = subprocess.run(shadowed(self.work, cni, ctr), capture_output=True, text=True,
                              env={**os.environ, "PYSLIRP_PYTHON": sys.executable},
                              timeout=180)
        for name in ("stdout", "stderr"):
            path = out / name
            text = path.read_text() if path.exists() else ""
            setattr(proc, name, text + getattr(proc, name))
        return proc

    def container_ids(self) -> list[str]:
        return self.ctr("containers", "list", "--quiet").stdout.split()


def _conflist(rundir: Path, dns_port: int) -> str:
    """The shipped configuration, pointed at the test's runtime dir and DNS server."""
    conf = json.loads(Path(REPO, "cni", "10-slirp.conflist").read_text())
    slirp = conf["plugins"][0]
    assert slirp["type"] == "slirp"
    slirp["runtimeDir"] = str(rundir)
    slirp["dnsUpstreams"] = [f"127.0.0.1:{dns_port}"]
    return json.dumps(conf)


def _cni_dirs(work: Path, rundir: Path, dns_port: int) -> None:
    (work / "net.d").mkdir()
    # Sorts before anything else: go-cni takes the first configuration by name.
    (work / "net.d" / "00-slirp.conflist").write_text(_conflist(rundir, dns_port))
    install.install(str(work / "bin"))
    for plugin in ("tuning",):  # the shipped list's second plugin, from Debian
        (work / "bin" / plugin).symlink_to(Path(DEBIAN_PLUGINS) / plugin)


def _start(work: Path) -> subprocess.Popen[bytes]:
    (work / "config.toml").write_text(CONFIG.format(work=work))
    # The shims' sockets go to /run/containerd/s whatever the configuration says: the
    # test's own directory is mounted there, in containerd's own mount namespace.
    (work / "shim-run").mkdir()
    argv = shadowed(work, {"/run/containerd": work / "shim-run"},
                    ["containerd", "--config", str(work / "config.toml")])
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(work / "containerd.log", "wb"))  # noqa: SIM115
    sock = work / "containerd.sock"
    if not wait_until(lambda: unix_listening(proc.pid, sock) or proc.poll() is not None, 60) \
            or proc.poll() is not None:
        proc.kill()
        proc.wait()
        raise AssertionError("containerd did not start: "
                             + (work / "containerd.log").read_text()[-3000:])
    return proc


def _stop(daemon: Containerd) -> None:
    for cid in daemon.container_ids():
        daemon.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        daemon.ctr("tasks", "delete", "--force", cid)
        daemon.ctr("containers", "delete", cid)
    daemon.proc.terminate()
    try:
        daemon.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.proc.kill()
        daemon.proc.wait()


def _unmount_below(work: Path) -> None:
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                            text=True).stdout.split()
    for m in sorted((m for m in mounts if m.startswith(str(work))), reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)


@pytest.fixture
def containerd(dns_server: DnsServer) -> Iterator[Containerd]:
    require_podman()
    require_tools("containerd", "ctr", "unshare", apt="containerd util-linux")
    # Short: containerd's socket path must fit in sun_path.
    work = Path(tempfile.mkdtemp(prefix="pyslirp-ctrd-", dir="/tmp"))
    rundir = work / "run"
    podman = Podman(work / "podman")
    daemon = None
    try:
        _cni_dirs(work, rundir, dns_server.port)
        rootfs = busybox_rootfs(work / "rootfs", ("sh", "wget", "nslookup", "ip", "cat"))
        archive = busybox_image(podman, rootfs, IMAGE, work / "busybox.tar")
        daemon = Containerd(work, _start(work), rundir)
        imported = daemon.ctr("images", "import", str(archive))
        assert imported.returncode == 0, imported.stderr
        assert IMAGE in daemon.ctr("images", "list", "--quiet").stdout.split()
        yield daemon
    finally:
        if daemon is not None:
            _stop(daemon)
        stop_engine(str(rundir))
        podman.close()
        _unmount_below(work)
        if not os.environ.get("PYSLIRP_KEEP_POD"):
            shutil.rmtree(work, ignore_errors=True)


def test_ctr_run_cni_container_on_slirp(containerd: Containerd, http_port: int) -> None:
    """ADD gives the container eth0 with slirp's address, the container fetches from the
    host's loopback through 10.0.2.2 and resolves through 10.0.2.3 (the test's DNS server
    upstream); after ``--rm`` DEL has removed the attachment and the engine exits."""
    script = (f"wget -q -O - http://10.0.2.2:{http_port}/ && "
              f"nslookup {DNS_NAME} 10.0.2.3 && ip -4 addr show eth0 && "
              "cat /proc/sys/net/ipv4/conf/eth0/accept_local")
    proc = containerd.run_cni("slirp-web", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert HTTP_BODY.decode() in proc.stdout
    assert DNS_ADDR in proc.stdout
    assert "10.0.2.100/24" in proc.stdout
    assert proc.stdout.rstrip().endswith("1"), proc.stdout  # tuning ran after slirp
    assert containerd.container_ids() == []
    attachments = containerd.rundir / "attachments"
    assert wait_until(lambda: os.listdir(attachments) == [], 30), os.listdir(attachments)
    assert wait_until(lambda: engine_pid(str(containerd.rundir)) is None, 30)
    # The machine's own directories were only shadowed, never written.
    assert not os.path.exists("/etc/cni/net.d/00-slirp.conflist")
    assert not os.path.exists("/opt/cni/bin/slirp")


def test_ctr_run_cni_failing_container_still_runs_del(containerd: Containerd) -> None:
    """A container that exits non-zero: ctr reports its status, and DEL still runs."""
    proc = containerd.run_cni("slirp-fails", "ip -4 addr show eth0 && exit 3")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "10.0.2.100/24" in proc.stdout
    attachments = containerd.rundir / "attachments"
    assert wait_until(lambda: os.listdir(attachments) == [], 30), os.listdir(attachments)
    assert wait_until(lambda: engine_pid(str(containerd.rundir)) is None, 30)
    assert containerd.container_ids() == []

