"""The CNI protocol of the ``slirp`` executable: verbs, versions, validation and error codes.

Driven the way libcni drives a plugin (environment + stdin, JSON on stdout).
Nothing here attaches a container, so no engine is ever started (checked).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pyslirp.cni import plugin
from tests.cni.cnirun import exec_plugin
from tests.cni.conftest import REPO
from tests.nsutil import NetNS

pytestmark = pytest.mark.e2e  # namespaces: needs root

ALL_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def conf(version: str = "1.1.0", **fields: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "slirptest", "type": "slirp", **fields}


@pytest.fixture(scope="module")
def scratch_ns() -> Iterator[NetNS]:
    """An existing netns for requests that must fail before touching it (a bug would
    land in here, never in the test's own namespace)."""
    with NetNS("proto") as ns:
        yield ns


@pytest.fixture
def run(cni_bin: str, env: dict[str, str], rundir: str, scratch_ns: NetNS) -> Any:
    def go(command: str, config: Any, **kw: Any) -> Any:
        kw.setdefault("container_id", "c1")
        kw.setdefault("ifname", "eth0")
        kw.setdefault("netns", scratch_ns.path)
        extra = dict(env)
        extra.update(kw.pop("extra_env", {}))
        return exec_plugin(cni_bin, "slirp", command, config, extra_env=extra, **kw)
    yield go
    # Validation and no-op verbs must never have started an engine.
    assert not os.path.exists(os.path.join(rundir, "engine.sock"))


def test_version_lists_every_supported_version(run: Any) -> None:
    out = run("VERSION", b"")
    assert out.ok
    assert out.doc == {"cniVersion": "1.1.0", "supportedVersions": ALL_VERSIONS}
    out = run("VERSION", {"cniVersion": "0.3.1"})
    assert out.ok and out.doc["supportedVersions"] == ALL_VERSIONS


def test_repo_executable_works_as_is(env: dict[str, str]) -> None:
    out = exec_plugin(os.path.join(REPO, "cni"), "slirp", "VERSION", b"{}", extra_env=env)
    assert out.ok and "1.1.0" in out.doc["supportedVersions"]


@pytest.mark.parametrize(("command", "needle"), [("", "CNI_COMMAND"), ("FROB", "FROB")])
def test_bad_command_is_error_4(run: Any, command: str, needle: str) -> None:
    out = run(command, conf())
    assert out.code == 4 and needle in out.msg and not out.ok


def test_missing_container_id_is_error_4(cni_bin: str, env: dict[str, str],
                                        scratch_ns: NetNS) -> None:
    out = exec_plugin(cni_bin, "slirp", "ADD", conf(), netns=scratch_ns.path,
                      ifname="eth0", extra_env=env)
    assert out.code == 4 and "CNI_CONTAINERID" in out.msg


def test_missing_netns_is_error_4_for_add(cni_bin: str, env: dict[str, str]) -> None:
    out = exec_plugin(cni_bin, "slirp", "ADD", conf(), container_id="c1", ifname="eth0",
                      extra_env=env)
    assert out.code == 4 and "CNI_NETNS" in out.msg


def test_nonexistent_netns_is_error_4(run: Any) -> None:
    out = run("ADD", conf(), netns="/run/netns/does-not-exist-pyslirp")
    assert out.code == 4 and "CNI_NETNS" in out.msg


@pytest.mark.parametrize("ifname", ["", "..", "a" * 16, "et h0", "eth/0", "eth:0"])
def test_bad_ifname_is_error_4(run: Any, ifname: str) -> None:
    out = run("ADD", conf(), ifname=ifname)
    assert out.code == 4 and "CNI_IFNAME" in out.msg


@pytest.mark.parametrize("cid", ["-abc", "a b", "a/b"])
def test_bad_container_id_is_error_4(run: Any, cid: str) -> None:
    out = run("ADD", conf(), container_id=cid)
    assert out.code == 4 and "CNI_CONTAINERID" in out.msg


def test_undecodable_config_is_error_6(run: Any) -> None:
    out = run("ADD", b"{not json")
    assert out.code == 6 and out.doc["cniVersion"] == "1.1.0"


def test_unsupported_version_is_error_1(run: Any) -> None:
    out = run("ADD", conf("0.2.0"))
    assert out.code == 1 and "0.2.0" in out.msg


def test_missing_version_is_error_7(run: Any) -> None:
    c = conf()
    del c["cniVersion"]
    out = run("ADD", c)
    assert out.code == 7 and "cniVersion" in out.msg


@pytest.mark.parametrize("mtu", [67, 65522, 0, "1500", True, 9000.5])
def test_mtu_out_of_range_is_error_7_naming_mtu(run: Any, mtu: Any) -> None:
    out = run("ADD", conf(mtu=mtu))
    assert out.code == 7 and "mtu" in out.msg
    assert out.doc["cniVersion"] == "1.1.0"


@pytest.mark.parametrize(("fields", "code", "needle"), [
    ({"ipam": {"type": "host-local"}}, 2, "ipam"),
    ({"frobnicate": 1}, 2, "frobnicate"),
    ({"cidr": "10.0.2.1/24"}, 7, "cidr"),
    ({"cidr": "10.0.2.0/30"}, 7, "cidr"),
    ({"cidr": "banana"}, 7, "cidr"),
    ({"macAddress": "01:00:00:00:00:01"}, 7, "macAddress"),
    ({"macAddress": "zz"}, 7, "macAddress"),
    ({"disableHostLoopback": "yes"}, 7, "disableHostLoopback"),
    ({"dns": {"nameservers": "1.1.1.1"}}, 7, "dns.nameservers"),
    ({"dns": {"sortlist": []}}, 2, "dns.sortlist"),
    ({"dnsUpstreams": ["localhost"]}, 7, "dnsUpstreams"),
    ({"type": "bridge"}, 7, "type"),
    ({"name": "-bad"}, 7, "name"),
    ({"runtimeConfig": {"ips": ["10.0.2.5/24"]}}, 2, "runtimeConfig.ips"),
    ({"runtimeConfig": {"portMappings": [{"hostPort": 0, "containerPort": 80}]}}, 7,
     "hostPort"),
])
def test_invalid_config(run: Any, fields: dict[str, Any], code: int, needle: str) -> None:
    out = run("ADD", conf(**fields))
    assert out.code == code, out.doc
    assert needle in out.msg


def test_unknown_cni_args_need_ignore_unknown(run: Any) -> None:
    out = run("ADD", conf(mtu=1), args="FOO=bar")
    assert out.code == 2 and "FOO" in out.msg
    out = run("ADD", conf(mtu=1), args="IgnoreUnknown=1;FOO=bar")
    assert out.code == 7  # got past CNI_ARGS to the mtu
    out = run("ADD", conf(), args="garbage")
    assert out.code == 4 and "CNI_ARGS" in out.msg


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_needs_040(run: Any, version: str) -> None:
    out = run("CHECK", conf(version, prevResult={}))
    assert out.code == 1 and "CHECK" in out.msg
    assert out.doc["cniVersion"] == version


@pytest.mark.parametrize("verb", ["GC", "STATUS"])
@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_gc_and_status_need_110(run: Any, verb: str, version: str) -> None:
    out = run(verb, conf(version, **{"cni.dev/valid-attachments": []}))
    assert out.code == 1 and verb in out.msg


def test_check_without_prev_result_is_error_7(run: Any) -> None:
    out = run("CHECK", conf())
    assert out.code == 7 and "prevResult" in out.msg


def test_check_unknown_attachment_fails(run: Any) -> None:
    prev = {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}], "ips": []}
    out = run("CHECK", conf(prevResult=prev))
    assert out.code == plugin.ERR_NO_ATTACHMENT and "c1" in out.msg


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_del_of_unknown_attachment_succeeds(run: Any, version: str) -> None:
    out = run("DEL", conf(version))
    assert out.ok and out.doc is None
    out = run("DEL", conf(version), netns=None)  # netns already gone: no CNI_NETNS
    assert out.ok and out.doc is None


def test_gc_with_nothing_to_collect_succeeds(run: Any) -> None:
    out = run("GC", conf(**{"cni.dev/valid-attachments": [{"containerID": "x",
                                                            "ifname": "eth0"}]}))
    assert out.ok and out.doc is None


def test_gc_needs_valid_attachments(run: Any) -> None:
    out = run("GC", conf())
    assert out.code == 7 and "cni.dev/valid-attachments" in out.msg


def test_status_ok(run: Any) -> None:
    out = run("STATUS", conf())
    assert out.ok and out.doc is None


def test_status_without_tun_is_50(cni_bin: str, env: dict[str, str]) -> None:
    """A mount namespace where /dev/net is empty: ADD could not work, STATUS says 50."""
    envs = {**os.environ, **env, "CNI_COMMAND": "STATUS", "CNI_PATH": cni_bin}
    script = f"mount -t tmpfs none /dev/net && exec {cni_bin}/slirp"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], input=b'{"cniVersion":"1.1.0","name":"n","type":"slirp"}',
                          capture_output=True, env=envs, timeout=30)
    assert proc.returncode != 0
    doc = json.loads(proc.stdout)
    assert doc["code"] == 50 and "/dev/net/tun" in doc["msg"]


def test_errors_go_to_stdout_logs_to_stderr(run: Any) -> None:
    out = run("ADD", conf(mtu=5))
    assert out.doc["msg"] in out.stderr


# ---- result shapes (pure functions, no processes)

RESULT = {
    "cniVersion": "1.1.0",
    "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1500,
                    "sandbox": "/run/netns/x"}],
    "ips": [{"address": "10.0.2.100/24", "gateway": "10.0.2.2", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.2.2"}],
    "dns": {"nameservers": ["10.0.2.3"]},
}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_result_shaped_for_version(version: str) -> None:
    out = plugin.shape_result(RESULT, version)
    assert out["cniVersion"] == version
    if version in ("1.0.0", "1.1.0"):
        assert "version" not in out["ips"][0]
    else:
        assert out["ips"][0]["version"] == "4"
    assert ("mtu" in out["interfaces"][0]) == (version == "1.1.0")
    assert RESULT["cniVersion"] == "1.1.0"  # not mutated


def test_chained_after_another_plugin_appends_our_interface() -> None:
    prev = {"cniVersion": "0.4.0", "interfaces": [{"name": "lo"}],
            "ips": [{"version": "4", "address": "127.0.0.1/8", "interface": 0}],
            "dns": {"nameservers": ["192.0.2.53"]}}
    merged = plugin.merge_result(prev, RESULT)
    assert [i["name"] for i in merged["interfaces"]] == ["lo", "eth0"]
    assert merged["ips"][1]["interface"] == 1
    assert "version" not in merged["ips"][0]
    assert merged["dns"]["nameservers"] == ["192.0.2.53", "10.0.2.3"]


def test_dns_passthrough_adds_our_server(rundir: str) -> None:
    s = plugin.parse_settings(conf(dns={"nameservers": ["192.0.2.1"], "search": ["a.b"],
                                        "options": ["ndots:2"], "domain": "a.b"}), {})
    assert s["dns"] == {"nameservers": ["10.0.2.3", "192.0.2.1"], "search": ["a.b"],
                        "options": ["ndots:2"], "domain": "a.b"}
    s = plugin.parse_settings(conf(cidr="10.9.8.0/24"), {})
    assert s["dns"]["nameservers"] == ["10.9.8.3"]
    assert (s["address"], s["gateway"]) == ("10.9.8.100", "10.9.8.2")


def test_plugin_imports_only_the_small_modules() -> None:
    """The executable's startup cost: no typing, asyncio, ipaddress, socket wrapper, json."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); "
            "import pyslirp.cni.plugin; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-IS", "-c", code, REPO], capture_output=True,
                         text=True, check=True).stdout.split()
    for heavy in ("typing", "asyncio", "ipaddress", "socket", "json", "re", "uvloop"):
        assert heavy not in out


# ---- the plugin's own JSON reader and writer

JSON_SAMPLES = [
    '{}', '[]', '""', '0', '-0', '1.5e3', '-12', '3.25', '1E-2', 'true', 'false', 'null',
    '{"a": [1, 2, {"b": null}], "c": "x\\u00e9\\n\\"q\\"", "d": -0.5}',
    ' \n\t{ "k" : [ ] , "l" : { } } \r\n',
    '"\\ud83d\\ude00 snow \u2603"',
]


@pytest.mark.parametrize("text", JSON_SAMPLES)
def test_loads_agrees_with_json(text: str) -> None:
    assert plugin.loads(text) == json.loads(text)
    assert json.loads(plugin.dumps(plugin.loads(text))) == json.loads(text)


@pytest.mark.parametrize("text", ['', '{', '{"a"}', '{"a":1,}', '[1,]', '01', '1.', '-',
                                  'tru', '{"a":1} x', "{'a':1}", '"\x01"', '[1 2]',
                                  '.5', '1e', '"unterminated'])
def test_loads_rejects_what_json_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        plugin.loads(text)


def test_loads_is_strict_about_nan() -> None:
    with pytest.raises(ValueError):
        plugin.loads('{"mtu": NaN}')  # json.loads accepts it; RFC 8259 does not


def test_dumps_round_trips_arbitrary_documents() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers() | st.text() | \
        st.floats(allow_nan=False, allow_infinity=False)
    docs = st.recursive(leaves, lambda c: st.lists(c) | st.dictionaries(st.text(), c),
                        max_leaves=30)

    @given(docs)
    def check(doc: Any) -> None:
        text = plugin.dumps(doc)
        assert json.loads(text) == doc
        assert plugin.loads(text) == doc
        assert plugin.loads(json.dumps(doc)) == doc

    check()


def test_pyslirp_cni_install(tmp_path: Any) -> None:
    target = tmp_path / "opt-cni-bin"
    proc = subprocess.run([sys.executable, "-m", "pyslirp", "cni", "install", str(target)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    exe = target / "slirp"
    assert proc.stdout.strip() == str(exe)
    assert os.access(exe, os.X_OK)
    assert exe.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    out = exec_plugin(str(target), "slirp", "VERSION", b"")
    assert out.ok and out.doc["supportedVersions"] == ALL_VERSIONS
    bad = subprocess.run([sys.executable, "-m", "pyslirp", "cni", "frob"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_unusable_runtime_dir_is_an_io_error(run: Any, tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = run("ADD", conf(runtimeDir=str(blocker / "run")))
    assert out.code == 5 and str(blocker) in out.msg, out.doc


def test_runtime_dir_choice() -> None:
    """Root on the host: /run/pyslirp; root inside a rootless user namespace: XDG."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pyslirp.cni import plugin; "
            "import os; print(plugin.runtime_dir(dict(os.environ)))")
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYSLIRP_RUNDIR", "XDG_RUNTIME_DIR")}
    xdg = {**base, "XDG_RUNTIME_DIR": "/run/user/1000"}

    def ask(env: dict[str, str], prefix: tuple[str, ...] = ()) -> str:
        return subprocess.run([*prefix, sys.executable, "-c", code, REPO], env=env,
                              capture_output=True, text=True, check=True).stdout.strip()

    assert ask(xdg) == "/run/pyslirp"
    assert ask(xdg, ("unshare", "--user", "--map-root-user")) == "/run/user/1000/pyslirp"
    assert ask({**xdg, "PYSLIRP_RUNDIR": "/tmp/x"}) == "/tmp/x"
    assert plugin.runtime_dir({"PYSLIRP_RUNDIR": "/tmp/x"}, {"runtimeDir": "/srv/r"}) == "/srv/r"
    with pytest.raises(plugin.CniError) as err:
        plugin.runtime_dir({}, {"runtimeDir": "relative"})
    assert err.value.code == 7 and "runtimeDir" in err.value.msg
