"""``scripts/fuzz`` (the long, coverage-guided runs) works: a short bounded run per kind of
target finds nothing and leaves a corpus; a saved input replays.

Skipped where atheris is not installed (it comes with the ``test`` extra).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.run import REPO

pytest.importorskip("atheris")


def _fuzz(*args: str, work: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.fuzz.run", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PYSLIRP_FUZZ_WORK": str(work),
                               "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("target", ["dns", "stack"])
def test_a_bounded_run_finds_nothing(target: str, tmp_path: Path) -> None:
    proc = _fuzz("--runs", "300", target, work=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 300 runs" in proc.stderr
    assert any((tmp_path / "corpus" / target).iterdir())
    assert not any((tmp_path / "crashes").iterdir())


def test_replay_runs_saved_inputs(tmp_path: Path) -> None:
    saved = [tmp_path / "header", tmp_path / "short"]
    saved[0].write_bytes(bytes(12))
    saved[1].write_bytes(b"\x01")  # rejected (MalformedPacket): not a finding
    proc = _fuzz("vnet", "--replay", *map(str, saved), work=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(f"{path}: ok" in proc.stdout for path in saved)
