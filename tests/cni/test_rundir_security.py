"""Nobody gets in: the runtime directory, its files and engine.sock against other local users.

The plugin's unprivileged flow (``cnitool add slirp /proc/PID/ns/net`` without
``XDG_RUNTIME_DIR``) uses ``/tmp/pyslirp-UID``, a name any local user can take
first. These tests play that other user (``setpriv`` to a uid nobody uses on
this machine) and check that a directory, file, socket or state file they
prepared is refused or ignored, never followed, trusted or acted on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from pyslirp.cni import plugin
from tests.cni.cnirun import Outcome, exec_plugin
from tests.cni.conftest import REPO, engine_pid, pid_alive, slirp_conflist, stop_engine, wait_until
from tests.nsutil import NetNS

pytestmark = pytest.mark.e2e

CONF = {"cniVersion": "1.1.0", "name": "slirptest", "type": "slirp"}
PRECIOUS = "the victim's file\n"


def _unused_uids(count: int) -> list[int]:
    """Uids without a passwd entry, a process or a /tmp/pyslirp-UID: safe to play with."""
    with open("/etc/passwd") as f:
        used = {int(line.split(":")[2]) for line in f if line.count(":") >= 6}
    running = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            running.add(os.stat(f"/proc/{pid}").st_uid)
    free = [uid for uid in range(61000, 62000) if uid not in used | running
            and not os.path.lexists(f"/tmp/pyslirp-{uid}")]
    return free[:count]


@pytest.fixture
def uids() -> Iterator[tuple[int, int]]:
    """(victim, attacker); the victim's default runtime directory is removed afterwards."""
    victim, attacker = _unused_uids(2)
    try:
        yield victim, attacker
    finally:
        d = f"/tmp/pyslirp-{victim}"
        if os.path.lexists(d):
            stop_engine(d)
            shutil.rmtree(d, ignore_errors=True)


def as_uid(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


#: What cni/slirp runs. Run directly: this machine's interpreter lives under /root (0700),
#: which only setpriv's own exec (still holding root's capabilities) gets through.
PLUGIN_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
               "from pyslirp.cni.plugin import main; sys.exit(main())")


def plugin_as(uid: int, command: str, netns: str, container_id: str = "c1") -> Outcome:
    """The repository's plugin run by ``uid`` with no XDG_RUNTIME_DIR: the /tmp default."""
    scrub = ["env", "-u", "XDG_RUNTIME_DIR", "-u", "PYSLIRP_RUNDIR"]
    return exec_plugin(os.path.join(REPO, "cni"), "slirp", command, CONF,
                       container_id=container_id, netns=netns, ifname="eth0",
                       extra_env={"PYSLIRP_PYTHON": sys.executable,
                                  "PYSLIRP_CNI_IDLE_EXIT": "0.2"},
                       prefix=[*scrub, *as_uid(uid), sys.executable, "-IS", "-c", PLUGIN_BOOT,
                               REPO])


@pytest.fixture
def scratch_ns() -> Iterator[NetNS]:
    with NetNS("rundir-sec") as ns:
        yield ns


# ---------------------------------------------------------------- the runtime directory


def test_default_dir_is_made_private_for_its_user(uids: tuple[int, int]) -> None:
    victim, _ = uids
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pyslirp.cni import plugin; "
            "d = plugin.runtime_dir({}); plugin.prepare_runtime_dir(d, True); print(d)")
    proc = subprocess.run([*as_uid(victim), sys.executable, "-c", code, REPO],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    rundir = proc.stdout.strip()
    assert rundir == f"/tmp/pyslirp-{victim}"
    for d in (rundir, os.path.join(rundir, "attachments")):
        st = os.lstat(d)
        assert (st.st_uid, st.st_mode & 0o7777) == (victim, 0o700), d


def test_precreated_dir_of_another_user_is_refused(uids: tuple[int, int],
                                                   scratch_ns: NetNS) -> None:
    victim, attacker = uids
    rundir = f"/tmp/pyslirp-{victim}"
    os.mkdir(rundir, 0o700)
    os.chown(rundir, attacker, attacker)
    out = plugin_as(victim, "ADD", scratch_ns.path)
    assert out.code == plugin.ERR_UNSAFE, out.doc
    assert rundir in out.msg and f"uid {attacker}" in out.msg and "0700" in out.msg
    assert os.listdir(rundir) == []
    assert scratch_ns.link("eth0") is None


def test_precreated_dir_open_to_everyone_is_refused(uids: tuple[int, int],
                                                    scratch_ns: NetNS) -> None:
    victim, _ = uids
    rundir = f"/tmp/pyslirp-{victim}"
    os.mkdir(rundir)
    os.chown(rundir, victim, victim)
    os.chmod(rundir, 0o777)  # the victim's own, but anyone may plant files in it
    out = plugin_as(victim, "ADD", scratch_ns.path)
    assert out.code == plugin.ERR_UNSAFE, out.doc
    assert rundir in out.msg and "0777" in out.msg and "chmod 700" in out.msg
    assert os.listdir(rundir) == []  # no engine was started there
    out = plugin_as(victim, "DEL", scratch_ns.path)  # nor is anything in it trusted later
    assert out.code == plugin.ERR_UNSAFE, out.doc


@pytest.mark.parametrize("mode", [0o750, 0o705], ids=["0750", "0705"])
def test_group_or_other_access_makes_status_fail(cni_bin: str, env: dict[str, str],
                                                 rundir: str, mode: int) -> None:
    os.chmod(rundir, mode)
    out = exec_plugin(cni_bin, "slirp", "STATUS", CONF, extra_env=env)
    assert out.code == plugin.ERR_NOT_AVAILABLE, out.doc
    assert rundir in out.msg and f"{mode:04o}" in out.msg


# ---------------------------------------------------------------- files in the directory


def test_symlinked_engine_log_is_not_followed(runtime_factory: Any, netns_factory: Any,
                                              rundir: str, tmp_path: Any) -> None:
    target = tmp_path / "precious"
    target.write_text(PRECIOUS)
    os.symlink(target, os.path.join(rundir, "engine.log"))
    out = runtime_factory(slirp_conflist()).add("c1", netns_factory().path)
    assert out.code == plugin.ERR_UNSAFE, out.doc
    assert "engine.log" in out.msg and "symbolic link" in out.msg
    assert target.read_text() == PRECIOUS
    assert engine_pid(rundir) is None


def test_planted_temporary_state_file_is_not_written_through(runtime_factory: Any,
                                                             netns_factory: Any, rundir: str,
                                                             tmp_path: Any) -> None:
    rt = runtime_factory(slirp_conflist())
    first, second = netns_factory(), netns_factory()
    assert rt.add("c1", first.path).ok
    pid = engine_pid(rundir)
    target = tmp_path / "precious"
    target.write_text(PRECIOUS)
    state = plugin.state_path(rundir, "slirptest", "c2", "eth0")
    os.symlink(target, f"{state}.{pid}.tmp")  # the name the engine writes c2's state under
    out = rt.add("c2", second.path)
    assert out.ok, out.doc
    assert target.read_text() == PRECIOUS
    assert not os.path.islink(state) and plugin.read_state(state)["containerID"] == "c2"
    assert rt.delete("c2", second.path).ok and rt.delete("c1", first.path).ok


# ---------------------------------------------------------------- state files


def _genuine_stale_state(rt: Any, rundir: str, ns: NetNS, cid: str) -> str:
    """A state file the engine wrote, its engine killed, and its TAP somehow still there."""
    assert rt.add(cid, ns.path).ok
    pid = engine_pid(rundir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid))
    assert wait_until(lambda: ns.link("eth0") is None)
    ns.run(["ip", "tuntap", "add", "dev", "eth0", "mode", "tap"])
    return plugin.state_path(rundir, "slirptest", cid, "eth0")


def _tamper(kind: str, path: str, attacker: int, other: NetNS, tmp_path: Any) -> None:
    """Make the state file at ``path`` something the engine did not write (or not so)."""
    if kind == "symlink":
        moved = str(tmp_path / "elsewhere.json")
        shutil.move(path, moved)
        os.symlink(moved, path)
        return
    if kind == "other-owner":
        os.chown(path, attacker, attacker)
        return
    with open(path) as f:
        state = json.load(f)
    if kind == "other-tap":  # the file's name says eth0, its content another interface
        state["ifname"] = "tap9"
    else:  # another namespace than the one the ADD made the TAP in
        state["netns"] = other.path
    with open(path, "w") as f:
        json.dump(state, f)


@pytest.mark.parametrize("verb", ["DEL", "GC"])
@pytest.mark.parametrize("kind", ["symlink", "other-owner", "other-tap", "other-netns"])
def test_planted_state_file_does_not_make_the_engine_act(
        kind: str, verb: str, runtime_factory: Any, netns_factory: Any, rundir: str,
        uids: tuple[int, int], tmp_path: Any) -> None:
    rt = runtime_factory(slirp_conflist())
    ns, other = netns_factory(), netns_factory()
    path = _genuine_stale_state(rt, rundir, ns, "stale")
    ns.run(["ip", "tuntap", "add", "dev", "tap9", "mode", "tap"])
    other.run(["ip", "tuntap", "add", "dev", "eth0", "mode", "tap"])
    _tamper(kind, path, uids[1], other, tmp_path)
    out = rt.delete("stale", ns.path) if verb == "DEL" else rt.gc([])
    assert out.ok, out.doc
    assert ns.link("eth0") is not None and ns.link("tap9") is not None
    assert other.link("eth0") is not None
    if kind == "symlink":
        assert json.loads((tmp_path / "elsewhere.json").read_text())["containerID"] == "stale"
    assert not os.path.lexists(path)  # the entry itself is ours to remove
    assert wait_until(lambda: engine_pid(rundir) is None)


# ---------------------------------------------------------------- engine.sock

FAKE_ENGINE = textwrap.dedent("""
    import json, os, socket, sys
    path, uid, netns = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # SO_PEERCRED names whoever called listen()
    s.listen(8)
    print("ready", flush=True)
    reply = {"ok": True, "result": {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:66", "sandbox": netns}],
        "ips": [{"address": "10.0.2.100/24", "gateway": "10.0.2.66", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.2.66"}],
        "dns": {"nameservers": ["10.0.2.66"]}}}
    while True:
        c, _ = s.accept()
        try:
            c.recv(65536)
            c.sendall(json.dumps(reply).encode())
        except OSError:
            pass  # a plugin that hung up on us
        c.close()
""")


def test_fake_engine_of_another_uid_is_refused(cni_bin: str, env: dict[str, str],
                                               rundir: str, scratch_ns: NetNS,
                                               uids: tuple[int, int]) -> None:
    attacker = uids[1]
    sock = os.path.join(rundir, "engine.sock")
    fake = subprocess.Popen([sys.executable, "-c", FAKE_ENGINE, sock, str(attacker),
                             scratch_ns.path], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "ready\n"
        for verb in ("ADD", "DEL"):
            out = exec_plugin(cni_bin, "slirp", verb, CONF, container_id="c1",
                              netns=scratch_ns.path, ifname="eth0", extra_env=env)
            assert out.code == plugin.ERR_UNSAFE, out.doc
            assert sock in out.msg and f"uid {attacker}" in out.msg
            assert f"pid {fake.pid}" in out.msg
    finally:
        fake.kill()
        fake.wait()
        os.unlink(sock)


ATTACKER_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(sys.argv[2].encode() + b"\\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(data.decode())
""")


def test_engine_refuses_clients_of_another_uid(runtime_factory: Any, netns_factory: Any,
                                               rundir: str, uids: tuple[int, int]) -> None:
    attacker = uids[1]
    rt = runtime_factory(slirp_conflist())
    ns = netns_factory()
    assert rt.add("c1", ns.path).ok
    sock = os.path.join(rundir, "engine.sock")
    request = json.dumps({"op": "del", "network": "slirptest", "containerID": "c1",
                          "ifname": "eth0"})
    # Pretend the permissions let the attacker reach the socket: the engine itself must say no.
    os.chmod(rundir, 0o711)
    os.chmod(sock, 0o666)
    try:
        proc = subprocess.run([*as_uid(attacker), sys.executable, "-c", ATTACKER_CLIENT, sock,
                               request], capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        os.chmod(rundir, 0o700)
        os.chmod(sock, 0o600)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False and f"uid {attacker}" in reply["msg"], reply
    assert ns.link("eth0") is not None
    assert rt.check("c1", ns.path).ok
    with open(os.path.join(rundir, "engine.log")) as f:
        assert f"refused a client of engine.sock running as uid {attacker}" in f.read()
    assert rt.delete("c1", ns.path).ok


def _ask_engine(rundir: str, request: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", ATTACKER_CLIENT,
                           os.path.join(rundir, "engine.sock"), json.dumps(request)],
                          capture_output=True, text=True, timeout=60, check=True)
    reply: dict[str, Any] = json.loads(proc.stdout)
    return reply


@pytest.mark.parametrize(("request_fields", "needle"), [
    ({"op": "del", "containerID": "../c1"}, "invalid containerID"),
    ({"op": "del", "containerID": "a:b"}, "invalid containerID"),
    ({"op": "del", "ifname": "../../x"}, "invalid ifname"),
    ({"op": "del", "ifname": "x" * 16}, "invalid ifname"),
    ({"op": "del", "network": "../slirptest"}, "invalid network name"),
    ({"op": "check", "netns": "relative/net"}, "invalid netns"),
    ({"op": "check", "netns": "/run/netns/does-not-exist-pyslirp"}, "invalid netns"),
    ({"op": "gc", "valid": "everything"}, "invalid valid-attachments"),
])
def test_engine_revalidates_names_and_paths(runtime_factory: Any, netns_factory: Any,
                                            rundir: str, request_fields: dict[str, Any],
                                            needle: str) -> None:
    """A client that is not the plugin gets the plugin's rules applied all the same."""
    rt = runtime_factory(slirp_conflist())
    ns = netns_factory()
    assert rt.add("c1", ns.path).ok
    request = {"network": "slirptest", "containerID": "c1", "ifname": "eth0",
               "netns": ns.path, "expected": {}, **request_fields}
    reply = _ask_engine(rundir, request)
    assert reply["ok"] is False and needle in reply["msg"], reply
    assert ns.link("eth0") is not None
    assert rt.delete("c1", ns.path).ok
