"""What a front end asks the runtime to serve: one typed, immutable description.

Theory of operation
-------------------
The command line (:mod:`pyslirp.cli`) parses slirp4netns's arguments into its own
options object; the runtime never sees that object. Instead the front end builds
a :class:`ServeSpec` (the link to serve, the virtual network's
:class:`~pyslirp.stack.config.NetConfig`, the process's fds, the hardening to
apply) and hands it to :func:`pyslirp.runtime.main.serve_namespace`,
:func:`~pyslirp.runtime.main.run_command` or
:func:`pyslirp.runtime.qemu.serve_qemu`. mypy sees every field; nothing is read
with ``getattr``.

What the runtime does not own, it is given as a plug-in: the slirp4netns JSON
API is a front end (:mod:`pyslirp.api`), so the spec carries an
:data:`ApiFactory` that the runtime calls with the loop, the port forwarder it
made for the link and the guest address forwards default to, and closes when
it stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from pyslirp.stack.config import NetConfig

if TYPE_CHECKING:
    from pyslirp.runtime.hostfwd import HostForwarder


class Closeable(Protocol):
    def close(self) -> None: ...


#: ``(loop, forwarder, default guest address) -> server``: serves an API socket for one
#: link; ``close()`` stops it and removes the socket. Raises OSError if it cannot.
ApiFactory = Callable[[asyncio.AbstractEventLoop, "HostForwarder", str], Closeable]


@dataclass(frozen=True, slots=True)
class Hardening:
    """``--enable-sandbox`` / ``--enable-seccomp`` (:mod:`pyslirp.runtime.sandbox`)."""

    sandbox: bool = False
    seccomp: bool = False
    #: The user namespace a non-root caller joins for the sandbox (slirp4netns's
    #: choice: ``--userns-path``, else the target PID's); None: none to join.
    userns_path: str | None = None
    #: The front end's own modules, imported before the sandbox hides the file system
    #: (the runtime's and the stack's are imported anyway).
    preload: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServeSpec:
    """One link to serve and how; built by a front end, read by the runtime."""

    #: The virtual network; the runtime serves a copy (:meth:`fresh_config`).
    net: NetConfig
    #: A namespace's TAP (``target`` is a PID or a netns path, as ``netns_type``
    #: says) or a QEMU socket back end (``target`` is the socket's path).
    target_type: Literal["netns", "qemu-stream", "qemu-dgram"] = "netns"
    target: str = ""
    netns_type: Literal["pid", "path"] = "pid"
    tapname: str = "tap0"
    #: ``-c``: set the TAP's address, MTU, MAC and routes as slirp4netns does.
    configure: bool = False
    userns_path: str | None = None
    #: The TAP's MAC (``--macaddress``, only with ``configure``); None: the kernel's.
    macaddress: bytes | None = None
    #: False with ``--no-offload``: no vnet header, no TSO/checksum offload.
    offload: bool = True
    #: ``-r`` / ``-e``: None when not given.
    ready_fd: int | None = None
    exit_fd: int | None = None
    #: ``--dns-upstream`` in order; empty: follow /etc/resolv.conf.
    dns_upstreams: tuple[tuple[str, int], ...] = ()
    pcap: str | None = None
    #: ``--outbound-addr[6]``, resolved to addresses.
    outbound_addr: str | None = None
    outbound_addr6: str | None = None
    hardening: Hardening = Hardening()
    #: Serves ``--api-socket`` (None: no API socket).
    api: ApiFactory | None = None
    #: ``pyslirp run``: the command and its arguments.
    command: tuple[str, ...] = ()

    def fresh_config(self) -> NetConfig:
        """A copy of :attr:`net` the runtime may change (offload flags, search list)."""
        return dataclasses.replace(self.net, dns_upstreams=list(self.net.dns_upstreams),
                                   search_domains=list(self.net.search_domains))
