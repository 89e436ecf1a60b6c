"""The long fuzz runs: coverage-guided (atheris/libFuzzer) runs of the targets.

Theory of operation
-------------------
``scripts/fuzz [--seconds N | --runs N] TARGET...`` fuzzes each TARGET (a wire
parser: vnet ethernet arp ipv4 icmp udp tcp dhcp dns; or ``stack``; or ``all``) in
turn, each in a child process of its own (libFuzzer exits when it is done), with
pyslirp's modules instrumented for coverage. The time is split evenly among the
targets.

The working corpus of TARGET lives in ``.fuzz/corpus/TARGET`` (created from the
captured seeds, see :mod:`tests.fuzz.seeds`, and kept between runs so a later run
starts where the last one stopped); crashing inputs are written to
``.fuzz/crashes/TARGET-crash-<sha1>``. ``scripts/fuzz --replay TARGET FILE...``
runs saved inputs without atheris and prints the traceback of each failure, which is
what a regression test needs.

A crash is any exception but :class:`~pyslirp.wire.errors.MalformedPacket` from a wire
target, and any exception at all from the stack target (including the contract and
invariant checks of :mod:`tests.fuzz.stackprog`); a hang is an input running longer
than ``--timeout`` seconds (libFuzzer's ``-timeout``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Corpora and crashes (PYSLIRP_FUZZ_WORK moves them, e.g. for the tests).
WORK = Path(os.environ.get("PYSLIRP_FUZZ_WORK", REPO / ".fuzz"))
WIRE = ("vnet", "ethernet", "arp", "ipv4", "icmp", "udp", "tcp", "dhcp", "dns")
TARGETS = (*WIRE, "stack")


def _load(name: str) -> tuple[Callable[[bytes], None], list[bytes]]:
    """The target's callable (raising only on a bug) and its seeds."""
    from tests.fuzz import stackprog, targets
    from tests.fuzz.seeds import wire_seeds

    if name == "stack":
        return stackprog.fuzz_stack, stackprog.stack_seeds()
    wire = targets.WIRE_TARGETS[name]
    return (lambda data: targets.run_target(wire, data)), list(wire_seeds(name))


def _write_seeds(corpus: Path, seeds: list[bytes]) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        path = corpus / f"seed-{hashlib.sha1(seed).hexdigest()}"
        if not path.exists():
            path.write_bytes(seed)


def _child(name: str, libfuzzer_args: list[str]) -> None:
    """Run inside the child: instrument pyslirp, then hand over to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["pyslirp", "tests.fuzz"]):
        target, seeds = _load(name)
    corpus = WORK / "corpus" / name
    _write_seeds(corpus, seeds)
    crashes = WORK / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    # Stack programs carry whole frames; a parser needs no more than a jumbo frame.
    max_len = 32768 if name == "stack" else 16384
    argv = [sys.argv[0], *libfuzzer_args, f"-max_len={max_len}",
            f"-artifact_prefix={crashes}/{name}-", str(corpus)]
    atheris.Setup(argv, target)
    atheris.Fuzz()


def replay(name: str, files: list[Path]) -> int:
    target, _ = _load(name)
    failed = 0
    for path in files:
        try:
            target(path.read_bytes())
        except Exception:  # noqa: BLE001 (every exception is a finding here)
            failed += 1
            print(f"--- {path}: {path.read_bytes()!r}")
            traceback.print_exc()
        else:
            print(f"--- {path}: ok")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="+", metavar="TARGET",
                        help=f"one of {', '.join(TARGETS)}, or all")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=int, help="total time, split among the targets")
    budget.add_argument("--runs", type=int, help="inputs per target (a bounded run)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument("--timeout", type=int, default=10,
                        help="seconds one input may take before it counts as a hang")
    parser.add_argument("--replay", nargs="+", type=Path, metavar="FILE",
                        help="run these saved inputs on the one TARGET, without atheris")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.targets == ["all"] else args.targets
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}, all")
    if args.replay:
        if len(names) != 1:
            parser.error("--replay takes exactly one TARGET")
        return replay(names[0], args.replay)
    libfuzzer = [f"-seed={args.seed}", f"-timeout={args.timeout}", "-rss_limit_mb=2048",
                 "-print_final_stats=1"]
    if args.runs is not None:
        libfuzzer.append(f"-runs={args.runs}")
    elif args.seconds is not None:
        libfuzzer.append(f"-max_total_time={max(1, args.seconds // len(names))}")
    if args.child:
        _child(names[0], libfuzzer)
        return 0
    worst = 0
    for name in names:
        print(f"=== scripts/fuzz {name}", flush=True)
        cmd = [sys.executable, "-m", "tests.fuzz.run", "--child", name, "--seed",
               str(args.seed), "--timeout", str(args.timeout)]
        if args.runs is not None:
            cmd += ["--runs", str(args.runs)]
        elif args.seconds is not None:
            cmd += ["--seconds", str(max(1, args.seconds // len(names)))]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        worst = max(worst, subprocess.run(cmd, cwd=REPO, env=env).returncode)
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
