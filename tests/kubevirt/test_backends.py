"""BackendManager details that need no network namespace."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyslirp.kubevirt import backends
from pyslirp.kubevirt.domain import SlirpInterface


def test_api_sockets_fall_back_next_to_the_data_on_a_read_only_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tempfile.mkdtemp

    def mkdtemp(prefix: str = "", dir: str | None = None) -> str:  # noqa: A002 (stdlib's name)
        if dir is None:
            raise OSError(30, "Read-only file system")
        return real(prefix=prefix, dir=dir)

    monkeypatch.setattr(backends.tempfile, "mkdtemp", mkdtemp)
    data = tmp_path / "pyslirp"
    manager = backends.BackendManager(str(data))
    private = Path(manager._run_dir)
    assert private.parent == data and (private.stat().st_mode & 0o777) == 0o700
    manager.close()
    assert not data.exists()  # nothing left behind


def test_close_keeps_files_it_does_not_own(tmp_path: Path) -> None:
    data = tmp_path / "pyslirp"
    data.mkdir()
    (data / "someone-elses").write_text("x")
    manager = backends.BackendManager(str(data))
    run_dir = manager._run_dir
    manager.close()
    assert (data / "someone-elses").read_text() == "x"
    assert not os.path.exists(run_dir)


def test_sidecar_refuses_the_hook_directory_as_data_dir(tmp_path: Path) -> None:
    """QEMU's sockets there would be dialled by virt-launcher as hooks."""
    from pyslirp.kubevirt.sidecar import main

    assert main(["--socket", str(tmp_path / "slirp.sock"), "--data-dir", str(tmp_path)]) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root here")
def test_stacks_run_sandboxed_and_filtered_and_serve_qemu(tmp_path: Path) -> None:
    import ipaddress
    import socket
    import struct

    from pyslirp.kubevirt.domain import SlirpInterface
    from pyslirp.wire import arp

    manager = backends.BackendManager(str(tmp_path / "pyslirp"), dns_upstreams=["127.0.0.1:9"])
    try:
        iface = SlirpInterface("default", "virtio-net-pci", None,
                               ipaddress.IPv4Network("10.0.2.0/24"), ())
        path = manager.ensure([iface])["default"]
        pid = manager.running()["default"]
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines())
        assert (status["Seccomp"].strip(), status["NoNewPrivs"].strip()) == ("2", "1")
        assert sorted(os.listdir(f"/proc/{pid}/root")) == ["etc", "run"]
        # QEMU's ARP for the gateway is answered (-netdev stream: 4-byte length, frame).
        mac = bytes.fromhex("525400123456")
        request = (b"\xff" * 6 + mac + b"\x08\x06" +
                   struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, arp.OP_REQUEST, mac,
                               bytes([10, 0, 2, 15]), b"\0" * 6, bytes([10, 0, 2, 2])))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu:
            qemu.settimeout(10)
            qemu.connect(path)
            qemu.sendall(struct.pack("!I", len(request)) + request)
            header = qemu.recv(4, socket.MSG_WAITALL)
            reply = qemu.recv(struct.unpack("!I", header)[0], socket.MSG_WAITALL)
        assert reply[12:14] == b"\x08\x06" and reply[20:22] == b"\x00\x02"  # an ARP reply
    finally:
        manager.close()
    assert not (tmp_path / "pyslirp").exists()


# --- who may connect to QEMU's sockets ---------------------------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534"]
_IFACE = ("default", "virtio-net-pci", None, "10.0.2.0/24")


def _iface() -> SlirpInterface:
    name, driver, mac, network = _IFACE
    return SlirpInterface(name, driver, mac, ipaddress.IPv4Network(network), ())


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any user may write, so only the socket's own mode and owner matter."""
    path = Path(tempfile.mkdtemp(prefix="pyslirp-kubevirt-test-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _nobody_connects(path: str) -> str:
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused')\n"
            "else:\n    print('connected')\n")
    proc = subprocess.run([*NOBODY, "--clear-groups", sys.executable, "-c", code, path],
                          capture_output=True, text=True, timeout=30, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_qemu_socket_belongs_to_qemus_user_only(shared_dir: Path) -> None:
    """A root sidecar gives the socket to virt-launcher's qemu (107), mode 0600."""
    manager = backends.BackendManager(str(shared_dir / "pyslirp"), dns_upstreams=["127.0.0.1:9"])
    try:
        path = manager.ensure([_iface()])["default"]
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (107, 107, 0o600)
        assert _nobody_connects(path) == "refused"
    finally:
        manager.close()


_SIDECAR_AS_NOBODY = """
import ipaddress, os, stat, sys
from pyslirp.kubevirt.domain import SlirpInterface
from pyslirp.kubevirt.backends import BackendError, BackendManager
manager = BackendManager(sys.argv[1], dns_upstreams=["127.0.0.1:9"])
try:
    path = manager.ensure([SlirpInterface("default", "virtio-net-pci", None,
                                          ipaddress.IPv4Network("10.0.2.0/24"), ())])["default"]
    st = os.stat(path)
    print(st.st_uid, st.st_gid, oct(st.st_mode & 0o777))
except BackendError as exc:
    print("BackendError:", exc)
finally:
    manager.close()
"""


def _python_for_nobody() -> tuple[str, dict[str, str]]:
    """An interpreter uid 65534 can run (not one under root's 0700 home) with our packages."""
    import site

    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.access(python, os.X_OK):
        pytest.skip(f"{python} (the system's build of this Python) is needed")
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([root, *site.getsitepackages()])
    return python, {**os.environ, "PYTHONPATH": path}


@pytest.mark.parametrize(("groups", "expected"), [
    (["--groups=107"], "65534 107 0o660"),
    (["--clear-groups"], "BackendError: QEMU (uid 107, gid 107) could not connect"),
])
def test_non_root_sidecar_shares_the_socket_through_qemus_group_or_refuses(
        shared_dir: Path, groups: list[str], expected: str) -> None:
    python, env = _python_for_nobody()
    proc = subprocess.run([*NOBODY, *groups, python, "-c", _SIDECAR_AS_NOBODY,
                           str(shared_dir / "pyslirp")], capture_output=True, text=True,
                          timeout=60, cwd="/", env={**env, "TMPDIR": str(shared_dir)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(expected), proc.stdout + proc.stderr
    assert not (shared_dir / "pyslirp").exists()  # nothing left behind either way
