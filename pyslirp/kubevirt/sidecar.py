"""``pyslirp kubevirt-sidecar``: KubeVirt's slirp network binding, served by pyslirp.

Theory of operation
-------------------
KubeVirt runs a network binding plugin's ``sidecarImage`` next to
virt-launcher in the VM's pod, with a shared volume at
``/var/run/kubevirt-hooks``. virt-launcher dials every socket there, calls
``kubevirt.hooks.info.Info/Info`` and then, for the newest Callbacks version
the hook lists, the hook points it subscribed to. This server listens on
``/var/run/kubevirt-hooks/slirp.sock`` (``--socket``) and answers:

* ``Info``: name ``network-slirp-binding``, versions v1alpha1, v1alpha2 and
  v1alpha3, hook points ``OnDefineDomain`` and ``Shutdown`` (virt-launcher
  calls Shutdown only on v1alpha3, which it prefers).
* ``OnDefineDomain`` (every version): read the VMI, start or reuse one
  pyslirp back end (a ``--target-type=qemu-stream`` process) per NIC bound
  to the plugin (``pyslirp.kubevirt.backends``), and return the domain XML
  with QEMU connected to it (``pyslirp.kubevirt.domain``). Bad input is
  ``INVALID_ARGUMENT`` with the reason and nothing started; a back end that
  can't start (a port in use) is ``FAILED_PRECONDITION``. Either way no
  domain comes back, so virt-launcher never defines a half-edited one.
* ``PreCloudInitIso``: hands the cloud-init data back unchanged (it is in
  the service, but not subscribed).
* ``Shutdown`` (v1alpha3): stop the back ends, answer, and exit 0, which is how
  a sidecar container ends when its VM does.

Who may connect: the hook socket is created owner-only (0600). Whoever can
call ``OnDefineDomain`` decides which back ends run and what QEMU is told, so
nobody but virt-launcher may; virt-launcher runs as the sidecar's user (uid
107 in non-root VMs, where KubeVirt runs sidecars as the qemu user too) or as
root, and either can connect to a 0600 socket of ours. QEMU's own sockets
are QEMU's user's only (``pyslirp.kubevirt.backends``; ``--qemu-user``).

SIGTERM/SIGINT do the same as Shutdown. gRPC handlers run on a small thread
pool; the back-end manager serialises what they do to the back ends.

The plugin's name (the ``binding.name`` a VMI's interface uses) is
``NETWORK_BINDING_PLUGIN_NAME`` from the environment (KubeVirt sets it for
binding sidecars), else ``slirp``; ``--plugin-name`` overrides both.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import stat
import threading
from concurrent import futures
from typing import Any

from pyslirp.kubevirt import domain
from pyslirp.kubevirt.backends import QEMU_USER, BackendError, BackendManager
from pyslirp.kubevirt.domain import HookError
from pyslirp.wire import netparams

log = logging.getLogger("pyslirp")

DEFAULT_SOCKET = "/var/run/kubevirt-hooks/slirp.sock"
HOOK_NAME = "network-slirp-binding"
DATA_SUBDIR = "pyslirp"


class HookServer:
    """The hook's behaviour, independent of gRPC plumbing (tests call it directly too)."""

    def __init__(self, backends: BackendManager, plugin: str, on_shutdown: Any = None,
                 virtio_mtu: int = domain.DEFAULT_VIRTIO_MTU, ipv6: bool = True) -> None:
        self.backends = backends
        self.plugin = plugin
        self.virtio_mtu = virtio_mtu
        self.ipv6 = ipv6
        self._on_shutdown = on_shutdown
        self._messages: dict[str, Any] = {}

    def info(self, result_cls: Any) -> Any:
        result = result_cls(name=HOOK_NAME, versions=list(domain_versions()))
        for point in ("OnDefineDomain", "Shutdown"):
            result.hookPoints.add(name=point, priority=0)
        return result

    def on_define_domain(self, domain_xml: bytes, vmi_json: bytes) -> bytes:
        """The edited domain; HookError/BackendError say why not."""
        ifaces = domain.slirp_interfaces(vmi_json, self.plugin, self.virtio_mtu, self.ipv6)
        # Check the XML before starting anything: bad input must leave no back end behind.
        domain.edit_domain(domain_xml, [])
        sockets = self.backends.ensure(ifaces)
        return domain.edit_domain(domain_xml, [(i, sockets[i.name]) for i in ifaces])

    def shutdown(self) -> None:
        self.backends.stop_all()
        if self._on_shutdown is not None:
            self._on_shutdown()


def domain_versions() -> tuple[str, ...]:
    from pyslirp.kubevirt.hookapi import VERSIONS

    return VERSIONS


def _handlers(hooks: HookServer, grpc: Any) -> list[Any]:
    from pyslirp.kubevirt.hookapi import SERVICES

    def unary(request_cls: Any, fn: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request_cls.FromString,
            response_serializer=lambda message: message.SerializeToString())

    def info(response_cls: Any) -> Any:
        def call(_request: Any, _context: Any) -> Any:
            log.info("kubevirt: Info called")
            return hooks.info(response_cls)
        return call

    def on_define_domain(version: str, response_cls: Any) -> Any:
        def call(request: Any, context: Any) -> Any:
            log.info("kubevirt: OnDefineDomain (%s) called", version)
            try:
                xml = hooks.on_define_domain(request.domainXML, request.vmi)
            except HookError as exc:
                log.error("kubevirt: OnDefineDomain: %s", exc)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except BackendError as exc:
                log.error("kubevirt: OnDefineDomain: %s", exc)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            return response_cls(domainXML=xml)
        return call

    def pre_cloud_init_iso(response_cls: Any) -> Any:
        def call(request: Any, _context: Any) -> Any:
            return response_cls(cloudInitNoCloudSource=request.cloudInitNoCloudSource,
                                cloudInitData=request.cloudInitData)
        return call

    def shutdown(response_cls: Any) -> Any:
        def call(_request: Any, _context: Any) -> Any:
            log.info("kubevirt: Shutdown called; stopping the stacks and exiting")
            hooks.shutdown()
            return response_cls()
        return call

    handlers = []
    for service, methods in SERVICES.items():
        version = service.split(".")[2]
        table = {}
        for method, (request_cls, response_cls) in methods.items():
            if method == "Info":
                fn = info(response_cls)
            elif method == "OnDefineDomain":
                fn = on_define_domain(version, response_cls)
            elif method == "PreCloudInitIso":
                fn = pre_cloud_init_iso(response_cls)
            else:
                fn = shutdown(response_cls)
            table[method] = unary(request_cls, fn)
        handlers.append(grpc.method_handlers_generic_handler(service, table))
    return handlers


def _mtu(text: str) -> int:
    value = int(text)
    try:
        return netparams.check_mtu(value)
    except netparams.NetParamError:
        raise argparse.ArgumentTypeError(
            f"must be {netparams.MIN_MTU}..{netparams.MAX_MTU}") from None


def _dns_upstream(text: str) -> str:
    """Checked here, so a typo stops the sidecar instead of every stack it starts."""
    try:
        netparams.parse_dns_upstream(text)
    except netparams.NetParamError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return text  # each stack parses it again from its own command line


def _user(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    try:
        ids = (int(uid), int(gid) if sep else int(uid))
    except ValueError:
        raise argparse.ArgumentTypeError("must be UID or UID:GID (numbers)") from None
    if min(ids) < 0:
        raise argparse.ArgumentTypeError("must be UID or UID:GID (numbers)")
    return ids


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pyslirp kubevirt-sidecar",
        description="KubeVirt's slirp network binding hook sidecar: serves the hook gRPC API "
                    "and gives each VM NIC bound to the plugin a pyslirp stack over "
                    "QEMU's -netdev stream.")
    parser.add_argument("--socket", default=DEFAULT_SOCKET,
                        help=f"the hook socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--data-dir", default=None,
                        help=f"where QEMU's sockets go (default: SOCKET's directory/"
                             f"{DATA_SUBDIR}; must be visible to the compute container)")
    parser.add_argument("--plugin-name", default=None,
                        help="the binding name interfaces use (default "
                             "$NETWORK_BINDING_PLUGIN_NAME, else slirp)")
    parser.add_argument("--dns-upstream", action="append", default=[], metavar="HOST[:PORT]",
                        type=_dns_upstream,
                        help="the stacks' DNS upstream instead of the pod's resolv.conf; "
                             "repeatable")
    parser.add_argument("--virtio-mtu", type=_mtu, default=domain.DEFAULT_VIRTIO_MTU,
                        help="the MTU of virtio NICs' links to their stacks (default "
                             f"{domain.DEFAULT_VIRTIO_MTU}; 1500 for a plain Ethernet MTU)")
    parser.add_argument("--qemu-user", type=_user, default=QEMU_USER, metavar="UID[:GID]",
                        help="the user QEMU runs as, the only one that may connect to the "
                             f"stacks (default {QEMU_USER[0]}:{QEMU_USER[1]}, "
                             "virt-launcher's qemu)")
    parser.add_argument("--disable-ipv6", action="store_true",
                        help="serve the VMs IPv4 only (default: IPv6 too, as QEMU's user "
                             "networking under KubeVirt's slirp binding did; the prefix is "
                             "pod.vmIPv6NetworkCIDR, fd00::/64 by default)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    from pyslirp.logsetup import setup_logging

    setup_logging(args.log_level)
    try:
        import grpc
    except ImportError:
        log.error("kubevirt-sidecar needs grpcio and protobuf: pip install 'pyslirp[kubevirt]'")
        return 1
    plugin = args.plugin_name or os.environ.get("NETWORK_BINDING_PLUGIN_NAME") \
        or domain.DEFAULT_PLUGIN_NAME
    path = os.path.abspath(args.socket)
    data_dir = os.path.abspath(args.data_dir or os.path.join(os.path.dirname(path), DATA_SUBDIR))
    if data_dir == os.path.dirname(path):
        # virt-launcher would dial QEMU's sockets as hooks (and wait for them forever).
        log.error("--data-dir must not be the hook directory itself; use a subdirectory")
        return 1
    stop = threading.Event()
    backends = BackendManager(data_dir, dns_upstreams=args.dns_upstream, qemu_user=args.qemu_user)
    hooks = HookServer(backends, plugin, on_shutdown=stop.set, virtio_mtu=args.virtio_mtu,
                       ipv6=not args.disable_ipv6)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(_handlers(hooks, grpc))
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by a sidecar that was killed
    except FileNotFoundError:
        pass
    # gRPC creates the socket file itself: only the umask can make it 0600 from the
    # start. It is process-wide, but none of our threads creates files yet.
    old_umask = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise RuntimeError("gRPC could not bind it")
    except RuntimeError as exc:
        log.error("cannot listen on %s: %s", path, exc)
        backends.close()
        return 1
    finally:
        os.umask(old_umask)
    server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    log.info("kubevirt: hook server on %s (plugin name %s, QEMU sockets in %s)",
             path, plugin, data_dir)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        # Let an in-flight Shutdown answer before the process goes.
        server.stop(grace=2).wait(5)
        backends.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        log.info("kubevirt: hook server stopped")
    return 0
