"""The end-to-end harness: real namespaces, a real pyslirp process, real clients and servers.

Shape (docs/testing.md; namespaces from :mod:`tests.nsutil`):

* one **host** namespace per session (only ``lo``, up): pyslirp runs there,
  so its host sockets reach nothing but that loopback, where
  ``servers.py`` serves HTTP, echo and DNS (see its docstring). Nothing a
  test does can reach a real network, even with a broken pyslirp.
* one **guest** namespace per test, with a sleeping holder process whose pid
  is pyslirp's ``PID`` argument; the guest's clients (curl, dig, udhcpc, a
  Python script, ...) run there through ``ip netns exec``.
* :func:`start_slirp` starts ``pyslirp [OPTIONS] PID tap0`` in the host
  namespace with ``--ready-fd`` and ``--dns-upstream 127.0.0.1:<test DNS>``
  and waits until it says it is ready; whatever a test started is stopped
  (SIGTERM, then SIGKILL) and both namespaces are deleted even when the test
  fails. pyslirp's log is printed at teardown, so a failing test shows it.

``PYSLIRP_E2E_SIZE`` sets the payload size (default 100 MiB) for quick local runs;
``PYSLIRP_E2E_COMMAND`` runs another command in place of ``python -m pyslirp``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import servers
from tests.nsutil import Namespace, NetNS, UserNetNS, wait_for

REPO = Path(__file__).resolve().parents[2]
SERVERS = Path(servers.__file__).resolve()
PAYLOAD_SIZE = int(os.environ.get("PYSLIRP_E2E_SIZE", str(servers.DEFAULT_SIZE)))
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
GUEST_ADDR = "10.0.2.100"
TAP = "tap0"
READY_TIMEOUT = 30.0
#: A fixed port for the per-test iperf3 server: below the ephemeral range, nothing else uses it.
IPERF_PORT = 5201


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is an e2e test (skipped or failed by tests/conftest.py when
    this machine cannot run it), whether or not its module says so."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def _read_line(stream: Any, timeout: float, what: str) -> str:
    """One line from a child's stdout pipe, or a clear failure after ``timeout``."""
    fd = stream.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no line from {what} after {timeout:.0f} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise EOFError(f"{what} exited before it was ready")
        buf += chunk
    return buf.decode().split("\n", 1)[0]


# ---- the host side ------------------------------------------------------------------

@dataclass
class Host:
    """The host namespace and what listens on its loopback."""

    ns: NetNS
    state: Path
    http: int
    echo: int
    dns: int
    dead: int
    size: int
    sha256: str
    payload: Path

    @property
    def dns_upstream(self) -> str:
        return f"127.0.0.1:{self.dns}"

    @property
    def dead_upstream(self) -> str:
        return f"127.0.0.1:{self.dead}"

    def url(self, path: str, addr: str = GATEWAY) -> str:
        return f"http://{addr}:{self.http}{path}"

    def dns_log(self) -> list[str]:
        return (self.state / "dns.log").read_text().splitlines()

    def echo_log(self) -> str:
        return (self.state / "echo.log").read_text()

    def run(self, args: Sequence[str] | str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.ns.run(args, **kw)

    def established_to(self, port: int) -> list[str]:
        """Established TCP connections to or from ``port`` on the host's loopback (``ss``)."""
        out = self.ns.run(["ss", "-Htn", "state", "established",
                           f"( dport = :{port} or sport = :{port} )"]).stdout
        return [line for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    state = tmp_path_factory.mktemp("host")
    with NetNS("host") as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        err = open(state / "servers.err", "wb")  # noqa: SIM115 (closed below)
        try:
            proc = ns.popen([sys.executable, str(SERVERS), str(state), "--size",
                             str(PAYLOAD_SIZE)], stdout=subprocess.PIPE, stderr=err,
                            stdin=subprocess.DEVNULL, cwd=REPO)
            try:
                info = json.loads(_read_line(proc.stdout, 120, "tests/e2e/servers.py"))
            except (TimeoutError, EOFError) as exc:
                pytest.fail(f"{exc}: {(state / 'servers.err').read_text()}")
            yield Host(ns=ns, state=state, http=info["http"], echo=info["echo"],
                       dns=info["dns"], dead=info["dead"], size=info["size"],
                       sha256=info["sha256"], payload=Path(info["payload"]))
        finally:
            err.close()
            # 100 MB per session run; pytest keeps the last few temp dirs around.
            (state / "payload.bin").unlink(missing_ok=True)


# ---- the guest side -----------------------------------------------------------------

@dataclass
class Guest:
    """A guest namespace: ``pid`` is a process in it, the PID argument for pyslirp."""

    ns: Namespace
    pid: int
    tmp: Path

    @property
    def path(self) -> str:
        return self.ns.path  # type: ignore[attr-defined, no-any-return]

    def run(self, args: Sequence[str] | str, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.ns.run(args, check=check, timeout=timeout, input=input)

    def bash(self, script: str, check: bool = True,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a bash script with ``pipefail`` (``curl ... | sha256sum`` fails when curl does)."""
        return self.run(["bash", "-o", "pipefail", "-c", script], check=check, timeout=timeout)

    def python(self, code: str, *args: str, check: bool = True,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-c", code, *args], check=check, timeout=timeout)

    def popen(self, args: Sequence[str] | str, **kw: Any) -> subprocess.Popen[Any]:
        return self.ns.popen(args, **kw)

    def link(self, name: str = TAP) -> dict[str, Any] | None:
        return self.ns.link(name)

    def counters(self) -> dict[str, int]:
        """The guest kernel's TCP/IP counters (``/proc/net/netstat`` and ``snmp``), e.g.
        ``TcpExt.TCPOFOQueue`` or ``Tcp.RetransSegs``."""
        text = self.run(["cat", "/proc/net/netstat", "/proc/net/snmp"]).stdout.splitlines()
        found: dict[str, int] = {}
        for head, values in zip(text[::2], text[1::2], strict=False):
            prefix, names = head.split(":", 1)
            for name, value in zip(names.split(), values.split(":", 1)[1].split(), strict=True):
                found[f"{prefix}.{name}"] = int(value)
        return found


def _holder(ns: Namespace) -> int:
    """A sleeping process inside ``ns`` (its pid is what slirp4netns-style callers pass)."""
    proc = ns.popen(["sleep", "infinity"], stdin=subprocess.DEVNULL)
    want = os.stat(ns.path).st_ino  # type: ignore[attr-defined]

    def joined() -> bool:
        try:
            return os.stat(f"/proc/{proc.pid}/ns/net").st_ino == want
        except OSError:
            return False

    wait_for(joined, what="the guest's holder process to enter the namespace")
    return proc.pid


@pytest.fixture
def guest(host: Host, tmp_path: Path) -> Iterator[Guest]:
    with NetNS("guest") as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        yield Guest(ns=ns, pid=_holder(ns), tmp=tmp_path)


@pytest.fixture
def user_guest(host: Host, tmp_path: Path) -> Iterator[Guest]:
    """A guest whose network namespace belongs to a user namespace of its own (rootless shape)."""
    with UserNetNS("uguest") as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        yield Guest(ns=ns, pid=ns.pid, tmp=tmp_path)


# ---- pyslirp ------------------------------------------------------------------------

def pyslirp_argv(*args: str) -> list[str]:
    """The command line that starts pyslirp; ``PYSLIRP_E2E_COMMAND`` (split on spaces) replaces
    ``python -m pyslirp``, e.g. to test an installed ``pyslirp`` or a wrapper around another
    stack."""
    custom = os.environ.get("PYSLIRP_E2E_COMMAND", "").split()
    return [*(custom or [sys.executable, "-m", "pyslirp"]), *args]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Slirp:
    """A running pyslirp process and its log."""

    proc: subprocess.Popen[bytes]
    argv: list[str]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal pyslirp and wait; SIGKILL if it does not exit in time. The exit status.

        Stopped by SIGTERM, SIGINT or SIGHUP, pyslirp shuts down in order and then dies
        by that signal, as slirp4netns does (status ``-sig``); dying by it *without* the
        orderly shutdown (its log says so first) fails the test."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                pytest.fail(f"pyslirp ignored signal {sig} for {timeout:.0f} s\n{self.log_text()}")
            if (sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                    and self.proc.returncode == -sig and "shutting down" not in self.log_text()):
                pytest.fail(f"pyslirp died by signal {sig} without shutting down\n"
                            f"{self.log_text()}")
        return self.proc.returncode


StartSlirp = Callable[..., Slirp]


@pytest.fixture
def start_slirp(host: Host, guest: Guest, tmp_path: Path) -> Iterator[StartSlirp]:
    """Start pyslirp for ``guest`` (or ``target=``) and wait until it is ready.

    ``start_slirp("--mtu", "9000", configure=False, upstreams=[...], env={...})``;
    ``upstreams`` defaults to the test DNS server; pass ``target``/``netns_args`` to
    serve another namespace (e.g. ``--netns-type=path``), ``pass_fds`` for fds that
    options name (``--exit-fd``).
    """
    started: list[Slirp] = []

    def start(*options: str, configure: bool = True, upstreams: Sequence[str] | None = None,
              env: dict[str, str] | None = None, target: Guest | None = None,
              by_path: bool = False, pass_fds: Sequence[int] = ()) -> Slirp:
        g = target or guest
        ups = [host.dns_upstream] if upstreams is None else list(upstreams)
        read_fd, write_fd = os.pipe()
        args = [*options, f"--ready-fd={write_fd}"]
        args += [f"--dns-upstream={u}" for u in ups]
        if configure:
            args.append("-c")
        args += ["--netns-type=path", g.path] if by_path else [str(g.pid)]
        args.append(TAP)
        argv = pyslirp_argv(*args)
        log = tmp_path / f"pyslirp-{len(started)}.log"
        with open(log, "wb") as logf:
            proc = host.ns.popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=subprocess.STDOUT, pass_fds=(write_fd, *pass_fds), cwd=REPO,
                                 env={**os.environ, **(env or {})})
        os.close(write_fd)
        slirp = Slirp(proc, argv, log)
        started.append(slirp)
        with os.fdopen(read_fd, "rb") as ready:
            line = ready.read(1) if select.select([ready], [], [], READY_TIMEOUT)[0] else None
        if line != b"1":
            why = ("exited" if proc.poll() is not None else f"not ready after {READY_TIMEOUT} s")
            pytest.fail(f"pyslirp {why} (status {proc.poll()}): {' '.join(argv)}\n"
                        f"{slirp.log_text()}")
        return slirp

    yield start
    for slirp in started:
        status = slirp.stop()
        print(f"--- pyslirp (exit {status}): {' '.join(slirp.argv)}\n{slirp.log_text()}")


@pytest.fixture
def slirp(start_slirp: StartSlirp) -> Slirp:
    """pyslirp with the defaults (``-c``, test DNS upstream) serving ``guest``."""
    return start_slirp()


# ---- helpers the tests share ----------------------------------------------------------

def sha256_of_get(guest: Guest, url: str, client: str = "curl", timeout: float = 300) -> str:
    """Download ``url`` inside the guest and return the sha256 of what arrived."""
    if client == "curl":
        cmd = f"curl -sS --fail --max-time {int(timeout)} {url}"
    elif client == "busybox-wget":  # its -T option crashes (docs/testing.md), so no timeout here
        cmd = f"busybox wget -q -O - {url}"
    else:
        raise ValueError(client)
    out = guest.bash(f"{cmd} | sha256sum", timeout=timeout + 30).stdout
    return out.split()[0]


def post_file(guest: Guest, url: str, path: Path, client: str = "curl",
              timeout: float = 300) -> dict[str, Any]:
    """POST ``path`` from the guest; the server answers the byte count and sha256 it got."""
    if client == "curl":
        args = ["curl", "-sS", "--fail", "--max-time", str(int(timeout)), "-H", "Expect:",
                "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{path}", url]
    elif client == "wget":  # GNU wget: busybox's --post-file stops at the first NUL byte
        args = ["wget", "-q", "-O", "-", f"--timeout={int(timeout)}", "--tries=1",
                f"--post-file={path}", url]
    else:
        raise ValueError(client)
    result: dict[str, Any] = json.loads(guest.run(args, timeout=timeout + 30).stdout)
    return result


def add_random_loss(guest: Guest, percent: int) -> None:
    """Drop ``percent`` % of the guest's IP packets in both directions (nftables, counted)."""
    drop = f"numgen random mod 100 < {percent} counter drop"
    rules = f"""
table inet pyslirp_loss {{
    chain in {{ type filter hook input priority 0; {drop}; }}
    chain out {{ type filter hook output priority 0; {drop}; }}
}}
"""
    guest.run(["nft", "-f", "-"], input=rules)


def loss_counts(guest: Guest) -> list[int]:
    """Packets the loss rules dropped: ``[in, out]``."""
    out = guest.run(["nft", "list", "table", "inet", "pyslirp_loss"]).stdout
    return [int(n) for n in re.findall(r"counter packets (\d+)", out)]
