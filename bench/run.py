#!/usr/bin/env python3
"""Side-by-side benchmark of pyslirp, slirp4netns and pasta (issue 5).

Theory of operation
-------------------
For every stack, MTU and round the runner creates a fresh network namespace
(``unshare --user --map-root-user --net sleep infinity``: the same shape a rootless
container has), starts the stack against that namespace's PID the way rootless
tools do, waits until it says it is ready and a TCP connection through it to the
host's loopback succeeds, runs the workloads, then stops the stack and the
namespace.  Rounds interleave the stacks (A B C, then B C A, ...) so slow drifts
of the machine hit all of them alike; the report shows medians over rounds.

Servers run in the host namespace on 127.0.0.1 (iperf3 and bench/netload.py
serve); clients run in the namespace under ``nsenter --net`` and reach the host
as 10.0.2.2 (all three stacks map that address to the host's loopback: pasta is
told ``-g 10.0.2.2`` and maps its gateway to the host by default).  DNS goes to
the stack's DNS address, forwarded to a test DNS server on 127.0.0.1:53: pyslirp
(10.0.2.3) gets ``--dns-upstream``; slirp4netns (10.0.2.3), which reads
/etc/resolv.conf, runs in a private mount namespace in which a resolv.conf naming
127.0.0.1 is bind-mounted over /etc/resolv.conf; pasta gets ``-D 127.0.0.1`` and,
given a loopback resolver, serves DNS on its gateway address (10.0.2.2).

By default the whole run happens inside a private network namespace of its own
(see _run_isolated), so no packet can leave the machine; every address used is
loopback or inside the namespaces the runner created (and always removes, also
on Ctrl-C or SIGTERM).

Workloads (MTU in brackets; the non-bulk ones run at the largest MTU only):
  TCP bulk upload/download, 1 and 4 flows (iperf3)                  [each MTU]
  stack CPU seconds per GB moved, from /proc/PID/stat around each bulk run
  TCP 1-byte round trip p50/p99, new connections per second         [max MTU]
  stack CPU per round trip and per new connection                   [max MTU]
  DNS queries per second and stack CPU per 1,000 queries            [max MTU]
  UDP: highest offered rate with < 1 % loss, each direction (a short
    bisection over iperf3 -u -b rates), and stack CPU per datagram  [max MTU]
  the same 1-flow iperf3 over plain loopback, no stack (reference)  [once a round]
  1,000 idle TCP connections: stack VmRSS before and after          [max MTU]
  IPv6 ("ipv6"): TCP bulk upload/download, 1 flow, with its CPU/GB   [each MTU]
    and the 1-byte round trip with its CPU                          [max MTU]
  start-up ("startup", issue 15): exec to TAP present, exec to ready and the CPU of the
    process started, per flag set (-c -r; podman 4.3's; podman's + --api-socket), medians
    of 11 interleaved starts; -v and --help, exec to exit
  footprint ("footprint"): RSS, PSS and private memory of every process left running
    with 20 namespaces at once, per namespace and in total
CPU time and memory are summed over the stack process and its descendants.
The start-up and footprint workloads use bench/startup.py's functions, in a forked
child in a private mount namespace, and run pyslirp as installed (``pip install .``
into .venv-installed, kept up to date with the checkout: installed_pyslirp);
"pyslirp-shared" is that pyslirp in the drop-in's shared-engine mode, run on them only.
"pyslirp-nopoll" is pyslirp started with --busy-poll=0, run on the round-trip,
connection and UDP workloads only: its CPU figures show what busy polling changes
(a host datagram stream starts no poll since udp-rate; a lone reply still does).

IPv6: when the "ipv6" workloads are selected (the default), every stack is
started dual-stack (pyslirp ``-6``, slirp4netns ``--enable-ipv6``, pasta
without ``-4`` and with ``-g`` naming the IPv6 gateway of the runner's
dead-end template interface), so the IPv4 and IPv6 figures of a stack come
from the same process in the same round. The guest configures IPv6 from the
stack (SLAAC from pyslirp's and libslirp's router advertisements; pasta
copies the template's address); the IPv6 workloads wait for a global address
and a default route, then reach the host's ``::1`` through the stack's
gateway (fd00::2, or pasta's IPv6 gateway, which pasta maps to the host),
where a second netload server and the iperf3 server listen.

Output: a table on stdout with ratios to slirp4netns and the goals of issue 5
(met / not met), and results.json, results.md and chart.png in --out.

Usage: see bench/README.md.  Needs root, iperf3, util-linux (unshare, nsenter),
iproute2, and for the chart matplotlib in the interpreter running this script.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import os
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import startup  # bench/startup.py (this script's directory is on sys.path)

HERE = Path(__file__).resolve().parent
NETLOAD = HERE / "netload.py"

STACKS = ("pyslirp", "pyslirp-nopoll", "pyslirp-shared", "slirp4netns", "pasta")
BASELINE = "slirp4netns"
# The better of these is what the small-transaction goals compare with.
BEST_OF = ("slirp4netns", "pasta")
# pyslirp with busy polling off: the same binary, one more flag, and only the
# workloads whose figures busy polling could flatter (latency and CPU per exchange).
VARIANTS = {"pyslirp-nopoll": ("pyslirp", ["--busy-poll=0"]),
            # The drop-in's shared-engine mode (PYSLIRP_SHARED_ENGINE=1): start-up and memory.
            "pyslirp-shared": ("pyslirp", [])}
ONLY_WORKLOADS = {"pyslirp-nopoll": ("rtt", "paced", "nagle", "connect", "udp"),
                  "pyslirp-shared": ("startup", "footprint")}
# The same iperf3 over plain loopback in the host namespace: the kernel alone.
REFERENCE = "loopback"
# UDP rate search: geometric bisection between these offered rates (Mbit/s).
UDP_MIN_MBPS = 10.0
UDP_MAX_MBPS = 4000.0
UDP_PROBES = 6
UDP_LOSS_LIMIT_PCT = 1.0
UDP_PROBE_SECONDS = 1
#: A probe over the loss limit is run once more at the same rate before the search
#: calls the rate too high (see _udp_step).
UDP_PROBE_TRIES = 2
#: iperf3 -w for the UDP probes: both iperf3 sockets (sender and receiver, the guest's
#: and the host's) ask for this SO_SNDBUF/SO_RCVBUF (the kernel caps it at
#: net.core.rmem_max/wmem_max), so the endpoints' default ~90-datagram queues, which
#: overflow whenever iperf3 waits a few ms for a CPU, do not stand for the stack's limit.
UDP_SOCKET_BUFFER = "4M"
GUEST_IP = "10.0.2.100"
HOST_IP = "10.0.2.2"     # the host's loopback as the namespace sees it
HOST6_IP = "fd00::2"     # the host's ::1 (pyslirp, slirp4netns)
# The dead-end template interface of the isolated host (see _setup_isolated_host): pasta
# copies its address and is told its gateway, which pasta maps to the host's loopback.
TEMPLATE6 = "2001:db8:b::2/64"
GATEWAY6 = "2001:db8:b::1"
HOST6_TARGET = {"pasta": GATEWAY6}
IPV6_WAIT = 30.0
DNS_IP = "10.0.2.3"
# pasta (2023-03 build) hands out its gateway as the DNS address when the resolver
# it is given is on loopback, and maps that to the host; "--dns-forward 10.0.2.3"
# to a loopback resolver goes unanswered in this build.
DNS_TARGET = {"pasta": HOST_IP}
TAP = "tap0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class StackUnavailable(Exception):
    """The stack is not installed: skip it for the whole run."""


class StackFailed(Exception):
    """The stack did not start, or does not forward traffic."""


class WorkloadFailed(Exception):
    """One measurement failed; the run goes on."""


# ---------------------------------------------------------------- metrics

@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower"
    chart: bool = True


def _bulk_metrics(mtus: list[int]) -> list[Metric]:
    out = []
    for mtu in mtus:
        for direction, word in (("up", "upload"), ("down", "download")):
            for flows in (1, 4):
                out.append(Metric(f"tcp_{direction}_p{flows}_mtu{mtu}",
                                  f"TCP {word}, {flows} flow{'s' if flows > 1 else ''}, MTU {mtu}",
                                  "Gbit/s", "higher"))
    return out


def _cpu_metrics(mtus: list[int]) -> list[Metric]:
    return [Metric(f"cpu_{d}_p1_mtu{mtu}", f"stack CPU per GB, {w} 1 flow, MTU {mtu}",
                   "CPU s/GB", "lower")
            for mtu in mtus for d, w in (("up", "upload"), ("down", "download"))]


def _ipv6_metrics(mtus: list[int]) -> list[Metric]:
    out = []
    for mtu in mtus:
        for direction, word in (("up", "upload"), ("down", "download")):
            out.append(Metric(f"tcp6_{direction}_p1_mtu{mtu}",
                              f"IPv6 TCP {word}, 1 flow, MTU {mtu}", "Gbit/s", "higher"))
    out += [Metric(f"cpu6_{d}_p1_mtu{mtu}", f"IPv6 stack CPU per GB, {w} 1 flow, MTU {mtu}",
                   "CPU s/GB", "lower")
            for mtu in mtus for d, w in (("up", "upload"), ("down", "download"))]
    out += [Metric("rtt6_p50_us", "IPv6 TCP 1-byte round trip p50", "us", "lower"),
            Metric("rtt6_p99_us", "IPv6 TCP 1-byte round trip p99", "us", "lower"),
            Metric("cpu_rtt6_us", "IPv6 stack CPU per 1-byte round trip", "CPU us", "lower")]
    return out


def _loopback_metrics(mtus: list[int]) -> list[Metric]:
    """The kernel alone, and each stack's 1-flow bulk rate as a share of it."""
    out = [Metric(f"{REFERENCE}_{d}_p1", f"TCP {w}, 1 flow, plain loopback (no stack)",
                  "Gbit/s", "higher", chart=False)
           for d, w in (("up", "upload"), ("down", "download"))]
    out += [Metric(f"tcp_{d}_p1_mtu{mtu}_pct_loopback",
                   f"TCP {w}, 1 flow, MTU {mtu}, share of plain loopback", "%", "higher",
                   chart=False)
            for mtu in mtus for d, w in (("up", "upload"), ("down", "download"))]
    return out


MISC_METRICS = [
    Metric("rtt_p50_us", "TCP 1-byte round trip p50", "us", "lower"),
    Metric("rtt_p99_us", "TCP 1-byte round trip p99", "us", "lower"),
    Metric("cpu_rtt_us", "stack CPU per 1-byte round trip", "CPU us", "lower"),
    Metric("cpu_paced_us", "stack CPU per 1-byte exchange, one per ms", "CPU us", "lower"),
    Metric("nagle_p50_us", "TCP Nagle'd write-write-read exchange p50", "us", "lower"),
    Metric("nagle_p99_us", "TCP Nagle'd write-write-read exchange p99", "us", "lower"),
    Metric("conn_per_s", "new TCP connections", "conn/s", "higher"),
    Metric("cpu_conn_us", "stack CPU per new TCP connection", "CPU us", "lower"),
    Metric("dns_qps", "DNS queries through the stack", "queries/s", "higher"),
    Metric("cpu_dns_ms", "stack CPU per 1,000 DNS queries", "CPU ms", "lower"),
    Metric("udp_up_rate_mbps", "UDP upload: highest offered rate with < 1 % loss", "Mbit/s",
           "higher", chart=False),
    Metric("udp_up_mbps", "UDP upload received at that rate", "Mbit/s", "higher"),
    Metric("cpu_udp_up_us", "stack CPU per UDP datagram, upload", "CPU us", "lower"),
    Metric("udp_down_rate_mbps", "UDP download: highest offered rate with < 1 % loss",
           "Mbit/s", "higher", chart=False),
    Metric("udp_down_mbps", "UDP download received at that rate", "Mbit/s", "higher"),
    Metric("cpu_udp_down_us", "stack CPU per UDP datagram, download", "CPU us", "lower"),
    Metric("flood_base_gbps", "TCP download around the floods (before, after)", "Gbit/s", "higher"),
    Metric("flood_syn_pct", "TCP download during a guest SYN flood, % of unloaded", "%",
           "higher"),
    Metric("flood_udp_pct", "TCP download during a guest UDP flood, % of unloaded", "%",
           "higher"),
    Metric("flood_syn_cpu_pct", "stack CPU during the SYN-flood download", "% of a core",
           "lower", chart=False),
    Metric("flood_udp_cpu_pct", "stack CPU during the UDP-flood download", "% of a core",
           "lower", chart=False),
    Metric("flood_syn_sent", "frames the guest sent, SYN flood", "frames/s", "higher",
           chart=False),
    Metric("flood_udp_sent", "frames the guest sent, UDP flood", "frames/s", "higher",
           chart=False),
    Metric("flood_syn_ring_drops", "frames dropped at the guest's TAP (queue full or flood "
           "filter), SYN flood", "frames/s", "lower", chart=False),
    Metric("flood_udp_ring_drops", "frames dropped at the guest's TAP (queue full or flood "
           "filter), UDP flood", "frames/s", "lower", chart=False),
    Metric("idle_rss_before_mb", "stack RSS before 1,000 idle conns", "MB", "lower",
           chart=False),
    Metric("idle_rss_after_mb", "stack RSS with 1,000 idle conns", "MB", "lower", chart=False),
    Metric("idle_rss_delta_mb", "extra RSS for 1,000 idle conns", "MB", "lower"),
]


# ---------------------------------------------------------------- goals of issue 5

@dataclass(frozen=True)
class Goal:
    text: str
    metric: str
    kind: str        # "ratio_ge", "ratio_le" (vs slirp4netns), "vs_pasta_ge", "abs_le"/"abs_ge",
                     # "best_ge"/"best_le" (vs the better of slirp4netns and pasta),
                     # "own_ge"/"own_le" (vs the same stack's figure for metric ``own``)
    bound: float
    own: str = ""
    #: The stacks the goal is set for (empty: every stack); the others get n/a.
    stacks: tuple[str, ...] = ()


def goals_for(mtus: list[int], misc_mtu: int) -> list[Goal]:
    g: list[Goal] = []
    targets = {("up", 65520): 2.5, ("up", 1500): 8.0, ("down", 65520): 2.0, ("down", 1500): 4.0}
    for (direction, mtu), bound in targets.items():
        if mtu not in mtus:
            continue
        word = "Upload" if direction == "up" else "Download"
        for flows in (1, 4):
            g.append(Goal(f"{word} {flows} flow{'s' if flows > 1 else ''}, MTU {mtu}: "
                          f">= {bound:g}x slirp4netns",
                          f"tcp_{direction}_p{flows}_mtu{mtu}", "ratio_ge", bound))
    if 65520 in mtus:
        for flows in (1, 4):
            g.append(Goal(f"Download {flows} flow{'s' if flows > 1 else ''}, MTU 65520: "
                          "not below pasta",
                          f"tcp_down_p{flows}_mtu65520", "vs_pasta_ge", 1.0))
        g.append(Goal("Download 1 flow, MTU 65520: at least 60 % of plain loopback",
                      "tcp_down_p1_mtu65520_pct_loopback", "abs_ge", 60.0))
    best = " and ".join(BEST_OF)
    g += [
        Goal(f"CPU per round trip (MTU {misc_mtu}): no more than slirp4netns",
             "cpu_rtt_us", "ratio_le", 1.0),
        Goal("CPU per new connection: no more than slirp4netns", "cpu_conn_us", "ratio_le", 1.0),
        Goal(f"Round trip p50 (MTU {misc_mtu}): no slower than {best}",
             "rtt_p50_us", "best_le", 1.0),
        Goal(f"Round trip p99 (MTU {misc_mtu}): no slower than {best}",
             "rtt_p99_us", "best_le", 1.0),
        Goal(f"New connections per second: no fewer than the better of {best}",
             "conn_per_s", "best_ge", 1.0),
        Goal(f"DNS queries per second: no fewer than the better of {best}",
             "dns_qps", "best_ge", 1.0),
        Goal(f"UDP upload at < 1 % loss: no lower than the better of {best}",
             "udp_up_mbps", "best_ge", 1.0),
        Goal(f"UDP download at < 1 % loss: no lower than the better of {best}",
             "udp_down_mbps", "best_ge", 1.0),
        Goal("1,000 idle connections: at most 20 MB extra RSS",
             "idle_rss_delta_mb", "abs_le", 20.0),
        Goal("Download during a guest SYN flood: at least 50 % of unloaded",
             "flood_syn_pct", "abs_ge", 50.0),
        Goal("Download during a guest UDP flood: at least 50 % of unloaded",
             "flood_udp_pct", "abs_ge", 50.0),
    ]
    # Issue 13: each IPv6 figure within 10 % of the stack's own IPv4 figure.
    for mtu in mtus:
        for direction, word in (("up", "Upload"), ("down", "Download")):
            g.append(Goal(f"IPv6 {word.lower()} 1 flow, MTU {mtu}: >= 0.9x its IPv4",
                          f"tcp6_{direction}_p1_mtu{mtu}", "own_ge", 0.9,
                          f"tcp_{direction}_p1_mtu{mtu}"))
    g.append(Goal(f"IPv6 round trip p50 (MTU {misc_mtu}): <= 1.1x its IPv4",
                  "rtt6_p50_us", "own_le", 1.1, "rtt_p50_us"))
    return g + startup_goals()


def evaluate_goal(goal: Goal, med: dict[str, dict[str, float]], stack: str
                  ) -> tuple[str, str]:
    """Return (verdict, detail) for one stack; verdict is met / NOT met / n/a."""
    if goal.stacks and stack not in goal.stacks:
        return "n/a", f"a goal for {' and '.join(goal.stacks)}"
    value = med.get(stack, {}).get(goal.metric)
    if value is None:
        return "n/a", "not measured"
    if goal.kind in ("abs_le", "abs_ge"):
        ok = value <= goal.bound if goal.kind == "abs_le" else value >= goal.bound
        return ("met" if ok else "NOT met"), f"{value:.1f}"
    if goal.kind in ("own_ge", "own_le"):
        own = med.get(stack, {}).get(goal.own)
        if not own:
            return "n/a", "no IPv4 figure"
        ratio = value / own
        ok = ratio >= goal.bound if goal.kind == "own_ge" else ratio <= goal.bound
        return ("met" if ok else "NOT met"), f"{ratio:.2f}x its IPv4"
    lower_is_better = goal.kind in ("ratio_le", "best_le")
    if goal.kind in ("best_ge", "best_le"):
        if stack in BEST_OF:
            return "n/a", "a reference stack"
        refs = {s: v for s in BEST_OF if (v := med.get(s, {}).get(goal.metric))}
        if len(refs) < len(BEST_OF):
            missing = [s for s in BEST_OF if s not in refs]
            return "n/a", f"no {' or '.join(missing)} figure"
        other = (min if lower_is_better else max)(refs, key=refs.__getitem__)
    else:
        other = BASELINE if goal.kind != "vs_pasta_ge" else "pasta"
    ref = med.get(other, {}).get(goal.metric)
    if not ref:
        return "n/a", f"no {other} figure"
    ratio = value / ref
    ok = ratio <= goal.bound if lower_is_better else ratio >= goal.bound
    return ("met" if ok else "NOT met"), f"{ratio:.2f}x {other}"


# ---------------------------------------------------------------- processes

_live: list[subprocess.Popen[Any]] = []


def _spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    p: subprocess.Popen[Any] = subprocess.Popen(cmd, **kw)
    _live.append(p)
    return p


def _stop(p: subprocess.Popen[Any] | None, grace: float = 3.0) -> None:
    if p is None:
        return
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
    if p in _live:
        _live.remove(p)


def _stop_all() -> None:
    for p in reversed(list(_live)):
        _stop(p, grace=1.0)


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its descendants, in seconds."""
    ticks = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15)
    return ticks / CLK_TCK


def rss_mb(pid: int) -> float:
    """VmRSS of pid and its descendants, in MB (10^6 bytes)."""
    kb = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        kb += int(line.split()[1])
                        break
        except OSError:
            continue
    return kb * 1024 / 1e6


# ---------------------------------------------------------------- namespace + stacks

class Namespace:
    """A user + network namespace kept alive by a sleeper process."""

    def __init__(self) -> None:
        self.proc = _spawn(["unshare", "--user", "--map-root-user", "--net", "--",
                            "sleep", "infinity"], stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                comm = Path(f"/proc/{self.pid}/comm").read_text().strip()
                if comm == "sleep" and os.readlink(f"/proc/{self.pid}/ns/net") != mine:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        self.close()
        raise RuntimeError("could not create a network namespace with unshare")

    def cmd(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", "--", *argv]

    def close(self) -> None:
        _stop(self.proc, grace=1.0)


@dataclass
class Stack:
    name: str
    proc: subprocess.Popen[Any]
    log: Path
    #: The guest's IPv6 was found configured and working (see _wait_ipv6).
    ipv6_ready: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 6) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines()
                     if ln.strip() and "Failed to send" not in ln]
        except OSError:
            return ""
        return " | ".join(lines[-n:])


def _find(name: str) -> str | None:
    # The runner's own venv first: pyslirp lives there, not necessarily on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


def _wait_ready_fd(proc: subprocess.Popen[Any], rfd: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StackFailed(f"no ready signal within {timeout:.0f} s")
        r, _, _ = select.select([rfd], [], [], min(left, 0.1))
        if r:
            if os.read(rfd, 16):
                return
            try:
                status = f"exit status {proc.wait(1.0)}"
            except subprocess.TimeoutExpired:
                status = "still running"
            raise StackFailed(f"ready-fd closed without a signal ({status})")
        if proc.poll() is not None:
            raise StackFailed(f"exited with status {proc.returncode} before ready")


def _stack_exe(name: str) -> str | None:
    return _find(VARIANTS.get(name, (name, []))[0])


def start_stack(name: str, ns: Namespace, mtu: int, cfg: RunConfig) -> Stack:
    exe = _stack_exe(name)
    if exe is None:
        raise StackUnavailable(f"{name} is not installed (not on PATH)")
    log = cfg.workdir / f"{name}-{ns.pid}.log"
    logf = open(log, "wb")  # noqa: SIM115 - closed right below; the child keeps its copy
    try:
        if name == "pasta":
            # Foreground (-f) so our child is pasta itself (its CPU and RSS are measured).
            # As root pasta must be told --runas 0 or it drops to nobody and fails.
            family = ["-g", GATEWAY6] if cfg.ipv6 else ["-4"]
            argv = [exe, "--runas", "0", "-f", "--config-net", *family, "--mtu", str(mtu),
                    "-I", TAP, "-a", GUEST_IP, "-n", "24", "-g", HOST_IP,
                    "-D", cfg.dns_addr,
                    "-t", "none", "-u", "none", "-T", "none", "-U", "none", str(ns.pid)]
            proc = _spawn(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            deadline = time.monotonic() + 10
            while True:
                out = subprocess.run(ns.cmd(["ip", "-4", "-o", "addr", "show", "dev", TAP]),
                                     capture_output=True, text=True).stdout
                if GUEST_IP in out:
                    break
                if proc.poll() is not None:
                    raise StackFailed(f"pasta exited with status {proc.returncode}")
                if time.monotonic() > deadline:
                    raise StackFailed("pasta did not configure tap0 within 10 s")
                time.sleep(0.02)
        else:
            rfd, wfd = os.pipe()
            try:
                base = ["-c", "--mtu", str(mtu), "--ready-fd", str(wfd)]
                if cfg.ipv6:
                    base.append("--enable-ipv6")  # pyslirp's and slirp4netns's spelling
                if name == "slirp4netns":
                    # slirp4netns forwards DNS to the nameservers of /etc/resolv.conf: give
                    # it, in a private mount namespace, one that names the test server.
                    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
                    argv = ["unshare", "--mount", "--", "sh", "-c", script,
                            str(cfg.resolv_conf), exe, *base, str(ns.pid), TAP]
                else:
                    extra = VARIANTS.get(name, (name, []))[1]
                    argv = [exe, *base, *extra, "--dns-upstream", f"{cfg.dns_addr}:53",
                            str(ns.pid), TAP]
                proc = _spawn(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                              pass_fds=(wfd,))
                os.close(wfd)
                wfd = -1
                try:
                    _wait_ready_fd(proc, rfd, 15.0)
                except StackFailed as exc:
                    stack = Stack(name, proc, log)
                    _stop(proc)
                    raise StackFailed(f"{exc}; log: {stack.tail()}") from None
            finally:
                os.close(rfd)
                if wfd >= 0:
                    os.close(wfd)
    finally:
        logf.close()
    stack = Stack(name, proc, log)
    # Ready is not enough: check that a TCP connection to the host's loopback works.
    res = _run_json(ns.cmd([cfg.python, str(NETLOAD), "probe", "--host", HOST_IP,
                            "--port", str(cfg.accept_port), "--deadline", "5"]),
                    timeout=15, check=False)
    if not res.get("ok"):
        tail = stack.tail()
        _stop(proc)
        raise StackFailed(f"started, but no TCP connection to {HOST_IP} went through "
                          f"({res.get('error', res)}); log: {tail}")
    return stack


# ---------------------------------------------------------------- workloads

WORKLOAD_KINDS = ("bulk", "rtt", "paced", "nagle", "connect", "dns", "udp", "idle", "flood",
                  "ipv6", "startup", "footprint")


@dataclass
class RunConfig:
    quick: bool
    rounds: int
    duration: int
    mtus: list[int]
    stacks: list[str]
    out: Path
    python: str
    workdir: Path
    base_port: int
    rtt_count: int
    nagle_count: int
    paced_count: int
    conn_count: int
    dns_count: int
    dns_window: int
    idle_count: int
    only: tuple[str, ...] = WORKLOAD_KINDS
    dns_addr: str = "127.0.0.1"
    dns_ok: bool = True
    #: startup: starts per stack and flag set; footprint: namespaces running at once.
    startup_runs: int = 11
    footprint_count: int = 20
    #: pyslirp as installed (``pip install .``, not editable): see installed_pyslirp.
    pyslirp_cmd: list[str] = field(default_factory=list)
    #: What installed_pyslirp did or why it could not (a note of the results).
    pyslirp_install: str = ""
    resolv_conf: Path = Path("/nonexistent")

    @property
    def iperf_port(self) -> int:
        return self.base_port

    @property
    def rtt_port(self) -> int:
        return self.base_port + 1

    @property
    def accept_port(self) -> int:
        return self.base_port + 2

    @property
    def hold_port(self) -> int:
        return self.base_port + 3

    @property
    def nagle_port(self) -> int:
        return self.base_port + 4

    @property
    def misc_mtu(self) -> int:
        return 65520 if 65520 in self.mtus else max(self.mtus)

    @property
    def ipv6(self) -> bool:
        """Start the stacks dual-stack: the IPv6 workloads are selected."""
        return "ipv6" in self.only


def _run_json(argv: list[str], timeout: float, check: bool = True) -> dict[str, Any]:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise WorkloadFailed(f"timed out after {timeout:.0f} s") from None
    lines = [ln for ln in cp.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        if check:
            raise WorkloadFailed(f"exit {cp.returncode}: {cp.stderr.strip()[-300:]}")
        return {"ok": False, "error": cp.stderr.strip()[-300:]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _iperf(cfg: RunConfig, ns: Namespace | None, stack: Stack | None, *, reverse: bool,
           flows: int = 1, udp_mbps: float | None = None, seconds: int | None = None,
           v6: bool = False) -> tuple[dict[str, Any], float]:
    """One iperf3 run; returns (the receiver's summary, stack CPU seconds used).

    With ``ns`` None the client runs in our own namespace straight to 127.0.0.1 (the
    plain-loopback reference, no stack: CPU 0).  ``udp_mbps``: a UDP run offering
    that rate, in 1400-byte datagrams; the summary then has ``packets`` (sent).
    ``v6``: over IPv6, to the server on ``::1`` through the stack's IPv6 gateway.
    """
    server = _spawn(["iperf3", "-s", "-1", "-B", "::1" if v6 else "127.0.0.1",
                     "-p", str(cfg.iperf_port)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True)
    try:
        # iperf3 buffers its "listening" line when writing to a pipe: watch the socket.
        ready_by = time.monotonic() + 5
        while not _tcp_listening(cfg.iperf_port, v6):
            if server.poll() is not None:
                err = server.stderr.read() if server.stderr else ""
                raise WorkloadFailed(f"iperf3 server did not start: {err.strip()[-200:]}")
            if time.monotonic() > ready_by:
                raise WorkloadFailed("iperf3 server not listening after 5 s")
            time.sleep(0.01)
        seconds = seconds or cfg.duration
        host = HOST_IP if ns is not None else "127.0.0.1"
        if v6:
            assert stack is not None
            host = HOST6_TARGET.get(stack.name, HOST6_IP)
        argv = ["iperf3", "-c", host, "-p", str(cfg.iperf_port), "-t", str(seconds),
                "-J", "--connect-timeout", "3000"]
        if flows > 1:
            argv += ["-P", str(flows)]
        if reverse:
            argv += ["-R"]
        if udp_mbps is not None:
            argv += ["-u", "-b", f"{round(udp_mbps * 1000)}K", "-l", "1400",
                     "-w", UDP_SOCKET_BUFFER]
        cpu0 = cpu_seconds(stack.pid) if stack else 0.0
        try:
            cp = subprocess.run(ns.cmd(argv) if ns else argv, capture_output=True, text=True,
                                timeout=seconds + 25, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise WorkloadFailed("iperf3 client timed out") from None
        cpu = cpu_seconds(stack.pid) - cpu0 if stack else 0.0
        try:
            data = json.loads(cp.stdout)
        except json.JSONDecodeError:
            raise WorkloadFailed(f"iperf3: {cp.stderr.strip()[-200:]}") from None
        if "error" in data:
            raise WorkloadFailed(f"iperf3: {data['error']}")
        summary: dict[str, Any] = data["end"]["sum_received"]
        if udp_mbps is not None:
            summary = dict(summary)
            summary["lost_percent"] = data["end"]["sum_received"].get(
                "lost_percent", data["end"]["sum"].get("lost_percent", 0.0))
            summary["packets"] = data["end"]["sum"].get("packets", summary.get("packets", 0))
        return summary, cpu
    finally:
        _stop(server, grace=1.0)


def _tcp_listening(port: int, v6: bool = False) -> bool:
    """Whether a TCP socket listens on 127.0.0.1:port (``v6``: [::1]:port) here."""
    want = f"{'0' * 24 + '01000000' if v6 else '0100007F'}:{port:04X}"
    with open("/proc/net/tcp6" if v6 else "/proc/net/tcp") as f:
        next(f)
        return any(cols[1] == want and cols[3] == "0A"
                   for cols in (line.split() for line in f))


@dataclass
class Step:
    label: str
    fn: Callable[[RunConfig, Namespace, Stack], dict[str, float]]
    kind: str   # what --only selects by: one of WORKLOAD_KINDS


def _bulk_step(mtu: int, direction: str, flows: int) -> Step:
    def run(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
        summary, cpu = _iperf(cfg, ns, stack, reverse=direction == "down", flows=flows)
        out = {f"tcp_{direction}_p{flows}_mtu{mtu}": summary["bits_per_second"] / 1e9}
        gb = summary["bytes"] / 1e9
        if flows == 1 and gb > 0:
            out[f"cpu_{direction}_p1_mtu{mtu}"] = cpu / gb
        return out
    word = "upload" if direction == "up" else "download"
    return Step(f"iperf3 TCP {word}, {flows} flow{'s' if flows > 1 else ''}", run, "bulk")


def _wait_ipv6(cfg: RunConfig, ns: Namespace, stack: Stack) -> str:
    """The host's IPv6 address through ``stack``, once the guest has a usable global IPv6
    address and default route (SLAAC takes a second or two) and a TCP connection to the
    host's ``::1`` through it works."""
    host6 = HOST6_TARGET.get(stack.name, HOST6_IP)
    if stack.ipv6_ready:
        return host6
    deadline = time.monotonic() + IPV6_WAIT
    while True:
        addrs = subprocess.run(ns.cmd(["ip", "-6", "-o", "addr", "show", "dev", TAP,
                                       "scope", "global", "-tentative"]),
                               capture_output=True, text=True).stdout
        route = subprocess.run(ns.cmd(["ip", "-6", "route", "show", "default"]),
                               capture_output=True, text=True).stdout
        if addrs.strip() and route.strip():
            break
        if time.monotonic() > deadline:
            raise WorkloadFailed(f"no IPv6 address and default route within {IPV6_WAIT:.0f} s")
        time.sleep(0.1)
    res = _run_json(ns.cmd([cfg.python, str(NETLOAD), "probe", "--host", host6,
                            "--port", str(cfg.accept_port), "--deadline", "10"]),
                    timeout=20, check=False)
    if not res.get("ok"):
        raise WorkloadFailed(f"no TCP connection to [{host6}] went through "
                             f"({res.get('error', res)})")
    stack.ipv6_ready = True
    return host6


def _bulk6_step(mtu: int, direction: str) -> Step:
    def run(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
        _wait_ipv6(cfg, ns, stack)
        summary, cpu = _iperf(cfg, ns, stack, reverse=direction == "down", v6=True)
        out = {f"tcp6_{direction}_p1_mtu{mtu}": summary["bits_per_second"] / 1e9}
        gb = summary["bytes"] / 1e9
        if gb > 0:
            out[f"cpu6_{direction}_p1_mtu{mtu}"] = cpu / gb
        return out
    word = "upload" if direction == "up" else "download"
    return Step(f"iperf3 TCP {word} over IPv6, 1 flow", run, "ipv6")


def _rtt6(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
    host6 = _wait_ipv6(cfg, ns, stack)
    res, cpu = _client_with_cpu(stack, ns.cmd([
        cfg.python, str(NETLOAD), "rtt", "--host", host6, "--port", str(cfg.rtt_port),
        "--count", str(cfg.rtt_count)]), timeout=120)
    return {"rtt6_p50_us": res["p50_us"], "rtt6_p99_us": res["p99_us"],
            "cpu_rtt6_us": cpu / res["exchanges"] * 1e6}


def _udp_step(direction: str) -> Step:
    """The highest offered rate the stack carries with < 1 % loss: a geometric bisection
    between UDP_MIN_MBPS and UDP_MAX_MBPS, one short iperf3 -u run per probe.

    A fixed offered rate mostly measures the load generator on 2 CPUs; the rate at
    which loss starts is the stack's.  Also reported: what was received at that rate
    (what the goal compares: iperf3 may offer less than asked when it runs out of
    CPU) and the stack's CPU per datagram in that run.

    Fairness: a 1 % limit in a 1 s probe is ~500 datagrams at 600 Mbit/s, less than
    one scheduling delay of a few ms of any of the three processes on 2 CPUs, and one
    false "too high" early in the bisection caps the result for good (measured: the
    same stack's result swung 385-742 Mbit/s between runs).  So a probe over the
    limit is repeated once (UDP_PROBE_TRIES) and the rate counts as carried if either
    try was under it, and iperf3's own sockets get big buffers (UDP_SOCKET_BUFFER):
    the loss left is where the stack drops (its host socket's queue, the TAP), not
    iperf3's default queues."""
    def run(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
        lo, hi = UDP_MIN_MBPS, UDP_MAX_MBPS
        best: tuple[float, dict[str, Any], float] | None = None
        last = ""
        for _ in range(UDP_PROBES):
            rate = (lo * hi) ** 0.5
            for _try in range(UDP_PROBE_TRIES):
                summary, cpu = _iperf(cfg, ns, stack, reverse=direction == "down",
                                      udp_mbps=rate, seconds=UDP_PROBE_SECONDS)
                loss = float(summary["lost_percent"])
                if loss < UDP_LOSS_LIMIT_PCT:
                    break
            if loss < UDP_LOSS_LIMIT_PCT:
                lo, best = rate, (rate, summary, cpu)
            else:
                hi = rate
                last = f"{rate:.0f} Mbit/s: {loss:.1f} % lost"
        if best is None:
            raise WorkloadFailed(f"no offered rate down to {lo:.0f} Mbit/s had under "
                                 f"{UDP_LOSS_LIMIT_PCT:g} % loss ({last})")
        rate, summary, cpu = best
        out = {f"udp_{direction}_rate_mbps": rate,
               f"udp_{direction}_mbps": summary["bits_per_second"] / 1e6}
        if summary["packets"]:
            out[f"cpu_udp_{direction}_us"] = cpu / summary["packets"] * 1e6
        return out
    word = "upload" if direction == "up" else "download"
    return Step(f"iperf3 UDP {word}: highest rate with < 1 % loss", run, "udp")


def loopback_reference(cfg: RunConfig) -> dict[str, float]:
    """The same 1-flow iperf3 over plain loopback in the host namespace, no stack."""
    out = {}
    for direction in ("up", "down"):
        summary, _ = _iperf(cfg, None, None, reverse=direction == "down")
        out[f"{REFERENCE}_{direction}_p1"] = summary["bits_per_second"] / 1e9
    return out


def _client_with_cpu(stack: Stack, argv: list[str], timeout: float
                     ) -> tuple[dict[str, Any], float]:
    """A netload.py client's result and the stack CPU seconds used meanwhile."""
    cpu0 = cpu_seconds(stack.pid)
    res = _run_json(argv, timeout=timeout)
    return res, cpu_seconds(stack.pid) - cpu0


def _rtt(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
    res, cpu = _client_with_cpu(stack, ns.cmd([
        cfg.python, str(NETLOAD), "rtt", "--host", HOST_IP, "--port", str(cfg.rtt_port),
        "--count", str(cfg.rtt_count)]), timeout=120)
    # Per exchange, warm-up included: the stack did that work too.
    return {"rtt_p50_us": res["p50_us"], "rtt_p99_us": res["p99_us"],
            "cpu_rtt_us": cpu / res["exchanges"] * 1e6}


def _paced(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
    # One exchange per ~1 ms: each wakes a sleeping stack, so this shows what an exchange
    # costs a stack that is not kept busy (and any timer it leaves armed per exchange).
    res, cpu = _client_with_cpu(stack, ns.cmd([
        cfg.python, str(NETLOAD), "rtt", "--host", HOST_IP, "--port", str(cfg.rtt_port),
        "--count", str(cfg.paced_count), "--warmup", "20", "--gap", "0.001"]), timeout=120)
    return {"cpu_paced_us": cpu / res["exchanges"] * 1e6}


def _nagle(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
    # Two small writes with Nagle on, answered after both: the second waits for the
    # stack's ACK of the first, which no reply can carry (a delayed ACK's worst case).
    res = _run_json(ns.cmd([
        cfg.python, str(NETLOAD), "nagle", "--host", HOST_IP, "--port", str(cfg.nagle_port),
        "--count", str(cfg.nagle_count)]), timeout=120)
    return {"nagle_p50_us": res["p50_us"], "nagle_p99_us": res["p99_us"]}


def _connections(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
    res, cpu = _client_with_cpu(stack, ns.cmd([
        cfg.python, str(NETLOAD), "connect", "--host", HOST_IP,
        "--port", str(cfg.accept_port), "--count", str(cfg.conn_count)]), timeout=180)
    if res["errors"] > max(10, cfg.conn_count // 100):
        raise WorkloadFailed(f"{res['errors']} failed connects (of {cfg.conn_count})")
    return {"conn_per_s": res["conn_per_s"], "cpu_conn_us": cpu / res["count"] * 1e6}


def _dns(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
    if not cfg.dns_ok:
        raise WorkloadFailed("no test DNS server (port 53 on loopback was not free)")
    server = DNS_TARGET.get(stack.name, DNS_IP)
    res, cpu = _client_with_cpu(stack, ns.cmd([
        cfg.python, str(NETLOAD), "dns", "--server", server, "--count", str(cfg.dns_count),
        "--window", str(cfg.dns_window)]), timeout=180)
    if res["answered"] == 0:
        raise WorkloadFailed(f"no DNS answer through {server} ({res['lost']} lost)")
    if res["lost"] > cfg.dns_count // 100:
        raise WorkloadFailed(f"{res['lost']} of {cfg.dns_count} DNS queries lost")
    return {"dns_qps": res["qps"], "cpu_dns_ms": cpu / res["answered"] * 1e6}


def _idle(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
    before = rss_mb(stack.pid)
    client = _spawn(ns.cmd([cfg.python, str(NETLOAD), "hold", "--host", HOST_IP,
                            "--port", str(cfg.hold_port), "--count", str(cfg.idle_count)]),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        r, _, _ = select.select([client.stdout], [], [], 120)
        line = client.stdout.readline() if r else ""
        if not line:
            raise WorkloadFailed("idle-connection client gave no answer")
        res = json.loads(line)
        if res["connected"] < cfg.idle_count:
            raise WorkloadFailed(f"only {res['connected']} of {cfg.idle_count} connections "
                                 f"({res['error']})")
        time.sleep(0.5)   # let the stack settle: the connections are idle now
        after = rss_mb(stack.pid)
        client.stdin.write("\n")
        client.stdin.flush()
        client.wait(30)
        time.sleep(1.0)   # let the stack tear the connections down before what follows
    finally:
        _stop(client)
    return {"idle_rss_before_mb": before, "idle_rss_after_mb": after,
            "idle_rss_delta_mb": after - before}


def _tap_tx_dropped(ns: Namespace) -> int | None:
    """Frames the guest's kernel dropped at its TAP queue (tap0's TX dropped), or None."""
    cp = subprocess.run(ns.cmd(["ip", "-j", "-s", "link", "show", "tap0"]),
                        capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    try:
        return int(json.loads(cp.stdout)[0]["stats64"]["tx"]["dropped"])
    except (ValueError, LookupError, TypeError):
        return None


def _interval_rate(intervals: list[dict[str, Any]], start: float, end: float) -> float | None:
    """Mean bits/s of the iperf3 intervals lying wholly within [start, end) seconds."""
    bits = secs = 0.0
    for iv in intervals:
        sm = iv["sum"]
        if sm["start"] >= start - 1e-6 and sm["end"] <= end + 1e-6:
            bits += sm["bytes"] * 8
            secs += sm["seconds"]
    return bits / secs if secs else None


def _floods(cfg: RunConfig, ns: Namespace, stack: Stack) -> dict[str, float]:
    """A 1-flow download with a flood from the same guest in its middle third (issue 11:
    a well-behaved transfer keeps at least half its rate), once per kind of flood.

    The rate during the flood is compared with the rate of the same download in the
    thirds before and after it (0.5 s margins, the flood starting and ending), not
    with another run: on a shared machine the load drifts from one run to the next by
    more than the effect measured. Beside the rate: the stack's CPU (% of one core)
    during the flood, the frames the guest sent per second of flood, and those its
    kernel dropped at the TAP per second: of every flow when its queue is full (the
    stack fell behind), or the flood's alone where a flood filter drops them
    (pyslirp.runtime.framefilter)."""
    third = max(cfg.duration, 2)
    out: dict[str, float] = {}
    bases = []
    for kind in ("syn", "udp"):
        server = _spawn(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(cfg.iperf_port)],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        client = None
        try:
            ready_by = time.monotonic() + 5
            while not _tcp_listening(cfg.iperf_port):
                if server.poll() is not None or time.monotonic() > ready_by:
                    raise WorkloadFailed("iperf3 server did not start")
                time.sleep(0.01)
            client = _spawn(ns.cmd(["iperf3", "-c", HOST_IP, "-p", str(cfg.iperf_port),
                                    "-t", str(3 * third), "-i", "0.5", "-J", "-R",
                                    "--connect-timeout", "3000"]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
            time.sleep(third)
            dropped0, cpu0, t0 = _tap_tx_dropped(ns), cpu_seconds(stack.pid), time.monotonic()
            flood = _spawn(ns.cmd([cfg.python, str(NETLOAD), "flood", "--kind", kind,
                                   "--host", HOST_IP, "--seconds", str(third)]),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
            flood_out, _ = flood.communicate(timeout=third + 10)
            elapsed = time.monotonic() - t0
            cpu, dropped1 = cpu_seconds(stack.pid) - cpu0, _tap_tx_dropped(ns)
            stdout, stderr = client.communicate(timeout=3 * third + 25)
        finally:
            _stop(client)
            _stop(server, grace=1.0)
        try:
            intervals = json.loads(stdout)["intervals"]
        except (json.JSONDecodeError, KeyError):
            raise WorkloadFailed(f"iperf3: {stderr.strip()[-200:]}") from None
        before = _interval_rate(intervals, 0.5, third)
        under = _interval_rate(intervals, third + 0.5, 2 * third)
        after = _interval_rate(intervals, 2 * third + 0.5, 3 * third)
        if not before or not after or under is None:
            raise WorkloadFailed(f"iperf3 gave no intervals around the {kind} flood")
        base = (before + after) / 2
        bases.append(base)
        out[f"flood_{kind}_pct"] = 100 * under / base
        out[f"flood_{kind}_cpu_pct"] = 100 * cpu / elapsed
        if dropped0 is not None and dropped1 is not None:
            out[f"flood_{kind}_ring_drops"] = (dropped1 - dropped0) / elapsed
        with contextlib.suppress(json.JSONDecodeError, KeyError, IndexError):
            out[f"flood_{kind}_sent"] = json.loads(flood_out.splitlines()[-1])["sent"] / third
    out["flood_base_gbps"] = sum(bases) / len(bases) / 1e9
    return out


def plan(cfg: RunConfig, mtu: int, stack: str) -> list[Step]:
    steps = []
    if mtu == cfg.misc_mtu:
        # Idle memory first, so "before" is the stack's footprint right after start.
        steps.append(Step(f"{cfg.idle_count} idle TCP connections (RSS)", _idle, "idle"))
    for direction in ("up", "down"):
        for flows in (1, 4):
            steps.append(_bulk_step(mtu, direction, flows))
    steps += [_bulk6_step(mtu, direction) for direction in ("up", "down")]
    if mtu == cfg.misc_mtu:
        steps += [
            Step("TCP 1-byte round trip over IPv6", _rtt6, "ipv6"),
            Step("TCP 1-byte round trip", _rtt, "rtt"),
            Step("TCP 1-byte exchanges, one per ms", _paced, "paced"),
            Step("TCP Nagle'd write-write-read", _nagle, "nagle"),
            Step("new TCP connections", _connections, "connect"),
            Step("DNS queries", _dns, "dns"),
            _udp_step("up"),
            _udp_step("down"),
            Step("TCP download during SYN and UDP floods", _floods, "flood"),
        ]
    kinds = ONLY_WORKLOADS.get(stack, WORKLOAD_KINDS)
    return [s for s in steps if s.kind in cfg.only and s.kind in kinds]


# ---------------------------------------------------------------- start-up and footprint (issue 15)
#
# Not Steps: these start their own namespaces and processes, many of them, through
# bench/startup.py's functions (which see: what is timed and how). They run in a forked
# child that first moves into a private mount namespace: slirp4netns 1.2.0's
# --enable-sandbox started in the host's mount namespace unmounts every `ip netns`
# namespace of the host (docs/testing.md). Targets are user + network namespaces
# (the rootless container's shape, as for every other workload; pasta needs one).

# Flag sets of bench/startup.py, as the table names them.
STARTUP_FLAGS = {"cr": "-c -r", "podman": "podman 4.3's flags",
                 "api": "podman's flags + --api-socket"}
FOOTPRINT_FLAGS = ("cr", "api")
#: pasta has no slirp4netns command line: it is timed with its own (``--config-net``, the
#: counterpart of -c) in the ``cr`` rows only.
PASTA_FLAGS = ("cr",)
#: A venv with pyslirp installed from this checkout with ``pip install .`` (not
#: editable: the editable finder's import hook costs milliseconds at every start).
INSTALLED_VENV = HERE.parent / ".venv-installed"


def startup_metrics(cfg: RunConfig) -> list[Metric]:
    out = []
    for fs, words in STARTUP_FLAGS.items():
        out += [Metric(f"start_{fs}_tap_ms", f"start-up, {words}: exec to TAP present", "ms",
                       "lower", chart=fs == "cr"),
                Metric(f"start_{fs}_ready_ms", f"start-up, {words}: exec to ready", "ms",
                       "lower", chart=fs != "api"),
                Metric(f"start_{fs}_cpu_ms", f"start-up, {words}: CPU of the process started",
                       "CPU ms", "lower", chart=False)]
    out += [Metric("start_cold_ready_ms", "start-up, -c -r, shared engine not yet running: "
                   "exec to ready (1 start)", "ms", "lower", chart=False),
            Metric("exit_version_ms", "-v: exec to exit", "ms", "lower", chart=False),
            Metric("exit_help_ms", "--help: exec to exit", "ms", "lower", chart=False),
            Metric("exit_floor_ms", "its interpreter, python -I -c pass: exec to exit", "ms",
                   "lower", chart=False)]
    n = cfg.footprint_count
    for fs in FOOTPRINT_FLAGS:
        words = STARTUP_FLAGS[fs]
        out += [Metric(f"fp_{fs}_private_per_ns_mb", f"{n} namespaces, {words}: private "
                       "memory per namespace", "MB", "lower", chart=True),
                Metric(f"fp_{fs}_private_mb", f"{n} namespaces, {words}: private memory, all "
                       "processes left running", "MB", "lower", chart=False),
                Metric(f"fp_{fs}_pss_mb", f"{n} namespaces, {words}: PSS, all processes", "MB",
                       "lower", chart=False),
                Metric(f"fp_{fs}_rss_mb", f"{n} namespaces, {words}: RSS, all processes", "MB",
                       "lower", chart=False),
                Metric(f"fp_{fs}_processes", f"{n} namespaces, {words}: processes left running",
                       "processes", "lower", chart=False),
                Metric(f"fp_{fs}_engine_mb", f"{n} namespaces, {words}: of it the shared "
                       "engine's private memory", "MB", "lower", chart=False)]
    return out


def startup_goals() -> list[Goal]:
    """Issue 15's goals: part 1 for the per-container process (either mode), part 2 for
    the shared mode."""
    both = ("pyslirp", "pyslirp-shared")
    g = [Goal("Issue 15: -c -r, exec to TAP <= 30 ms", "start_cr_tap_ms", "abs_le", 30, "",
              both),
         Goal("Issue 15: -c -r, exec to ready <= 50 ms", "start_cr_ready_ms", "abs_le", 50, "",
              both)]
    for fs in ("podman", "api"):
        words = STARTUP_FLAGS[fs]
        g += [Goal(f"Issue 15: {words}, exec to TAP <= 30 ms", f"start_{fs}_tap_ms", "abs_le",
                   30, "", both),
              Goal(f"Issue 15: {words}, exec to ready <= 60 ms", f"start_{fs}_ready_ms",
                   "abs_le", 60, "", both)]
    g += [Goal("Issue 15: pyslirp -v, exec to exit <= 40 ms", "exit_version_ms", "abs_le", 40,
               "", ("pyslirp",)),
          Goal("Issue 15: pyslirp --help, exec to exit <= 40 ms", "exit_help_ms", "abs_le", 40,
               "", ("pyslirp",))]
    for fs in FOOTPRINT_FLAGS:
        g.append(Goal(f"Issue 15, shared: {STARTUP_FLAGS[fs]}, private memory per namespace "
                      "<= 3 MB (20 running; 4 with --quick)", f"fp_{fs}_private_per_ns_mb",
                      "abs_le", 3.0, "", ("pyslirp-shared",)))
    for fs, words in STARTUP_FLAGS.items():
        g.append(Goal(f"Issue 15, shared: {words}, exec to ready <= 40 ms",
                      f"start_{fs}_ready_ms", "abs_le", 40, "", ("pyslirp-shared",)))
    return g


def _py_sources(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.py")}


def _installed_package(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/python*/site-packages/pyslirp"))
    return found[0] if found else None


def installed_pyslirp(venv: Path) -> tuple[list[str] | None, str]:
    """(``VENV/bin/python -I -m pyslirp``, what was done) for pyslirp installed from this
    checkout with ``pip install .`` into ``venv``: created if missing, reinstalled if its
    sources differ from the checkout's, so the figures are those of the code checked out.
    (None, why) when that cannot be done. ``-I``: what ``pyslirp shim install`` runs."""
    checkout = HERE.parent
    package = _installed_package(venv)
    if package is not None and _py_sources(package) == _py_sources(checkout / "pyslirp"):
        return [str(venv / "bin" / "python"), "-I", "-m", "pyslirp"], f"{venv}: up to date"
    steps = [] if (venv / "bin" / "python").exists() else [[sys.executable, "-m", "venv",
                                                           str(venv)]]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    # A reinstall leaves uvloop (installed the first time) as it is.
    steps.append(pip + (["--no-deps", "--force-reinstall"] if package else []) + [str(checkout)])
    for cmd in steps:
        cp = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout)
        if cp.returncode != 0:
            return None, f"{' '.join(cmd)} failed: {cp.stderr.strip()[-300:]}"
    done = "reinstalled" if package else "created"
    return [str(venv / "bin" / "python"), "-I", "-m", "pyslirp"], f"{venv}: {done}"


def _pasta_argv(exe: str) -> startup.ArgvFor:
    """pasta for one target: --config-net (the counterpart of -c), no port forwarding (the
    default scans and forwards every bound port), the TAP named tap0, and a PID file:
    pasta forks into the background "once initialisation is done" (man pasta, -P), so
    the started process's exit is its ready signal. As root it needs --runas 0."""
    def build(pid: int, _ready_w: int, _exit_r: int, _api: str, pidfile: str) -> list[str]:
        return [exe, "--runas", "0", "--config-net", "-I", TAP, "-t", "none", "-u", "none",
                "-T", "none", "-U", "none", "-q", "-P", pidfile, str(pid)]
    return build


@dataclass(frozen=True)
class Launch:
    """How one stack is started for bench/startup.py."""
    argv_for: startup.ArgvFor
    shared: bool = False
    ready_on_exit: bool = False


def _launches(cfg: RunConfig, stacks: list[str], flagset: str) -> dict[str, Launch]:
    out = {}
    for name in stacks:
        if name in ("pyslirp", "pyslirp-shared") and cfg.pyslirp_cmd:
            out[name] = Launch(startup.slirp_argv(cfg.pyslirp_cmd, flagset),
                               shared=name == "pyslirp-shared")
        elif name == "slirp4netns" and (exe := _find(name)):
            out[name] = Launch(startup.slirp_argv([exe], flagset))
        elif name == "pasta" and flagset in PASTA_FLAGS and (exe := _find(name)):
            out[name] = Launch(_pasta_argv(exe), ready_on_exit=True)
    return out


#: stack -> metric -> samples
Samples = dict[str, dict[str, list[float]]]
#: What a start-up or footprint workload gives: its samples and, per stack, what failed.
Measured = tuple[Samples, dict[str, list[str]]]


def _in_private_mounts(work: Callable[[], Measured]) -> Measured:
    """``work()`` run in a forked child in a private mount namespace (see above); what it
    measured comes back as JSON. An exception in the child becomes WorkloadFailed here."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(rfd)
        try:
            startup.private_mount_namespace()
            samples, notes = work()
            answer: dict[str, Any] = {"samples": samples, "notes": notes}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which goes on
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(wfd, "w") as f:
            json.dump(answer, f)
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        raw = f.read()
    os.waitpid(pid, 0)
    answer = json.loads(raw) if raw else {"error": "the measuring child died"}
    if "error" in answer:
        raise WorkloadFailed(answer["error"])
    return answer["samples"], answer["notes"]


def _startup_samples(cfg: RunConfig, launches: dict[str, Launch], flagset: str
                     ) -> Measured:
    """cfg.startup_runs starts per stack, interleaved (A B C A B C ...), one flag set. The
    shared engine is started by one start before (timed as the cold start, with -c -r)
    and stays warm for the measured ones. A stack whose start fails is left out of the
    rest (the others go on)."""
    out: Samples = {name: {} for name in launches}
    failed: dict[str, list[str]] = {}
    left = dict(launches)

    def attempt(name: str, launch: Launch, tmp: str) -> tuple[float, float, float] | None:
        try:
            return startup.one_start([], flagset, True, tmp,
                                     startup.shared_env(tmp) if launch.shared else None,
                                     argv_for=launch.argv_for,
                                     ready_on_exit=launch.ready_on_exit)
        except (RuntimeError, OSError) as exc:
            failed[name] = [f"start-up with {STARTUP_FLAGS[flagset]} failed: {exc}"]
            del left[name]
            return None

    with tempfile.TemporaryDirectory(prefix="pyslirp-bench-startup-") as tmp:
        try:
            for name, launch in list(left.items()):
                if launch.shared and (got := attempt(name, launch, tmp)) and flagset == "cr":
                    out[name]["start_cold_ready_ms"] = [got[1]]
            for _ in range(cfg.startup_runs):
                for name, launch in list(left.items()):
                    if (got := attempt(name, launch, tmp)) is None:
                        continue
                    for key, value in zip(("tap", "ready", "cpu"), got, strict=True):
                        out[name].setdefault(f"start_{flagset}_{key}_ms", []).append(value)
        finally:
            startup.stop_engine(tmp)
    return out, failed


def _footprint_samples(cfg: RunConfig, name: str, launch: Launch, flagset: str
                       ) -> Measured:
    """The memory of every process cfg.footprint_count running namespaces leave."""
    mb = 1024 / 1e6   # kB -> MB (10^6 bytes), as rss_mb
    with tempfile.TemporaryDirectory(prefix="pyslirp-bench-footprint-") as tmp:
        try:
            got = startup.footprint([], cfg.footprint_count, flagset,
                                    startup.shared_env(tmp) if launch.shared else None, tmp,
                                    argv_for=launch.argv_for,
                                    ready_on_exit=launch.ready_on_exit, userns=True)
        except (RuntimeError, OSError) as exc:
            return {}, {name: [f"memory of {cfg.footprint_count} namespaces with "
                               f"{STARTUP_FLAGS[flagset]} failed: {exc}"]}
        finally:
            if launch.shared:
                startup.stop_engine(tmp)
    out = {f"fp_{flagset}_private_per_ns_mb": got["private"] * mb / cfg.footprint_count,
           f"fp_{flagset}_private_mb": got["private"] * mb, f"fp_{flagset}_pss_mb":
           got["pss"] * mb, f"fp_{flagset}_rss_mb": got["rss"] * mb,
           f"fp_{flagset}_processes": float(got["processes"])}
    if "engine_private" in got:
        out[f"fp_{flagset}_engine_mb"] = got["engine_private"] * mb
    return {name: {k: [v] for k, v in out.items()}}, {}


def _exit_times(cfg: RunConfig, stacks: list[str]) -> Measured:
    """-v and --help, exec to exit (cfg.startup_runs each), and pyslirp's interpreter doing
    nothing (the floor under any Python start-up)."""
    commands: dict[str, dict[str, list[str]]] = {}
    if "pyslirp" in stacks and cfg.pyslirp_cmd:
        python = cfg.pyslirp_cmd[:2]   # VENV/bin/python -I
        commands["pyslirp"] = {"exit_version_ms": cfg.pyslirp_cmd + ["-v"],
                               "exit_help_ms": cfg.pyslirp_cmd + ["--help"],
                               "exit_floor_ms": python + ["-c", "pass"]}
    for name in ("slirp4netns", "pasta"):
        if name in stacks and (exe := _find(name)):
            # pasta's --help exits 1: only its --version is timed.
            commands[name] = {"exit_version_ms": [exe, "--version"]}
            if name == "slirp4netns":
                commands[name]["exit_help_ms"] = [exe, "--help"]
    out: Samples = {}
    failed: dict[str, list[str]] = {}
    for _ in range(cfg.startup_runs):
        for name, per_key in commands.items():
            for key, argv in list(per_key.items()):
                try:
                    out.setdefault(name, {}).setdefault(key, []).append(
                        startup.time_exit(argv))
                except (subprocess.CalledProcessError, OSError) as exc:
                    failed.setdefault(name, []).append(f"{' '.join(argv)}: {exc}")
                    del per_key[key]
    return out, failed


def machine_workloads(cfg: RunConfig, stacks: list[str]
                      ) -> list[tuple[str, Callable[[], Measured]]]:
    """(label, work) for the start-up and footprint workloads selected, in order."""
    picked = [s for s in stacks if {"startup", "footprint"} & set(ONLY_WORKLOADS.get(
        s, WORKLOAD_KINDS))]
    out: list[tuple[str, Callable[[], Measured]]] = []
    if "startup" in cfg.only:
        for fs, words in STARTUP_FLAGS.items():
            launches = _launches(cfg, picked, fs)
            if launches:
                out.append((f"start-up, {words}, {cfg.startup_runs} starts per stack",
                            functools.partial(_in_private_mounts, functools.partial(
                                _startup_samples, cfg, launches, fs))))
        out.append(("-v and --help, exec to exit", lambda: _exit_times(cfg, picked)))
    if "footprint" in cfg.only:
        for fs in FOOTPRINT_FLAGS:
            for name, launch in _launches(cfg, picked, fs).items():
                out.append((f"memory of {cfg.footprint_count} namespaces, {name}, "
                            f"{STARTUP_FLAGS[fs]}",
                            functools.partial(_in_private_mounts, functools.partial(
                                _footprint_samples, cfg, name, launch, fs))))
    return out


# ---------------------------------------------------------------- progress

class Progress:
    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()

    def show(self, text: str) -> None:
        elapsed = time.monotonic() - self.t0
        line = f"[{self.done + 1:3d}/{self.total}] {elapsed:5.0f}s  {text}"
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            sys.stderr.write("\r\033[K" + line[:width])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        sys.stderr.write(("\r\033[K" if self.tty else "") + text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


# ---------------------------------------------------------------- run

@dataclass
class Results:
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def add(self, stack: str, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.samples.setdefault(stack, {}).setdefault(k, []).append(float(v))

    def note(self, stack: str, text: str) -> None:
        notes = self.notes.setdefault(stack, [])
        if text not in notes:
            notes.append(text)

    def medians(self) -> dict[str, dict[str, float]]:
        med = {s: {k: statistics.median(v) for k, v in m.items() if v}
               for s, m in self.samples.items()}
        ref = med.get(REFERENCE, {})
        for stack, values in med.items():
            if stack == REFERENCE:
                continue
            for key, value in list(values.items()):
                # tcp_{up,down}_p1_mtuM -> its share of the loopback figure
                parts = key.split("_")
                if len(parts) == 4 and parts[0] == "tcp" and parts[2] == "p1":
                    base = ref.get(f"{REFERENCE}_{parts[1]}_p1")
                    if base:
                        values[f"{key}_pct_loopback"] = 100 * value / base
        return med


def run_benchmark(cfg: RunConfig) -> Results:
    res = Results()
    stacks = list(cfg.stacks)
    for name in list(stacks):
        if _stack_exe(name) is None:
            res.note(name, f"skipped: {name} is not installed")
            stacks.remove(name)
    # --only may leave nothing to run at an MTU (or for a stack): those are skipped.
    plans = {mtu: per_stack for mtu in cfg.mtus
             if (per_stack := {name: steps for name in stacks
                               if (steps := plan(cfg, mtu, name))})}
    with_reference = "bulk" in cfg.only and cfg.misc_mtu in plans
    total = sum((1 + len(steps)) * cfg.rounds
                for per_stack in plans.values() for steps in per_stack.values())
    total += cfg.rounds if with_reference else 0
    machine = machine_workloads(cfg, stacks)
    if machine and cfg.pyslirp_install:
        for name in ("pyslirp", "pyslirp-shared"):
            if name in stacks:
                res.note(name, f"start-up and memory: {cfg.pyslirp_install}")
    total += len(machine)
    prog = Progress(total)
    for name in cfg.stacks:
        for n in res.notes.get(name, []):
            prog.note(f"{name}: {n}")
    dead: set[str] = set()
    for mtu, per_stack in plans.items():
        for rnd in range(cfg.rounds):
            if with_reference and mtu == cfg.misc_mtu:
                prog.show(f"round {rnd + 1}/{cfg.rounds}: iperf3 over plain loopback (no stack)")
                try:
                    res.add(REFERENCE, loopback_reference(cfg))
                except WorkloadFailed as exc:
                    res.note(REFERENCE, f"plain-loopback reference failed: {exc}")
                prog.done += 1
            names = list(per_stack)
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                steps = per_stack[name]
                where = f"MTU {mtu} round {rnd + 1}/{cfg.rounds} {name}"
                if name in dead:
                    prog.done += 1 + len(steps)
                    continue
                prog.show(f"{where}: starting")
                ns = Namespace()
                stack = None
                try:
                    try:
                        stack = start_stack(name, ns, mtu, cfg)
                    except StackUnavailable as exc:
                        res.note(name, f"skipped: {exc}")
                        dead.add(name)
                        prog.done += 1 + len(steps)
                        continue
                    except StackFailed as exc:
                        msg = f"failed to start (MTU {mtu}, round {rnd + 1}): {exc}"
                        res.note(name, msg)
                        prog.note(f"{name}: {msg}")
                        if name not in res.samples:
                            dead.add(name)   # never worked in this run: stop retrying
                            res.note(name, "skipped for the rest of the run")
                        prog.done += 1 + len(steps)
                        continue
                    prog.done += 1
                    for i, step in enumerate(steps):
                        prog.show(f"{where}: {step.label}")
                        try:
                            res.add(name, step.fn(cfg, ns, stack))
                        except WorkloadFailed as exc:
                            msg = f"{step.label} at MTU {mtu} failed: {exc}"
                            res.note(name, msg)
                            prog.note(f"{name}: {msg}")
                        if stack.proc.poll() is not None:
                            msg = (f"exited (status {stack.proc.returncode}) during "
                                   f"{step.label} at MTU {mtu}; log: {stack.tail()}")
                            res.note(name, msg)
                            prog.note(f"{name}: {msg}")
                            prog.done += len(steps) - i
                            break
                        prog.done += 1
                finally:
                    if stack is not None:
                        _stop(stack.proc)
                    ns.close()
    for label, work in machine:
        prog.show(label)
        try:
            samples, failed = work()
            for name, values in samples.items():
                for key, figures in values.items():
                    for v in figures:
                        res.add(name, {key: v})
            for name, texts in failed.items():
                for text in texts:
                    res.note(name, text)
                    prog.note(f"{name}: {text}")
        except WorkloadFailed as exc:
            res.note(stacks[0], f"{label} failed: {exc}")
            prog.note(f"{label} failed: {exc}")
        prog.done += 1
    prog.finish()
    return res


# ---------------------------------------------------------------- reports

def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"   # no such figure for that stack (not measured, or it has none)
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table_rows(cfg: RunConfig, med: dict[str, dict[str, float]], stacks: list[str]
               ) -> tuple[list[str], list[list[str]]]:
    others = [s for s in stacks if s != BASELINE]
    # The kernel alone gets a column of its own, filled only on its reference rows.
    ref = [REFERENCE] if REFERENCE in med else []
    header = (["workload", "unit", *stacks] + [f"{r} (no stack)" for r in ref]
              + [f"{s}/{BASELINE}" for s in others])
    rows = []
    for m in all_metrics(cfg):
        if not any(m.key in med.get(s, {}) for s in [*stacks, *ref]):
            continue
        row = [m.label, m.unit]
        row += [_fmt(med.get(s, {}).get(m.key)) for s in [*stacks, *ref]]
        base = med.get(BASELINE, {}).get(m.key)
        for s in others:
            v = med.get(s, {}).get(m.key)
            row.append(f"{v / base:.2f}x" if v is not None and base else "-")
        rows.append(row)
    return header, rows


def all_metrics(cfg: RunConfig) -> list[Metric]:
    return (_bulk_metrics(cfg.mtus) + _cpu_metrics(cfg.mtus) + _loopback_metrics(cfg.mtus)
            + MISC_METRICS + _ipv6_metrics(cfg.mtus) + startup_metrics(cfg))


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def md_table(header: list[str], rows: list[list[str]], left: int = 2) -> str:
    align = ["---"] * left + ["---:"] * (len(header) - left)
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def goal_rows(cfg: RunConfig, med: dict[str, dict[str, float]], stacks: list[str]
              ) -> tuple[list[str], list[list[str]]]:
    cands = [s for s in stacks if s != BASELINE]
    header = ["goal (issue 5 unless named)", *cands]
    rows = []
    for g in goals_for(cfg.mtus, cfg.misc_mtu):
        if not any(g.metric in values for values in med.values()):
            continue   # a workload not run (--only): no row of n/a's
        row = [g.text]
        for s in cands:
            verdict, detail = evaluate_goal(g, med, s)
            row.append(f"{verdict} ({detail})")
        rows.append(row)
    return header, rows


def chart(cfg: RunConfig, med: dict[str, dict[str, float]], stacks: list[str],
          path: Path) -> str | None:
    """Grouped bars per workload: each stack's advantage over slirp4netns (1.0)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed in this interpreter: no chart (see bench/README.md)"
    if BASELINE not in med:
        return "no slirp4netns figures: no ratio chart"
    metrics = [m for m in all_metrics(cfg) if m.chart and m.key in med[BASELINE]
               and med[BASELINE][m.key] > 0]
    if not metrics:
        return "nothing to chart"
    shown = [s for s in stacks if s in med]
    fig, ax = plt.subplots(figsize=(max(10, 0.75 * len(metrics) + 3), 6.5))
    width = 0.8 / len(shown)
    colors = {"pyslirp": "#2a9d8f", "pyslirp-nopoll": "#94d2bd", "pyslirp-shared": "#264653",
              "slirp4netns": "#8d99ae",
              "pasta": "#e9c46a"}
    for i, s in enumerate(shown):
        xs, ys = [], []
        for j, m in enumerate(metrics):
            v = med[s].get(m.key)
            if v is None or v <= 0:
                continue
            ratio = v / med[BASELINE][m.key]
            xs.append(j + (i - (len(shown) - 1) / 2) * width)
            ys.append(ratio if m.better == "higher" else 1 / ratio)
        bars = ax.bar(xs, ys, width, label=s, color=colors.get(s))
        if s != BASELINE:
            labels = [f"{y:.0f}" if y >= 10 else f"{y:.2g}" for y in ys]
            ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([m.label for m in metrics], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("advantage over slirp4netns (x, log scale; >1 is better)")
    ax.set_title(" vs ".join(shown) + ", medians of "
                 f"{cfg.rounds} interleaved round{'s' if cfg.rounds > 1 else ''}\n"
                 "throughput: ratio; latency, CPU/GB, memory: inverse ratio", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def environment(load_at_start: str) -> dict[str, str]:
    commit = _version(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(HERE.parent), "status", "--porcelain", "--",
                      "pyslirp"])
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "pyslirp": f"git {commit}" + (" + uncommitted changes" if dirty.strip() and
                                      dirty not in ("unknown", "not installed") else ""),
        "slirp4netns": _version(["slirp4netns", "--version"]).split()[-1],
        "pasta": _version(["dpkg-query", "-W", "-f", "${Version}", "passt"]),
        "iperf3": _version(["iperf3", "--version"]).replace("iperf ", "", 1),
        # Other work on the machine skews a run: say how busy it was.
        "load average at start / end": f"{load_at_start} / {_loadavg()}",
    }


def report(cfg: RunConfig, res: Results, load_at_start: str) -> str:
    med = res.medians()
    stacks = [s for s in cfg.stacks if s in med]
    env = environment(load_at_start)
    header, rows = table_rows(cfg, med, stacks)
    # Goals for every stack asked for, measured or not ("n/a" says it was not).
    gheader, grows = goal_rows(cfg, med, list(cfg.stacks))
    cfg.out.mkdir(parents=True, exist_ok=True)
    chart_note = chart(cfg, med, stacks, cfg.out / "chart.png")

    settings = (f"{cfg.rounds} round{'s' if cfg.rounds > 1 else ''} (medians), "
                f"{cfg.duration} s per iperf3 run, UDP: {UDP_PROBES} x {UDP_PROBE_SECONDS} s "
                f"probes per direction ({UDP_MIN_MBPS:g}-{UDP_MAX_MBPS:g} Mbit/s, 1400 B, "
                f"iperf3 -w {UDP_SOCKET_BUFFER}, a probe over the limit tried "
                f"{UDP_PROBE_TRIES} times), "
                f"{cfg.rtt_count} round trips, {cfg.paced_count} paced ones, "
                f"{cfg.nagle_count} Nagle exchanges, "
                f"{cfg.conn_count} connections, "
                f"{cfg.dns_count} DNS queries (window {cfg.dns_window}), "
                f"{cfg.idle_count} idle connections; non-bulk workloads at MTU {cfg.misc_mtu}"
                + ("; --quick" if cfg.quick else ""))
    env_line = ", ".join(f"{k} {v}" for k, v in env.items())
    notes = [f"{s}: {n}" for s in [*cfg.stacks, REFERENCE] for n in res.notes.get(s, [])]
    if chart_note:
        notes.append(chart_note)

    md = [f"Run {env['date']}: {settings}.", "", f"Environment: {env_line}.", "",
          md_table(header, rows), ""]
    if grows:
        md += [md_table(gheader, grows, left=len(gheader)), ""]
    if notes:
        md += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    if chart_note is None:
        md += ["![benchmark chart](chart.png)", ""]
    (cfg.out / "results.md").write_text("\n".join(md))

    (cfg.out / "results.json").write_text(json.dumps({
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in vars(cfg).items() if k not in ("workdir", "resolv_conf")},
        "metrics": {m.key: {"label": m.label, "unit": m.unit, "better": m.better}
                    for m in all_metrics(cfg)},
        "samples": res.samples,
        "medians": med,
        "goals": [{"goal": g.text, "metric": g.metric,
                   **{s: dict(zip(("verdict", "detail"), evaluate_goal(g, med, s),
                                  strict=True))
                      for s in cfg.stacks if s != BASELINE}}
                  for g in goals_for(cfg.mtus, cfg.misc_mtu)],
        "notes": res.notes,
    }, indent=2) + "\n")

    txt = [f"{settings}", f"{env_line}", "", text_table(header, rows), ""]
    if grows:
        txt += [text_table(gheader, grows), ""]
    if notes:
        txt += ["Notes:", *[f"  {n}" for n in notes], ""]
    txt.append(f"Wrote {cfg.out / 'results.json'}, {cfg.out / 'results.md'}"
               + ("" if chart_note else f", {cfg.out / 'chart.png'}"))
    return "\n".join(txt)


# ---------------------------------------------------------------- main

def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark pyslirp, slirp4netns and pasta side by side (issue 5).")
    p.add_argument("--quick", action="store_true",
                   help="short smoke run: 1 round, 1 s iperf3 runs, small counts")
    p.add_argument("--stacks", default=",".join(STACKS),
                   help="comma-separated, from: " + ", ".join(STACKS))
    p.add_argument("--out", type=Path, default=HERE / "results",
                   help="directory for results.json, results.md, chart.png")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--duration", type=int, help="seconds per iperf3 run (default 5; quick 1)")
    p.add_argument("--mtus", default="1500,65520", help="comma-separated MTUs")
    p.add_argument("--base-port", type=int, default=15400,
                   help="first of 5 TCP ports used on 127.0.0.1 (default 15400)")
    p.add_argument("--only", default=",".join(WORKLOAD_KINDS),
                   help="comma-separated workloads to run, from: " + ", ".join(WORKLOAD_KINDS)
                   + " (default all)")
    p.add_argument("--installed-venv", type=Path, default=INSTALLED_VENV,
                   help="venv holding pyslirp installed from this checkout (pip install ., "
                   "made or refreshed as needed) for the startup and footprint workloads "
                   f"(default {INSTALLED_VENV})")
    p.add_argument("--no-isolate", action="store_true",
                   help="run in the machine's own network namespace instead of a private one")
    return p.parse_args(argv)


ISOLATED_ENV = "PYSLIRP_BENCH_ISOLATED"


def _run_isolated(argv: list[str]) -> int:
    """Run this script again in a private network namespace and return its status.

    Its "host" is then a namespace of our own: loopback plus a veth pair whose far
    end leads nowhere (pasta needs an interface with a default route to copy its
    template from).  Whatever a stack might try to send beyond loopback cannot
    leave the machine.  The kernel paths measured are the same as in the
    machine's own namespace.
    """
    env = dict(os.environ, **{ISOLATED_ENV: "1"})
    child = subprocess.Popen(["unshare", "--net", "--", sys.executable, str(Path(__file__)),
                              *argv], env=env)
    # Ctrl-C reaches the child through the terminal; SIGTERM is passed on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    return child.wait()


def _setup_isolated_host() -> str | None:
    """Inside the private namespace: bring up lo and a dead-end default route."""
    cmds = [["ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", "bench0", "type", "veth", "peer", "name", "bench0p"],
            ["ip", "link", "set", "bench0p", "up"],
            ["ip", "link", "set", "bench0", "up"],
            ["ip", "addr", "add", "192.0.2.2/24", "dev", "bench0"],
            ["ip", "route", "add", "default", "via", "192.0.2.1"],
            # pasta's IPv6 template (no DAD: usable at once).
            ["ip", "-6", "addr", "add", TEMPLATE6, "dev", "bench0", "nodad"],
            ["ip", "-6", "route", "add", "default", "via", GATEWAY6]]
    for i, cmd in enumerate(cmds):
        cp = subprocess.run(cmd, capture_output=True, text=True)
        if cp.returncode != 0:
            if i == 0:
                return f"cannot bring up loopback: {cp.stderr.strip()}"
            return (f"no template interface for pasta ({' '.join(cmd)}: "
                    f"{cp.stderr.strip()}); pasta may fail to start")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if os.geteuid() != 0:
        print("bench/run.py: run as root (it creates namespaces and TAP devices)",
              file=sys.stderr)
        return 2
    missing = [t for t in ("iperf3", "unshare", "nsenter", "ip") if shutil.which(t) is None]
    if missing:
        print(f"bench/run.py: missing {', '.join(missing)}; see bench/README.md (setup)",
              file=sys.stderr)
        return 2
    isolated = os.environ.get(ISOLATED_ENV) == "1"
    only = tuple(w.strip() for w in args.only.split(",") if w.strip())
    wants_installed = ({"startup", "footprint"} & set(only)
                       and {"pyslirp", "pyslirp-shared"} & set(args.stacks.split(",")))
    if wants_installed and not isolated:
        # Here, not in the isolated namespace: pip may need its index.
        print(f"bench/run.py: {installed_pyslirp(args.installed_venv)[1]}", file=sys.stderr)
    if not args.no_isolate and not isolated:
        return _run_isolated(argv)
    if isolated:
        problem = _setup_isolated_host()
        if problem and problem.startswith("cannot"):
            print(f"bench/run.py: {problem}", file=sys.stderr)
            return 1
        if problem:
            print(f"bench/run.py: {problem}", file=sys.stderr)
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    unknown = [s for s in stacks if s not in STACKS]
    if unknown:
        print(f"bench/run.py: unknown stack(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    unknown = [w for w in only if w not in WORKLOAD_KINDS]
    if unknown or not only:
        print(f"bench/run.py: --only: unknown workload(s) {', '.join(unknown) or '(none given)'}"
              f"; choose from {', '.join(WORKLOAD_KINDS)}", file=sys.stderr)
        return 2
    quick = args.quick
    cfg = RunConfig(
        quick=quick,
        rounds=args.rounds or (1 if quick else 3),
        duration=args.duration or (1 if quick else 5),
        mtus=[int(m) for m in args.mtus.split(",")],
        stacks=stacks,
        out=args.out,
        python=sys.executable,
        workdir=Path(tempfile.mkdtemp(prefix="pyslirp-bench-")),
        base_port=args.base_port,
        rtt_count=2000 if quick else 20000,
        nagle_count=200 if quick else 2000,
        paced_count=300 if quick else 3000,
        conn_count=300 if quick else 3000,
        dns_count=2000 if quick else 20000,
        dns_window=8,
        idle_count=1000,
        only=only,
        startup_runs=3 if quick else 11,
        footprint_count=4 if quick else 20,
    )
    if wants_installed:
        cmd, cfg.pyslirp_install = installed_pyslirp(args.installed_venv)
        cfg.pyslirp_cmd = cmd or []
        if cmd:
            cfg.pyslirp_install = f"pyslirp run as {' '.join(cmd)} ({cfg.pyslirp_install})"
    # 1,000 connections through a stack need 2,000+ descriptors in the stack and the
    # servers; children inherit this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 16384:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    # Ctrl-C / SIGTERM: unwind through the finally blocks that remove namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    cfg.resolv_conf = cfg.workdir / "resolv.conf"
    cfg.resolv_conf.write_text(f"nameserver {cfg.dns_addr}\n")
    server = server6 = None
    try:
        if cfg.ipv6:
            server6 = _spawn([sys.executable, str(NETLOAD), "serve", "--bind", "::1",
                              "--rtt-port", str(cfg.rtt_port),
                              "--accept-port", str(cfg.accept_port)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert server6.stdout is not None
            if not server6.stdout.readline():
                print("bench/run.py: the test servers on ::1 did not start", file=sys.stderr)
                return 1
        server = _spawn([sys.executable, str(NETLOAD), "serve", "--bind", "127.0.0.1",
                         "--rtt-port", str(cfg.rtt_port), "--accept-port", str(cfg.accept_port),
                         "--hold-port", str(cfg.hold_port), "--nagle-port", str(cfg.nagle_port),
                         "--dns", f"{cfg.dns_addr}:53"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            print("bench/run.py: the loopback test servers did not start (ports "
                  f"{cfg.rtt_port}-{cfg.nagle_port} in use? try --base-port)", file=sys.stderr)
            return 1
        hello = json.loads(line)
        if hello.get("dns_error"):
            cfg.dns_ok = False
            print(f"bench/run.py: {hello['dns_error']}: DNS workload skipped", file=sys.stderr)
        load_at_start = _loadavg()
        res = run_benchmark(cfg)
    except KeyboardInterrupt:
        print("\nbench/run.py: interrupted; namespaces and processes removed", file=sys.stderr)
        return 130
    finally:
        _stop_all()
        for srv in (server, server6):
            if srv is not None:
                _stop(srv)
        shutil.rmtree(cfg.workdir, ignore_errors=True)
    print(report(cfg, res, load_at_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
