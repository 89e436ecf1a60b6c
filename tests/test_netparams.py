"""Network parameter rules (pyslirp.wire.netparams) and the front ends agreeing on them.

The parsers are pure Python (the CNI plugin may not load ``ipaddress``), so
the first part checks them against ``ipaddress`` and slirp4netns's rules; the
second feeds the same values to the CLI, the CNI plugin's configuration, the
KubeVirt sidecar's options and the stack's NetConfig, which must accept and
refuse alike. Each front end's own wording is tested with that front end.
"""

from __future__ import annotations

import argparse
import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyslirp.cli import UsageError, parse_args
from pyslirp.cni import plugin
from pyslirp.kubevirt import sidecar
from pyslirp.stack.config import ConfigError, NetConfig, parse_cidr
from pyslirp.wire import netparams
from pyslirp.wire.netparams import NetParamError

REPO = str(Path(__file__).resolve().parent.parent)
NOPID = "999999999"


def kind_of(fn: Any, *args: Any) -> str | None:
    """The NetParamError kind ``fn(*args)`` raises, or None if it returns."""
    try:
        fn(*args)
    except NetParamError as exc:
        return exc.kind
    return None


def test_module_imports_nothing() -> None:
    """What the CNI plugin's import budget allows: nothing of the stdlib (but __future__)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); "
            "import pyslirp.wire.netparams; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-IS", "-c", code, REPO], capture_output=True,
                         text=True, check=True).stdout.split()
    assert set(out) <= {"__future__", "pyslirp", "pyslirp.wire", "pyslirp.wire.errors",
                        "pyslirp.wire.netparams"}


# ---- MTU


@pytest.mark.parametrize(("mtu", "ok"), [(0, False), (67, False), (68, True), (1500, True),
                                         (65521, True), (65522, False), (-1500, False)])
def test_mtu_range(mtu: int, ok: bool) -> None:
    assert (kind_of(netparams.check_mtu, mtu) is None) == ok


def test_mtu_message_names_value_and_range() -> None:
    with pytest.raises(NetParamError, match=r"^MTU 67 is out of range 68\.\.65521$"):
        netparams.check_mtu(67)


# ---- IPv4 and CIDR

IPV4_SAMPLES = ["0.0.0.0", "255.255.255.255", "10.0.2.0", "1.2.3.4", "256.0.0.1", "1.2.3",
                "1.2.3.4.5", "01.2.3.4", "1.2.3.00", "1.2.3.0", "", "1..3.4", " 1.2.3.4",
                "1.2.3.4 ", "+1.2.3.4", "1.2.3.\u0664", "1.2.3.1000", "1.2.3.-0", "a.b.c.d"]


def _ipaddress_v4(text: str) -> int | None:
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        return None


def _ours_v4(text: str) -> int | None:
    try:
        return netparams.parse_ipv4(text)
    except NetParamError:
        return None


@pytest.mark.parametrize("text", IPV4_SAMPLES)
def test_ipv4_agrees_with_ipaddress(text: str) -> None:
    assert _ours_v4(text) == _ipaddress_v4(text)


@given(st.text(alphabet="0123456789.", max_size=17))
def test_ipv4_agrees_with_ipaddress_on_any_digits_and_dots(text: str) -> None:
    assert _ours_v4(text) == _ipaddress_v4(text)
    if _ours_v4(text) is not None:
        assert netparams.format_ipv4(netparams.parse_ipv4(text)) == text


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.2.0/24", (0x0A000200, 24)),
    ("10.0.0.0/8", (0x0A000000, 8)),
    ("128.0.0.0/1", (0x80000000, 1)),
    ("172.16.0.0/25", (0xAC100000, 25)),
    ("10.0.0.0/08", (0x0A000000, 8)),  # slirp4netns's strtoul reads 08 as 8
])
def test_cidr_accepted(text: str, expected: tuple[int, int]) -> None:
    assert netparams.parse_cidr(text) == expected


@pytest.mark.parametrize(("text", "kind"), [
    ("foo", netparams.SYNTAX),
    ("10.0.2.0", netparams.SYNTAX),
    ("10.0.2.0/", netparams.SYNTAX),
    ("10.0.2.0/255.255.255.0", netparams.SYNTAX),  # ipaddress takes a netmask; slirp4netns no
    ("10.0.2.0/024", netparams.SYNTAX),
    ("10.0.2.0/24 ", netparams.SYNTAX),
    ("10.0.2/24", netparams.SYNTAX),
    ("1000.0.2.0/24", netparams.SYNTAX),
    ("10.0.2.0/\u0662\u0664", netparams.SYNTAX),
    ("300.0.0.0/8", netparams.ADDRESS),
    ("010.0.2.0/24", netparams.ADDRESS),  # inet_pton refuses leading zeros
    ("10.0.2.0/26", netparams.PREFIX),
    ("0.0.0.0/0", netparams.PREFIX),
    ("10.0.2.100/24", netparams.HOST_BITS),
    ("10.0.2.1/16", netparams.HOST_BITS),
])
def test_cidr_refused_by_the_first_rule_broken(text: str, kind: str) -> None:
    assert kind_of(netparams.parse_cidr, text) == kind


def test_cidr_not_strict_masks_host_bits() -> None:
    assert netparams.parse_cidr("10.0.2.1/16", strict=False) == (0x0A000000, 16)


# ---- IPv6 (DNS upstreams)

IPV6_SAMPLES = ["::", "::1", "1::", "fd00::3", "FD00:0::3", "1:2:3:4:5:6:7:8", "1:0:0:2:0:0:0:3",
                "1:0:0:2:0:0:3:4", "0:0:1:0:0:0:0:0", "::ffff:192.0.2.1", "1:2:3:4:5:6:1.2.3.4",
                "fe80::1%eth0", "fe80::1%", "fe80::1%a%b", ":::", "1:::2", "1::2::3", ":1::2",
                "1::2:", "1:2:3:4:5:6:7", "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7::", "::1:2:3:4:5:6:7",
                "1:2:3:4::5:6:7:8", "12345::", "g::", "::01.2.3.4", "::1.2.3", ":", "", "1:2",
                "1:2:3:4:5:6:7:8::", "::0:0:0:0:0:0:0", " ::1", "::1.2.3.4:5", "\u0661::"]


def _ipaddress_v6(text: str) -> str | None:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        return None


def _ours_v6(text: str) -> str | None:
    try:
        return netparams.parse_ipv6(text)
    except NetParamError:
        return None


def _same_v6(ours: str | None, theirs: str | None) -> bool:
    # Compared as values: newer Pythons print IPv4-mapped addresses as dotted quads.
    if ours is None or theirs is None:
        return ours is theirs
    return ipaddress.IPv6Address(ours) == ipaddress.IPv6Address(theirs)


@pytest.mark.parametrize("text", IPV6_SAMPLES)
def test_ipv6_agrees_with_ipaddress(text: str) -> None:
    assert _same_v6(_ours_v6(text), _ipaddress_v6(text))


@given(st.text(alphabet="0123456789abcdefABCDEF:.%", max_size=45))
def test_ipv6_agrees_with_ipaddress_on_any_hex_and_colons(text: str) -> None:
    assert _same_v6(_ours_v6(text), _ipaddress_v6(text))


@given(st.integers(0, 2**128 - 1))
def test_ipv6_text_is_ipaddress_canonical_form(value: int) -> None:
    address = ipaddress.IPv6Address(value)
    if address.ipv4_mapped is None:  # printed differently across Python versions
        assert netparams.parse_ipv6(address.exploded) == str(address)


# ---- MAC


@pytest.mark.parametrize(("text", "mac"), [
    ("52:55:0a:00:02:64", b"\x52\x55\x0a\x00\x02\x64"),
    ("2:2:3:4:5:6", b"\x02\x02\x03\x04\x05\x06"),
    ("AA-BB-CC-DD-EE-FE", b"\xaa\xbb\xcc\xdd\xee\xfe"),
])
def test_mac_accepted(text: str, mac: bytes) -> None:
    assert netparams.parse_mac(text) == mac


@pytest.mark.parametrize(("text", "kind"), [
    ("zz", netparams.SYNTAX),
    ("", netparams.SYNTAX),
    ("52:55:0a:00:02", netparams.SYNTAX),
    ("52:55:0a:00:02:02:03", netparams.SYNTAX),
    ("52:55:0a:00:02:", netparams.SYNTAX),
    ("52:55:0a:00:02:123", netparams.SYNTAX),
    ("+2:55:0a:00:02:02", netparams.SYNTAX),  # int(..., 16) would take the sign
    (" 2:55:0a:00:02:02", netparams.SYNTAX),
    ("01:00:5e:00:00:01", netparams.MULTICAST),
    ("ff:ff:ff:ff:ff:ff", netparams.MULTICAST),
    ("00:00:00:00:00:00", netparams.ZERO),
])
def test_mac_refused(text: str, kind: str) -> None:
    assert kind_of(netparams.parse_mac, text) == kind


def test_mac_text_is_canonical() -> None:
    assert netparams.format_mac(netparams.parse_mac("2-A-3:4:5:6")) == "02:0a:03:04:05:06"


# ---- DNS upstreams


@pytest.mark.parametrize(("text", "expected"), [
    ("1.1.1.1", ("1.1.1.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("127.0.0.1:05353", ("127.0.0.1", 5353)),
    ("[::1]", ("::1", 53)),
    ("[::1]:5300", ("::1", 5300)),
    ("fd00::3", ("fd00::3", 53)),
    ("[FD00:0::3]:53", ("fd00::3", 53)),
    ("[fe80::1%eth0]:53", ("fe80::1%eth0", 53)),
    ("1.2.3.4:65535", ("1.2.3.4", 65535)),
])
def test_upstream_accepted(text: str, expected: tuple[str, int]) -> None:
    assert netparams.parse_dns_upstream(text) == expected


@pytest.mark.parametrize(("text", "kind"), [
    ("dns.example", netparams.SYNTAX),
    ("localhost:53", netparams.SYNTAX),
    ("[::1", netparams.SYNTAX),
    ("[::1]53", netparams.SYNTAX),
    ("[127.0.0.1]:53", netparams.SYNTAX),
    ("010.0.0.1", netparams.SYNTAX),  # would be 8.0.0.1 to inet_aton
    ("", netparams.SYNTAX),
    ("1.2.3.4:0", netparams.PORT),
    ("1.2.3.4:", netparams.PORT),
    ("1.2.3.4:65536", netparams.PORT),
    ("1.2.3.4:dns", netparams.PORT),
    ("1.2.3.4:\u0665\u0663", netparams.PORT),
    ("1.2.3.4:+53", netparams.PORT),
    ("[::1]:", netparams.PORT),
])
def test_upstream_refused(text: str, kind: str) -> None:
    assert kind_of(netparams.parse_dns_upstream, text) == kind


# ---- interface names


@pytest.mark.parametrize(("name", "kind"), [
    ("tap0", None), ("a" * 15, None), ("tap-0.1_x", None), ("é" * 7, None),
    ("", netparams.RANGE), ("a" * 16, netparams.RANGE), ("é" * 8, netparams.RANGE),
    ("tap/0", netparams.SYNTAX), ("tap 0", netparams.SYNTAX), ("tap\t0", netparams.SYNTAX),
    ("tap\0", netparams.SYNTAX), ("tap\u00a00", netparams.SYNTAX),
    ("tap:0", netparams.RESERVED), (".", netparams.RESERVED), ("..", netparams.RESERVED),
])
def test_ifname(name: str, kind: str | None) -> None:
    assert kind_of(netparams.check_ifname, name) == kind


# ---- the front ends accept and refuse the same values


def cli_accepts(*argv: str) -> bool:
    try:
        parse_args([*argv, NOPID])
    except UsageError:
        return False
    return True


def cni_accepts(**fields: Any) -> bool:
    conf = {"cniVersion": "1.1.0", "name": "slirptest", "type": "slirp", **fields}
    try:
        plugin.parse_settings(conf, {})
    except plugin.CniError:
        return False
    return True


def sidecar_accepts(*argv: str) -> bool:
    try:
        sidecar._parse_args(list(argv))
    except SystemExit:
        return False
    return True


def stack_accepts(**fields: Any) -> bool:
    try:
        NetConfig(**fields)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("mtu", [0, 1, 67, 68, 575, 576, 1280, 1499, 1500, 9000, 65520, 65521,
                                 65522])
def test_every_front_end_takes_the_same_mtus(mtu: int) -> None:
    verdicts = {"cli": cli_accepts(f"--mtu={mtu}"), "cni": cni_accepts(mtu=mtu),
                "sidecar": sidecar_accepts(f"--virtio-mtu={mtu}"), "stack": stack_accepts(mtu=mtu)}
    assert set(verdicts.values()) == {netparams.MIN_MTU <= mtu <= netparams.MAX_MTU}, verdicts


CIDRS = ["10.0.2.0/24", "10.0.0.0/8", "10.0.0.0/08", "172.16.0.0/25", "10.0.2.1/24",
         "10.0.2.0/26", "0.0.0.0/0", "010.0.2.0/24", "10.0.2.0/024", "10.0.2.0/\u0662\u0664",
         "10.0.2.0/255.255.255.0", "10.0.2.0", "banana", "10.0.2.0/24/8", "10.0.2.0/-8"]


def _stack_takes_cidr(text: str) -> bool:
    try:
        parse_cidr(text)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("cidr", CIDRS)
def test_every_front_end_takes_the_same_cidrs(cidr: str) -> None:
    verdicts = {"cli": cli_accepts(f"--cidr={cidr}"), "cni": cni_accepts(cidr=cidr),
                "stack": _stack_takes_cidr(cidr)}
    assert len(set(verdicts.values())) == 1, verdicts


MACS = ["52:55:0a:00:02:64", "02:00:00:00:00:01", "2:2:3:4:5:6", "AA-BB-CC-DD-EE-FE",
        "01:00:5e:00:00:01", "00:00:00:00:00:00", "zz", "52:55:0a:00:02", "+2:55:0a:00:02:02"]


@pytest.mark.parametrize("mac", MACS)
def test_cli_and_cni_take_the_same_macs(mac: str) -> None:
    verdicts = {"cli": cli_accepts("-c", f"--macaddress={mac}"),
                "cni": cni_accepts(macAddress=mac),
                "cni runtimeConfig": cni_accepts(runtimeConfig={"mac": mac})}
    assert len(set(verdicts.values())) == 1, verdicts


def test_cni_hands_the_engine_a_canonical_mac() -> None:
    conf = {"cniVersion": "1.1.0", "name": "n", "type": "slirp", "macAddress": "2-A-3:4:5:6"}
    assert plugin.parse_settings(conf, {})["mac"] == "02:0a:03:04:05:06"


UPSTREAMS = ["1.1.1.1", "127.0.0.1:5353", "[::1]", "[::1]:5300", "fd00::3", "1.2.3.4:0",
             "1.2.3.4:65536", "dns.example", "010.0.0.1", "1.2.3.4:\u0665\u0663", "[::1]53"]


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_every_front_end_takes_the_same_upstreams(upstream: str) -> None:
    verdicts = {"cli": cli_accepts(f"--dns-upstream={upstream}"),
                "cni": cni_accepts(dnsUpstreams=[upstream]),
                "sidecar": sidecar_accepts(f"--dns-upstream={upstream}")}
    assert len(set(verdicts.values())) == 1, verdicts


def test_cli_and_cni_resolve_an_upstream_alike() -> None:
    conf = {"cniVersion": "1.1.0", "name": "n", "type": "slirp",
            "dnsUpstreams": ["[FD00:0::3]:5300"]}
    assert plugin.parse_settings(conf, {})["dnsUpstreams"] == [["fd00::3", 5300]]
    assert parse_args(["--dns-upstream=[FD00:0::3]:5300", NOPID]).dns_upstreams == \
        [("fd00::3", 5300)]


@pytest.mark.parametrize("name", ["tap0", "tap:0", "..", "a" * 16, "tap/0"])
def test_cli_and_cni_take_the_same_interface_names(name: str) -> None:
    try:
        parse_args([NOPID, name])  # TAPNAME follows the PID
        cli_ok = True
    except UsageError:
        cli_ok = False
    assert cli_ok == (plugin._ifname_problem(name) is None)


def test_sidecar_names_the_bad_upstream(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        sidecar._parse_args(["--dns-upstream=dns.example"])
    assert ("argument --dns-upstream: 'dns.example': expected IPv4[:PORT] or [IPv6][:PORT]"
            in capsys.readouterr().err)


def test_sidecar_mtu_message_gives_the_range() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be 68\.\.65521$"):
        sidecar._mtu("67")
