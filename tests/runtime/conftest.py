"""Fixtures for the runtime tests that drive a LinkRig (tests/runtime/linkrig.py).

A module with a ``rig`` fixture of its own (another rig class) overrides this one.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from pyslirp.stack.config import NetConfig
from tests.runtime.linkrig import LinkRig


@pytest.fixture
def rig() -> Iterator[LinkRig]:
    """A rig that knows the guest: no vnet header, no offloads, no busy polling."""
    link = LinkRig(NetConfig(vnet_hdr=False, offload=False, busy_poll=0))
    link.know_guest()
    yield link
    link.close()


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A listening socket on loopback; the guest reaches it as 10.0.2.2."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    yield lsock
    lsock.close()
