#!/usr/bin/env python3
"""Per-container cost of the ``slirp`` CNI plugin (issue 3): ADD latency and engine memory.

Theory of operation
-------------------
The plugin is installed into a temporary plugin directory (``pyslirp cni
install``) and driven the way libcni drives it (environment + config on
stdin), with a private runtime directory, so this never touches a real
``/run/pyslirp``. N network namespaces are created (``ip netns add``) and
removed at the end, also on errors and Ctrl-C.

1. **cold ADD**: the first ADD starts the engine; reported, not judged.
2. **warm ADD**: ADD into each of the other namespaces one after another,
   each timed from the runtime's point of view (process spawn to exit);
   reported as p50/p90 over the ADDs. Goal: p50 <= 50 ms.
3. **memory**: the engine's resident set (VmRSS, and PSS from
   ``/proc/PID/smaps_rollup``) with 1 and with N containers attached, after
   every container fetched a page from a loopback HTTP server through
   10.0.2.2 (so each stack has run a TCP flow). Marginal cost =
   (RSS(N) - RSS(1)) / (N - 1). Goal: <= 3 MB with N = 50.
4. DEL of everything; the engine must exit.

Traffic goes only to 127.0.0.1 (the HTTP server this script starts) and to
the namespaces it made. Needs root, iproute2 and curl.

Usage: ``sudo /path/to/venv/bin/python bench/bench_cni.py [--containers 50] [--json FILE]``
(``PYSLIRP_BENCH_KEEP_LOG=FILE`` keeps a copy of the engine's log, with per-request times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyslirp.cni import install, plugin  # noqa: E402

ADD_P50_GOAL_MS = 50.0
MARGINAL_RSS_GOAL_MB = 3.0


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def cni(plugin_dir: str, command: str, conf: dict[str, Any], env: dict[str, str],
        cid: str | None = None, netns: str | None = None) -> tuple[float, dict[str, Any] | None]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    e.update(env)
    e.update({"CNI_COMMAND": command, "CNI_PATH": plugin_dir, "CNI_IFNAME": "eth0"})
    if cid:
        e["CNI_CONTAINERID"] = cid
    if netns:
        e["CNI_NETNS"] = netns
    started = time.perf_counter()
    proc = subprocess.run([os.path.join(plugin_dir, "slirp")], input=json.dumps(conf).encode(),
                          capture_output=True, env=e, timeout=120)
    elapsed = time.perf_counter() - started
    doc = json.loads(proc.stdout) if proc.stdout.strip() else None
    if proc.returncode != 0:
        raise RuntimeError(f"{command} {cid} failed: {doc or proc.stderr.decode()}")
    return elapsed, doc


def engine_pid(rundir: str) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.path.join(rundir, "engine.sock"))
        s.sendall(b'{"op": "ping"}\n')
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(json.loads(data)["identity"]["pid"])


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) in KiB."""
    rss = pss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--containers", type=int, default=50)
    ap.add_argument("--json", help="write the figures to this file as JSON")
    opts = ap.parse_args()
    n = opts.containers
    if os.geteuid() != 0:
        print("bench_cni: needs root (network namespaces)", file=sys.stderr)
        return 1

    workdir = tempfile.mkdtemp(prefix="pyslirp-bcni-", dir="/tmp")
    plugin_dir = os.path.join(workdir, "bin")
    rundir = os.path.join(workdir, "run")
    install.install(plugin_dir)
    env = {"PYSLIRP_RUNDIR": rundir, "PYSLIRP_PYTHON": sys.executable}
    conf = {"cniVersion": "1.1.0", "name": "bench", "type": "slirp"}
    names = [f"pyslirp-bcni-{os.getpid()}-{i}" for i in range(n)]
    made: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)

        def fetch(name: str) -> None:
            subprocess.run(["ip", "netns", "exec", name, "curl", "-sSf", "-m", "10", "-o",
                            "/dev/null", f"http://10.0.2.2:{port}/"], check=True)

        cold, _ = cni(plugin_dir, "ADD", conf, env, "c0", f"/run/netns/{names[0]}")
        fetch(names[0])
        pid = engine_pid(rundir)
        time.sleep(0.5)
        rss1, pss1 = memory_kb(pid)
        warm = []
        for i, name in enumerate(names[1:], 1):
            t, _ = cni(plugin_dir, "ADD", conf, env, f"c{i}", f"/run/netns/{name}")
            warm.append(t)
        for name in names[1:]:
            fetch(name)
        time.sleep(0.5)
        rssn, pssn = memory_kb(pid)
        dels = []
        for i, name in enumerate(names):
            t, _ = cni(plugin_dir, "DEL", conf, env, f"c{i}", f"/run/netns/{name}")
            dels.append(t)
        deadline = time.monotonic() + 10
        while plugin.process_start_time(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        exited = plugin.process_start_time(pid) is None  # gone, or a zombie
    finally:
        server.shutdown()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)
        if os.environ.get("PYSLIRP_BENCH_KEEP_LOG"):
            shutil.copy(os.path.join(rundir, "engine.log"), os.environ["PYSLIRP_BENCH_KEEP_LOG"])
        shutil.rmtree(workdir, ignore_errors=True)

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    p50 = statistics.median(warm) * 1000
    marginal_rss = (rssn - rss1) / (n - 1) / 1024
    marginal_pss = (pssn - pss1) / (n - 1) / 1024
    figures = {
        "containers": n, "cold_add_ms": cold * 1000, "warm_add_p50_ms": p50,
        "warm_add_p90_ms": pct(warm, 0.9), "del_p50_ms": statistics.median(dels) * 1000,
        "engine_rss_1_mb": rss1 / 1024, "engine_rss_n_mb": rssn / 1024,
        "engine_pss_1_mb": pss1 / 1024, "engine_pss_n_mb": pssn / 1024,
        "marginal_rss_mb": marginal_rss, "marginal_pss_mb": marginal_pss,
        "engine_exited_after_last_del": exited,
    }
    print(f"containers attached           {n}")
    print(f"cold ADD (starts the engine)  {cold * 1000:7.1f} ms")
    print(f"warm ADD p50 / p90            {p50:7.1f} / {pct(warm, 0.9):.1f} ms   "
          f"goal <= {ADD_P50_GOAL_MS:.0f} ms: {'met' if p50 <= ADD_P50_GOAL_MS else 'NOT met'}")
    print(f"DEL p50                       {figures['del_p50_ms']:7.1f} ms")
    print(f"engine RSS with 1 / {n}        {rss1 / 1024:7.1f} / {rssn / 1024:.1f} MB "
          f"(PSS {pss1 / 1024:.1f} / {pssn / 1024:.1f} MB)")
    print(f"marginal RSS per container    {marginal_rss:7.2f} MB (PSS {marginal_pss:.2f})   "
          f"goal <= {MARGINAL_RSS_GOAL_MB:.0f} MB: "
          f"{'met' if marginal_rss <= MARGINAL_RSS_GOAL_MB else 'NOT met'}")
    print(f"engine exited after last DEL  {exited}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
