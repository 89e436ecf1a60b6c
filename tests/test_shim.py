"""``pyslirp shim``: the slirp4netns executable it writes, and what it refuses to overwrite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyslirp import shim
from pyslirp.cli import main


def test_install_writes_an_executable_that_runs_pyslirp(tmp_path: Path) -> None:
    path = Path(shim.install(str(tmp_path)))
    assert path == tmp_path / "slirp4netns"
    assert os.stat(path).st_mode & 0o777 == 0o755
    # It answers the probes callers make (rootlesskit: --help; podman: --version).
    help_text = subprocess.run([str(path), "--help"], capture_output=True, text=True,
                               timeout=60, cwd=tmp_path).stdout
    for probe in ("--netns-type", "--enable-sandbox", "--enable-seccomp", "--api-socket",
                  "--cidr", "--disable-host-loopback", "--enable-ipv6", "--outbound-addr"):
        assert probe in help_text
    version = subprocess.run([str(path), "-v"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("pyslirp version ")


def test_arguments_arrive_unchanged_and_the_pid_is_kept(tmp_path: Path) -> None:
    # A stand-in interpreter shows what the shim execs: same PID as the shell, same words.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$$"\nfor a in "$@"; do printf "[%s]" "$a"; done\n')
    fake.chmod(0o755)
    path = shim.install(str(tmp_path / "."), name="s4n", python=str(fake))
    out = subprocess.run(["sh", "-c", f'echo "$$"; exec {path} --cidr "10.0.3.0/24" "a b" ""'],
                         capture_output=True, text=True, timeout=30).stdout.splitlines()
    assert out[0] == out[1]  # the shell's PID is the interpreter's: exec all the way
    assert out[2] == "[-I][-m][pyslirp][--cidr][10.0.3.0/24][a b][]"


def test_interpreter_path_is_quoted(tmp_path: Path) -> None:
    text = shim.script("/opt/odd dir/it's/python")
    assert "exec '/opt/odd dir/it'\"'\"'s/python' -I -m pyslirp \"$@\"\n" in text


def test_install_refuses_to_replace_a_real_binary(tmp_path: Path) -> None:
    real = tmp_path / "slirp4netns"
    real.write_bytes(b"\x7fELF...")
    with pytest.raises(FileExistsError, match="is not a pyslirp shim"):
        shim.install(str(tmp_path))
    assert real.read_bytes() == b"\x7fELF..."
    shim.install(str(tmp_path), force=True)
    assert shim.MARKER in real.read_text()
    shim.install(str(tmp_path))  # an existing shim is simply refreshed
    assert [p.name for p in tmp_path.iterdir()] == ["slirp4netns"]  # no temp files left


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shim", "install", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'slirp4netns'}\n"
    assert main(["shim", "install", "--name=other", str(tmp_path)]) == 0
    assert (tmp_path / "other").exists()
    assert main(["shim", "show"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        f'exec {sys.executable} -I -m pyslirp "$@"'
    assert main(["shim", "install"]) == 1
    assert main(["shim", "frobnicate"]) == 1
    assert main(["shim", "install", "--bogus", str(tmp_path)]) == 1
    assert main(["shim", "install", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "unknown option '--bogus'" in err
    assert "No such file or directory" in err
    assert main(["shim"]) == 1 and main(["shim", "--help"]) == 0


def test_shared_engine_shim_sets_the_mode_for_pyslirp(tmp_path: Path) -> None:
    # The stand-in interpreter prints the environment pyslirp would start with.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$PYSLIRP_SHARED_ENGINE|$PYSLIRP_RUNDIR"\n')
    fake.chmod(0o755)
    plain = shim.install(str(tmp_path), name="plain", python=str(fake))
    shared = shim.install(str(tmp_path), name="shared", python=str(fake), shared_engine=True,
                          rundir="/run/some dir")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSLIRP_")}
    assert subprocess.run([plain], capture_output=True, text=True, env=env,
                          timeout=30).stdout == "|\n"
    assert subprocess.run([shared], capture_output=True, text=True, env=env,
                          timeout=30).stdout == "1|/run/some dir\n"


def test_shared_engine_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shim", "install", "--shared-engine", "--rundir", "/run/x", str(tmp_path)]) == 0
    text = (tmp_path / "slirp4netns").read_text()
    assert "export PYSLIRP_SHARED_ENGINE=1\n" in text and "export PYSLIRP_RUNDIR=/run/x\n" in text
    assert main(["shim", "show", "--shared-engine"]) == 0
    assert "export PYSLIRP_SHARED_ENGINE=1\n" in capsys.readouterr().out
    # --rundir means the shared engine's directory: alone, or relative, it is an error.
    assert main(["shim", "install", "--rundir=/run/x", str(tmp_path)]) == 1
    assert main(["shim", "install", "--shared-engine", "--rundir=rel", str(tmp_path)]) == 1
    assert main(["shim", "install", "--shared-engine", "--rundir"]) == 1
    assert "needs --shared-engine and an absolute path" in capsys.readouterr().err
