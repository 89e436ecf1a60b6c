"""The sidecar's pyslirp back ends: one ``pyslirp --target-type=qemu-stream`` process per NIC.

Theory of operation
-------------------
Each NIC gets its own pyslirp process (the same program and the same code
path as ``pyslirp --target-type=qemu-stream SOCKET``), listening on
``DATA_DIR/NAME.sock``. DATA_DIR is a subdirectory of the hook directory,
which the sidecar and virt-launcher's compute container share, so QEMU
reaches the socket at the same path; it is not the hook directory itself,
since virt-launcher dials every entry there as a hook.

Who may connect: only QEMU's user. Whoever connects to a back end's socket is
the VM's NIC, and the hook volume is shared with every container of the pod
that mounts it, so the socket is never world-connectable. virt-launcher's
QEMU runs as uid/gid 107 (``qemu``; ``qemu_user`` to change it), which is
also the user KubeVirt runs binding sidecars as in non-root VMs (the image's
``USER 107:107``). pyslirp creates the socket 0600 as the sidecar's user;
then, before the domain (and so QEMU) can use it:

* a sidecar running as QEMU's uid leaves it so: QEMU is the owner;
* a sidecar running as root gives it to 107:107, still 0600;
* any other sidecar user that is in QEMU's group (the pod's ``fsGroup``
  107) gives the socket to that group, 0660: QEMU connects through its
  primary group, other users stay out;
* otherwise QEMU could not connect at all, and :meth:`BackendManager.ensure`
  fails with a :class:`BackendError` that says how to run the sidecar.

The back end itself lets a second connection replace the VM's only if it comes
from the same uid and gid (see :mod:`pyslirp.runtime.qemu`), so even root
in the pod cannot cut the VM off by connecting.

The process runs in the sidecar's network namespace, which is the pod's:
the VM's flows leave from the pod's address and the forwarded ports are the
pod's ports, as with KubeVirt's own slirp. Its DNS upstreams and search
domains come from the pod's resolv.conf (watched, as for a namespace) unless
the sidecar was given ``--dns-upstream``.

Each process runs with ``--enable-seccomp`` and, where this pod lets it
make the namespaces (:func:`pyslirp.runtime.sandbox.can_create_sandbox`,
checked once; a runtime's seccomp profile may forbid a non-root sidecar to
create a user namespace), ``--enable-sandbox``: the back end then sees only
read-only ``/etc`` and ``/run`` (docs/security.md). The start-up
log line says which.

Start-up is synchronous and checked: :meth:`BackendManager.ensure` returns
only once the process wrote its ready byte (the socket listens, so QEMU can
connect the moment the domain starts) and every declared port was added
through the back end's private API socket (slirp4netns's ``add_hostfwd``, to
the guest's DHCP address; with IPv6 also ``[::]:PORT`` to the VM's IPv6
address, see :meth:`BackendManager._forward`). Anything failing stops that process again and
raises :class:`BackendError` with the reason, so a domain is never returned
pointing at a back end that is not there.

Calls repeat (virt-launcher defines the domain again on restarts and
updates): a running back end whose settings are unchanged is reused as is; one
whose settings changed is replaced. Lifetime: each process also watches an
``--exit-fd`` pipe whose other end only the sidecar holds, so if the sidecar
dies, even by SIGKILL, its back ends exit too. :meth:`BackendManager.stop_all`
closes those pipes (a clean exit), waits, and escalates to SIGTERM/SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from pyslirp.kubevirt.domain import SlirpInterface

log = logging.getLogger("pyslirp")

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
#: The uid and gid virt-launcher's QEMU runs as (KubeVirt's ``qemu`` user).
QEMU_USER = (107, 107)


class BackendError(RuntimeError):
    """A backend could not be started or configured; the message says why."""


@dataclass
class _Backend:
    iface: SlirpInterface
    proc: subprocess.Popen[bytes]
    exit_w: int
    socket_path: str
    api_path: str


def api_request(path: str, request: dict[str, object], timeout: float = 10.0) -> dict[str, object]:
    """One slirp4netns-API request on ``path``; the decoded JSON reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request).encode())
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    decoded = json.loads(reply)
    if not isinstance(decoded, dict):
        raise ValueError(f"unexpected API reply {reply!r}")
    return decoded


class BackendManager:
    """Starts, reuses and stops the per-NIC pyslirp processes; thread-safe."""

    def __init__(self, data_dir: str, *, dns_upstreams: list[str] | None = None,
                 command: list[str] | None = None, ready_timeout: float = READY_TIMEOUT,
                 qemu_user: tuple[int, int] = QEMU_USER) -> None:
        self.data_dir = data_dir
        #: (uid, gid) of the QEMU that connects to the back ends; nobody else may.
        self.qemu_user = qemu_user
        self.dns_upstreams = list(dns_upstreams or [])
        self.command = command or [sys.executable, "-m", "pyslirp"]
        self.ready_timeout = ready_timeout
        self._backends: dict[str, _Backend] = {}
        self._lock = threading.Lock()
        self._run_dir = _private_dir(data_dir)
        self.hardening = _hardening_flags()

    def socket_path(self, iface: SlirpInterface) -> str:
        return os.path.join(self.data_dir, f"{iface.name}.sock")

    def running(self) -> dict[str, int]:
        """NIC name -> pid of its live backend."""
        with self._lock:
            return {n: s.proc.pid for n, s in self._backends.items() if s.proc.poll() is None}

    def ensure(self, ifaces: list[SlirpInterface]) -> dict[str, str]:
        """Make every NIC's backend run with its settings; NIC name -> socket path."""
        with self._lock:
            started: list[str] = []
            try:
                for iface in ifaces:
                    current = self._backends.get(iface.name)
                    if current is not None and current.iface == iface \
                            and current.proc.poll() is None \
                            and os.path.exists(current.socket_path):
                        log.info("kubevirt: interface %s: reusing pyslirp (pid %d)",
                                 iface.name, current.proc.pid)
                        continue
                    if current is not None:
                        log.info("kubevirt: interface %s: settings changed or pyslirp gone; "
                                 "restarting it", iface.name)
                        self._stop(self._backends.pop(iface.name))
                    self._backends[iface.name] = self._start(iface)
                    started.append(iface.name)
            except BaseException:
                for name in started:  # all or nothing for this call
                    self._stop(self._backends.pop(name))
                raise
            return {i.name: self._backends[i.name].socket_path for i in ifaces}

    def _start(self, iface: SlirpInterface) -> _Backend:
        os.makedirs(self.data_dir, exist_ok=True)
        with contextlib.suppress(OSError):
            # Searchable by QEMU's user whatever our umask (the sockets decide who connects).
            os.chmod(self.data_dir, 0o755)
        sock = self.socket_path(iface)
        api = os.path.join(self._run_dir, f"{iface.name}.api")
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        ipv6 = ("-6", f"--cidr6={iface.network6}") if iface.network6 is not None else ()
        args = [*self.command, "--target-type=qemu-stream", f"--cidr={iface.network}",
                *ipv6, f"--mtu={iface.mtu}",
                f"--api-socket={api}", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}",
                *self.hardening, *(f"--dns-upstream={u}" for u in self.dns_upstreams), sock]
        try:
            proc = subprocess.Popen(args, pass_fds=(ready_w, exit_r), stdin=subprocess.DEVNULL)
        except OSError as exc:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            raise BackendError(f"cannot run pyslirp for interface {iface.name}: {exc}") from None
        os.close(ready_w)
        os.close(exit_r)
        backend = _Backend(iface, proc, exit_w, sock, api)
        try:
            self._wait_ready(backend, ready_r)
            self._give_to_qemu(sock)
            ipv6_ports = iface.network6 is not None and bool(iface.ports) and _pod_has_ipv6()
            for port in iface.ports:
                self._forward(backend, port.protocol, port.port, ipv6_ports)
        except BaseException:
            self._stop(backend)
            raise
        finally:
            os.close(ready_r)
        log.info("kubevirt: interface %s: pyslirp (pid %d) on %s, network %s%s, ports %s, %s",
                 iface.name, proc.pid, sock, iface.network,
                 f" and {iface.network6}" if iface.network6 is not None else "",
                 " ".join(f"{p.port}/{p.protocol}" for p in iface.ports) or "none",
                 " ".join(self.hardening))
        return backend

    def _give_to_qemu(self, path: str) -> None:
        """Let QEMU's user, and nobody else, connect to ``path`` (0600 ours until now)."""
        uid, gid = self.qemu_user
        if os.geteuid() == uid:
            return
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
            return
        except PermissionError:
            pass
        if gid == os.getegid() or gid in os.getgroups():
            os.chown(path, -1, gid, follow_symlinks=False)
            os.chmod(path, 0o660)
            return
        raise BackendError(f"QEMU (uid {uid}, gid {gid}) could not connect to {path}: "
                         f"the sidecar runs as uid {os.geteuid()}, which can neither give "
                         f"the socket to uid {uid} nor share group {gid} with it; run the "
                         f"sidecar as uid {uid}, as root, or in group {gid}")

    def _wait_ready(self, backend: _Backend, ready_r: int) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendError(f"pyslirp for interface {backend.iface.name} did not get ready "
                                 f"within {self.ready_timeout:.0f} s")
            readable, _, _ = select.select([ready_r], [], [], min(left, 0.2))
            if readable:
                if os.read(ready_r, 1) == b"1":
                    return
                break  # EOF: it exited (or closed the fd) without saying ready
            if backend.proc.poll() is not None:
                break
        status = backend.proc.wait(timeout=STOP_TIMEOUT)
        raise BackendError(f"pyslirp for interface {backend.iface.name} exited with status "
                         f"{status} before it was ready (its log is in the sidecar's)")

    def _forward(self, backend: _Backend, protocol: str, port: int, ipv6: bool) -> None:
        """The pod's ``0.0.0.0:PORT`` to the VM's IPv4 address; with ``ipv6`` also the
        pod's ``[::]:PORT`` to the VM's IPv6 address.

        The IPv6 forward has no ``guest_addr``: the VM takes its address by SLAAC,
        and the stack follows the address the VM uses (docs/ipv6.md). Asked for
        after the IPv4 one, its socket takes IPv6 clients only, so each family
        reaches the VM's address of that family and keeps its source address.
        """
        targets = [("0.0.0.0", backend.iface.guest_address)] + ([("::", "")] if ipv6 else [])
        for host_addr, guest_addr in targets:
            where = f"port {port}/{protocol.upper()}" + (" over IPv6" if guest_addr == "" else "")
            try:
                reply = api_request(backend.api_path, {"execute": "add_hostfwd", "arguments": {
                    "proto": protocol, "host_addr": host_addr, "host_port": port,
                    "guest_addr": guest_addr, "guest_port": port}})
            except (OSError, ValueError) as exc:
                raise BackendError(f"interface {backend.iface.name}: cannot forward {where}: "
                                   f"{exc}") from None
            if "return" not in reply:
                desc = _get_desc(reply)
                if "slirp_add_hostfwd failed" in desc:
                    desc = "the pod's port is in use"
                raise BackendError(f"interface {backend.iface.name}: cannot forward {where}: "
                                   f"{desc}")

    def _stop(self, backend: _Backend) -> None:
        with contextlib.suppress(OSError):
            os.close(backend.exit_w)  # the clean way: pyslirp exits when its exit fd says EOF
        proc = backend.proc
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(OSError):
            if stat_is_socket(backend.socket_path):
                os.unlink(backend.socket_path)

    def stop_all(self) -> None:
        with self._lock:
            for name in list(self._backends):
                backend = self._backends.pop(name)
                log.info("kubevirt: interface %s: stopping pyslirp (pid %d)", name,
                         backend.proc.pid)
                self._stop(backend)

    def close(self) -> None:
        self.stop_all()
        shutil.rmtree(self._run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(self.data_dir)  # only if empty: never anybody else's files


def _pod_has_ipv6() -> bool:
    """Whether the pod's network namespace has IPv6 sockets at all (a kernel booted with
    ``ipv6.disable=1`` has none): without, the VM's ports are forwarded over IPv4 only."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError as exc:
        log.warning("kubevirt: the pod has no IPv6 (%s): the VM's ports are forwarded "
                    "over IPv4 only", exc.strerror or exc)
        return False
    return True


def _hardening_flags() -> tuple[str, ...]:
    """Seccomp always; the mount sandbox when this pod lets us create its namespaces."""
    from pyslirp.runtime.sandbox import can_create_sandbox

    if can_create_sandbox():
        return ("--enable-sandbox", "--enable-seccomp")
    log.warning("kubevirt: cannot create a user and mount namespace here; the stacks run "
                "with --enable-seccomp but without --enable-sandbox")
    return ("--enable-seccomp",)


def _private_dir(data_dir: str) -> str:
    """A 0700 directory for the back ends' API sockets: under $TMPDIR, or next to the data.

    A sidecar may run with a read-only root file system; the hook volume is
    always writable.
    """
    try:
        return tempfile.mkdtemp(prefix="pyslirp-kubevirt-")
    except OSError:
        os.makedirs(data_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix=".private-", dir=data_dir)


def stat_is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _get_desc(reply: dict[str, object]) -> str:
    error = reply.get("error")
    if isinstance(error, dict):
        return str(error.get("desc", reply))
    return str(reply)
