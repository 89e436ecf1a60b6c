"""Throwaway network namespaces for tests, cleaned up whatever happens.

Two kinds, with one interface (:class:`Namespace`):

* :class:`NetNS`: a named namespace made with ``ip netns add`` (owned by our
  user namespace); ``path`` is ``/run/netns/NAME``, for ``--netns-type=path``.
* :class:`UserNetNS`: a process made by ``unshare --user --map-root-user --net``
  (plus ``--mount`` on request) that sleeps; ``pid`` is for ``--netns-type=pid``,
  and its network namespace belongs to a user namespace of its own, the way a
  rootless container's does.

Both run commands inside (``run``, ``popen``, ``ip_json``), kill every
process they started there and then delete themselves on ``close()``, on
leaving a ``with`` block, and at interpreter exit. Names carry the creating
pid (``pyslirp-t<pid>-<n>-<tag>``), so :func:`cleanup_stale` can delete what a
killed test run left behind without touching a concurrent run's namespaces.

Only namespaces made here are ever touched; nothing here sends traffic.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any, Self

PREFIX = "pyslirp-t"
NETNS_DIR = "/run/netns"

_counter = itertools.count()
_live: set[Namespace] = set()


def netns_capable() -> str | None:
    """None if namespace tests can run here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def skip_unless_capable() -> None:
    import pytest

    reason = netns_capable()
    if reason:
        pytest.skip(reason)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def unix_listening(pid: int, path: object) -> bool:
    """Whether a Unix socket listens at ``path`` in the network namespace of ``pid``.

    The socket file appears at bind(), and connect() is refused until the
    listen() that follows: a busy machine can run a client in between.
    """
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                # Flags has __SO_ACCEPTCON (0x10000) once the socket listens.
                if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
                    return True
    except (OSError, ValueError):
        pass
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class CommandFailed(subprocess.CalledProcessError):
    """A command run inside a namespace failed; the message includes its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {(self.stderr or '').strip()}"


class Namespace:
    """Common interface: run commands inside, track background processes, clean up."""

    name: str

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []
        self.closed = False
        _live.add(self)

    # -- what subclasses provide
    @property
    def path(self) -> str:
        """The namespace's netns file (for ``--netns-type=path`` or setns)."""
        raise NotImplementedError

    def exec_prefix(self) -> list[str]:
        raise NotImplementedError

    def _destroy(self) -> None:
        raise NotImplementedError

    # -- running things inside
    def argv(self, args: Sequence[str] | str) -> list[str]:
        """``args`` (a list, or a string for ``sh -c``) prefixed to run inside."""
        cmd = ["sh", "-c", args] if isinstance(args, str) else list(args)
        return self.exec_prefix() + cmd

    def run(self, args: Sequence[str] | str, check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run to completion inside; raise (showing stderr) if ``check`` and it fails."""
        proc = subprocess.run(self.argv(args), capture_output=True, text=True, timeout=timeout,
                              input=input)
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def popen(self, args: Sequence[str] | str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a background process inside; it is killed by ``close()``."""
        proc = subprocess.Popen(self.argv(args), **kwargs)
        self._procs.append(proc)
        return proc

    def ip_json(self, *args: str) -> Any:
        """``ip -j ARGS`` inside, parsed."""
        out = self.run(["ip", "-j", *args]).stdout
        return json.loads(out) if out.strip() else []

    def link(self, ifname: str) -> dict[str, Any] | None:
        """``ip -j addr show dev IFNAME`` (link plus addresses), or None if it does not exist."""
        proc = self.run(["ip", "-j", "addr", "show", "dev", ifname], check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        found = json.loads(proc.stdout)
        return found[0] if found else None

    def links(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.ip_json("link", "show")
        return result

    def routes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.ip_json("-4", "route", "show")
        return result

    # -- lifetime
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _live.discard(self)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self._destroy()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetNS(Namespace):
    """A named network namespace (``ip netns add``)."""

    def __init__(self, tag: str = "ns") -> None:
        self.name = f"{PREFIX}{os.getpid()}-{next(_counter)}-{tag}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        super().__init__()

    @property
    def path(self) -> str:
        return f"{NETNS_DIR}/{self.name}"

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def pids(self) -> list[int]:
        proc = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in proc.stdout.split()]

    def _destroy(self) -> None:
        _delete_named(self.name)

    def __repr__(self) -> str:
        return f"NetNS({self.name!r})"


def userns_mapped(pid: int) -> bool:
    """Whether ``unshare --user --map-root-user`` (process ``pid``) is done with the user
    namespace: unshare creates the namespaces first and writes the uid and gid maps after
    (the gid map last), and whoever joins in between is nobody in there, not root."""
    try:
        if os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino:
            return False
        with open(f"/proc/{pid}/gid_map") as f:
            return bool(f.read().strip())
    except OSError:
        return False


class UserNetNS(Namespace):
    """A sleeping process in new user (root-mapped) and network namespaces."""

    def __init__(self, tag: str = "userns", mount: bool = False) -> None:
        self.name = f"{PREFIX}{os.getpid()}-{next(_counter)}-{tag}"
        flags = ["--user", "--map-root-user", "--net"] + (["--mount"] if mount else [])
        self._mount = mount
        # unshare execs sleep in place, so this pid is the namespaces' holder.
        self._holder = subprocess.Popen(["unshare", *flags, "sleep", "infinity"],
                                        stdin=subprocess.DEVNULL)
        super().__init__()
        self.pid = self._holder.pid
        ours = os.stat("/proc/self/ns/net").st_ino
        try:
            wait_for(lambda: self._ns_ino() not in (None, ours) and userns_mapped(self.pid),
                     what=f"{self.name} to unshare")
        except BaseException:
            self.close()
            raise

    def _ns_ino(self) -> int | None:
        if self._holder.poll() is not None:
            raise RuntimeError(f"unshare for {self.name} exited with {self._holder.returncode}")
        try:
            return os.stat(f"/proc/{self.pid}/ns/net").st_ino
        except OSError:
            return None

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    @property
    def userns_path(self) -> str:
        return f"/proc/{self.pid}/ns/user"

    def exec_prefix(self) -> list[str]:
        return (["nsenter", f"--target={self.pid}", "--user", "--net", "--preserve-credentials"]
                + (["--mount"] if self._mount else []))

    def _destroy(self) -> None:
        if self._holder.poll() is None:
            self._holder.kill()
        self._holder.wait(timeout=10)

    def __repr__(self) -> str:
        return f"UserNetNS({self.name!r}, pid={self.pid})"


def veth(a: NetNS, a_name: str, b: NetNS, b_name: str, a_addr: str | None = None,
         b_addr: str | None = None) -> None:
    """Join two named namespaces with a veth pair, both ends up, optional ``addr/prefix`` each.

    The pair lives and dies with the namespaces (deleting either removes it).
    """
    subprocess.run(["ip", "link", "add", a_name, "netns", a.name, "type", "veth", "peer",
                    "name", b_name, "netns", b.name], check=True, capture_output=True)
    for ns, ifname, addr in ((a, a_name, a_addr), (b, b_name, b_addr)):
        if addr is not None:
            ns.run(["ip", "addr", "add", addr, "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])
        ns.run(["ip", "link", "set", "lo", "up"])


def _delete_named(name: str) -> None:
    """Kill whatever still runs in netns ``name`` and delete it."""
    proc = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    _kill_pids([int(p) for p in proc.stdout.split()])
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def cleanup_stale() -> list[str]:
    """Delete namespaces left by test processes that no longer exist; their names."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(NETNS_DIR):
            if not name.startswith(PREFIX):
                continue
            owner = name[len(PREFIX):].split("-", 1)[0]
            if owner.isdigit() and not _pid_alive(int(owner)):
                _delete_named(name)
                removed.append(name)
    return removed


@atexit.register
def _close_all() -> None:
    for ns in list(_live):
        with contextlib.suppress(Exception):
            ns.close()
