"""rootlesskit (Debian's 1.1) running pyslirp through the ``slirp4netns`` shim.

rootlesskit probes ``slirp4netns --help`` for its feature flags, then starts
``BINARY --mtu 65520 -r 3 [--disable-host-loopback] [--cidr CIDR]
--api-socket STATEDIR/.s4nn.sock [--enable-sandbox] [--enable-seccomp]
[--enable-ipv6] CHILDPID tap0`` (the TAP already exists, unconfigured by
us: its child configures the address), waits for ``1`` on fd 3, and with
``--port-driver=slirp4netns`` asks for each ``-p`` over the API socket
(``add_hostfwd``). Every run here goes through a wrapper that records the
arguments and then ``exec``s the shim, so the assertions cover exactly what
rootlesskit passed, and the PID rootlesskit holds is pyslirp's own.

rootlesskit runs inside the session's "host" namespace (loopback only), so
pyslirp's host sockets reach nothing but the test's servers; the inner
command only talks to the gateway (the host's loopback) and never does DNS.

As root, rootlesskit needs ``root:100000:65536`` in /etc/subuid and
/etc/subgid (docs/testing.md); :func:`subid_ranges` adds those lines when they
are missing and says so on stdout (it does not remove them afterwards: other
rootless tools on the machine may rely on them from then on).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyslirp.runtime import sandbox
from tests.e2e.conftest import Host, alive
from tests.e2e.recorded import (
    MODES,
    fetch_published_port,
    install_recorded_shim,
    served_stack,
    stop_shared_engine,
    wait_until_ready,
)
from tests.e2e.servers import HELLO
from tests.netutil import free_port
from tests.podmanutil import ensure_subid_range

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("rootlesskit") is None,
                       reason="rootlesskit is not installed (apt-get install rootlesskit)"),
]

SUBID_LINE = "root:100000:65536"
INNER_PORT = 8080
NET_BIND_SERVICE = 1 << sandbox.CAP_NET_BIND_SERVICE


@pytest.fixture(scope="module")
def subid_ranges() -> None:
    ensure_subid_range(SUBID_LINE, names=("0",))  # rootlesskit as root needs one


@pytest.fixture(params=MODES)
def shim(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """``pyslirp shim install`` into a private directory, behind an argument recorder; in
    the shared mode with ``--shared-engine`` and a runtime directory of the test's."""
    rundir = tmp_path / "rundir" if request.param == "shared" else None
    yield install_recorded_shim(tmp_path, rundir)
    if rundir is not None:
        stop_shared_engine(rundir)


@dataclass
class Run:
    """One rootlesskit run: what the inner command saw and what rootlesskit passed to us."""

    inside: dict[str, str]
    argv: list[list[str]]
    pid: int
    host_fetch: str
    caps: dict[str, int]
    seccomp: str
    log: str
    #: Served by the shared engine (caps and seccomp are the engine's).
    shared: bool


INNER = r"""
set -u
out={out}
ip -4 -o addr show tap0 | awk '{{print "addr", $4}}' >> $out
gw=$(ip -4 route show default | awk '{{print $3}}')
echo "gateway $gw" >> $out
echo "mtu $(cat /sys/class/net/tap0/mtu)" >> $out
# outbound: the host's loopback through the gateway (--disable-host-loopback refuses it)
if body=$(curl -sS --max-time 10 http://$gw:{http}/hello 2>&1); then
    echo "gateway_fetch $body" >> $out
else
    echo "gateway_fetch failed" >> $out
fi
# inbound: a server inside for the host's -p forward
{python} -m http.server --bind 0.0.0.0 --directory {www} {port} >/dev/null 2>&1 &
server=$!
echo ready >> $out
while [ ! -e {done} ]; do sleep 0.05; done
kill $server
"""


def _run_rootlesskit(host: Host, tmp_path: Path, shim: Path, *extra: str,
                     publish: str = "127.0.0.1") -> Run:
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("served from inside rootlesskit\n")
    out, done = tmp_path / "inside.txt", tmp_path / "done"
    for f in (out, done, tmp_path / "argv.log"):
        f.unlink(missing_ok=True)
    host_port = free_port()
    script = INNER.format(out=shlex.quote(str(out)), http=host.http, python=sys.executable,
                          www=shlex.quote(str(www)), port=INNER_PORT,
                          done=shlex.quote(str(done)))
    argv = ["rootlesskit", "--net=slirp4netns", f"--slirp4netns-binary={shim}",
            "--port-driver=slirp4netns",
            f"-p={f'[{publish}]' if ':' in publish else publish}:{host_port}:{INNER_PORT}/tcp",
            "--slirp4netns-sandbox=true", "--slirp4netns-seccomp=true", *extra,
            "sh", "-c", script]
    log = tmp_path / "rootlesskit.log"
    with open(log, "wb") as logf:
        proc = host.ns.popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                             stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until_ready(out, proc, 60, "rootlesskit's command", lambda: (
            f"{log.read_text()}\n{out.read_text() if out.exists() else ''}"))
        rundir = tmp_path / "rundir"
        stack = served_stack(tmp_path / "argv.log", rundir if rundir.exists() else None)
        pid = stack.pid
        fetch = fetch_published_port(host, host_port, publish)  # once the server listens
        done.touch()
        proc.wait(timeout=60)
        gone = not alive(pid)
        for _ in range(100):
            if gone:
                break
            time.sleep(0.05)
            gone = not alive(pid)
        assert gone, "pyslirp outlived rootlesskit"
    finally:
        done.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    inside = dict(line.split(" ", 1) for line in out.read_text().splitlines() if " " in line)
    return Run(inside, stack.calls, pid, fetch, stack.caps, stack.seccomp, log.read_text(),
               stack.engine_pid is not None)


@pytest.fixture
def rootlesskit_run(host: Host, tmp_path: Path, shim: Path,
                    subid_ranges: None) -> Iterator[object]:
    def run(*extra: str, publish: str = "127.0.0.1") -> Run:
        return _run_rootlesskit(host, tmp_path, shim, *extra, publish=publish)
    yield run


def test_rootlesskit_defaults(rootlesskit_run: object) -> None:
    result: Run = rootlesskit_run()  # type: ignore[operator]
    # what rootlesskit 1.1 passed: feature probes, then one serving run with exactly these
    assert ["--help"] in result.argv
    [served] = [a for a in result.argv if a != ["--help"]]
    assert served[:4] == ["--mtu", "65520", "-r", "3"]
    assert served[4] == "--api-socket" and served[5].endswith("/.s4nn.sock")
    assert served[6:8] == ["--enable-sandbox", "--enable-seccomp"]
    assert served[9] == "tap0" and served[8].isdigit()
    # what the inner command saw
    assert result.inside["addr"] == "10.0.2.100/24"
    assert result.inside["gateway"] == "10.0.2.2"
    assert result.inside["mtu"] == "65520"
    assert result.inside["gateway_fetch"] == HELLO.decode().strip()
    # the -p forward, through the API socket, into a server inside
    assert result.host_fetch == "served from inside rootlesskit\n"
    # the sandbox and filter rootlesskit asked for are on the process it holds (shared:
    # the filter is on the engine, which keeps its capabilities: docs/shared-engine.md)
    assert result.seccomp == "2"
    if not result.shared:
        assert result.caps["CapEff"] == NET_BIND_SERVICE
        assert result.caps["CapBnd"] == NET_BIND_SERVICE


def test_rootlesskit_disable_host_loopback(rootlesskit_run: object) -> None:
    result: Run = rootlesskit_run("--disable-host-loopback")  # type: ignore[operator]
    [served] = [a for a in result.argv if a != ["--help"]]
    assert "--disable-host-loopback" in served
    assert result.inside["gateway_fetch"] == "failed"  # the host's loopback is off limits
    assert result.host_fetch == "served from inside rootlesskit\n"  # forwarding still works


def test_rootlesskit_cidr(rootlesskit_run: object) -> None:
    result: Run = rootlesskit_run("--cidr=10.9.0.0/24")  # type: ignore[operator]
    [served] = [a for a in result.argv if a != ["--help"]]
    assert served[served.index("--cidr") + 1] == "10.9.0.0/24"
    assert result.inside["addr"] == "10.9.0.100/24"
    assert result.inside["gateway"] == "10.9.0.2"
    assert result.inside["gateway_fetch"] == HELLO.decode().strip()
    assert result.host_fetch == "served from inside rootlesskit\n"


def test_rootlesskit_ipv6_flag_is_accepted(rootlesskit_run: object) -> None:
    result: Run = rootlesskit_run("--ipv6", "--mtu=1500")  # type: ignore[operator]
    [served] = [a for a in result.argv if a != ["--help"]]
    assert "--enable-ipv6" in served and served[:2] == ["--mtu", "1500"]
    assert result.inside["mtu"] == "1500"
    assert result.inside["gateway_fetch"] == HELLO.decode().strip()
    assert result.host_fetch == "served from inside rootlesskit\n"


def test_rootlesskit_ipv6_publishes_on_ipv6_loopback(rootlesskit_run: object) -> None:
    """``--ipv6 -p [::1]:P:8080/tcp``: rootlesskit's slirp4netns driver asks for host_addr ::1
    with the child's IPv4 address (slirp4netns refuses it; pyslirp -6 serves it)."""
    result: Run = rootlesskit_run("--ipv6", publish="::1")  # type: ignore[operator]
    [served] = [a for a in result.argv if a != ["--help"]]
    assert "--enable-ipv6" in served
    assert result.host_fetch == "served from inside rootlesskit\n"
