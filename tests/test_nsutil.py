"""The test helpers' own promises that the suite's waits rely on."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.nsutil import unix_listening


def test_unix_listening_waits_for_listen_not_for_the_socket_file(tmp_path: Path) -> None:
    # Between bind() and listen() the file exists but connect() is refused: a wait on
    # the file let a loaded machine's test connect too early (issue 10, slirp4netns).
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        assert path.exists() and not unix_listening(os.getpid(), path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as early, \
                pytest.raises(ConnectionRefusedError):
            early.connect(str(path))
        server.listen(1)
        assert unix_listening(os.getpid(), path)
