#!/usr/bin/env python3
"""Interleaved A/B pairs of pyslirp builds on one small-transaction workload.

Theory of operation
-------------------
Each build is a directory holding a ``pyslirp`` package (a ``git worktree`` of
an older commit, or a copy of ``pyslirp/``), started as ``python -m pyslirp``
with that directory first on ``PYTHONPATH`` and optional extra flags
(``NAME=DIR`` or ``NAME=DIR:--busy-poll=0``). For every pair the builds run
in turn (A B, then B A, ...), each in a fresh namespace started and checked
by bench/run.py's own functions, on the same workload bench/run.py runs
(``dns``, ``connect`` or ``rtt``), so the figures are those of the runner:
stack CPU per unit of work (utime+stime of the stack process), and also the
utime and stime apart. ``--with-s4n`` adds slirp4netns to each pair.
Medians are printed at the end; compare the builds pair by pair, since the
machine's load moves every figure.

Like bench/run.py it needs root and runs again inside a private network
namespace of its own (no packet leaves the machine).

Example (old commit against the work tree, 8 pairs of 40,000 DNS queries)::

    git worktree add --detach /tmp/ab-old main
    .venv/bin/python bench/ab.py --work dns --pairs 8 --count 40000 \\
        OLD=/tmp/ab-old NEW=$PWD
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import run  # bench/run.py (this script's directory is on sys.path)

WORKLOADS: dict[str, Callable[..., dict[str, float]]] = {
    "dns": run._dns, "connect": run._connections, "rtt": run._rtt}


def _times(pid: int) -> tuple[float, float]:
    """utime and stime of ``pid`` in seconds (children not included: none here)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _launchers(specs: list[str], workdir: Path) -> dict[str, str]:
    """A start script per ``NAME=DIR[:FLAGS]``: python -m pyslirp from DIR, with FLAGS."""
    out = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"bench/ab.py: build {spec!r} is not NAME=DIR[:FLAGS]")
        path, _, flags = rest.partition(":")
        if not (Path(path) / "pyslirp").is_dir():
            raise SystemExit(f"bench/ab.py: {path} holds no pyslirp package")
        script = workdir / f"start-{name}"
        script.write_text(f'#!/bin/sh\nPYTHONPATH={path} exec {sys.executable} -m pyslirp '
                          f'{flags} "$@"\n')
        script.chmod(0o755)
        out[name] = str(script)
    return out


def _one_run(name: str, cfg: run.RunConfig, work: Callable[..., dict[str, float]]
             ) -> dict[str, float]:
    ns = run.Namespace()
    stack = None
    try:
        stack = run.start_stack(name, ns, cfg.misc_mtu, cfg)
        u0, s0 = _times(stack.pid)
        result = work(cfg, ns, stack)
        u1, s1 = _times(stack.pid)
        result["utime_s"], result["stime_s"] = u1 - u0, s1 - s0
        return result
    finally:
        if stack is not None:
            run._stop(stack.proc)
        ns.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", choices=sorted(WORKLOADS), default="dns")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--count", type=int, default=0,
                    help="queries / connections / round trips per run (the runner's default)")
    ap.add_argument("--with-s4n", action="store_true", help="slirp4netns in every pair too")
    ap.add_argument("builds", nargs="+", help="NAME=DIR[:FLAGS]")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/ab.py: run as root (it creates namespaces and TAP devices)",
              file=sys.stderr)
        return 2
    if os.environ.get(run.ISOLATED_ENV) != "1":
        # As bench/run.py: again, in a private network namespace of our own.
        env = dict(os.environ, **{run.ISOLATED_ENV: "1"})
        return subprocess.call(["unshare", "--net", "--", sys.executable, __file__,
                                *sys.argv[1:]], env=env)
    problem = run._setup_isolated_host()
    if problem:
        print(f"bench/ab.py: {problem}", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="pyslirp-ab-"))
    launchers = _launchers(args.builds, workdir)
    stack_exe = run._stack_exe
    run._stack_exe = lambda n: launchers.get(n) or stack_exe(n)  # type: ignore[assignment]
    n = args.count
    cfg = run.RunConfig(quick=False, rounds=1, duration=5, mtus=[65520], stacks=[],
                        out=workdir, python=sys.executable, workdir=workdir,
                        base_port=15201, rtt_count=n or 20000, nagle_count=2000,
                        paced_count=3000, conn_count=n or 3000, dns_count=n or 20000,
                        dns_window=8, idle_count=1000, only=(args.work,))
    cfg.resolv_conf = workdir / "resolv.conf"
    cfg.resolv_conf.write_text(f"nameserver {cfg.dns_addr}\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    server = run._spawn([sys.executable, str(run.NETLOAD), "serve", "--bind", "127.0.0.1",
                         "--rtt-port", str(cfg.rtt_port), "--accept-port", str(cfg.accept_port),
                         "--hold-port", str(cfg.hold_port), "--nagle-port", str(cfg.nagle_port),
                         "--dns", f"{cfg.dns_addr}:53"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    names = list(launchers) + (["slirp4netns"] if args.with_s4n else [])
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        assert server.stdout is not None
        if not server.stdout.readline():
            print("bench/ab.py: the loopback test servers did not start", file=sys.stderr)
            return 1
        for pair in range(args.pairs):
            for name in names if pair % 2 == 0 else names[::-1]:
                result = _one_run(name, cfg, WORKLOADS[args.work])
                results[name].append(result)
                print(name, pair, json.dumps(result), flush=True)
    finally:
        run._stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    for name in names:
        keys = results[name][0].keys() if results[name] else ()
        print("median", name, {k: round(statistics.median(r[k] for r in results[name]), 2)
                               for k in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())
