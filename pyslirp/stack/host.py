"""The contract between the sans-I/O stack and the runtime that owns the fds.

Theory of operation
-------------------
Engines never touch a socket. When a flow needs the host side to act, it
calls a method of the :class:`HostPort` it was given; the runtime implements
it with real non-blocking sockets on the event loop, and reports results back
by calling the engine's entry points (documented on each engine: e.g.
``TcpFlow.host_connected``). Tests implement :class:`HostPort` with a
recorder.

Each method must return promptly and never raise for ordinary network
errors: failures are reported back asynchronously through the engine's entry
points, as a real socket would report them.

Why calls and not a queue of action objects (the "host actions out" of a
sans-I/O design, docs/architecture.md): the engines stay exactly as testable
(tests pass a recorder), and the hot path allocates no action object per
segment nor pays for a drain loop; a 64 KB frame from the guest goes to
``tcp_write`` straight from the frame's memoryview within the same call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pyslirp.wire.buffer import Buffer

__all__ = ["Buffer", "HostPort", "Policy"]

#: Maps a guest destination (address, port) to the host targets to reach it
#: through, or None to refuse it.
Policy = Callable[[bytes, int], "list[tuple[str, int]] | None"]


class HostPort(Protocol):
    # ---- TCP (flow: pyslirp.stack.tcp.TcpFlow) ---------------------------------
    def tcp_connect(self, flow: Any, targets: list[tuple[str, int]]) -> None:
        """Start a non-blocking connect to the first reachable of ``targets``.

        The runtime tries them in order (the next one when a connect fails) and
        then calls ``flow.host_connected(now)`` or ``flow.host_connect_failed(errno, now)``.
        """

    def tcp_write(self, flow: Any, data: Buffer) -> int:
        """Write what the host socket accepts now; return the byte count (maybe 0).

        When it returns less than ``len(data)`` the runtime watches for
        writability and calls ``flow.host_writable(now)`` once.
        """

    def tcp_shutdown_write(self, flow: Any) -> None:
        """Half-close the host socket (the guest sent FIN and all data is written)."""

    def tcp_pause_reading(self, flow: Any) -> None:
        """Stop reading the host socket (the guest's window is full)."""

    def tcp_resume_reading(self, flow: Any) -> None:
        """Resume reading; the runtime calls ``flow.host_data(data, now)`` with at
        most ``flow.host_read_budget()`` bytes, ``flow.host_eof(now)`` at EOF and
        ``flow.host_error(errno, now)`` on a reset or error."""

    def tcp_close(self, flow: Any, reset: bool) -> None:
        """Close the host socket (with RST if ``reset``); no more calls for this flow."""

    # ---- UDP (flow: pyslirp.stack.udp.UdpFlow) ---------------------------------
    def udp_open(self, flow: Any) -> bool:
        """Create the host socket for a guest (address, port); False if impossible.

        The runtime calls ``stack.udp.host_datagram(flow, src_ip, src_port, data, now)``
        for each datagram and ``stack.udp.host_error(flow, ...)`` for ICMP errors.
        """

    def udp_send(self, flow: Any, dst: tuple[str, int], data: Any, segment: int = 0) -> None:
        """sendto() on the flow's host socket; errors are dropped and counted.

        ``segment`` > 0: ``data`` is a list of buffers which, end to end, are
        several datagrams of ``segment`` bytes each but the last (which may be
        shorter); each must leave as a datagram of its own (e.g. one sendmsg with
        ``UDP_SEGMENT``), never joined or re-cut."""

    def udp_close(self, flow: Any) -> None:
        """Close the flow's host socket."""

    # ---- ICMP echo through unprivileged ICMP datagram sockets -----------------
    def icmp_echo(self, flow: Any, dst: str, ident: int, seq: int, payload: Buffer) -> bool:
        """Send an echo request; False if ICMP sockets are not permitted here."""

    def icmp_close(self, flow: Any) -> None: ...

    # ---- DNS forwarding -----------------------------------------------------
    def dns_send(self, query: Any, upstream: tuple[str, int], data: Buffer) -> None:
        """Send ``data`` (a DNS query, under an ID the forwarder chose) over UDP to
        ``upstream``, on one socket kept per upstream and created on first use.
        ``data`` is the query's own buffer, rewritten for its next attempt: send it
        (or copy it) during the call, do not keep it.

        The runtime calls ``stack.dns.upstream_datagram(upstream, data, now)`` for
        every datagram read from that socket, ``stack.dns.upstream_error(upstream,
        now, wire_id)`` for an error on it (``wire_id``: the ID of the datagram the
        error is about, or None), and ``stack.dns.upstream_failed(query, now,
        upstream)`` when this datagram could not be sent.
        """

    def dns_cancel(self, query: Any) -> None:
        """``query`` is finished (nothing is held per query with shared sockets)."""

    # Optional: the forwarder calls it only if the runtime has it.
    def dns_release(self, upstream: tuple[str, int]) -> None:
        """Nothing waits on ``upstream`` any more and it is no longer used (or the
        stack is closing): close its socket. A later ``dns_send`` opens a new one."""
