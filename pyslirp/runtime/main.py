"""Process lifetime for the two ways of serving a namespace.

Theory of operation
-------------------
:func:`serve_namespace` is slirp4netns's job: open (or attach to) the TAP in
the target namespace, serve it until SIGTERM/SIGINT, the exit fd or the TAP
going away, then close every host socket and exit 0. :func:`run_command` is
``pyslirp run``: make fresh namespaces for a command, serve them, and exit
with the command's status once it ends.

Both go through :class:`Server`, which owns the uvloop loop, the
:class:`~pyslirp.runtime.attachment.Attachment` (with a TAP device, or a QEMU
one: ``device_class``), the signal handlers and the
resolv.conf watcher that keeps the DNS upstreams current when no
``--dns-upstream`` was given. What to serve comes as a
:class:`~pyslirp.runtime.spec.ServeSpec`; the API socket is the front end's
plug-in (``ServeSpec.api``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyslirp.runtime import malloc
from pyslirp.runtime.attachment import Attachment
from pyslirp.runtime.device import Device, TapDevice
from pyslirp.runtime.pcap import PcapWriter
from pyslirp.runtime.ready import die_by, early_signals, write_ready
from pyslirp.runtime.spec import ApiFactory, Closeable, ServeSpec
from pyslirp.stack.config import NetConfig
from pyslirp.stack.dns import parse_resolv_conf

if TYPE_CHECKING:
    from pyslirp.runtime.tap import TapHandle

log = logging.getLogger("pyslirp")

RESOLV_CONF = "/etc/resolv.conf"
_RESOLV_CHECK_INTERVAL = 2.0
_DNS_PORT = 53


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        log.warning("uvloop is not installed; using the slower asyncio loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ResolvConfWatcher:
    """Keeps the DNS forwarder's upstreams (and DHCP's search list) equal to resolv.conf."""

    def __init__(self, server: Server, path: str = RESOLV_CONF) -> None:
        self.server = server
        self.path = path
        self._stamp: tuple[int, int, int] | None = None

    def check(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (0, 0, 0)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            log.warning("cannot read %s: %s; DNS has no upstream", self.path, exc.strerror)
            text = ""
        nameservers, search = parse_resolv_conf(text)
        # A zone (fe80::1%eth0) stays: the DNS sockets connect with its scope id.
        upstreams = [(ns, _DNS_PORT) for ns in nameservers]
        self.server.set_dns(upstreams, search)
        log.info("DNS upstreams from %s: %s", self.path,
                 ", ".join(h for h, _ in upstreams) or "none")


class Server:
    """One uvloop loop serving one guest link until told to stop."""

    def __init__(self, tap_fd: int, config: NetConfig, *, tap_name: str = "tap0",
                 pcap_path: str | None = None,
                 dns_upstreams: list[tuple[str, int]] | None = None,
                 device_class: Callable[[int, str], Device] = TapDevice) -> None:
        self.loop = _new_loop()
        self.config = config
        self.exit_status = 0
        #: The stop signal that ended serving, if one did (serve_namespace dies by it).
        self.stop_signal: int | None = None
        self._stopped = self.loop.create_future()
        pcap = PcapWriter(pcap_path, strip_vnet=config.vnet_hdr) if pcap_path else None
        # device_class: the link's kind (a TAP, or a QEMU socket: runtime/qemu.py).
        self.attachment = Attachment(self.loop, device_class(tap_fd, tap_name), config,
                                     pcap=pcap, on_fatal=lambda _msg: self.stop(1))
        self._watcher: ResolvConfWatcher | None = None
        if dns_upstreams:
            self.set_dns(dns_upstreams, config.search_domains)
        elif not config.disable_dns:
            self._watcher = ResolvConfWatcher(self)
            self._watcher.check()
            self.loop.call_later(_RESOLV_CHECK_INTERVAL, self._recheck_resolv_conf)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        for early in early_signals():  # stopped before the loop existed (runtime/ready.py)
            self._on_signal(early)
        self.api: Closeable | None = None
        self.forwarder: Closeable | None = None

    def serve_api(self, api: ApiFactory, default_guest_addr: str) -> None:
        """Serve the front end's API socket (``--api-socket``) with a port forwarder.

        ``default_guest_addr``: where forwards go when a request names no guest
        address. Raises OSError (logged by the caller) if the socket cannot be made.
        """
        from pyslirp.runtime.hostfwd import serve_api

        self.forwarder, self.api = serve_api(self.attachment, api, default_guest_addr)

    def set_dns(self, upstreams: list[tuple[str, int]], search: list[str]) -> None:
        self.attachment.stack.set_dns_upstreams(upstreams)
        self.config.search_domains[:] = search

    def _recheck_resolv_conf(self) -> None:
        if self._watcher is not None and not self._stopped.done():
            self._watcher.check()
            self.loop.call_later(_RESOLV_CHECK_INTERVAL, self._recheck_resolv_conf)

    def _on_signal(self, sig: int) -> None:
        log.info("received %s, shutting down", signal.Signals(sig).name)
        if self.stop_signal is None and not self._stopped.done():
            self.stop_signal = sig
        self.stop(0)

    def stop(self, status: int) -> None:
        if not self._stopped.done():
            self.exit_status = status
            self._stopped.set_result(None)

    def watch_fd_for_exit(self, fd: int) -> None:
        """slirp4netns --exit-fd: exit when the fd reports any event (data, EOF, error)."""
        def on_event() -> None:
            log.info("exit fd %d became readable, shutting down", fd)
            self.loop.remove_reader(fd)
            self.stop(0)
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, on_event)

    def run(self, on_ready: Any = None) -> int:
        def start() -> None:
            if on_ready is not None:
                on_ready()
            # After the ready byte: the full collection takes milliseconds a caller waits for.
            malloc.freeze_startup_objects()

        self.loop.call_soon(start)
        try:
            self.loop.run_until_complete(self._stopped)
        finally:
            if self.api is not None:
                self.api.close()
            if self.forwarder is not None:
                self.forwarder.close()
            self.attachment.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.loop.remove_signal_handler(sig)
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()
        return self.exit_status


def signal_ready(fd: int | None) -> None:
    """slirp4netns's ``-r FD``: write "1" to the ready fd and close it (a failure is logged)."""
    problem = write_ready(fd)
    if problem:
        log.warning("%s", problem)


def _open_tap_for(spec: ServeSpec, target: str, netns_type: str, tapname: str,
                  configure: bool, userns_path: str | None) -> tuple[Any, NetConfig]:
    from pyslirp.runtime.tap import ConfigureSpec, open_tap

    config = spec.fresh_config()
    configure_spec = ConfigureSpec.from_netconfig(config) if configure else None
    # slirp4netns sets MTU and MAC only with --configure; without it the TAP is left as is.
    return open_tap(target, netns_type, tapname=tapname, userns_path=userns_path,
                    mtu=config.mtu if configure else None, configure=configure_spec,
                    mac=spec.macaddress if configure else None,
                    vnet_hdr=spec.offload, offload=spec.offload), config


def serve_namespace(spec: ServeSpec, tap: TapHandle | None = None) -> int:
    """``pyslirp [OPTIONS] PID|PATH [TAPNAME]``: serve until killed.

    ``tap``: the TAP the front end opened already for ``spec`` (pyslirp.cli opens it
    before importing this module, "Start-up order"); it is ours to close.
    """
    started = time.monotonic()
    if tap is not None:
        config = spec.fresh_config()
    else:
        try:
            tap, config = _open_tap_for(spec, spec.target, spec.netns_type, spec.tapname,
                                        spec.configure, spec.userns_path)
        except (OSError, RuntimeError, ValueError) as exc:
            log.error("%s", exc)
            return 1
    config.vnet_hdr = tap.vnet_hdr
    config.offload = tap.offload
    config.uso = tap.uso
    server = Server(tap.fd, config, tap_name=tap.name, pcap_path=spec.pcap,
                    dns_upstreams=list(spec.dns_upstreams))
    if spec.exit_fd is not None:
        server.watch_fd_for_exit(spec.exit_fd)
    if spec.api is not None:
        try:
            server.serve_api(spec.api, str(config.network.network_address + 100))
        except OSError as exc:
            log.error("%s", exc)
            server.stop(1)
            status = server.run()
            os.close(tap.fd)
            return status
    log.info("serving %s in %s %s (MTU %d, %s, vnet header %s, offload %s) after %.0f ms",
             tap.name, spec.netns_type, spec.target, config.mtu, config.network,
             "on" if tap.vnet_hdr else "off", "on" if tap.offload else "off",
             (time.monotonic() - started) * 1000)
    outbound = server.attachment.host.outbound
    outbound.ipv4 = spec.outbound_addr
    outbound.ipv6 = spec.outbound_addr6
    if outbound:
        log.info("outbound address: %s", " ".join(
            a for a in (outbound.ipv4, outbound.ipv6) if a))
    # slirp4netns's order: sockets (TAP, API) first, then sandbox and seccomp, then ready.
    from pyslirp.runtime.sandbox import apply as apply_hardening

    if not apply_hardening(spec.hardening):
        server.stop(1)
        status = server.run()
        os.close(tap.fd)
        return status
    status = server.run(on_ready=lambda: signal_ready(spec.ready_fd))
    os.close(tap.fd)
    if server.stop_signal is not None:  # as slirp4netns, which has no handler for it
        logging.shutdown()
        return die_by(server.stop_signal)
    return status


def run_command(spec: ServeSpec) -> int:
    """``pyslirp run -- CMD``: run CMD in fresh namespaces with networking; return its status."""
    from pyslirp.runtime.spawn import spawn_isolated

    config = spec.net
    resolv = "".join(f"search {d}\n" for d in config.search_domains[:1])
    resolv += "nameserver " + str(config.network.network_address + 3) + "\n"
    try:
        child = spawn_isolated(list(spec.command), resolv_conf=resolv)
    except (OSError, RuntimeError) as exc:
        log.error("cannot create namespaces: %s", exc)
        return 1
    try:
        tap, config = _open_tap_for(spec, str(child.pid), "pid", "tap0", True, None)
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("%s", exc)
        child.kill(signal.SIGKILL)
        child.wait()
        return 1
    config.vnet_hdr = tap.vnet_hdr
    config.offload = tap.offload
    config.uso = tap.uso
    server = Server(tap.fd, config, tap_name=tap.name, pcap_path=spec.pcap,
                    dns_upstreams=list(spec.dns_upstreams))
    child_status: list[int] = []
    pidfd = os.pidfd_open(child.pid)

    def on_child_exit() -> None:
        server.loop.remove_reader(pidfd)
        child_status.append(child.wait())
        server.stop(child_status[0])

    server.loop.add_reader(pidfd, on_child_exit)
    try:
        status = server.run(on_ready=child.release)
    finally:
        os.close(pidfd)
        os.close(tap.fd)
    if not child_status:  # we were interrupted: take the command down with us
        child.kill(signal.SIGTERM)
        status = child.wait()
    return status
