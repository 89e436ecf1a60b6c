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
