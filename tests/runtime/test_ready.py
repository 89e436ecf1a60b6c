"""Stop signals before the event loop exists (pyslirp/runtime/ready.py)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import os, signal
from pyslirp.runtime import ready
ready.trap_stop_signals()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGINT)
print(ready.early_signals(), ready.early_signals())
"""


def test_stop_signals_before_the_loop_are_remembered_not_fatal() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("]")[0] + "]" == "[15, 2]"
    assert proc.stdout.strip().endswith("[]")  # taken once
