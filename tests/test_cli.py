"""pyslirp's command line: slirp4netns-compatible parsing, messages, exit codes, dispatch.

No test here lets the real runtime start: main() is always given a fake
``pyslirp.runtime.main``, and every PID is one no kernel hands out (999999999
is far above PID_MAX_LIMIT), so even a parsing bug cannot touch a real namespace.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator

import pytest

from pyslirp import cli, logsetup
from pyslirp.cli import InfoRequested, Options, UsageError, main, parse_args
from pyslirp.runtime import tap as tap_module
from pyslirp.runtime.tap import TapHandle

NOPID = "999999999"  # > PID_MAX_LIMIT (2**22): never a live process
SLIRP4NETNS = shutil.which("slirp4netns")


def parse(*argv: str) -> Options:
    return parse_args(list(argv))


def usage_error(*argv: str) -> str:
    with pytest.raises(UsageError) as info:
        parse_args(list(argv))
    return str(info.value)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    root_level = root.level
    ours = logging.getLogger("pyslirp")
    our_level = ours.level
    yield
    logsetup.remove_handler()
    root.setLevel(root_level)
    ours.setLevel(our_level)


# --- defaults and every option ----------------------------------------------------------

def test_defaults_match_slirp4netns() -> None:
    opts = parse(NOPID)
    assert opts.subcommand == "serve"
    assert opts.target == NOPID and opts.pid == 999999999
    assert opts.netns_type == "pid"
    assert opts.tapname == "tap0"
    assert opts.configure is False
    assert opts.mtu == 1500
    assert opts.cidr == ipaddress.IPv4Network("10.0.2.0/24")
    assert not opts.disable_host_loopback and not opts.disable_dns
    assert opts.userns_path is None and opts.macaddress is None
    assert opts.ready_fd is None and opts.exit_fd is None
    assert opts.dns_upstreams == [] and opts.pcap is None
    assert opts.log_level == "info" and opts.offload is True
    assert opts.command == [] and opts.extra_args == []


def test_tapname_positional() -> None:
    assert parse(NOPID, "eth7").tapname == "eth7"


@pytest.mark.parametrize("argv", [
    ["-c"], ["--configure"], ["--conf"],
])
def test_configure(argv: list[str]) -> None:
    assert parse(*argv, NOPID).configure is True


@pytest.mark.parametrize("argv", [
    ["-m", "9000"], ["-m9000"], ["--mtu=9000"], ["--mtu", "9000"], ["--mt", "9000"],
    ["-cm9000"], ["--mtu", "+9000"], ["--mtu", " 9000"], ["--mtu", "09000"],
])
def test_mtu_forms(argv: list[str]) -> None:
    # strtol semantics: leading blanks, a sign and leading zeros are all fine.
    assert parse(*argv, NOPID).mtu == 9000


def test_mtu_limits() -> None:
    assert parse("--mtu", "65521", NOPID).mtu == 65521
    assert parse("--mtu", "68", NOPID).mtu == 68


@pytest.mark.parametrize("flag, attr", [
    ("--disable-host-loopback", "disable_host_loopback"),
    ("--disable-dns", "disable_dns"),
])
def test_disable_flags(flag: str, attr: str) -> None:
    assert getattr(parse(flag, NOPID), attr) is True


def test_cidr() -> None:
    opts = parse("--cidr=192.168.100.0/24", NOPID)
    assert opts.cidr == ipaddress.IPv4Network("192.168.100.0/24")
    assert opts.net_config().gateway == bytes([192, 168, 100, 2])
    assert parse("--cidr", "10.0.0.0/8", NOPID).cidr.prefixlen == 8
    assert parse("--cidr", "172.16.0.0/25", NOPID).cidr.prefixlen == 25


def test_netns_type_path(tmp_path: os.PathLike[str]) -> None:
    netns = os.path.join(tmp_path, "netns")
    open(netns, "w").close()
    opts = parse("--netns-type=path", netns, "tap1")
    assert opts.netns_type == "path" and opts.target == netns and opts.pid is None
    assert opts.tapname == "tap1"
    assert parse("--netns-type", "pid", NOPID).netns_type == "pid"


def test_pid_is_normalised_like_strtol() -> None:
    assert parse("+42").target == "42"
    assert parse(" 42").pid == 42


def test_userns_path(tmp_path: os.PathLike[str]) -> None:
    assert parse("--userns-path", str(tmp_path), NOPID).userns_path == str(tmp_path)


@pytest.mark.parametrize("text, mac", [
    ("52:55:0a:00:02:64", b"\x52\x55\x0a\x00\x02\x64"),
    ("2:2:3:4:5:6", b"\x02\x02\x03\x04\x05\x06"),
    ("AA-BB-CC-DD-EE-FF", b"\xaa\xbb\xcc\xdd\xee\xff"),
])
def test_macaddress(text: str, mac: bytes) -> None:
    assert parse("-c", "--macaddress", text, NOPID).macaddress == mac


@pytest.mark.parametrize("argv, attr, value", [
    (["-r", "5"], "ready_fd", 5),
    (["--ready-fd=0"], "ready_fd", 0),
    (["-e", "7"], "exit_fd", 7),
    (["--exit-fd", "12"], "exit_fd", 12),
])
def test_fds(argv: list[str], attr: str, value: int) -> None:
    # slirp4netns 1.2.0 no longer requires -c for -r.
    assert getattr(parse(*argv, NOPID), attr) == value


@pytest.mark.parametrize("text, expected", [
    ("1.1.1.1", ("1.1.1.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("[::1]", ("::1", 53)),
    ("[::1]:5300", ("::1", 5300)),
    ("fd00::3", ("fd00::3", 53)),
    ("[FD00:0::3]:53", ("fd00::3", 53)),
])
def test_dns_upstream(text: str, expected: tuple[str, int]) -> None:
    assert parse("--dns-upstream", text, NOPID).dns_upstreams == [expected]


def test_dns_upstream_repeats_in_order() -> None:
    opts = parse("--dns-upstream=127.0.0.1:5300", "--dns-upstream", "[::1]", NOPID)
    assert opts.dns_upstreams == [("127.0.0.1", 5300), ("::1", 53)]


def test_pcap_log_level_no_offload() -> None:
    opts = parse("--pcap", "/tmp/x.pcap", "--log-level=DEBUG", "--no-offload", NOPID)
    assert opts.pcap == "/tmp/x.pcap"
    assert opts.log_level == "debug"
    assert opts.offload is False
    for level in ("debug", "info", "warning", "error"):
        assert parse("--log-level", level, NOPID).log_level == level


def test_busy_poll_microseconds_reach_the_runtime_config() -> None:
    assert parse(NOPID).net_config().busy_poll == cli.DEFAULT_BUSY_POLL_US / 1e6
    assert parse("--busy-poll", "0", NOPID).net_config().busy_poll == 0
    assert parse("--busy-poll=250", NOPID).net_config().busy_poll == 250e-6
    assert parse("run", "--busy-poll=0", "--", "true").net_config().busy_poll == 0


def test_max_buffered_reaches_the_stack_config() -> None:
    assert parse(NOPID).net_config().max_buffered == 256 << 20
    assert parse("--max-buffered=64M", NOPID).net_config().max_buffered == 64 << 20
    assert parse("--max-buffered", "2097152", NOPID).net_config().max_buffered == 2 << 20
    assert parse("--max-buffered=1g", NOPID).net_config().max_buffered == 1 << 30
    assert parse("run", "--max-buffered=4096K", "--", "true").net_config().max_buffered \
        == 4 << 20


def test_options_after_positionals_are_parsed() -> None:
    # GNU getopt permutes argv, so slirp4netns accepts "PID TAP -c".
    opts = parse(NOPID, "tap3", "-c", "--mtu", "9000")
    assert opts.configure and opts.mtu == 9000 and opts.tapname == "tap3"


def test_double_dash_ends_options() -> None:
    assert usage_error("--", "-c") == "PID must be a positive integer"
    assert parse("-c", "--", NOPID).configure


def test_required_argument_takes_next_word_even_if_it_looks_like_an_option() -> None:
    assert usage_error("--mtu", "--configure", NOPID) == "MTU must be a positive integer (< 65522)"


def test_too_many_arguments_is_kept_not_an_error() -> None:
    assert parse(NOPID, "tap0", "extra", "more").extra_args == ["extra", "more"]


# --- net_config ---------------------------------------------------------------------------

def test_net_config_carries_every_network_option() -> None:
    opts = parse("-c", "--mtu=9000", "--cidr=10.8.0.0/16", "--disable-host-loopback",
                 "--disable-dns", "--macaddress=02:00:00:00:00:01",
                 "--dns-upstream=127.0.0.1:5300", "--no-offload", NOPID)
    cfg = opts.net_config()
    assert cfg.mtu == 9000
    assert cfg.network == ipaddress.IPv4Network("10.8.0.0/16")
    assert cfg.guest_addr == bytes([10, 8, 0, 100])
    assert cfg.disable_host_loopback and cfg.disable_dns
    assert cfg.guest_mac == b"\x02\x00\x00\x00\x00\x01"
    assert cfg.dns_upstreams == [("127.0.0.1", 5300)]
    assert cfg.vnet_hdr is False and cfg.offload is False
    cfg.dns_upstreams.append(("127.0.0.2", 53))
    assert opts.net_config().dns_upstreams == [("127.0.0.1", 5300)]


def test_net_config_defaults_use_vnet_header_and_offload() -> None:
    cfg = parse(NOPID).net_config()
    assert cfg.vnet_hdr and cfg.offload and cfg.guest_mac is None


# --- errors: wording and order ------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    ([], "missing PID|PATH argument (see 'pyslirp --help')"),
    (["-c"], "missing PID|PATH argument (see 'pyslirp --help')"),
    (["--foo", NOPID], "unrecognized option '--foo'"),
    (["--foo=1", NOPID], "unrecognized option '--foo=1'"),
    (["-x", NOPID], "invalid option -- 'x'"),
    (["-cx", NOPID], "invalid option -- 'x'"),
    (["--mtu"], "option '--mtu' requires an argument"),
    (["--cid"], "option '--cidr' requires an argument"),
    (["-m"], "option requires an argument -- 'm'"),
    (["--configure=yes", NOPID], "option '--configure' doesn't allow an argument"),
    (["--help=x"], "option '--help' doesn't allow an argument"),
    (["--disable", NOPID], "option '--disable' is ambiguous; possibilities: "
                           "'--disable-host-loopback' '--disable-dns'"),
    (["--mtu", "0", NOPID], "MTU must be a positive integer (< 65522)"),
    (["--mtu", "65522", NOPID], "MTU must be a positive integer (< 65522)"),
    (["--mtu", "-5", NOPID], "MTU must be a positive integer (< 65522)"),
    (["--mtu", "abc", NOPID], "MTU must be a positive integer (< 65522)"),
    (["--mtu", "0x10", NOPID], "MTU must be a positive integer (< 65522)"),
    (["--mtu", "10x", NOPID], "MTU must be a positive integer (< 65522)"),
    (["--mtu", "", NOPID], "MTU must be a positive integer (< 65522)"),
    (["--mtu", "67", NOPID], "MTU 67 is out of range 68..65521"),
    (["-r", "abc", NOPID], "ready-fd must be a non-negative integer"),
    (["-r", "-1", NOPID], "ready-fd must be a non-negative integer"),
    (["--ready-fd", "1x", NOPID], "ready-fd must be a non-negative integer"),
    (["-e", "abc", NOPID], "exit-fd must be a non-negative integer"),
    (["--exit-fd=-3", NOPID], "exit-fd must be a non-negative integer"),
    (["--userns-path", "/nonexistent/userns", NOPID],
     "userns path doesn't exist: /nonexistent/userns"),
    (["--macaddress", "52:55:0a:00:02:02", NOPID],
     "--macaddr cannot be specified when --configure or -c is not specified"),
    (["-c", "--macaddress", "zz", NOPID],
     "\"zz\" is an invalid MAC address (expected 6 hex bytes separated by ':')"),
    # The kernel refuses these for an interface; slirp4netns would fail only after starting.
    (["-c", "--macaddress", "01:00:5e:00:00:01", NOPID],
     "\"01:00:5e:00:00:01\" is an invalid MAC address (a multicast address)"),
    (["-c", "--macaddress", "00:00:00:00:00:00", NOPID],
     "\"00:00:00:00:00:00\" is an invalid MAC address (all zeros)"),
    (["-c", "--macaddress", "52:55:0a:00:02:02:03", NOPID],
     "\"52:55:0a:00:02:02:03\" is an invalid MAC address (expected 6 hex bytes separated "
     "by ':')"),
    (["abc"], "PID must be a positive integer"),
    (["0"], "PID must be a positive integer"),
    (["--", "-5"], "PID must be a positive integer"),
    (["12abc"], "PID must be a positive integer"),
    (["99999999999999999999"], "PID must be a positive integer"),
    (["--netns-type=net", NOPID], '--netns-type must be either "pid" or "path"'),
    (["--netns-type=path", "/nonexistent/netns"],
     "existing path expected when --netns-type=path: /nonexistent/netns: "
     "No such file or directory"),
    (["--cidr", "foo", NOPID], "invalid CIDR: foo"),
    (["--cidr", "10.0.2.0", NOPID], "invalid CIDR: 10.0.2.0"),
    (["--cidr", "10.0.2.0/255.255.255.0", NOPID], "invalid CIDR: 10.0.2.0/255.255.255.0"),
    (["--cidr", "300.0.0.0/8", NOPID], "invalid network address: 300.0.0.0"),
    (["--cidr", "10.0.2.0/26", NOPID], "prefix length needs to be 1-25 (--cidr=10.0.2.0/26)"),
    (["--cidr", "0.0.0.0/0", NOPID], "prefix length needs to be 1-25 (--cidr=0.0.0.0/0)"),
    (["--cidr", "10.0.2.100/24", NOPID],
     "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24"),
    (["--cidr", "10.0.2.1/16", NOPID],
     "CIDR needs to be a network address like 10.0.0.0/16, not like 10.0.2.1/16"),
    (["--dns-upstream", "dns.example", NOPID],
     "invalid --dns-upstream 'dns.example': expected IPv4[:PORT] or [IPv6][:PORT]"),
    (["--dns-upstream", "[::1", NOPID],
     "invalid --dns-upstream '[::1': expected IPv4[:PORT] or [IPv6][:PORT]"),
    (["--dns-upstream", "[::1]53", NOPID],
     "invalid --dns-upstream '[::1]53': expected IPv4[:PORT] or [IPv6][:PORT]"),
    (["--dns-upstream", "[127.0.0.1]:53", NOPID],
     "invalid --dns-upstream '[127.0.0.1]:53': expected IPv4[:PORT] or [IPv6][:PORT]"),
    (["--dns-upstream", "1.2.3.4:0", NOPID],
     "invalid --dns-upstream '1.2.3.4:0': port must be 1..65535"),
    (["--dns-upstream", "[::1]:65536", NOPID],
     "invalid --dns-upstream '[::1]:65536': port must be 1..65535"),
    (["--dns-upstream", "1.2.3.4:dns", NOPID],
     "invalid --dns-upstream '1.2.3.4:dns': port must be 1..65535"),
    (["--pcap=", NOPID], "--pcap needs a file name"),
    (["--busy-poll", "-5", NOPID],
     "--busy-poll must be microseconds from 0 to 1000000 (not '-5')"),
    (["--busy-poll=1000001", NOPID],
     "--busy-poll must be microseconds from 0 to 1000000 (not '1000001')"),
    (["--busy-poll=fast", NOPID],
     "--busy-poll must be microseconds from 0 to 1000000 (not 'fast')"),
    (["--busy-poll=\u00b2", NOPID],
     "--busy-poll must be microseconds from 0 to 1000000 (not '\u00b2')"),
    (["--max-buffered=lots", NOPID],
     "--max-buffered must be a byte count, optionally with a K, M or G suffix (not 'lots')"),
    (["--max-buffered=-1M", NOPID],
     "--max-buffered must be a byte count, optionally with a K, M or G suffix (not '-1M')"),
    (["--max-buffered=512K", NOPID], "--max-buffered must be at least 1M (not '512K')"),
    (["--log-level", "trace", NOPID],
     "--log-level must be one of debug, info, warning, error (not 'trace')"),
    ([NOPID, "a-very-long-tapname"],
     "invalid TAPNAME 'a-very-long-tapname': must be 1-15 bytes without '/' or spaces"),
    ([NOPID, "tap/0"], "invalid TAPNAME 'tap/0': must be 1-15 bytes without '/' or spaces"),
    ([NOPID, "tap:0"],
     "invalid TAPNAME 'tap:0': must not contain '/', ':', NUL or whitespace"),
    ([NOPID, ".."], "invalid TAPNAME '..': must not be '.' or '..'"),
])
def test_error_messages(argv: list[str], message: str) -> None:
    assert usage_error(*argv) == message


@pytest.mark.parametrize("argv", [
    ["--no-host-loopback"],
])
def test_unimplemented_slirp4netns_options_are_unknown(argv: list[str]) -> None:
    message = usage_error(*argv, NOPID)
    assert message.startswith(("unrecognized option '--", "invalid option -- '"))


@pytest.mark.parametrize("argv", [
    ["--api-socket=/tmp/api.sock"], ["--api-socket", "/tmp/api.sock"], ["-a", "/tmp/api.sock"],
    ["-a/tmp/api.sock"], ["--api=/tmp/api.sock"], ["-ca", "/tmp/api.sock"],
])
def test_api_socket(argv: list[str]) -> None:
    assert parse(*argv, NOPID).api_socket == "/tmp/api.sock"
    assert parse(NOPID).api_socket is None


def test_api_socket_needs_a_path() -> None:
    assert usage_error("--api-socket=", NOPID) == "--api-socket needs a path"
    assert usage_error(NOPID, "-a") == "option requires an argument -- 'a'"
    assert usage_error("run", "--api-socket=/x", "true").startswith("unrecognized option")


def test_options_act_in_order() -> None:
    # getopt: an error before --help wins, anything after --help is never looked at.
    assert usage_error("--mtu", "0", "--help") == "MTU must be a positive integer (< 65522)"
    with pytest.raises(InfoRequested) as info:
        parse("--help", "--bogus", "--mtu", "0")
    assert info.value.text.startswith("Usage: pyslirp ")
    with pytest.raises(InfoRequested) as info:
        parse("-hv")
    assert info.value.text.startswith("Usage: ")
    with pytest.raises(InfoRequested) as info:
        parse("-vh")
    assert info.value.text.startswith("pyslirp version ")


def test_macaddress_check_comes_before_pid_check() -> None:
    assert usage_error("--macaddress=zz", "abc").startswith("--macaddr cannot be specified")


# --- run subcommand -----------------------------------------------------------------------

def test_run_parses_network_options_and_command() -> None:
    opts = parse("run", "--mtu", "9000", "--cidr=10.9.0.0/24", "--disable-host-loopback",
                 "--disable-dns", "--dns-upstream=127.0.0.1:5300", "--pcap=/tmp/r.pcap",
                 "--log-level=warning", "--macaddress=02:00:00:00:00:02", "--no-offload",
                 "--", "sh", "-c", "echo hi")
    assert opts.subcommand == "run"
    assert opts.command == ["sh", "-c", "echo hi"]
    assert opts.configure is True
    assert opts.mtu == 9000 and opts.cidr == ipaddress.IPv4Network("10.9.0.0/24")
    assert opts.disable_host_loopback and opts.disable_dns
    assert opts.dns_upstreams == [("127.0.0.1", 5300)]
    assert opts.pcap == "/tmp/r.pcap" and opts.log_level == "warning"
    assert opts.macaddress == b"\x02\x00\x00\x00\x00\x02" and opts.offload is False
    assert opts.target == "" and opts.pid is None


def test_run_stops_at_the_command() -> None:
    # The command's own options are not ours, with or without "--".
    opts = parse("run", "-m9000", "curl", "--mtu", "-c", "http://10.0.2.2/")
    assert opts.mtu == 9000
    assert opts.command == ["curl", "--mtu", "-c", "http://10.0.2.2/"]
    assert parse("run", "--", "--weird-name").command == ["--weird-name"]


def test_run_defaults() -> None:
    opts = parse("run", "true")
    assert opts.mtu == 1500 and opts.cidr == ipaddress.IPv4Network("10.0.2.0/24")
    assert opts.offload and opts.log_level == "info" and opts.configure


@pytest.mark.parametrize("argv, message", [
    (["run"], "missing command to run (pyslirp run [RUN-OPTION]... [--] COMMAND [ARG]...)"),
    (["run", "--mtu", "9000"], "missing command to run (pyslirp run [RUN-OPTION]... [--] "
                               "COMMAND [ARG]...)"),
    (["run", "--"], "missing command to run (pyslirp run [RUN-OPTION]... [--] COMMAND "
                    "[ARG]...)"),
    (["run", "-c", "true"], "invalid option -- 'c'"),
    (["run", "-r", "3", "true"], "invalid option -- 'r'"),
    (["run", "--netns-type=path", "true"], "unrecognized option '--netns-type=path'"),
    (["run", "--userns-path=/", "true"], "unrecognized option '--userns-path=/'"),
    (["run", "--version"], "unrecognized option '--version'"),
    (["run", "--mtu", "0", "true"], "MTU must be a positive integer (< 65522)"),
    (["run", "--cidr=10.0.2.0/26", "true"], "prefix length needs to be 1-25 (--cidr=10.0.2.0/26)"),
    (["run", "--macaddress=zz", "true"],
     "\"zz\" is an invalid MAC address (expected 6 hex bytes separated by ':')"),
])
def test_run_errors(argv: list[str], message: str) -> None:
    assert usage_error(*argv) == message


def test_run_help() -> None:
    with pytest.raises(InfoRequested) as info:
        parse("run", "--help")
    assert "pyslirp run" in info.value.text


# --- help and version ---------------------------------------------------------------------

def test_help_lists_options() -> None:
    text = cli.USAGE
    assert text.startswith("Usage: pyslirp [OPTION]... PID|PATH [TAPNAME]\n")
    for option in ("--configure", "--exit-fd", "--ready-fd", "--mtu", "--cidr",
                   "--disable-host-loopback", "--netns-type", "--userns-path", "--disable-dns",
                   "--macaddress", "--help", "--version", "--dns-upstream", "--pcap",
                   "--log-level", "--no-offload", "--busy-poll", "pyslirp run",
                   "-a, --api-socket=PATH"):
        assert option in text
    for absent in ("--no-host-loopback", "--create-sandbox"):
        assert absent not in text


def test_version_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "git_commit", lambda: "v0.1.0-3-gabcdef0")
    monkeypatch.setattr(cli, "_libseccomp_version", lambda: "9.8.7")
    assert cli.version_text().splitlines() == [
        "pyslirp version 0.1.0",
        "commit: v0.1.0-3-gabcdef0",
        "libslirp: pyslirp-0.1.0",
        "SLIRP_CONFIG_VERSION_MAX: 4",
        "libseccomp: 9.8.7",
    ]


def test_git_commit_unknown_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_git(*_a: object, **_k: object) -> None:
        raise FileNotFoundError("git")
    monkeypatch.setattr(subprocess, "run", no_git)
    assert cli.git_commit() == "unknown"


def test_git_commit_ignores_an_enclosing_foreign_repository(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def foreign(args: list[str], **_k: object) -> subprocess.CompletedProcess[str]:
        out = "/somewhere/else\n" if "rev-parse" in args else "deadbee\n"
        return subprocess.CompletedProcess(args, 0, out, "")
    monkeypatch.setattr(subprocess, "run", foreign)
    assert cli.git_commit() == "unknown"


def test_git_commit_reports_describe_of_our_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))

    def ours(args: list[str], **_k: object) -> subprocess.CompletedProcess[str]:
        out = root + "\n" if "rev-parse" in args else "v0.1.0-dirty\n"
        return subprocess.CompletedProcess(args, 0, out, "")
    monkeypatch.setattr(subprocess, "run", ours)
    assert cli.git_commit() == "v0.1.0-dirty"


# --- main(): output streams, exit codes, logging, dispatch --------------------------------

class FakeRuntime:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Options]] = []
        self.status = 0
        self.raise_exc: BaseException | None = None
        self.taps: list[tuple[str, str, dict[str, object]]] = []

    def _record(self, kind: str, opts: Options) -> int:
        self.calls.append((kind, opts))
        log = logging.getLogger("pyslirp.runtime")
        log.debug("debug detail")
        log.info("serving")
        log.warning("careful")
        logging.getLogger("pyroute2").info("third-party chatter")
        logging.getLogger("pyroute2").warning("third-party warning")
        if self.raise_exc is not None:
            raise self.raise_exc
        return self.status

    def start_open_tap(self, target: str, netns_type: str,
                       **kwargs: object) -> types.SimpleNamespace:
        self.taps.append((target, netns_type, kwargs))
        handle = TapHandle(fd=-1, name=str(kwargs.get("tapname", "tap0")), vnet_hdr=True,
                           offload=True, uso=False, mac=bytes(6), mtu=1500)
        return types.SimpleNamespace(wait=lambda: handle)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    fake = FakeRuntime()
    module = types.ModuleType("pyslirp.runtime.main")
    module.serve_namespace = (  # type: ignore[attr-defined]
        lambda spec, tap=None: fake._record("serve", spec))
    module.run_command = lambda spec: fake._record("run", spec)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyslirp.runtime.main", module)
    # The command line opens the TAP itself before it imports the runtime (cli's
    # "Start-up order"): that is faked too, recording what was asked for.
    monkeypatch.setattr(tap_module, "start_open_tap", fake.start_open_tap)
    return fake


def test_main_serves_namespace(runtime: FakeRuntime, capsys: pytest.CaptureFixture[str]) -> None:
    runtime.status = 3
    assert main(["-c", "--mtu=9000", NOPID, "tap9"]) == 3
    [(target, netns_type, tap_args)] = runtime.taps
    assert (target, netns_type, tap_args["tapname"], tap_args["mtu"]) == \
        ("999999999", "pid", "tap9", 9000)
    assert tap_args["configure"] == tap_module.ConfigureSpec(
        ipaddress.IPv4Interface("10.0.2.100/24"), ipaddress.IPv4Address("10.0.2.2"))
    [(kind, spec)] = runtime.calls
    assert kind == "serve" and spec.target == "999999999" and spec.tapname == "tap9"
    assert spec.net.mtu == 9000 and spec.configure
    assert spec.hardening.userns_path == "/proc/999999999/ns/user"
    assert capsys.readouterr().out == ""


def test_main_runs_command(runtime: FakeRuntime) -> None:
    runtime.status = 42
    assert main(["run", "--", "sh", "-c", "exit 42"]) == 42
    [(kind, spec)] = runtime.calls
    assert kind == "run" and spec.command == ("sh", "-c", "exit 42")


def test_main_log_format_and_default_level(runtime: FakeRuntime,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    main([NOPID])
    lines = capsys.readouterr().err.splitlines()
    assert "pyslirp: INFO: serving" in lines
    assert "pyslirp: WARNING: careful" in lines
    assert "pyslirp: WARNING: third-party warning" in lines
    assert not any("debug detail" in line or "third-party chatter" in line for line in lines)


def test_main_log_level_debug_and_error(runtime: FakeRuntime,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    main(["--log-level=debug", NOPID])
    err = capsys.readouterr().err.splitlines()
    assert "pyslirp: DEBUG: debug detail" in err
    assert not any("third-party chatter" in line for line in err)  # only our loggers go verbose
    main(["--log-level=error", NOPID])
    assert capsys.readouterr().err == ""


def test_main_logging_is_not_duplicated_across_calls(runtime: FakeRuntime,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    main([NOPID])
    main([NOPID])
    assert capsys.readouterr().err.count("pyslirp: INFO: serving") == 2


def test_main_warns_about_extra_arguments(runtime: FakeRuntime,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main([NOPID, "tap0", "extra"]) == 0
    assert "pyslirp: WARNING: too many arguments" in capsys.readouterr().err.splitlines()
    assert runtime.calls[0][1].tapname == "tap0"  # the extra one is warned about, not served


def test_main_usage_error_is_one_stderr_line(runtime: FakeRuntime,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--mtu", "0", NOPID]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "pyslirp: MTU must be a positive integer (< 65522)\n"
    assert runtime.calls == []


def test_main_help_and_version_go_to_stdout(runtime: FakeRuntime,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out == cli.USAGE and err == ""
    assert main(["-v"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("pyslirp version 0.1.0\ncommit: ") and err == ""
    assert runtime.calls == []


def test_main_without_runtime_fails_cleanly(monkeypatch: pytest.MonkeyPatch, runtime: FakeRuntime,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "pyslirp.runtime.main", None)
    assert main([NOPID]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyslirp: ERROR: the runtime is not available: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("hardening", ["--enable-sandbox", "--enable-seccomp"])
def test_hardened_start_without_runtime_fails_cleanly_and_closes_the_tap(
        monkeypatch: pytest.MonkeyPatch, runtime: FakeRuntime,
        capsys: pytest.CaptureFixture[str], hardening: str) -> None:
    # Hardened, the engine loads while the TAP helper works (cli's "Start-up order"):
    # failing there still collects the TAP, and closes it.
    tap_fd, other = os.pipe()
    os.close(other)
    handle = TapHandle(fd=tap_fd, name="tap0", vnet_hdr=True, offload=True, uso=False,
                       mac=bytes(6), mtu=1500)
    monkeypatch.setattr(tap_module, "start_open_tap",
                        lambda *a, **k: types.SimpleNamespace(wait=lambda: handle))
    monkeypatch.setitem(sys.modules, "pyslirp.runtime.main", None)
    assert main([hardening, NOPID]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyslirp: ERROR: the runtime is not available: ")
    assert err.count("ERROR") == 1
    with pytest.raises(OSError):
        os.fstat(tap_fd)


def test_main_keyboard_interrupt_exits_130(runtime: FakeRuntime) -> None:
    runtime.raise_exc = KeyboardInterrupt()
    assert main([NOPID]) == 130


def test_main_reads_sys_argv(runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["pyslirp", "--disable-dns", NOPID])
    assert main() == 0
    assert runtime.calls[0][1].net.disable_dns


# --- the real executable ------------------------------------------------------------------

def _python_m(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyslirp", *args], capture_output=True,
                          text=True, timeout=60)


def test_python_m_help() -> None:
    proc = _python_m("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    for option in ("--netns-type", "--cidr", "--disable-host-loopback", "--mtu", "--configure",
                   "--userns-path", "--macaddress", "--ready-fd", "--exit-fd"):
        assert option in proc.stdout


def test_python_m_version() -> None:
    proc = _python_m("-v")
    assert proc.returncode == 0
    keys = [line.split(":")[0].split(" version")[0] for line in proc.stdout.splitlines()]
    assert keys == ["pyslirp", "commit", "libslirp", "SLIRP_CONFIG_VERSION_MAX", "libseccomp"]


def test_python_m_bad_argument() -> None:
    proc = _python_m("--cidr=10.0.2.0/26", NOPID)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "pyslirp: prefix length needs to be 1-25 (--cidr=10.0.2.0/26)\n"


# --- side by side with slirp4netns --------------------------------------------------------

needs_slirp4netns = pytest.mark.skipif(SLIRP4NETNS is None, reason="slirp4netns not installed")


def _slirp4netns_error(*argv: str) -> str:
    """slirp4netns's first stderr line for a command line it rejects while parsing."""
    assert SLIRP4NETNS is not None
    proc = subprocess.run([SLIRP4NETNS, *argv], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 1, proc
    return re.sub(r"^\S*slirp4netns: ", "", proc.stderr.splitlines()[0])


# Every case fails in slirp4netns's parsing, before it looks at any namespace; the
# positional is a PID no process can have, so a surprise would still touch nothing.
SAME_WORDING = [
    ["--foo", NOPID, "tap0"],
    ["--foo=1", NOPID, "tap0"],
    ["-x", NOPID, "tap0"],
    ["--mtu"],
    ["--cid"],
    ["-m"],
    ["--configure=1", NOPID, "tap0"],
    ["--help=x"],
    ["--disable", NOPID, "tap0"],
    ["--mtu", "0", NOPID, "tap0"],
    ["--mtu", "65522", NOPID, "tap0"],
    ["--mtu", "abc", NOPID, "tap0"],
    ["--mtu", "0x10", NOPID, "tap0"],
    ["-r", "abc", NOPID, "tap0"],
    ["-r", "-1", NOPID, "tap0"],
    ["-e", "abc", NOPID, "tap0"],
    ["--exit-fd=-3", NOPID, "tap0"],
    ["--userns-path", "/nonexistent/userns", NOPID, "tap0"],
    ["--macaddress", "52:55:0a:00:02:02", NOPID, "tap0"],
    ["abc", "tap0"],
    ["0", "tap0"],
    ["--", "-5", "tap0"],
    ["12abc", "tap0"],
    ["--cidr", "foo", NOPID, "tap0"],
    ["--cidr", "10.0.2.0", NOPID, "tap0"],
    ["--cidr", "300.0.0.0/8", NOPID, "tap0"],
    ["--cidr", "10.0.2.100/24", NOPID, "tap0"],
]


@needs_slirp4netns
@pytest.mark.parametrize("argv", SAME_WORDING, ids=" ".join)
def test_same_message_as_slirp4netns(argv: list[str]) -> None:
    assert usage_error(*argv) == _slirp4netns_error(*argv)


@needs_slirp4netns
def test_extended_messages_keep_slirp4netns_wording() -> None:
    # Where we add the offending value, slirp4netns's words still lead the message.
    argv = ["--cidr", "10.0.2.0/26", NOPID, "tap0"]
    assert usage_error(*argv).startswith(_slirp4netns_error(*argv))
    argv = ["-c", "--macaddress", "zz", NOPID, "tap0"]
    assert usage_error(*argv).startswith(_slirp4netns_error(*argv).rstrip("."))
    argv = ["--netns-type=path", "/nonexistent/netns", "tap0"]
    theirs = _slirp4netns_error(*argv)
    stem, _, why = theirs.rpartition(": ")
    assert usage_error(*argv) == f"{stem}: /nonexistent/netns: {why}"


@needs_slirp4netns
def test_help_shares_slirp4netns_wording() -> None:
    assert SLIRP4NETNS is not None
    theirs = subprocess.run([SLIRP4NETNS, "--help"], capture_output=True, text=True,
                            timeout=10).stdout
    ours = {" ".join(line.split()) for line in cli.USAGE.splitlines()}
    implemented = ("--configure", "--exit-fd", "--ready-fd", "--mtu", "--cidr",
                   "--disable-host-loopback", "--netns-type", "--userns-path", "--disable-dns",
                   "--macaddress", "--help", "--version", "--enable-sandbox", "--enable-seccomp")
    compared = 0
    for line in theirs.splitlines():
        option = re.search(r"--[a-z0-9-]+", line)
        if option is None or option.group() not in implemented:
            continue
        normalised = " ".join(line.replace("slirp4netns", "pyslirp")
                              .replace(" (experimental)", "").split())
        assert normalised in ours
        compared += 1
    assert compared == len(implemented)


@needs_slirp4netns
def test_version_has_slirp4netns_layout() -> None:
    assert SLIRP4NETNS is not None
    theirs = subprocess.run([SLIRP4NETNS, "-v"], capture_output=True, text=True,
                            timeout=10).stdout.splitlines()
    ours = cli.version_text().splitlines()

    def keys(lines: list[str]) -> list[str]:
        return [re.sub(r"^\S+ version .*", "NAME version", line).split(":")[0] for line in lines]
    assert keys(ours) == keys(theirs)


# --- hardening and outbound options (issue 4) ----------------------------------------------

@pytest.mark.parametrize("argv", [["-6"], ["--enable-ipv6"], ["--enable-ip"], ["-c6"]])
def test_enable_ipv6_is_accepted(argv: list[str]) -> None:
    assert parse(*argv, NOPID).enable_ipv6
    assert not parse(NOPID).enable_ipv6


def test_sandbox_and_seccomp_flags() -> None:
    opts = parse("--enable-sandbox", "--enable-seccomp", NOPID)
    assert opts.enable_sandbox and opts.enable_seccomp
    opts = parse(NOPID)
    assert not opts.enable_sandbox and not opts.enable_seccomp
    assert usage_error("--enable", NOPID).startswith("option '--enable' is ambiguous")


def test_outbound_addresses_and_interfaces() -> None:
    opts = parse("--outbound-addr=127.0.0.2", "--outbound-addr6", "::1", NOPID)
    assert (opts.outbound_addr, opts.outbound_addr6) == ("127.0.0.2", "::1")
    # An interface name becomes its first address of the family (lo always has these).
    opts = parse("--outbound-addr=lo", "--outbound-addr6=lo", NOPID)
    assert (opts.outbound_addr, opts.outbound_addr6) == ("127.0.0.1", "::1")
    assert parse(NOPID).outbound_addr is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--outbound-addr=nosuchif0"], "--outbound-addr=nosuchif0: no such interface "
                                    "(expected an IPv4 address or an interface name)"),
    (["--outbound-addr=::1"], "--outbound-addr=::1: not an IPv4 address"),
    (["--outbound-addr6=127.0.0.1"], "--outbound-addr6=127.0.0.1: not an IPv6 address"),
    (["--outbound-addr6=nosuchif0"], "--outbound-addr6=nosuchif0: no such interface "
                                     "(expected an IPv6 address or an interface name)"),
    (["--outbound-addr="], "--outbound-addr needs an IPv4 address or an interface name"),
    (["--outbound-addr=192.0.2.123"], "--outbound-addr=192.0.2.123: cannot bind to it: Cannot "
                                      "assign requested address (not an address of this host?)"),
])
def test_outbound_errors(argv: list[str], message: str) -> None:
    assert usage_error(*argv, NOPID) == message


def test_help_has_what_rootlesskit_and_podman_probe_for() -> None:
    for probe in ("--netns-type", "--enable-ipv6", "--cidr", "--disable-host-loopback",
                  "--api-socket", "--enable-sandbox", "--enable-seccomp", "--mtu",
                  "--outbound-addr", "--outbound-addr6", "-6, --enable-ipv6"):
        assert probe in cli.USAGE


def test_main_serves_ipv6_without_a_warning(runtime: FakeRuntime,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--enable-ipv6", NOPID]) == 0
    err = capsys.readouterr().err
    assert "--enable-ipv6" not in err  # no warning: everything IPv6 is served (docs/ipv6.md)
    assert runtime.calls  # and it serves IPv4 all the same
    main([NOPID])
    assert "IPv6" not in capsys.readouterr().err


def test_version_reports_the_seccomp_library() -> None:
    from pyslirp.runtime import seccomp

    line = cli.version_text().splitlines()[-1]
    version = seccomp.libseccomp_version()
    assert line == f"libseccomp: {version or '(not installed; built-in BPF filter)'}"


# --- the start path's own copies of other modules' facts ("Start-up order") -------------

def test_log_level_names_match_logsetup() -> None:
    assert tuple(logsetup.LOG_LEVELS) == cli.LOG_LEVEL_NAMES
    assert (cli.PROG, cli.DEFAULT_LOG_LEVEL) == (logsetup.PROG, logsetup.DEFAULT_LOG_LEVEL)


@pytest.mark.parametrize("ipv6", [False, True])
def test_parse_refuses_exactly_the_mtus_netconfig_refuses(ipv6: bool) -> None:
    # The parser checks without importing the stack; the stack must agree on every MTU.
    from pyslirp.stack.config import ConfigError, NetConfig

    for mtu in (*range(1, 1300), *range(65500, cli.SLIRP_MAX_MTU + 1)):
        try:
            NetConfig(mtu=mtu, enable_ipv6=ipv6)
            stack_ok = True
        except ConfigError:
            stack_ok = False
        args = [f"--mtu={mtu}", *(["-6"] if ipv6 else []), NOPID]
        try:
            parse(*args)
            parsed_ok = True
        except UsageError:
            parsed_ok = False
        assert parsed_ok == stack_ok, mtu


def test_configure_addresses_match_netconfig() -> None:
    from pyslirp.stack.config import NetConfig

    for cidr in ("10.0.2.0/24", "192.168.7.0/26", "10.99.0.0/16"):
        net = ipaddress.IPv4Network(cidr)
        assert tap_module.ConfigureSpec.for_network(net, ipv6=True) == \
            tap_module.ConfigureSpec.from_netconfig(NetConfig(network=net, enable_ipv6=True))
