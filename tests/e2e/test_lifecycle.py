"""pyslirp as a process: how it starts (PID, path, user namespace, `run`), what it writes
(--pcap), what it configures (-c, --mtu, --cidr) and what it leaves when stopped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    GATEWAY,
    GUEST_ADDR,
    REPO,
    TAP,
    Guest,
    Host,
    StartSlirp,
    _holder,
    alive,
    descendants,
    pyslirp_argv,
)
from tests.e2e.servers import HELLO
from tests.nsutil import NetNS, wait_for

pytestmark = pytest.mark.e2e


def _hello(guest: Guest, host: Host, gateway: str = GATEWAY) -> str:
    return guest.run(["curl", "-sS", "--fail", "--max-time", "30",
                      host.url("/hello", gateway)]).stdout


def test_configure_sets_address_route_and_mtu(host: Host, guest: Guest,
                                              start_slirp: StartSlirp) -> None:
    start_slirp("--mtu", "9000")
    link = guest.link(TAP)
    assert link is not None and "UP" in link["flags"]
    assert link["mtu"] == 9000
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] \
        == [(GUEST_ADDR, 24)]
    assert {"dst": "default", "gateway": GATEWAY} in [
        {k: r.get(k) for k in ("dst", "gateway")} for r in guest.ns.routes()]
    assert _hello(guest, host) == HELLO.decode()


def test_cidr_moves_the_whole_network(host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    start_slirp("--cidr", "10.99.0.0/24")
    link = guest.link(TAP)
    assert link is not None
    assert [a["local"] for a in link["addr_info"] if a["family"] == "inet"] == ["10.99.0.100"]
    assert _hello(guest, host, "10.99.0.2") == HELLO.decode()


def test_netns_by_path(host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    start_slirp(by_path=True)
    assert _hello(guest, host) == HELLO.decode()


def test_rootless_shape_user_namespace(host: Host, user_guest: Guest,
                                       start_slirp: StartSlirp) -> None:
    start_slirp(target=user_guest)
    assert _hello(user_guest, host) == HELLO.decode()


def _run(host: Host, *cmd: str) -> subprocess.CompletedProcess[str]:
    return host.run(pyslirp_argv("run", f"--dns-upstream={host.dns_upstream}", "--", *cmd),
                    check=False, timeout=60)


def test_run_exits_with_the_commands_status(host: Host) -> None:
    proc = _run(host, "sh", "-c", "exit 3")
    assert proc.returncode == 3, proc.stderr


def test_run_gives_the_command_a_network(host: Host) -> None:
    proc = _run(host, "curl", "-sS", "--fail", "--max-time", "30", host.url("/hello"))
    assert (proc.returncode, proc.stdout) == (0, HELLO.decode()), proc.stderr


def test_pcap_has_the_guests_syn(host: Host, guest: Guest, start_slirp: StartSlirp,
                                 tmp_path: Path) -> None:
    pcap = tmp_path / "link.pcap"
    slirp = start_slirp(f"--pcap={pcap}")
    assert _hello(guest, host) == HELLO.decode()
    assert slirp.stop() == -signal.SIGTERM
    tshark = shutil.which("tshark")
    assert tshark, "tshark is not installed (.ci/run installs it)"
    out = subprocess.run(
        [tshark, "-n", "-r", str(pcap), "-Y", "tcp.flags.syn == 1 && tcp.flags.ack == 0",
         "-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.dstport"],
        check=True, capture_output=True, text=True, timeout=60).stdout
    assert f"{GUEST_ADDR}\t{GATEWAY}\t{host.http}" in out.splitlines()


def test_closing_the_exit_fd_stops_it(host: Host, guest: Guest,
                                      start_slirp: StartSlirp) -> None:
    # slirp4netns's --exit-fd: the caller (podman) holds the write end; closing it stops us.
    exit_r, exit_w = os.pipe()
    with open(exit_w, "wb"):  # closed on leaving the block, even when the test fails
        try:
            slirp = start_slirp(f"--exit-fd={exit_r}", pass_fds=(exit_r,))
        finally:
            os.close(exit_r)
        assert _hello(guest, host) == HELLO.decode()
    assert slirp.proc.wait(timeout=20) == 0, slirp.log_text()
    assert guest.link(TAP) is None


HOLD_OPEN = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(b"ping")
assert s.recv(4) == b"ping"
print("open", flush=True)
time.sleep(600)
"""


def test_sigterm_leaves_nothing_behind(host: Host, guest: Guest,
                                       start_slirp: StartSlirp) -> None:
    slirp = start_slirp()
    client = guest.popen([sys.executable, "-c", HOLD_OPEN, GATEWAY, str(host.echo)],
                         stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert client.stdout is not None and client.stdout.readline().strip() == "open"
    assert host.established_to(host.echo), "the flow should be open on the host side"
    helpers = descendants(slirp.pid)

    assert slirp.stop(signal.SIGTERM) == -signal.SIGTERM, slirp.log_text()

    assert not [pid for pid in helpers if alive(pid)], "pyslirp left processes running"
    if isinstance(guest.ns, NetNS):
        assert set(guest.ns.pids()) <= {guest.pid, client.pid}, "a helper stayed in the guest"
    assert guest.link(TAP) is None, "the TAP device outlived pyslirp"
    # Its host sockets are closed: the echo server saw the connection end.
    wait_for(lambda: not host.established_to(host.echo), timeout=10,
             what="the host-side connection to close")


def test_sigterm_right_after_ready_is_a_clean_stop(host: Host, guest: Guest,
                                                   start_slirp: StartSlirp,
                                                   tmp_path: Path) -> None:
    """podman stops slirp4netns as soon as a short-lived container exits. The ready byte
    comes before the engine is loaded (start-up order, pyslirp/cli.py); a SIGTERM right
    after it is still a clean stop: status 0, the API socket removed."""
    api = tmp_path / "api.sock"
    slirp = start_slirp(f"--api-socket={api}")
    assert slirp.stop(signal.SIGTERM) == -signal.SIGTERM
    assert not api.exists()
    assert "received SIGTERM" in slirp.log_text()


def _stop_status(host: Host, guest: Guest, argv: list[str], how: str,
                 env: dict[str, str] | None = None) -> int:
    """Start ``argv`` (a slirp4netns-compatible command) for ``guest``, wait for its ready
    byte, stop it by ``how`` ("SIGTERM", "SIGINT" or "exit-fd") and return its status."""
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    proc = host.ns.popen([*argv, f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", "-c",
                          str(guest.pid), TAP], pass_fds=(ready_w, exit_r),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd=REPO, env={**os.environ, **(env or {})})
    os.close(ready_w)
    os.close(exit_r)
    try:
        with os.fdopen(ready_r, "rb") as ready:
            assert ready.read(1) == b"1", argv
        if how == "exit-fd":
            os.close(exit_w)
        else:
            proc.send_signal(getattr(signal, how))
        return proc.wait(timeout=30)
    finally:
        if how != "exit-fd":
            os.close(exit_w)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("slirp4netns") is None, reason="slirp4netns not installed")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "exit-fd"])
def test_stop_status_is_slirp4netns_s(host: Host, tmp_path: Path, how: str) -> None:
    # A script's `wait` sees what it saw with slirp4netns: death by the signal (143 for
    # SIGTERM in a shell), 0 for the exit fd. Neither stack is asked for DNS here.
    statuses = {}
    for name, argv in (("slirp4netns", ["slirp4netns"]), ("pyslirp", pyslirp_argv())):
        with NetNS("stopguest") as ns:
            guest = Guest(ns=ns, pid=_holder(ns), tmp=tmp_path)
            statuses[name] = _stop_status(host, guest, argv, how)
    assert statuses["pyslirp"] == statuses["slirp4netns"], statuses
