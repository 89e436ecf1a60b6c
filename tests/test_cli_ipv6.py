"""``-6``/``--enable-ipv6`` and ``--cidr6``: what they give the stack, and one-line errors."""

from __future__ import annotations

import ipaddress

import pytest

from tests.test_cli import NOPID, parse, usage_error


def test_enable_ipv6_reaches_the_stack_with_slirp4netns_defaults() -> None:
    config = parse("-6", NOPID).net_config()
    assert config.enable_ipv6
    assert config.network6 == ipaddress.IPv6Network("fd00::/64")
    assert ipaddress.IPv6Address(config.gateway6) == ipaddress.IPv6Address("fd00::2")
    assert ipaddress.IPv6Address(config.dns6) == ipaddress.IPv6Address("fd00::3")
    assert not parse(NOPID).net_config().enable_ipv6


@pytest.mark.parametrize("argv", [["--cidr6=fd12:3456::/64"], ["--cidr6", "fd12:3456::/64"],
                                  ["--cidr6=FD12:3456:0::/64"]])
def test_cidr6_picks_the_prefix(argv: list[str]) -> None:
    config = parse("-6", *argv, NOPID).net_config()
    assert config.network6 == ipaddress.IPv6Network("fd12:3456::/64")
    assert ipaddress.IPv6Address(config.gateway6) == ipaddress.IPv6Address("fd12:3456::2")


def test_cidr_abbreviation_still_means_cidr() -> None:
    """slirp4netns accepts ``--cid``; our --cidr6 must not make it ambiguous."""
    assert parse("--cid=10.0.3.0/24", NOPID).cidr == ipaddress.IPv4Network("10.0.3.0/24")


@pytest.mark.parametrize("argv, message", [
    (["-6", "--cidr6=fd00::/48"], "invalid IPv6 prefix 'fd00::/48': the prefix length must be "
                                  "64 (SLAAC forms addresses from a /64)"),
    (["-6", "--cidr6=fd00::/96"], "invalid IPv6 prefix 'fd00::/96': the prefix length must be "
                                  "64 (SLAAC forms addresses from a /64)"),
    (["-6", "--cidr6=fd00::"], "invalid IPv6 prefix 'fd00::': no prefix length"),
    (["-6", "--cidr6=fd00::1/64"], "invalid IPv6 prefix 'fd00::1/64': fd00::1/64 has host "
                                   "bits set"),
    (["-6", "--cidr6=10.0.2.0/24"],
     "invalid IPv6 prefix '10.0.2.0/24': At least 3 parts expected in '10.0.2.0'"),
    (["-6", "--cidr6=fe80::/64"],
     "invalid IPv6 prefix 'fe80::/64': not a unicast prefix a guest can use (multicast, "
     "link-local, loopback, unspecified or IPv4-mapped)"),
    (["-6", "--cidr6=ff02::/64"],
     "invalid IPv6 prefix 'ff02::/64': not a unicast prefix a guest can use (multicast, "
     "link-local, loopback, unspecified or IPv4-mapped)"),
    (["--cidr6=fd00::/64"], "--cidr6 applies only with -6/--enable-ipv6"),
    (["-6", "--mtu=1000"], "MTU 1000 is too small for IPv6 (at least 1280, RFC 8200)"),
])
def test_bad_ipv6_options_are_one_line_errors(argv: list[str], message: str) -> None:
    assert usage_error(*argv, NOPID) == message
