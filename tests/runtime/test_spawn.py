"""spawn_isolated: what the command sees, what its caller gets back, and that nothing leaks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyslirp.runtime import netns
from pyslirp.runtime.spawn import IsolatedChild, SpawnError, spawn_isolated
from pyslirp.runtime.tap import ConfigureSpec, open_tap
from pyslirp.stack.config import NetConfig
from tests import nsutil

pytestmark = pytest.mark.e2e

RESOLV = "nameserver 10.0.2.3\nsearch example.test\n"


@pytest.fixture(autouse=True)
def _capable() -> None:
    nsutil.skip_unless_capable()


@pytest.fixture
def children() -> Iterator[list[IsolatedChild]]:
    """Children a test spawns; whatever is left is killed and reaped."""
    spawned: list[IsolatedChild] = []
    yield spawned
    for child in spawned:
        child.kill(signal.SIGKILL)
        child.wait()


def _run(children: list[IsolatedChild], argv: list[str], resolv: str | None = RESOLV,
         **kwargs: object) -> int:
    child = spawn_isolated(argv, resolv, **kwargs)  # type: ignore[arg-type]
    children.append(child)
    child.release()
    return child.wait()


@pytest.mark.parametrize("userns", [None, True], ids=["auto", "userns"])
def test_child_sees_only_lo_and_its_own_resolv_conf(children: list[IsolatedChild],
                                                     tmp_path: Path, userns: bool | None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    host_resolv = Path("/etc/resolv.conf").read_bytes()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the child writes its copy
    script = f"ip -j link > {tmp_path}/links; cat /etc/resolv.conf > {tmp_path}/resolv"
    assert _run(children, ["sh", "-c", script], userns=userns) == 0
    links = json.loads((tmp_path / "links").read_text())
    assert [link["ifname"] for link in links] == ["lo"]
    assert (tmp_path / "resolv").read_text() == RESOLV
    # Nothing leaked out: the host's file is untouched, no temporary copy is left.
    assert Path("/etc/resolv.conf").read_bytes() == host_resolv
    assert list(scratch.iterdir()) == []


def test_namespaces_exist_when_spawn_returns(children: list[IsolatedChild]) -> None:
    child = spawn_isolated(["true"], RESOLV, userns=True)
    children.append(child)
    assert netns.ns_id(f"/proc/{child.pid}/ns/net") != netns.ns_id("/proc/self/ns/net")
    assert netns.ns_id(f"/proc/{child.pid}/ns/mnt") != netns.ns_id("/proc/self/ns/mnt")
    assert netns.pid_userns_differs(child.pid)
    assert Path(f"/proc/{child.pid}/uid_map").read_text().split() == ["0", str(os.geteuid()), "1"]
    assert Path(f"/proc/{child.pid}/setgroups").read_text().strip() == "deny"
    child.release()
    assert child.wait() == 0


def test_as_root_no_user_namespace_by_default(children: list[IsolatedChild]) -> None:
    child = spawn_isolated(["true"], None)
    children.append(child)
    assert not netns.pid_userns_differs(child.pid)
    child.release()
    assert child.wait() == 0


def test_the_command_waits_for_release(children: list[IsolatedChild], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    child = spawn_isolated(["touch", str(marker)], None)
    children.append(child)
    assert child.poll() is None
    assert not marker.exists()
    child.release()
    assert child.wait() == 0 and marker.exists()


def test_cancel_exits_without_running_the_command(children: list[IsolatedChild],
                                                  tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    child = spawn_isolated(["touch", str(marker)], None)
    children.append(child)
    child.cancel()
    assert child.wait() == 1
    assert not marker.exists()


@pytest.mark.parametrize(("script", "status"), [
    ("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 128 + signal.SIGTERM),
    ("kill -KILL $$", 128 + signal.SIGKILL),
])
def test_exit_status_as_a_shell_reports_it(children: list[IsolatedChild], script: str,
                                           status: int) -> None:
    assert _run(children, ["sh", "-c", script]) == status


def test_kill_delivers_the_signal(children: list[IsolatedChild]) -> None:
    child = spawn_isolated(["sleep", "60"], None)
    children.append(child)
    child.release()
    child.kill(signal.SIGINT)
    assert child.wait() == 128 + signal.SIGINT
    child.kill()  # already reaped: must not signal a reused pid, nor raise


def test_command_not_found_is_127(children: list[IsolatedChild], capfd: pytest.CaptureFixture[str]
                                  ) -> None:
    assert _run(children, ["no-such-command-pyslirp"]) == 127
    assert "no-such-command-pyslirp: command not found" in capfd.readouterr().err


def test_command_not_executable_is_126(children: list[IsolatedChild], tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    assert _run(children, [str(script)]) == 126


def test_hostname_is_private(children: list[IsolatedChild], tmp_path: Path) -> None:
    ours = os.uname().nodename
    assert _run(children, ["sh", "-c", f"hostname > {tmp_path}/h"], hostname="pyslirp-box") == 0
    assert (tmp_path / "h").read_text().strip() == "pyslirp-box"
    assert os.uname().nodename == ours


def test_setup_failure_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match=r"^cannot set hostname 'x{65}': "):
        spawn_isolated(["true"], None, hostname="x" * 65)


def test_empty_command_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty command"):
        spawn_isolated([], None)


def test_open_tap_into_the_child_then_run(children: list[IsolatedChild], tmp_path: Path) -> None:
    # The shape of `pyslirp run`: spawn, open the TAP in the child's namespaces, release.
    child = spawn_isolated(["sh", "-c", f"ip -j addr show tap0 > {tmp_path}/addr; "
                                        f"ip -j -4 route > {tmp_path}/route"],
                           RESOLV, userns=True)
    children.append(child)
    with open_tap(child.netns_target, child.netns_type,
                  configure=ConfigureSpec.from_netconfig(NetConfig())) as handle:
        assert handle.vnet_hdr and handle.offload
        child.release()
        assert child.wait() == 0
    addr = json.loads((tmp_path / "addr").read_text())[0]
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]
            if a["family"] == "inet"] == [("10.0.2.100", 24)]
    routes = json.loads((tmp_path / "route").read_text())
    assert {"dst": "default", "gateway": "10.0.2.2", "dev": "tap0"}.items() <= routes[0].items()


def test_unprivileged_caller_gets_a_user_namespace() -> None:
    # Run the spawner itself as nobody: the automatic choice must then map nobody to root.
    with tempfile.TemporaryDirectory(prefix="pyslirp-spawn-") as shared:
        os.chmod(shared, 0o777)  # pytest's tmp_path sits in a root-only directory
        _run_as_nobody(Path(shared) / "out")


def _run_as_nobody(out: Path) -> None:
    code = textwrap.dedent(f"""
        from pyslirp.runtime.spawn import spawn_isolated
        c = spawn_isolated(["sh", "-c", "id -u > {out}; cat /etc/resolv.conf >> {out}"],
                           {RESOLV!r})
        c.release()
        raise SystemExit(c.wait())
    """)
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "0\n" + RESOLV


def test_child_dies_with_its_parent(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys, time
        from pyslirp.runtime.spawn import spawn_isolated
        c = spawn_isolated(["sleep", "600"], None)
        c.release()
        print(c.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _alive(pid)
    finally:
        parent.kill()
        parent.wait()
    nsutil.wait_for(lambda: not _alive(pid), what=f"isolated child {pid} to die")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
