"""Statistics of a running stack, on demand: what they are and ``pyslirp stats``.

Theory of operation
-------------------
Every engine counts notable and dropped events into its link's counter table
(``Stack.counters``; the runtime logs it at exit). :func:`snapshot` reads that
table and the engines' flow tables of one stack, at the moment it is asked,
into one JSON-shaped dict::

    {"counters": {"tcp.flows_opened": 3, ...},   # every counter that moved, by name
     "flows": {"tcp": 1, "tcp_time_wait": 0, "udp": 2, "icmp": 0, "dns": 0}}

``counters`` holds only counters that have moved since the stack started
(they never go down); docs/stats.md lists every name and what it counts.
``flows`` are gauges, each always present: ``tcp`` connections in any state
but TIME_WAIT, ``tcp_time_wait`` closed ones whose four-tuple is still held
(a couple of seconds), ``udp`` UDP flows (a forwarded UDP port's permanent
flow included), ``icmp`` ping flows, ``dns`` DNS queries waiting for an
upstream's answer. Reading costs a copy of the counter table and a few
``len()`` calls; nothing is counted per frame for it.

Two servers answer with it: the API socket's ``get_stats`` command
(:mod:`pyslirp.api`, one stack) and the CNI engine's ``stats`` request
(:mod:`pyslirp.cni.daemon`, one entry per attachment of a container).
:func:`main` is the client: ``pyslirp stats --api-socket PATH`` or
``pyslirp stats --cni-rundir DIR CONTAINERID[:IFNAME]`` prints them as a
table, or with ``--json`` as the JSON the server sent (the API's ``return``
object; the engine's list of attachments).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from pyslirp.stack.stack import Stack

#: The ``flows`` gauges, in the order the table prints them.
FLOW_NAMES = ("tcp", "tcp_time_wait", "udp", "icmp", "dns")
#: The API socket's command (an extension: slirp4netns answers it "unknown execute").
API_EXECUTE = "get_stats"
#: How long the client waits for an answer.
CLIENT_TIMEOUT = 10.0


def flow_counts(stack: Stack) -> dict[str, int]:
    """The stack's flow gauges by name (see the module docstring)."""
    time_wait = len(stack.tcp.time_wait)
    return {"tcp": len(stack.tcp.flows) - time_wait, "tcp_time_wait": time_wait,
            "udp": len(stack.udp.flows), "icmp": len(stack.icmp.flows),
            "dns": len(stack.dns.pending)}


def snapshot(stack: Stack) -> dict[str, Any]:
    """Counters (sorted by name, only those that moved) and flow gauges of ``stack``."""
    counters = {name: value for name, value in sorted(stack.counters.items()) if value}
    return {"counters": counters, "flows": flow_counts(stack)}


def api_reply(stack: Stack) -> bytes:
    """The API socket's answer to ``get_stats``, in slirp4netns's compact style."""
    return b'{"return":' + _compact(snapshot(stack)) + b"}"


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# ---- the client ----------------------------------------------------------------------

class StatsError(Exception):
    """The statistics cannot be had; the message says why."""


def from_api_socket(path: str, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Ask a pyslirp's API socket for ``get_stats``; the ``return`` object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(_compact({"execute": API_EXECUTE}))
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
        except TimeoutError:
            raise StatsError(f"api socket {path}: no answer within {timeout:g} s") from None
        except OSError as exc:
            raise StatsError(f"api socket {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise StatsError(f"api socket {path}: the answer is not JSON") from None
    if isinstance(reply, dict) and isinstance(reply.get("return"), dict):
        result: dict[str, Any] = reply["return"]
        return result
    desc = reply.get("error", {}).get("desc") if isinstance(reply, dict) else None
    if desc == "bad request: unknown execute":
        raise StatsError(f"api socket {path} does not serve statistics (slirp4netns, or a "
                         "pyslirp older than get_stats)")
    raise StatsError(f"api socket {path}: {desc or 'unexpected answer'}")


def from_cni_engine(rundir: str, container_id: str, ifname: str | None) -> list[dict[str, Any]]:
    """Ask the CNI engine of ``rundir`` for a container's attachments' statistics."""
    from pyslirp.cni import plugin

    request: dict[str, Any] = {"op": "stats", "containerID": container_id}
    if ifname is not None:
        request["ifname"] = ifname
    try:
        reply = plugin.engine_request(rundir, dict(os.environ), request, start=False)
    except plugin.CniError as exc:
        raise StatsError(exc.msg) from None
    if reply is None:
        raise StatsError(f"no pyslirp CNI engine listens on {plugin.socket_path(rundir)}")
    if not reply.get("ok"):
        raise StatsError(str(reply.get("msg", "the engine refused the request")))
    attachments: list[dict[str, Any]] = reply.get("attachments", [])
    return attachments


def format_table(stats: dict[str, Any]) -> str:
    """One stack's statistics as two aligned columns: the flows, then the counters."""
    rows = [(f"flows.{name}", stats["flows"].get(name, 0)) for name in FLOW_NAMES]
    rows += sorted(stats["counters"].items())
    width = max(len(name) for name, _ in rows)
    return "".join(f"{name:<{width}}  {value}\n" for name, value in rows)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    # Here, not at the top: the API socket's server imports this module for its
    # replies, on the start path of a container (argparse costs milliseconds there).
    import argparse

    parser = argparse.ArgumentParser(
        prog="pyslirp stats",
        description="Print the counters and flow counts of a running pyslirp (see "
                    "docs/stats.md for every name).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--api-socket", metavar="PATH",
                        help="the --api-socket of a pyslirp serving a namespace or VM")
    source.add_argument("--cni-rundir", metavar="DIR",
                        help="the runtime directory of a pyslirp CNI engine")
    parser.add_argument("container", nargs="?", metavar="CONTAINERID[:IFNAME]",
                        help="with --cni-rundir: the container (every interface of it "
                             "unless IFNAME is given)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.cni_rundir is not None and not args.container:
        parser.error("--cni-rundir needs CONTAINERID[:IFNAME]")
    if args.api_socket is not None and args.container:
        parser.error(f"unexpected argument {args.container!r} with --api-socket")
    return args


def main(argv: list[str]) -> int:
    """``pyslirp stats``; returns the exit status (1 with a message when it cannot)."""
    args = _parse_args(argv)
    try:
        if args.api_socket is not None:
            stats = from_api_socket(args.api_socket)
            out = _compact(stats).decode() + "\n" if args.json else format_table(stats)
        else:
            cid, _, ifname = args.container.partition(":")
            attachments = from_cni_engine(args.cni_rundir, cid, ifname or None)
            if args.json:
                out = _compact(attachments).decode() + "\n"
            else:
                out = "\n".join(f"{a['network']} {a['containerID']} {a['ifname']}\n"
                                + format_table(a) for a in attachments)
    except StatsError as exc:
        print(f"pyslirp stats: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(out)
    return 0
