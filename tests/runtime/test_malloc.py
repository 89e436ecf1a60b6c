"""The allocator tuning takes effect: host reads reuse memory instead of fresh pages."""

from __future__ import annotations

import resource
import subprocess
import sys

PROBE = """
import resource, sys, socket
if sys.argv[1] == "tuned":
    from pyslirp.runtime import malloc
    assert malloc.tune()
a, b = socket.socketpair()
a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
chunk = bytes(65536)
keep = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(2000):
    a.sendall(chunk)
    got = 0
    while got < 65536:
        data = b.recv(256 * 1024)   # as the relay reads a host socket
        got += len(data)
        keep.append(data)           # held in the send queue until acknowledged
    while len(keep) > 64:
        keep.pop(0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


def test_tuned_allocator_stops_faulting_in_fresh_pages_per_read() -> None:
    assert resource.getpagesize() == 4096
    default, tuned = _faults("default"), _faults("tuned")
    # 2000 reads of 16 pages each: the default allocator faults fresh pages in for most.
    assert default > 2000 * 8
    assert tuned < default / 10


def test_the_collector_is_on_again_once_start_up_is_frozen() -> None:
    # pyslirp.cli turns the cyclic collector off for the start (its imports make no
    # garbage worth collecting); if the loop's freeze did not turn it back on, every
    # reference cycle made while serving would stay in memory for good.
    probe = ("import gc; from pyslirp.runtime import malloc; gc.disable(); "
             "malloc.freeze_startup_objects(); print(gc.isenabled())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True"
