"""The CNI engine: one process per runtime directory serving every attached container.

Theory of operation
-------------------
The ``slirp`` plugin (:mod:`pyslirp.cni.plugin`) starts this process on
demand (own session, stdio on /dev/null and ``RUNDIR/engine.log``, no
inherited descriptors) and talks to it over ``RUNDIR/engine.sock``: one JSON
request per connection, one JSON reply, then the connection closes.

* ``add``: open the TAP in the container's namespace and configure it
  (:func:`pyslirp.runtime.tap.open_tap`, the same forked-child path as
  ``pyslirp --configure``), serve it with an
  :class:`~pyslirp.runtime.attachment.Attachment` (a TAP device) on the
  shared loop, write the state file, return the 1.1.0-shaped result. One loop holding many
  attachments is what keeps the marginal cost of a container at one
  :class:`~pyslirp.stack.stack.Stack` instead of one interpreter.
* ``del``: close the attachment (the TAP disappears with its last fd); for a
  state file left by a dead engine, remove the TAP if it is somehow still
  there (:func:`pyslirp.cni.nsops.remove_tap`); delete the state file.
* ``check``: the attachment must be served and healthy, and the interface,
  address and default route of ``prevResult`` must be in the namespace.
* ``gc``: delete every attachment of the network not in the valid list.
* ``stats`` (``pyslirp stats --cni-rundir``): the counters and flow gauges
  (:func:`pyslirp.stats.snapshot`) of every attachment of ``containerID``, in
  any network, or only of its interface ``ifname`` when given.

Trust: only clients of our uid or root are answered (``SO_PEERCRED``), and
every request's names and paths are checked by the plugin's rules
(:func:`pyslirp.cni.plugin.request_problem`): they become file names in the
runtime directory and the namespace an interface is made or inspected in. A
state file is acted on (a dead engine's TAP removed) only when it is ours, not
a symlink, agrees with its own file name, and its netns still is the
namespace the ADD opened the TAP in (``netnsId``: nsfs device and inode); any
other is removed without touching an interface (:func:`_stale_tap`).

Exactly one engine runs per runtime directory: it holds an exclusive
``flock`` on ``RUNDIR/engine.lock`` for its lifetime. It leaves when it has
had no attachment for :data:`IDLE_EXIT` seconds (pings do not count): it stops
listening first and unlinks the socket, so a plugin that connects in that
window is refused (or sees the connection closed unanswered) and starts a
fresh engine. An ``add`` is only ever processed by a listening engine, so
no work is lost. SIGTERM closes every attachment and leaves the state files
for DEL/GC, exactly like a crash does.

DNS: each attachment forwards to ``dnsUpstreams`` from its configuration when
given (tests point it at a server on loopback), otherwise to the nameservers
of ``/etc/resolv.conf`` (``PYSLIRP_RESOLV_CONF`` overrides the path), re-read
when it changes.

Port mappings (``runtimeConfig.portMappings``, what the portmap plugin reads
and ``podman run -p`` sends) become host ports of the engine forwarded into
the container by :class:`pyslirp.runtime.hostfwd.HostForwarder`, closed on
DEL; a pyslirp without that module refuses them with a clear error. Rootful
podman reserves the published host ports itself right after ADD (for the
portmap plugin's iptables DNAT; conmon then holds them): for such a caller the
engine only checks the ports are free at ADD, then takes over podman's
reservation sockets as they appear (:mod:`pyslirp.runtime.adopt`, only ever
from the plugin's caller, its descendants and the container's conmon) and serves
them; DEL closes our duplicates. A port already held by the caller at ADD is
taken over the same way.

Blocking work (forking into a namespace to open a TAP or inspect it, closing
a TAP, which waits for the kernel to unregister it) runs in worker threads,
so an ADD or DEL never stalls the traffic of the other containers.

IPv6 (``"ipv6": true``): the attachment's stack serves IPv6 as ``pyslirp -6``
does (docs/ipv6.md), and the TAP gets the static address the plugin chose
(prefix + 0x100/64, default route via prefix + 2; router advertisements and
DAD off on that interface: :class:`pyslirp.runtime.tap.ConfigureSpec`), which
the result lists beside the IPv4 one.

Port mappings over IPv6 (``"ipv6": true``): an IPv6 ``hostIP`` is an
IPv6-only host socket to the container's IPv6 address; no ``hostIP`` is an
IPv4 socket to its IPv4 address plus an IPv6-only ``[::]`` one to its IPv6
address (:func:`_binds`), so ``-p 8080:80`` answers on ``[::1]`` too. IPv6
reservations are taken over as IPv4 ones are.

What it deliberately does not do: port ranges beyond what the runtime spells
out one mapping at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from pyslirp.cni import nsops, plugin
from pyslirp.cni.plugin import (
    ERR_CHECK_FAILED,
    ERR_ENGINE,
    ERR_ENGINE_GONE,
    ERR_EXISTS,
    ERR_INVALID_CONFIG,
    ERR_NO_ATTACHMENT,
    ERR_SETUP_FAILED,
    ERR_TRY_AGAIN,
    ERR_UNSAFE,
    ERR_UNSUPPORTED_FIELD,
)
from pyslirp.cni.shared_engine import DropinServer
from pyslirp.runtime import adopt, malloc
from pyslirp.stats import snapshot

log = logging.getLogger("pyslirp.cni")

#: Seconds without attachments (after the last request) before the engine leaves.
IDLE_EXIT = float(os.environ.get("PYSLIRP_CNI_IDLE_EXIT", "1.0"))
RESOLV_CHECK_INTERVAL = 2.0
#: How long the engine waits for a runtime that reserves host ports (rootful podman)
#: to do so, and how often it looks (five times less often after the first second).
ADOPT_WAIT = float(os.environ.get("PYSLIRP_CNI_ADOPT_WAIT", "10.0"))
ADOPT_POLL = 0.01


class RequestError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


@dataclass
class Served:
    """One attachment this engine serves."""

    key: str
    network: str
    container_id: str
    ifname: str
    netns: str
    state_path: str
    tap_fd: int
    attachment: Any
    explicit_dns: bool
    explicit_search: bool
    dead: str | None = None
    #: The host ports of runtimeConfig.portMappings (a HostForwarder), if any.
    forwarder: Any = None
    #: The task waiting to take over host ports the runtime reserves after ADD.
    adopting: Any = None


def _key(network: str, cid: str, ifname: str) -> str:
    return f"{network}:{cid}:{ifname}"


def _cni_result(s: dict[str, Any], tap: Any, netns: str) -> dict[str, Any]:
    """The CNI result of an ADD: the TAP, its addresses and routes (IPv6 too with ``ipv6``)."""
    mac_text = ":".join(f"{b:02x}" for b in tap.mac)
    result: dict[str, Any] = {
        "cniVersion": plugin.CURRENT_VERSION,
        "interfaces": [{"name": tap.name, "mac": mac_text, "mtu": tap.mtu, "sandbox": netns}],
        "ips": [{"address": f"{s['address']}/{s['prefix']}", "gateway": s["gateway"],
                 "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0", "gw": s["gateway"]}],
        "dns": s["dns"],
    }
    if s.get("ipv6") is True:
        result["ips"].append({"address": f"{s['address6']}/64", "gateway": s["gateway6"],
                              "interface": 0})
        result["routes"].append({"dst": "::/0", "gw": s["gateway6"]})
    return result


class AttachmentDaemon:
    """The CNI engine process's core: answers the plugin's requests and serves the
    attachments they create (users and logs call the process "the engine")."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rundir: str) -> None:
        self.loop = loop
        self.rundir = rundir
        self.identity = plugin.own_identity()
        self.served: dict[str, Served] = {}
        self.inflight = 0
        self.stopped: asyncio.Future[None] = loop.create_future()
        self._server: asyncio.AbstractServer | None = None
        self._sock_ino: int | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._dns: list[tuple[str, int]] = []
        self._search: list[str] = []
        self._watcher: Any = None
        self._pending_close: list[int] = []
        #: Keys whose ADD is waiting for its TAP (a second ADD is "try again").
        self._adding: set[str] = set()
        #: The slirp4netns drop-in's attachments (shared mode: pyslirp.cni.shared_engine).
        self.dropins = DropinServer(loop, rundir, self._maybe_idle, self._close_fds_then,
                                    refuse_peer)

    # ---- DNS from resolv.conf (only for attachments without dnsUpstreams) ---------------
    def start_resolv_watcher(self) -> None:
        try:
            from pyslirp.runtime.main import ResolvConfWatcher
        except ImportError as exc:  # pragma: no cover - the runtime is part of the package
            log.warning("no resolv.conf watcher: %s", exc)
            return
        path = os.environ.get("PYSLIRP_RESOLV_CONF", "/etc/resolv.conf")
        self._watcher = ResolvConfWatcher(self, path)  # type: ignore[arg-type]
        self._watcher.check()
        self.loop.call_later(RESOLV_CHECK_INTERVAL, self._recheck_resolv)

    def _recheck_resolv(self) -> None:
        if self._watcher is not None and not self.stopped.done():
            self._watcher.check()
            self.loop.call_later(RESOLV_CHECK_INTERVAL, self._recheck_resolv)

    def set_dns(self, upstreams: list[tuple[str, int]], search: list[str]) -> None:
        """The ResolvConfWatcher's callback: apply to every attachment that follows it."""
        self._dns = list(upstreams)
        self._search = list(search)
        self.dropins.set_dns(upstreams, search)
        for s in self.served.values():
            if s.dead is None:
                if not s.explicit_dns:
                    s.attachment.stack.set_dns_upstreams(upstreams)
                if not s.explicit_search:
                    s.attachment.config.search_domains[:] = search

    # ---- listening ----------------------------------------------------------------
    async def listen(self) -> None:
        # dropin.sock first: a caller that sees engine.sock answer finds it (shared_shim).
        self.dropins.listen()
        path = plugin.socket_path(self.rundir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # we hold the lock: any socket file here is a dead engine's
        old_umask = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._on_client, path, backlog=128)
        finally:
            os.umask(old_umask)
        self._sock_ino = os.stat(path).st_ino

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        # The idle timer is not reset here: a stream of pings (or CHECKs) must not keep
        # an engine with no attachments alive. It re-checks when it fires.
        self.inflight += 1
        try:
            refusal = refuse_peer(writer.get_extra_info("socket"))
            if refusal is not None:
                log.warning("%s", refusal)
                # Take the request (unread) first: a client that writes before it reads
                # then gets this answer, not a broken pipe.
                with contextlib.suppress(TimeoutError, ValueError, OSError):
                    await asyncio.wait_for(reader.readline(), 5.0)
                writer.write(json.dumps({"ok": False, "code": ERR_UNSAFE,
                                         "msg": refusal}).encode())
                with contextlib.suppress(OSError):
                    await writer.drain()
                return
            try:
                line = await asyncio.wait_for(reader.readline(), 30.0)
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except (TimeoutError, ValueError) as exc:
                reply: dict[str, Any] = {"ok": False, "code": ERR_ENGINE,
                                         "msg": f"bad request to the engine: {exc}"}
            else:
                reply = await self.dispatch(request)
                await self._close_pending()
            writer.write(json.dumps(reply).encode())
            with contextlib.suppress(OSError):
                await writer.drain()
        finally:
            writer.close()
            self.inflight -= 1
            self._maybe_idle()

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        started = time.monotonic()
        try:
            problem = plugin.request_problem(op, request)
            if problem:
                raise RequestError(ERR_ENGINE, f"bad request to the engine: {problem}")
            if op == "add":
                reply = {"ok": True, "result": await self.add(request)}
            elif op == "del":
                await self.delete(request)
                reply = {"ok": True}
            elif op == "check":
                await self.check(request)
                reply = {"ok": True}
            elif op == "gc":
                await self.gc(request)
                reply = {"ok": True}
            elif op == "stats":
                reply = {"ok": True, "attachments": self.stats(request)}
            elif op == "ping":
                reply = {"ok": True, "attachments": len(self.served),
                         "identity": self.identity}
            else:
                raise RequestError(ERR_ENGINE, f"unknown engine request {op!r}")
        except RequestError as exc:
            log.warning("%s failed: %s", op, exc.msg)
            return {"ok": False, "code": exc.code, "msg": exc.msg}
        except Exception as exc:  # noqa: BLE001 - a request must never take the engine down
            log.exception("%s failed", op)
            return {"ok": False, "code": ERR_ENGINE, "msg": f"pyslirp engine error in {op}: "
                    f"{type(exc).__name__}: {exc}"}
        network = request.get("network") or request.get("settings", {}).get("network", "")
        log.info("%s %s:%s:%s done in %.1f ms", op, network,
                 request.get("containerID", ""), request.get("ifname", ""),
                 (time.monotonic() - started) * 1000)
        return reply

    # ---- ADD ------------------------------------------------------------------------
    async def add(self, req: dict[str, Any]) -> dict[str, Any]:
        s = req["settings"]
        network, cid, ifname = s["network"], req["containerID"], req["ifname"]
        key = _key(network, cid, ifname)
        if s.get("portMappings") and _forwarder_class() is None:
            raise RequestError(ERR_UNSUPPORTED_FIELD,
                               "unsupported field runtimeConfig.portMappings: this pyslirp "
                               "has no port forwarding (pyslirp.runtime.hostfwd); remove the "
                               "-p/portMappings")
        if key in self.served:
            raise RequestError(ERR_EXISTS, f"container {cid} already has interface {ifname} "
                               f"in network {network}")
        if key in self._adding:
            raise RequestError(ERR_TRY_AGAIN, f"an ADD of container {cid} interface {ifname} "
                               "is in progress")
        self._adding.add(key)
        try:
            return await self._add(req, key)
        finally:
            self._adding.discard(key)

    async def _add(self, req: dict[str, Any], key: str) -> dict[str, Any]:
        from pyslirp.runtime.attachment import Attachment
        from pyslirp.runtime.device import TapDevice
        from pyslirp.runtime.tap import ConfigureSpec, TapError, open_tap
        from pyslirp.stack.config import ConfigError, NetConfig, parse_cidr, parse_cidr6

        s = req["settings"]
        network, cid, ifname, netns = s["network"], req["containerID"], req["ifname"], \
            req["netns"]
        path = plugin.state_path(self.rundir, network, cid, ifname)
        stale = plugin.read_state(path)
        if stale is not None:
            if plugin.identity_alive(stale.get("engine")):
                raise RequestError(ERR_EXISTS, f"container {cid} already has interface "
                                   f"{ifname} in network {network} (served by pid "
                                   f"{stale['engine'].get('pid')})")
            log.info("ADD over the stale state of %s: cleaning it up first", key)
            await self._cleanup_stale(path, stale)
        ipv6 = s.get("ipv6") is True
        try:
            v6: dict[str, Any] = {"enable_ipv6": True,
                                  "network6": parse_cidr6(s["cidr6"])} if ipv6 else {}
            config = NetConfig(network=parse_cidr(s["cidr"]), mtu=s["mtu"],
                               disable_host_loopback=s["disableHostLoopback"],
                               dns_upstreams=[(h, p) for h, p in s["dnsUpstreams"]] or
                               list(self._dns),
                               search_domains=list(s["search"]) or list(self._search), **v6)
            mac = bytes.fromhex(s["mac"].replace(":", "")) if s.get("mac") else None
            spec = ConfigureSpec(
                ipaddress.IPv4Interface(f"{s['address']}/{s['prefix']}"),
                ipaddress.IPv4Address(s["gateway"]),
                address6=ipaddress.IPv6Interface(f"{s['address6']}/64") if ipv6 else None,
                gateway6=ipaddress.IPv6Address(s["gateway6"]) if ipv6 else None)
        except (ConfigError, ValueError, KeyError, TypeError) as exc:
            raise RequestError(ERR_INVALID_CONFIG, f"invalid configuration: {exc}") from None
        netns_id = _netns_id(netns)  # which namespace the path names now: see _stale_tap
        try:
            tap = await self._in_thread(functools.partial(
                open_tap, netns, "path", tapname=ifname, mtu=s["mtu"], configure=spec, mac=mac))
        except TapError as exc:
            raise RequestError(ERR_SETUP_FAILED, f"cannot set up {ifname} in {netns}: "
                               f"{exc}") from None
        if self.stopped.done():  # SIGTERM while the TAP was being made
            tap.close()
            raise RequestError(ERR_TRY_AGAIN, "the pyslirp engine is shutting down")
        try:
            config.vnet_hdr = tap.vnet_hdr
            config.offload = tap.offload
            config.uso = tap.uso
            attachment = Attachment(self.loop, TapDevice(tap.fd, name=f"{cid[:12]}/{ifname}"),
                                    config, on_fatal=lambda msg: self._on_fatal(key, msg))
        except Exception:
            tap.close()
            raise
        served = Served(key=key, network=network, container_id=cid, ifname=ifname,
                        netns=netns, state_path=path, tap_fd=tap.fd, attachment=attachment,
                        explicit_dns=bool(s["dnsUpstreams"]), explicit_search=bool(s["search"]))
        try:
            served.forwarder, pending = self._forward_ports(attachment, s, req.get("caller"), cid)
            if pending:
                served.adopting = self.loop.create_task(self._adopt_later(served, pending))
            result = _cni_result(s, tap, netns)
            state = {"version": 1, "network": network, "containerID": cid, "ifname": ifname,
                     "netns": netns, "netnsId": netns_id, "engine": self.identity,
                     "result": result,
                     "portMappings": s.get("portMappings") or [], "created": time.time()}
            try:
                plugin.write_state(path, state)
            except OSError as exc:
                raise RequestError(ERR_SETUP_FAILED, f"cannot write state {path}: "
                                   f"{exc.strerror}") from None
        except BaseException:
            self._close(served)
            await self._close_pending()
            raise
        self.served[key] = served
        return result

    def _forward_ports(self, attachment: Any, s: dict[str, Any],
                       caller: Any, container_id: str) -> tuple[Any, list[_Pending]]:
        """Open the host ports of ``runtimeConfig.portMappings`` (as the portmap plugin's).

        Returns the forwarder and the ports left for :meth:`_adopt_later`: a
        runtime that reserves host ports itself right after ADD (rootful podman)
        must find them free, so they are only checked here. A port already held
        by that caller or its descendants is taken over at once
        (:mod:`pyslirp.runtime.adopt`); held by anyone else, it is an error.
        """
        mappings = s.get("portMappings") or []
        if not mappings:
            return None, []
        forwarder_class = _forwarder_class()
        assert forwarder_class is not None  # checked before the TAP was made
        forwarder = forwarder_class(attachment)
        # Only a caller known to reserve ports is searched: any other caller (cnitool,
        # containerd, a test) listening on the port does so for itself, and keeps it.
        reserves = isinstance(caller, int) and caller > 1 and adopt.caller_reserves_ports(caller)
        tree = adopt.CallerTree(caller, container_id=container_id) if reserves else None
        pending: list[_Pending] = []
        for m in mappings:
            for p in _binds(m, s, tree):
                try:
                    if p.tree is not None:
                        _probe_port(p.proto, p.host_ip, p.host_port)
                        pending.append(p)
                    else:
                        forwarder.add(p.proto, p.host_ip, p.host_port, p.guest_ip,
                                      p.guest_port, v6only=p.v6only)
                except OSError as exc:
                    if p.optional and exc.errno in _NO_IPV6:
                        log.info("%s: no IPv6 on this host (%s): %s port %d serves IPv4 only",
                                 container_id, exc.strerror, p.proto, p.host_port)
                        continue
                    self._take_over(forwarder, p, exc)
        return forwarder, pending

    @staticmethod
    def _take_over(forwarder: Any, p: _Pending, exc: OSError) -> None:
        """Serve the caller's socket holding ``p``'s port, or fail the ADD naming it."""
        sock = None
        try:
            sock = _adopt(p, exc)
            forwarder.add(p.proto, p.host_ip, p.host_port, p.guest_ip, p.guest_port, sock=sock)
        except (OSError, ValueError) as final:
            if sock is not None:
                sock.close()
            forwarder.close()
            raise RequestError(ERR_SETUP_FAILED, f"cannot forward {p.proto} port "
                               f"{_where(p.host_ip, p.host_port)}: "
                               f"{getattr(final, 'strerror', None) or final}") from None
        log.info("took over %s port %s reserved by the runtime", p.proto,
                 _where(p.host_ip, p.host_port))

    async def _adopt_later(self, served: Served, pending: list[_Pending]) -> None:
        """Take over the host ports the runtime reserves after ADD; serve the rest ourselves.

        podman binds them a few milliseconds after ADD returned and keeps them
        open (podman, then its conmon) for the container's life. podman binds
        them *before* it starts the container's conmon, which inherits them: once
        that conmon is seen holding none of a port (``enable_port_reservation =
        false``), no reservation of it is coming, and the engine binds the port
        itself at once, as for any other runtime. If no conmon shows up either,
        it does so after :data:`ADOPT_WAIT`.
        """
        deadline = self.loop.time() + ADOPT_WAIT
        fast_until = self.loop.time() + 1.0
        tree = pending[0].tree
        assert tree is not None
        while pending and self.loop.time() < deadline:
            await asyncio.sleep(ADOPT_POLL if self.loop.time() < fast_until else ADOPT_POLL * 5)
            # Decided only by a pass that began with conmon known: each port looked for in it.
            last_pass = tree.monitor_seen
            for p in list(pending):
                assert p.tree is not None
                try:
                    sock = await self._in_thread(adopt.adopt, p.proto, p.host_ip, p.host_port,
                                                 p.tree)
                except OSError as exc:
                    log.warning("%s: %s", served.key, exc)
                    continue
                if sock is None:
                    continue
                pending.remove(p)
                if served.forwarder is None:  # deleted meanwhile
                    sock.close()
                    return
                self._serve_pending(served, p, sock)
            if last_pass:
                break
        for p in pending:
            if served.forwarder is None:
                return
            log.info("%s: no reservation of %s port %s %s; binding it", served.key,
                     p.proto, _where(p.host_ip, p.host_port),
                     "held by the container's conmon" if tree.monitor_seen else "appeared")
            self._serve_pending(served, p, None)

    def _serve_pending(self, served: Served, p: _Pending, sock: Any) -> None:
        try:
            served.forwarder.add(p.proto, p.host_ip, p.host_port, p.guest_ip, p.guest_port,
                                 sock=sock, v6only=p.v6only)
        except (OSError, ValueError) as exc:
            if sock is not None:
                sock.close()
            log.warning("%s: cannot forward %s port %s: %s", served.key, p.proto,
                        _where(p.host_ip, p.host_port), exc)
            return
        log.info("%s: %s %s port %s", served.key, "took over" if sock else "bound",
                 p.proto, _where(p.host_ip, p.host_port))

    async def _in_thread(self, func: Any, *args: Any) -> Any:
        """Run a blocking namespace helper (fork + wait) off the loop.

        Opening a TAP or looking into a namespace forks a child and waits for
        it (~10 ms, mostly the kernel registering the device); on the loop that
        would stall every other container's traffic. The helpers are built to
        fork from a threaded process: the child runs only their code and ends
        in ``os._exit``.
        """
        return await self.loop.run_in_executor(None, func, *args)

    def _on_fatal(self, key: str, message: str) -> None:
        served = self.served.get(key)
        if served is None or served.dead is not None:
            return
        log.warning("attachment %s lost its TAP: %s", key, message)
        served.dead = message
        self._close(served)
        self.loop.create_task(self._close_pending())

    def _close(self, served: Served) -> None:
        if served.adopting is not None:
            served.adopting.cancel()
            served.adopting = None
        if served.forwarder is not None:
            with contextlib.suppress(Exception):
                served.forwarder.close()
            served.forwarder = None
        with contextlib.suppress(Exception):
            served.attachment.close()
        if served.tap_fd >= 0:
            self._pending_close.append(served.tap_fd)
            served.tap_fd = -1

    async def _close_pending(self) -> None:
        """Close the TAP fds of deleted attachments in a worker thread.

        Closing a TAP's last fd unregisters the device, which waits for RCU
        grace periods: ~20 ms during which the loop would serve nobody. The
        reply to DEL still waits for it, so the TAP is gone when DEL returns.
        """
        fds, self._pending_close = self._pending_close, []
        if fds:
            await self.loop.run_in_executor(None, _close_fds, fds)

    # ---- DEL ------------------------------------------------------------------------
    async def delete(self, req: dict[str, Any]) -> None:
        network, cid, ifname = req["network"], req["containerID"], req["ifname"]
        key = _key(network, cid, ifname)
        path = plugin.state_path(self.rundir, network, cid, ifname)
        served = self.served.pop(key, None)
        if served is not None:
            self._close(served)
            _unlink(path)
            return
        state = plugin.read_state(path)
        if state is None:
            return
        if plugin.identity_alive(state.get("engine")) and \
                state.get("engine") != self.identity:
            # Another live engine serves it (two runtime dirs cannot share a file, so
            # this means the lock was broken); leave its attachment alone.
            raise RequestError(ERR_ENGINE, f"attachment {key} is served by another engine "
                               f"(pid {state['engine'].get('pid')})")
        await self._cleanup_stale(path, state)

    async def _cleanup_stale(self, path: str, state: dict[str, Any]) -> None:
        """Remove what a dead engine left of one attachment: the TAP if still there, the file."""
        target = _stale_tap(path, state)
        if target is not None:
            netns, ifname = target
            try:
                done = await self._in_thread(nsops.run_in_netns, netns, nsops.remove_tap,
                                             ifname)
                log.info("stale attachment %s: TAP %s", path, done)
            except OSError as exc:
                log.warning("stale attachment %s: cannot inspect %s: %s", path, netns, exc)
        _unlink(path)

    # ---- CHECK ----------------------------------------------------------------------
    async def check(self, req: dict[str, Any]) -> None:
        network, cid, ifname = req["network"], req["containerID"], req["ifname"]
        key = _key(network, cid, ifname)
        served = self.served.get(key)
        if served is None:
            raise RequestError(ERR_NO_ATTACHMENT, f"the engine does not serve container {cid} "
                               f"interface {ifname} in network {network}")
        if served.dead is not None:
            raise RequestError(ERR_ENGINE_GONE, f"the stack serving {ifname} of container "
                               f"{cid} stopped: {served.dead}")
        expected = req.get("expected") or {}
        try:
            seen = await self._in_thread(nsops.run_in_netns, req["netns"],
                                         nsops.probe_interface, ifname)
        except OSError as exc:
            raise RequestError(ERR_CHECK_FAILED, f"cannot inspect {req['netns']}: "
                               f"{exc}") from None
        if seen is None:
            raise RequestError(ERR_CHECK_FAILED, f"interface {ifname} is missing from "
                               f"{req['netns']}")
        if not seen["up"]:
            raise RequestError(ERR_CHECK_FAILED, f"interface {ifname} is down")
        mac = expected.get("mac")
        if mac and str(mac).lower() != seen["mac"]:
            raise RequestError(ERR_CHECK_FAILED, f"interface {ifname} has MAC {seen['mac']}, "
                               f"expected {mac}")
        for address in expected.get("addresses") or []:
            if isinstance(address, str) and ":" in address:
                if address not in seen["addresses6"]:
                    raise RequestError(ERR_CHECK_FAILED, f"interface {ifname} lacks IPv6 "
                                       f"address {address} (has "
                                       f"{', '.join(seen['addresses6']) or 'none'})")
            elif address != seen["address"]:
                raise RequestError(ERR_CHECK_FAILED, f"interface {ifname} has address "
                                   f"{seen['address'] or 'none'}, expected {address}")
        for gw in expected.get("gateways") or []:
            if gw not in seen["gateways"]:
                raise RequestError(ERR_CHECK_FAILED, f"the default route via {gw} on "
                                   f"{ifname} is missing")

    # ---- STATS ----------------------------------------------------------------------
    def stats(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        cid, ifname = req["containerID"], req.get("ifname")
        found = [s for s in self.served.values()
                 if s.container_id == cid and ifname in (None, s.ifname)]
        if not found:
            where = f"interface {ifname} of container {cid}" if ifname else f"container {cid}"
            raise RequestError(ERR_NO_ATTACHMENT, f"the engine does not serve {where}")
        return [{"network": s.network, "containerID": s.container_id, "ifname": s.ifname,
                 **snapshot(s.attachment.stack)}
                for s in sorted(found, key=lambda s: s.key)]

    # ---- GC -------------------------------------------------------------------------
    async def gc(self, req: dict[str, Any]) -> None:
        network = req["network"]
        keep = {_key(network, c, i) for c, i in req["valid"]}
        for key, served in list(self.served.items()):
            if served.network == network and key not in keep:
                log.info("GC: deleting %s", key)
                await self.delete({"network": network, "containerID": served.container_id,
                             "ifname": served.ifname})
        for path, state in plugin.list_states(self.rundir):
            if not state:
                log.info("GC: removing unreadable state %s", path)
                _unlink(path)
                continue
            parts = _key_of(path)
            if parts is None or parts[0] != network:
                continue
            key = _key(*parts)
            if key in keep or key in self.served:
                continue
            if plugin.identity_alive(state.get("engine")):
                continue  # another live engine's (see delete())
            log.info("GC: removing stale %s", key)
            await self._cleanup_stale(path, state)

    # ---- lifetime -------------------------------------------------------------------
    def _close_fds_then(self, fds: list[int], then: Any) -> None:
        """Close ``fds`` in a worker thread (a TAP's last close waits), then call ``then``."""
        future = self.loop.run_in_executor(None, _close_fds, fds)
        future.add_done_callback(lambda _f: then())

    def _busy(self) -> bool:
        return bool(self.served or self.dropins.served)

    def _maybe_idle(self) -> None:
        if not self._busy() and self.inflight == 0:
            self._maybe_idle_later()

    def _maybe_idle_later(self) -> None:
        if self._idle_handle is None:
            self._idle_handle = self.loop.call_later(IDLE_EXIT, self._idle_exit)

    def _idle_exit(self) -> None:
        self._idle_handle = None
        if self._busy():
            return  # an ADD came; the DEL of the last attachment will re-arm
        if self.inflight:
            self._maybe_idle_later()
            return
        log.info("no attachments left: exiting")
        self.stop_listening()
        if not self.stopped.done():
            self.stopped.set_result(None)

    def stop_listening(self) -> None:
        self.dropins.stop_listening()
        if self._server is not None:
            self._server.close()
            self._server = None
        path = plugin.socket_path(self.rundir)
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == self._sock_ino:
                os.unlink(path)

    def shutdown(self) -> None:
        """Close every attachment; state files stay for DEL/GC (as after a crash)."""
        self.stop_listening()
        self.dropins.shutdown("the shared pyslirp engine was stopped")
        for served in self.served.values():
            self._close(served)
        self.served.clear()
        fds, self._pending_close = self._pending_close, []
        _close_fds(fds)


@dataclass
class _Pending:
    """One host socket of a port mapping on its way to the forwarder."""

    proto: str
    host_ip: str
    host_port: int
    guest_ip: str
    guest_port: int
    #: The runtime that may reserve this port after ADD (None: bind it at once).
    tree: adopt.CallerTree | None
    #: An IPv6 socket takes IPv6 clients only (IPv4 ones have their own forward).
    v6only: bool = False
    #: The IPv6 half of a mapping without hostIP: skipped on a host without IPv6.
    optional: bool = False


#: What binding an IPv6 socket fails with on a host that has no IPv6 (disabled).
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def _binds(m: dict[str, Any], s: dict[str, Any], tree: adopt.CallerTree | None) \
        -> list[_Pending]:
    """The host sockets of one mapping, each to the container's address of its family.

    An IPv4 ``hostIP`` is an IPv4 forward, an IPv6 one (only on an ``"ipv6"``
    network: the plugin checked) an IPv6-only forward, as the portmap plugin
    matches one family per ``hostIP``. No ``hostIP`` means every address: on an
    ``"ipv6"`` network an IPv4 forward to the IPv4 address and an IPv6-only ``::``
    one to the IPv6 address (what ``-p 8080:80`` gives with pasta and with rootful
    podman's own networks: ``[::1]:8080`` answers too). rootful podman reserves only
    the IPv4 port of such a mapping, so the ``::`` half is bound at once, and its
    IPv6-only socket leaves the IPv4 port to that reservation.
    """
    host_ip = m["hostIP"]
    proto, port, cport = m["protocol"], m["hostPort"], m["containerPort"]
    if ":" in host_ip:
        return [_Pending(proto, host_ip, port, s["address6"], cport, tree, v6only=True)]
    binds = [_Pending(proto, host_ip or "0.0.0.0", port, s["address"], cport, tree)]
    if not host_ip and s.get("ipv6") is True:
        binds.append(_Pending(proto, "::", port, s["address6"], cport, None, v6only=True,
                              optional=True))
    return binds


def _where(host_ip: str, port: int) -> str:
    return f"[{host_ip}]:{port}" if ":" in host_ip else f"{host_ip}:{port}"


def _probe_port(proto: str, host_ip: str, host_port: int) -> None:
    """OSError (EADDRINUSE, ...) unless the port could be bound now; it is left free."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    v6 = ":" in host_ip
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind) as probe:
        if proto == "tcp":  # as the forwarder binds: lingering TIME_WAIT does not count
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6:  # as the forwarder binds it: the IPv4 port is not this socket's business
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((host_ip, host_port))


def _adopt(p: _Pending, exc: OSError) -> Any:
    """The caller's socket holding ``p``'s port, taken over; else re-raise ``exc``.

    Only the plugin's caller and its descendants are asked (CallerTree): a port
    held by an unrelated process stays that process's, and ADD fails with
    "address already in use".
    """
    if exc.errno != errno.EADDRINUSE or p.tree is None:
        raise exc
    sock = adopt.adopt(p.proto, p.host_ip, p.host_port, p.tree, probe_unlisted=True)
    if sock is None:
        raise exc
    return sock


def _forwarder_class() -> Any:
    """pyslirp.runtime.hostfwd.HostForwarder, or None in a pyslirp without port forwarding."""
    try:
        from pyslirp.runtime.hostfwd import HostForwarder
    except ImportError:
        return None
    return HostForwarder


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def refuse_peer(sock: Any, name: str = "engine.sock") -> str | None:
    """Why a client of the engine's socket ``name`` is refused: only our uid and root may
    ask us anything (engine.sock, and the drop-in's dropin.sock)."""
    try:
        pid, uid, _gid = plugin.peer_credentials(sock)
    except (OSError, AttributeError) as exc:
        return f"refused a client of {name}: no peer credentials ({exc})"
    if plugin.trusted_uid(uid):
        return None
    return (f"refused a client of {name} running as uid {uid} (pid {pid}): only uid "
            f"{os.geteuid()} and root may use this engine")


def _netns_id(path: str) -> str | None:
    """The identity of the namespace ``path`` names now (nsfs device and inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def _key_of(path: str) -> tuple[str, str, str] | None:
    """(network, containerID, ifname) from a state file's name, which the engine chose."""
    name = os.path.basename(path)
    parts = name[:-len(".json")].split(":") if name.endswith(".json") else []
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


def _stale_tap(path: str, state: dict[str, Any]) -> tuple[str, str] | None:
    """The (netns, TAP) a dead engine's state file lets us remove, or None to touch nothing.

    The file must be ours (:func:`plugin.read_state` returns {} otherwise),
    agree with its own name on network, container and interface (the name is
    what DEL and GC look up), and name a network namespace that is still the
    one the ADD opened its TAP in: a ``/proc/PID/ns/net`` whose pid was reused,
    or a file edited to point elsewhere, names another container's interfaces.
    """
    parts = _key_of(path)
    named = (state.get("network"), state.get("containerID"), state.get("ifname"))
    if parts is None or named != parts:
        if state:
            log.warning("state %s names attachment %s: ignoring its TAP", path, named)
        return None
    netns = state.get("netns")
    if plugin.netns_problem(netns) is not None:
        return None  # the namespace is gone, and the TAP with it
    assert isinstance(netns, str)
    recorded, current = state.get("netnsId"), _netns_id(netns)
    if recorded is None or recorded != current:
        log.warning("state %s: %s is not the namespace the attachment was made in "
                    "(recorded %s, now %s): leaving its interfaces alone", path, netns,
                    recorded, current)
        return None
    return netns, parts[2]


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _lock(rundir: str) -> int | None:
    """Take the engine lock; None if another engine holds it (and answers) for good."""
    fd = plugin.open_private(os.path.join(rundir, "engine.lock"), os.O_RDWR | os.O_CREAT)
    deadline = time.monotonic() + 10.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        # An engine that is going idle releases the lock within moments; a live one
        # keeps answering on the socket, and then this one is not needed.
        probe = plugin.connect_engine(rundir)
        if probe is not None:
            probe.close()
            os.close(fd)
            return None
        if time.monotonic() > deadline:
            os.close(fd)
            return None
        time.sleep(0.02)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(rundir: str) -> int:
    try:
        plugin.prepare_runtime_dir(rundir, create=True)
        lock_fd = _lock(rundir)
    except plugin.CniError as exc:
        log.error("%s", exc.msg)
        return 1
    if lock_fd is None:
        log.info("another engine serves %s; leaving", rundir)
        return 0
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    daemon = AttachmentDaemon(loop, rundir)
    try:
        loop.run_until_complete(daemon.listen())
        malloc.freeze_startup_objects()
    except OSError as exc:
        log.error("cannot listen on %s: %s", plugin.socket_path(rundir), exc)
        return 1
    daemon.dropins.filtered = _install_seccomp()
    daemon.start_resolv_watcher()

    def on_signal(sig: int) -> None:
        log.info("received %s: closing every attachment", signal.Signals(sig).name)
        if not daemon.stopped.done():
            daemon.stopped.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("engine %s serving %s", daemon.identity, rundir)
    daemon._maybe_idle()  # started for nothing (e.g. a DEL of a stale attachment)
    try:
        loop.run_until_complete(daemon.stopped)
    finally:
        daemon.shutdown()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        os.close(lock_fd)
    return 0


def _install_seccomp() -> bool:
    """The engine's seccomp filter (no exec, ptrace, mount...): docs/security.md.

    setns and prctl stay allowed: the TAP and namespace helpers it forks for
    containers yet to come inherit the filter. No mount sandbox: they must
    reach /dev/net/tun and netns paths anywhere. Without seccomp in the kernel
    the engine still serves (the plugin starts it implicitly; nobody could
    opt out), and says so.
    """
    from pyslirp.runtime import sandbox, seccomp

    if not sandbox.install_seccomp(seccomp.ENGINE_BLOCKED):
        log.warning("serving without a seccomp filter")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rundir = None
    if len(argv) == 2 and argv[0] == "--rundir":
        rundir = argv[1]
    if not rundir:
        print("usage: python -m pyslirp.cni.daemon --rundir DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("PYSLIRP_CNI_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s pyslirp-cni[%(process)d] %(levelname)s %(message)s")
    try:
        return serve(rundir)
    except Exception:
        log.exception("the engine failed")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
