"""Regenerate the fuzzers' seed corpus (tests/fuzz/seeds/*.pcap) from real traffic.

Run as root: ``scripts/fuzz --make-seeds`` (or ``python -m tests.fuzz.capture``).

Each flow below runs ``pyslirp run --pcap=seeds/FLOW.pcap -- bash -c SCRIPT`` inside a
throwaway "host" namespace (only ``lo``) where ``tests/e2e/servers.py`` serves HTTP,
echo and DNS on loopback, so the guest's clients (udhcpc, dig, curl, ping, python)
talk to nothing but those servers: the same shape as the e2e tests. The pcaps hold
the link's frames without their virtio-net header; :mod:`tests.fuzz.seeds` turns them
into per-target seeds (and the stack target's programs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.e2e import servers
from tests.nsutil import NetNS, netns_capable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SEEDS = HERE / "seeds"
#: A small payload keeps the pcaps small (the HTTP flow fetches it once).
PAYLOAD_SIZE = 6000

# The guest scripts: every client is bounded by its own timeout, and a failing client
# must not stop the capture of the others (``|| true``).
_UDP_ECHO = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
             "s.settimeout(2); n=int(sys.argv[2]); s.sendto(b'x'*n,('10.0.2.2',int(sys.argv[1]))); "
             "s.recvfrom(70000)")
FLOWS: dict[str, str] = {
    "dhcp": "udhcpc -i tap0 -n -q -f -t 3 -T 1 -s /bin/true || true",
    "dns": ("dig +tries=1 +time=2 @10.0.2.3 test.pyslirp A || true; "
            "dig +tries=1 +time=2 @10.0.2.3 nothing.pyslirp AAAA || true; "
            "dig +tries=1 +time=2 @10.0.2.3 example.invalid MX || true; "
            "dig +tcp +tries=1 +time=2 @10.0.2.3 www.test.pyslirp A || true"),
    "tcp": ("curl -s -m 5 http://10.0.2.2:{http}/hello || true; "
            "curl -s -m 5 -o /dev/null http://10.0.2.2:{http}/payload || true; "
            "curl -s -m 5 -d @/etc/services http://10.0.2.2:{http}/upload || true; "
            "curl -s -m 2 http://10.0.2.2:{dead}/ || true"),
    "udp": f"python3 -c \"{_UDP_ECHO}\" {{echo}} 64 || true",
    "icmp": "ping -c 2 -i 0.2 -W 1 10.0.2.2 || true",
    "frag": (f"python3 -c \"{_UDP_ECHO}\" {{echo}} 4000 || true; "
             "ping -c 1 -W 1 -s 3000 10.0.2.2 || true"),
}


def _start_servers(ns: NetNS, state: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    proc = ns.popen([sys.executable, str(Path(servers.__file__).resolve()), str(state),
                     "--size", str(PAYLOAD_SIZE)], stdout=subprocess.PIPE, text=True,
                    stdin=subprocess.DEVNULL, cwd=REPO)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    return proc, info


def capture(flows: list[str], state: Path) -> None:
    SEEDS.mkdir(exist_ok=True)
    with NetNS("fuzzseeds") as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        # pyslirp relays ICMP echo through unprivileged ping sockets.
        ns.run(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
        _proc, info = _start_servers(ns, state)
        for name in flows:
            pcap = SEEDS / f"{name}.pcap"
            script = FLOWS[name].format(**info)
            ns.run([sys.executable, "-m", "pyslirp", "run", f"--pcap={pcap}",
                    f"--dns-upstream=127.0.0.1:{info['dns']}", "--", "bash", "-c", script],
                   timeout=60)
            print(f"{pcap.relative_to(REPO)}: {pcap.stat().st_size} bytes")


def main(argv: list[str] | None = None) -> int:
    reason = netns_capable()
    if reason:
        print(f"capture: {reason}", file=sys.stderr)
        return 1
    flows = (argv if argv is not None else sys.argv[1:]) or list(FLOWS)
    unknown = [f for f in flows if f not in FLOWS]
    if unknown:
        print(f"capture: unknown flow(s) {unknown}; known: {list(FLOWS)}", file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pyslirp-fuzzseeds-") as tmp:
        capture(flows, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
