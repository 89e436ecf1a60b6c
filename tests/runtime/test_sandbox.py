"""--enable-sandbox in a forked child: what the sandboxed process can see and do, from outside.

The child builds the sandbox exactly as pyslirp does (``preload`` then
``create_sandbox``), reports what it sees, and waits; the parent reads its
capabilities from ``/proc/PID/status`` and its root through
``/proc/PID/root``, as an administrator would. Needs root (mount namespaces).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyslirp.runtime import netns, sandbox
from pyslirp.runtime.spec import Hardening
from tests.nsutil import NetNS, userns_mapped

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox test needs root")

NET_BIND_SERVICE = 1 << sandbox.CAP_NET_BIND_SERVICE


def _child_report() -> dict[str, Any]:
    report: dict[str, Any] = {"root": sorted(os.listdir("/"))}
    with open("/etc/resolv.conf", "rb") as f:
        report["resolv_conf"] = len(f.read())
    for path in ("/pyslirp-test", "/etc/pyslirp-test"):
        try:
            open(path, "w").close()  # noqa: SIM115
            report[path] = "writable"
        except OSError as exc:
            report[path] = exc.errno
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", 1023))  # privileged port: needs CAP_NET_BIND_SERVICE
        report["bind_1023"] = "ok"
    except OSError as exc:
        report["bind_1023"] = exc.errno
    finally:
        s.close()
    try:
        os.chown("/etc", 0, 0)  # a no-op change, but needs CAP_CHOWN and a writable fs
        report["chown"] = "ok"
    except OSError as exc:
        report["chown"] = exc.errno
    return report


@dataclass
class Sandboxed:
    pid: int
    report: dict[str, Any]


@pytest.fixture
def sandboxed() -> Iterator[Sandboxed]:
    with _sandboxed_child() as child:
        yield child


@contextlib.contextmanager
def _sandboxed_child() -> Iterator[Sandboxed]:
    """A forked child that built the sandbox as pyslirp does and waits to be looked at."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 0
        try:
            os.close(r)
            os.close(go_w)
            sandbox.preload()
            sandbox.create_sandbox()
            os.write(w, json.dumps(_child_report()).encode() + b"\n")
            os.close(w)
            os.read(go_r, 1)  # wait until the parent has looked at us
        except BaseException as exc:  # noqa: BLE001
            os.write(w, json.dumps({"error": repr(exc)}).encode() + b"\n")
            status = 3
        os._exit(status)
    os.close(w)
    os.close(go_r)
    try:
        with os.fdopen(r, "rb") as f:
            report = json.loads(f.readline())
        assert "error" not in report, report
        yield Sandboxed(pid, report)
    finally:
        os.close(go_w)
        try:
            _, st = os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        else:
            if os.WIFSIGNALED(st):
                pytest.fail(f"sandboxed child died of {signal.Signals(os.WTERMSIG(st)).name}")


def test_only_cap_net_bind_service_is_left(sandboxed: Sandboxed) -> None:
    caps = sandbox.capabilities(sandboxed.pid)
    assert caps == {"CapInh": NET_BIND_SERVICE, "CapPrm": NET_BIND_SERVICE,
                    "CapEff": NET_BIND_SERVICE, "CapBnd": NET_BIND_SERVICE, "CapAmb": 0}
    assert sandbox.no_new_privs(sandboxed.pid)
    assert sandboxed.report["bind_1023"] == "ok"
    assert sandboxed.report["chown"] != "ok"


def test_root_holds_only_read_only_etc_and_run(sandboxed: Sandboxed) -> None:
    assert sandboxed.report["root"] == ["etc", "run"]
    assert sorted(os.listdir(f"/proc/{sandboxed.pid}/root")) == ["etc", "run"]
    # the same /etc as ours, readable (resolv.conf), but read-only, like the new root itself
    assert sandboxed.report["resolv_conf"] == os.path.getsize("/etc/resolv.conf")
    assert sandboxed.report["/pyslirp-test"] == 30  # EROFS
    assert sandboxed.report["/etc/pyslirp-test"] == 30
    mounts = Path(f"/proc/{sandboxed.pid}/mountinfo").read_text().splitlines()
    by_point = {line.split()[4]: line.split()[5].split(",") for line in mounts}
    for point in ("/", "/etc", "/run"):
        assert "ro" in by_point[point], (point, by_point)
    assert os.stat(f"/proc/{sandboxed.pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino


def test_nothing_leaks_into_our_mount_namespace(sandboxed: Sandboxed) -> None:
    ours = Path("/proc/self/mountinfo").read_text()
    assert " /tmp/etc " not in ours and " /tmp/run " not in ours and " /old " not in ours
    assert not os.path.exists("/tmp/old")


def test_named_network_namespaces_of_the_host_survive_the_sandbox() -> None:
    # slirp4netns 1.2.0's sandbox makes only "/" private before it detaches the old root,
    # and the detach propagates through the shared /run/netns mount: started in the host's
    # mount namespace it unmounts every `ip netns` namespace there (docs/slirp4netns.md).
    # Ours makes every mount private first (MS_REC), so nothing of the host's goes.
    with NetNS("sandboxwitness") as witness:
        point = f" {witness.path} "
        assert point in Path("/proc/self/mountinfo").read_text()
        with _sandboxed_child() as child:
            assert child.report["root"] == ["etc", "run"]
            assert point in Path("/proc/self/mountinfo").read_text()
        witness.run(["ip", "link", "show", "lo"])  # still a namespace one can enter


def test_preload_imports_what_serving_needs() -> None:
    assert sandbox.preload() == []


def test_unprivileged_caller_sandboxes_inside_the_targets_user_namespace() -> None:
    # slirp4netns's rootless path: as nobody, join the target's user namespace (root there),
    # then build the same sandbox. The child plays both the rootless stack and its target.
    sandbox.preload()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net",
                                       "sleep", "60"])
            try:
                while not userns_mapped(holder.pid):
                    time.sleep(0.005)
                userns = f"/proc/{holder.pid}/ns/user"
                sandbox.create_sandbox(userns)
                os.write(w, json.dumps({"root": sorted(os.listdir("/")),
                                        "euid": os.geteuid()}).encode() + b"\n")
                time.sleep(0.5)  # let the parent look at us
            finally:
                holder.kill()
                holder.wait()
        except BaseException as exc:  # noqa: BLE001
            os.write(w, json.dumps({"error": repr(exc)}).encode() + b"\n")
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = json.loads(f.readline())
    try:
        assert report == {"root": ["etc", "run"], "euid": 0}
        caps = sandbox.capabilities(pid)  # relative to the joined user namespace
        assert caps["CapEff"] == NET_BIND_SERVICE and caps["CapBnd"] == NET_BIND_SERVICE
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split("\n")[0].split()
        assert uids == ["65534"] * 4  # root in there is still nobody out here
    finally:
        os.waitpid(pid, 0)


def test_unprivileged_caller_without_a_target_sandboxes_in_a_user_namespace_of_its_own() -> None:
    # A rootless QEMU back end: no target user namespace to join, so it makes one.
    sandbox.preload()
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.close(go_w)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            # Changing ids made us non-dumpable (our /proc/self root's); a process
            # started as nobody is dumpable and may write its own uid_map.
            netns.set_dumpable(True)
            sandbox.create_sandbox(own_userns=True)
            os.write(w, json.dumps({"root": sorted(os.listdir("/")),
                                    "euid": os.geteuid()}).encode() + b"\n")
            os.read(go_r, 1)  # let the parent look at us
        except BaseException as exc:  # noqa: BLE001
            os.write(w, json.dumps({"error": repr(exc)}).encode() + b"\n")
        os._exit(0)
    os.close(w)
    os.close(go_r)
    try:
        with os.fdopen(r, "rb") as f:
            report = json.loads(f.readline())
        assert report == {"root": ["etc", "run"], "euid": 0}
        assert os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
        assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", "65534", "1"]
        caps = sandbox.capabilities(pid)
        assert caps["CapEff"] == NET_BIND_SERVICE and caps["CapBnd"] == NET_BIND_SERVICE
        assert sandbox.no_new_privs(pid)
    finally:
        os.close(go_w)
        os.waitpid(pid, 0)


def test_apply_does_nothing_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    monkeypatch.setattr(sandbox, "create_sandbox", lambda *_a: called.append("sandbox"))
    assert sandbox.apply(Hardening())
    assert called == []


def test_apply_failure_is_one_logged_error(monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    def fail(_userns: str | None, **_kw: object) -> None:
        raise sandbox.SandboxError(1, "sandbox: cannot unshare new mount namespace: "
                                      "Operation not permitted")
    monkeypatch.setattr(sandbox, "create_sandbox", fail)
    with caplog.at_level("ERROR", logger="pyslirp"):
        assert not sandbox.apply(Hardening(sandbox=True, seccomp=True,
                                           userns_path="/proc/1/ns/user"))
    assert [r.getMessage() for r in caplog.records] == [
        "sandbox: cannot unshare new mount namespace: Operation not permitted"]


def test_apply_seccomp_failure_is_one_logged_error(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from pyslirp.runtime import seccomp

    def fail(**_kw: object) -> None:
        raise seccomp.SeccompError(22, "seccomp: seccomp_load: Invalid argument")
    monkeypatch.setattr(seccomp, "install", fail)
    with caplog.at_level("ERROR", logger="pyslirp"):
        assert not sandbox.apply(Hardening(seccomp=True))
    assert [r.getMessage() for r in caplog.records] == [
        "seccomp: seccomp_load: Invalid argument"]
