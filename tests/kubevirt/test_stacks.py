"""StackManager details that need no network namespace."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from pyslirp.kubevirt import stacks


def test_api_sockets_fall_back_next_to_the_data_on_a_read_only_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tempfile.mkdtemp

    def mkdtemp(prefix: str = "", dir: str | None = None) -> str:  # noqa: A002 (stdlib's name)
        if dir is None:
            raise OSError(30, "Read-only file system")
        return real(prefix=prefix, dir=dir)

    monkeypatch.setattr(stacks.tempfile, "mkdtemp", mkdtemp)
    data = tmp_path / "pyslirp"
    manager = stacks.StackManager(str(data))
    private = Path(manager._run_dir)
    assert private.parent == data and (private.stat().st_mode & 0o777) == 0o700
    manager.close()
    assert not data.exists()  # nothing left behind


def test_close_keeps_files_it_does_not_own(tmp_path: Path) -> None:
    data = tmp_path / "pyslirp"
    data.mkdir()
    (data / "someone-elses").write_text("x")
    manager = stacks.StackManager(str(data))
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

    manager = stacks.StackManager(str(tmp_path / "pyslirp"), dns_upstreams=["127.0.0.1:9"])
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
